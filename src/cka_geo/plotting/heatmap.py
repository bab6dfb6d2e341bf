"""The heatmap: the full L × L CKA matrix, pretrained rows against fine-tuned columns."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

from cka_geo.plotting.canvas import _decorate, _new_figure
from cka_geo.plotting.layout import _groups, _sizes, _within_block
from cka_geo.plotting.results import _Parsed
from cka_geo.plotting.style import _NAN_COLOR, _NAN_HATCH_COLOR, _SHORT

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def _draw_matrix(r: _Parsed, dpi: int) -> Figure:
    import matplotlib
    from matplotlib.patches import Patch
    from matplotlib.ticker import FixedLocator

    fig = _new_figure(_sizes(r)["heatmap"], dpi)
    ax = fig.add_subplot()
    n = r.n
    data = np.ma.masked_invalid(r.matrix)
    finite = r.matrix[np.isfinite(r.matrix)]
    vmin = min(0.0, float(finite.min())) if finite.size else 0.0
    vmax = max(1.0, float(finite.max())) if finite.size else 1.0
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad=(0.0, 0.0, 0.0, 0.0))
    edges = np.arange(n + 1)
    mesh = ax.pcolormesh(
        edges,
        edges,
        data,
        cmap=cmap,
        vmin=vmin,
        vmax=vmax,
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
    cbar = fig.colorbar(mesh, ax=ax, shrink=0.85, pad=0.02, aspect=30)
    cbar.set_label("CKA")
    cbar.outline.set_linewidth(0.6)
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
    _decorate(fig, "CKA between pretrained (rows) and fine-tuned (columns) layers", r)
    return fig
