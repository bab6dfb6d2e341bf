"""Looking at a pickle's opcodes before anything unpickles it.

Unpickling builds containers without recursion, but hashing a dict key or set member does
recurse, in C and without a guard: a pickle of ``{((((…),),),): 1}`` nested a million
tuples deep crashes the interpreter (segmentation fault) in every unpickler, torch's
weights-only one included. :func:`check_pickle_file` therefore runs the opcode stream
symbolically first (:mod:`pickletools`, nothing is built or imported), tracking how deeply
each value on the stack is nested, and refuses a file before it is loaded when:

- some value nests deeper than :data:`~cka_geo.walk.MAX_DEPTH` levels;
- a pickle is longer than :data:`MAX_PICKLE_BYTES` (the tensors of a ``torch.save`` zip
  live beside ``data.pkl``, not in it, so real files stay far below this).

Objects mutated after they were memoised can look shallower than they are; the loaded
object is walked again afterwards (:func:`cka_geo.walk.check_nesting`), and that walk catches
them without recursion. What this scan must catch, tuples nested too deep to hash, is
exact: tuples never change after they are built.
"""

from __future__ import annotations

import io
import pickletools
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from cka_geo import walk
from cka_geo.errors import CheckpointError

MAX_PICKLE_BYTES = 256 * 2**20
"""Longest pickle stream scanned (256 MiB); longer ones are refused."""
#: A legacy (non-zip) torch file starts with five pickles: magic number, protocol, system
#: info, the object, the storage keys; the raw tensor bytes follow them.
_LEGACY_PICKLES = 5
_MUTATORS = frozenset({"SETITEM", "SETITEMS", "APPEND", "APPENDS", "ADDITEMS", "BUILD"})
_PUTS = frozenset({"PUT", "BINPUT", "LONG_BINPUT"})
_GETS = frozenset({"GET", "BINGET", "LONG_BINGET"})


class _TooDeep(Exception):
    pass


class _TooLong(Exception):
    pass


class _Malformed(Exception):
    pass


def _ops(stream: IO[bytes], max_bytes: int) -> Iterator[tuple[pickletools.OpcodeInfo, object]]:
    try:
        for op, arg, pos in pickletools.genops(stream):
            if pos is not None and pos > max_bytes:
                raise _TooLong
            yield op, arg
    except (ValueError, EOFError, TypeError, OverflowError, MemoryError) as exc:
        raise _Malformed(str(exc)) from None


def max_nesting(stream: IO[bytes], limit: int, max_bytes: int = MAX_PICKLE_BYTES) -> int:
    """Deepest nesting of any value built by the pickle at the current position of ``stream``.

    Args:
        stream: A binary stream positioned at the start of a pickle; read up to its STOP.
        limit: Stop and raise as soon as a value nests deeper than this.
        max_bytes: Stop and raise past this position in ``stream``.

    Returns:
        The depth (0 for a scalar, 1 for a flat container).

    Raises:
        _TooDeep: Nesting beyond ``limit``.
        _TooLong: The pickle runs past ``max_bytes``.
        _Malformed: Not a pickle (bad opcode, truncated, stack underflow).
    """
    stack: list[int] = []
    marks: list[int] = []
    memo: dict[object, int] = {}
    deepest = 0
    for op, arg in _ops(stream, max_bytes):
        name = op.name
        try:
            if name in _PUTS:
                memo[arg] = stack[-1]
                continue
            if name == "MEMOIZE":
                memo[len(memo)] = stack[-1]
                continue
            if name in _GETS:
                stack.append(memo.get(arg, 0))
                continue
            if name == "MARK":
                marks.append(len(stack))
                continue
            if name == "DUP":
                stack.append(stack[-1])
                continue
            if name == "STOP":
                return deepest
            before = op.stack_before
            sliced: list[int] = []
            if pickletools.markobject in before:
                start = marks.pop()
                sliced = stack[start:]
                del stack[start:]
                below_count = before.index(pickletools.markobject)
            else:
                below_count = len(before)
            if below_count > len(stack):
                raise _Malformed(f"stack underflow at {name}")
            below = stack[len(stack) - below_count :] if below_count else []
            del stack[len(stack) - below_count :]
        except IndexError:
            raise _Malformed(f"stack underflow at {name}") from None
        if not op.stack_after:
            continue
        if name in _MUTATORS:
            rest = below[1:] + sliced
            depth = max(below[0], 1 + max(rest)) if rest else below[0]
            stack.append(depth)
        else:
            depth = 1 + max(below + sliced, default=-1)
            stack.extend([depth] * len(op.stack_after))
        if depth > limit:
            raise _TooDeep
        deepest = max(deepest, depth)
    raise _Malformed("no STOP opcode")


def _scan(stream: IO[bytes], path: Path, where: str, count: int = 1) -> None:
    """Scan ``count`` pickles in a row; stop quietly at anything that is not a pickle."""
    for _ in range(count):
        try:
            max_nesting(stream, walk.MAX_DEPTH)
        except _TooDeep:
            raise CheckpointError(
                f"{path}: nested deeper than {walk.MAX_DEPTH} levels ({where}): refused"
            ) from None
        except _TooLong:
            raise CheckpointError(
                f"{path}: pickle ({where}) longer than {MAX_PICKLE_BYTES} bytes: refused"
            ) from None
        except _Malformed:
            return  # torch reports what is wrong with it


def check_pickle_file(path: Path) -> None:
    """Refuse a torch/pickle file whose pickles nest too deeply, before loading it.

    Args:
        path: A ``torch.save`` zip (its ``*.pkl`` members are scanned) or a legacy or plain
            pickle file (the pickles at its start are scanned).

    Raises:
        CheckpointError: One line naming the file.
    """
    with path.open("rb") as f:
        if f.read(4) != b"PK\x03\x04":  # torch's own test for its zip format
            f.seek(0)
            _scan(f, path, "pickle", _LEGACY_PICKLES)
            return
    try:
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                if not info.filename.endswith(".pkl"):
                    continue
                if info.file_size > MAX_PICKLE_BYTES:
                    raise CheckpointError(
                        f"{path}: {info.filename} is {info.file_size} bytes, more than "
                        f"{MAX_PICKLE_BYTES}: refused"
                    )
                with archive.open(info) as member:
                    data = member.read(MAX_PICKLE_BYTES + 1)
                _scan(io.BytesIO(data), path, info.filename)
    except CheckpointError:
        raise
    except Exception:  # BadZipFile, zlib.error, OSError…: torch reports the broken archive
        return
