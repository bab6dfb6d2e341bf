"""What every drawing shares: importing matplotlib, a pyplot-free figure, footnotes and notes."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from cka_geo.errors import CkaGeoError
from cka_geo.plotting.layout import CHANGE_FLOOR, _settings_line
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
    """An optional short bold title on top; settings and ``note`` as a small grey footnote."""
    if title:  # (figures with a legend on top go without: constrained layout would overlap them)
        fig.suptitle(title, fontsize=10, fontweight="bold")
    line = " · ".join(part for part in (_settings_line(r), note) if part)
    if line:
        import textwrap

        # wrap to the figure's width (about 0.55 em per character at 7 pt)
        chars = max(40, int(fig.get_figwidth() * 72 / (0.55 * 7)) - 4)
        fig.supxlabel(textwrap.fill(line, chars), fontsize=7, color="#555555")


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
