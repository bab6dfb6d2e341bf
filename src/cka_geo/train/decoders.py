"""Segmentation decoders on top of :meth:`VisionTransformer.forward_intermediates`.

Every decoder maps images (B, C, H, W) to logits (B, classes, H, W) and reads the encoder
only through ``forward_intermediates`` (block outputs as (B, D, H/p, W/p) maps), so any
timm-named ViT, depth or patch size works.

- :class:`LinearDecoder`: the last block's normed output, one linear map per patch to
  ``classes × p × p`` values, rearranged to pixels (pixel shuffle). Linear in the features.
- :class:`UPerNetDecoder`: UPerNet-style, as PANGAEA / TerraTorch use for ViTs: four taps
  (blocks [3, 5, 7, 11] of a 12-block encoder), a neck that rescales them to ×4, ×2, ×1 and
  ×½ of the patch grid, a pyramid-pooling module on the coarsest, a top-down FPN, fusion of
  all levels, a 1×1 classifier and bilinear upsampling to (H, W).
- :class:`ProgressiveDecoder`: SETR-PUP-style progressive upsampling of the last block:
  conv 3×3 + norm + ReLU + ×2 upsampling, ⌊log2 p⌋ times, then a 1×1 classifier and (if p
  is not a power of two) a final bilinear resize.

Tap rule for other depths (:func:`default_taps`): the 12-block taps t ∈ {3, 5, 7, 11} sit
at relative depths (t + 1) / 12 ∈ {1/3, 1/2, 2/3, 1}; for depth L each tap becomes
⌊(t + 1) · L / 12 + ½⌋ − 1, clamped to [0, L − 1]. Depth 12 gives [3, 5, 7, 11], 6 gives
[1, 2, 3, 5], 24 gives [7, 11, 15, 23], 4 gives [0, 1, 2, 3]; below 4 blocks taps repeat.
Pass ``taps=`` to choose others (e.g. TerraTorch's [2, 5, 8, 11]).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from cka_geo.errors import UsageError
from cka_geo.sublayers import normalize_block

PANGAEA_TAPS_12 = (3, 5, 7, 11)


def default_taps(depth: int, base: Sequence[int] = PANGAEA_TAPS_12, base_depth: int = 12) -> list[int]:
    """Scale the taps ``base`` of a ``base_depth``-block encoder to ``depth`` blocks.

    Args:
        depth: Blocks of the encoder.
        base: Taps of the reference encoder (0-based).
        base_depth: Its depth.

    Returns:
        ``[clamp(floor((t + 1) * depth / base_depth + 0.5) - 1, 0, depth - 1) for t in base]``.
    """
    if depth < 1:
        raise UsageError(f"encoder depth must be positive, got {depth}")
    return [min(depth - 1, max(0, math.floor((t + 1) * depth / base_depth + 0.5) - 1)) for t in base]


def _check_taps(taps: Sequence[int], depth: int) -> list[int]:
    return [normalize_block(t, depth, "decoder tap") for t in taps]


def _norm(channels: int) -> nn.GroupNorm:
    # GroupNorm: independent of batch size (a 1x1 pooled map with batch 1 still works).
    return nn.GroupNorm(math.gcd(8, channels), channels)


class ConvNormAct(nn.Sequential):
    """Conv (no bias) -> GroupNorm -> ReLU."""

    def __init__(self, cin: int, cout: int, kernel: int = 3) -> None:
        super().__init__(
            nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=False), _norm(cout), nn.ReLU(inplace=True)
        )


class LinearDecoder(nn.Module):
    """Per-patch linear head: (B, D, h, w) -> (B, classes·p², h, w) -> pixel shuffle -> (B, classes, H, W).

    Args:
        embed_dim: Encoder width D.
        patch_size: Encoder patch size p.
        num_classes: Output channels.
        tap: Block whose output is used (default: the last).
    """

    def __init__(self, embed_dim: int, patch_size: int, num_classes: int, tap: int = -1) -> None:
        super().__init__()
        self.tap = tap
        self.patch_size = patch_size
        self.norm = nn.LayerNorm(embed_dim)
        self.proj = nn.Conv2d(embed_dim, num_classes * patch_size * patch_size, 1)

    def forward(self, encoder: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Logits (B, classes, H, W) for images ``x`` through ``encoder``."""
        (f,) = _intermediates(encoder)(x, [self.tap])
        f = self.norm(f.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return F.pixel_shuffle(self.proj(f), self.patch_size)


class _PPM(nn.Module):
    def __init__(self, cin: int, cout: int, scales: Sequence[int] = (1, 2, 3, 6)) -> None:
        super().__init__()
        self.scales = tuple(scales)
        self.convs = nn.ModuleList(ConvNormAct(cin, cout, 1) for _ in self.scales)
        self.bottleneck = ConvNormAct(cin + len(self.scales) * cout, cout, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        outs = [x]
        for s, conv in zip(self.scales, self.convs, strict=True):
            y = conv(F.adaptive_avg_pool2d(x, s))
            outs.append(F.interpolate(y, size=size, mode="bilinear", align_corners=False))
        return self.bottleneck(torch.cat(outs, dim=1))


class UPerNetDecoder(nn.Module):
    """UPerNet-style decoder over four taps of a ViT (see the module docstring).

    Args:
        embed_dim: Encoder width D.
        depth: Encoder depth (for the default taps).
        num_classes: Output channels.
        taps: Four block indices; default :func:`default_taps` of ``depth``.
        channels: Width of the decoder's convolutions.
    """

    def __init__(
        self,
        embed_dim: int,
        depth: int,
        num_classes: int,
        taps: Sequence[int] | None = None,
        channels: int = 64,
    ) -> None:
        super().__init__()
        self.taps = _check_taps(taps if taps is not None else default_taps(depth), depth)
        if len(self.taps) != 4:
            raise UsageError(f"the UPerNet decoder takes 4 taps, got {len(self.taps)}")
        d = embed_dim
        # Neck: rescale the four single-scale ViT maps to x4, x2, x1, x1/2 of the patch grid.
        self.neck = nn.ModuleList(
            [
                nn.Sequential(
                    nn.ConvTranspose2d(d, d, 2, stride=2), _norm(d), nn.GELU(), nn.ConvTranspose2d(d, d, 2, stride=2)
                ),
                nn.ConvTranspose2d(d, d, 2, stride=2),
                nn.Identity(),
                nn.MaxPool2d(2, ceil_mode=True),
            ]
        )
        self.ppm = _PPM(d, channels)
        self.lateral = nn.ModuleList(ConvNormAct(d, channels, 1) for _ in range(3))
        self.fpn = nn.ModuleList(ConvNormAct(channels, channels, 3) for _ in range(3))
        self.fuse = ConvNormAct(4 * channels, channels, 3)
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, encoder: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Logits (B, classes, H, W) for images ``x`` through ``encoder``."""
        feats = _intermediates(encoder)(x, self.taps)
        feats = [m(f) for m, f in zip(self.neck, feats, strict=True)]
        lat = [conv(f) for conv, f in zip(self.lateral, feats[:3], strict=True)]
        lat.append(self.ppm(feats[3]))
        for i in range(3, 0, -1):  # top-down pathway
            lat[i - 1] = lat[i - 1] + F.interpolate(lat[i], size=lat[i - 1].shape[-2:], mode="bilinear", align_corners=False)
        outs = [self.fpn[i](lat[i]) for i in range(3)] + [lat[3]]
        size = outs[0].shape[-2:]
        outs = [outs[0]] + [F.interpolate(o, size=size, mode="bilinear", align_corners=False) for o in outs[1:]]
        y = self.classifier(self.fuse(torch.cat(outs, dim=1)))
        return F.interpolate(y, size=x.shape[-2:], mode="bilinear", align_corners=False)


class ProgressiveDecoder(nn.Module):
    """Progressive upsampling (SETR-PUP-style) of one block's output.

    Args:
        embed_dim: Encoder width D.
        patch_size: Encoder patch size p (sets the number of ×2 stages, ⌊log2 p⌋).
        num_classes: Output channels.
        channels: Width of the decoder's convolutions.
        tap: Block whose output is used (default: the last).
    """

    def __init__(self, embed_dim: int, patch_size: int, num_classes: int, channels: int = 64, tap: int = -1) -> None:
        super().__init__()
        self.tap = tap
        self.stages_n = max(0, math.floor(math.log2(patch_size)))
        self.norm = nn.LayerNorm(embed_dim)
        cin = embed_dim
        stages = []
        for _ in range(max(1, self.stages_n)):
            stages.append(ConvNormAct(cin, channels, 3))
            cin = channels
        self.stages = nn.ModuleList(stages)
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, encoder: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Logits (B, classes, H, W) for images ``x`` through ``encoder``."""
        (f,) = _intermediates(encoder)(x, [self.tap])
        f = self.norm(f.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        for i, stage in enumerate(self.stages):
            f = stage(f)
            if i < self.stages_n:
                f = F.interpolate(f, scale_factor=2, mode="bilinear", align_corners=False)
        y = self.classifier(f)
        if y.shape[-2:] != x.shape[-2:]:
            y = F.interpolate(y, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return y


DECODERS = ("linear", "upernet", "progressive")


def build_decoder(
    name: str,
    encoder_cfg: object,
    num_classes: int,
    taps: Sequence[int] | None = None,
    channels: int = 64,
) -> nn.Module:
    """A decoder by name for an encoder of config ``encoder_cfg`` (a :class:`~cka_geo.models.vit.ViTConfig`).

    Args:
        name: ``"linear"``, ``"upernet"`` or ``"progressive"``.
        encoder_cfg: The encoder's config (``embed_dim``, ``depth``, ``patch_size``).
        num_classes: Output channels.
        taps: UPerNet taps (default :func:`default_taps`); for the others, one tap.
        channels: Decoder width (UPerNet, progressive).
    """
    d, depth, p = encoder_cfg.embed_dim, encoder_cfg.depth, encoder_cfg.patch_size  # type: ignore[attr-defined]
    if name == "upernet":
        return UPerNetDecoder(d, depth, num_classes, taps=taps, channels=channels)
    tap = -1
    if taps is not None:
        if len(taps) != 1:
            raise UsageError(f"the {name} decoder takes one tap, got {list(taps)}")
        tap = _check_taps(taps, depth)[0]
    if name == "linear":
        return LinearDecoder(d, p, num_classes, tap=tap)
    if name == "progressive":
        return ProgressiveDecoder(d, p, num_classes, channels=channels, tap=tap)
    raise UsageError(f"unknown decoder {name!r}; choose one of {', '.join(DECODERS)}")


__all__ = [
    "DECODERS",
    "LinearDecoder",
    "ProgressiveDecoder",
    "UPerNetDecoder",
    "build_decoder",
    "default_taps",
]


def _intermediates(encoder: nn.Module) -> Any:
    """``encoder.forward_intermediates`` (a method of the ViT, not a submodule)."""
    return getattr(encoder, "forward_intermediates")  # noqa: B009
