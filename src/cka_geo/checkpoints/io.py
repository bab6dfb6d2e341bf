"""Reading checkpoint files safely: no pickled code runs unless the user trusts the file.

``read_checkpoint_file`` returns the raw object of a file (a dict for every format we know)
and notes about how it was read. Order of attempts for pickle-based files:

1. ``torch.load(weights_only=True)``.
2. If that is refused and ``trust`` is False: a restricted unpickler that allows only the
   tensor-rebuilding globals and containers of torch's weights-only list and turns every
   other global into an inert :class:`Unreadable` placeholder (never called, never
   imported). The placeholders are reported; their entries (Lightning ``hyper_parameters``
   classes, ``argparse.Namespace``…) cannot be used, but the tensors can.
3. With ``trust=True``: ``torch.load(weights_only=False)`` (arbitrary code may run).

Before any of these, the pickle's opcodes are scanned without building anything
(:mod:`cka_geo.checkpoints.pickle_scan`); after, the loaded object is walked once without
recursion (:func:`cka_geo.walk.check_nesting`). Either refuses, in one line naming the file,
a file nested too deeply, a container that contains itself or one too large to walk.
"""

from __future__ import annotations

import pickle
import re
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Any, ClassVar

import torch

from cka_geo import walk
from cka_geo.checkpoints.pickle_scan import check_pickle_file
from cka_geo.errors import CheckpointError

SUFFIXES = (".safetensors", ".pt", ".pth", ".ckpt", ".bin")
BLOCKED_NOTE = "weights-only loading was blocked by "
TRUST_HINT = "pass --trust-checkpoint (Python: trust=True) only if you trust its source"


class Unreadable(dict):
    """Inert stand-in for a pickled global outside the allow-list.

    Records the global's name and what the pickle passed to it; nothing is imported or
    called. It is a dict so that dict-like objects (Lightning ``AttributeDict``) keep their
    items readable, and ``__setstate__`` keeps a state dict's items too.
    """

    global_name = "?"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__()
        self.args = args

    def __setstate__(self, state: Any) -> None:
        self.state = state
        if isinstance(state, dict):
            self.update({k: v for k, v in state.items() if isinstance(k, str)})

    def append(self, item: Any) -> None:
        self.__dict__.setdefault("items_", []).append(item)

    def extend(self, items: Any) -> None:
        self.__dict__.setdefault("items_", []).extend(items)

    def __repr__(self) -> str:
        return f"<unreadable {self.global_name}>"


def _allowed_globals() -> dict[str, Any]:
    """torch's weights-only allow-list, minus the entries that call another global."""
    try:
        from torch import _weights_only_unpickler as wou

        allowed = dict(wou._get_allowed_globals())
    except (ImportError, AttributeError):  # private API: fall back to the bare minimum
        import collections

        allowed = {
            "collections.OrderedDict": collections.OrderedDict,
            "torch._utils._rebuild_tensor_v2": torch._utils._rebuild_tensor_v2,
            "torch._utils._rebuild_parameter": torch._utils._rebuild_parameter,
        }
    for name in (
        "torch._tensor._rebuild_from_type_v2",
        "torch._utils._rebuild_wrapper_subclass",
        "torch._utils._rebuild_device_tensor_from_numpy",
    ):
        allowed.pop(name, None)
    return allowed


class _RestrictedUnpickler(pickle.Unpickler):
    """Resolves only allow-listed globals; every other one becomes an Unreadable subclass."""

    allowed: ClassVar[dict[str, Any]] = {}
    blocked: ClassVar[list[str]] = []
    placeholders: ClassVar[dict[str, type]] = {}

    def find_class(self, module: str, name: str) -> Any:
        full = f"{module}.{name}"
        if full in self.allowed:
            return self.allowed[full]
        if full not in self.placeholders:  # one class per name, however often it recurs
            self.blocked.append(full)
            self.placeholders[full] = type(name, (Unreadable,), {"global_name": full})
        return self.placeholders[full]


def _restricted_pickle_module(blocked: list[str]) -> SimpleNamespace:
    allowed = _allowed_globals()

    class Unpickler(_RestrictedUnpickler):
        pass

    Unpickler.allowed = allowed
    Unpickler.blocked = blocked
    Unpickler.placeholders = {}

    def load(file: Any, **kwargs: Any) -> Any:
        return Unpickler(file, **kwargs).load()

    return SimpleNamespace(Unpickler=Unpickler, load=load, __name__="cka_geo_restricted_pickle")


def _blocked_names(message: str) -> list[str]:
    """Globals named in a weights-only UnpicklingError message."""
    names = re.findall(r"GLOBAL ([\w.]+)", message)
    return list(dict.fromkeys(names))


def _one_line(text: str | BaseException, limit: int = 200) -> str:
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 1] + "…"


def checkpoint_suffix(path: Path) -> str:
    """The suffix that decides the format: ``.pth.tar`` / ``.pt.tar`` (MoCo originals) count as ``.pth``."""
    suffixes = [x.lower() for x in path.suffixes[-2:]]
    if len(suffixes) == 2 and suffixes[1] == ".tar" and suffixes[0] in (".pt", ".pth"):
        return ".pth"
    return path.suffix.lower()


def check_path(path: Path) -> None:
    """Refuse missing files, directories, empty files and unknown suffixes, naming the file."""
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint file")
    if path.is_dir():
        raise CheckpointError(
            f"{path}: is a directory, not a checkpoint file (pass the file inside, e.g. model.safetensors)"
        )
    if checkpoint_suffix(path) not in SUFFIXES:
        raise CheckpointError(
            f"{path}: unknown checkpoint suffix {path.suffix!r} (expected one of {', '.join(SUFFIXES)})"
        )
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: file is empty")


