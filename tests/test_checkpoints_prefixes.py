"""Property: the encoder is found under any mix of containers and wrapper prefixes."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cka_geo.checkpoints import load_checkpoint
from cka_geo.errors import CheckpointError
from cka_geo.vit import VisionTransformer, ViTConfig

CFG = ViTConfig(img_size=16, patch_size=8, in_chans=6, embed_dim=32, depth=2, num_heads=1)
torch.manual_seed(0)
SD = VisionTransformer(CFG).state_dict()
WRAPPERS = [
    "module.",
    "_orig_mod.",
    "model.",
    "encoder.",
    "backbone.",
    "base_encoder.",
    "vit_model.",
    "dofa_model.",
]
CONTAINERS = [
    (),
    ("state_dict",),
    ("model",),
    ("module",),
    ("model_state_dict",),
    ("teacher",),
    ("state_dict", "net"),
]


def _nest(container: tuple[str, ...], sd: dict) -> dict:
    obj: dict = sd
    for key in reversed(container):
        obj = {key: obj, "epoch": 3}
    return obj


@settings(max_examples=25, deadline=None)
@given(
    container=st.sampled_from(CONTAINERS),
    wrappers=st.lists(st.sampled_from(WRAPPERS), max_size=3),
    decoder=st.booleans(),
    head=st.booleans(),
    suffix=st.sampled_from([".pt", ".pth", ".ckpt", ".bin"]),
)
def test_encoder_found_under_any_wrapping(container, wrappers, decoder, head, suffix):
    wrap = "".join(wrappers)
    sd = {wrap + k: v for k, v in SD.items()}
    if decoder:  # MAE-style decoder beside the encoder, and a Prithvi-2-style one
        sd[f"{wrap}decoder_blocks.0.mlp.fc1.weight"] = torch.zeros(64, 16)
        sd[f"{wrap}decoder.decoder_blocks.0.mlp.fc1.weight"] = torch.zeros(64, 16)
        sd[f"{wrap}mask_token"] = torch.zeros(1, 1, 16)
    if head:
        sd[f"{wrap}head.weight"] = torch.zeros(3, 32)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"ckpt{suffix}"
        torch.save(_nest(container, sd), path)
        loaded = load_checkpoint(path)
    expected = "".join(f"{c}." for c in container) + wrap
    assert loaded.prefix == expected
    assert loaded.config.to_dict() == {**CFG.to_dict(), "fc_norm": False}
    assert set(loaded.state_dict) == set(SD)
    assert all(torch.equal(loaded.state_dict[k], v) for k, v in SD.items())
    assert (f"{expected}head.weight" in loaded.ignored) == head
    if wrap:
        assert f"stripped {wrap!r}" in loaded.notes
    if container:
        assert any(n.startswith("unwrapped ckpt[") for n in loaded.notes)


@pytest.mark.parametrize(
    ("part", "field", "value"),
    [("norm_pre.weight", "pre_norm", True), ("reg_token", "reg_tokens", 1), ("dist_token", "dist_token", True)],
)
def test_timm_variant_parts_are_built_not_ignored(tmp_path, part, field, value):
    """Register / distillation tokens and a pre-norm are parts of the ViT now, never dropped."""
    sd = {k: v for k, v in SD.items() if k != "pos_embed"}
    sd[part] = torch.zeros(1, 1, 32) if part.endswith("token") else torch.ones(32)
    torch.save(sd, tmp_path / "v.pt")
    loaded = load_checkpoint(tmp_path / "v.pt", num_heads=CFG.num_heads)
    assert getattr(loaded.config, field) == value and part in loaded.state_dict


def test_unknown_block_key_is_named(tmp_path):
    sd = dict(SD)
    sd["blocks.0.attn.rel_pos_h"] = torch.ones(32)
    torch.save(sd, tmp_path / "q.pt")
    with pytest.raises(
        CheckpointError, match=r"q\.pt: encoder has 1 key\(s\) .* 'blocks\.0\.attn\.rel_pos_h'"
    ):
        load_checkpoint(tmp_path / "q.pt")
