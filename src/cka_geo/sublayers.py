"""The vocabulary of canonical sublayers: kinds, names, poolings and time modes.

Every module and the command line take these from here, so one word means one thing
everywhere. Per block i the canonical names are::

    blocks.{i}.attn       attention output after its projection, before the residual add
    blocks.{i}.mlp.fc1    MLP first linear layer, before the activation
    blocks.{i}.mlp.act    the same after the activation
    blocks.{i}.mlp.fc2    MLP second linear layer
    blocks.{i}            block output (the residual stream)

Example:
    >>> parse("blocks.3.mlp.fc1")
    (3, 'fc1')
    >>> canonical_name(3, "block"), kind_of("blocks.3"), block_of("blocks.3.attn")
    ('blocks.3', 'block', 3)
    >>> normalize_block(-1, depth=12)
    11
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable

from cka_geo.errors import UsageError

KINDS: tuple[str, ...] = ("attn", "fc1", "act", "fc2", "block")
"""Every sublayer kind, in the order used within a block."""

DEFAULT_KINDS: tuple[str, ...] = ("attn", "fc1", "fc2", "block")
"""Kinds compared when none are chosen (``act`` is fc1 after a fixed activation)."""

POOLINGS: tuple[str, ...] = ("mean", "cls", "flatten", "tokens")
"""Token poolings: mean over patch tokens, the class token, all tokens concatenated, or
each token an example."""

DEFAULT_POOLING = "mean"

TIME_MODES: tuple[str, ...] = ("frames", "mean")
"""Image time series: each frame an example, or features averaged over time."""

DEFAULT_TIME_MODE = "frames"

LABELS: dict[str, str] = {"attn": "attn", "fc1": "fc1", "act": "act", "fc2": "fc2", "block": "out"}
"""Short labels of the kinds for tables and figures (``block`` is the block's output)."""

#: canonical suffix after ``blocks.{i}`` -> kind
SUFFIX_KIND: dict[str, str] = {"attn": "attn", "mlp.fc1": "fc1", "mlp.act": "act", "mlp.fc2": "fc2", "": "block"}
#: kind -> canonical suffix
KIND_SUFFIX: dict[str, str] = {kind: suffix for suffix, kind in SUFFIX_KIND.items()}

_CANONICAL_RE = re.compile(r"blocks\.(\d+)(?:\.(attn|mlp\.fc1|mlp\.act|mlp\.fc2))?")


def parse(name: str) -> tuple[int, str] | None:
    """``"blocks.3.mlp.fc1"`` -> ``(3, "fc1")``; None for a name outside the scheme."""
    m = _CANONICAL_RE.fullmatch(name)
    if m is None:
        return None
    return int(m.group(1)), SUFFIX_KIND[m.group(2) or ""]


def canonical_name(block: int, kind: str) -> str:
    """The canonical name of ``kind`` in block ``block``."""
    if kind not in KIND_SUFFIX:
        raise UsageError(f"unknown sublayer kind {kind!r}; choose from {', '.join(KINDS)}")
    suffix = KIND_SUFFIX[kind]
    return f"blocks.{block}" + (f".{suffix}" if suffix else "")


def _parsed(name: str) -> tuple[int, str]:
    parsed = parse(name)
    if parsed is None:
        raise UsageError(f"{name!r} is not a canonical sublayer name (blocks.<i>[.attn|.mlp.fc1|.mlp.act|.mlp.fc2])")
    return parsed


def kind_of(name: str) -> str:
    """The kind of a canonical name (``"blocks.2.mlp.fc2"`` -> ``"fc2"``)."""
    return _parsed(name)[1]


def block_of(name: str) -> int:
    """The block index of a canonical name (``"blocks.2.mlp.fc2"`` -> 2)."""
    return _parsed(name)[0]


def sort_key(name: str) -> tuple[int, int]:
    """Forward order: by block, then attn, fc1, act, fc2, block output."""
    block, kind = _parsed(name)
    return block, KINDS.index(kind)


def normalize_block(index: int, depth: int, what: str = "block") -> int:
    """A block index in ``[-depth, depth)`` as its position in ``[0, depth)``.

    Raises:
        UsageError: Not an integer, or out of range, naming ``what``.
    """
    if isinstance(index, bool) or not isinstance(index, int) or not -depth <= index < depth:
        raise UsageError(f"{what} {index!r} out of range for a {depth}-block encoder (use 0..{depth - 1} or -{depth}..-1)")
    return index % depth


def did_you_mean(word: str, candidates: Iterable[str]) -> str:
    """``"; did you mean 'fc1'?"`` for close matches of ``word``, else ``""``."""
    matches = difflib.get_close_matches(word, list(candidates), n=3, cutoff=0.6)
    return f"; did you mean {', '.join(repr(m) for m in matches)}?" if matches else ""


def check_choice(value: str, choices: tuple[str, ...], what: str) -> str:
    """``value`` if it is one of ``choices``, else a UsageError naming ``what``."""
    if value not in choices:
        raise UsageError(f"unknown {what} {value!r}; choose from {', '.join(choices)}{did_you_mean(value, choices)}")
    return value


__all__ = [
    "DEFAULT_KINDS",
    "DEFAULT_POOLING",
    "DEFAULT_TIME_MODE",
    "KINDS",
    "KIND_SUFFIX",
    "LABELS",
    "POOLINGS",
    "SUFFIX_KIND",
    "TIME_MODES",
    "block_of",
    "canonical_name",
    "check_choice",
    "did_you_mean",
    "kind_of",
    "normalize_block",
    "parse",
    "sort_key",
]
