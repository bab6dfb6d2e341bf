"""Where a command writes: ``--out`` checked before any work, locked while written, replaced whole.

Every subcommand that writes a folder goes through :func:`claim`:

1. Before any work, ``--out`` is checked: not a file, not below a file, its location
   writable, not the current folder (or one holding it), not holding an input of the
   command, and, if it exists, empty or holding an earlier run of the same command (only
   names that command writes). A user's unrelated folder is never deleted; there is no
   ``--force``: empty it or choose another ``--out``.
2. While the command runs, a lock (in the temporary directory, not in the user's folder)
   makes a second cka-geo process writing the same ``--out`` stop at once with one line.
3. Leftovers of killed runs (hidden ``.NAME.cka-geo-PID-*.tmp``/``.old`` whose process is
   gone) are removed, and a swap killed half-way is undone.
4. The outputs are written into a hidden sibling and swapped in whole
   (:func:`cka_geo.atomic.atomic_dir`): ``--out`` holds the earlier run or the new one,
   never a mix. A training run into a new or empty folder, or resumed in place, trains in
   the folder itself so that a killed run can be resumed (it is one run, unfinished).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from cka_geo.atomic import (
    _is_write_failure,
    _make_parents,
    _remove_empty,
    atomic_dir,
    clean_stale,
    clean_stale_tree,
    is_temporary,
    output_error,
)
from cka_geo.errors import OutputError, UsageError

_TRAIN = {"checkpoints", "metrics.csv", "metrics.json"}
_GENERIC = {"checkpoints", "figures", "summary.md"}  # names too common to prove a folder ours
_IGNORED = {".DS_Store"}


def run_files(command: str) -> set[str]:
    """The names a command writes at the top of its ``--out`` folder."""
    if command == "compare":
        try:
            from cka_geo.plotting import FIGURES, FORMATS
        except ImportError:  # pragma: no cover - plotting always ships with compare
            FIGURES, FORMATS = ("heatmap", "depth_profile", "change_bars"), ("png", "pdf", "svg")
        many = {"runs", "runs.csv", "runs.json"} | {f"depth_profile_runs.{x}" for x in FORMATS}
        return {"results.json", "results.csv"} | {f"{f}.{x}" for f in FIGURES for x in FORMATS} | many
    return {
        "probe": {"probe.json", "probe.csv", "probe_depth.png"},
        "pretrain": {"pretrained.pt", *_TRAIN},
        "finetune": {"pre.pt", "ft.pt", "eval.json", *_TRAIN},
        "demo": {"pretrain", "finetune_linear", "finetune_upernet", "compare_linear", "compare_upernet",
                 "figures", "summary.md", "summary.json"},
    }[command]


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


class Output:
    """The ``--out`` folder of one command run (see the module docstring)."""

    def __init__(self, path: str | os.PathLike[str], command: str, flag: str = "--out") -> None:
        self.shown = str(path)
        self.flag = flag
        self.command = command
        self.dest = Path(os.path.realpath(path))

    def _usage(self, what: str) -> UsageError:
        return UsageError(f"{self.flag} {self.shown}: {what}")

    def check_location(self, replaced: bool = True) -> None:
        """Refuse, before any work, an ``--out`` that cannot become a folder of this run.

        Args:
            replaced: The folder will be replaced as a whole (so it may not hold the current
                folder); False for a command that adds files to it (``plot``).
        """
        if not self.shown.strip():
            raise UsageError(f"{self.flag}: empty path")
        cwd = Path(os.path.realpath(os.getcwd()))
        if replaced and _inside(cwd, self.dest):
            raise self._usage(f"is the current folder or holds it; choose a new folder for {self.flag}")
        if os.path.lexists(self.dest) and not self.dest.is_dir():
            raise self._usage(f"exists and is not a folder; choose another {self.flag}")
        anc = self.dest.parent
        while not os.path.lexists(anc) and anc != anc.parent:
            anc = anc.parent
        if not anc.is_dir():
            raise self._usage(f"{anc} is a file, not a folder; choose another {self.flag}")
        places = ([self.dest.parent] if replaced else []) + [self.dest] if self.dest.is_dir() else [anc]
        for place in places:
            if not os.access(place, os.W_OK | os.X_OK):
                raise OutputError(f"{self.flag} {self.shown}: cannot write in {place} "
                                  "(permission denied or read-only file system)")

    def check_contents(self, inputs: Iterable[str | os.PathLike[str] | None] = (), in_place: bool = False) -> None:
        """Refuse an ``--out`` holding an input (it would be replaced) or a folder not of this command."""
        if not in_place:
            for inp in inputs:
                if inp is not None and os.path.lexists(inp) and _inside(Path(os.path.realpath(inp)), self.dest):
                    raise self._usage(f"holds the input {inp}, and {self.flag} is replaced as a whole; "
                                      f"choose another {self.flag}")
        if not self.dest.is_dir():
            return
        names = run_files(self.command)
        entries = sorted(e for e in os.listdir(self.dest) if not is_temporary(e) and e not in _IGNORED)
        foreign = [e for e in entries if e not in names]
        if foreign or (entries and not set(entries) - _GENERIC):
            what = (f"holds {foreign[0]!r}, which cka-geo {self.command} does not write" if foreign
                    else f"holds no cka-geo {self.command} run")
            raise self._usage(f"the folder {what}; {self.flag} is replaced as a whole, so choose another "
                              f"{self.flag} or empty it")

    def holds_run(self) -> bool:
        """Whether the folder exists and is not empty (of anything but temporaries)."""
        return self.dest.is_dir() and any(not is_temporary(e) and e not in _IGNORED for e in os.listdir(self.dest))

    def final(self, path: str | os.PathLike[str], work: str | os.PathLike[str]) -> Path:
        """Where ``path``, written below the working folder ``work``, ends up, as the user wrote ``--out``."""
        try:
            return Path(self.shown) / Path(path).relative_to(work)
        except ValueError:  # not below it: as it is
            return Path(path)

    @contextlib.contextmanager
    def replace(self) -> Iterator[Path]:
        """A new hidden folder to write into; it replaces ``--out`` as a whole on success."""
        try:
            with atomic_dir(self.dest) as tmp:
                yield tmp
        except OutputError as exc:
            raise self._respelled(exc) from exc

    def _respelled(self, exc: OutputError) -> OutputError:
        """``exc`` naming paths below ``--out`` as the user wrote it."""
        text = str(exc)
        for end in (os.sep, ":"):
            text = text.replace(f"{self.dest}{end}", f"{self.shown.rstrip(os.sep) or os.sep}{end}")
        if text == str(exc):
            return exc
        new = OutputError(text)
        new.errno = exc.errno
        return new

    @contextlib.contextmanager
    def train_dir(self, in_place: bool = False) -> Iterator[Path]:
        """Where a training run writes: ``--out`` itself when new, empty or resumed in place, else a new folder swapped in.

        A run in place that fails before its first checkpoint leaves nothing behind.
        """
        if not in_place and self.holds_run():
            with self.replace() as tmp:
                yield tmp
            return
        existed = self.dest.is_dir()
        try:
            created = _make_parents(self.dest)
        except OSError as exc:
            raise output_error(exc, self.shown) from exc
        try:
            yield self.dest
        except BaseException as exc:
            if not in_place and not (self.dest / "checkpoints" / "last.pt").is_file():
                shutil.rmtree(self.dest, ignore_errors=True)  # nothing to resume: leave nothing
                if existed:
                    self.dest.mkdir(exist_ok=True)
                else:
                    _remove_empty(created[1:])
            if _is_write_failure(exc):
                raise output_error(exc, self.shown) from exc
            if isinstance(exc, OutputError):
                raise self._respelled(exc) from exc
            raise


def _lock(out: Output) -> int | None:
    """Hold an exclusive lock on ``out`` for this process (None where locks are unavailable)."""
    try:
        import fcntl
    except ImportError:  # Windows: no lock
        return None
    base = Path(tempfile.gettempdir()) / f"cka-geo-locks-{os.getuid()}"
    key = hashlib.sha256(os.fsencode(out.dest)).hexdigest()[:32]
    try:
        base.mkdir(mode=0o700, exist_ok=True)
        fd = os.open(base / f"{key}.lock", os.O_RDWR | os.O_CREAT, 0o600)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise OutputError(f"{out.flag} {out.shown}: another cka-geo run (pid {holder}) is writing there; "
                          f"wait for it to end or choose another {out.flag}") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


@contextlib.contextmanager
def claim(
    path: str | os.PathLike[str],
    command: str,
    *,
    flag: str = "--out",
    inputs: Iterable[str | os.PathLike[str] | None] = (),
    in_place: bool = False,
) -> Iterator[Output]:
    """Check ``--out``, lock it and clean up after killed runs; yield an :class:`Output`.

    Args:
        path: The ``--out`` value.
        command: The subcommand (decides which names an earlier run may hold).
        flag: The option named in messages.
        inputs: Files the command reads; ``--out`` may not hold them (it is replaced).
        in_place: A training run resumed inside ``--out`` (which is then not replaced).

    Raises:
        UsageError: ``--out`` is a file, below a file, the current folder, holds an input,
            or holds something other than an earlier run of ``command``.
        OutputError: Its location is not writable, or another cka-geo run writes there.
    """
    out = Output(path, command, flag)
    out.check_location()
    fd = _lock(out)
    try:
        clean_stale(out.dest)
        if out.dest.is_dir():
            clean_stale_tree(out.dest)
        out.check_contents(inputs, in_place)
        yield out
    finally:
        if fd is not None:
            os.close(fd)


__all__ = ["Output", "claim", "run_files"]
