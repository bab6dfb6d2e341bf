"""Looking at a pickle's opcodes before anything unpickles it.

Unpickling builds containers without recursion, but hashing a dict key or set member does
recurse, in C and without a guard: a pickle of ``{((((…),),),): 1}`` nested a million
tuples deep crashes the interpreter (segmentation fault) in every unpickler, torch's
weights-only one included. :func:`check_pickle_file` therefore runs the opcode stream
symbolically first (opcode tables from :mod:`pickletools`; nothing is built, decoded or
imported), tracking how deeply each value on the stack is nested, and refuses a file before
it is loaded when:

- some value nests deeper than :data:`~cka_geo.walk.MAX_DEPTH` levels;
- a pickle is longer than :data:`MAX_PICKLE_BYTES` (the tensors of a ``torch.save`` zip
  live beside ``data.pkl``, not in it, so real files stay far below this);
- a pickle the loader would read is not one (unknown opcode, truncated, stack underflow):
  whatever the scan cannot follow is not loaded either.

Objects mutated after they were memoised can look shallower than they are; the loaded
object is walked again afterwards (:func:`cka_geo.walk.check_nesting`), and that walk catches
them without recursion. What this scan must catch, tuples nested too deep to hash, is
exact: tuples never change after they are built.
"""

from __future__ import annotations

import mmap
import pickletools
import zipfile
from pathlib import Path

from cka_geo import walk
from cka_geo.errors import CheckpointError, CkaGeoError

MAX_PICKLE_BYTES = 256 * 2**20
"""Longest pickle stream scanned (256 MiB); longer ones are refused."""
#: A legacy (non-zip) torch file starts with five pickles: magic number, protocol, system
#: info, the object, the storage keys; the raw tensor bytes follow them.
_LEGACY_PICKLES = 5
#: Bytes of the length prefix of each variable-length argument kind (pickletools' codes).
_LENGTH_BYTES = {
    pickletools.TAKEN_FROM_ARGUMENT1: (1, False),
    pickletools.TAKEN_FROM_ARGUMENT4: (4, True),
    pickletools.TAKEN_FROM_ARGUMENT4U: (4, False),
    pickletools.TAKEN_FROM_ARGUMENT8U: (8, False),
}
# What an opcode does to the stack of depths (the scan's only state besides the memo).
(
    _PUSH,
    _STOP,
    _MARK,
    _DUP,
    _MEMOIZE,
    _PUT,
    _GET,
    _ADD,
    _SETITEM,
    _ADD_MARKED,
    _BUILD_MARKED,
    _POP_N,
) = range(12)
_KINDS = {
    "STOP": _STOP,
    "MARK": _MARK,
    "DUP": _DUP,
    "MEMOIZE": _MEMOIZE,
    **dict.fromkeys(("PUT", "BINPUT", "LONG_BINPUT"), _PUT),
    **dict.fromkeys(("GET", "BINGET", "LONG_BINGET"), _GET),
    **dict.fromkeys(("APPEND", "BUILD"), _ADD),  # (container, item) -> container
    "SETITEM": _SETITEM,  # (dict, key, value) -> dict
    **dict.fromkeys(("SETITEMS", "APPENDS", "ADDITEMS"), _ADD_MARKED),
}


class _Op:
    """What the scan needs to know about one opcode, precomputed."""

    __slots__ = ("after", "below", "kind", "lines", "memo_arg", "n")

    def __init__(self, info: pickletools.OpcodeInfo) -> None:
        before = info.stack_before
        self.after = len(info.stack_after)
        self.below = len(before)
        if info.name in _KINDS:
            self.kind = _KINDS[info.name]
        elif pickletools.markobject in before:  # TUPLE, LIST, DICT, FROZENSET, OBJ, INST, POP_MARK
            self.kind = _BUILD_MARKED
        elif not before and self.after == 1:  # scalars, empty containers, GLOBAL, PERSID
            self.kind = _PUSH
        else:  # TUPLE1-3, POP, REDUCE, NEWOBJ(_EX), STACK_GLOBAL, BINPERSID…
            self.kind = _POP_N
        self.n = info.arg.n if info.arg is not None else 0
        self.lines = 2 if info.name in ("GLOBAL", "INST") else 1
        self.memo_arg = self.kind in (_PUT, _GET)


_OPS = {ord(info.code): _Op(info) for info in pickletools.opcodes}


class _TooDeep(Exception):
    pass


class _TooLong(Exception):
    pass


class _Malformed(Exception):
    pass


def _argument(data: bytes | mmap.mmap, pos: int, op: _Op) -> tuple[int, int]:
    """(end of the argument, its integer value for memo opcodes or 0)."""
    n = op.n
    if n >= 0:
        end = pos + n
        value = int.from_bytes(data[pos:end], "little") if op.memo_arg else 0
    elif n == pickletools.UP_TO_NEWLINE:
        end = pos
        for _ in range(op.lines):
            end = data.find(b"\n", end) + 1
            if end == 0:
                raise _Malformed("truncated")
        value = int(data[pos : end - 1]) if op.memo_arg else 0
    else:
        size, signed = _LENGTH_BYTES[n]
        length = int.from_bytes(data[pos : pos + size], "little", signed=signed)
        if length < 0:
            raise _Malformed("negative length")
        end = pos + size + length
        value = 0
    if end > len(data):
        raise _Malformed("truncated")
    return end, value


