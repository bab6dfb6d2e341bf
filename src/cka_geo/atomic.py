"""Atomic file and directory writes: a temporary sibling, then a rename.

A reader never sees a half-written file, nor a folder holding the files of two runs, and a
failure leaves nothing behind. Temporaries are hidden siblings named
``.<name>.cka-geo-<pid>-<random>.tmp`` (``.old`` for a folder moved aside during a swap).
Those of a process that is no longer alive (a killed run) are removed by the next write to
the same path (:func:`clean_stale`), so a kill never leaves litter for good.

A write that fails for a reason of the file system (a full disk, a read-only folder, a
path below a file) raises :class:`~cka_geo.errors.OutputError` naming the destination: a
one-line user-facing error that is also an :class:`OSError`.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import re
import secrets
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from cka_geo.errors import OutputError

_STALE = re.compile(r"^\.(?P<name>.+)\.cka-geo-(?P<pid>\d+)-[A-Za-z0-9_]+\.(?P<kind>tmp|old)$")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _prefix(dest: Path) -> str:
    return f".{dest.name}.cka-geo-{os.getpid()}-"


def is_temporary(name: str) -> bool:
    """Whether ``name`` is one of the temporaries this module makes."""
    return _STALE.match(name) is not None


def _alive(pid: int) -> bool:
    if pid == os.getpid() or os.name == "nt":  # on Windows os.kill would terminate it
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: alive, someone else's
        return True
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            path.unlink()


def _stale_in(folder: Path, name: str | None = None) -> list[Path]:
    try:
        entries = os.listdir(folder)
    except OSError:
        return []
    found = []
    for entry in entries:
        m = _STALE.match(entry)
        if m and (name is None or m["name"] == name) and not _alive(int(m["pid"])):
            found.append(folder / entry)
    return found


def clean_stale(path: str | os.PathLike[str]) -> list[Path]:
    """Remove the temporaries that killed processes left beside ``path``.

    If ``path`` is missing and a folder that a killed swap had moved aside is there, it is
    moved back first: the swap is undone, and ``path`` holds the earlier run again.

    Returns:
        The temporaries found (moved back or removed).
    """
    dest = Path(path)
    stale = _stale_in(dest.parent, dest.name)
    if not os.path.lexists(dest):
        olds = sorted((p for p in stale if p.suffix == ".old"), key=lambda p: p.stat().st_mtime, reverse=True)
        for old in olds[:1]:
            with contextlib.suppress(OSError):
                os.replace(old, dest)
    for p in stale:
        if os.path.lexists(p):
            _remove(p)
    return stale


def clean_stale_tree(folder: str | os.PathLike[str]) -> list[Path]:
    """Remove the temporaries of killed processes anywhere below ``folder``."""
    found: list[Path] = []
    for root, dirs, _ in os.walk(folder):
        here = _stale_in(Path(root))
        for p in here:
            _remove(p)
        found += here
        dirs[:] = [d for d in dirs if not is_temporary(d)]
    return found


def _os_error_in(exc: BaseException) -> OSError | None:
    """The OSError behind ``exc``: itself, or one in its cause/context chain.

    torch.save through a Python file object turns the file's OSError (e.g. ENOSPC) into its
    zip writer's RuntimeError, with the OSError kept as ``__context__``.
    """
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        if isinstance(cur, OSError):
            return cur
        seen.add(id(cur))
        cur = cur.__cause__ or cur.__context__
    return None


def _is_write_failure(exc: BaseException) -> bool:
    if isinstance(exc, OutputError):
        return False  # already says which file
    if _os_error_in(exc) is not None:
        return True
    # torch.save to a path reports a failed write (e.g. a full disk) as its zip writer's RuntimeError
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("inline_container" in text or "PytorchStreamWriter" in text)


def output_error(exc: BaseException, path: str | os.PathLike[str]) -> OutputError:
    """An :class:`OutputError` ``cannot write PATH: <reason>`` for a failed write."""
    os_exc = _os_error_in(exc)
    if os_exc is not None and os_exc.strerror:
        reason = os_exc.strerror
        exc = os_exc
    else:
        text = str(exc).strip()
        reason = text.splitlines()[0] if text else type(exc).__name__
    err = OutputError(f"cannot write {path}: {reason}")
    err.errno = getattr(exc, "errno", None)
    return err


def _make_parents(folder: Path) -> list[Path]:
    """Create ``folder`` and its missing parents; return the ones created, deepest first."""
    missing = []
    p = folder
    while not os.path.lexists(p) and p != p.parent:
        missing.append(p)
        p = p.parent
    folder.mkdir(parents=True, exist_ok=True)
    return missing


def _remove_empty(folders: list[Path]) -> None:
    for p in folders:
        try:
            p.rmdir()
        except OSError:
            break


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` on success.

    Args:
        path: The final destination.

    Yields:
        A path in the same directory to write to. On an exception it is removed and
        ``path`` is left untouched.

    Raises:
        OutputError: The file system refused the write (the message names ``path``).

    Example:
        >>> import tempfile, pathlib
        >>> d = pathlib.Path(tempfile.mkdtemp())
        >>> with atomic_path(d / "a.txt") as tmp:
        ...     _ = tmp.write_text("hi")
        >>> (d / "a.txt").read_text()
        'hi'
    """
    dest = Path(path)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        clean_stale(dest)
        fd, tmp_name = tempfile.mkstemp(prefix=_prefix(dest), suffix=".tmp", dir=dest.parent)
        os.close(fd)
    except OSError as exc:
        raise output_error(exc, dest) from exc
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual permissions
        os.replace(tmp, dest)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if _is_write_failure(exc):
            raise output_error(exc, dest) from exc
        raise


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    write_bytes_atomic(path, text.encode("utf-8"))


