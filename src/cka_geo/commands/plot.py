"""``cka-geo plot results.json``: redraw the figures of a comparison from its results file."""

from __future__ import annotations

import argparse
from pathlib import Path

NAME = "plot"
HELP = (
    "Redraw the figures of a comparison (heatmap, depth profile, change bars) from the "
    "results.json that `cka-geo compare` wrote."
)


def _positive_dpi(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--dpi must be an integer, got {text!r}") from None
    if not 10 <= value <= 2400:
        raise argparse.ArgumentTypeError(f"--dpi must be between 10 and 2400, got {value}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``plot`` options to ``parser``."""
    from cka_geo.plotting import DPI, FORMATS

    parser.add_argument("results", type=Path, help="results.json written by `cka-geo compare`")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        metavar="DIR",
        help="folder for the figures, added to what it holds (default: the folder of the results file)",
    )
    parser.add_argument(
        "--format",
        nargs="+",
        choices=FORMATS,
        default=["png"],
        metavar="FMT",
        help=f"one or more of {', '.join(FORMATS)} (default: png)",
    )
    parser.add_argument(
        "--dpi", type=_positive_dpi, default=DPI, help=f"PNG resolution (default: {DPI})"
    )
    parser.add_argument(
        "--cmap",
        default="viridis",
        metavar="NAME",
        help="matplotlib colormap of the heatmap (default: %(default)s)",
    )
    parser.add_argument(
        "--range",
        dest="color_range",
        choices=("data", "full"),
        default="data",
        help="heatmap colours of 1 - CKA: data = the data's own range on a log scale, so that "
        "small changes stand out (default); full = the absolute 0 to 1",
    )
    parser.add_argument(
        "--vmin",
        type=float,
        default=None,
        metavar="X",
        help="lower end of the heatmap's 1 - CKA colour range, overriding --range (log scale when > 0)",
    )
    parser.add_argument(
        "--vmax", type=float, default=None, metavar="X", help="upper end of that range"
    )


def run(args: argparse.Namespace) -> int:
    """Read the results file, write every figure, print the written paths on stdout."""
    from cka_geo.commands._output import Output
    from cka_geo.plotting import plot_all
    from cka_geo.plotting.view import check_view
    from cka_geo.results_cross import load_any_results

    view = check_view(args.cmap, args.color_range, args.vmin, args.vmax)  # refused before any work
    out = args.out if args.out is not None else args.results.parent
    if args.out is not None or args.results.is_file():  # a missing results file is refused by load_results
        Output(out, NAME).check_location(replaced=False)  # a bad --out is refused before drawing
    results = load_any_results(args.results)  # a --cross result gets its heatmap
    written = plot_all(
        results, out, formats=args.format, dpi=args.dpi,
        cmap=view.cmap, range=view.range, vmin=view.vmin, vmax=view.vmax,
    )
    for path in written:
        print(path)
    return 0
