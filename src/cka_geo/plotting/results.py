"""The figures' view of a result: arrays parsed from a :class:`~cka_geo.results.CompareResult`.

Validation and reading of ``results.json`` live in :mod:`cka_geo.results`; ``load_results``
and ``SCHEMA`` are re-exported here for existing imports.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cka_geo.results import SCHEMA, CompareResult, load_results


@dataclass(frozen=True)
class _Parsed:
    """A validated results dict as arrays (NaN where the file has null)."""

    layers: list[str]
    matrix: np.ndarray  # (L, L)
    diagonal: np.ndarray  # (L,)
    intervals: np.ndarray | None  # (L, 2), NaN rows where absent
    own: np.ndarray | None  # (L,)
    own_intervals: np.ndarray | None  # (L, 2)
    blocks: list[int | None]  # block index of each layer (None: not a canonical name)
    types: list[str]  # sublayer type of each layer ("other" for non-canonical names)
    settings: dict[str, Any]
    summary: dict[str, Any]
    checkpoints: dict[str, Any] = field(default_factory=dict)  # pre/ft records (path, ...)

    @property
    def n(self) -> int:
        return len(self.layers)

    @property
    def n_blocks(self) -> int:
        return len({b for b in self.blocks if b is not None}) or 1


def _parse(results: Any, source: str = "results") -> _Parsed:
    """Validate a results dict (or take a :class:`CompareResult`) and turn it into arrays."""
    r = CompareResult.from_dict(results, source)

    def values(attr: str) -> np.ndarray:
        return np.array([np.nan if getattr(x, attr) is None else getattr(x, attr) for x in r.layers], dtype=float)

    def pairs(attr: str) -> np.ndarray | None:
        ivs = [getattr(x, attr) for x in r.layers]
        if all(iv is None for iv in ivs):
            return None
        return np.array(
            [[np.nan, np.nan] if iv is None else [np.nan if v is None else v for v in iv] for iv in ivs], dtype=float
        )

    own = values("own") if r.own_change is not None else None
    if own is not None and np.isnan(own).all():  # nothing to draw in an own-change panel
        own = None
    return _Parsed(
        layers=r.names,
        matrix=r.matrix,
        diagonal=values("cka"),
        intervals=pairs("interval"),
        own=own,
        own_intervals=pairs("own_interval") if own is not None else None,
        blocks=[x.block for x in r.layers],
        types=[x.kind for x in r.layers],
        settings=r.settings,
        summary=r.summary,
        checkpoints=dict(r.sections.get("checkpoints") or {}),
    )


def validate_results(results: Any, source: str = "results") -> None:
    """Check that ``results`` is a readable ``cka-geo/compare/v1`` dict.

    Args:
        results: The dict (as written by ``compare``; ``null`` entries may be ``None`` or NaN).
        source: What to call it in error messages (a file name, say).

    Raises:
        DataError: Wrong schema, a matrix whose shape does not match ``layers``, a
            non-numeric value, or a per-layer entry naming an unknown layer.
    """
    _parse(results, source)


__all__ = ["SCHEMA", "load_results", "validate_results"]
