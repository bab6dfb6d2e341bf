"""Which sublayers: canonical name -> module path, and the choice by names, kinds, blocks or pattern."""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

from torch import nn

from cka_geo.errors import UsageError
from cka_geo.sublayers import (
    DEFAULT_KINDS,
    KINDS,
    did_you_mean,
    normalize_block,
    parse,
)

_TIMM_BLOCK_RE = re.compile(r"(?:(.+)\.)?blocks\.(\d+)")


def _timm_sublayers(model: nn.Module) -> dict[str, str]:
    """Canonical name -> module path for a timm-named model (``[prefix.]blocks.{i}...``)."""
    modules = dict(model.named_modules())
    by_prefix: dict[str, list[int]] = {}
    for path in modules:
        m = _TIMM_BLOCK_RE.fullmatch(path)
        if m is not None:
            by_prefix.setdefault(m.group(1) or "", []).append(int(m.group(2)))
    if not by_prefix:
        raise UsageError(
            f"{type(model).__name__} has no canonical_sublayers() method and no timm-style "
            "'blocks.{i}' modules; implement canonical_sublayers() -> {canonical name: module path}"
        )
    if len(by_prefix) > 1:
        if "" not in by_prefix:
            found = sorted(f"{p}.blocks" for p in by_prefix)
            raise UsageError(
                f"{type(model).__name__}: several block stacks {found}; implement "
                "canonical_sublayers() to say which one is the encoder"
            )
        by_prefix = {"": by_prefix[""]}
    (prefix, indices), = by_prefix.items()
    base = f"{prefix}." if prefix else ""
    mapping: dict[str, str] = {}
    for i in sorted(indices):
        for suffix in ("attn", "mlp.fc1", "mlp.act", "mlp.fc2", ""):
            path = f"{base}blocks.{i}" + (f".{suffix}" if suffix else "")
            if path in modules:
                mapping[f"blocks.{i}" + (f".{suffix}" if suffix else "")] = path
    return mapping


def sublayer_map(model: nn.Module) -> dict[str, str]:
    """Canonical sublayer name -> module path in ``model``, in canonical order.

    Uses ``model.canonical_sublayers()`` where the model has it, else timm's paths. Every
    path is checked to exist.

    Args:
        model: The model.

    Returns:
        ``{canonical name: module path}``, block by block, then attn, fc1, act, fc2, block
        (names outside the canonical scheme last, in the model's order).

    Raises:
        UsageError: The model maps a name to a missing module, or has no block stack.

    Example:
        >>> from cka_geo.models.vit import ViTConfig, VisionTransformer
        >>> m = VisionTransformer(ViTConfig(img_size=8, patch_size=4, embed_dim=8, depth=1, num_heads=1))
        >>> list(sublayer_map(m))
        ['blocks.0.attn', 'blocks.0.mlp.fc1', 'blocks.0.mlp.act', 'blocks.0.mlp.fc2', 'blocks.0']
    """
    method = getattr(model, "canonical_sublayers", None)
    mapping = dict(method()) if callable(method) else _timm_sublayers(model)
    for name, path in mapping.items():
        try:
            model.get_submodule(path)
        except AttributeError:
            raise UsageError(
                f"{type(model).__name__}.canonical_sublayers() maps {name!r} to {path!r}, "
                "which is not a module of the model"
            ) from None
    order = list(mapping)

    def key(name: str) -> tuple[int, int, int]:
        parsed = parse(name)
        if parsed is None:
            return (1, 0, order.index(name))
        return (0, parsed[0], KINDS.index(parsed[1]))

    return {name: mapping[name] for name in sorted(mapping, key=key)}


