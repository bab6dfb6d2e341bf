"""``load_checkpoint`` and ``build_model``: from a file to an eval-mode encoder."""

from __future__ import annotations

import dataclasses
import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cka_geo.checkpoints import convert, croma, dofa, infer, limits, resolve
from cka_geo.checkpoints.families import FAMILIES, TIMM_LIKE, UNSUPPORTED, check_keys, instantiate
from cka_geo.checkpoints.io import (
    BLOCKED_NOTE,
    TRUST_HINT,
    find_unreadable,
    json_metadata,
    read_checkpoint_file,
)
from cka_geo.checkpoints.known import Hparams
from cka_geo.checkpoints.save import MARKER
from cka_geo.errors import CheckpointError, UsageError

#: Encoder parts of timm variants this ViT does not implement (refused, never ignored).
_TIMM_UNSUPPORTED = {
    "rope": "rotary position embeddings (EVA-02, DINOv3)",
    "pos_embed.rope": "rotary position embeddings (EVA-02, DINOv3)",
}


@dataclass
class LoadedCheckpoint:
    """An encoder read from a file, with how it was found.

    Attributes:
        path: The file.
        sha256: Hex digest of the file's bytes.
        family: ``"timm"`` (every ViT layout is converted into the timm-named ViT), ``"dofa"``
            (the ViT with DOFA's generated patch embedding) or ``"croma"``.
        state_dict: Encoder tensors with the family's model names (timm names for ViTs,
            converted from the file's layout); head and decoder excluded.
        config: :class:`~cka_geo.models.vit.ViTConfig`, ``DofaConfig`` or ``CromaConfig``.
        prefix: The prefix chosen (containers and wrappers, dotted, e.g.
            ``"state_dict.module.base_encoder."``); ``""`` for a bare encoder.
        candidates: Every (prefix, number of blocks) with a block pattern, best first.
        ignored: Keys (dotted, as in ``prefix``) not part of the encoder.
        notes: Human-readable facts about the loading (unwrapping, assumptions, refusals).
        head: A timm ``head.*`` found beside the encoder (``build_model(head=True)``).
        extra: The extra entries of a file written by :func:`save_checkpoint`.
        source: The layout the file came in: ``"timm"``, ``"open_clip"``, ``"hf_vit"``,
            ``"dinov2"``, ``"prithvi"``, ``"terramind"`` or ``"cka_geo"``.
        assumed: ``"field=value"`` for every hyperparameter assumed (not given, stored or a
            known fact of the family); each was also warned about (RuntimeWarning).
    """

    path: Path
    sha256: str
    family: str
    state_dict: dict[str, torch.Tensor]
    config: Any
    prefix: str = ""
    candidates: list[tuple[str, int]] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    head: dict[str, torch.Tensor] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    source: str = "timm"
    assumed: list[str] = field(default_factory=list)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _split_head(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: sd.pop(k) for k in [k for k in sd if k.startswith("head.")]}


def _from_project_file(
    obj: Any, metadata: dict[str, str] | None
) -> tuple[str, Any, dict, dict] | None:
    """(family, config, state dict, extra) of a file save_checkpoint wrote, else None.

    Everything stored is checked before use: the marker, the family, the config (types and
    limits, :func:`~cka_geo.checkpoints.limits.config_from_dict`), the extra entries and
    the state dict (str keys, tensors).
    """
    meta = json_metadata(metadata, MARKER)
    if meta is not None:
        if not isinstance(meta, dict) or "config" not in meta:
            raise CheckpointError(
                f"metadata {MARKER!r} is not a cka-geo record (an object with a 'config')"
            )
        family, cfg, sd, extra = (
            meta.get("family", "timm"),
            meta["config"],
            obj,
            meta.get("extra", {}),
        )
    elif (
        isinstance(obj, dict)
        and isinstance(obj.get(MARKER), dict)
        and isinstance(obj.get("config"), dict)
        and isinstance(obj.get("state_dict"), dict)
    ):
        family, cfg, sd = obj[MARKER].get("family", "timm"), obj["config"], obj["state_dict"]
        extra = {k: v for k, v in obj.items() if k not in ("state_dict", "config", MARKER)}
    else:
        return None
    if not isinstance(family, str) or family not in FAMILIES:
        shown = repr(family)[:40] if isinstance(family, str) else f"a {type(family).__name__}"
        raise CheckpointError(f"written by cka-geo with an unknown family {shown}")
    if not isinstance(extra, dict):
        raise CheckpointError(f"stored extra is a {type(extra).__name__}, not an object")
    bad = next(
        (k for k, v in sd.items() if not (isinstance(k, str) and isinstance(v, torch.Tensor))), None
    )
    if bad is not None:
        what = type(sd[bad]).__name__
        raise CheckpointError(
            f"stored state_dict entry {str(bad)[:80]!r} is a {what}, not a tensor"
        )
    return family, limits.config_from_dict(FAMILIES[family][0], cfg), dict(sd), extra


