"""Writing checkpoints that carry their exact config (atomically)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cka_geo import walk
from cka_geo.atomic import atomic_path
from cka_geo.checkpoints.families import family_of_config
from cka_geo.errors import UsageError

FORMAT_VERSION = 1
#: Key of the marker dict in .pt files and of the JSON entry in safetensors metadata.
MARKER = "cka_geo"
_RESERVED = ("state_dict", "config", MARKER)


def _plain(value: Any, where: str) -> None:
    """Refuse values a weights-only load could not read back (and nesting it would refuse)."""
    leaves = (bool, int, float, str, torch.Tensor, list, tuple, dict)
    try:
        entries = [((), value), *walk.walk(value, strict=True, error=UsageError, root_name=where)]
    except UsageError as exc:
        raise UsageError(f"save_checkpoint: {exc}") from None
    for path, v in entries:
        if v is not None and not isinstance(v, leaves):
            raise UsageError(
                f"save_checkpoint: {walk.describe_path(path, where)} is a {type(v).__name__}; "
                "extra may hold only tensors, numbers, strings, None, lists and dicts (so that "
                "the file loads without pickle)"
            )
        bad = (
            next((k for k in v if not isinstance(k, (str, int))), None)
            if isinstance(v, dict)
            else None
        )
        if bad is not None:
            raise UsageError(
                f"save_checkpoint: key {bad!r} in {walk.describe_path(path, where)} is not a str or int"
            )


def save_checkpoint(
    path: str | os.PathLike[str],
    model_or_state_dict: nn.Module | dict[str, torch.Tensor],
    config: Any,
    *,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write a checkpoint that :func:`load_checkpoint` reads back with the exact ``config``.

    Args:
        path: Destination; ``.safetensors`` (config JSON in the metadata, ``extra`` must be
            JSON-serialisable) or ``.pt`` / ``.pth`` (a plain dict ``{"state_dict", "config",
            "cka_geo": {"version", "format", "family"}, **extra}`` that loads with
            ``torch.load(weights_only=True)``).
        model_or_state_dict: The model (its ``state_dict()`` is saved) or a state dict.
        config: A :class:`~cka_geo.models.vit.ViTConfig` or
            :class:`~cka_geo.models.openclip.OpenClipVisionConfig`.
        extra: More plain entries (epoch, metrics, task…).

    Returns:
        The path written. The write is atomic: a reader never sees a partial file.

    Raises:
        UsageError: Unknown suffix, reserved or non-plain ``extra`` entries.
    """
    from cka_geo import __version__

    dest = Path(path)
    suffix = dest.suffix.lower()
    if suffix not in (".safetensors", ".pt", ".pth"):
        raise UsageError(f"save_checkpoint: {dest}: suffix must be .safetensors, .pt or .pth")
    family = family_of_config(config)
    sd = (
        model_or_state_dict.state_dict()
        if isinstance(model_or_state_dict, nn.Module)
        else model_or_state_dict
    )
    sd = {k: v.detach().to("cpu").contiguous().clone() for k, v in sd.items()}
    extra = dict(extra or {})
    clash = [k for k in extra if k in _RESERVED]
    if clash:
        raise UsageError(f"save_checkpoint: extra may not use the reserved keys {clash}")
    _plain(extra, "extra")
    marker = {"version": __version__, "format": FORMAT_VERSION, "family": family}
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        try:
            meta = json.dumps({**marker, "config": config.to_dict(), "extra": extra})
        except TypeError as exc:
            raise UsageError(
                f"save_checkpoint: {dest}: extra is not JSON-serialisable ({exc})"
            ) from exc
        with atomic_path(dest) as tmp:
            save_file(sd, str(tmp), metadata={MARKER: meta})
    else:
        obj = {"state_dict": sd, "config": config.to_dict(), MARKER: marker, **extra}
        # through a Python file object, so a failed write (a full disk) is an OSError naming
        # its errno rather than the zip writer's RuntimeError
        with atomic_path(dest) as tmp, open(tmp, "wb") as fh:
            torch.save(obj, fh)
    return dest
