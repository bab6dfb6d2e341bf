"""Finding the encoder in a checkpoint: unwrap containers, find block patterns, pick a prefix.

Every nested dict of the loaded object is flattened into dotted keys
(``ckpt["state_dict"]["module.base_encoder.blocks.0…"]`` becomes
``state_dict.module.base_encoder.blocks.0…``), so containers (``state_dict``, ``model``,
``teacher``, ``module``, CROMA's dict of dicts) and wrapper prefixes (``module.``,
``_orig_mod.``, ``model.``, ``encoder.``, ``backbone.``, ``base_encoder.``, ``vit_model.``,
``dofa_model.``, ``visual.``…) are one and the same thing: the part of a key before the
block pattern. A *candidate* is each distinct such prefix.

Rule for choosing among candidates (documented in docs/checkpoints.md), first that decides:

1. the user's ``prefix``, if given (an exact candidate, or a unique candidate ending with it);
2. a candidate with its patch embedding (``patch_embed.proj`` / ``conv1``) beats one without
   (MAE ``decoder_blocks``, Prithvi ``decoder.``);
3. a candidate whose prefix names none of ``decoder``, ``momentum``, ``student``, ``target``
   beats one that does (MoCo ``base_encoder`` over ``momentum_encoder``, DINO ``teacher``
   over ``student``);
4. more blocks; 5. the shorter prefix.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch

from cka_geo import walk
from cka_geo.errors import CheckpointError

#: (family, pattern of the fc1 weight of block i); the first pattern that matches a key wins.
BLOCK_PATTERNS: tuple[tuple[str, re.Pattern[str]], ...] = (
    (
        "open_clip",
        re.compile(r"^(?P<p>.*?)transformer\.resblocks\.(?P<i>\d{1,9})\.mlp\.c_fc\.weight$"),
    ),
    ("croma", re.compile(r"^(?P<p>.*?)transformer\.layers\.(?P<i>\d{1,9})\.1\.net\.0\.weight$")),
    ("timm", re.compile(r"^(?P<p>.*?)blocks\.(?P<i>\d{1,9})\.mlp\.(?:fc1|fc1_g|w12)\.weight$")),
    (
        "hf",
        re.compile(
            r"^(?P<p>.*?)(?:encoder\.layer|layers)\.(?P<i>\d{1,9})\."
            r"(?:intermediate\.dense|mlp\.fc1|mlp\.weights_in|mlp\.gate_proj)\.weight$"
        ),
    ),
    ("terramind", re.compile(r"^(?P<p>(?:.*\.)?)encoder\.(?P<i>\d{1,9})\.mlp\.fc1\.weight$")),
)
DEPRIORITISED = ("decoder", "momentum", "student", "target")


@dataclass
class Candidate:
    """One prefix under which a block pattern occurs."""

    prefix: str
    family: str
    indices: list[int] = field(default_factory=list)
    has_embed: bool = False

    @property
    def num_blocks(self) -> int:
        return len(self.indices)

    @property
    def deprioritised(self) -> bool:
        return any(word in self.prefix.lower() for word in DEPRIORITISED)

    def sort_key(self) -> tuple[bool, bool, int, int]:
        return (not self.has_embed, self.deprioritised, -self.num_blocks, len(self.prefix))


@dataclass
class Flat:
    """A loaded object flattened: tensors by dotted key, and the dict paths that held them."""

    tensors: dict[str, torch.Tensor]
    containers: set[tuple[str, ...]]
    others: dict[str, Any]


def _flatten_items(node: Any) -> Any:
    """Children for :func:`flatten`: a dict's items; a pickled module's parameters, buffers
    and submodules (under the module's own path); None for anything else (a leaf)."""
    if _module_like(node):
        buffers = node.get("_buffers")
        items = list(node["_parameters"].items())
        if isinstance(buffers, dict):
            items += buffers.items()
        return items + [(k, v) for k, v in node["_modules"].items() if isinstance(v, dict)]
    return node.items() if isinstance(node, dict) else None


def flatten(obj: Any) -> Flat:
    """Flatten nested dicts of tensors; non-tensor leaves are kept apart in ``others``.

    Goes through :func:`cka_geo.walk.walk`: no recursion, each dict read once (a dict
    shared by several entries is read under its first path only), within the walk's budget.
    """
    if isinstance(obj, torch.nn.Module):
        obj = obj.state_dict()
    if not isinstance(obj, dict):
        raise CheckpointError(f"holds a {type(obj).__name__}, not a dict of tensors")
    flat = Flat({}, set(), {})
    modules: set[tuple[Any, ...]] = {()} if _module_like(obj) else set()
    for path, value in walk.walk(obj, _flatten_items, error=CheckpointError):
        key = ".".join(str(k) for k in path)
        if isinstance(value, torch.Tensor):
            flat.tensors[key] = value
        elif isinstance(value, dict):
            if _module_like(value):
                modules.add(path)
            if path[:-1] not in modules:
                flat.containers.add(tuple(str(k) for k in path))
        else:
            flat.others[key] = value
    return flat


def _module_like(node: Any) -> bool:
    """The state of a pickled ``nn.Module`` (its ``__dict__``)."""
    return (
        isinstance(node, dict)
        and isinstance(node.get("_parameters"), dict)
        and isinstance(node.get("_modules"), dict)
    )


def _embed_key(family: str, prefix: str) -> str | None:
    return {
        "timm": "patch_embed.proj.weight",
        "open_clip": "conv1.weight",
        "hf": "embeddings.patch_embeddings.projection.weight",
    }.get(family)


def find_candidates(tensors: dict[str, torch.Tensor]) -> list[Candidate]:
    """All (prefix, family) pairs with a block pattern, best first by the module's rule."""
    found: dict[tuple[str, str], Candidate] = {}
    for key in tensors:
        for family, pattern in BLOCK_PATTERNS:
            m = pattern.match(key)
            if m:
                prefix = m["p"]
                if family == "timm" and f"{prefix}blocks.{m['i']}.attn.q.weight" in tensors:
                    family = "galileo"
                cand = found.setdefault((prefix, family), Candidate(prefix, family))
                cand.indices.append(int(m["i"]))
                break
    for cand in found.values():
        cand.indices.sort()
        embed = _embed_key(cand.family, cand.prefix)
        if cand.family == "terramind":
            cand.has_embed = any(k.startswith(f"{cand.prefix}encoder_embeddings.") for k in tensors)
        else:
            cand.has_embed = embed is None or f"{cand.prefix}{embed}" in tensors
        if cand.family == "open_clip" and not cand.has_embed:
            cand.family = "open_clip_text"
    return sorted(found.values(), key=Candidate.sort_key)


def choose(candidates: list[Candidate], prefix: str | None) -> Candidate:
    """Apply the user's prefix or the rule of this module; raise if nothing fits."""
    usable = [c for c in candidates if c.family != "open_clip_text"]
    if not candidates:
        raise CheckpointError(
            "no ViT blocks found (looked for '…blocks.{i}.mlp.fc1.weight', "
            "'…transformer.resblocks.{i}.mlp.c_fc.weight', 'encoder.{i}.mlp.fc1.weight')"
        )
    if prefix is None:
        if not usable:
            raise CheckpointError("only an open_clip text tower found (no visual.conv1)")
        return usable[0]
    exact = [c for c in candidates if c.prefix == prefix]
    matches = exact or [c for c in candidates if c.prefix.endswith(prefix)]
    if len(matches) != 1:
        listed = ", ".join(repr(c.prefix) for c in candidates)
        what = "matches several" if matches else "matches none"
        raise CheckpointError(f"prefix {prefix!r} {what} of the candidates: {listed}")
    return matches[0]


def describe_prefix(prefix: str, containers: set[tuple[str, ...]]) -> tuple[list[str], str]:
    """Split a flat prefix into the containers unwrapped and the wrapper prefix stripped."""
    best: tuple[str, ...] = ()
    for path in containers:
        joined = ".".join(path) + "."
        if prefix.startswith(joined) and len(path) > len(best):
            best = path
    stripped = prefix[len(".".join(best)) + 1 :] if best else prefix
    return list(best), stripped


def summarise_keys(keys: list[str], limit: int = 6) -> str:
    """'decoder_blocks.* (24), mask_token (1), …' grouped by leading non-numeric components."""

    def group(key: str) -> str:
        parts = key.split(".")
        head: list[str] = []
        for part in parts[:-1]:
            if part.isdigit() or len(head) == 3:
                break
            head.append(part)
        return ".".join(head) + ".*" if head else key

    groups = Counter(group(k) for k in keys)
    parts = [f"{name} ({n})" for name, n in groups.most_common(limit)]
    if len(groups) > limit:
        parts.append(f"… {len(groups) - limit} more groups")
    return ", ".join(parts)


def _hparam_items(node: Any) -> Any:
    """Children for :func:`find_hparam`: dict items and the attributes of plain objects."""
    if isinstance(node, dict):
        return node.items()
    if hasattr(node, "__dict__") and not isinstance(node, type) and isinstance(vars(node), dict):
        return vars(node).items()
    return None


def find_hparam(
    others: dict[str, Any], names: tuple[str, ...], accept: Any = None
) -> tuple[Any, str] | None:
    """A unique value stored under one of ``names`` in non-tensor entries (or Unreadable items).

    ``accept(value)`` says which values count (default: integers, not bools). Looks six
    levels below each entry of ``others`` at most, each container once.
    """
    if accept is None:
        def accept(v: Any) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)
    hits: dict[Any, str] = {}
    for path, value in walk.walk(others, _hparam_items, stop_at=7, error=CheckpointError):
        last = str(path[-1]).split(".")[-1]
        if last in names and accept(value):
            hashable = tuple(value) if isinstance(value, list) else value
            hits.setdefault(hashable, ".".join(str(k) for k in path))
    if len(hits) == 1:
        value, where = next(iter(hits.items()))
        return value, where
    return None
