"""Errors that reach the user as one line.

Every failure a user can cause (a bad path, a refused pickle, a wrong band count, NaN
features) raises a subclass of :class:`CkaGeoError` whose message is a single line naming the
file, layer or argument at fault. The CLI prints ``cka-geo: error: <message>`` and exits with
``exit_code``; nothing else is printed, and no traceback.
"""

from __future__ import annotations


class CkaGeoError(Exception):
    """Base class for user-facing errors (runtime errors: exit code 1)."""

    exit_code = 1


class UsageError(CkaGeoError, ValueError):
    """A bad argument or option value (exit code 2)."""

    exit_code = 2


class CheckpointError(CkaGeoError):
    """A checkpoint file that cannot be read, or was refused (pickle without trust)."""


class ArchitectureMismatchError(CheckpointError):
    """Two checkpoints whose encoders differ in keys or shapes."""


class DataError(CkaGeoError, ValueError):
    """Input data of the wrong shape, band count, size or content."""


class FeatureError(CkaGeoError, ValueError):
    """Captured features that cannot enter CKA (NaN/Inf, too few samples, bad shapes)."""


class OutputError(CkaGeoError, OSError):
    """A result that cannot be written: a full disk, a read-only or busy output folder.

    Also an :class:`OSError`, so code that catches write failures as ``OSError`` still does.
    """


__all__ = [
    "ArchitectureMismatchError",
    "CheckpointError",
    "CkaGeoError",
    "DataError",
    "FeatureError",
    "OutputError",
    "UsageError",
]
