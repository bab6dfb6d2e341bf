"""Many fine-tunes of one pretrained model: run names, the combined tidy CSV and the runs index.

``cka-geo compare PRE FT1 FT2 ...`` writes, into its ``--out``::

    runs/<run>/results.json, results.csv (and the run's figures)   one compare result each
    runs.csv                                                       one row per run x layer
    runs.json                                                      the index (schema below)
    depth_profile_runs.<fmt>                                       1 - CKA by depth, a line per run

Run names come from the fine-tuned files (:func:`run_names`).
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path, PurePath
from typing import Any

from cka_geo.atomic import write_text_atomic
from cka_geo.report import CSV_COLUMNS, csv_rows

RUNS_SCHEMA = "cka-geo/compare-runs/v1"
"""The ``schema`` of ``runs.json``."""

RUNS_CSV_COLUMNS = ("run", *CSV_COLUMNS)
"""Columns of ``runs.csv``: the run's name, then those of a run's ``results.csv``."""

_UNSAFE = re.compile(r"[^A-Za-z0-9._+-]+")
_SUFFIXES = {".pt", ".pth", ".ckpt", ".bin", ".safetensors", ".pkl", ".tar"}


def _stem(source: Any, i: int) -> tuple[str, str | None]:
    """(file name without its checkpoint suffix, parent folder name) of one fine-tune."""
    if not isinstance(source, (str, PurePath)):
        return f"run{i + 1}", None
    p = PurePath(str(source).rstrip("/\\") or ".")
    name = p.name
    while PurePath(name).suffix.lower() in _SUFFIXES and PurePath(name).stem:
        name = PurePath(name).stem
    parent = p.parent.name or None
    return _clean(name) or f"run{i + 1}", _clean(parent) if parent else None


def _clean(text: str) -> str:
    return _UNSAFE.sub("_", text).strip("._") [:80]


def run_names(fts: Sequence[Any]) -> list[str]:
    """One folder-safe name per fine-tune, in order, all different.

    The rule: the file name without its checkpoint suffixes (``ft_lr1e-4.safetensors`` ->
    ``ft_lr1e-4``; characters other than letters, digits and ``._+-`` become ``_``; an
    in-memory model is ``run<i>``, counting from 1). Names that several fine-tunes share
    are prefixed with their parent folder (``a/last.ckpt``, ``b/last.ckpt`` -> ``a-last``,
    ``b-last``); names still shared (the same file twice) get ``-2``, ``-3``, ... in the
    order given, the first keeping its name.
    """
    stems = [_stem(x, i) for i, x in enumerate(fts)]
    names = [s for s, _ in stems]
    shared = {n for n in names if names.count(n) > 1}
    names = [f"{parent}-{s}" if s in shared and parent else s for s, parent in stems]
    out: list[str] = []
    for n in names:
        name, k = n, 1
        while name in out:
            k += 1
            name = f"{n}-{k}"
        out.append(name)
    return out


def to_runs_csv(names: Sequence[str], results: Sequence[Mapping[str, Any]]) -> str:
    """The tidy CSV of many runs: one row per run and layer, the run's name first."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(RUNS_CSV_COLUMNS)
    for name, res in zip(names, results, strict=True):
        for row in csv_rows(res):
            w.writerow([name, *row])
    return buf.getvalue()


def runs_index(pre: str, names: Sequence[str], results: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The ``runs.json`` dict: the pretrained file, then per run its name, file, results
    file (relative to ``--out``) and verdict."""
    return {
        "schema": RUNS_SCHEMA,
        "pre": pre,
        "runs": [
            {
                "name": name,
                "ft": res["checkpoints"]["ft"]["path"],
                "results": f"runs/{name}/results.json",
                "verdict": res["summary"]["verdict"],
            }
            for name, res in zip(names, results, strict=True)
        ],
        "shared_pretrained_forward": True,
    }


def write_runs(
    out_dir: Path,
    pre: str,
    names: Sequence[str],
    results: Sequence[Mapping[str, Any]],
    formats: tuple[str, ...] = ("json", "csv"),
    figures: bool = True,
) -> None:
    """Write every run's results (and figures) under ``out_dir/runs/<name>/``, then the
    combined ``runs.csv``, ``runs.json`` and the multi-run depth profile.

    ``out_dir`` is the hidden folder of :meth:`cka_geo.commands._output.Output.replace`:
    a failure anywhere leaves the earlier ``--out`` as it was.
    """
    from cka_geo.compare.job import timed
    from cka_geo.report import write_results

    dirs = [out_dir / "runs" / name for name in names]
    for d in dirs:
        d.mkdir(parents=True)
    if figures:  # first, so that results.json records their time (settings.seconds, shared)
        from cka_geo.plotting import plot_all
        from cka_geo.plotting.runs import plot_runs_depth

        with timed(results[0]["settings"]):
            for d, res in zip(dirs, results, strict=True):
                plot_all(res, d)
            plot_runs_depth(names, results, out_dir / "depth_profile_runs.png")
    for d, res in zip(dirs, results, strict=True):
        write_results(res, d, formats)
    if "csv" in formats:
        write_text_atomic(out_dir / "runs.csv", to_runs_csv(names, results))
    if "json" in formats:
        text = json.dumps(runs_index(pre, names, results), indent=2, allow_nan=False) + "\n"
        write_text_atomic(out_dir / "runs.json", text)


__all__ = ["RUNS_CSV_COLUMNS", "RUNS_SCHEMA", "run_names", "runs_index", "to_runs_csv", "write_runs"]
