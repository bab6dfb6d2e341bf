"""Checkpoint files: safe loading, encoder discovery, spec inference, writing, pair checks.

Public API: :func:`load_checkpoint`, :class:`LoadedCheckpoint`, :func:`build_model`,
:func:`save_checkpoint`, :func:`check_pair`, :class:`PairReport`. See docs/checkpoints.md.
"""

from __future__ import annotations

from cka_geo.checkpoints.load import LoadedCheckpoint, build_model, load_checkpoint
from cka_geo.checkpoints.pair import PairReport, check_pair
from cka_geo.checkpoints.save import save_checkpoint

__all__ = [
    "LoadedCheckpoint",
    "PairReport",
    "build_model",
    "check_pair",
    "load_checkpoint",
    "save_checkpoint",
]
