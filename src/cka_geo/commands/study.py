"""``cka-geo study CONFIG.toml``: a resumable grid of fine-tune -> evaluate -> compare -> probe cells.

See :mod:`cka_geo.study` and docs/study.md for the config and the outputs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from cka_geo.commands import _training as T
from cka_geo.errors import UsageError

NAME = "study"
HELP = ("Run a transfer study (encoders x tasks x label fractions x decoders x adaptations x seeds) from a TOML "
        "config; resumable, shardable; writes tables, rankings, CKA localisation and figures.")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of ``cka-geo study``."""
    p.add_argument("config", type=Path, help="the study's TOML config (docs/study.md)")
    p.add_argument("--out", type=Path, default=None,
                   help="study folder (default ./cka-geo-study-NAME); a rerun resumes it: finished cells are skipped")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--device", default=None, help="where every cell runs: cpu, cuda or cuda:N (default auto)")
    g.add_argument("--devices", default=None, metavar="LIST",
                   help="comma-separated devices, e.g. cuda:0,cuda:1: one worker process per device shares the cells")
    p.add_argument("--shard", default="0/1", metavar="I/N",
                   help="run only cells k with k mod N == I (several processes or machines split a study; default 0/1)")
    p.add_argument("--threads", type=T.positive_int, default=None,
                   help="torch CPU threads per process (default: available cores, at most 4)")
    p.add_argument("--aggregate-only", action="store_true", help="run no cell; aggregate the finished study again")
    p.add_argument("--no-figures", action="store_true", help="write the tables but no figures")
    p.add_argument("--list", action="store_true", help="print the grid's cell ids and their state, run nothing")


def run(args: argparse.Namespace) -> int:
    """Run this process's share of the grid; print the counts and where the aggregates are."""
    from cka_geo.study.config import load_config
    from cka_geo.study.grid import parse_shard
    from cka_geo.study.run import cell_state, check_folder, run_study

    cfg = load_config(args.config)
    index, count = parse_shard(args.shard)
    out = args.out or Path(f"cka-geo-study-{cfg.name}")
    names = args.devices.split(",") if args.devices else [args.device or "auto"]
    if any(not d.strip() for d in names):
        raise UsageError(f"--devices {args.devices!r}: an empty device name")
    devices = tuple(T.resolve_device(d.strip()) for d in names)
    if args.list:
        from cka_geo.study.grid import expand

        check_folder(out)
        for cell in expand(cfg):
            print(f"{cell.id}\t{cell_state(cfg, cell, out)}")
        return 0
    if args.aggregate_only:
        from cka_geo.study.aggregate import aggregate
        from cka_geo.study.grid import expand

        check_folder(out)
        missing = [c.id for c in expand(cfg) if cell_state(cfg, c, out) != "done"]
        if missing:
            raise UsageError(f"--aggregate-only: {len(missing)} cells are not finished (first: {missing[0]})")
        print(aggregate(cfg, out, figures=not args.no_figures))
        return 0
    res = run_study(cfg, out, devices=devices, shard_index=index, shard_count=count, threads=args.threads,
                    figures=not args.no_figures)
    agg = res.pop("aggregate")
    print(json.dumps(res), file=sys.stderr)
    if agg is None:
        print(f"{res['finished']} of {res['cells']} cells finished; the aggregates are written when all are "
              f"(rerun, or run the other shards)")
    else:
        print(agg)
    return 0
