"""Figures of a comparison: the CKA heatmap, the depth profile and the change bars.

Everything here reads the dict that ``cka-geo compare`` writes as ``results.json`` (schema
``cka-geo/compare/v1``) and draws publication-ready figures with matplotlib's Agg backend:
vector PDF/SVG or PNG at a set dpi, colour-blind-safe colours (Okabe & Ito for the sublayer
types, viridis for the heatmap), a distinct marker per sublayer type so the figures survive
grey-scale printing, and sizes that grow with the depth of the model.

matplotlib is imported inside the functions that draw, never at module level, so that
``import cka_geo`` (and the CLI's parser) stay light.

Example:
    >>> from cka_geo.plotting import load_results, plot_all  # doctest: +SKIP
    >>> plot_all(load_results("out/results.json"), "out", formats=("png", "pdf"))  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cka_geo.atomic import atomic_path
from cka_geo.errors import CkaGeoError, DataError, UsageError

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

SCHEMA = "cka-geo/compare/v1"
"""The ``schema`` value of a results file this module reads."""

DPI = 300
"""Default resolution of PNG output, in dots per inch."""

FORMATS = ("png", "pdf", "svg")
"""Output formats :func:`plot_all` and the ``plot`` command accept."""

FIGURES = ("heatmap", "depth_profile", "change_bars")
"""File stems of the figures :func:`plot_all` writes, in order."""

CHANGE_FLOOR = 1e-6
"""On a logarithmic change axis, changes (1 − CKA) below this are treated as nil."""

SUBLAYER_TYPES = ("attn", "fc1", "act", "fc2", "block")
"""Sublayer types in their order inside a block."""

TYPE_LABELS = {
    "attn": "attn",
    "fc1": "mlp.fc1",
    "act": "mlp.act",
    "fc2": "mlp.fc2",
    "block": "block out",
}
"""Legend label of each sublayer type."""

# Okabe & Ito (2008) colour-blind-safe palette; fc1, the sublayer the product's question is
# about, gets the most salient colour.
TYPE_COLORS = {
    "attn": "#0072B2",  # blue
    "fc1": "#D55E00",  # vermillion
    "act": "#CC79A7",  # reddish purple
    "fc2": "#009E73",  # bluish green
    "block": "#4D4D4D",  # dark grey
    "other": "#E69F00",  # orange
}
"""Colour of each sublayer type (Okabe–Ito palette)."""

_MARKERS = {"attn": "o", "fc1": "s", "act": "^", "fc2": "D", "block": "v", "other": "x"}
_LINESTYLES = {"attn": "-", "fc1": "-", "act": "--", "fc2": "-", "block": ":", "other": "-"}
_SHORT = {"attn": "attn", "fc1": "fc1", "act": "act", "fc2": "fc2", "block": "out"}
_NAME_RE = re.compile(r"^blocks\.(\d+)(?:\.(attn|mlp\.fc1|mlp\.act|mlp\.fc2))?$")
_SUFFIX_TYPE = {None: "block", "attn": "attn", "mlp.fc1": "fc1", "mlp.act": "act", "mlp.fc2": "fc2"}
_NAN_COLOR = "#D9D9D9"
_NAN_HATCH_COLOR = "#8C8C8C"

_RC = {
    "font.size": 9,
    "axes.titlesize": 9,
    "axes.labelsize": 9,
    "xtick.labelsize": 8,
    "ytick.labelsize": 8,
    "legend.fontsize": 8,
    "legend.frameon": False,
    "axes.linewidth": 0.8,
    "xtick.major.width": 0.8,
    "ytick.major.width": 0.8,
    "xtick.minor.width": 0.5,
    "ytick.minor.width": 0.5,
    "lines.linewidth": 1.4,
    "lines.markersize": 4,
    "hatch.linewidth": 0.6,
    "pdf.fonttype": 42,  # embed TrueType: text stays editable in the PDF
    "ps.fonttype": 42,
    "svg.fonttype": "none",
    "figure.constrained_layout.h_pad": 0.04,
    "figure.constrained_layout.w_pad": 0.04,
}


# --------------------------------------------------------------------------------------
# Reading and validating results
# --------------------------------------------------------------------------------------


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

    @property
    def n(self) -> int:
        return len(self.layers)

    @property
    def n_blocks(self) -> int:
        return len({b for b in self.blocks if b is not None}) or 1


def _number(value: Any, where: str, source: str) -> float:
    """A float from a JSON value (``None`` is NaN); a one-line DataError otherwise."""
    if value is None:
        return math.nan
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise DataError(f"{source}: {where} is {value!r}, expected a number or null")
    return float(value)


def _per_layer(mapping: Any, layers: Sequence[str], key: str, source: str) -> np.ndarray | None:
    """Values of ``mapping[layer]`` in layer order (NaN where missing); None if no mapping."""
    if mapping is None:
        return None
    if not isinstance(mapping, Mapping):
        raise DataError(f"{source}: '{key}' must be an object of layer -> value")
    unknown = sorted(set(mapping) - set(layers))
    if unknown:
        raise DataError(f"{source}: '{key}' names {unknown[0]!r}, which is not in 'layers'")
    return np.array(
        [_number(mapping.get(name), f"{key}[{name!r}]", source) for name in layers], dtype=float
    )


def _per_layer_intervals(
    mapping: Any, layers: Sequence[str], key: str, source: str
) -> np.ndarray | None:
    """``[lo, hi]`` pairs in layer order (NaN rows where missing or null)."""
    if mapping is None:
        return None
    if not isinstance(mapping, Mapping):
        raise DataError(f"{source}: '{key}' must be an object of layer -> [lo, hi]")
    unknown = sorted(set(mapping) - set(layers))
    if unknown:
        raise DataError(f"{source}: '{key}' names {unknown[0]!r}, which is not in 'layers'")
    out = np.full((len(layers), 2), np.nan)
    for i, name in enumerate(layers):
        pair = mapping.get(name)
        if pair is None:
            continue
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            raise DataError(f"{source}: {key}[{name!r}] is {pair!r}, expected [lo, hi] or null")
        out[i] = [_number(v, f"{key}[{name!r}]", source) for v in pair]
    return out


def _parse(results: Any, source: str = "results") -> _Parsed:
    """Validate a results dict and turn it into arrays; DataError naming ``source``."""
    if not isinstance(results, Mapping):
        raise DataError(f"{source}: expected a JSON object, got {type(results).__name__}")
    schema = results.get("schema")
    if schema != SCHEMA:
        raise DataError(f"{source}: schema is {schema!r}, expected {SCHEMA!r}")
    layers = results.get("layers")
    if (
        not isinstance(layers, list)
        or not layers
        or not all(isinstance(name, str) for name in layers)
    ):
        raise DataError(f"{source}: 'layers' must be a non-empty list of layer names")
    if len(set(layers)) != len(layers):
        dup = next(name for name in layers if layers.count(name) > 1)
        raise DataError(f"{source}: layer {dup!r} appears twice in 'layers'")
    n = len(layers)
    rows = results.get("matrix")
    if not isinstance(rows, list) or len(rows) != n:
        got = len(rows) if isinstance(rows, list) else type(rows).__name__
        raise DataError(f"{source}: 'matrix' must have {n} rows (one per layer), got {got}")
    matrix = np.empty((n, n))
    for i, row in enumerate(rows):
        if not isinstance(row, list) or len(row) != n:
            got = len(row) if isinstance(row, list) else type(row).__name__
            raise DataError(f"{source}: matrix row {i} must have {n} entries, got {got}")
        matrix[i] = [_number(v, f"matrix[{i}][{j}]", source) for j, v in enumerate(row)]

    diagonal = _per_layer(results.get("diagonal"), layers, "diagonal", source)
    if diagonal is None:
        diagonal = np.diag(matrix).copy()
    else:  # a layer the diagonal omits falls back to the matrix
        diagonal = np.where(np.isnan(diagonal), np.diag(matrix), diagonal)
    intervals = _per_layer_intervals(results.get("intervals"), layers, "intervals", source)
    own = _per_layer(results.get("own_change"), layers, "own_change", source)
    own_intervals = _per_layer_intervals(
        results.get("own_change_intervals"), layers, "own_change_intervals", source
    )
    if own is not None and np.isnan(own).all():
        own, own_intervals = None, None

    blocks: list[int | None] = []
    types: list[str] = []
    for name in layers:
        m = _NAME_RE.match(name)
        blocks.append(int(m.group(1)) if m else None)
        types.append(_SUFFIX_TYPE[m.group(2)] if m else "other")
    settings = results.get("settings")
    summary = results.get("summary")
    return _Parsed(
        layers=list(layers),
        matrix=matrix,
        diagonal=diagonal,
        intervals=intervals,
        own=own,
        own_intervals=own_intervals,
        blocks=blocks,
        types=types,
        settings=dict(settings) if isinstance(settings, Mapping) else {},
        summary=dict(summary) if isinstance(summary, Mapping) else {},
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


def load_results(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and validate a ``results.json`` written by ``cka-geo compare``.

    Args:
        path: The JSON file.

    Returns:
        The parsed dict, unchanged (``null`` stays ``None``).

    Raises:
        UsageError: The path does not exist or is a directory.
        DataError: The file is not valid UTF-8 JSON, or not a ``cka-geo/compare/v1`` result
            (wrong schema, matrix shape not matching the layers, non-numeric entries).
    """
    p = Path(path)
    if not p.exists():
        raise UsageError(f"{p}: no such results file")
    if p.is_dir():
        raise UsageError(f"{p}: is a directory, expected a results.json file")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{p}: not a UTF-8 JSON file ({exc.reason})") from None
    except OSError as exc:
        raise DataError(f"{p}: cannot read ({exc.strerror or exc})") from None
    try:
        results = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(
            f"{p}: invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}"
        ) from None
    _parse(results, str(p))
    return results