def max_nesting(
    data: bytes | mmap.mmap, start: int, limit: int, max_bytes: int = MAX_PICKLE_BYTES
) -> tuple[int, int]:
    """Deepest nesting of any value built by the pickle at ``data[start:]``.

    Args:
        data: The bytes (or a memory map) holding the pickle.
        start: Where it starts.
        limit: Stop and raise as soon as a value nests deeper than this.
        max_bytes: Stop and raise past this offset in ``data``.

    Returns:
        (the depth: 0 for a scalar, 1 for a flat container; the offset after its STOP).

    Raises:
        _TooDeep: Nesting beyond ``limit``.
        _TooLong: The pickle runs past ``max_bytes``.
        _Malformed: Not a pickle (bad opcode, truncated, stack underflow).
    """
    stack: list[int] = []  # nesting depth of each value on the unpickler's stack
    marks: list[int] = []
    memo: dict[int, int] = {}
    deepest = 0
    pos = start
    size = len(data)
    try:
        while True:
            if pos >= size:
                raise _Malformed("no STOP opcode")
            if pos > max_bytes:
                raise _TooLong
            op = _OPS.get(data[pos])
            if op is None:
                raise _Malformed(f"unknown opcode at {pos}")
            arg = 0
            if not op.n:
                pos += 1
            elif op.n == 1:  # BINPUT, BINGET, BININT1, PROTO…: inline, no allocation
                arg = data[pos + 1]
                pos += 2
            elif op.n == pickletools.TAKEN_FROM_ARGUMENT1 and pos + 1 < size:  # short strings
                pos += 2 + data[pos + 1]
            elif op.n == pickletools.TAKEN_FROM_ARGUMENT4U and pos + 4 < size:  # strings
                pos += 5 + int.from_bytes(data[pos + 1 : pos + 5], "little")
            else:
                pos, arg = _argument(data, pos + 1, op)
            kind = op.kind
            if kind == _PUSH:
                stack.append(0)
                continue
            if kind == _GET:
                stack.append(memo.get(arg, 0))
                continue
            if kind == _PUT:
                memo[arg] = stack[-1]
                continue
            if kind == _MEMOIZE:
                memo[len(memo)] = stack[-1]
                continue
            if kind == _MARK:
                marks.append(len(stack))
                continue
            if kind == _STOP:
                return deepest, pos
            if kind == _DUP:
                stack.append(stack[-1])
                continue
            if kind == _ADD:
                depth = 1 + stack.pop()
            elif kind == _SETITEM:
                depth = 1 + max(stack.pop(), stack.pop())
            elif kind in (_ADD_MARKED, _BUILD_MARKED):  # nothing else sits below a mark
                top = marks.pop()
                depth = 1 + max(stack[top:], default=-1)
                del stack[top:]
            else:  # _POP_N
                depth = 0
                for _ in range(op.below):
                    depth = max(depth, 1 + stack.pop())
            if kind in (_ADD, _SETITEM, _ADD_MARKED):
                if depth > stack[-1]:
                    stack[-1] = depth
                depth = stack[-1]
            elif op.after:
                stack.append(depth)
            else:
                continue
            if depth > limit:
                raise _TooDeep
            if depth > deepest:
                deepest = depth
    except IndexError:
        raise _Malformed("stack underflow") from None


def _scan(
    data: bytes | mmap.mmap,
    path: Path,
    where: str,
    error: type[CkaGeoError],
    count: int = 1,
) -> None:
    """Scan ``count`` pickles in a row, as torch reads them."""
    pos = 0
    for _ in range(count):
        try:
            _, pos = max_nesting(data, pos, walk.MAX_DEPTH)
        except _TooDeep:
            raise error(
                f"{path}: nested deeper than {walk.MAX_DEPTH} levels ({where}): refused"
            ) from None
        except _TooLong:
            raise error(
                f"{path}: pickle ({where}) longer than {MAX_PICKLE_BYTES} bytes: refused"
            ) from None
        except (_Malformed, ValueError, OverflowError) as exc:
            raise error(
                f"{path}: corrupt or truncated file ({where}: {str(exc)[:80] or 'not a pickle'})"
            ) from None


def check_pickle_file(path: Path, error: type[CkaGeoError] = CheckpointError) -> None:
    """Refuse a torch/pickle file whose pickles nest too deeply, before loading it.

    Args:
        path: A ``torch.save`` zip (its ``*.pkl`` members are scanned) or a legacy or plain
            pickle file (the pickles at its start are scanned).
        error: The error class raised (CheckpointError; DataError for probe arrays).

    Raises:
        CkaGeoError: ``error``, one line naming the file.
    """
    with path.open("rb") as f:
        if f.read(4) != b"PK\x03\x04":  # torch's own test for its zip format
            data: bytes | mmap.mmap
            try:
                data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            except (OSError, ValueError) as exc:
                raise error(f"{path}: cannot read ({exc})") from None
            with data:
                _scan(data, path, "pickle", error, _LEGACY_PICKLES)
            return
    try:
        with zipfile.ZipFile(path) as archive:
            members = [i for i in archive.infolist() if i.filename.endswith(".pkl")]
            for info in members:
                if info.file_size > MAX_PICKLE_BYTES:
                    raise error(
                        f"{path}: {info.filename} is {info.file_size} bytes, more than "
                        f"{MAX_PICKLE_BYTES}: refused"
                    )
            pickles = [(i.filename, archive.read(i.filename)) for i in members]
    except error:
        raise
    except Exception as exc:  # BadZipFile, zlib.error, OSError…
        raise error(f"{path}: corrupt zip archive ({str(exc)[:120]})") from None
    if not pickles:
        raise error(f"{path}: corrupt file (a zip archive without data.pkl)")
    for name, data in pickles:
        _scan(data, path, name, error)
