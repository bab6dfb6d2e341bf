"""A study's aggregates as one Markdown page (``aggregate/report.md``), from ``tables.json``.

The page holds what a write-up quotes: per encoder and adaptation mode, the mean change
1 − CKA of each sublayer kind with its interval over seeds, fc1's margin over the next kind
and its share of cells (with the Wilson interval), in both views; the task metrics and
rankings per setting; how much rankings agree between settings; and the probing profiles'
best layers. Numbers only, no judgement: the reader decides what they say.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

_VIEWS = {"same": "same-layer CKA(pre s, ft s)", "own": "own change CKA(pre s, ft s on pre's input)"}


def _f(v: Any, digits: int = 4) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def _ci(r: dict[str, Any], key: str = "change", lo: str = "ci_lo", hi: str = "ci_hi", digits: int = 4) -> str:
    if r.get(lo) is None or not math.isfinite(r[lo]):
        return _f(r.get(key), digits)
    return f"{_f(r[key], digits)} [{_f(r[lo], digits)}, {_f(r[hi], digits)}]"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), *("| " + " | ".join(r) + " |" for r in rows)]


def markdown(tables: dict[str, Any], name: str = "study") -> str:
    """The report of a study's ``tables`` (``aggregate/tables.json``, loaded)."""
    from cka_geo.study.aggregate import CHANGE_KINDS

    out = [f"# Study {name}: aggregates", "",
           "Intervals: 95 % Student-t over seeds (each seed's mean over its cells); shares: 95 % Wilson.", ""]
    kinds = tables.get("kind_change", [])
    share = {(r["view"], r["encoder"], r.get("adaptation", "all")): r for r in tables.get("fc1_share", [])}
    groups = list(dict.fromkeys((r["encoder"], r["adaptation"]) for r in kinds))
    present = [k for k in CHANGE_KINDS if any(r["kind"] == k for r in kinds)]
    for view, title in _VIEWS.items():
        out += [f"## Where fine-tuning changed the encoders: {title}", "",
                "Mean 1 − CKA over blocks per sublayer kind; fc1 margin = fc1 − the largest other kind "
                "(> 0: fc1 changed most); share = cells whose most changed kind is fc1.", ""]
        rows = []
        for enc, adapt in groups:
            by = {r["kind"]: r for r in kinds if (r["view"], r["encoder"], r["adaptation"]) == (view, enc, adapt)}
            if not by:
                continue
            s = share.get((view, enc, adapt))
            top = max((k for k in present if k in by and by[k]["change"] is not None),
                      key=lambda k: by[k]["change"], default=None)
            cell_share = (f"{s['most_fc1']}/{s['counted']} = {_ci(s, 'fc1_share', 'share_lo', 'share_hi', 2)}"
                          if s and s["counted"] else "–")
            rows.append([enc, adapt, str(next(iter(by.values()))["cells"]),
                         *(_ci(by[k]) if k in by else "–" for k in present),
                         _ci(by["fc1_margin"]) if "fc1_margin" in by else "–", top or "–", cell_share])
        out += [*_table(["encoder", "adaptation", "cells", *present, "fc1 margin", "most changed", "fc1 share"], rows), ""]
    out += ["## Task metrics (test split, mean ± sd over seeds; rank 1 is best)", ""]
    ranks = tables.get("rankings", [])
    settings = list(dict.fromkeys(r["setting"] for r in ranks))
    encs = list(dict.fromkeys(r["encoder"] for r in ranks))
    metric = {r["setting"]: r.get("metric") for r in ranks}
    rows = []
    for s in settings:
        by = {r["encoder"]: r for r in ranks if r["setting"] == s}
        rows.append([s, metric.get(s) or "primary",
                     *(f"{_f(by[e]['mean'], 3)} ± {_f(by[e]['sd'], 3)} (#{by[e]['rank']})" if e in by else "–"
                       for e in encs)])
    out += [*_table(["setting", "metric", *encs], rows), ""]
    taus = [r["tau"] for r in tables.get("kendall", []) if r.get("tau") is not None and math.isfinite(r["tau"])]
    if taus:
        agree = sum(t >= 1 - 1e-9 for t in taus)  # scipy's tau-b of equal orders can be 0.9999999999999999
        out += [f"Ranking agreement between settings (Kendall's tau-b, {len(taus)} pairs of settings): "
                f"mean {_f(sum(taus) / len(taus), 3)}, min {_f(min(taus), 3)}; identical rankings in {agree} "
                f"of {len(taus)} pairs.", ""]
    probes = tables.get("probing_summary", [])
    if probes:
        out += ["## Layerwise probing (ridge probe on the embedded tiles)", ""]
        rows = [[r["encoder"], r["source"], r["metric"], f"{r['best']} ({_f(r['best_value'], 3)})",
                 f"{r['last']} ({_f(r['last_value'], 3)})", "yes" if r["best_is_intermediate"] else "no",
                 _f(r.get("share_cells_best_intermediate"), 2)] for r in probes]
        out += [*_table(["encoder", "source", "metric", "best layer", "last layer", "intermediate best",
                         "share of cells with an intermediate best"], rows), ""]
    return "\n".join(out)


def write_report(aggregate_dir: str | Path, name: str = "study") -> Path:
    """Write ``report.md`` next to ``tables.json`` in ``aggregate_dir``; its path."""
    from cka_geo.atomic import write_text_atomic

    folder = Path(aggregate_dir)
    tables = json.loads((folder / "tables.json").read_text(encoding="utf-8"))
    write_text_atomic(folder / "report.md", markdown(tables, name))
    return folder / "report.md"


__all__ = ["markdown", "write_report"]
