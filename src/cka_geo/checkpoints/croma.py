"""CROMA checkpoints: find the optical (or SAR) encoder and infer a :class:`CromaConfig`.

Layouts read (block pattern ``…transformer.layers.{i}.1.net.0.weight``):

* CROMA's released files (also torchgeo's ``CROMA_base``/``CROMA_large``): a dict of dicts
  ``{"s1_encoder", "s1_GAP_FFN", "s2_encoder", "s2_GAP_FFN", "joint_encoder"}``;
* a torchgeo ``CROMA`` state dict: ``s2_encoder.…`` beside ``attn_bias`` (1, H, N, N) and
  the GAP heads; PANGAEA fine-tunes: ``model`` → ``encoder.s2_encoder.…``.

The optical encoder ``s2_encoder`` is chosen; the SAR encoder ``s1_encoder`` only when asked
for (``prefix="s1_encoder."``); the joint (cross-attention) encoder is refused. From the
weights: width, depth, bands (``linear_input`` has 8·8·bands inputs), MLP width, final norm.
Assumed and said in the notes: patch 8, 16 heads (CROMA's encoders always use 16), image size
120 — or heads and image size from a stored ``attn_bias`` beside the encoder.
"""

from __future__ import annotations

import math
import re

import torch

from cka_geo.checkpoints.infer import block_indices
from cka_geo.checkpoints.limits import MAX_BANDS, MAX_HIDDEN, MAX_WIDTH, bounded, check_config
from cka_geo.checkpoints.resolve import Candidate
from cka_geo.errors import CheckpointError
from cka_geo.models.croma import CromaConfig

#: Encoder keys relative to the prefix (everything else is ignored and reported).
KEEP = ("linear_input.", "transformer.")
PATCH = 8
HEADS = 16
IMG_SIZE = 120
_DETECTED = "CROMA checkpoint detected"


def check_prefix(prefix: str | None) -> None:
    """Refuse a ``prefix`` naming CROMA's joint encoder before the candidates are matched."""
    if prefix is not None and "joint_encoder" in prefix:
        raise CheckpointError(
            f"{_DETECTED}: its joint encoder ({prefix!r}: cross-attention between SAR and optical "
            "tokens) is not supported; load 's2_encoder.' (optical) or 's1_encoder.' (SAR)"
        )


def check_choice(chosen: Candidate, candidates: list[Candidate], prefix: str | None) -> Candidate:
    """The CROMA encoder to load: the optical one unless ``prefix`` asked for another.

    Raises:
        CheckpointError: Without ``prefix``, a CROMA file holding only the SAR encoder.
    """
    if chosen.family != "croma" or prefix is not None:
        return chosen
    optical = [c for c in candidates if c.family == "croma" and c.prefix.endswith("s2_encoder.")]
    if optical:
        return optical[0]
    if chosen.prefix.endswith("s1_encoder."):
        raise CheckpointError(
            f"{_DETECTED} with only the SAR encoder ({chosen.prefix!r}): pass "
            f"prefix={chosen.prefix!r} to load it (the optical s2_encoder is the default)"
        )
    return chosen


def _stored_bias(tensors: dict[str, torch.Tensor], prefix: str) -> tuple[str, torch.Tensor] | None:
    """torchgeo's ``attn_bias`` buffer beside the encoder (``…attn_bias`` next to ``s2_encoder.``)."""
    parent = prefix.rstrip(".").rpartition(".")[0]
    key = f"{parent}.attn_bias" if parent else "attn_bias"
    t = tensors.get(key)
    return (key, t) if isinstance(t, torch.Tensor) else None


