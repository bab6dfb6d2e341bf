"""What a layerwise probe returns, and how it is written: JSON, CSV and the depth figure."""

from __future__ import annotations

import csv
import io
import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

# --------------------------------------------------------------------------- results


@dataclass
class LayerProbe:
    """The probe of one sublayer.

    Attributes:
        name: Canonical sublayer name.
        block: Block index (None for a name outside the canonical scheme).
        kind: ``attn``, ``fc1``, ``act``, ``fc2``, ``block`` or None.
        num_features: Feature width d.
        alpha: Chosen ridge strength per sample.
        cv_mse: Held-out mean squared error of each alpha in :attr:`ProbeResult.alphas`.
        metrics: Test metrics: ``accuracy``/``macro_f1`` or ``rmse``/``r2``.
    """

    name: str
    block: int | None
    kind: str | None
    num_features: int
    alpha: float
    cv_mse: list[float]
    metrics: dict[str, float]


@dataclass
class ProbeResult:
    """What :func:`probe_layers` returns.

    Attributes:
        task: ``classification`` or ``regression``.
        pooling: Token pooling used.
        layers: One :class:`LayerProbe` per sublayer, in probing order.
        best: Name of the best layer (see the module docstring).
        best_metric: The metric that chose it (``accuracy`` or ``r2``).
        last: Name of the last layer probed.
        best_is_intermediate: Whether ``best`` scores strictly better than ``last`` (on the
            best metric, then macro-F1 or RMSE).
        n_train: Training rows (examples; tokens for ``tokens`` pooling).
        n_test: Test rows.
        num_targets: Classes (classification) or target columns (regression).
        chance_accuracy: Majority-class test accuracy (classification), else None.
        alphas: The ridge grid.
        cv_folds: Cross-validation folds.
    """

    task: str
    pooling: str
    layers: list[LayerProbe]
    best: str
    best_metric: str
    last: str
    best_is_intermediate: bool
    n_train: int
    n_test: int
    num_targets: int
    chance_accuracy: float | None
    alphas: list[float]
    cv_folds: int
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def metric_names(self) -> tuple[str, ...]:
        """The test metric columns of the task."""
        return ("accuracy", "macro_f1") if self.task == "classification" else ("rmse", "r2")

    def layer(self, name: str) -> LayerProbe:
        """The probe of sublayer ``name``."""
        for lp in self.layers:
            if lp.name == name:
                return lp
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (NaN written as null)."""
        return _nan_to_none(asdict(self))

    def to_csv(self) -> str:
        """One row per layer: name, block, kind, features, alpha, then the metrics."""
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["layer", "block", "kind", "num_features", "alpha", *self.metric_names, "best"])
        for lp in self.layers:
            w.writerow([
                lp.name, "" if lp.block is None else lp.block, lp.kind or "", lp.num_features,
                repr(lp.alpha), *(repr(lp.metrics[m]) for m in self.metric_names), int(lp.name == self.best),
            ])
        return buf.getvalue()

    def format_table(self) -> str:
        """A plain-text table of the layers and the best layer."""
        cols = self.metric_names
        width = max(5, *(len(lp.name) for lp in self.layers))
        lines = [f"{'layer':<{width}}  {'alpha':>8}  " + "  ".join(f"{c:>9}" for c in cols)]
        for lp in self.layers:
            mark = "  *" if lp.name == self.best else ""
            lines.append(
                f"{lp.name:<{width}}  {lp.alpha:>8.0e}  "
                + "  ".join(f"{lp.metrics[c]:>9.4f}" for c in cols) + mark
            )
        where = "intermediate" if self.best_is_intermediate else "the last layer probed"
        score = self.layer(self.best).metrics[self.best_metric]
        lines.append(f"best layer: {self.best} ({self.best_metric} {score:.4f}; {where})")
        if self.chance_accuracy is not None:
            lines.append(f"chance (majority class) accuracy: {self.chance_accuracy:.4f}")
        return "\n".join(lines)


def _nan_to_none(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _nan_to_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_nan_to_none(v) for v in obj]
    return obj


# --------------------------------------------------------------------------- output


def write_probe(result: ProbeResult, out: str | os.PathLike[str], *, figure: bool = True) -> list[Path]:
    """Write ``probe.json``, ``probe.csv`` and (``figure``) ``probe_depth.png`` into ``out``.

    Each file is written atomically.

    Returns:
        The paths written.
    """
    from cka_geo.atomic import write_text_atomic

    d = Path(out)
    d.mkdir(parents=True, exist_ok=True)
    written = [d / "probe.json", d / "probe.csv"]
    write_text_atomic(written[0], json.dumps(result.to_dict(), indent=2, allow_nan=False) + "\n")
    write_text_atomic(written[1], result.to_csv())
    if figure:
        written.append(plot_probe_depth(result, d / "probe_depth.png"))
    return written


def plot_probe_depth(result: ProbeResult, path: str | os.PathLike[str]) -> Path:
    """Draw the probe metric against depth (one line per sublayer kind) into a PNG, atomically.

    The x axis is the block index (the position in probing order for names outside the
    canonical scheme); the best layer is circled; for classification a dashed line marks
    the majority-class accuracy.

    Returns:
        ``path``.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator


    metric = result.best_metric
    label = {"accuracy": "test accuracy", "r2": "test R²"}[metric]
    fig = Figure(figsize=(6.0, 3.6), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    series: dict[str, list[tuple[float, float, str]]] = {}
    for i, lp in enumerate(result.layers):
        x = float(lp.block) if lp.block is not None else float(i)
        series.setdefault(lp.kind or "other", []).append((x, lp.metrics[metric], lp.name))
    for kind, pts in series.items():
        xs, ys, _ = zip(*pts, strict=True)
        ax.plot(xs, ys, marker="o", label=kind)
        for x, y, name in pts:
            if name == result.best:
                ax.plot([x], [y], marker="o", markersize=14, markerfacecolor="none", color="black")
    if result.chance_accuracy is not None:
        ax.axhline(result.chance_accuracy, linestyle="--", color="grey", label="majority class")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("block")
    ax.set_ylabel(label)
    ax.set_title(f"linear probe per depth ({result.task}); best {result.best}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    from cka_geo.plotting.save import save_figure

    return save_figure(fig, path)
