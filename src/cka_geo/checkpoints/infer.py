"""Inferring the architecture from an encoder state dict (keys relative to the encoder).

What the weights tell: depth, width, bands, patch size, image size (from the position
embedding), MLP hidden width, qkv bias, layer scale, class token, final norm vs fc_norm. What
they do not: the number of heads (``width / 64`` unless given or stored), LayerNorm epsilon
(1e-6 for timm, 1e-5 for open_clip) and open_clip's activation (GELU, not QuickGELU). Every
assumption is written to ``notes``.
"""

from __future__ import annotations

import math
import re

import torch

from cka_geo.checkpoints.limits import (
    MAX_BANDS,
    MAX_BLOCKS,
    MAX_HIDDEN,
    MAX_IMG_SIZE,
    MAX_PATCH_SIZE,
    MAX_WIDTH,
    bounded,
    check_config,
)
from cka_geo.errors import CheckpointError
from cka_geo.models.openclip import OpenClipVisionConfig
from cka_geo.models.vit import ViTConfig

DEFAULT_IMG_SIZE = 224


def default_heads(
    width: int, num_heads: int | None, stored: tuple[int, str] | None, notes: list[str]
) -> int:
    """Heads: given > stored > width / 64 (1 when width is not a multiple of 64)."""
    if num_heads is not None:
        notes.append(f"num_heads={num_heads} as given")
        return num_heads
    if stored is not None:
        notes.append(f"num_heads={stored[0]} read from {stored[1]}")
        return stored[0]
    heads = width // 64 if width % 64 == 0 else 1
    notes.append(
        f"num_heads={heads} assumed (width {width} / 64; weights do not record it): "
        "pass num_heads if the model used another"
    )
    return heads


def block_indices(sd: dict[str, torch.Tensor], pattern: str) -> list[int]:
    """Sorted block indices; refuse gaps (pruned blocks) and more than MAX_BLOCKS blocks.

    ``pattern`` captures the index as group 1; indices of more than nine digits do not
    match it, so their keys are refused later as unknown.
    """
    rx = re.compile(pattern)
    indices = sorted({int(m[1]) for k in sd if (m := rx.match(k))})
    if indices and indices[-1] >= MAX_BLOCKS:
        raise CheckpointError(
            f"block index {indices[-1]} in the keys: more than {MAX_BLOCKS} blocks is refused"
        )
    missing = sorted(set(range(indices[-1] + 1)) - set(indices)) if indices else []
    if missing:
        raise CheckpointError(
            f"blocks are not contiguous (found {indices}, missing {missing}): checkpoints with "
            "pruned blocks are not supported"
        )
    return indices


def _grid(tokens: int, what: str) -> int:
    g = math.isqrt(max(tokens, 0))
    if tokens < 1 or g * g != tokens:
        raise CheckpointError(
            f"{what} has {tokens} patch positions, not a square grid "
            "(multi-frame or non-square checkpoints are not supported)"
        )
    return g


def _image_size(grid: int, patch: int, what: str) -> int:
    """grid × patch, refused above MAX_IMG_SIZE, naming the key that implies it."""
    img = grid * patch
    if img > MAX_IMG_SIZE:
        raise CheckpointError(
            f"{what} implies a {grid}×{grid} patch grid of {patch} px, a {img} px image: "
            f"more than {MAX_IMG_SIZE} px is refused"
        )
    return img


def _patch_embedding(w: torch.Tensor, key: str) -> tuple[int, int, int]:
    """(width, bands, patch) of a 4-D square patch embedding, each within its limit."""
    if w.ndim != 4 or w.shape[-1] != w.shape[-2]:
        raise CheckpointError(f"{key} has unexpected shape {tuple(w.shape)}")
    width = bounded(w.shape[0], 1, MAX_WIDTH, f"the width ({key} dim 0)")
    bands = bounded(w.shape[1], 1, MAX_BANDS, f"the band count ({key} dim 1)")
    patch = bounded(w.shape[-1], 1, MAX_PATCH_SIZE, f"the patch size ({key} dims 2-3)")
    return width, bands, patch