def infer(
    sd: dict[str, torch.Tensor],
    notes: list[str],
    *,
    num_heads: int | None,
    prefix: str,
    tensors: dict[str, torch.Tensor],
) -> CromaConfig:
    """CromaConfig of a CROMA encoder (keys relative to ``prefix``).

    Args:
        sd: The encoder's tensors (``linear_input.*``, ``transformer.*``).
        notes: Where the assumptions are written.
        num_heads: Heads as given by the user (default: a stored ``attn_bias``, else 16).
        prefix: The encoder's prefix in the file (``s2_encoder.``, ``encoder.s1_encoder.``…).
        tensors: Every tensor of the file, flattened (to find a stored ``attn_bias``).

    Raises:
        CheckpointError: One line starting ``CROMA checkpoint detected``: missing or
            inconsistent keys, a joint-encoder layer, sizes beyond the limits.
    """
    where = f"{_DETECTED} at {prefix!r}"
    if "linear_input.weight" not in sd:
        raise CheckpointError(f"{where} but it lacks linear_input.weight (the patch projection)")
    w = sd["linear_input.weight"]
    if w.ndim != 2:
        raise CheckpointError(f"{where}: linear_input.weight has shape {tuple(w.shape)}, expected 2-D")
    width = bounded(w.shape[0], 1, MAX_WIDTH, f"{where}: the width (linear_input.weight dim 0)")
    if w.shape[1] % (PATCH * PATCH):
        raise CheckpointError(
            f"{where}: linear_input.weight has {w.shape[1]} inputs, not bands × {PATCH}×{PATCH}"
        )
    bands = bounded(w.shape[1] // PATCH**2, 1, MAX_BANDS, f"{where}: the band count")
    if any(re.match(r"transformer\.layers\.\d+\.[2-9]", k) for k in sd):
        raise CheckpointError(f"{where}: layers with a third (cross-attention) part are not supported")
    depth = len(block_indices(sd, r"^transformer\.layers\.(\d{1,9})\."))
    fc1 = sd.get("transformer.layers.0.1.net.0.weight")
    if fc1 is None or fc1.ndim != 2:
        raise CheckpointError(f"{where} but transformer.layers.0.1.net.0.weight is missing or not 2-D")
    hidden = bounded(fc1.shape[0], 1, MAX_HIDDEN, f"{where}: the MLP width")
    final_norm = "transformer.norm_out.weight" in sd
    img, heads = IMG_SIZE, HEADS
    stored = _stored_bias(tensors, prefix)
    if stored is not None:
        key, bias = stored
        grid = math.isqrt(bias.shape[-1]) if bias.ndim == 4 else 0
        if bias.ndim != 4 or bias.shape[-1] != bias.shape[-2] or grid * grid != bias.shape[-1] or grid < 1:
            raise CheckpointError(f"{where}: {key} has shape {tuple(bias.shape)}, not (1, heads, g², g²)")
        img = bounded(grid * PATCH, 1, 10_000, f"{where}: the image size implied by {key}")
        heads = bias.shape[1]
        notes.append(f"CROMA: {heads} heads and image size {img} read from {key} {tuple(bias.shape)}")
    else:
        notes.append(
            f"CROMA: image size {img} assumed (CROMA's native size; the ALiBi bias fits any "
            f"multiple of {PATCH})"
        )
    if num_heads is not None:
        notes.append(f"num_heads={num_heads} as given")
        heads = num_heads
    elif stored is None:
        notes.append(f"num_heads={heads} assumed (CROMA's encoders always use 16)")
    modality = "sar" if prefix.endswith("s1_encoder.") or bands == 2 else "optical"
    notes.append(
        f"CROMA {modality} encoder: {depth} layers, width {width}, {bands} bands, patch {PATCH} "
        "(assumed: every CROMA uses 8), no class token, ALiBi attention bias, LayerNorm eps 1e-5"
    )
    if not final_norm:
        notes.append("no transformer.norm_out in the checkpoint: built without a final norm")
    try:
        config = CromaConfig(
            img_size=img, patch_size=PATCH, in_chans=bands, embed_dim=width, depth=depth,
            num_heads=heads, mlp_hidden_dim=hidden, final_norm=final_norm, modality=modality,
        )
    except ValueError as exc:
        raise CheckpointError(f"{where}: inferred an impossible encoder: {exc}") from exc
    check_config(config, "inferred config")
    return config
