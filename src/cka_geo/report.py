"""Text, CSV and JSON views of a comparison (a :class:`~cka_geo.results.CompareResult`, or
its ``cka-geo/compare/v1`` dict)."""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cka_geo.atomic import write_text_atomic
from cka_geo.results import CompareResult
from cka_geo.sublayers import KINDS, block_of

KIND_ORDER = KINDS


def _fmt(value: float | None, interval: list[float | None] | None) -> str:
    if value is None:
        return "nan"
    text = f"{value:.4f}"
    if interval and interval[0] is not None and interval[1] is not None:
        text += f" [{interval[0]:.4f}, {interval[1]:.4f}]"
    return text


def _grid(
    results: Mapping[str, Any], values_key: str, iv_key: str, only: list[str] | None = None
) -> tuple[list[str], list[list[str]]]:
    kinds = [k for k in KIND_ORDER if k in results["kinds"] and (only is None or k in only)]
    rows: dict[int, dict[str, str]] = {}
    values = results[values_key]
    ivs = results.get(iv_key) or {}
    for name, kind in zip(results["layers"], results["kinds"], strict=True):
        block = block_of(name)
        if kind in kinds:
            rows.setdefault(block, {})[kind] = _fmt(values.get(name), ivs.get(name))
    header = ["block", *kinds]
    body = [[str(b), *(rows[b].get(k, "") for k in kinds)] for b in sorted(rows)]
    return header, body


def _table(header: list[str], body: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
    line = lambda r: "  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True))  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), *(line(r) for r in body)])


def format_table(results: Mapping[str, Any]) -> str:
    """The per-block table(s) and the summary, for a terminal."""
    s = results["settings"]
    conf = f"{100 * s['confidence']:.0f}% CI" if s.get("interval_method") else "no intervals"
    parts = [
        f"CKA(pre, ft) at each sublayer  ({s['kernel']} kernel, {s['estimator']}, {s['pooling']} pooling, "
        f"{s['samples']} samples, {conf})",
        _table(*_grid(results, "diagonal", "intervals")),
    ]
    if results.get("own_change"):
        parts += [
            "",
            "Own change: CKA(pre sublayer, ft sublayer applied to pre's input)",
            _table(*_grid(results, "own_change", "own_change_intervals", s.get("own_change_kinds"))),
        ]
    parts += ["", results["summary"]["verdict"]]
    return "\n".join(parts)


def describe_checkpoints(results: Mapping[str, Any]) -> list[str]:
    """One line per checkpoint saying what was loaded and how (for stderr), then the notes
    that carry assumptions (guessed head count, ignored keys)."""
    cfg = results["model"]["config"]
    depth = cfg.get("depth") or cfg.get("layers")
    width = cfg.get("embed_dim") or cfg.get("width")
    size = cfg.get("img_size") or cfg.get("image_size")
    lines = []
    for role in ("pre", "ft"):
        c = results["checkpoints"][role]
        prefix = f"encoder at '{c['prefix']}'" if c["prefix"] else "bare encoder"
        k = c["ignored_keys"]
        ignored = f", {k} other key{'s' if k != 1 else ''} ignored" if k else ""
        lines.append(
            f"{role}: {c['path']}: {c['family']} ViT, {depth} blocks, width {width}, "
            f"{cfg.get('in_chans')} bands, {size} px, patch {cfg.get('patch_size')}; {prefix}{ignored}"
        )
        lines += [f"  {role}: {n}" for n in c["notes"] if "assumed" in n or "taken from" in n]
    return lines


CSV_COLUMNS = ("layer", "block", "kind", "cka", "cka_lo", "cka_hi", "own_cka", "own_lo", "own_hi", "weight_rel_change")
"""Columns of ``results.csv``, one row per sublayer."""


def csv_rows(results: Mapping[str, Any]) -> list[list[Any]]:
    """The rows of ``results.csv`` (as :data:`CSV_COLUMNS`; empty cells for undefined values)."""
    own = results.get("own_change") or {}
    own_iv = results.get("own_change_intervals") or {}
    ivs = results.get("intervals") or {}
    wch = results.get("weights", {}).get("relative_change", {})

    def cell(v: float | None) -> str:
        return "" if v is None or (isinstance(v, float) and math.isnan(v)) else repr(float(v))

    rows = []
    for name, kind in zip(results["layers"], results["kinds"], strict=True):
        iv = ivs.get(name) or [None, None]
        oiv = own_iv.get(name) or [None, None]
        rows.append(
            [name, block_of(name), kind, cell(results["diagonal"].get(name)), cell(iv[0]), cell(iv[1]),
             cell(own.get(name)), cell(oiv[0]), cell(oiv[1]), cell(wch.get(name))]
        )
    return rows


def to_csv(results: Mapping[str, Any]) -> str:
    """One row per sublayer: name, block, kind, CKA with interval, own change, weight change."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CSV_COLUMNS)
    w.writerows(csv_rows(results))
    return buf.getvalue()


def to_json(results: Mapping[str, Any]) -> str:
    """Strict JSON (NaN written as null by the producer), indented."""
    data = results.to_dict() if isinstance(results, CompareResult) else dict(results)
    return json.dumps(data, indent=2, allow_nan=False) + "\n"


def write_results(results: Mapping[str, Any], out_dir: Path, formats: tuple[str, ...] = ("json", "csv")) -> list[Path]:
    """Write results.json / results.csv into ``out_dir``, each atomically."""
    written = []
    if "json" in formats:
        write_text_atomic(out_dir / "results.json", to_json(results))
        written.append(out_dir / "results.json")
    if "csv" in formats:
        write_text_atomic(out_dir / "results.csv", to_csv(results))
        written.append(out_dir / "results.csv")
    return written