# --------------------------------------------------------------------------------------
# Layout helpers
# --------------------------------------------------------------------------------------


def _quarter(x: float) -> float:
    """Round to a quarter inch: an exact binary fraction, so inches × dpi is exact."""
    return round(x * 4) / 4


def _clamp(x: float, lo: float, hi: float) -> float:
    return min(max(x, lo), hi)


def figure_sizes(results: Mapping[str, Any]) -> dict[str, tuple[float, float]]:
    """The size in inches of each figure :func:`plot_all` draws for ``results``.

    Sizes grow with the number of layers and blocks, within bounds that fit a page, and
    are multiples of a quarter inch, so at a dpi divisible by 4 a PNG is exactly
    ``width × dpi`` by ``height × dpi`` pixels (else within a pixel).

    Args:
        results: A ``cka-geo/compare/v1`` dict.

    Returns:
        ``{"heatmap": (w, h), "depth_profile": (w, h), "change_bars": (w, h)}``.
    """
    return _sizes(_parse(results))


def _sizes(r: _Parsed) -> dict[str, tuple[float, float]]:
    side = _clamp(3.25 + 0.075 * r.n, 4.0, 9.0)
    panels = 2 if r.own is not None else 1
    return {
        "heatmap": (_quarter(side + 1.25), _quarter(side + 0.75)),
        "depth_profile": (
            _quarter(_clamp(4.0 + 0.22 * r.n_blocks, 6.0, 10.0)),
            _quarter(0.75 + 2.5 * panels),
        ),
        "change_bars": (
            _quarter(_clamp(3.0 + 0.08 * r.n, 6.5, 11.0)),
            _quarter(0.9 + 2.4 * panels),
        ),
    }