def load_checkpoint(
    path: str | os.PathLike[str],
    *,
    trust: bool = False,
    prefix: str | None = None,
    num_heads: int | None = None,
    norm_eps: float | None = None,
    act: str | None = None,
    img_size: int | tuple[int, int] | None = None,
    wavelengths: dofa.Wavelengths = None,
) -> LoadedCheckpoint:
    """Read a checkpoint file (or a Hugging Face ``save_pretrained`` folder) and find its encoder.

    Args:
        path: A .safetensors, .pt, .pth, .ckpt or .bin file, or a folder with
            ``config.json`` and ``model.safetensors`` / ``pytorch_model.bin`` (a
            ``config.json`` beside a Hugging Face weight file is read too).
        trust: Allow full pickle loading (runs code from the file) when weights-only
            loading fails. Off by default; without it such files are read by a restricted
            unpickler that runs nothing, or refused.
        prefix: The encoder's prefix when the automatic choice is wrong (see
            ``LoadedCheckpoint.candidates``); a candidate or a unique suffix of one.
        num_heads: Attention heads; weights do not record them (else stored in the file, a
            known fact of the family, or width / 64 with a warning).
        norm_eps: LayerNorm epsilon, to override what is stored / known / assumed.
        act: Activation (``gelu``, ``gelu_tanh``, ``quick_gelu``, ``silu``), likewise.
        img_size: Image size (``(height, width)`` for rectangular grids), likewise.
        wavelengths: DOFA only: the input bands' wavelengths (µm), band names or a band
            count (default: band names stored in the file, else the 13 Sentinel-2 L1C
            bands); see :func:`cka_geo.checkpoints.dofa.resolve_wavelengths`. Noted and
            ignored for other families.

    Returns:
        The encoder and a report of how it was found (``notes``, ``assumed``).

    Raises:
        CheckpointError: One line naming the file: unreadable, refused, no encoder,
            unsupported family (Galileo, CROMA's joint encoder) or architecture, inconsistent
            keys.
    """
    p = Path(path)
    files, config_json = convert.hf_folder(p)
    notes: list[str] = []
    objs = []
    metadata = None
    for f in files:
        obj, metadata, more = read_checkpoint_file(f, trust=trust)
        objs.append(obj)
        notes += more
    if len(objs) > 1:
        obj = {}
        for part in objs:
            obj.update(part)
        notes.append(f"merged {len(objs)} shards")
    given = {"num_heads": num_heads, "norm_eps": norm_eps, "act": act, "img_size": img_size}
    try:
        loaded = _resolve(
            files[0], obj, metadata, notes, prefix=prefix, given=given, config_json=config_json,
            wavelengths=wavelengths,
        )
    except CheckpointError as exc:
        msg = str(exc)
        restricted = [n for n in notes if n.startswith(BLOCKED_NOTE)]
        if restricted:
            blocked = restricted[0][len(BLOCKED_NOTE) :].split(";")[0]
            msg = (
                f"{p}: refused: weights-only loading is blocked by {blocked}, and the tensors "
                f"readable without it give no encoder ({msg}); {TRUST_HINT}"
            )
        raise CheckpointError(msg if msg.startswith(str(p)) else f"{p}: {msg}") from exc
    loaded.path = p
    loaded.sha256 = _sha256(files[0])
    return loaded


