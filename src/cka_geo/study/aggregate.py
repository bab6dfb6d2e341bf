"""A study's aggregates: the metric table, rankings and their agreement, probing profiles, CKA localisation.

Everything is read back from the cell and encoder folders (``cell.json``,
``compare/results.json``, ``probe/probe.json``), so the aggregates can be redrawn at any time
and a test can recompute them independently. Written into ``OUT/aggregate/`` as a whole
(:func:`cka_geo.atomic.atomic_dir`):

* ``cells.csv``: one row per cell: its coordinates, test metrics, the compare verdict, the
  most changed sublayer kind in both views, mean 1 − CKA per kind, the probe's best layer.
* ``rankings.csv``: per setting (task, label fraction, decoder, adaptation) the encoders by
  their primary test metric (mIoU, accuracy or R², mean over seeds; rank 1 is best, ties
  share the lower rank); ``kendall.csv``: for every pair of settings, Kendall's tau-b
  (:func:`scipy.stats.kendalltau`) between the encoders' mean metrics, over the encoders
  present in both, with its p-value.
* ``probing.csv``: the probe metric per layer for each encoder, of the pretrained encoder and
  the mean over its fine-tuned cells; ``probing_summary.csv``: best layer, whether it is
  intermediate (better than the last), the best and last values.
* ``localisation.csv``: change 1 − CKA per sublayer kind and block, in both views (``same``:
  same-layer CKA; ``own``: own change), by setting and encoder (over seeds), by encoder and
  adaptation mode, and by encoder (each seed's mean over its cells, then over seeds). The interval is the 95 % Student-t
  interval over seeds, mean ± t(0.975, n − 1) · s / √n (empty for one seed).
* ``kind_change.csv``: per view, encoder and adaptation, the mean 1 − CKA over blocks of each
  kind with its t-interval over seeds, and fc1's margin over the next most changed kind
  (:func:`kind_change`).
* ``fc1_share.csv``: in each view, the share of cells whose most changed kind is fc1 (with
  its Wilson interval), overall, per encoder and per encoder x adaptation. A
  cell's most changed kind is the kind (attn, fc1, act, fc2; block outputs excluded) with the
  largest mean 1 − CKA over blocks; cells in which nothing changed beyond the numerical noise
  (a frozen encoder) are left out of the count.
* ``report.md``: the headline tables as Markdown (:mod:`cka_geo.study.report`).
* ``summary.json``: rankings, tau, fc1 shares and probing summaries as JSON; ``tables.json``:
  every table above as JSON lists of rows (NaN as null), what the figures and the notebook
  read; ``figures/`` (:mod:`cka_geo.study.figures`).
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections import defaultdict
from itertools import combinations
from pathlib import Path
from typing import Any

from cka_geo.atomic import atomic_dir, write_text_atomic
from cka_geo.errors import CkaGeoError
from cka_geo.study.config import StudyConfig
from cka_geo.study.grid import expand

SCHEMA = "cka-geo/study-aggregate/v1"
CHANGE_KINDS = ("attn", "fc1", "act", "fc2")
"""Sublayer kinds that compete for "most changed" (the block output is their sum with the stream)."""
VIEWS = ("same", "own")
CONFIDENCE = 0.95
INTERVAL = "95 % Student-t interval over seeds: mean ± t(0.975, n-1)·s/√n"


def _scipy_stats() -> Any:
    try:
        from scipy import stats
    except ImportError:  # pragma: no cover - exercised where scipy is absent
        raise CkaGeoError("the study's aggregates need scipy: pip install 'cka-geo[study]'") from None
    return stats


_HEADERS = {"kendall": ["setting_a", "setting_b", "n_encoders", "tau", "p_value"]}  # tables that may be empty


def _csv(rows: list[dict[str, Any]], header: list[str] | None = None) -> str:
    buf = io.StringIO()
    fields = list(dict.fromkeys(k for r in rows for k in r)) or header or []
    if fields:
        w = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
        w.writeheader()
        for r in rows:
            w.writerow({k: _cell(r.get(k)) for k in fields})
    return buf.getvalue()


def _cell(v: Any) -> Any:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    return f"{v:.6g}" if isinstance(v, float) else v


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else math.nan


def t_interval(values: list[float]) -> tuple[float, float, float]:
    """Mean and the 95 % Student-t interval of ``values`` (NaN bounds for fewer than two)."""
    n = len(values)
    m = _mean(values)
    if n < 2:
        return m, math.nan, math.nan
    sd = math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1))
    half = float(_scipy_stats().t.ppf(0.5 + CONFIDENCE / 2, n - 1)) * sd / math.sqrt(n)
    return m, m - half, m + half


def change_profile(results: Any, view: str) -> dict[tuple[str, int], float]:
    """1 − CKA per ``(kind, block)`` of a compare result in one view (undefined values left out)."""
    out = {}
    for rec in results.layers:
        v = rec.cka if view == "same" else rec.own
        if v is not None and rec.block is not None:
            out[(rec.kind, rec.block)] = 1.0 - v
    return out


def most_changed_kind(results: Any, view: str) -> str | None:
    """The kind with the largest mean 1 − CKA over blocks, or None when nothing changed (see the module doc)."""
    summary = results["summary"]
    if view == "same" and not summary.get("changed"):
        return None
    if view == "own" and not summary.get("largest_own_change"):
        return None
    by_kind: dict[str, list[float]] = defaultdict(list)
    for (kind, _), v in change_profile(results, view).items():
        if kind in CHANGE_KINDS:
            by_kind[kind].append(v)
    means = {k: _mean(by_kind[k]) for k in CHANGE_KINDS if by_kind.get(k)}
    return max(means, key=lambda k: means[k]) if means else None


def load_cells(cfg: StudyConfig, out: Path) -> list[dict[str, Any]]:
    """Each cell's keys, cell.json, compare result and probe dict (in grid order)."""
    from cka_geo.results import load_results

    rows = []
    for cell in expand(cfg):
        folder = out / "cells" / cell.id
        info = json.loads((folder / "cell.json").read_text(encoding="utf-8"))
        probe = folder / "probe" / "probe.json"
        rows.append({"keys": cell.keys(), "info": info, "results": load_results(folder / "compare" / "results.json"),
                     "probe": json.loads(probe.read_text(encoding="utf-8")) if probe.is_file() else None})
    return rows


