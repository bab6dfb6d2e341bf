"""The heatmap: change 1 − CKA over the full L × L matrix, pretrained rows against fine-tuned columns.

By default the colours span the data's own range on a log scale (a planted change of 1e-3
stands out on a background of 1e-7); ``View(range="full")`` is the absolute 0–1 view. The
diagonal cells of the verdict's most-changed and first-to-move sublayers are outlined.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

from cka_geo.plotting.canvas import _decorate, _new_figure
from cka_geo.plotting.layout import CHANGE_FLOOR, _fmt_change, _groups, _sizes, _within_block
from cka_geo.plotting.results import _Parsed
from cka_geo.plotting.style import _NAN_COLOR, _NAN_HATCH_COLOR, _SHORT
from cka_geo.plotting.view import NO_CHANGE, View, color_range, mark_label, marks

if TYPE_CHECKING:
    from matplotlib.figure import Figure

_MARK = "#D55E00"  # vermillion: the verdict's sublayers, outlined on the diagonal


def _draw_matrix(r: _Parsed, dpi: int, view: View | None = None) -> Figure:
    import matplotlib
    from matplotlib.colors import LogNorm, Normalize
    from matplotlib.patches import Patch, Rectangle
    from matplotlib.ticker import FixedLocator

    view = view or View()
    fig = _new_figure(_sizes(r)["heatmap"], dpi)
    ax = fig.add_subplot()
    n = r.n
    change = 1.0 - r.matrix
    vmin, vmax, log, words = color_range(change, view)
    shown = np.clip(change, vmin, vmax)  # noise at or below 0 takes the lowest colour, not NaN's
    norm = LogNorm(vmin=vmin, vmax=vmax) if log else Normalize(vmin=vmin, vmax=vmax)
    cmap = matplotlib.colormaps[view.cmap].with_extremes(bad=(0.0, 0.0, 0.0, 0.0))
    edges = np.arange(n + 1)
    mesh = ax.pcolormesh(
        edges,
        edges,
        np.ma.masked_invalid(shown),
        cmap=cmap,
        norm=norm,
        shading="flat",
        edgecolors="face",
        linewidth=0,
        rasterized=False,
    )
    # NaN cells are transparent and show the axes background: light grey, hatched.
    has_nan = bool(np.isnan(r.matrix).any())
    ax.set_facecolor(_NAN_COLOR)
    if has_nan:
        ax.patch.set_hatch("////")
        ax.patch.set_edgecolor(_NAN_HATCH_COLOR)
    ax.set_xlim(0, n)
    ax.set_ylim(n, 0)  # row 0 at the top, like the matrix
    ax.set_aspect("equal")

    groups = _groups(r)
    for start, _stop, _label in groups[1:]:
        ax.axvline(start, color="white", linewidth=0.6)
        ax.axhline(start, color="white", linewidth=0.6)
    for axis in (ax.xaxis, ax.yaxis):
        axis.set_minor_locator(FixedLocator((np.arange(n) + 0.5).tolist()))
    within = _within_block(r)
    if n <= 16:  # few layers: name every sublayer
        labels = [
            f"{b}.{_SHORT[t]}" if b is not None else name
            for b, t, name in zip(r.blocks, r.types, r.layers, strict=True)
        ]
        ax.set_xticks(np.arange(n) + 0.5, labels, rotation=90)
        ax.set_yticks(np.arange(n) + 0.5, labels)
        xlab, ylab = "fine-tuned layer", "pretrained layer"
    else:  # label blocks at their centres; sublayers are the minor ticks
        size = _sizes(r)["heatmap"][0]
        max_labels = max(6, int(size * 3))
        step = max(1, math.ceil(len(groups) / max_labels))
        centres = [(a + b) / 2 for a, b, _ in groups][::step]
        labels = [lab for _, _, lab in groups][::step]
        ax.set_xticks(centres, labels)
        ax.set_yticks(centres, labels)
        ax.tick_params(which="major", length=0)
        ax.tick_params(which="minor", length=2.5)
        suffix = f" (minor ticks: {within})" if within else ""
        xlab = f"fine-tuned model: block{suffix}"
        ylab = f"pretrained model: block{suffix}"
    ax.set_xlabel(xlab)
    ax.set_ylabel(ylab)
    for spine in ax.spines.values():
        spine.set_visible(True)
    below = bool((change[np.isfinite(change)] < vmin).any())
    cbar = fig.colorbar(mesh, ax=ax, shrink=0.85, pad=0.02, aspect=30, extend="min" if below else "neither")
    noise = f"; ≤ {CHANGE_FLOOR:g}: noise" if log and vmin <= CHANGE_FLOOR < vmax and below else ""
    cbar.set_label(f"1 − CKA, higher = more change\n({_fmt_change(vmin)} to {_fmt_change(vmax)}, {words}{noise})")
    cbar.outline.set_linewidth(0.6)
    named = marks(r)
    most, first = named["most_changed"], named["first_changed"]
    said = []
    for name, kinds, style, box in (
        (most, ["most changed"] + (["first to move"] if first == most else []), "-", "solid"),
        (first if first != most else None, ["first to move"], "--", "dashed"),
    ):
        if name is None:
            continue
        if name in r.layers:
            i = r.layers.index(name)
            ax.add_patch(
                Rectangle((i, i), 1, 1, fill=False, edgecolor=_MARK, linewidth=1.4, linestyle=style, zorder=4)
            )
            said.append(f"{mark_label(name, kinds)} ({box} box)")
        else:
            said.append(f"{mark_label(name, kinds)} (not among the drawn layers)")
    ax.set_title(" · ".join(said) if said else NO_CHANGE, fontsize=8, color="#333333")
    if has_nan:
        ax.legend(
            handles=[
                Patch(facecolor=_NAN_COLOR, edgecolor=_NAN_HATCH_COLOR, hatch="////", label="NaN")
            ],
            loc="upper left",
            bbox_to_anchor=(1.0, -0.01),
            borderaxespad=0.0,
            handlelength=1.2,
        )
    _decorate(fig, "Change 1 − CKA between pretrained (rows) and fine-tuned (columns) layers", r)
    return fig