def _groups(r: _Parsed) -> list[tuple[int, int, str]]:
    """Contiguous runs of layers that share a block: (start, stop, label)."""
    out: list[tuple[int, int, str]] = []
    start = 0
    for i in range(1, r.n + 1):
        if i == r.n or r.blocks[i] is None or r.blocks[i] != r.blocks[start]:
            b = r.blocks[start]
            out.append((start, i, str(b) if b is not None else r.layers[start]))
            start = i
    return out


def _type_order(r: _Parsed) -> list[str]:
    present = set(r.types)
    return [t for t in (*SUBLAYER_TYPES, "other") if t in present]


def _within_block(r: _Parsed) -> str:
    """'attn, fc1, fc2, out': the order of sublayers inside a block, as the results have it."""
    seen: list[str] = []
    for t in r.types:
        if t != "other" and t not in seen:
            seen.append(t)
    return ", ".join(_SHORT[t] for t in seen)


def _settings_line(r: _Parsed, n_pairs: bool = False) -> str:
    """A short provenance line: kernel, estimator, pooling, samples, confidence."""
    s = r.settings
    parts: list[str] = []
    kernel = s.get("kernel")
    if kernel:
        frac = s.get("rbf_frac")
        if str(kernel).lower() == "rbf" and frac is not None:
            parts.append(f"RBF kernel (σ = {frac:g} × median distance)")
        else:
            parts.append(f"{kernel} kernel")
    if s.get("estimator"):
        parts.append(f"{s['estimator']} estimator")
    if s.get("pooling"):
        parts.append(f"{s['pooling']} pooling")
    if s.get("samples") is not None:
        parts.append(f"n = {s['samples']}")
    has_ci = (r.intervals is not None and np.isfinite(r.intervals).any()) or (
        r.own_intervals is not None and np.isfinite(r.own_intervals).any()
    )
    if has_ci:
        conf = s.get("confidence")
        level = f"{100 * conf:g} % " if isinstance(conf, (int, float)) else ""
        parts.append(f"bands: {level}bootstrap CI")
    return " · ".join(parts)


