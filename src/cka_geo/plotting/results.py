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

from cka_geo.errors import DataError, UsageError

SCHEMA = "cka-geo/compare/v1"
"""The ``schema`` value of a results file this module reads."""

_NAME_RE = re.compile(r"^blocks\.(\d+)(?:\.(attn|mlp\.fc1|mlp\.act|mlp\.fc2))?$")
_SUFFIX_TYPE = {None: "block", "attn": "attn", "mlp.fc1": "fc1", "mlp.act": "act", "mlp.fc2": "fc2"}


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


def _number(value: Any, where: str, source: str) -> float:
    """A float from a JSON value (``None`` is NaN); a one-line DataError otherwise."""
    if value is None:
        return math.nan
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise DataError(f"{source}: {where} is {value!r}, expected a number or null")
    return float(value)


def _per_layer(mapping: Any, layers: Sequence[str], key: str, source: str) -> np.ndarray | None:
    """Values of ``mapping[layer]`` in layer order (NaN where missing); None if no mapping."""
    if mapping is None:
        return None
    if not isinstance(mapping, Mapping):
        raise DataError(f"{source}: '{key}' must be an object of layer -> value")
    unknown = sorted(set(mapping) - set(layers))
    if unknown:
        raise DataError(f"{source}: '{key}' names {unknown[0]!r}, which is not in 'layers'")
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
        raise DataError(f"{source}: '{key}' names {unknown[0]!r}, which is not in 'layers'")
    out = np.full((len(layers), 2), np.nan)
    for i, name in enumerate(layers):
        pair = mapping.get(name)
        if pair is None:
            continue
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            raise DataError(f"{source}: {key}[{name!r}] is {pair!r}, expected [lo, hi] or null")
        out[i] = [_number(v, f"{key}[{name!r}]", source) for v in pair]
    return out


def _parse(results: Any, source: str = "results") -> _Parsed:
    """Validate a results dict and turn it into arrays; DataError naming ``source``."""
    if not isinstance(results, Mapping):
        raise DataError(f"{source}: expected a JSON object, got {type(results).__name__}")
    schema = results.get("schema")
    if schema != SCHEMA:
        raise DataError(f"{source}: schema is {schema!r}, expected {SCHEMA!r}")
    layers = results.get("layers")
    if (
        not isinstance(layers, list)
        or not layers
        or not all(isinstance(name, str) for name in layers)
    ):
        raise DataError(f"{source}: 'layers' must be a non-empty list of layer names")
    if len(set(layers)) != len(layers):
        dup = next(name for name in layers if layers.count(name) > 1)
        raise DataError(f"{source}: layer {dup!r} appears twice in 'layers'")
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
    settings = results.get("settings")
    summary = results.get("summary")
    return _Parsed(
        layers=list(layers),
        matrix=matrix,
        diagonal=diagonal,
        intervals=intervals,
        own=own,
        own_intervals=own_intervals,
        blocks=blocks,
        types=types,
        settings=dict(settings) if isinstance(settings, Mapping) else {},
        summary=dict(summary) if isinstance(summary, Mapping) else {},
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
        DataError: The file is not valid UTF-8 JSON, or not a ``cka-geo/compare/v1`` result
            (wrong schema, matrix shape not matching the layers, non-numeric entries).
    """
    p = Path(path)
    if not p.exists():
        raise UsageError(f"{p}: no such results file")
    if p.is_dir():
        raise UsageError(f"{p}: is a directory, expected a results.json file")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{p}: not a UTF-8 JSON file ({exc.reason})") from None
    except OSError as exc:
        raise DataError(f"{p}: cannot read ({exc.strerror or exc})") from None
    try:
        results = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(
            f"{p}: invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}"
        ) from None
    _parse(results, str(p))
    return results
