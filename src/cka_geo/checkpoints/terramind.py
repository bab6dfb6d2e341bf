"""TerraMind encoders mapped exactly onto the timm-named ViT (one image modality).

TerraMind (4M-style) keeps its encoder as ``encoder.{i}`` blocks (``norm1``, ``attn.qkv``,
``attn.proj``, ``norm2``, ``mlp.fc1``, ``mlp.fc2``; biases often absent, LayerNorm biases
stored as zero buffers), ``encoder_norm``, and one embedding per modality,
``encoder_embeddings.{modality}`` with ``proj`` (a bias-free Linear over patches flattened as
(row, col, band)), ``pos_emb`` (1, N, D) and ``mod_emb`` (1, 1, D). For a single image
modality this is a timm ViT without class token:

* ``patch_embed.proj.weight`` = ``proj.weight`` reshaped (D, p, p, C) -> (D, C, p, p), bias 0;
* ``pos_embed`` = ``pos_emb + mod_emb`` (both are added to every token);
* ``blocks.{i}.*`` = ``encoder.{i}.*`` (zero biases where absent); ``norm`` = ``encoder_norm``.

The modality used is S2 L1C (13 bands) when present, else S2 L2A, else the first in sorted
order; the others are listed in the notes. Multimodal input, token (tokenizer) modalities,
``qk_norm`` and gated MLPs are not supported. TerraMind resizes positions without
antialiasing; the timm ViT antialiases, so only the native image size is exact.
"""

from __future__ import annotations

import math

import torch

from cka_geo.checkpoints.limits import MAX_PATCH_SIZE, bounded
from cka_geo.errors import CheckpointError

PREFERRED = ("untok_sen2l1c", "untok_sen2l2a")
DEFAULT_PATCH = 16


def image_modalities(sd: dict[str, torch.Tensor]) -> list[str]:
    """Modalities with a patch projection (``encoder_embeddings.{m}.proj.weight``)."""
    names = {
        k[len("encoder_embeddings.") : -len(".proj.weight")]
        for k in sd
        if k.startswith("encoder_embeddings.") and k.endswith(".proj.weight")
    }
    return sorted(names)


def to_timm(sd: dict[str, torch.Tensor], notes: list[str]) -> tuple[dict[str, torch.Tensor], str]:
    """timm-named encoder tensors from TerraMind keys (relative to the model's prefix).

    Returns:
        (timm-named tensors, the modality whose embedding was used).

    Raises:
        CheckpointError: No image modality, no stored ``pos_emb``, shapes that do not
            factor into bands × patch², or unsupported variants (qk_norm, gated MLP).
    """
    if any(".attn.q_norm." in k or ".mlp.fc3." in k for k in sd if k.startswith("encoder.")):
        raise CheckpointError("TerraMind with qk_norm or a gated MLP (fc3) is not supported")
    modalities = image_modalities(sd)
    if not modalities:
        raise CheckpointError(
            "TerraMind checkpoint without an image patch embedding (encoder_embeddings.*.proj)"
        )
    preferred = [m for p in PREFERRED for m in modalities if m.split("@")[0] == p]
    mod = (preferred or modalities)[0]
    others = [m for m in modalities if m != mod]
    notes.append(
        f"TerraMind: mapped onto a timm ViT using the {mod!r} embedding"
        + (f" (also present: {', '.join(others)})" if others else "")
    )
    base = f"encoder_embeddings.{mod}."
    if f"{base}pos_emb" not in sd:
        raise CheckpointError(f"TerraMind: {base}pos_emb is not stored in the checkpoint")
    pos = sd[f"{base}pos_emb"]
    if pos.ndim == 4:  # (1, D, h, w) layout of some 4M versions
        pos = pos.flatten(2).transpose(1, 2)
    if pos.ndim != 3 or pos.shape[0] != 1 or pos.shape[1] < 1:
        raise CheckpointError(f"TerraMind: {base}pos_emb has unexpected shape {tuple(pos.shape)}")
    grid = math.isqrt(pos.shape[1])
    if grid * grid != pos.shape[1]:
        raise CheckpointError(
            f"TerraMind: {base}pos_emb has {pos.shape[1]} positions, not a square grid"
        )
    patch = DEFAULT_PATCH
    size = mod.rsplit("@", 1)[1] if "@" in mod else ""
    if size.isdigit() and len(size) <= 6 and int(size) % grid == 0 and int(size) >= grid:
        patch = int(size) // grid
    bounded(patch, 1, MAX_PATCH_SIZE, f"TerraMind: the patch size of {mod!r}")
    w = sd[f"{base}proj.weight"]
    if w.ndim != 2 or tuple(pos.shape[2:]) != (w.shape[0],):
        raise CheckpointError(
            f"TerraMind: {base}proj.weight {tuple(w.shape)} does not fit pos_emb {tuple(pos.shape)}"
        )
    width, flat = w.shape
    mod_emb = sd.get(f"{base}mod_emb")
    if mod_emb is not None and tuple(mod_emb.shape) != (1, 1, width):
        raise CheckpointError(
            f"TerraMind: {base}mod_emb has shape {tuple(mod_emb.shape)}, expected (1, 1, {width})"
        )
    if flat % (patch * patch):
        raise CheckpointError(
            f"TerraMind: {base}proj.weight {tuple(w.shape)} does not factor into bands × {patch}²"
        )
    bands = flat // (patch * patch)
    out: dict[str, torch.Tensor] = {
        "patch_embed.proj.weight": w.reshape(width, patch, patch, bands)
        .permute(0, 3, 1, 2)
        .contiguous(),
        "patch_embed.proj.bias": torch.zeros(width, dtype=w.dtype),
        "pos_embed": pos
        + (mod_emb if mod_emb is not None else torch.zeros(1, 1, width, dtype=pos.dtype)),
    }
    for key, value in sd.items():
        if key.startswith("encoder.") and key[len("encoder.") :].split(".")[0].isdigit():
            out["blocks." + key[len("encoder.") :]] = value
        elif key.startswith("encoder_norm."):
            out["norm." + key[len("encoder_norm.") :]] = value
    notes.append(
        f"TerraMind: {bands} bands, patch {patch}, pos_emb + mod_emb folded into pos_embed"
    )
    return out, mod
