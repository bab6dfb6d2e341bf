"""What every drawing shares: importing matplotlib, a pyplot-free figure, footnotes and notes."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from cka_geo.errors import CkaGeoError
from cka_geo.plotting.layout import _settings_line
from cka_geo.plotting.results import _Parsed

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure


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
    """An optional short bold title on top; a small grey footer wrapped to the figure's width.

    The footer names the two checkpoints (their file names), then the settings (kernel,
    estimator, pooling, samples, batches, intervals), then ``note``.
    """
    import textwrap

    from cka_geo.plotting.view import checkpoint_line

    if title:  # (figures with a legend on top go without: constrained layout would overlap them)
        width = max(30, int(fig.get_figwidth() * 72 / (0.72 * 10)))  # about 0.72 em a character, bold
        fig.suptitle(textwrap.fill(title, width), fontsize=10, fontweight="bold")
    line = " · ".join(part for part in (checkpoint_line(r), _settings_line(r), note) if part)
    # wrap to the figure's width (about 0.55 em per character at 7 pt)
    chars = max(40, int(fig.get_figwidth() * 72 / (0.55 * 7)) - 4)
    fig.supxlabel(textwrap.fill(line, chars, break_long_words=True), fontsize=7, color="#555555")


def _no_change_note(ax: Axes, r: _Parsed, text: str | None = None) -> None:
    """Say in the panel that nothing changed, instead of pointing at noise."""
    from cka_geo.plotting.view import NO_CHANGE

    text = text or NO_CHANGE
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
