"""Segmentation decoders: output shapes for several depths and patch sizes; the tap rule."""

from __future__ import annotations

import pytest
import torch

from _train_helpers import tiny_vit
from cka_geo.errors import UsageError
from cka_geo.train.decoders import build_decoder, default_taps


@pytest.mark.parametrize("name", ["linear", "upernet", "progressive"])
@pytest.mark.parametrize(("depth", "patch", "img"), [(1, 4, 16), (2, 8, 32), (4, 4, 24), (6, 16, 32), (3, 6, 24)])
def test_output_shape(name, depth, patch, img):
    enc = tiny_vit(depth=depth, patch=patch, img=img, chans=5, dim=16)
    dec = build_decoder(name, enc.cfg, num_classes=3, channels=16)
    x = torch.randn(2, 5, img, img)
    y = dec(enc, x)
    assert y.shape == (2, 3, img, img)
    assert torch.isfinite(y).all()
    y.sum().backward()  # gradients reach the encoder
    assert enc.patch_embed.proj.weight.grad is not None


def test_default_taps_rule():
    assert default_taps(12) == [3, 5, 7, 11]
    assert default_taps(6) == [1, 2, 3, 5]
    assert default_taps(24) == [7, 11, 15, 23]
    assert default_taps(4) == [0, 1, 2, 3]
    assert default_taps(2) == [0, 0, 0, 1]
    for depth in range(1, 40):
        taps = default_taps(depth)
        assert taps == sorted(taps) and taps[-1] == depth - 1 and taps[0] >= 0


def test_upernet_uses_its_taps():
    enc = tiny_vit(depth=4, dim=16)
    dec = build_decoder("upernet", enc.cfg, 2, taps=[0, 1, 2, 3], channels=16)
    seen = []
    orig = enc.forward_intermediates
    enc.forward_intermediates = lambda x, idx, **kw: (seen.append(list(idx)), orig(x, idx, **kw))[1]
    dec(enc, torch.randn(1, 3, 16, 16))
    assert seen == [[0, 1, 2, 3]]
    with pytest.raises(UsageError, match="tap 7"):
        build_decoder("upernet", enc.cfg, 2, taps=[0, 1, 2, 7])
    with pytest.raises(UsageError, match="4 taps"):
        build_decoder("upernet", enc.cfg, 2, taps=[0, 1])
    with pytest.raises(UsageError, match="unknown decoder"):
        build_decoder("fcn", enc.cfg, 2)


def test_linear_decoder_is_per_patch():
    """Changing one patch's features changes exactly that patch's p x p logits (the encoder
    is a stub that returns its input as the feature map, since attention mixes tokens)."""
    enc = tiny_vit(depth=1, dim=16)
    dec = build_decoder("linear", enc.cfg, 2)
    feats = torch.randn(1, 16, 4, 4)

    class Stub:
        def forward_intermediates(self, x, idx, norm=False):
            return [x]

    y0 = dec(Stub(), feats)
    f2 = feats.clone()
    f2[0, :, 1, 2] += torch.randn(16)
    y1 = dec(Stub(), f2)
    changed = (y0 != y1).any(dim=1)[0]
    assert changed[4:8, 8:12].all() and changed.sum() == 16
