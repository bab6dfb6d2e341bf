"""The change bars: 1 − CKA per sublayer by block, coloured by type, the verdict's sublayers named."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, cast

import numpy as np

from cka_geo.plotting.canvas import _decorate, _new_figure, _no_change_note
from cka_geo.plotting.layout import (
    CHANGE_FLOOR,
    _change_scale,
    _fmt_change,
    _groups,
    _sizes,
    _snap,
    _type_order,
    _within_block,
)
from cka_geo.plotting.results import _Parsed
from cka_geo.plotting.style import TYPE_COLORS, TYPE_LABELS
from cka_geo.plotting.view import View, mark_label, marks

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure


def _bar_positions(r: _Parsed) -> tuple[np.ndarray, list[tuple[float, str]]]:
    """x of each bar (a gap between blocks) and the centre and label of each block."""
    gap = 0.7
    x = np.empty(r.n)
    centres: list[tuple[float, str]] = []
    offset = 0.0
    for k, (start, stop, label) in enumerate(_groups(r)):
        if k:
            offset += gap
        x[start:stop] = np.arange(start, stop) + offset
        centres.append(((x[start] + x[stop - 1]) / 2, label))
    return x, centres


def _draw_bar_panel(
    ax: Axes,
    r: _Parsed,
    change: np.ndarray,
    bands: np.ndarray | None,
    title: str,
    label: str,
    named: list[tuple[str | None, list[str]]],
) -> bool:
    x, centres = _bar_positions(r)
    change = _snap(change)
    bands = _snap(bands) if bands is not None else None
    scale = _change_scale(change)
    colors = [TYPE_COLORS[t] for t in r.types]
    heights = change.copy()
    bottom = 0.0
    if scale == "log":
        bottom = CHANGE_FLOOR
        heights = np.maximum(heights, CHANGE_FLOOR) - CHANGE_FLOOR
    finite = np.isfinite(heights)
    width = 0.82
    ax.bar(
        x[finite],
        heights[finite],
        width=width,
        bottom=bottom,
        color=np.array(colors)[finite],
        linewidth=0,
        zorder=3,
    )
    if bands is not None and np.isfinite(bands).any():
        ok = np.isfinite(bands).all(axis=1) & np.isfinite(change)
        lo = np.minimum(bands[ok, 0], change[ok])
        hi = np.maximum(bands[ok, 1], change[ok])
        centre = change[ok]
        if scale == "log":
            lo, hi, centre = (np.maximum(v, CHANGE_FLOOR) for v in (lo, hi, centre))
        wide = hi > lo  # a zero-width interval would only draw caps on the bar's top
        ok[ok] = wide
        lo, hi, centre = lo[wide], hi[wide], centre[wide]
        ax.errorbar(
            x[ok],
            centre,
            yerr=np.vstack([centre - lo, hi - centre]),
            fmt="none",
            ecolor="#262626",
            elinewidth=0.6,
            capsize=1.2 if r.n <= 80 else 0,
            zorder=4,
        )
    nan_idx = np.flatnonzero(~np.isfinite(change))
    for j in nan_idx:
        ax.text(
            x[j],
            0.01,
            "NaN",
            rotation=90,
            ha="center",
            va="bottom",
            fontsize=6,
            color="#555555",
            transform=ax.get_xaxis_transform(),
        )
    if scale == "log":
        ax.set_yscale("log")
        top = float(np.nanmax(np.maximum(change, CHANGE_FLOOR))) if finite.any() else 1.0
        ax.set_ylim(CHANGE_FLOOR, top * 12)
        ax.set_ylabel(f"{label}\n(log scale)")
    else:
        ax.axhline(0, color="black", linewidth=0.6, zorder=2)
        ax.set_ylabel(label)
    drawn = [(name, kinds) for name, kinds in named if name is not None]
    if not drawn:
        if scale == "linear":
            ax.set_ylim(-0.05, 1.0)
        _no_change_note(ax, r)
    for k, (name, kinds) in enumerate(drawn):
        i = r.layers.index(name) if name in r.layers else None
        if i is None or not np.isfinite(change[i]):
            ax.text(
                0.01,
                0.97 - 0.1 * k,
                f"{mark_label(name, kinds)} (not drawn)",
                transform=ax.transAxes,
                ha="left",
                va="top",
                fontsize=7.5,
            )
            continue
        top_y = max(change[i], CHANGE_FLOOR) if scale == "log" else change[i]
        ax.bar(
            [x[i]],
            [heights[i]],
            width=width,
            bottom=bottom,
            color=colors[i],
            edgecolor="black",
            linewidth=1.0,
            zorder=4,
        )
        ax.annotate(
            mark_label(name, kinds, f"1 − CKA = {_fmt_change(float(change[i]))}"),
            xy=(x[i], top_y),
            xytext=(0, 10 + 26 * k),
            textcoords="offset points",
            ha="center",
            va="bottom",
            fontsize=7.5,
            arrowprops={
                "arrowstyle": "-|>",
                "color": "black",
                "linewidth": 0.8,
                "shrinkA": 0,
                "shrinkB": 1,
            },
            bbox={
                "boxstyle": "round,pad=0.2",
                "facecolor": "white",
                "edgecolor": "#999999",
                "linewidth": 0.5,
            },
            zorder=6,
        )
    if drawn and scale == "linear":
        lo, hi = ax.get_ylim()
        ax.set_ylim(min(lo, 0.0), hi + (0.35 + 0.2 * (len(drawn) - 1)) * (hi - min(lo, 0.0)))
    ax.set_title(title, loc="left")
    max_labels = max(8, int(cast("Figure", ax.figure).get_figwidth() * 4))
    step = max(1, math.ceil(len(centres) / max_labels))
    ax.set_xticks([c for c, _ in centres][::step], [lab for _, lab in centres][::step])
    ax.tick_params(axis="x", length=0)
    ax.set_xlim(x.min() - 0.8, x.max() + 0.8)
    ax.grid(axis="y", color="#E5E5E5", linewidth=0.6, which="major")
    ax.set_axisbelow(True)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    return scale == "log"


def _draw_bars(r: _Parsed, dpi: int, view: View | None = None) -> Figure:
    from matplotlib.patches import Patch

    fig = _new_figure(_sizes(r)["change_bars"], dpi)
    panels = 2 if r.own is not None else 1
    axes = fig.subplots(panels, 1, sharex=True, squeeze=False)[:, 0]
    named = marks(r)
    most, first = named["most_changed"], named["first_changed"]
    same_bands = 1.0 - r.intervals[:, ::-1] if r.intervals is not None else None
    logs = [
        _draw_bar_panel(
            axes[0],
            r,
            1.0 - r.diagonal,
            same_bands,
            "(a) Same-layer change, 1 − CKA(pre, fine-tuned): higher = more change\n"
            "      includes every change upstream of the layer",
            "1 − CKA",
            [
                (most, ["most changed"] + (["first to move"] if first == most else [])),
                (first if first != most else None, ["first to move"]),
            ],
        )
    ]
    if r.own is not None:
        own_bands = 1.0 - r.own_intervals[:, ::-1] if r.own_intervals is not None else None
        logs.append(
            _draw_bar_panel(
                axes[1],
                r,
                1.0 - r.own,
                own_bands,
                "(b) Own change of each sublayer, 1 − CKA: higher = more change\n"
                "      fine-tuned sublayer applied to the pretrained input",
                "1 − CKA",
                [(named["largest_own_change"], ["largest own change"])],
            )
        )
    within = _within_block(r)
    axes[-1].set_xlabel(f"block  (bars within a block: {within})" if within else "layer")
    types = _type_order(r)
    handles = [Patch(color=TYPE_COLORS[t], label=TYPE_LABELS.get(t, "other")) for t in types]
    fig.legend(
        handles=handles,
        loc="outside upper center",
        ncols=len(handles),
        handlelength=1.2,
        columnspacing=1.4,
    )
    note = f"log axes: changes ≤ {CHANGE_FLOOR:g} not drawn" if any(logs) else ""
    _decorate(fig, None, r, note)
    return fig
