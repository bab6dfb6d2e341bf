"""Figures of a comparison: the CKA heatmap, the depth profile and the change bars.

Everything here reads the dict that ``cka-geo compare`` writes as ``results.json`` (schema
``cka-geo/compare/v1``) and draws publication-ready figures with matplotlib's Agg backend:
vector PDF/SVG or PNG at a set dpi, colour-blind-safe colours (Okabe & Ito for the sublayer
types, viridis for the heatmap), a distinct marker per sublayer type so the figures survive
grey-scale printing, and sizes that grow with the depth of the model. Every figure shows
change as 1 − CKA (the heatmap's colours over the data's own range on a log scale unless
``range="full"``), marks the sublayers the verdict names (``summary["most_changed"]``,
``["first_changed"]``, ``["largest_own_change"]``) and names the checkpoints and the
settings in its footer.

matplotlib is imported inside the functions that draw, never at module level, so that
``import cka_geo`` (and the CLI's parser) stay light.

The package is split by what each module holds: ``results`` (the schema, reading and
validating), ``style`` (colours, markers, labels, matplotlib rc), ``layout`` (figure sizes,
block grouping, the scale of change axes), ``view`` (the heatmap's colour options and the
verdict's marks), ``canvas`` (what every drawing shares),
``heatmap``, ``depth`` and ``bars`` (one drawing each) and ``save`` (formats, dpi, metadata
and the public ``plot_*`` functions and :func:`figures`). Everything public is re-exported
here.

Example:
    >>> from cka_geo.plotting import load_results, plot_all  # doctest: +SKIP
    >>> plot_all(load_results("out/results.json"), "out", formats=("png", "pdf"))  # doctest: +SKIP
"""

from __future__ import annotations

from cka_geo.plotting.bars import _draw_bars as _draw_bars
from cka_geo.plotting.depth import _draw_depth as _draw_depth
from cka_geo.plotting.heatmap import _draw_matrix as _draw_matrix
from cka_geo.plotting.layout import CHANGE_FLOOR, figure_sizes
from cka_geo.plotting.layout import _sizes as _sizes
from cka_geo.plotting.results import SCHEMA, load_results, validate_results
from cka_geo.plotting.results import _parse as _parse
from cka_geo.plotting.results import _Parsed as _Parsed
from cka_geo.plotting.save import _DRAW as _DRAW
from cka_geo.plotting.save import (
    DPI,
    FIGURES,
    FORMATS,
    plot_all,
    plot_change_bars,
    plot_depth_profile,
    plot_matrix,
    save_figure,
)
from cka_geo.plotting.save import _render as _render
from cka_geo.plotting.save import figures as figures
from cka_geo.plotting.style import _RC as _RC
from cka_geo.plotting.style import SUBLAYER_TYPES, TYPE_COLORS, TYPE_LABELS

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
    "figures",
    "load_results",
    "plot_all",
    "plot_change_bars",
    "plot_depth_profile",
    "plot_matrix",
    "save_figure",
    "validate_results",
]