def _from_project(
    p: Path,
    project: tuple[str, Any, dict, dict],
    notes: list[str],
    given: dict[str, Any],
    wavelengths: dofa.Wavelengths = None,
) -> LoadedCheckpoint:
    family, config, sd, extra = project
    if family == "open_clip":  # written by cka-geo <= 0.x with the second model class
        sd, config = convert.legacy_open_clip(sd, config, notes)
        family = "timm"
    stored = config.num_heads
    heads = given.get("num_heads")
    if heads is not None and heads != stored:
        notes.append(f"num_heads={heads} as given (file says {stored})")
        config = dataclasses.replace(config, num_heads=heads)
    for name in ("norm_eps", "act", "img_size"):
        if given.get(name) is not None and hasattr(config, name):
            notes.append(f"{name}={given[name]} as given (file says {getattr(config, name)})")
            config = dataclasses.replace(config, **{name: given[name]})
    limits.check_tensor_data(sd)
    head = _split_head(sd) if family in TIMM_LIKE else {}
    notes.append("written by cka-geo: config read from the file, nothing inferred")
    if family == "dofa" and wavelengths is not None:
        config = dofa.with_wavelengths(config, wavelengths, notes, error=CheckpointError)
    build_cfg = dataclasses.replace(config, num_classes=0) if family in TIMM_LIKE else config
    check_keys(family, build_cfg, sd)
    return LoadedCheckpoint(
        p, "", family, sd, config, "", [("", _depth(config))],
        [f"head.{k[5:]}" for k in head], notes, head, extra, source="cka_geo",
    )


def _resolve(
    p: Path,
    obj: Any,
    metadata: dict[str, str] | None,
    notes: list[str],
    *,
    prefix: str | None,
    given: dict[str, Any],
    config_json: Path | None = None,
    stored: dict[str, tuple[Any, str]] | None = None,
    wavelengths: dofa.Wavelengths = None,
) -> LoadedCheckpoint:
    unreadable = find_unreadable(obj)
    if unreadable:
        notes.append("could not read (pickled objects not run): " + ", ".join(unreadable[:6]))
    project = _from_project_file(obj, metadata)
    if project is not None:
        return _from_project(p, project, notes, given, wavelengths)
    flat = resolve.flatten(obj)
    candidates = resolve.find_candidates(flat.tensors)
    croma.check_prefix(prefix)
    chosen = croma.check_choice(resolve.choose(candidates, prefix), candidates, prefix)
    if chosen.family in UNSUPPORTED:
        raise CheckpointError(UNSUPPORTED[chosen.family])
    containers, stripped = resolve.describe_prefix(chosen.prefix, flat.containers)
    if containers:
        where = "ckpt" + "".join(f"[{c!r}]" for c in containers)
        why = ""
        if containers[-1] == "teacher" and any(c[-1:] == ("student",) for c in flat.containers):
            why = " (DINO: the teacher is preferred over the student)"
        notes.append(f"unwrapped {where}{why}")
    if stripped:
        notes.append(f"stripped {stripped!r}")
    others = [c for c in candidates if c is not chosen]
    if others:
        listed = ", ".join(f"{c.prefix!r} ({c.num_blocks} blocks, {c.family})" for c in others)
        notes.append(
            f"chose {chosen.prefix!r} ({chosen.num_blocks} blocks); other candidates: {listed}"
        )
    keep, keep_exact = (croma.KEEP, ()) if chosen.family == "croma" else convert.KEEP[chosen.family]
    sd: dict[str, torch.Tensor] = {}
    ignored: list[str] = []
    for key, value in flat.tensors.items():
        rel = key[len(chosen.prefix) :] if key.startswith(chosen.prefix) else None
        if rel is not None and (rel in keep_exact or rel.startswith(keep)):
            sd[rel] = value
        else:
            ignored.append(key)
    limits.check_tensor_data(
        {**sd, **{k: flat.tensors[k] for k in ignored if k.startswith(f"{chosen.prefix}head.")}}
    )
    if chosen.family == "timm":
        for part, what in _TIMM_UNSUPPORTED.items():
            if any(k == chosen.prefix + part or k.startswith(f"{chosen.prefix}{part}.") for k in flat.tensors):
                raise CheckpointError(f"{what} ({chosen.prefix}{part}) is not supported")
    hp = Hparams(given={k: v for k, v in given.items() if v is not None}, notes=notes)
    sd, aside, layout = convert.to_timm(
        chosen.family, sd, flat.others, chosen.prefix, hp, config_json if chosen.family == "hf" else None
    )
    hp.stored.update(stored or {})
    ignored += [chosen.prefix + k for k in aside]
    head = {
        k[len(chosen.prefix) :]: flat.tensors[k]
        for k in ignored
        if k.startswith(f"{chosen.prefix}head.")
    }
    if ignored:
        notes.append(f"ignored {len(ignored)} non-encoder keys: {resolve.summarise_keys(ignored)}")
    family = chosen.family if chosen.family == "croma" else "dofa" if dofa.is_dofa(sd) else "timm"
    if wavelengths is not None and family != "dofa":
        notes.append(f"wavelengths ignored: a {family} encoder, not DOFA")
    if family == "dofa":
        config: Any = dofa.infer(sd, hp, layout, wavelengths=wavelengths, others=flat.others)
    elif family == "croma":
        config = croma.infer(sd, notes, num_heads=given.get("num_heads"), prefix=chosen.prefix, tensors=flat.tensors)
    else:
        config = infer.infer_timm(sd, hp, layout)
    check_keys(family, config, sd)
    hp.warn(p)  # the assumptions, once the encoder is known to be sound
    return LoadedCheckpoint(
        p, "", family, sd, config, chosen.prefix,
        [(c.prefix, c.num_blocks) for c in candidates], ignored, notes, head,
        source=family if family != "timm" else hp.family, assumed=list(hp.assumed),
    )