def _change_scale(values: np.ndarray) -> str:
    """'log' when the changes above the floor span more than two decades, else 'linear'."""
    v = values[np.isfinite(values) & (values > CHANGE_FLOOR)]
    if v.size < 2:
        return "linear"
    return "log" if v.max() / v.min() > 100.0 else "linear"


def _fmt_change(x: float) -> str:
    if not math.isfinite(x):
        return "n/a"
    if x != 0 and (abs(x) < 1e-3 or abs(x) >= 1e3):
        mant, exp = f"{x:.1e}".split("e")
        return f"{mant}×10$^{{{int(exp)}}}$"
    return f"{x:.3g}"


# --------------------------------------------------------------------------------------
# Drawing
# --------------------------------------------------------------------------------------


def _import_matplotlib() -> Any:
    try:
        import matplotlib
    except ImportError:  # pragma: no cover - the plot extra is missing
        raise CkaGeoError("plotting needs matplotlib: pip install 'cka-geo[plot]'") from None
    return matplotlib


def _new_figure(size: tuple[float, float], dpi: int) -> Figure:
    """A pyplot-free Agg figure with constrained layout (the size never changes)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _decorate(fig: Figure, title: str | None, r: _Parsed, note: str = "") -> None:
    """An optional short bold title on top; settings and ``note`` as a small grey footnote."""
    if title:  # (figures with a legend on top go without: constrained layout would overlap them)
        fig.suptitle(title, fontsize=10, fontweight="bold")
    line = " · ".join(part for part in (_settings_line(r), note) if part)
    if line:
        import textwrap

        # wrap to the figure's width (about 0.55 em per character at 7 pt)
        chars = max(40, int(fig.get_figwidth() * 72 / (0.55 * 7)) - 4)
        fig.supxlabel(textwrap.fill(line, chars), fontsize=7, color="#555555")


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
        axis.set_minor_locator(FixedLocator(np.arange(n) + 0.5))
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


def _snap(change: np.ndarray) -> np.ndarray:
    """Changes (1 − CKA) within ±CHANGE_FLOOR of zero are estimator noise: drawn as 0."""
    out = np.array(change, dtype=float)
    out[np.abs(out) <= CHANGE_FLOOR] = 0.0
    return out


def _no_change_note(ax: Axes, r: _Parsed) -> None:
    """Say in the panel that nothing changed, instead of pointing at noise."""
    text = f"no change: |1 − CKA| ≤ {CHANGE_FLOOR:g} at every layer"
    if r.summary.get("identical"):
        text += "\n(the two encoders are identical)"
    ax.text(
        0.5,
        0.6,
        text,
        transform=ax.transAxes,
        ha="center",
        va="center",
        fontsize=8,
        color="#333333",
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
            float(r.blocks[i]),
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
                float(r.blocks[i]),
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
) -> None:
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
    for i in nan_idx:
        ax.text(
            x[i],
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
    if not (finite.any() and np.nanmax(change) > 0):
        if scale == "linear":
            ax.set_ylim(-0.05, 1.0)
        _no_change_note(ax, r)
    else:
        i = int(np.nanargmax(change))
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
            f"largest: {r.layers[i]}\n1 − CKA = {_fmt_change(float(change[i]))}",
            xy=(x[i], top_y),
            xytext=(0, 10),
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
        if scale == "linear":
            lo, hi = ax.get_ylim()
            ax.set_ylim(min(lo, 0.0), hi + 0.35 * (hi - min(lo, 0.0)))
    ax.set_title(title, loc="left")
    max_labels = max(8, int(ax.figure.get_figwidth() * 4))
    step = max(1, math.ceil(len(centres) / max_labels))
    ax.set_xticks([c for c, _ in centres][::step], [lab for _, lab in centres][::step])
    ax.tick_params(axis="x", length=0)
    ax.set_xlim(x.min() - 0.8, x.max() + 0.8)
    ax.grid(axis="y", color="#E5E5E5", linewidth=0.6, which="major")
    ax.set_axisbelow(True)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    return scale == "log"


def _draw_bars(r: _Parsed, dpi: int) -> Figure:
    from matplotlib.patches import Patch

    fig = _new_figure(_sizes(r)["change_bars"], dpi)
    panels = 2 if r.own is not None else 1
    axes = fig.subplots(panels, 1, sharex=True, squeeze=False)[:, 0]
    same_bands = 1.0 - r.intervals[:, ::-1] if r.intervals is not None else None
    logs = [
        _draw_bar_panel(
            axes[0],
            r,
            1.0 - r.diagonal,
            same_bands,
            "(a) Same-layer change, 1 − CKA(pre, fine-tuned)\n"
            "      includes every change upstream of the layer",
            "1 − CKA",
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
                "(b) Own change of each sublayer, 1 − CKA\n"
                "      fine-tuned sublayer applied to the pretrained input",
                "1 − CKA",
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


_DRAW = {"heatmap": _draw_matrix, "depth_profile": _draw_depth, "change_bars": _draw_bars}


# --------------------------------------------------------------------------------------
# Saving
# --------------------------------------------------------------------------------------


def _check_format(fmt: str) -> str:
    f = str(fmt).lower().lstrip(".")
    if f not in FORMATS:
        raise UsageError(f"unknown figure format {fmt!r}; choose from {', '.join(FORMATS)}")
    return f


def _check_dpi(dpi: int) -> int:
    if isinstance(dpi, bool) or not isinstance(dpi, int) or not 10 <= dpi <= 2400:
        raise UsageError(f"--dpi must be an integer between 10 and 2400, got {dpi!r}")
    return dpi


def _metadata(fmt: str) -> dict[str, Any]:
    # No timestamps: the same results give the same vector files.
    if fmt == "pdf":
        return {"Creator": "cka-geo", "CreationDate": None}
    if fmt == "svg":
        return {"Creator": "cka-geo", "Date": None}
    return {"Software": "cka-geo"}


def _render(name: str, r: _Parsed, dest: Path, fmt: str, dpi: int) -> None:
    """Draw figure ``name`` and save it to ``dest`` (already a temporary path)."""
    matplotlib = _import_matplotlib()
    with matplotlib.rc_context(_RC):
        fig = _DRAW[name](r, dpi)
        fig.savefig(dest, format=fmt, dpi=dpi, metadata=_metadata(fmt))


def figures(
    results: Mapping[str, Any], *, dpi: int = 100, names: Sequence[str] = FIGURES
) -> dict[str, Figure]:
    """The figures as matplotlib ``Figure`` objects, for notebooks and further editing.

    The same drawings as :func:`plot_all` (no pyplot involved, so nothing is shown or kept
    open behind your back); in Jupyter a returned figure displays inline.

    Args:
        results: A ``cka-geo/compare/v1`` dict.
        dpi: Resolution of the figures.
        names: Which figures, among ``heatmap``, ``depth_profile``, ``change_bars``.

    Returns:
        ``{name: Figure}`` in the order of ``names``.

    Raises:
        DataError: ``results`` is not a valid results dict.
        UsageError: An unknown figure name or a bad dpi.
    """
    unknown = [n for n in names if n not in _DRAW]
    if unknown:
        raise UsageError(f"unknown figure {unknown[0]!r}; choose from {', '.join(FIGURES)}")
    r = _parse(results)
    dpi = _check_dpi(dpi)
    matplotlib = _import_matplotlib()
    with matplotlib.rc_context(_RC):
        return {name: _DRAW[name](r, dpi) for name in names}


def _save_one(
    name: str,
    results: Mapping[str, Any],
    path: str | os.PathLike[str],
    dpi: int,
    fmt: str | None,
) -> Path:
    r = _parse(results)
    dest = Path(path)
    fmt = _check_format(fmt if fmt is not None else (dest.suffix or ".png"))
    dpi = _check_dpi(dpi)
    with atomic_path(dest) as tmp:
        _render(name, r, tmp, fmt, dpi)
    return dest


def plot_matrix(
    results: Mapping[str, Any],
    path: str | os.PathLike[str],
    *,
    dpi: int = DPI,
    format: str | None = None,
) -> Path:
    """Draw the full L × L CKA matrix as a heatmap (pretrained rows, fine-tuned columns).

    Major ticks label blocks, minor ticks mark sublayers and thin white lines separate
    blocks (every sublayer is named when there are at most 16 layers). NaN entries are
    drawn hatched grey. Colour scale: viridis over [min(0, data), max(1, data)].

    Args:
        results: A ``cka-geo/compare/v1`` dict.
        path: The output file; written atomically.
        dpi: Resolution for PNG output.
        format: ``png``, ``pdf`` or ``svg``; by default taken from ``path``'s suffix.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        DataError: ``results`` is not a valid results dict.
        UsageError: An unknown format or a bad dpi.
    """
    return _save_one("heatmap", results, path, dpi, format)


def plot_depth_profile(
    results: Mapping[str, Any],
    path: str | os.PathLike[str],
    *,
    dpi: int = DPI,
    format: str | None = None,
) -> Path:
    """Draw same-layer CKA against block index, one line per sublayer type.

    Panel (a): CKA(pre, fine-tuned) at each sublayer, with bootstrap bands where the
    results carry intervals, the lowest point circled. Panel (b), when the results carry
    ``own_change``: each sublayer's own change as 1 − CKA (a logarithmic axis when the
    changes span more than two decades), the largest circled.

    Args:
        results: A ``cka-geo/compare/v1`` dict.
        path: The output file; written atomically.
        dpi: Resolution for PNG output.
        format: ``png``, ``pdf`` or ``svg``; by default taken from ``path``'s suffix.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        DataError: ``results`` is not a valid results dict.
        UsageError: An unknown format or a bad dpi.
    """
    return _save_one("depth_profile", results, path, dpi, format)


def plot_change_bars(
    results: Mapping[str, Any],
    path: str | os.PathLike[str],
    *,
    dpi: int = DPI,
    format: str | None = None,
) -> Path:
    """Draw change = 1 − CKA per sublayer as bars grouped by block, coloured by type.

    Panel (a): same-layer change; panel (b), when present, the own change. Error bars are
    the bootstrap intervals; the largest bar of each panel is outlined and annotated with
    its name and value. A panel switches to a logarithmic axis when its changes span more
    than two decades.

    Args:
        results: A ``cka-geo/compare/v1`` dict.
        path: The output file; written atomically.
        dpi: Resolution for PNG output.
        format: ``png``, ``pdf`` or ``svg``; by default taken from ``path``'s suffix.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        DataError: ``results`` is not a valid results dict.
        UsageError: An unknown format or a bad dpi.
    """
    return _save_one("change_bars", results, path, dpi, format)


def plot_all(
    results: Mapping[str, Any],
    out_dir: str | os.PathLike[str],
    formats: Iterable[str] = ("png",),
    *,
    dpi: int = DPI,
) -> list[Path]:
    """Write the heatmap, the depth profile and the change bars in every format.

    All figures are drawn to temporary files first and renamed into place only when every
    one of them succeeded: a failure leaves no new file behind.

    Args:
        results: A ``cka-geo/compare/v1`` dict.
        out_dir: The directory for ``heatmap.<fmt>``, ``depth_profile.<fmt>`` and
            ``change_bars.<fmt>``; created if missing.
        formats: Any of ``png``, ``pdf``, ``svg`` (duplicates ignored).
        dpi: Resolution for PNG output.

    Returns:
        The written paths, figure by figure, format by format.

    Raises:
        DataError: ``results`` is not a valid results dict.
        UsageError: An unknown format, no format, or a bad dpi.
    """
    r = _parse(results)
    fmts = list(dict.fromkeys(_check_format(f) for f in formats))
    if not fmts:
        raise UsageError("no figure format given; choose from " + ", ".join(FORMATS))
    dpi = _check_dpi(dpi)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UsageError(f"{out}: exists and is not a directory")
    created = not out.exists()
    written: list[Path] = []
    try:
        with contextlib.ExitStack() as stack:
            for name in FIGURES:
                for fmt in fmts:
                    dest = out / f"{name}.{fmt}"
                    tmp = stack.enter_context(atomic_path(dest))
                    _render(name, r, tmp, fmt, dpi)
                    written.append(dest)
    except BaseException:
        if created:  # leave no empty output directory behind
            with contextlib.suppress(OSError):
                out.rmdir()
        raise
    return written


__all__ = [
    "CHANGE_FLOOR",
    "DPI",
    "FIGURES",
    "FORMATS",
    "SCHEMA",
    "SUBLAYER_TYPES",
    "TYPE_COLORS",
    "TYPE_LABELS",
    "figure_sizes",
    "load_results",
    "plot_all",
    "plot_change_bars",
    "plot_depth_profile",
    "plot_matrix",
    "validate_results",
]
