"""The result of a comparison, owned by the core: typed per-layer records, dict round trip.

:func:`cka_geo.compare.compare_checkpoints` returns a :class:`CompareResult`; the report
(table, JSON, CSV), the figures, the notebooks and the study consume it. ``results.json`` is
its :meth:`~CompareResult.to_dict` (schema ``cka-geo/compare/v1``, docs/results-schema.md),
and :meth:`~CompareResult.from_dict` reads one back, validating every field it uses with a
one-line :class:`~cka_geo.errors.DataError` naming the source. The result is also that dict
(``result["summary"]["verdict"]``, ``json.dumps(result)``), so code written against the plain
dict keeps working.

Example:
    >>> r = CompareResult.from_dict({
    ...     "schema": SCHEMA, "layers": ["blocks.0.attn", "blocks.0"],
    ...     "matrix": [[0.9, 0.5], [0.4, None]], "summary": {}, "settings": {}})
    >>> [(l.name, l.kind, l.block, l.cka) for l in r.layers]
    [('blocks.0.attn', 'attn', 0, 0.9), ('blocks.0', 'block', 0, None)]
    >>> r["diagonal"]
    {'blocks.0.attn': 0.9, 'blocks.0': None}
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cka_geo import walk
from cka_geo.errors import DataError, UsageError
from cka_geo.sublayers import parse

SCHEMA = "cka-geo/compare/v1"
"""The ``schema`` value of the results this module writes and reads."""

#: Types of the ``settings`` and ``summary`` entries readers rely on (None always allowed).
SETTING_TYPES: dict[str, tuple[type, ...]] = {
    "kernel": (str,),
    "estimator": (str,),
    "pooling": (str,),
    "rbf_frac": (int, float),
    "confidence": (int, float),
    "samples": (int,),
    "batches": (int,),
}
SUMMARY_TYPES: dict[str, tuple[type, ...]] = {"identical": (bool,), "verdict": (str,)}
_SECTIONS = ("model", "checkpoints", "versions", "rbf", "degenerate_batches", "weights")

Interval = tuple[float | None, float | None]


@dataclass(frozen=True)
class LayerRecord:
    """One sublayer of a comparison.

    Attributes:
        name: Canonical name (``blocks.3.mlp.fc1``).
        block: Block index, or None for a name outside the canonical scheme.
        kind: ``attn``, ``fc1``, ``act``, ``fc2``, ``block``, or ``other``.
        cka: Same-layer CKA(pre, ft), None where undefined (NaN).
        interval: Its bootstrap interval ``(lo, hi)``, or None.
        own: Own change CKA(pre, ft's sublayer on pre's input), or None.
        own_interval: Its interval, or None.
        weight_change: Relative Frobenius change of the sublayer's weights, or None.
    """

    name: str
    block: int | None
    kind: str
    cka: float | None
    interval: Interval | None = None
    own: float | None = None
    own_interval: Interval | None = None
    weight_change: float | None = None


class CompareResult(dict):
    """A comparison: per-layer records, the full matrix, the summary and the record of how.

    The object is also the ``cka-geo/compare/v1`` dict itself (a read-only snapshot made at
    construction), so ``result["summary"]["verdict"]`` and ``json.dumps(result)`` work as
    they did for the plain dict; the typed views are its attributes.

    Attributes:
        layers: One :class:`LayerRecord` per compared sublayer, in forward order.
        matrix: (L, L) CKA of every pretrained sublayer (rows) against every fine-tuned one
            (columns), NaN where undefined.
        summary: Verdict and the sublayers it names (:func:`cka_geo.compare.summarize`).
        settings: What the capture and the accumulator did (kernel, estimator, pooling, ...).
        sections: The other top-level records (``model``, ``checkpoints``, ``versions``,
            ``rbf``, ``degenerate_batches``), as JSON-ready dicts.
        created: ISO time of the run.
        schema: ``cka-geo/compare/v1``.
        own_computed: Whether the own-change view was computed (its values may all be
            undefined); default: whether any layer has one.
    """

    def __init__(
        self,
        layers: list[LayerRecord],
        matrix: np.ndarray,
        summary: dict[str, Any],
        settings: dict[str, Any],
        sections: dict[str, Any] | None = None,
        created: str | None = None,
        schema: str = SCHEMA,
        own_computed: bool | None = None,
    ) -> None:
        self.layers = list(layers)
        self.own_computed = any(r.own is not None for r in self.layers) if own_computed is None else own_computed
        self.matrix = np.asarray(matrix, dtype=float)
        self.summary = summary
        self.settings = settings
        self.sections = dict(sections or {})
        self.created = created
        self.schema = schema
        super().__init__(self._as_dict())

    # -- views ---------------------------------------------------------------------------

    @property
    def names(self) -> list[str]:
        """Layer names, in order."""
        return [r.name for r in self.layers]

    @property
    def diagonal(self) -> dict[str, float | None]:
        """Same-layer CKA per layer (None where undefined)."""
        return {r.name: r.cka for r in self.layers}

    @property
    def own_change(self) -> dict[str, float | None] | None:
        """Own-change CKA per layer, or None when it was not computed."""
        if not self.own_computed:
            return None
        return {r.name: r.own for r in self.layers}

    def layer(self, name: str) -> LayerRecord:
        """The record of ``name``."""
        for r in self.layers:
            if r.name == name:
                return r
        raise UsageError(f"no layer named {name!r} in this result")

    # -- dict round trip -----------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """The JSON-ready ``cka-geo/compare/v1`` dict (NaN written as None), a plain copy."""
        return dict(self)

    def _as_dict(self) -> dict[str, Any]:
        own = self.own_change
        out: dict[str, Any] = {
            "schema": self.schema,
            "created": self.created,
            "layers": self.names,
            "blocks": sorted({r.block for r in self.layers if r.block is not None}),
            "kinds": [r.kind for r in self.layers],
            "matrix": [[_num(v) for v in row] for row in self.matrix],
            "diagonal": self.diagonal,
            "intervals": {r.name: _pair(r.interval) for r in self.layers},
            "own_change": own,
            "own_change_intervals": None if own is None else {r.name: _pair(r.own_interval) for r in self.layers},
            "weights": {"relative_change": {r.name: r.weight_change for r in self.layers}},
            "summary": self.summary,
            "settings": self.settings,
        }
        for key, value in self.sections.items():
            out.setdefault(key, value)
        return out

    @classmethod
    def from_dict(cls, results: Any, source: str = "results") -> CompareResult:
        """Validate a results dict and read it; DataError naming ``source`` otherwise.

        Raises:
            DataError: Not an object, another schema, ``layers`` not a non-empty list of
                distinct names, a matrix whose shape does not match, a non-numeric value, a
                per-layer entry naming an unknown layer, or wrong-typed settings/summary.
        """
        if isinstance(results, CompareResult):
            return results
        if not isinstance(results, Mapping):
            raise DataError(f"{source}: expected a JSON object, got {type(results).__name__}")
        schema = results.get("schema")
        if results.get("mode") == "cross":
            raise DataError(
                f"{source}: a --cross result (every layer of A against every layer of B, no same-layer view): "
                "read it with cka_geo.results_cross.CrossResult.from_dict"
            )
        if schema != SCHEMA:
            raise DataError(f"{source}: schema is {_short(schema)}, expected {SCHEMA!r}")
        layers = _layer_names(results.get("layers"), source)
        n = len(layers)
        matrix = _matrix(results.get("matrix"), n, source)
        diagonal = _per_layer(results.get("diagonal"), layers, "diagonal", source)
        diagonal = np.diag(matrix).copy() if diagonal is None else np.where(np.isnan(diagonal), np.diag(matrix), diagonal)
        intervals = _per_layer_intervals(results.get("intervals"), layers, "intervals", source)
        own = _per_layer(results.get("own_change"), layers, "own_change", source)
        own_iv = _per_layer_intervals(results.get("own_change_intervals"), layers, "own_change_intervals", source)
        weights = results.get("weights")
        if weights is not None and not isinstance(weights, Mapping):
            raise DataError(f"{source}: 'weights' must be an object, got {type(weights).__name__}")
        change = _per_layer((weights or {}).get("relative_change"), layers, "weights.relative_change", source)
        records = []
        for i, name in enumerate(layers):
            parsed = parse(name)
            records.append(LayerRecord(
                name=name,
                block=parsed[0] if parsed else None,
                kind=parsed[1] if parsed else "other",
                cka=_num(diagonal[i]),
                interval=_interval(intervals, i),
                own=None if own is None else _num(own[i]),
                own_interval=_interval(own_iv, i),
                weight_change=None if change is None else _num(change[i]),
            ))
        sections = {}
        for key in _SECTIONS[:-1]:
            value = results.get(key)
            if value is not None and not isinstance(value, Mapping):
                raise DataError(f"{source}: '{key}' must be an object or null, got {type(value).__name__}")
            sections[key] = value
        return cls(
            layers=records,
            matrix=matrix,
            summary=_typed_entries(results.get("summary"), "summary", SUMMARY_TYPES, source),
            settings=_typed_entries(results.get("settings"), "settings", SETTING_TYPES, source),
            sections=sections,
            created=results.get("created") if isinstance(results.get("created"), str) else None,
            own_computed=own is not None,
        )


def load_results(path: str | os.PathLike[str]) -> CompareResult:
    """Read and validate a ``results.json`` written by ``cka-geo compare``.

    Raises:
        UsageError: The path does not exist or is a directory.
        DataError: The file is not valid UTF-8 JSON, is larger than
            :data:`cka_geo.walk.MAX_JSON_CHARS` bytes, nests deeper than
            :data:`cka_geo.walk.MAX_DEPTH` levels, or is not a ``cka-geo/compare/v1`` result.
    """
    return CompareResult.from_dict(read_results_json(path), str(path))


def read_results_json(path: str | os.PathLike[str]) -> Any:
    """The parsed JSON of a results file, read within the size and depth budgets (as
    :func:`load_results`, before its validation)."""
    p = Path(path)
    if not p.exists():
        raise UsageError(f"{p}: no such results file")
    if p.is_dir():
        raise UsageError(f"{p}: is a directory, expected a results.json file")
    try:
        size = p.stat().st_size
        if size > walk.MAX_JSON_CHARS:
            raise DataError(f"{p}: {size} bytes, more than {walk.MAX_JSON_CHARS}: not a results file")
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{p}: not a UTF-8 JSON file ({exc.reason})") from None
    except OSError as exc:
        raise DataError(f"{p}: cannot read ({exc.strerror or exc})") from None
    try:
        results = walk.loads_json(text, error=DataError, root_name="results")
    except json.JSONDecodeError as exc:
        raise DataError(f"{p}: invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from None
    except DataError as exc:
        raise DataError(f"{p}: {exc}") from None
    return results


# -- validation helpers ----------------------------------------------------------------------


def _num(x: Any) -> float | None:
    return None if x is None or not math.isfinite(float(x)) else float(x)


def _pair(iv: Interval | None) -> list[float | None] | None:
    return None if iv is None else [iv[0], iv[1]]


def _interval(ivs: np.ndarray | None, i: int) -> Interval | None:
    if ivs is None or np.isnan(ivs[i]).all():
        return None
    return _num(ivs[i, 0]), _num(ivs[i, 1])


def _short(value: Any, limit: int = 60) -> str:
    """``repr(value)``, cut to ``limit`` characters (a file's values can be huge)."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _layer_names(layers: Any, source: str) -> list[str]:
    if not isinstance(layers, list) or not layers or not all(isinstance(name, str) for name in layers):
        raise DataError(f"{source}: 'layers' must be a non-empty list of layer names")
    seen: set[str] = set()
    for name in layers:
        if name in seen:
            raise DataError(f"{source}: layer {_short(name)} appears twice in 'layers'")
        seen.add(name)
    return list(layers)


def _matrix(rows: Any, n: int, source: str) -> np.ndarray:
    if not isinstance(rows, list) or len(rows) != n:
        got = len(rows) if isinstance(rows, list) else type(rows).__name__
        raise DataError(f"{source}: 'matrix' must have {n} rows (one per layer), got {got}")
    matrix = np.empty((n, n))
    for i, row in enumerate(rows):
        if not isinstance(row, list) or len(row) != n:
            got = len(row) if isinstance(row, list) else type(row).__name__
            raise DataError(f"{source}: matrix row {i} must have {n} entries, got {got}")
        matrix[i] = [_number(v, f"matrix[{i}][{j}]", source) for j, v in enumerate(row)]
    return matrix


def _number(value: Any, where: str, source: str) -> float:
    """A float from a JSON value (``None`` is NaN); a one-line DataError otherwise."""
    if value is None:
        return math.nan
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        shown = _short(value) if isinstance(value, str) else f"a {type(value).__name__}"
        raise DataError(f"{source}: {where} is {shown}, expected a number or null")
    try:
        return float(value)
    except OverflowError:
        raise DataError(f"{source}: {where} is an integer too large for a float") from None


def _check_layer_keys(mapping: Any, layers: Sequence[str], key: str, what: str, source: str) -> bool:
    if mapping is None:
        return False
    if not isinstance(mapping, Mapping):
        raise DataError(f"{source}: '{key}' must be an object of layer -> {what}")
    unknown = sorted(set(mapping) - set(layers))
    if unknown:
        raise DataError(f"{source}: '{key}' names {_short(unknown[0])}, which is not in 'layers'")
    return True


def _per_layer(mapping: Any, layers: Sequence[str], key: str, source: str) -> np.ndarray | None:
    """Values of ``mapping[layer]`` in layer order (NaN where missing); None if no mapping."""
    if not _check_layer_keys(mapping, layers, key, "value", source):
        return None
    return np.array([_number(mapping.get(name), f"{key}[{name!r}]", source) for name in layers], dtype=float)


def _per_layer_intervals(mapping: Any, layers: Sequence[str], key: str, source: str) -> np.ndarray | None:
    """``[lo, hi]`` pairs in layer order (NaN rows where missing or null)."""
    if not _check_layer_keys(mapping, layers, key, "[lo, hi]", source):
        return None
    out = np.full((len(layers), 2), np.nan)
    for i, name in enumerate(layers):
        pair = mapping.get(name)
        if pair is None:
            continue
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            raise DataError(f"{source}: {key}[{name!r}] is {_short(pair)}, expected [lo, hi] or null")
        out[i] = [_number(v, f"{key}[{name!r}]", source) for v in pair]
    return out


def _typed_entries(mapping: Any, key: str, types: dict[str, tuple[type, ...]], source: str) -> dict[str, Any]:
    """``mapping`` as a dict (``{}`` if absent or null) whose entries in ``types`` have
    those types or are null; a one-line DataError otherwise."""
    if mapping is None:
        return {}
    if not isinstance(mapping, Mapping):
        raise DataError(f"{source}: '{key}' must be an object, got {type(mapping).__name__}")
    for name, allowed in types.items():
        value = mapping.get(name)
        if value is None:
            continue
        numeric = bool not in allowed and isinstance(value, bool)
        if numeric or not isinstance(value, allowed):
            expected = " or ".join(t.__name__ for t in allowed)
            raise DataError(f"{source}: {key}[{name!r}] is a {type(value).__name__}, expected {expected} or null")
        if float in allowed and not math.isfinite(_number(value, f"{key}[{name!r}]", source)):
            raise DataError(f"{source}: {key}[{name!r}] is {value}, expected a finite number")
    return dict(mapping)


__all__ = ["SCHEMA", "CompareResult", "LayerRecord", "load_results", "read_results_json"]
