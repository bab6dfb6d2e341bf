"""The result of a cross-architecture comparison (``cka-geo compare A B --cross``).

Two checkpoints of different architectures (widths, depths, patch sizes, families) have no
"same layer": every sublayer of A is compared with every sublayer of B, and the result is
the full L_A x L_B matrix, with no diagonal and no own change. ``results.json`` is
:meth:`CrossResult.to_dict`: schema ``cka-geo/compare/v1`` with ``"mode": "cross"``
(docs/results-schema.md); :meth:`CrossResult.from_dict` reads one back, validating what it
uses with one-line :class:`~cka_geo.errors.DataError` messages naming the source.
"""

from __future__ import annotations

import csv
import io
import math
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from cka_geo.errors import DataError
from cka_geo.results import SCHEMA, _layer_names, _number, _typed_entries
from cka_geo.sublayers import parse

if TYPE_CHECKING:
    from cka_geo.results import CompareResult

MODE = "cross"
"""The ``mode`` of a cross-architecture result."""

CSV_COLUMNS = ("layer_pre", "block_pre", "kind_pre", "layer_ft", "block_ft", "kind_ft", "cka")
"""Columns of a cross result's ``results.csv``: one row per pair of layers."""


def _kind(name: str) -> tuple[int | None, str]:
    p = parse(name)
    return (p[0], p[1]) if p else (None, "other")


def _num(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


class CrossResult(dict):
    """Every sublayer of checkpoint A (rows, ``pre``) against every one of B (columns, ``ft``).

    Like :class:`~cka_geo.results.CompareResult`, the object is its JSON-ready dict.

    Attributes:
        layers_pre: A's canonical sublayer names (matrix rows), in forward order.
        layers_ft: B's (matrix columns).
        matrix: (L_A, L_B) CKA, NaN where undefined.
        settings: What the capture and the accumulator did.
        sections: ``models`` (family and config of each), ``checkpoints``, ``versions``.
        created: ISO time of the run.
    """

    def __init__(
        self,
        layers_pre: list[str],
        layers_ft: list[str],
        matrix: np.ndarray,
        settings: dict[str, Any],
        sections: dict[str, Any] | None = None,
        created: str | None = None,
    ) -> None:
        self.layers_pre, self.layers_ft = list(layers_pre), list(layers_ft)
        self.matrix = np.asarray(matrix, dtype=float)
        self.settings = settings
        self.sections = dict(sections or {})
        self.created = created
        super().__init__(self._as_dict())

    @property
    def best_match(self) -> dict[str, str | None]:
        """For each layer of A, the layer of B with the highest CKA (None if all undefined)."""
        out: dict[str, str | None] = {}
        for i, name in enumerate(self.layers_pre):
            row = self.matrix[i]
            out[name] = self.layers_ft[int(np.nanargmax(row))] if np.isfinite(row).any() else None
        return out

    @property
    def summary(self) -> dict[str, Any]:
        """The best match of every layer of A and a one-line verdict."""
        best = self.best_match
        last = self.layers_pre[-1]
        verdict = f"cross-architecture CKA of {len(self.layers_pre)} x {len(self.layers_ft)} sublayers"
        if best[last] is not None:
            j = self.layers_ft.index(best[last])  # type: ignore[arg-type]
            verdict += f"; the best match of pre's {last} is ft's {best[last]} (CKA {self.matrix[-1, j]:.4f})"
        return {"best_match": best, "verdict": verdict}

    def to_dict(self) -> dict[str, Any]:
        """The JSON-ready dict (NaN written as None), a plain copy."""
        return dict(self)

    def _as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "schema": SCHEMA,
            "mode": MODE,
            "created": self.created,
            "layers_pre": self.layers_pre,
            "kinds_pre": [_kind(n)[1] for n in self.layers_pre],
            "layers_ft": self.layers_ft,
            "kinds_ft": [_kind(n)[1] for n in self.layers_ft],
            "matrix": [[_num(v) for v in row] for row in self.matrix],
            "summary": self.summary,
            "settings": self.settings,
        }
        for key, value in self.sections.items():
            out.setdefault(key, value)
        return out

    @classmethod
    def from_dict(cls, results: Any, source: str = "results") -> CrossResult:
        """Validate a cross results dict and read it; DataError naming ``source`` otherwise."""
        if isinstance(results, CrossResult):
            return results
        if not isinstance(results, Mapping):
            raise DataError(f"{source}: expected a JSON object, got {type(results).__name__}")
        if results.get("schema") != SCHEMA or results.get("mode") != MODE:
            raise DataError(f"{source}: not a {SCHEMA} result of mode {MODE!r}")
        pre = _layer_names(results.get("layers_pre"), f"{source} (layers_pre)")
        ft = _layer_names(results.get("layers_ft"), f"{source} (layers_ft)")
        rows = results.get("matrix")
        if not isinstance(rows, list) or len(rows) != len(pre):
            raise DataError(f"{source}: 'matrix' must have {len(pre)} rows (one per layer of layers_pre)")
        matrix = np.empty((len(pre), len(ft)))
        for i, row in enumerate(rows):
            if not isinstance(row, list) or len(row) != len(ft):
                raise DataError(f"{source}: matrix row {i} must have {len(ft)} entries (one per layer of layers_ft)")
            matrix[i] = [_number(v, f"matrix[{i}][{j}]", source) for j, v in enumerate(row)]
        sections = {}
        for key in ("models", "checkpoints", "versions"):
            value = results.get(key)
            if value is not None and not isinstance(value, Mapping):
                raise DataError(f"{source}: '{key}' must be an object or null, got {type(value).__name__}")
            sections[key] = value
        from cka_geo.results import SETTING_TYPES

        settings = _typed_entries(results.get("settings"), "settings", SETTING_TYPES, source)
        created = results.get("created")
        return cls(pre, ft, matrix, settings, sections, created if isinstance(created, str) else None)


