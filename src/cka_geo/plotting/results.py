"""Reading and validating ``results.json``: the schema, the parsed arrays, the errors."""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cka_geo import walk
from cka_geo.errors import DataError, UsageError

SCHEMA = "cka-geo/compare/v1"
"""The ``schema`` value of a results file this module reads."""

_NAME_RE = re.compile(r"^blocks\.(\d{1,9})(?:\.(attn|mlp\.fc1|mlp\.act|mlp\.fc2))?$")
_SUFFIX_TYPE = {None: "block", "attn": "attn", "mlp.fc1": "fc1", "mlp.act": "act", "mlp.fc2": "fc2"}
#: Types of the ``settings`` and ``summary`` entries the figures use (None always allowed).
_SETTING_TYPES: dict[str, tuple[type, ...]] = {
    "kernel": (str,),
    "estimator": (str,),
    "pooling": (str,),
    "rbf_frac": (int, float),
    "confidence": (int, float),
    "samples": (int,),
}
_SUMMARY_TYPES: dict[str, tuple[type, ...]] = {"identical": (bool,)}


@dataclass(frozen=True)
class _Parsed:
    """A validated results dict as arrays (NaN where the file has null)."""

    layers: list[str]
    matrix: np.ndarray  # (L, L)
    diagonal: np.ndarray  # (L,)
    intervals: np.ndarray | None  # (L, 2), NaN rows where absent
    own: np.ndarray | None  # (L,)
    own_intervals: np.ndarray | None  # (L, 2)
    blocks: list[int | None]  # block index of each layer (None: not a canonical name)
    types: list[str]  # sublayer type of each layer ("other" for non-canonical names)
    settings: dict[str, Any]
    summary: dict[str, Any]

    @property
    def n(self) -> int:
        return len(self.layers)

    @property
    def n_blocks(self) -> int:
        return len({b for b in self.blocks if b is not None}) or 1


