"""Bounds on what a checkpoint may ask us to build, checked before any model exists.

Two rules keep a small hostile file from making cka-geo allocate without bound:

1. The encoder's tensors must really be in the file (:func:`check_tensor_data`): a tensor
   may not claim more elements than its data holds (a pickle can rebuild a tiny storage
   with stride 0 as a tensor of any shape), and the encoder's tensors together may not
   claim more than :data:`MAX_ALIASING` times the distinct data they share (tied weights
   are allowed; thousands of keys on one buffer are not). The model built is then never
   much bigger than the tensors read, plus the zero biases and position embedding the
   loader adds (bounded by the limits below).
2. Every config, inferred or stored, stays within the limits below, with the types its
   fields declare (:func:`config_from_dict`, :func:`check_config`).
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any

import torch

from cka_geo.errors import CheckpointError

MAX_IMG_SIZE = 10_000
"""Largest image side in pixels (position embedding grid × patch size)."""
MAX_PATCH_SIZE = 1_024
"""Largest patch side in pixels."""
MAX_WIDTH = 16_384
"""Largest token width (ViT-22B has 6144)."""
MAX_BLOCKS = 1_000
"""Most transformer blocks (and the largest block index + 1)."""
MAX_BANDS = 4_096
"""Most input bands (hyperspectral sensors have a few hundred)."""
MAX_HIDDEN = 16 * MAX_WIDTH
"""Largest MLP hidden width."""
MAX_ALIASING = 16
"""Most bytes the encoder's tensors may claim per byte of distinct data (tied weights)."""

#: (config field, lowest, highest) for both families; a field a config lacks is skipped.
_RANGES = (
    ("img_size", 1, MAX_IMG_SIZE),
    ("image_size", 1, MAX_IMG_SIZE),
    ("patch_size", 1, MAX_PATCH_SIZE),
    ("embed_dim", 1, MAX_WIDTH),
    ("width", 1, MAX_WIDTH),
    ("depth", 1, MAX_BLOCKS),
    ("layers", 1, MAX_BLOCKS),
    ("in_chans", 1, MAX_BANDS),
    ("mlp_hidden_dim", 0, MAX_HIDDEN),
    ("output_dim", 0, MAX_WIDTH),
)


def bounded(value: int, low: int, high: int, what: str) -> int:
    """``value`` if ``low <= value <= high``, else a CheckpointError naming ``what``."""
    if not low <= value <= high:
        raise CheckpointError(f"{what} is {value}, outside {low}..{high}: refused")
    return value


def _fits(value: Any, hint: Any) -> bool:
    """Whether a JSON/pickle value has the type a dataclass field declares."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, arg) for arg in typing.get_args(hint))
    if hint is Any:
        return True
    if origin is tuple:  # (height, width): JSON stores it as a list
        args = typing.get_args(hint)
        return (
            isinstance(value, (list, tuple))
            and len(value) == len(args)
            and all(_fits(v, a) for v, a in zip(value, args, strict=True))
        )
    if hint is type(None):
        return value is None
    if origin is not None:
        hint = origin
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return (
            isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        )
    return isinstance(hint, type) and isinstance(value, hint)


def _hint_name(hint: Any) -> str:
    return hint.__name__ if isinstance(hint, type) else str(hint).replace("typing.", "")


def config_from_dict(cls: type, data: Any) -> Any:
    """A config of class ``cls`` from a dict read from a file, every field checked.

    Args:
        cls: :class:`~cka_geo.models.vit.ViTConfig` or :class:`~cka_geo.models.openclip.OpenClipVisionConfig`.
        data: What the file stores as the config.

    Returns:
        The config, within the limits of this module.

    Raises:
        CheckpointError: Not a dict, unknown keys, a value of the wrong type, or a value the
            config or these limits refuse; the message names the field.
    """
    if not isinstance(data, dict):
        raise CheckpointError(f"stored config is a {type(data).__name__}, not an object")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = [k for k in data if k not in names]
    if unknown:
        raise CheckpointError(f"stored config has unknown keys {[str(k) for k in unknown][:5]}")
    for name, value in data.items():
        if not _fits(value, hints[name]):
            scalar = isinstance(value, (str, int, float, bool))
            shown = repr(value)[:60] if scalar else f"a {type(value).__name__}"
            raise CheckpointError(
                f"stored config {name} is {shown}, expected {_hint_name(hints[name])}"
            )
    try:
        config = cls(**data)
    except (TypeError, ValueError) as exc:  # UsageError from __post_init__ is a ValueError
        raise CheckpointError(f"stored config is impossible: {exc}") from None
    check_config(config, "stored config")
    return config


def check_config(config: Any, source: str) -> None:
    """Refuse a config beyond the limits of this module, naming the field.

    Args:
        config: A ViTConfig or OpenClipVisionConfig.
        source: How to name it (``"stored config"``, ``"inferred config"``).

    Raises:
        CheckpointError: A field beyond its limit.
    """
    for name, low, high in _RANGES:
        value = getattr(config, name, None)
        for v in value if isinstance(value, tuple) else (value,):
            if v is not None:
                bounded(v, low, high, f"{source} {name}")
    ratio = getattr(config, "mlp_ratio", None)
    if ratio is not None and not 0 < ratio * config.embed_dim <= MAX_HIDDEN:
        raise CheckpointError(
            f"{source} mlp_ratio is {ratio}, outside 0..{MAX_HIDDEN // config.embed_dim}: refused"
        )
    for name in ("norm_eps", "layer_scale"):
        value = getattr(config, name, None)
        if value is not None and not (math.isfinite(value) and (name != "norm_eps" or value > 0)):
            raise CheckpointError(f"{source} {name} is {value}: refused")


def check_tensor_data(tensors: dict[str, torch.Tensor]) -> None:
    """Refuse tensors that claim more data than they hold (see the module docstring).

    Args:
        tensors: The encoder's tensors (and head), as read from the file.

    Raises:
        CheckpointError: A non-dense tensor, an expanded view, or tensors aliasing one
            another beyond the data they share; the message names the first key.
    """
    shared: dict[int, int] = {}
    total = 0
    first = ""
    for key, t in tensors.items():
        if not isinstance(t, torch.Tensor) or t.layout != torch.strided:
            what = t.layout if isinstance(t, torch.Tensor) else type(t).__name__
            raise CheckpointError(f"{key[:80]!r} is a {what}, not a dense tensor: refused")
        need = t.numel() * t.element_size()
        try:
            storage = t.untyped_storage()
        except (RuntimeError, NotImplementedError) as exc:
            raise CheckpointError(f"{key[:80]!r} has no plain storage ({exc}): refused") from None
        have = storage.nbytes()
        if need > have:
            raise CheckpointError(
                f"{key[:80]!r} {tuple(t.shape)} claims {need} bytes but holds {have} (an expanded "
                "view of a smaller tensor): refused"
            )
        if storage.data_ptr() in shared and not first:
            first = key
        shared[storage.data_ptr()] = have
        total += need
    if total > MAX_ALIASING * sum(shared.values()):
        raise CheckpointError(
            f"the encoder's tensors claim {total} bytes but share {sum(shared.values())} bytes "
            f"of data, more than {MAX_ALIASING}× (tensors aliasing one another, first "
            f"{first[:80]!r}): refused"
        )
