"""The look of the figures: sublayer-type colours, labels, markers and line styles, matplotlib rc."""

from __future__ import annotations

from cka_geo.sublayers import KINDS, LABELS

SUBLAYER_TYPES = KINDS
"""Sublayer types in their order inside a block (the vocabulary's kinds)."""

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
_SHORT = LABELS

_NAN_COLOR = "#D9D9D9"
_NAN_HATCH_COLOR = "#8C8C8C"

_RC = {
    "svg.hashsalt": "cka-geo",  # fixed clip-path ids: the same results give the same SVG
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
