"""The depth profile: same-layer CKA and own change against block index, a line per type."""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

import numpy as np

from cka_geo.plotting.canvas import _decorate, _new_figure, _no_change_note
from cka_geo.plotting.layout import CHANGE_FLOOR, _change_scale, _sizes, _snap, _type_order
from cka_geo.plotting.results import _Parsed
from cka_geo.plotting.style import _LINESTYLES, _MARKERS, TYPE_COLORS, TYPE_LABELS

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


def _mark_extreme(ax: Axes, x: float, y: float, text: str, *, above: bool) -> None:
    """Circle the point (x, y) and label it; the label stays inside the axes at the edges."""
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
        xytext=(dx, 14 if above else -14),
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


def _draw_depth(r: _Parsed, dpi: int) -> Figure:
    fig = _new_figure(_sizes(r)["depth_profile"], dpi)
    panels = 2 if r.own is not None else 1
    axes = fig.subplots(panels, 1, sharex=True, squeeze=False)[:, 0]
    types = [t for t in _type_order(r) if t != "other"]
    canonical = [i for i in range(r.n) if r.blocks[i] is not None]

    # (a) same-layer CKA (noise within the floor of 1 drawn at 1)
    ax = axes[0]
    _depth_xaxis(ax, r)
    cka = 1.0 - _snap(1.0 - r.diagonal)
    cka_bands = 1.0 - _snap(1.0 - r.intervals) if r.intervals is not None else None
    for t in types:
        x, y, band = _series(r, cka, cka_bands, t)
        style = {"color": TYPE_COLORS[t], "marker": _MARKERS[t], "linestyle": _LINESTYLES[t]}
        ax.plot(x, y, label=TYPE_LABELS[t], **style, zorder=3)
        _fill(ax, x, band, TYPE_COLORS[t])
    shown = np.concatenate(
        [cka[canonical], *(() if cka_bands is None else (cka_bands[canonical].ravel(),))]
    )
    shown = shown[np.isfinite(shown)]
    points = cka[canonical]
    changed = bool(np.isfinite(points).any()) and float(np.nanmin(points)) < 1.0
    if changed:
        lo, hi = float(shown.min()), max(1.0, float(shown.max()))
        pad = 0.06 * (hi - lo)
        ax.set_ylim(lo - 3 * pad, hi + pad)  # room below for the label of the lowest point
        i = canonical[int(np.nanargmin(cka[canonical]))]
        _mark_extreme(
            ax,
            float(cast("int", r.blocks[i])),
            float(cka[i]),  # type: ignore[arg-type]
            f"lowest: {r.layers[i]}",
            above=False,
        )
    else:
        ax.set_ylim(0.9, 1.01)
        if canonical:
            _no_change_note(ax, r)
    ax.ticklabel_format(axis="y", useOffset=False)
    ax.set_ylabel("CKA(pre, fine-tuned)")
    ax.set_title(
        "(a) Same-layer CKA(pre, fine-tuned): lower = more change\n"
        "      includes every change upstream of the layer",
        loc="left",
    )
    _depth_xaxis(ax, r)
    if not canonical:
        ax.text(
            0.5,
            0.5,
            "no canonical blocks.{i} layers to place on depth",
            ha="center",
            va="center",
            transform=ax.transAxes,
        )

    # (b) own change, 1 − CKA
    log_own = False
    if r.own is not None:
        ax = axes[1]
        _depth_xaxis(ax, r)
        change = _snap(1.0 - r.own)
        bands = _snap(1.0 - r.own_intervals[:, ::-1]) if r.own_intervals is not None else None
        scale = _change_scale(change[canonical] if canonical else change)
        log_own = scale == "log"
        for t in types:
            x, y, band = _series(r, change, bands, t)
            if log_own:
                y = np.maximum(y, CHANGE_FLOOR)
                band = np.maximum(band, CHANGE_FLOOR) if band is not None else None
            style = {"color": TYPE_COLORS[t], "marker": _MARKERS[t], "linestyle": _LINESTYLES[t]}
            ax.plot(x, y, **style, zorder=3)
            _fill(ax, x, band, TYPE_COLORS[t])
        values = change[canonical] if canonical else change
        any_change = bool(np.isfinite(values).any()) and float(np.nanmax(values)) > 0
        if log_own:
            ax.set_yscale("log")
            ax.set_ylim(CHANGE_FLOOR / 1.5, float(np.nanmax(values)) * 8)
            ax.set_ylabel("1 − CKA  (log scale)")
        else:
            ax.set_ylabel("1 − CKA")
            ax.ticklabel_format(axis="y", useOffset=False)
        if any_change and canonical:
            i = canonical[int(np.nanargmax(change[canonical]))]
            y_mark = max(float(change[i]), CHANGE_FLOOR) if log_own else float(change[i])
            _mark_extreme(
                ax,
                float(cast("int", r.blocks[i])),
                y_mark,  # type: ignore[arg-type]
                f"largest: {r.layers[i]}",
                above=True,
            )
            if not log_own:
                lo, hi = ax.get_ylim()
                ax.set_ylim(lo, hi + 0.2 * (hi - lo))
        elif canonical:
            ax.set_ylim(-0.05, 1.0)
            _no_change_note(ax, r)
        ax.set_title(
            "(b) Own change of each sublayer, 1 − CKA: higher = more change\n"
            "      fine-tuned sublayer applied to the pretrained input",
            loc="left",
        )
        _depth_xaxis(ax, r)
    axes[-1].set_xlabel("block index")
    fig.legend(
        loc="outside upper center", ncols=max(1, len(types)), handlelength=2.4, columnspacing=1.4
    )
    note = f"(b): own changes ≤ {CHANGE_FLOOR:g} at the axis floor" if log_own else ""
    _decorate(fig, None, r, note)
    return fig
