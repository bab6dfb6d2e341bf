"""The depth profile: same-layer and own change (1 − CKA) against block index, a line per type."""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

import numpy as np

from cka_geo.plotting.canvas import _decorate, _new_figure, _no_change_note
from cka_geo.plotting.layout import CHANGE_FLOOR, _change_scale, _sizes, _snap, _type_order
from cka_geo.plotting.results import _Parsed
from cka_geo.plotting.style import _LINESTYLES, _MARKERS, TYPE_COLORS, TYPE_LABELS
from cka_geo.plotting.view import View, mark_label, marks

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure


def _depth_xaxis(ax: Axes, r: _Parsed) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True, nbins=min(r.n_blocks, 16)))
    blocks = [b for b in r.blocks if b is not None]
    if blocks:
        ax.set_xlim(min(blocks) - 0.4, max(blocks) + 0.4)
    ax.grid(axis="y", color="#E5E5E5", linewidth=0.6)
    ax.set_axisbelow(True)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)


def _series(
    r: _Parsed, values: np.ndarray, bands: np.ndarray | None, t: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    idx = [i for i in range(r.n) if r.types[i] == t and r.blocks[i] is not None]
    idx.sort(key=lambda i: r.blocks[i])  # type: ignore[arg-type, return-value]
    x = np.array([r.blocks[i] for i in idx], dtype=float)
    y = values[idx]
    b = bands[idx] if bands is not None else None
    return x, y, b


def _mark_extreme(ax: Axes, x: float, y: float, text: str, *, above: bool, rank: int = 0) -> None:
    """Circle the point (x, y) and label it; the label stays inside the axes at the edges.

    ``rank`` stacks a second label higher than the first, so that two marks do not collide.
    """
    left, right = ax.get_xlim()
    frac = (x - left) / (right - left) if right != left else 0.5
    ha, dx = ("right", 6) if frac > 0.85 else ("left", -6) if frac < 0.15 else ("center", 0)
    ax.plot(
        [x],
        [y],
        marker="o",
        markersize=10,
        markerfacecolor="none",
        markeredgecolor="black",
        markeredgewidth=1.0,
        zorder=5,
    )
    ax.annotate(
        text,
        xy=(x, y),
        xytext=(dx, (14 + 22 * rank) if above else -14 - 22 * rank),
        textcoords="offset points",
        ha=ha,
        va="bottom" if above else "top",
        fontsize=7.5,
        bbox={
            "boxstyle": "round,pad=0.2",
            "facecolor": "white",
            "edgecolor": "none",
            "alpha": 0.85,
        },
        zorder=6,
    )


def _fill(ax: Axes, x: np.ndarray, band: np.ndarray | None, color: str) -> None:
    if band is None or not np.isfinite(band).any():
        return
    ok = np.isfinite(band).all(axis=1)
    ax.fill_between(
        x, band[:, 0], band[:, 1], where=ok, color=color, alpha=0.18, linewidth=0, zorder=2
    )


def _change_panel(
    ax: Axes,
    r: _Parsed,
    change: np.ndarray,
    bands: np.ndarray | None,
    named: list[tuple[str | None, list[str]]],
    types: list[str],
    legend: bool,
) -> bool:
    """One panel of 1 − CKA against depth, a line per type; the verdict's sublayers circled.

    Returns whether the axis is logarithmic.
    """
    canonical = [i for i in range(r.n) if r.blocks[i] is not None]
    _depth_xaxis(ax, r)
    change = _snap(change)
    bands = _snap(bands) if bands is not None else None
    values = change[canonical] if canonical else change
    log = _change_scale(values) == "log"
    for t in types:
        x, y, band = _series(r, change, bands, t)
        if log:
            y = np.maximum(y, CHANGE_FLOOR)
            band = np.maximum(band, CHANGE_FLOOR) if band is not None else None
        ax.plot(
            x,
            y,
            label=TYPE_LABELS[t] if legend else "_nolegend_",
            color=TYPE_COLORS[t],
            marker=_MARKERS[t],
            linestyle=_LINESTYLES[t],
            zorder=3,
        )
        _fill(ax, x, band, TYPE_COLORS[t])
    top = float(np.nanmax(values)) if np.isfinite(values).any() else 0.0
    if log:
        ax.set_yscale("log")
        ax.set_ylim(CHANGE_FLOOR / 1.5, top * 30)
        ax.set_ylabel("1 − CKA  (log scale)")
    else:
        ax.set_ylabel("1 − CKA")
        ax.ticklabel_format(axis="y", useOffset=False)
        if top > 0:
            ax.set_ylim(min(0.0, float(np.nanmin(values))) - 0.04 * top, top * 1.45)
        else:
            ax.set_ylim(-0.05, 1.0)
    said = []
    for k, (name, kinds) in enumerate(named):
        if name is None:
            continue
        i = r.layers.index(name) if name in r.layers else None
        if i is None or r.blocks[i] is None or not np.isfinite(change[i]):
            said.append(f"{mark_label(name, kinds)} (not on the depth axis)")
            continue
        y_mark = max(float(change[i]), CHANGE_FLOOR) if log else float(change[i])
        _mark_extreme(ax, float(cast("int", r.blocks[i])), y_mark, mark_label(name, kinds), above=True, rank=k)
    if not any(name for name, _ in named):
        _no_change_note(ax, r)
    elif said:
        ax.text(0.01, 0.97, "\n".join(said), transform=ax.transAxes, ha="left", va="top", fontsize=7.5)
    _depth_xaxis(ax, r)
    return log


def _draw_depth(r: _Parsed, dpi: int, view: View | None = None) -> Figure:
    fig = _new_figure(_sizes(r)["depth_profile"], dpi)
    panels = 2 if r.own is not None else 1
    axes = fig.subplots(panels, 1, sharex=True, squeeze=False)[:, 0]
    types = [t for t in _type_order(r) if t != "other"]
    named = marks(r)
    most, first = named["most_changed"], named["first_changed"]
    same_marks: list[tuple[str | None, list[str]]] = [
        (most, ["most changed"] + (["first to move"] if first == most else [])),
        (first if first != most else None, ["first to move"]),
    ]
    # (a) same-layer change, 1 − CKA (noise within the floor drawn at 0)
    bands = 1.0 - r.intervals[:, ::-1] if r.intervals is not None else None
    logs = [_change_panel(axes[0], r, 1.0 - r.diagonal, bands, same_marks, types, legend=True)]
    axes[0].set_title(
        "(a) Same-layer change, 1 − CKA(pre, fine-tuned): higher = more change\n"
        "      includes every change upstream of the layer",
        loc="left",
    )
    if not any(b is not None for b in r.blocks):
        axes[0].text(
            0.5,
            0.5,
            "no canonical blocks.{i} layers to place on depth",
            ha="center",
            va="center",
            transform=axes[0].transAxes,
        )
    # (b) own change, 1 − CKA
    if r.own is not None:
        own_bands = 1.0 - r.own_intervals[:, ::-1] if r.own_intervals is not None else None
        own_marks: list[tuple[str | None, list[str]]] = [(named["largest_own_change"], ["largest own change"])]
        logs.append(_change_panel(axes[1], r, 1.0 - r.own, own_bands, own_marks, types, legend=False))
        axes[1].set_title(
            "(b) Own change of each sublayer, 1 − CKA: higher = more change\n"
            "      fine-tuned sublayer applied to the pretrained input",
            loc="left",
        )
    axes[-1].set_xlabel("block index")
    fig.legend(
        loc="outside upper center", ncols=max(1, len(types)), handlelength=2.4, columnspacing=1.4
    )
    note = f"log axes: changes ≤ {CHANGE_FLOOR:g} at the axis floor" if any(logs) else ""
    _decorate(fig, None, r, note)
    return fig
