"""The standard ViT fine-tuning recipe beside the loop: layer-wise learning-rate decay,
stochastic depth (drop path) and mixed precision.

Layer-wise learning-rate decay (BEiT, Bao et al. 2022, and MAE, He et al. 2022, their
``param_groups_lrd``): with ``depth`` blocks, every parameter gets a layer id -- 0 for the
patch embedding, position embedding, class/distillation/register tokens and ``norm_pre``;
``i + 1`` for ``blocks.i``; ``depth + 1`` for everything after the blocks (final norms, the
task head, decoders) -- and trains at ``lr * decay ** (depth + 1 - layer_id)``. The head thus
keeps the full rate and the patch embedding gets ``decay ** (depth + 1)`` of it.

Drop path (stochastic depth, Huang et al. 2016, as timm's ViT): the residual branches of
block i are dropped per sample with probability ``rate * i / (depth - 1)`` (timm's
``linspace(0, drop_path_rate, depth)``), survivors scaled by ``1 / (1 - p)``. Only in train
mode; off (0) by default; nothing is stored in the model's config or weights, so compare and
the checkpoints it reads are unaffected.

Precision: ``32`` (float32), ``bf16-mixed`` (autocast to bfloat16) or ``16-mixed`` (autocast to
float16 with a gradient scaler), Lightning's names; the weights and the optimizer stay float32.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from typing import Any, cast

import torch
from torch import nn

from cka_geo.errors import UsageError

PRECISIONS = ("32", "bf16-mixed", "16-mixed")
_EMBED = re.compile(r"^(?:.*\.)?(?:cls_token|dist_token|reg_token|pos_embed|patch_embed|norm_pre)(?:\.|$)")
_BLOCK = re.compile(r"^(?:.*\.)?blocks\.(\d+)\.")


def _encoder(model: nn.Module) -> nn.Module:
    enc = getattr(model, "encoder", model)
    if not isinstance(getattr(enc, "blocks", None), nn.ModuleList):
        raise UsageError("--layer-decay/--drop-path need a ViT encoder with blocks")
    return enc


def layer_id(name: str, depth: int, prefix: str = "encoder.") -> int:
    """The BEiT/MAE layer id of parameter ``name`` (see the module docstring).

    Args:
        name: Parameter name in the trained model (e.g. ``encoder.blocks.3.mlp.fc1.weight``).
        depth: Blocks of the encoder.
        prefix: Where the encoder's parameters start in the model (``""`` for a bare encoder).
    """
    if not name.startswith(prefix):
        return depth + 1  # the head, a decoder, an objective's own modules
    inner = name[len(prefix) :]
    if _EMBED.match(inner):
        return 0
    m = _BLOCK.match(inner)
    if m and not inner.startswith(("decoder", "head")):
        return int(m.group(1)) + 1
    return depth + 1


def param_groups(model: nn.Module, weight_decay: float, layer_decay: float) -> list[dict[str, Any]]:
    """AdamW groups of the trainable parameters with ``lr_scale`` by layer-wise decay.

    Decay applies to tensors with >= 2 dimensions only (none on biases, norms, tokens). Groups
    are (layer id, decayed or not); empty ones are left out.

    Raises:
        UsageError: ``layer_decay`` outside (0, 1], or a model without blocks.
    """
    if not 0 < layer_decay <= 1:
        raise UsageError(f"--layer-decay must be in (0, 1], got {layer_decay}")
    enc = _encoder(model)
    depth = len(enc.blocks)  # type: ignore[arg-type]
    prefix = "encoder." if enc is not model else ""
    groups: dict[tuple[int, bool], dict[str, Any]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        lid, decay = layer_id(name, depth, prefix), p.ndim >= 2
        g = groups.setdefault((lid, decay), {
            "params": [], "weight_decay": weight_decay if decay else 0.0,
            "lr_scale": layer_decay ** (depth + 1 - lid), "layer_id": lid,
        })
        g["params"].append(p)
    if not groups:
        raise UsageError("the model has no trainable parameters")
    return [groups[k] for k in sorted(groups)]


def set_drop_path(model: nn.Module, rate: float) -> list[float]:
    """Give block i of the encoder the drop-path rate ``rate * i / (depth - 1)``; the rates set.

    Raises:
        UsageError: ``rate`` outside [0, 1).
    """
    if not 0 <= rate < 1:
        raise UsageError(f"--drop-path must be in [0, 1), got {rate}")
    blocks = cast(nn.ModuleList, _encoder(model).blocks)
    depth = len(blocks)
    rates = [rate * i / (depth - 1) if depth > 1 else rate for i in range(depth)]
    for blk, r in zip(blocks, rates, strict=True):
        setattr(blk, "drop_path_rate", float(r))  # noqa: B010 (a plain float attribute of Block)
    return rates


def check_recipe(layer_decay: float, drop_path: float, accum_steps: int, precision: str) -> None:
    """Refuse recipe settings out of range, naming the option."""
    if not 0 < layer_decay <= 1:
        raise UsageError(f"--layer-decay must be in (0, 1], got {layer_decay}")
    if not 0 <= drop_path < 1:
        raise UsageError(f"--drop-path must be in [0, 1), got {drop_path}")
    if accum_steps < 1:
        raise UsageError(f"--accum-steps must be positive, got {accum_steps}")
    if precision not in PRECISIONS:
        raise UsageError(f"--precision {precision!r}: choose one of {', '.join(PRECISIONS)}")


@contextlib.contextmanager
def autocast(precision: str, device: torch.device) -> Iterator[None]:
    """``torch.autocast`` for ``bf16-mixed``/``16-mixed``; nothing for ``32``."""
    if precision == "32":
        yield
        return
    dtype = torch.bfloat16 if precision == "bf16-mixed" else torch.float16
    with torch.autocast(device_type=device.type, dtype=dtype):
        yield


def grad_scaler(precision: str, device: torch.device) -> torch.amp.GradScaler:
    """A gradient scaler, enabled for ``16-mixed`` only (a pass-through otherwise)."""
    return torch.amp.GradScaler(device.type, enabled=precision == "16-mixed")


__all__ = ["PRECISIONS", "autocast", "check_recipe", "grad_scaler", "layer_id", "param_groups", "set_drop_path"]