def cell_table(cells: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The metric table: one row per cell."""
    rows = []
    for c in cells:
        info, r, keys = c["info"], c["results"], c["keys"]
        row: dict[str, Any] = {**keys, "train_samples": info["train_samples"], "primary_metric": info["primary_metric"],
                               "primary": info["test"][info["primary_metric"]]}
        row.update({f"test_{k}": v for k, v in info["test"].items()})
        s = r["summary"]
        row.update({"most_changed": s.get("most_changed"), "first_changed": s.get("first_changed"),
                    "largest_own_change": s.get("largest_own_change")})
        for view in VIEWS:
            row[f"most_changed_kind_{view}"] = most_changed_kind(r, view)
            prof = change_profile(r, view)
            for kind in (*CHANGE_KINDS, "block"):
                vals = [v for (k, _), v in prof.items() if k == kind]
                if vals:
                    row[f"mean_change_{kind}_{view}"] = _mean(vals)
        if c["probe"] is not None:
            row.update({"probe_best": c["probe"]["best"], "probe_best_is_intermediate": c["probe"]["best_is_intermediate"]})
        rows.append(row)
    return rows


def rankings(table: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Per setting, encoders ranked by their mean primary metric; Kendall's tau between settings."""
    stats = _scipy_stats()
    by: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    task_of: dict[str, str] = {}
    for row in table:
        by[row["setting"]][row["encoder"]].append(row["primary"])
        task_of[row["setting"]] = row["task"]
    ranks, means = [], {}
    for setting, encs in by.items():
        m = {e: _mean(v) for e, v in encs.items()}
        means[setting] = m
        for e, v in sorted(m.items(), key=lambda kv: -kv[1]):
            rank = 1 + sum(w > v for w in m.values())
            sd = math.sqrt(sum((x - v) ** 2 for x in encs[e]) / (len(encs[e]) - 1)) if len(encs[e]) > 1 else math.nan
            ranks.append({"task": task_of[setting], "setting": setting, "encoder": e, "metric": table[0]["primary_metric"]
                          if len({r["primary_metric"] for r in table}) == 1 else None,
                          "n_seeds": len(encs[e]), "mean": v, "sd": sd, "rank": rank})
    taus = []
    for a, b in combinations(list(by), 2):
        common = [e for e in means[a] if e in means[b]]
        tau = p = math.nan
        if len(common) >= 2:
            res = stats.kendalltau([means[a][e] for e in common], [means[b][e] for e in common])
            tau, p = float(res.statistic), float(res.pvalue)
        taus.append({"setting_a": a, "setting_b": b, "n_encoders": len(common), "tau": tau, "p_value": p})
    return ranks, taus


def localisation(cells: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """1 − CKA per kind and block with t-intervals over seeds: by setting, by adaptation, by encoder.

    Levels: ``setting`` (one encoder and setting, over its seeds), ``adaptation`` (each
    seed's mean over the encoder's cells of one adaptation mode, then over seeds) and
    ``encoder`` (each seed's mean over all the encoder's cells, then over seeds).
    """
    rows = []
    for view in VIEWS:
        per_setting: dict[tuple[str, str, str], dict[tuple[str, int], list[float]]] = defaultdict(
            lambda: defaultdict(list))
        per_seed: dict[tuple[str, str, int], dict[tuple[str, int], list[float]]] = defaultdict(lambda: defaultdict(list))
        for c in cells:
            k = c["keys"]
            for point, v in change_profile(c["results"], view).items():
                per_setting[(k["encoder"], k["setting"], k["adaptation"])][point].append(v)
                for adapt in (k["adaptation"], None):
                    per_seed[(k["encoder"], adapt or "", k["seed"])][point].append(v)
        for (enc, setting, adapt), points in per_setting.items():
            for (kind, block), vals in sorted(points.items(), key=lambda kv: (kv[0][1], kv[0][0])):
                m, lo, hi = t_interval(vals)
                rows.append({"level": "setting", "encoder": enc, "setting": setting, "adaptation": adapt, "view": view,
                             "kind": kind, "block": block, "n_seeds": len(vals), "change": m, "ci_lo": lo, "ci_hi": hi})
        over: dict[tuple[str, str], dict[tuple[str, int], list[float]]] = defaultdict(lambda: defaultdict(list))
        for (enc, adapt, _seed), points in per_seed.items():
            for point, vals in points.items():
                over[(enc, adapt)][point].append(_mean(vals))
        for (enc, adapt), points in sorted(over.items(), key=lambda kv: kv[0][1] == ""):
            for (kind, block), vals in sorted(points.items(), key=lambda kv: (kv[0][1], kv[0][0])):
                m, lo, hi = t_interval(vals)
                rows.append({"level": "adaptation" if adapt else "encoder", "encoder": enc, "setting": "all",
                             "adaptation": adapt or "all", "view": view, "kind": kind, "block": block,
                             "n_seeds": len(vals), "change": m, "ci_lo": lo, "ci_hi": hi})
    return rows


def wilson_interval(k: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """The 95 % Wilson score interval of a share ``k / n`` (Wilson 1927; NaN for ``n = 0``)."""
    if n == 0:
        return math.nan, math.nan
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    lo, hi = max(0.0, centre - half), min(1.0, centre + half)
    # in exact arithmetic lo = 0 at k = 0 and hi = 1 at k = n; keep them so, and around p, in floats
    return (0.0 if k == 0 else min(lo, p)), (1.0 if k == n else max(hi, p))


def fc1_share(table: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """In each view, overall, per encoder and per encoder x adaptation: cells per most changed kind, fc1's share.

    ``share_lo``/``share_hi`` are the 95 % Wilson interval of the share, which treats the
    counted cells as independent draws (cells of one seed share an encoder, so read it as a
    lower bound on the uncertainty).
    """
    rows = []
    encoders = list(dict.fromkeys(r["encoder"] for r in table))
    adaptations = list(dict.fromkeys(r["adaptation"] for r in table))
    groups = [(None, None), *((e, None) for e in encoders), *((e, a) for e in encoders for a in adaptations)]
    for view in VIEWS:
        for enc, adapt in groups:
            sel = [r for r in table if (enc is None or r["encoder"] == enc) and (adapt is None or r["adaptation"] == adapt)]
            if not sel and adapt is not None:
                continue  # an encoder without cells of this mode
            kinds = [r[f"most_changed_kind_{view}"] for r in sel]
            counted = [k for k in kinds if k is not None]
            row: dict[str, Any] = {"view": view, "encoder": enc or "all", "adaptation": adapt or "all", "cells": len(sel),
                                   "counted": len(counted), "unchanged": len(sel) - len(counted)}
            row.update({f"most_{k}": counted.count(k) for k in CHANGE_KINDS})
            row["fc1_share"] = counted.count("fc1") / len(counted) if counted else math.nan
            row["share_lo"], row["share_hi"] = wilson_interval(counted.count("fc1"), len(counted))
            rows.append(row)
    return rows


def kind_change(table: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean 1 − CKA over blocks per sublayer kind, with t-intervals over seeds; and fc1's margin.

    Per view, per encoder (``adaptation`` ``all``) and per encoder x adaptation: each seed's
    value is the mean over that seed's cells of the cell's mean change over blocks; the
    interval is :func:`t_interval` over seeds. The ``fc1_margin`` row is, per seed, fc1's
    mean change minus the largest other kind's (attn, act, fc2): positive when fc1 changes
    most, and its interval says whether the seeds agree. Cells where nothing changed are left
    out (see :func:`most_changed_kind`).
    """
    rows = []
    encoders = list(dict.fromkeys(r["encoder"] for r in table))
    adaptations = list(dict.fromkeys(r["adaptation"] for r in table))
    for view in VIEWS:
        for enc in encoders:
            for adapt in (None, *adaptations):
                sel = [r for r in table if r["encoder"] == enc and (adapt is None or r["adaptation"] == adapt)
                       and r[f"most_changed_kind_{view}"] is not None]
                kinds = [k for k in (*CHANGE_KINDS, "block") if any(f"mean_change_{k}_{view}" in r for r in sel)]
                per_seed: dict[int, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
                for r in sel:
                    for k in kinds:
                        v = r.get(f"mean_change_{k}_{view}")
                        if v is not None and math.isfinite(v):
                            per_seed[r["seed"]][k].append(v)
                seed_means = {seed: {k: _mean(v) for k, v in d.items()} for seed, d in sorted(per_seed.items())}
                base = {"view": view, "encoder": enc, "adaptation": adapt or "all", "cells": len(sel)}
                for k in kinds:
                    vals = [m[k] for m in seed_means.values() if k in m]
                    mean, lo, hi = t_interval(vals)
                    rows.append({**base, "kind": k, "n_seeds": len(vals), "change": mean, "ci_lo": lo, "ci_hi": hi})
                others = [k for k in CHANGE_KINDS if k in kinds and k != "fc1"]
                if "fc1" in kinds and others:
                    margins = [m["fc1"] - max(m[k] for k in others if k in m) for m in seed_means.values()
                               if "fc1" in m and any(k in m for k in others)]
                    mean, lo, hi = t_interval(margins)
                    rows.append({**base, "kind": "fc1_margin", "n_seeds": len(margins), "change": mean,
                                 "ci_lo": lo, "ci_hi": hi})
    return rows


def probing(cfg: StudyConfig, out: Path, cells: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Per encoder: the pretrained encoder's probe profile and the mean over its fine-tuned cells."""
    profiles, summary = [], []
    for enc in cfg.encoders:
        path = out / "encoders" / enc.name / "probe" / "probe.json"
        sources = []
        if path.is_file():
            sources.append(("pretrained", [json.loads(path.read_text(encoding="utf-8"))]))
        fts = [c["probe"] for c in cells if c["keys"]["encoder"] == enc.name and c["probe"] is not None]
        if fts:
            sources.append(("fine-tuned (mean over cells)", fts))
        for source, probes in sources:
            metric = probes[0]["best_metric"]
            layers: dict[str, list[float]] = defaultdict(list)
            meta: dict[str, tuple[Any, Any]] = {}
            for pr in probes:
                for layer in pr["layers"]:
                    layers[layer["name"]].append(layer["metrics"][metric])
                    meta[layer["name"]] = (layer["block"], layer["kind"])
            means = {n: _mean(v) for n, v in layers.items()}
            for n, v in means.items():
                profiles.append({"encoder": enc.name, "source": source, "layer": n, "block": meta[n][0],
                                 "kind": meta[n][1], "metric": metric, "value": v, "n": len(layers[n])})
            names = list(means)
            best = max(names, key=lambda n: (means[n], -names.index(n)))
            summary.append({"encoder": enc.name, "source": source, "metric": metric, "best": best,
                            "best_value": means[best], "last": names[-1], "last_value": means[names[-1]],
                            "best_is_intermediate": means[best] > means[names[-1]],
                            "share_cells_best_intermediate": _mean([float(p["best_is_intermediate"]) for p in probes])})
    return profiles, summary


def aggregate(cfg: StudyConfig, out: str | Path, *, figures: bool = True) -> Path:
    """Compute every aggregate of a finished study and write ``OUT/aggregate/`` as a whole; its path."""
    folder = Path(out)
    cells = load_cells(cfg, folder)
    table = cell_table(cells)
    ranks, taus = rankings(table)
    loc = localisation(cells)
    share = fc1_share(table)
    kinds = kind_change(table)
    profiles, psummary = probing(cfg, folder, cells)
    summary = {"schema": SCHEMA, "study": cfg.name, "cells": len(table), "interval": INTERVAL,
               "most_changed_kind_rule": "largest mean 1 - CKA over blocks among attn, fc1, act, fc2; "
                                         "cells with no change beyond the numerical noise left out",
               "rankings": ranks, "kendall": taus, "fc1_share": share, "kind_change": kinds, "probing": psummary}
    dest = folder / "aggregate"
    with atomic_dir(dest) as tmp:
        for name, rows in (("cells", table), ("rankings", ranks), ("kendall", taus), ("localisation", loc),
                           ("fc1_share", share), ("kind_change", kinds), ("probing", profiles),
                           ("probing_summary", psummary)):
            write_text_atomic(tmp / f"{name}.csv", _csv(rows, _HEADERS.get(name)))
        write_text_atomic(tmp / "summary.json", json.dumps(_finite(summary), indent=1, allow_nan=False) + "\n")
        tables = {"cells": table, "rankings": ranks, "kendall": taus, "localisation": loc, "fc1_share": share,
                  "kind_change": kinds, "probing": profiles, "probing_summary": psummary}
        write_text_atomic(tmp / "tables.json", json.dumps(_finite(tables), allow_nan=False) + "\n")
        from cka_geo.study.report import markdown

        write_text_atomic(tmp / "report.md", markdown(json.loads(json.dumps(_finite(tables))), cfg.name))
        if figures:
            from cka_geo.study.figures import draw_all

            draw_all(tmp, table, ranks, loc, share, profiles)
    return dest


def _finite(v: Any) -> Any:
    """``v`` with NaN floats as None (JSON has no NaN)."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _finite(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_finite(x) for x in v]
    return v


__all__ = ["CHANGE_KINDS", "INTERVAL", "SCHEMA", "aggregate", "cell_table", "change_profile", "fc1_share",
           "kind_change", "load_cells", "localisation", "most_changed_kind", "probing", "rankings", "t_interval",
           "wilson_interval"]
