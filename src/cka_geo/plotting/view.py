"""What the figures show and mark: the heatmap's colour view and the verdict's sublayers.

Every figure shows change as ``1 − CKA`` (higher = more change). The heatmap's colours span
the data's own range on a logarithmic scale by default (``range="data"``): from the noise
level (1 − CKA ≤ 1e-6, the verdict's, drawn in the lowest colour) or the smallest change, to
the largest, so that a change of 1e-3 on a background of 1e-7 stands out; ``range="full"`` is
the absolute 0–1 view, and ``vmin``/``vmax`` set the range by hand.

The sublayers the figures mark are the ones the printed verdict names:
``summary["most_changed"]``, ``summary["first_changed"]`` and
``summary["largest_own_change"]``, never a recomputed extreme.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import PurePath
from typing import Any

import numpy as np

from cka_geo.errors import UsageError
from cka_geo.plotting.layout import CHANGE_FLOOR
from cka_geo.plotting.results import _Parsed

RANGES = ("data", "full")
"""Colour ranges of the heatmap: the data's own (log scale) or the absolute 0–1."""

DEFAULT_CMAP = "viridis"
"""Colour map of the heatmap."""

NO_CHANGE = f"no change beyond the numerical noise (1 − CKA ≤ {CHANGE_FLOOR:g})"
"""What a figure says where the verdict names no sublayer."""

_DECADES = 9  # the data range spans at most this many decades below its largest change


@dataclass(frozen=True)
class View:
    """How the heatmap colours 1 − CKA (validated by :func:`check_view`)."""

    cmap: str = DEFAULT_CMAP
    range: str = "data"
    vmin: float | None = None
    vmax: float | None = None


def check_view(
    cmap: str = DEFAULT_CMAP, range: str = "data", vmin: float | None = None, vmax: float | None = None
) -> View:
    """Validate the colour options; a one-line UsageError naming the flag otherwise."""
    if not isinstance(cmap, str) or not cmap:
        raise UsageError(f"--cmap must be the name of a matplotlib colormap, got {cmap!r}")
    from cka_geo.plotting.canvas import _import_matplotlib

    if cmap not in _import_matplotlib().colormaps:
        raise UsageError(f"--cmap: unknown colormap {cmap!r}; try viridis, cividis, magma or an '_r' variant")
    if range not in RANGES:
        raise UsageError(f"--range must be one of {', '.join(RANGES)}, got {range!r}")
    for flag, value in (("--vmin", vmin), ("--vmax", vmax)):
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise UsageError(f"{flag} must be a finite number, got {value!r}")
    if vmin is not None and vmax is not None and vmin >= vmax:
        raise UsageError(f"--vmin ({vmin:g}) must be below --vmax ({vmax:g})")
    return View(cmap, range, None if vmin is None else float(vmin), None if vmax is None else float(vmax))


def color_range(change: np.ndarray, view: View) -> tuple[float, float, bool, str]:
    """``(vmin, vmax, log, words)``: the colour range of ``change`` (1 − CKA) and its caption."""
    finite = change[np.isfinite(change)]
    if view.range == "full" and view.vmin is None and view.vmax is None:
        lo = min(0.0, float(finite.min())) if finite.size else 0.0
        hi = max(1.0, float(finite.max())) if finite.size else 1.0
        return lo, hi, False, "absolute"
    above = finite[finite > CHANGE_FLOOR]  # at or below the floor: noise, drawn in the lowest colour
    hi = max(float(above.max()) if above.size else 0.0, 10 * CHANGE_FLOOR)  # noise never tops the scale
    lo = CHANGE_FLOOR if above.size < finite.size or not above.size else float(above.min())
    lo = max(min(lo, hi / 10), hi * 10.0**-_DECADES)
    if view.vmin is None and view.vmax is None:
        return lo, hi, True, "log, data's range"
    vmin = view.vmin if view.vmin is not None else lo
    vmax = view.vmax if view.vmax is not None else hi
    if vmin >= vmax:
        flag = "--vmin" if view.vmax is None else "--vmax"
        raise UsageError(f"{flag}: the colour range {vmin:g} to {vmax:g} (the rest from the data) is empty; give both")
    log = vmin > 0
    return vmin, vmax, log, "log, range set" if log else "range set"


def marks(r: _Parsed) -> dict[str, str | None]:
    """The sublayers the verdict names: ``most_changed``, ``first_changed``, ``largest_own_change``.

    Taken from the result's summary. Only a dict without those keys (one made by hand) gets
    them by the verdict's own rule: the lowest (first) defined CKA with 1 − CKA above the
    noise, the own change ranked over sublayers proper (not block outputs).
    """
    s = r.summary
    moved = [i for i in range(r.n) if np.isfinite(r.diagonal[i]) and 1 - r.diagonal[i] > CHANGE_FLOOR]
    out: dict[str, str | None] = {
        "most_changed": s["most_changed"] if "most_changed" in s else (
            r.layers[min(moved, key=lambda i: r.diagonal[i])] if moved else None
        ),
        "first_changed": s["first_changed"] if "first_changed" in s else (r.layers[moved[0]] if moved else None),
        "largest_own_change": None,
    }
    if r.own is not None:
        own = r.own
        ranked = [
            i for i in range(r.n) if r.types[i] != "block" and np.isfinite(own[i]) and 1 - own[i] > CHANGE_FLOOR
        ]
        out["largest_own_change"] = s["largest_own_change"] if "largest_own_change" in s else (
            r.layers[min(ranked, key=lambda i: own[i])] if ranked else None
        )
    return {k: v if isinstance(v, str) else None for k, v in out.items()}


def checkpoint_line(r: _Parsed) -> str:
    """``pre: a.pt → fine-tuned: b.pt``, the file names of the compared checkpoints."""
    names = []
    for role in ("pre", "ft"):
        record = r.checkpoints.get(role) if isinstance(r.checkpoints, dict) else None
        path = record.get("path") if isinstance(record, dict) else None
        names.append(PurePath(str(path)).name if path else "not recorded")
    return f"pretrained: {names[0]} → fine-tuned: {names[1]}"


def mark_label(name: str, kinds: list[str], value: Any = None) -> str:
    """``most changed, first to move: blocks.3.mlp.fc2`` (``value`` appended when given)."""
    text = f"{', '.join(kinds)}: {name}"
    return text if value is None else f"{text}\n{value}"
