"""The cross-architecture heatmap: change 1 − CKA of every sublayer of A (rows) against
every sublayer of B (columns), L_A x L_B, with each row's best match marked.

The colours follow the single-run heatmap's conventions (:mod:`cka_geo.plotting.view`): the
data's own range on a log scale by default, ``range="full"`` for 0–1; the footer names the
checkpoints, their architectures and the settings.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterable, Mapping
from pathlib import Path, PurePath
from typing import TYPE_CHECKING, Any

import numpy as np

from cka_geo.plotting.layout import _quarter
from cka_geo.plotting.style import _NAN_COLOR, _SHORT
from cka_geo.plotting.view import DEFAULT_CMAP, View, check_view, color_range
from cka_geo.results_cross import CrossResult

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

FIGURES = ("heatmap",)
"""The figures of a cross result."""


def _labels(names: list[str]) -> tuple[list[float], list[str], list[int]]:
    """Tick positions and labels (every sublayer when few, else block centres) and the
    positions of block boundaries."""
    from cka_geo.sublayers import parse

    parsed = [parse(n) for n in names]
    if len(names) <= 16:
        labels = [f"{p[0]}.{_SHORT[p[1]]}" if p else n for p, n in zip(parsed, names, strict=True)]
        ticks = [i + 0.5 for i in range(len(names))]
    else:
        ticks, labels = [], []
    bounds, start = [], 0
    for i in range(1, len(names) + 1):
        if i == len(names) or parsed[i] is None or parsed[start] is None or parsed[i][0] != parsed[start][0]:  # type: ignore[index]
            if len(names) > 16:
                ticks.append((start + i) / 2)
                labels.append(str(parsed[start][0]) if parsed[start] else names[start])  # type: ignore[index]
            if i < len(names):
                bounds.append(i)
            start = i
    if len(ticks) > 24:  # thin block labels
        step = math.ceil(len(ticks) / 24)
        ticks, labels = ticks[::step], labels[::step]
    return ticks, labels, bounds


def _axis(ax: Axes, names: list[str], which: str) -> None:
    ticks, labels, bounds = _labels(names)
    for b in bounds:
        (ax.axvline if which == "x" else ax.axhline)(b, color="white", linewidth=0.6)
    if which == "x":
        ax.set_xticks(ticks, labels, rotation=90 if len(names) <= 16 else 0)
    else:
        ax.set_yticks(ticks, labels)


def draw_cross(results: Mapping[str, Any], dpi: int = 100, view: View | None = None) -> Figure:
    """The heatmap of a cross result (see the module docstring)."""
    import textwrap

    import matplotlib
    from matplotlib.colors import LogNorm, Normalize

    from cka_geo.plotting.canvas import _new_figure

    r = CrossResult.from_dict(results)
    view = view or View()
    la, lb = r.matrix.shape
    scale = 4.0 + 0.075 * max(la, lb)
    w = min(max(scale * lb / max(la, lb), 3.0), 9.0) + 1.75
    h = min(max(scale * la / max(la, lb), 3.0), 9.0) + 1.75
    fig = _new_figure((_quarter(w), _quarter(h)), dpi)
    ax = fig.add_subplot()
    change = 1.0 - r.matrix
    vmin, vmax, log, words = color_range(change, view)
    norm = LogNorm(vmin=vmin, vmax=vmax) if log else Normalize(vmin=vmin, vmax=vmax)
    cmap = matplotlib.colormaps[view.cmap].with_extremes(bad=(0.0, 0.0, 0.0, 0.0))
    mesh = ax.pcolormesh(
        np.arange(lb + 1), np.arange(la + 1), np.ma.masked_invalid(np.clip(change, vmin, vmax)),
        cmap=cmap, norm=norm, shading="flat", edgecolors="face", linewidth=0,
    )
    ax.set_facecolor(_NAN_COLOR)
    ax.set_xlim(0, lb)
    ax.set_ylim(la, 0)
    ax.set_aspect("equal")
    _axis(ax, r.layers_ft, "x")
    _axis(ax, r.layers_pre, "y")
    best = r.best_match
    rows = [i for i, n in enumerate(r.layers_pre) if best[n] is not None]
    cols = [r.layers_ft.index(best[r.layers_pre[i]]) for i in rows]  # type: ignore[arg-type]
    ax.plot(np.array(cols) + 0.5, np.array(rows) + 0.5, linestyle="none", marker="o", markersize=3,
            markerfacecolor="white", markeredgecolor="black", markeredgewidth=0.5, label="best match of each row")
    ax.legend(loc="upper left", bbox_to_anchor=(0.0, -0.12 if lb <= 16 else -0.06), borderaxespad=0.0, fontsize=7)
    models = r.sections.get("models") or {}
    desc = {role: (models.get(role) or {}).get("description", "") for role in ("pre", "ft")}
    ax.set_ylabel(f"A (pretrained): {desc['pre']}".strip())
    ax.set_xlabel(f"B: {desc['ft']}".strip())
    cbar = fig.colorbar(mesh, ax=ax, shrink=0.85, pad=0.02, aspect=30)
    cbar.set_label(f"1 − CKA, higher = more different\n({words})")
    fig.suptitle(
        textwrap.fill("1 − CKA across two architectures: every layer of A (rows) against every layer of B (columns)", 70),
        fontsize=10, fontweight="bold",
    )
    fig.supxlabel(textwrap.fill(_footer(r), max(40, int(fig.get_figwidth() * 72 / (0.55 * 7)) - 4)), fontsize=7, color="#555555")
    return fig


def _footer(r: CrossResult) -> str:
    names = []
    for role in ("pre", "ft"):
        rec = (r.sections.get("checkpoints") or {}).get(role) or {}
        names.append(PurePath(str(rec["path"])).name if rec.get("path") else "not recorded")
    s = r.settings
    parts = [f"A: {names[0]} × B: {names[1]}", "cross mode (no same-layer view)"]
    parts += [f"{s['kernel']} kernel"] if s.get("kernel") else []
    parts += [f"{s['estimator']} estimator"] if s.get("estimator") else []
    parts += [f"{s['pooling']} pooling"] if s.get("pooling") else []
    parts += [f"n = {s['samples']} samples"] if s.get("samples") is not None else []
    if s.get("image_size"):
        parts.append(f"{s['image_size'][0]}x{s['image_size'][1]} px")
    return " · ".join(parts)


def plot_cross(
    results: Mapping[str, Any],
    out_dir: str | os.PathLike[str],
    formats: Iterable[str] = ("png",),
    *,
    dpi: int = 300,
    cmap: str = DEFAULT_CMAP,
    range: str = "data",
    vmin: float | None = None,
    vmax: float | None = None,
) -> list[Path]:
    """Write ``heatmap.<fmt>`` of a cross result into ``out_dir``, each atomically, in every format."""
    from cka_geo.atomic import atomic_path
    from cka_geo.plotting.canvas import _import_matplotlib
    from cka_geo.plotting.save import _check_dpi, _check_format, _metadata
    from cka_geo.plotting.style import _RC

    r = CrossResult.from_dict(results)
    view = check_view(cmap, range, vmin, vmax)
    dpi = _check_dpi(dpi)
    fmts = list(dict.fromkeys(_check_format(f) for f in formats))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    with contextlib.ExitStack() as stack, _import_matplotlib().rc_context(_RC):
        fig = draw_cross(r, dpi, view)
        for fmt in fmts:
            dest = out / f"heatmap.{fmt}"
            tmp = stack.enter_context(atomic_path(dest))
            fig.savefig(tmp, format=fmt, dpi=dpi, metadata=_metadata(fmt))
            written.append(dest)
    return written


__all__ = ["FIGURES", "draw_cross", "plot_cross"]
