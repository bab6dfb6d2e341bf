"""Writing figures: formats, dpi checks, file metadata, and the public ``plot_*`` and ``figures``."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cka_geo.atomic import atomic_path
from cka_geo.errors import UsageError
from cka_geo.plotting.bars import _draw_bars
from cka_geo.plotting.canvas import _import_matplotlib
from cka_geo.plotting.depth import _draw_depth
from cka_geo.plotting.heatmap import _draw_matrix
from cka_geo.plotting.results import _parse, _Parsed
from cka_geo.plotting.style import _RC
from cka_geo.plotting.view import DEFAULT_CMAP, View, check_view

if TYPE_CHECKING:
    from matplotlib.figure import Figure

DPI = 300
"""Default resolution of PNG output, in dots per inch."""

FORMATS = ("png", "pdf", "svg")
"""Output formats :func:`plot_all` and the ``plot`` command accept."""

FIGURES = ("heatmap", "depth_profile", "change_bars")
"""File stems of the figures :func:`plot_all` writes, in order."""

_DRAW = {"heatmap": _draw_matrix, "depth_profile": _draw_depth, "change_bars": _draw_bars}


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


def save_figure(fig: Figure, path: str | os.PathLike[str], *, fmt: str | None = None, dpi: int | None = None) -> Path:
    """Save a matplotlib figure atomically: the one way every figure of cka-geo is written.

    Args:
        fig: The figure.
        path: Destination; its suffix gives the format unless ``fmt`` is set.
        fmt: ``png``, ``pdf`` or ``svg``.
        dpi: Resolution (default: the figure's).

    Returns:
        The path written. Vector formats carry no timestamp, so the same figure gives the
        same file; a failure leaves nothing behind.
    """
    dest = Path(path)
    fmt = _check_format(fmt if fmt is not None else (dest.suffix or ".png"))
    kwargs: dict[str, Any] = {"format": fmt, "metadata": _metadata(fmt)}
    if dpi is not None:
        kwargs["dpi"] = _check_dpi(dpi)
    with atomic_path(dest) as tmp:
        fig.savefig(tmp, **kwargs)
    return dest


def _render(name: str, r: _Parsed, dest: Path, fmt: str, dpi: int, view: View) -> None:
    """Draw figure ``name`` and save it to ``dest`` (already a temporary path)."""
    matplotlib = _import_matplotlib()
    with matplotlib.rc_context(_RC):
        fig = _DRAW[name](r, dpi, view)
        fig.savefig(dest, format=fmt, dpi=dpi, metadata=_metadata(fmt))


def figures(
    results: Mapping[str, Any],
    *,
    dpi: int = 100,
    names: Sequence[str] = FIGURES,
    cmap: str = DEFAULT_CMAP,
    range: str = "data",
    vmin: float | None = None,
    vmax: float | None = None,
) -> dict[str, Figure]:
    """The figures as matplotlib ``Figure`` objects, for notebooks and further editing.

    The same drawings as :func:`plot_all` (no pyplot involved, so nothing is shown or kept
    open behind your back); in Jupyter a returned figure displays inline.

    Args:
        results: A ``cka-geo/compare/v1`` dict.
        dpi: Resolution of the figures.
        names: Which figures, among ``heatmap``, ``depth_profile``, ``change_bars``.
        cmap: The heatmap's matplotlib colormap (default viridis).
        range: The heatmap's colour range of 1 − CKA: ``"data"`` (default), the data's own
            range on a log scale; ``"full"``, the absolute 0 to 1.
        vmin: Lower end of the heatmap's colour range, overriding ``range`` (a log scale
            when above 0); the other end, if not given, comes from the data.
        vmax: Upper end of the heatmap's colour range.

    Returns:
        ``{name: Figure}`` in the order of ``names``.

    Raises:
        DataError: ``results`` is not a valid results dict.
        UsageError: An unknown figure name, a bad dpi, an unknown colormap or range, a
            non-finite bound, or ``vmin >= vmax``.
    """
    unknown = [n for n in names if n not in _DRAW]
    if unknown:
        raise UsageError(f"unknown figure {unknown[0]!r}; choose from {', '.join(FIGURES)}")
    r = _parse(results)
    dpi = _check_dpi(dpi)
    view = check_view(cmap, range, vmin, vmax)
    matplotlib = _import_matplotlib()
    with matplotlib.rc_context(_RC):
        return {name: _DRAW[name](r, dpi, view) for name in names}


def _save_one(
    name: str,
    results: Mapping[str, Any],
    path: str | os.PathLike[str],
    dpi: int,
    fmt: str | None,
    view: View | None = None,
) -> Path:
    r = _parse(results)
    dest = Path(path)
    fmt = _check_format(fmt if fmt is not None else (dest.suffix or ".png"))
    dpi = _check_dpi(dpi)
    with atomic_path(dest) as tmp:
        _render(name, r, tmp, fmt, dpi, view or View())
    return dest


def plot_matrix(
    results: Mapping[str, Any],
    path: str | os.PathLike[str],
    *,
    dpi: int = DPI,
    format: str | None = None,
    cmap: str = DEFAULT_CMAP,
    range: str = "data",
    vmin: float | None = None,
    vmax: float | None = None,
) -> Path:
    """Draw the change 1 − CKA over the full L × L matrix (pretrained rows, fine-tuned columns).

    Major ticks label blocks, minor ticks mark sublayers and thin white lines separate
    blocks (every sublayer is named when there are at most 16 layers). NaN entries are
    drawn hatched grey. By default the colours span the data's own range on a log scale,
    so that a small planted change stands out from the noise; the colourbar says the range.
    The diagonal cells of the verdict's most-changed (solid) and first-to-move (dashed)
    sublayers are outlined; the footer names the checkpoints and the settings.

    Args:
        results: A ``cka-geo/compare/v1`` dict.
        path: The output file; written atomically.
        dpi: Resolution for PNG output.
        format: ``png``, ``pdf`` or ``svg``; by default taken from ``path``'s suffix.
        cmap: The matplotlib colormap (default viridis).
        range: ``"data"`` (default), the data's own range on a log scale; ``"full"``, the
            absolute 0 to 1.
        vmin: Lower end of the colour range, overriding ``range`` (a log scale when above
            0); the other end, if not given, comes from the data.
        vmax: Upper end of the colour range.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        DataError: ``results`` is not a valid results dict.
        UsageError: An unknown format, colormap or range, a bad dpi, a non-finite bound
            or ``vmin >= vmax``.
    """
    view = check_view(cmap, range, vmin, vmax)
    return _save_one("heatmap", results, path, dpi, format, view)


def plot_depth_profile(
    results: Mapping[str, Any], path: str | os.PathLike[str], *, dpi: int = DPI, format: str | None = None
) -> Path:
    """Draw same-layer and own change, 1 − CKA, against block index, a line per sublayer type.

    Panel (a): the same-layer change 1 − CKA(pre, fine-tuned) at each sublayer, with
    bootstrap bands where the results carry intervals, the verdict's most-changed and
    first-to-move sublayers circled. Panel (b), when the results carry ``own_change``: each
    sublayer's own change, the verdict's largest own change circled. A panel's axis is
    logarithmic when its changes span more than two decades.

    Arguments, return value and errors as :func:`plot_matrix`.
    """
    return _save_one("depth_profile", results, path, dpi, format)


def plot_change_bars(
    results: Mapping[str, Any], path: str | os.PathLike[str], *, dpi: int = DPI, format: str | None = None
) -> Path:
    """Draw change = 1 − CKA per sublayer as bars grouped by block, coloured by type.

    Panel (a): same-layer change; panel (b), when present, the own change. Error bars are
    the bootstrap intervals; the bars of the verdict's sublayers (most changed and first to
    move; largest own change) are outlined and annotated with name and value. A panel
    switches to a logarithmic axis when its changes span more than two decades.

    Arguments, return value and errors as :func:`plot_matrix`.
    """
    return _save_one("change_bars", results, path, dpi, format)


def plot_all(
    results: Mapping[str, Any],
    out_dir: str | os.PathLike[str],
    formats: Iterable[str] = ("png",),
    *,
    dpi: int = DPI,
    cmap: str = DEFAULT_CMAP,
    range: str = "data",
    vmin: float | None = None,
    vmax: float | None = None,
) -> list[Path]:
    """Write the heatmap, the depth profile and the change bars in every format (of a
    ``--cross`` result: its L_A x L_B heatmap only, :func:`cka_geo.plotting.cross.plot_cross`).

    All figures are drawn to temporary files first and renamed into place only when every
    one of them succeeded: a failure leaves no new file behind.

    Args:
        results: A ``cka-geo/compare/v1`` dict.
        out_dir: The directory for ``heatmap.<fmt>``, ``depth_profile.<fmt>`` and
            ``change_bars.<fmt>``; created if missing.
        formats: Any of ``png``, ``pdf``, ``svg`` (duplicates ignored).
        dpi: Resolution for PNG output.
        cmap: The heatmap's colormap, as :func:`plot_matrix`.
        range: The heatmap's colour range, as :func:`plot_matrix`.
        vmin: Lower end of the heatmap's colour range, as :func:`plot_matrix`.
        vmax: Upper end of the heatmap's colour range.

    Returns:
        The written paths, figure by figure, format by format.

    Raises:
        DataError: ``results`` is not a valid results dict.
        UsageError: An unknown format, colormap or range, no format, a bad dpi, a
            non-finite bound or ``vmin >= vmax``.
    """
    if results.get("mode") == "cross":  # every layer of A against every layer of B: the heatmap only
        from cka_geo.plotting.cross import plot_cross

        return plot_cross(results, out_dir, formats, dpi=dpi, cmap=cmap, range=range, vmin=vmin, vmax=vmax)
    r = _parse(results)
    fmts = list(dict.fromkeys(_check_format(f) for f in formats))
    if not fmts:
        raise UsageError("no figure format given; choose from " + ", ".join(FORMATS))
    dpi = _check_dpi(dpi)
    view = check_view(cmap, range, vmin, vmax)
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
                    _render(name, r, tmp, fmt, dpi, view)
                    written.append(dest)
    except BaseException:
        if created:  # leave no empty output directory behind
            with contextlib.suppress(OSError):
                out.rmdir()
        raise
    return written
