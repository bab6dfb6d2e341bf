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

from cka_geo.errors import CheckpointError
from cka_geo.openclip import OpenClipVisionConfig
from cka_geo.vit import ViTConfig

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
    """Sorted block indices; refuse gaps (pruned blocks), naming the missing ones."""
    rx = re.compile(pattern)
    indices = sorted({int(m[1]) for k in sd if (m := rx.match(k))})
    missing = sorted(set(range(indices[-1] + 1)) - set(indices)) if indices else []
    if missing:
        raise CheckpointError(
            f"blocks are not contiguous (found {indices}, missing {missing}): checkpoints with "
            "pruned blocks are not supported"
        )
    return indices


def _grid(tokens: int, what: str) -> int:
    g = math.isqrt(tokens)
    if g * g != tokens:
        raise CheckpointError(
            f"{what} has {tokens} patch positions, not a square grid "
            "(multi-frame or non-square checkpoints are not supported)"
        )
    return g


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
    if w.ndim != 4 or w.shape[-1] != w.shape[-2]:
        raise CheckpointError(f"patch_embed.proj.weight has unexpected shape {tuple(w.shape)}")
    width, bands, patch = w.shape[0], w.shape[1], w.shape[-1]
    _fill_zero_biases(sd, ["patch_embed.proj.weight"], notes)
    depth = len(block_indices(sd, r"^blocks\.(\d+)\."))
    class_token = "cls_token" in sd
    no_embed_class = False
    missing_pos = "pos_embed" not in sd
    if not missing_pos:
        tokens = sd["pos_embed"].shape[1]
        if class_token and math.isqrt(tokens - 1) ** 2 == tokens - 1 and tokens > 1:
            img = _grid(tokens - 1, "pos_embed") * patch
        elif class_token:
            no_embed_class = True
            img = _grid(tokens, "pos_embed") * patch
            notes.append("pos_embed covers the patch tokens only (timm no_embed_class)")
        else:
            img = _grid(tokens, "pos_embed") * patch
    else:
        img = DEFAULT_IMG_SIZE if DEFAULT_IMG_SIZE % patch == 0 else 14 * patch
        sd["pos_embed"] = torch.zeros(1, (1 if class_token else 0) + (img // patch) ** 2, width)
        notes.append(
            f"no pos_embed: zeros used, image size {img} assumed (any size works: dynamic_img_size)"
        )
    hidden = sd["blocks.0.mlp.fc1.weight"].shape[0]
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
        return ViTConfig(
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


def infer_open_clip(
    sd: dict[str, torch.Tensor],
    notes: list[str],
    *,
    num_heads: int | None,
    stored_heads: tuple[int, str] | None,
) -> OpenClipVisionConfig:
    """OpenClipVisionConfig of a visual tower (keys without ``visual.``)."""
    w = sd["conv1.weight"]
    width, bands, patch = w.shape[0], w.shape[1], w.shape[-1]
    layers = len(block_indices(sd, r"^transformer\.resblocks\.(\d+)\."))
    if "positional_embedding" not in sd:
        raise CheckpointError("open_clip tower without positional_embedding")
    img = _grid(sd["positional_embedding"].shape[0] - 1, "positional_embedding") * patch
    if any(k.startswith("attn_pool.") for k in sd):
        raise CheckpointError("open_clip attentional pooling (attn_pool) is not supported")
    heads = default_heads(width, num_heads, stored_heads, notes)
    notes.append("open_clip: GELU (not QuickGELU) and LayerNorm eps 1e-5 assumed")
    try:
        return OpenClipVisionConfig(
            image_size=img,
            patch_size=patch,
            in_chans=bands,
            width=width,
            layers=layers,
            heads=heads,
            mlp_hidden_dim=sd["transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
            output_dim=sd["proj"].shape[1] if "proj" in sd else 0,
            layer_scale="transformer.resblocks.0.ls_1.gamma" in sd,
        )
    except ValueError as exc:
        raise CheckpointError(f"inferred an impossible open_clip tower: {exc}") from exc