def load_any_results(path: str | os.PathLike[str]) -> CompareResult | CrossResult:
    """Read a ``results.json`` of either mode: a :class:`CrossResult` for ``--cross``, else
    a :class:`~cka_geo.results.CompareResult` (errors as :func:`cka_geo.results.load_results`)."""
    from cka_geo.results import CompareResult, read_results_json

    data = read_results_json(path)
    if isinstance(data, Mapping) and data.get("mode") == MODE:
        return CrossResult.from_dict(data, str(path))
    return CompareResult.from_dict(data, str(path))


def to_cross_csv(results: Mapping[str, Any]) -> str:
    """The tidy CSV of a cross result: one row per (A layer, B layer), as :data:`CSV_COLUMNS`."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CSV_COLUMNS)
    for i, a in enumerate(results["layers_pre"]):
        ba, ka = _kind(a)
        for j, b in enumerate(results["layers_ft"]):
            bb, kb = _kind(b)
            v = results["matrix"][i][j]
            w.writerow([a, ba, ka, b, bb, kb, "" if v is None else repr(float(v))])
    return buf.getvalue()


def format_cross(results: Mapping[str, Any]) -> str:
    """The verdict, then each layer of A with its best match in B, for a terminal."""
    s = results["settings"]
    best = results["summary"]["best_match"]
    rows = [
        f"CKA(A, B) across architectures ({s.get('kernel')} kernel, {s.get('estimator')}, {s.get('pooling')} "
        f"pooling, {s.get('samples')} samples): best match in B of each layer of A",
    ]
    width = max(len(n) for n in results["layers_pre"])
    for i, name in enumerate(results["layers_pre"]):
        b = best.get(name)
        v = results["matrix"][i][results["layers_ft"].index(b)] if b is not None else None
        rows.append(f"{name.ljust(width)}  {b or 'undefined'}" + (f"  {v:.4f}" if v is not None else ""))
    return "\n".join([*rows, "", results["summary"]["verdict"]])


__all__ = ["CSV_COLUMNS", "MODE", "CrossResult", "format_cross", "load_any_results", "to_cross_csv"]
