"""``cka-geo compare A B --cross``: two architectures, every layer against every layer."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cka_geo.compare import CompareOptions


def run_cross(args: argparse.Namespace, opts: CompareOptions) -> int:
    """Run the cross comparison; print the best matches, write results.json/.csv and the heatmap."""
    import contextlib

    from cka_geo.atomic import write_text_atomic
    from cka_geo.commands._output import claim
    from cka_geo.compare.cross import compare_cross
    from cka_geo.report import to_json
    from cka_geo.results_cross import format_cross, to_cross_csv

    files = [f for f in args.format if f != "table"]
    written: list[str] = []
    with contextlib.ExitStack() as stack:
        out = None
        if files or not args.no_figures:
            out = stack.enter_context(claim(args.out, "compare", inputs=(args.pre, *args.ft, args.data)))
        results = compare_cross(args.pre, args.ft[0], opts)
        if not args.quiet:
            for role in ("pre", "ft"):
                rec = results["checkpoints"][role]
                print(f"{role}: {rec['path']}: {results['models'][role]['description']}", file=sys.stderr)
        if out is not None:
            with out.replace() as tmp:
                if "json" in files:
                    write_text_atomic(tmp / "results.json", to_json(results))
                if "csv" in files:
                    write_text_atomic(tmp / "results.csv", to_cross_csv(results))
                if not args.no_figures:
                    from cka_geo.plotting.cross import plot_cross

                    plot_cross(results, tmp)
                written = sorted(p.name for p in tmp.iterdir())
    if "table" in args.format:
        print(format_cross(results))
    if written and not args.quiet:
        print(f"wrote {', '.join(written)} to {args.out}", file=sys.stderr)
    return 0
