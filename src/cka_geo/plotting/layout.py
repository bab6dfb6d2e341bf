"""Figure sizes, block grouping, labels, the settings line and the scale of change axes."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from cka_geo.plotting.results import _parse, _Parsed
from cka_geo.plotting.style import _SHORT, SUBLAYER_TYPES

CHANGE_FLOOR = 1e-6
"""On a logarithmic change axis, changes (1 − CKA) below this are treated as nil."""


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
    """A short provenance line: kernel, estimator, pooling, samples, batches, confidence."""
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
        parts.append(f"n = {s['samples']} samples")
    if s.get("batches") is not None:
        parts.append(f"{s['batches']} batch{'es' if s['batches'] != 1 else ''}")
    elif s.get("batch_size") is not None:
        parts.append(f"batches of {s['batch_size']}")
    has_ci = (r.intervals is not None and np.isfinite(r.intervals).any()) or (
        r.own_intervals is not None and np.isfinite(r.own_intervals).any()
    )
    if has_ci:
        conf = s.get("confidence")
        level = f"{100 * conf:g} % " if isinstance(conf, (int, float)) else ""
        method = str(s.get("interval_method") or "")
        kind = "jackknife-t" if method.startswith("jackknife") else "bootstrap"
        parts.append(f"bands: {level}{kind} CI")
    return " · ".join(parts)


def _change_scale(values: np.ndarray) -> str:
    """'log' when the changes above the floor span more than two decades, else 'linear'."""
    v = values[np.isfinite(values) & (values > CHANGE_FLOOR)]
    if v.size < 2:
        return "linear"
    return "log" if v.max() / v.min() > 100.0 else "linear"


def _snap(change: np.ndarray) -> np.ndarray:
    """Changes (1 − CKA) within ±CHANGE_FLOOR of zero are estimator noise: drawn as 0."""
    out = np.array(change, dtype=float)
    out[np.abs(out) <= CHANGE_FLOOR] = 0.0
    return out


def _fmt_change(x: float) -> str:
    if not math.isfinite(x):
        return "n/a"
    if x != 0 and (abs(x) < 1e-3 or abs(x) >= 1e3):
        mant, exp = f"{x:.1e}".split("e")
        return f"{mant}×10$^{{{int(exp)}}}$"
    return f"{x:.3g}"