def _depth(config: Any) -> int:
    return int(getattr(config, "depth", None) or getattr(config, "layers", None) or 0)


def build_model(
    loaded: LoadedCheckpoint,
    *,
    device: str | torch.device = "cpu",
    head: bool = False,
    wavelengths: dofa.Wavelengths = None,
) -> nn.Module:
    """The encoder as an eval-mode model with the weights loaded strictly.

    Args:
        loaded: From :func:`load_checkpoint`.
        device: Where to put the model.
        head: For a timm model, also build and load the ``head`` found in the file
            (``num_classes`` from its shape). Default: encoder only.
        wavelengths: DOFA only: other input bands than those ``loaded`` was read for
            (µm, band names or a band count); the generated patch embedding follows them.

    Returns:
        A model with ``canonical_sublayers()``, ``num_prefix_tokens`` and ``batch_first``.
    """
    config = loaded.config
    sd = dict(loaded.state_dict)
    if wavelengths is not None:
        if loaded.family != "dofa":
            raise UsageError(f"{loaded.path}: wavelengths apply to DOFA only, not {loaded.family}")
        config = dofa.with_wavelengths(config, wavelengths, [])
    if loaded.family in TIMM_LIKE:
        classes = (
            loaded.head["head.weight"].shape[0] if head and "head.weight" in loaded.head else 0
        )
        if head and not classes:
            raise CheckpointError(f"{loaded.path}: no head.weight to build a head from")
        config = dataclasses.replace(config, num_classes=classes)
        if classes:
            sd.update(loaded.head)
    model = instantiate(loaded.family, config, "meta")
    if set(model.state_dict()) == {n for n, _ in model.named_parameters()} | {n for n, _ in model.named_buffers()}:
        # every tensor is in the state dict, which fills them all: no random init to throw away
        # (a second or more for a ViT-S on a CPU)
        model = model.to_empty(device="cpu")
    else:  # a non-persistent buffer is made by the constructor: build it for real
        model = instantiate(loaded.family, config, "cpu")
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as exc:
        first = " ".join(str(exc).split())[:200]
        raise CheckpointError(f"{loaded.path}: weights do not fit the model ({first})") from exc
    return model.to(device).eval()
