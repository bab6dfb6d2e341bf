"""The multi-run depth profile: same-layer change 1 − CKA against depth, one panel per
sublayer kind, one line per fine-tuned run (``cka-geo compare PRE FT1 FT2 ...``)."""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path, PurePath
from typing import TYPE_CHECKING, Any

import numpy as np

from cka_geo.errors import UsageError
from cka_geo.plotting.layout import (
    CHANGE_FLOOR,
    _change_scale,
    _quarter,
    _settings_line,
    _snap,
    _type_order,
)
from cka_geo.plotting.results import _parse, _Parsed
from cka_geo.plotting.style import TYPE_LABELS

if TYPE_CHECKING:
    from matplotlib.figure import Figure

#: Okabe & Ito colours in the order runs take them (then repeated with other markers).
RUN_COLORS = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000", "#F0E442")
_RUN_MARKERS = ("o", "s", "D", "^", "v", "P", "X", "*")


def _run_series(r: _Parsed, kind: str) -> tuple[np.ndarray, np.ndarray]:
    idx = sorted((i for i in range(r.n) if r.types[i] == kind and r.blocks[i] is not None), key=lambda i: r.blocks[i])  # type: ignore[arg-type, return-value]
    return np.array([r.blocks[i] for i in idx], dtype=float), _snap(1.0 - r.diagonal[idx])


def draw_runs_depth(names: Sequence[str], results: Sequence[Mapping[str, Any]], dpi: int = 100) -> Figure:
    """The figure (see the module docstring); ``names`` label the lines.

    Raises:
        UsageError: No runs, or as many names as results not given.
        DataError: A result is not a valid ``cka-geo/compare/v1`` dict.
    """
    from cka_geo.plotting.canvas import _new_figure

    if not results or len(names) != len(results):
        raise UsageError(f"the multi-run depth profile needs one name per run, got {len(names)} for {len(results)}")
    parsed = [_parse(res, f"run {name}") for name, res in zip(names, results, strict=True)]
    kinds = [t for t in _type_order(parsed[0]) if t != "other"] or ["other"]
    cols = 2 if len(kinds) > 1 else 1
    rows = math.ceil(len(kinds) / cols)
    blocks = parsed[0].n_blocks
    size = (_quarter(min(max(4.0 + 0.22 * blocks, 6.0), 10.0) * (1.0 if cols == 1 else 1.35)), _quarter(1.5 + 2.3 * rows))
    fig = _new_figure(size, dpi)
    axes = fig.subplots(rows, cols, sharex=True, squeeze=False).ravel()
    for ax, kind in zip(axes, kinds, strict=False):
        series = [_run_series(r, kind) for r in parsed]
        values = np.concatenate([y for _, y in series]) if series else np.array([])
        log = _change_scale(values) == "log"
        for k, (name, (x, y)) in enumerate(zip(names, series, strict=True)):
            ax.plot(
                x,
                np.maximum(y, CHANGE_FLOOR) if log else y,
                label=name if ax is axes[0] else "_nolegend_",
                color=RUN_COLORS[k % len(RUN_COLORS)],
                marker=_RUN_MARKERS[(k // len(RUN_COLORS) + k) % len(_RUN_MARKERS)],
                zorder=3,
            )
        finite = values[np.isfinite(values)]
        top = float(finite.max()) if finite.size else 0.0
        if log:
            ax.set_yscale("log")
            ax.set_ylim(CHANGE_FLOOR / 1.5, top * 30)
        elif top > 0:
            ax.set_ylim(min(0.0, float(finite.min())) - 0.04 * top, top * 1.25)
        else:
            ax.set_ylim(-0.05, 1.0)
        ax.set_title(f"{TYPE_LABELS.get(kind, kind)}: 1 − CKA(pre, fine-tuned)", loc="left")
        ax.set_ylabel("1 − CKA" + ("  (log)" if log else ""))
        from matplotlib.ticker import MaxNLocator

        ax.xaxis.set_major_locator(MaxNLocator(integer=True, nbins=min(blocks, 16)))
        ax.grid(axis="y", color="#E5E5E5", linewidth=0.6)
        ax.set_axisbelow(True)
        for side in ("top", "right"):
            ax.spines[side].set_visible(False)
    for ax in axes[len(kinds):]:
        ax.set_visible(False)
    for ax in axes[-cols:]:
        ax.set_xlabel("block index")
    fig.legend(loc="outside upper center", ncols=min(len(names), 4), title="fine-tuned run")
    _footer(fig, names, parsed)
    return fig


def _footer(fig: Figure, names: Sequence[str], parsed: Sequence[_Parsed]) -> None:
    """Checkpoint names and the settings, as on every figure of cka-geo."""
    import textwrap

    def file(r: _Parsed, role: str) -> str:
        rec = r.checkpoints.get(role) if isinstance(r.checkpoints, dict) else None
        path = rec.get("path") if isinstance(rec, dict) else None
        return PurePath(str(path)).name if path else "not recorded"

    fts = ", ".join(f"{n} ({file(r, 'ft')})" for n, r in zip(names, parsed, strict=True))
    settings = _settings_line(dataclasses.replace(parsed[0], intervals=None, own_intervals=None))  # no bands drawn
    line = (
        f"pretrained: {file(parsed[0], 'pre')} → fine-tuned: {fts} · {settings} · same-layer change (each "
        f"run's own change and intervals: runs/<run>/depth_profile) · log axes: changes ≤ {CHANGE_FLOOR:g} at the floor"
    )
    chars = max(40, int(fig.get_figwidth() * 72 / (0.55 * 7)) - 4)
    fig.supxlabel(textwrap.fill(line, chars, break_long_words=True), fontsize=7, color="#555555")


def plot_runs_depth(
    names: Sequence[str],
    results: Sequence[Mapping[str, Any]],
    path: str | os.PathLike[str],
    *,
    dpi: int = 300,
    format: str | None = None,
) -> Path:
    """Draw :func:`draw_runs_depth` and save it atomically to ``path`` (png, pdf or svg)."""
    from cka_geo.plotting.canvas import _import_matplotlib
    from cka_geo.plotting.save import save_figure
    from cka_geo.plotting.style import _RC

    with _import_matplotlib().rc_context(_RC):
        fig = draw_runs_depth(names, results, dpi)
        return save_figure(fig, path, fmt=format, dpi=dpi)


__all__ = ["RUN_COLORS", "draw_runs_depth", "plot_runs_depth"]