def _matrix(sd: dict[str, torch.Tensor], key: str, rows: str) -> int:
    """Rows of a 2-D weight, within MAX_HIDDEN."""
    w = sd[key]
    if w.ndim != 2:
        raise CheckpointError(f"{key} has unexpected shape {tuple(w.shape)} (expected 2-D)")
    return bounded(w.shape[0], 1, MAX_HIDDEN, f"{rows} ({key} dim 0)")


def _fill_zero_biases(sd: dict[str, torch.Tensor], weights: list[str], notes: list[str]) -> None:
    added = []
    for w in weights:
        b = w[: -len("weight")] + "bias"
        if w in sd and b not in sd:
            sd[b] = torch.zeros(sd[w].shape[0], dtype=sd[w].dtype)
            added.append(b)
    if added:
        notes.append(
            f"added zero biases where the checkpoint has none: {', '.join(added[:4])}"
            + (" …" if len(added) > 4 else "")
        )


def infer_timm(
    sd: dict[str, torch.Tensor],
    notes: list[str],
    *,
    num_heads: int | None,
    stored_heads: tuple[int, str] | None,
) -> ViTConfig:
    """ViTConfig of a timm-named encoder; adapts ``sd`` in place where that is exact.

    Exact adaptations: a Conv3d patch embedding with kernel depth 1 is squeezed to 2-D; a
    patch embedding or LayerNorm without bias gets a zero bias; a missing ``pos_embed``
    becomes zeros (image size 224, or 14 patches when 224 is not a multiple of the patch).
    Shapes that imply sizes beyond :mod:`cka_geo.checkpoints.limits` are refused first.
    """
    if "patch_embed.proj.weight" not in sd:
        if any(k.startswith("patch_embed.weight_generator.") for k in sd):
            raise CheckpointError(
                "DOFA's wavelength-conditioned patch embedding (patch_embed.weight_generator) "
                "is not supported"
            )
        raise CheckpointError("no patch embedding (patch_embed.proj.weight) beside the blocks")
    w = sd["patch_embed.proj.weight"]
    if w.ndim == 5:
        if w.shape[2] != 1:
            raise CheckpointError(
                f"patch_embed.proj.weight {tuple(w.shape)} is a 3-D (tubelet {w.shape[2]}) "
                "embedding: multi-frame checkpoints are not supported"
            )
        sd["patch_embed.proj.weight"] = w = w[:, :, 0]
        notes.append("squeezed the Conv3d patch embedding (tubelet 1) to 2-D")
    width, bands, patch = _patch_embedding(w, "patch_embed.proj.weight")
    _fill_zero_biases(sd, ["patch_embed.proj.weight"], notes)
    depth = len(block_indices(sd, r"^blocks\.(\d{1,9})\."))
    class_token = "cls_token" in sd
    no_embed_class = False
    missing_pos = "pos_embed" not in sd
    if not missing_pos:
        pos = sd["pos_embed"]
        if pos.ndim != 3 or pos.shape[0] != 1 or pos.shape[1] < 1:
            raise CheckpointError(
                f"pos_embed has shape {tuple(pos.shape)}, expected (1, tokens, width)"
            )
        tokens = pos.shape[1]
        what = f"pos_embed {tuple(pos.shape)}"
        if class_token and tokens > 1 and math.isqrt(tokens - 1) ** 2 == tokens - 1:
            img = _image_size(_grid(tokens - 1, "pos_embed"), patch, what)
        elif class_token:
            no_embed_class = True
            img = _image_size(_grid(tokens, "pos_embed"), patch, what)
            notes.append("pos_embed covers the patch tokens only (timm no_embed_class)")
        else:
            img = _image_size(_grid(tokens, "pos_embed"), patch, what)
    else:
        img = DEFAULT_IMG_SIZE if DEFAULT_IMG_SIZE % patch == 0 else 14 * patch
        sd["pos_embed"] = torch.zeros(1, (1 if class_token else 0) + (img // patch) ** 2, width)
        notes.append(
            f"no pos_embed: zeros used, image size {img} assumed (any size works: dynamic_img_size)"
        )
    if "blocks.0.mlp.fc1.weight" not in sd:
        raise CheckpointError("no blocks.0.mlp.fc1.weight: the first block is missing")
    hidden = _matrix(sd, "blocks.0.mlp.fc1.weight", "the MLP width")
    layer_scale = 1.0 if "blocks.0.ls1.gamma" in sd else None
    has_norm, has_fc_norm = "norm.weight" in sd, "fc_norm.weight" in sd
    norms = [k for k in sd if k.endswith(("norm1.weight", "norm2.weight"))] + [
        k for k in ("norm.weight", "fc_norm.weight") if k in sd
    ]
    linears = [
        f"blocks.{i}.{name}.weight"
        for i in range(depth)
        for name in ("attn.proj", "mlp.fc1", "mlp.fc2")
    ]
    _fill_zero_biases(sd, norms + linears, notes)
    if not (has_norm or has_fc_norm):
        notes.append("no final norm (norm / fc_norm) in the checkpoint: built without one")
    heads = default_heads(width, num_heads, stored_heads, notes)
    notes.append("LayerNorm eps 1e-6 assumed (timm default)")
    try:
        config = ViTConfig(
            img_size=img,
            patch_size=patch,
            in_chans=bands,
            embed_dim=width,
            depth=depth,
            num_heads=heads,
            mlp_ratio=4.0,
            mlp_hidden_dim=None if hidden == 4 * width else hidden,
            qkv_bias="blocks.0.attn.qkv.bias" in sd,
            class_token=class_token,
            layer_scale=layer_scale,
            final_norm=has_norm or has_fc_norm,
            global_pool="avg" if has_fc_norm or not class_token else "token",
            fc_norm=has_fc_norm,
            dynamic_img_size=missing_pos,
            no_embed_class=no_embed_class,
        )
    except ValueError as exc:
        raise CheckpointError(f"inferred an impossible ViT: {exc}") from exc
    check_config(config, "inferred config")
    return config


def infer_open_clip(
    sd: dict[str, torch.Tensor],
    notes: list[str],
    *,
    num_heads: int | None,
    stored_heads: tuple[int, str] | None,
) -> OpenClipVisionConfig:
    """OpenClipVisionConfig of a visual tower (keys without ``visual.``)."""
    width, bands, patch = _patch_embedding(sd["conv1.weight"], "conv1.weight")
    layers = len(block_indices(sd, r"^transformer\.resblocks\.(\d{1,9})\."))
    if "positional_embedding" not in sd:
        raise CheckpointError("open_clip tower without positional_embedding")
    pos = sd["positional_embedding"]
    if pos.ndim != 2 or pos.shape[0] < 2:
        raise CheckpointError(
            f"positional_embedding has shape {tuple(pos.shape)}, expected (1 + patches, width)"
        )
    grid = _grid(pos.shape[0] - 1, "positional_embedding")
    img = _image_size(grid, patch, f"positional_embedding {tuple(pos.shape)}")
    if "transformer.resblocks.0.mlp.c_fc.weight" not in sd:
        raise CheckpointError(
            "no transformer.resblocks.0.mlp.c_fc.weight: the first block is missing"
        )
    hidden = _matrix(sd, "transformer.resblocks.0.mlp.c_fc.weight", "the MLP width")
    if "proj" in sd and sd["proj"].ndim != 2:
        raise CheckpointError(f"proj has unexpected shape {tuple(sd['proj'].shape)} (expected 2-D)")
    if any(k.startswith("attn_pool.") for k in sd):
        raise CheckpointError("open_clip attentional pooling (attn_pool) is not supported")
    heads = default_heads(width, num_heads, stored_heads, notes)
    notes.append("open_clip: GELU (not QuickGELU) and LayerNorm eps 1e-5 assumed")
    try:
        config = OpenClipVisionConfig(
            image_size=img,
            patch_size=patch,
            in_chans=bands,
            width=width,
            layers=layers,
            heads=heads,
            mlp_hidden_dim=hidden,
            output_dim=sd["proj"].shape[1] if "proj" in sd else 0,
            layer_scale="transformer.resblocks.0.ls_1.gamma" in sd,
        )
    except ValueError as exc:
        raise CheckpointError(f"inferred an impossible open_clip tower: {exc}") from exc
    check_config(config, "inferred config")
    return config