@functools.cache
def _renameat2() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # no libc symbol (old glibc, musl)
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one atomic step (Linux ``RENAME_EXCHANGE``).

    Returns False where the platform or the file system cannot.
    """
    fn = _renameat2()
    if fn is None:
        return False
    import ctypes

    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _swap_into_place(tmp: Path, dest: Path) -> None:
    """Make the complete folder ``tmp`` become ``dest``; delete what ``dest`` held."""
    for _ in range(5):  # another writer may put its own run in place between our steps
        if not os.path.lexists(dest):
            try:
                os.replace(tmp, dest)  # also replaces an empty folder
                return
            except OSError as exc:
                if exc.errno in (errno.ENOTEMPTY, errno.EEXIST) or os.path.lexists(dest):
                    continue
                raise
        if not dest.is_dir() or dest.is_symlink():
            raise OutputError(f"cannot write {dest}: it exists and is not a folder")
        if _exchange(tmp, dest):  # one atomic step; tmp now holds the old run
            shutil.rmtree(tmp, ignore_errors=True)
            return
        aside = dest.parent / f"{_prefix(dest)}{secrets.token_hex(4)}.old"
        try:
            os.replace(dest, aside)
        except FileNotFoundError:
            continue
        try:
            os.replace(tmp, dest)
        except BaseException:
            with contextlib.suppress(OSError):  # put the old run back; if even that fails,
                os.replace(aside, dest)  # clean_stale moves it back once we are gone
            raise
        shutil.rmtree(aside, ignore_errors=True)
        return
    raise OutputError(f"cannot write {dest}: other processes keep replacing it")


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary directory that replaces ``path`` as a whole on success.

    The new folder is built as a hidden sibling of ``path`` and swapped in at the end: in
    one atomic ``renameat2(RENAME_EXCHANGE)`` on Linux, elsewhere (or where the file system
    cannot) by renaming the old folder aside, the new one into place and deleting the old
    one. Nothing of an earlier run survives in ``path`` (no stale figures), and a kill at any
    moment leaves ``path`` holding the old run or the new one, never a mix: a swap killed
    between its two renames is undone by the next write to ``path``
    (:func:`clean_stale`), and leftover temporaries are removed then.

    On an exception the temporary directory is removed and ``path`` is left as it was (not
    created if it did not exist). Whether an existing ``path`` may be replaced is the
    caller's decision: the CLI replaces only folders of its own runs, or empty ones.

    Raises:
        OutputError: The file system refused a write (the message names the path).
    """
    dest = Path(path)
    if dest.is_symlink():
        dest = Path(os.path.realpath(dest))  # replace what the link points to, keep the link
    try:
        created = _make_parents(dest.parent)
        clean_stale(dest)
        tmp = Path(tempfile.mkdtemp(prefix=_prefix(dest), suffix=".tmp", dir=dest.parent))
    except OSError as exc:
        raise output_error(exc, dest) from exc
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700
        _swap_into_place(tmp, dest)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if not os.path.lexists(dest):
            _remove_empty(created)
        if _is_write_failure(exc):
            raise output_error(exc, dest) from exc
        if isinstance(exc, OutputError) and str(tmp) in str(exc):  # name the file where it was going
            raise OutputError(str(exc).replace(str(tmp), str(dest))) from exc
        raise


__all__ = [
    "atomic_dir",
    "atomic_path",
    "clean_stale",
    "clean_stale_tree",
    "is_temporary",
    "output_error",
    "write_bytes_atomic",
    "write_text_atomic",
]