def read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a .safetensors file."""
    from safetensors import safe_open

    try:
        tensors: dict[str, torch.Tensor] = {}
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                tensors[key] = f.get_tensor(key)
    except Exception as exc:  # SafetensorError, OSError, or anything a corrupt header causes
        raise CheckpointError(
            f"{path}: not a readable safetensors file ({_one_line(exc)})"
        ) from exc
    return tensors, metadata


def _torch_load(path: Path, **kwargs: Any) -> Any:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*pickle protocol.*", category=UserWarning)
        return torch.load(path, map_location="cpu", **kwargs)


def read_pickled(path: Path, *, trust: bool) -> tuple[Any, list[str]]:
    """Load a torch.save / pickle file; see the module docstring for the order of attempts."""
    check_pickle_file(path)
    notes: list[str] = []
    try:
        return _torch_load(path, weights_only=True), notes
    except pickle.UnpicklingError as exc:
        message = str(exc)
        if not ("weights_only" in message or "Weights only" in message or "GLOBAL" in message):
            raise CheckpointError(f"{path}: corrupt checkpoint ({_one_line(message)})") from exc
        blocked = _blocked_names(message)
    except Exception as exc:  # torch raises many types on garbage (IndexError, RuntimeError…)
        raise CheckpointError(
            f"{path}: corrupt or truncated checkpoint ({_one_line(exc)})"
        ) from exc
    if trust:
        try:
            obj = _torch_load(path, weights_only=False)
        except Exception as exc:
            raise CheckpointError(
                f"{path}: cannot load even with trust ({_one_line(exc)})"
            ) from exc
        notes.append(
            "loaded with trust (full pickle); weights-only loading was blocked by "
            + (", ".join(blocked) or "a non-tensor object")
        )
        return obj, notes
    found: list[str] = []
    try:
        obj = _torch_load(path, weights_only=False, pickle_module=_restricted_pickle_module(found))
    except Exception as exc:
        if not (found or blocked):
            raise CheckpointError(
                f"{path}: corrupt or truncated checkpoint ({_one_line(message)})"
            ) from exc
        what = ", ".join(found or blocked)
        raise CheckpointError(
            f"{path}: refused: weights-only loading is blocked by {what}; {TRUST_HINT}"
        ) from exc
    names = list(dict.fromkeys(found or blocked))
    if isinstance(obj, Unreadable):
        raise CheckpointError(
            f"{path}: refused: weights-only loading is blocked by {', '.join(names)}; {TRUST_HINT}"
        )
    notes.append(
        BLOCKED_NOTE
        + ", ".join(names)
        + "; read the tensors with a restricted unpickler that ran none of them "
        "(the entries holding them are unreadable)"
    )
    return obj, notes


def read_checkpoint_file(
    path: Path, *, trust: bool
) -> tuple[Any, dict[str, str] | None, list[str]]:
    """The raw content of a checkpoint file.

    Args:
        path: The file (.safetensors, .pt, .pth, .ckpt, .bin).
        trust: Allow full pickle loading (arbitrary code) when weights-only loading fails.

    Returns:
        (object, safetensors metadata or None, notes).

    Raises:
        CheckpointError: A one-line message naming the file: missing, directory, empty,
            unknown suffix, corrupt or truncated, refused (naming the blocking globals),
            nested too deeply, containing itself, or too large to walk.
    """
    check_path(path)
    if checkpoint_suffix(path) == ".safetensors":
        tensors, metadata = read_safetensors(path)
        return tensors, metadata, []
    obj, notes = read_pickled(path, trust=trust)
    try:
        walk.check_nesting(obj, error=CheckpointError)
    except CheckpointError as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    return obj, None, notes


def _unreadable_items(node: Any) -> Any:
    """Children for :func:`find_unreadable`: containers, but not inside placeholders."""
    return None if isinstance(node, Unreadable) else walk.container_items(node)


def find_unreadable(obj: Any) -> list[str]:
    """Where placeholders for blocked globals sit in a loaded object, e.g. ``ckpt['hyper_parameters']``.

    Looks four levels deep at most (through dicts, lists and tuples), each container once.
    """
    if isinstance(obj, Unreadable):
        return [f"ckpt ({obj.global_name})"]
    return [
        f"ckpt{''.join(f'[{k!r}]' for k in path)} ({value.global_name})"
        for path, value in walk.walk(obj, _unreadable_items, stop_at=4, error=CheckpointError)
        if isinstance(value, Unreadable)
    ]


def json_metadata(metadata: dict[str, str] | None, key: str) -> Any:
    """A JSON value stored under ``key`` in safetensors metadata, or None when absent.

    Raises:
        CheckpointError: The value is not a string of valid JSON, is too long, or nests
            deeper than :data:`cka_geo.walk.MAX_DEPTH` (no file named: callers add it).
    """
    if not metadata or key not in metadata:
        return None
    text = metadata[key]
    if not isinstance(text, str):
        raise CheckpointError(f"metadata {key!r} is a {type(text).__name__}, not a JSON string")
    try:
        return walk.loads_json(text, error=CheckpointError, root_name=f"metadata[{key!r}]")
    except CheckpointError as exc:
        raise CheckpointError(f"metadata {key!r}: {exc}") from None
    except ValueError as exc:  # json.JSONDecodeError
        raise CheckpointError(f"metadata {key!r} is not valid JSON ({_one_line(exc)})") from None
