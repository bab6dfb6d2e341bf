"""The one place that turns a ``--device`` value into a :class:`torch.device`.

cka-geo runs on the CPU and on CUDA GPUs. Other PyTorch device types are refused up front
in one line: ``mps`` has no float64 (the CKA accumulators need it), ``meta`` holds no data,
and the rest (``xla``, ``hpu``...) are untested here.
"""

from __future__ import annotations

import torch

from cka_geo.errors import UsageError

CHOICES = "auto, cpu, cuda or cuda:N"


def resolve_device(name: str | torch.device, flag: str = "--device") -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU; refuse unknown, unsupported or absent devices.

    Args:
        name: ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or a :class:`torch.device`.
        flag: The option named in the error message.

    Returns:
        A device that exists on this machine.

    Raises:
        UsageError: An unknown device, a type other than cpu/cuda, CUDA without a GPU, or
            a GPU index beyond the ones present.
    """
    text = str(name).strip()
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError, TypeError):
        raise UsageError(f"{flag} {text!r}: unknown device; use {CHOICES}") from None
    if dev.type == "cpu":
        return dev
    if dev.type != "cuda":
        raise UsageError(f"{flag} {text!r}: device type {dev.type!r} is not supported; use {CHOICES}")
    if not torch.cuda.is_available():
        raise UsageError(f"{flag} {text!r}: CUDA is not available on this machine; use cpu or auto")
    count = torch.cuda.device_count()
    if dev.index is not None and dev.index >= count:
        raise UsageError(f"{flag} {text!r}: no such GPU (this machine has {count})")
    return dev


__all__ = ["CHOICES", "resolve_device"]