def resolve_sublayers(
    model: nn.Module,
    names: str | Sequence[str] | None = None,
    *,
    kinds: Sequence[str] | None = None,
    blocks: Iterable[int] | None = None,
    pattern: str | None = None,
) -> list[str]:
    """Choose canonical sublayers of ``model`` by name, or by kind, block and pattern.

    Args:
        model: The model (see :func:`sublayer_map` for how its sublayers are found).
        names: Explicit canonical names (a module path of the model is accepted too and
            translated). Their order is kept. Excludes ``kinds``, ``blocks`` and
            ``pattern``.
        kinds: Subset of ``attn``, ``fc1``, ``act``, ``fc2``, ``block``. Default:
            :data:`DEFAULT_KINDS` (no ``act``) without a pattern, every kind with one.
        blocks: Block indices (negative counts from the end); default all.
        pattern: Regular expression searched (``re.search``) in each canonical name, e.g.
            ``r"mlp\\.fc1$"`` or ``r"^blocks\\.(0|11)$"``; applied after kinds and blocks.

    Returns:
        Canonical names: the caller's order for ``names``, else block by block, then attn,
        fc1, act, fc2, block.

    Raises:
        UsageError: An unknown name (the message lists close matches), kind or block index,
            a bad pattern, a duplicate, or an empty selection.

    Example:
        >>> from cka_geo.models.vit import ViTConfig, VisionTransformer
        >>> m = VisionTransformer(ViTConfig(img_size=8, patch_size=4, embed_dim=8, depth=3, num_heads=1))
        >>> resolve_sublayers(m, blocks=[-1])
        ['blocks.2.attn', 'blocks.2.mlp.fc1', 'blocks.2.mlp.fc2', 'blocks.2']
        >>> resolve_sublayers(m, pattern=r"fc1$", blocks=[0, 1])
        ['blocks.0.mlp.fc1', 'blocks.1.mlp.fc1']
        >>> resolve_sublayers(m, ["blocks.2", "blocks.0.attn"])
        ['blocks.2', 'blocks.0.attn']
    """
    mapping = sublayer_map(model)
    if names is not None:
        if kinds is not None or blocks is not None or pattern is not None:
            raise UsageError("give sublayer names, or kinds/blocks/pattern, not both")
        if isinstance(names, str):
            names = [names]
        by_path = {path: name for name, path in mapping.items()}
        out: list[str] = []
        for name in names:
            if not isinstance(name, str):
                raise UsageError(f"sublayer names must be strings, got {name!r}")
            canonical = name if name in mapping else by_path.get(name)
            if canonical is None:
                raise UsageError(
                    f"unknown sublayer {name!r} in {type(model).__name__}"
                    + (did_you_mean(name, [*mapping, *by_path]) or f" (known: {', '.join(list(mapping)[:5])}, ...)")
                )
            if canonical in out:
                raise UsageError(f"sublayer {canonical!r} given twice")
            out.append(canonical)
        if not out:
            raise UsageError("no sublayer names given")
        return out

    if kinds is None:
        kinds = KINDS if pattern is not None else DEFAULT_KINDS
    if isinstance(kinds, str):
        kinds = [kinds]
    for kind in kinds:
        if kind not in KINDS:
            raise UsageError(f"unknown sublayer kind {kind!r} (kinds: {', '.join(KINDS)}){did_you_mean(kind, KINDS)}")
    parsed = {name: parse(name) for name in mapping}
    present = {p[1] for p in parsed.values() if p is not None}
    missing = [k for k in kinds if k not in present]
    if missing:
        raise UsageError(f"{type(model).__name__} has no {'/'.join(missing)} sublayers")
    depth = 1 + max((p[0] for p in parsed.values() if p is not None), default=-1)
    wanted_blocks: set[int] | None = None
    if blocks is not None:
        wanted_blocks = set()
        for b in blocks:
            wanted_blocks.add(normalize_block(b, depth, "block index"))
    regex = None
    if pattern is not None:
        try:
            regex = re.compile(pattern)
        except re.error as exc:
            raise UsageError(f"bad sublayer pattern {pattern!r}: {exc}") from None
    out = []
    for name, p in parsed.items():
        if p is None or p[1] not in kinds:
            continue
        if wanted_blocks is not None and p[0] not in wanted_blocks:
            continue
        if regex is not None and not regex.search(name):
            continue
        out.append(name)
    if not out:
        raise UsageError(
            f"no sublayer matches kinds={list(kinds)}, blocks={sorted(wanted_blocks) if wanted_blocks is not None else 'all'}, "
            f"pattern={pattern!r}"
        )
    return out