def _short(value: Any, limit: int = 60) -> str:
    """``repr(value)``, cut to ``limit`` characters (a file's values can be huge)."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


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


def _per_layer(mapping: Any, layers: Sequence[str], key: str, source: str) -> np.ndarray | None:
    """Values of ``mapping[layer]`` in layer order (NaN where missing); None if no mapping."""
    if mapping is None:
        return None
    if not isinstance(mapping, Mapping):
        raise DataError(f"{source}: '{key}' must be an object of layer -> value")
    unknown = sorted(set(mapping) - set(layers))
    if unknown:
        raise DataError(f"{source}: '{key}' names {_short(unknown[0])}, which is not in 'layers'")
    return np.array(
        [_number(mapping.get(name), f"{key}[{name!r}]", source) for name in layers], dtype=float
    )


def _per_layer_intervals(
    mapping: Any, layers: Sequence[str], key: str, source: str
) -> np.ndarray | None:
    """``[lo, hi]`` pairs in layer order (NaN rows where missing or null)."""
    if mapping is None:
        return None
    if not isinstance(mapping, Mapping):
        raise DataError(f"{source}: '{key}' must be an object of layer -> [lo, hi]")
    unknown = sorted(set(mapping) - set(layers))
    if unknown:
        raise DataError(f"{source}: '{key}' names {_short(unknown[0])}, which is not in 'layers'")
    out = np.full((len(layers), 2), np.nan)
    for i, name in enumerate(layers):
        pair = mapping.get(name)
        if pair is None:
            continue
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            raise DataError(
                f"{source}: {key}[{name!r}] is {_short(pair)}, expected [lo, hi] or null"
            )
        out[i] = [_number(v, f"{key}[{name!r}]", source) for v in pair]
    return out


def _typed_entries(
    mapping: Any, key: str, types: dict[str, tuple[type, ...]], source: str
) -> dict[str, Any]:
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
            raise DataError(
                f"{source}: {key}[{name!r}] is a {type(value).__name__}, expected {expected} or null"
            )
        if float in allowed and not math.isfinite(_number(value, f"{key}[{name!r}]", source)):
            raise DataError(f"{source}: {key}[{name!r}] is {value}, expected a finite number")
    return dict(mapping)


def _parse(results: Any, source: str = "results") -> _Parsed:
    """Validate a results dict and turn it into arrays; DataError naming ``source``."""
    if not isinstance(results, Mapping):
        raise DataError(f"{source}: expected a JSON object, got {type(results).__name__}")
    schema = results.get("schema")
    if schema != SCHEMA:
        raise DataError(f"{source}: schema is {_short(schema)}, expected {SCHEMA!r}")
    layers = results.get("layers")
    if (
        not isinstance(layers, list)
        or not layers
        or not all(isinstance(name, str) for name in layers)
    ):
        raise DataError(f"{source}: 'layers' must be a non-empty list of layer names")
    seen: set[str] = set()
    for name in layers:
        if name in seen:
            raise DataError(f"{source}: layer {_short(name)} appears twice in 'layers'")
        seen.add(name)
    n = len(layers)
    rows = results.get("matrix")
    if not isinstance(rows, list) or len(rows) != n:
        got = len(rows) if isinstance(rows, list) else type(rows).__name__
        raise DataError(f"{source}: 'matrix' must have {n} rows (one per layer), got {got}")
    matrix = np.empty((n, n))
    for i, row in enumerate(rows):
        if not isinstance(row, list) or len(row) != n:
            got = len(row) if isinstance(row, list) else type(row).__name__
            raise DataError(f"{source}: matrix row {i} must have {n} entries, got {got}")
        matrix[i] = [_number(v, f"matrix[{i}][{j}]", source) for j, v in enumerate(row)]

    diagonal = _per_layer(results.get("diagonal"), layers, "diagonal", source)
    if diagonal is None:
        diagonal = np.diag(matrix).copy()
    else:  # a layer the diagonal omits falls back to the matrix
        diagonal = np.where(np.isnan(diagonal), np.diag(matrix), diagonal)
    intervals = _per_layer_intervals(results.get("intervals"), layers, "intervals", source)
    own = _per_layer(results.get("own_change"), layers, "own_change", source)
    own_intervals = _per_layer_intervals(
        results.get("own_change_intervals"), layers, "own_change_intervals", source
    )
    if own is not None and np.isnan(own).all():
        own, own_intervals = None, None

    blocks: list[int | None] = []
    types: list[str] = []
    for name in layers:
        m = _NAME_RE.match(name)
        blocks.append(int(m.group(1)) if m else None)
        types.append(_SUFFIX_TYPE[m.group(2)] if m else "other")
    settings = _typed_entries(results.get("settings"), "settings", _SETTING_TYPES, source)
    summary = _typed_entries(results.get("summary"), "summary", _SUMMARY_TYPES, source)
    return _Parsed(
        layers=list(layers),
        matrix=matrix,
        diagonal=diagonal,
        intervals=intervals,
        own=own,
        own_intervals=own_intervals,
        blocks=blocks,
        types=types,
        settings=settings,
        summary=summary,
    )


def validate_results(results: Any, source: str = "results") -> None:
    """Check that ``results`` is a readable ``cka-geo/compare/v1`` dict.

    Args:
        results: The dict (as written by ``compare``; ``null`` entries may be ``None`` or NaN).
        source: What to call it in error messages (a file name, say).

    Raises:
        DataError: Wrong schema, a matrix whose shape does not match ``layers``, a
            non-numeric value, or a per-layer entry naming an unknown layer.
    """
    _parse(results, source)


def load_results(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and validate a ``results.json`` written by ``cka-geo compare``.

    Args:
        path: The JSON file.

    Returns:
        The parsed dict, unchanged (``null`` stays ``None``).

    Raises:
        UsageError: The path does not exist or is a directory.
        DataError: The file is not valid UTF-8 JSON, is larger than
            :data:`cka_geo.walk.MAX_JSON_CHARS` bytes, nests deeper than
            :data:`cka_geo.walk.MAX_DEPTH` levels, or is not a ``cka-geo/compare/v1`` result
            (wrong schema, matrix shape not matching the layers, wrong-typed entries).
    """
    p = Path(path)
    if not p.exists():
        raise UsageError(f"{p}: no such results file")
    if p.is_dir():
        raise UsageError(f"{p}: is a directory, expected a results.json file")
    try:
        size = p.stat().st_size
        if size > walk.MAX_JSON_CHARS:
            raise DataError(
                f"{p}: {size} bytes, more than {walk.MAX_JSON_CHARS}: not a results file"
            )
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{p}: not a UTF-8 JSON file ({exc.reason})") from None
    except OSError as exc:
        raise DataError(f"{p}: cannot read ({exc.strerror or exc})") from None
    try:
        results = walk.loads_json(text, error=DataError, root_name="results")
    except json.JSONDecodeError as exc:
        raise DataError(
            f"{p}: invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}"
        ) from None
    except DataError as exc:
        raise DataError(f"{p}: {exc}") from None
    _parse(results, str(p))
    return results
