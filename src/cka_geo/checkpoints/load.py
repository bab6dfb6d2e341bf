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

from cka_geo.checkpoints import croma, dofa, infer, limits, resolve, terramind
from cka_geo.checkpoints.families import FAMILIES, TIMM_LIKE, UNSUPPORTED, check_keys, instantiate
from cka_geo.checkpoints.io import (
    BLOCKED_NOTE,
    TRUST_HINT,
    find_unreadable,
    json_metadata,
    read_checkpoint_file,
)
from cka_geo.checkpoints.save import MARKER
from cka_geo.errors import CheckpointError, UsageError

#: Encoder keys per family (relative to the prefix); anything else is ignored.
_TIMM_KEEP = ("patch_embed.", "blocks.", "norm.", "fc_norm.")
_TIMM_KEEP_EXACT = ("cls_token", "pos_embed")
_OPENCLIP_KEEP = ("conv1.", "ln_pre.", "transformer.", "ln_post.")
_OPENCLIP_KEEP_EXACT = ("class_embedding", "positional_embedding", "proj")
_HEAD_NAMES = ("num_heads", "heads", "n_heads")
#: Encoder parts of timm variants this ViT does not implement (refused, never ignored).
_TIMM_UNSUPPORTED = {
    "reg_token": "register tokens",
    "dist_token": "a distillation token (DeiT)",
    "norm_pre": "a pre-norm before the blocks (CLIP-style timm ViT)",
    "attn_pool": "attention pooling",
}


@dataclass
class LoadedCheckpoint:
    """An encoder read from a file, with how it was found.

    Attributes:
        path: The file.
        sha256: Hex digest of the file's bytes.
        family: ``"timm"``, ``"open_clip"``, ``"dofa"`` or ``"croma"``.
        state_dict: Encoder tensors, keys as the family's model names them (timm names for
            ViTs, open_clip names without ``visual.``); head and decoder excluded.
        config: :class:`~cka_geo.models.vit.ViTConfig` or
            :class:`~cka_geo.models.openclip.OpenClipVisionConfig`.
        prefix: The prefix chosen (containers and wrappers, dotted, e.g.
            ``"state_dict.module.base_encoder."``); ``""`` for a bare encoder.
        candidates: Every (prefix, number of blocks) with a block pattern, best first.
        ignored: Keys (dotted, as in ``prefix``) not part of the encoder.
        notes: Human-readable facts about the loading (unwrapping, assumptions, refusals).
        head: A timm ``head.*`` found beside the encoder (``build_model(head=True)``).
        extra: The extra entries of a file written by :func:`save_checkpoint`.
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
    wavelengths: dofa.Wavelengths = None,
) -> LoadedCheckpoint:
    """Read a checkpoint file and find its encoder.

    Args:
        path: A .safetensors, .pt, .pth, .ckpt or .bin file.
        trust: Allow full pickle loading (runs code from the file) when weights-only
            loading fails. Off by default; without it such files are read by a restricted
            unpickler that runs nothing, or refused.
        prefix: The encoder's prefix when the automatic choice is wrong (see
            ``LoadedCheckpoint.candidates``); a candidate or a unique suffix of one.
        num_heads: Attention heads; weights do not record them (default width / 64, or a
            value stored in the file).
        wavelengths: DOFA only: the input bands' wavelengths (µm), band names or a band
            count (default: band names stored in the file, else the 13 Sentinel-2 L1C
            bands); see :func:`cka_geo.checkpoints.dofa.resolve_wavelengths`. Noted and
            ignored for other families.

    Returns:
        The encoder and a report of how it was found.

    Raises:
        CheckpointError: One line naming the file: unreadable, refused, no encoder,
            unsupported family (Galileo, CROMA's joint encoder) or inconsistent keys.
    """
    p = Path(path)
    obj, metadata, notes = read_checkpoint_file(p, trust=trust)
    try:
        loaded = _resolve(
            p, obj, metadata, notes, prefix=prefix, num_heads=num_heads, wavelengths=wavelengths
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
    loaded.sha256 = _sha256(p)
    return loaded


def _resolve(
    p: Path,
    obj: Any,
    metadata: dict[str, str] | None,
    notes: list[str],
    *,
    prefix: str | None,
    num_heads: int | None,
    wavelengths: dofa.Wavelengths = None,
) -> LoadedCheckpoint:
    unreadable = find_unreadable(obj)
    if unreadable:
        notes.append("could not read (pickled objects not run): " + ", ".join(unreadable[:6]))
    project = _from_project_file(obj, metadata)
    if project is not None:
        family, config, sd, extra = project
        field_name = "heads" if family == "open_clip" else "num_heads"
        stored = getattr(config, field_name)
        if num_heads is not None and num_heads != stored:
            notes.append(f"num_heads={num_heads} as given (file says {stored})")
            config = dataclasses.replace(config, **{field_name: num_heads})
        limits.check_tensor_data(sd)
        head = _split_head(sd) if family in TIMM_LIKE else {}
        notes.append("written by cka-geo: config read from the file, nothing inferred")
        if family == "dofa" and wavelengths is not None:
            config = dofa.with_wavelengths(config, wavelengths, notes, error=CheckpointError)
        build_cfg = dataclasses.replace(config, num_classes=0) if family in TIMM_LIKE else config
        check_keys(family, build_cfg, sd)
        return LoadedCheckpoint(
            p,
            "",
            family,
            sd,
            config,
            "",
            [("", _depth(config))],
            [f"head.{k[5:]}" for k in head],
            notes,
            head,
            extra,
        )
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
    family = chosen.family if chosen.family in ("open_clip", "croma") else "timm"
    if chosen.family == "croma":
        keep, keep_exact = croma.KEEP, ()
    elif chosen.family == "terramind":
        keep, keep_exact = ("encoder.", "encoder_norm.", "encoder_embeddings."), ()
    elif family == "timm":
        keep, keep_exact = _TIMM_KEEP, _TIMM_KEEP_EXACT
    else:
        keep, keep_exact = _OPENCLIP_KEEP, _OPENCLIP_KEEP_EXACT
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
    if chosen.family == "terramind":
        used, modality = terramind.to_timm(sd, notes)
        ignored += [
            chosen.prefix + k
            for k in sd
            if k.startswith("encoder_embeddings.")
            and not k.startswith(f"encoder_embeddings.{modality}.")
        ]
        sd = used
    if family == "timm" and chosen.family == "timm":
        for part, what in _TIMM_UNSUPPORTED.items():
            if any(
                k == chosen.prefix + part or k.startswith(f"{chosen.prefix}{part}.")
                for k in flat.tensors
            ):
                raise CheckpointError(f"{what} ({chosen.prefix}{part}) is not supported")
    head = {
        k[len(chosen.prefix) :]: flat.tensors[k]
        for k in ignored
        if k.startswith(f"{chosen.prefix}head.")
    }
    if ignored:
        notes.append(f"ignored {len(ignored)} non-encoder keys: {resolve.summarise_keys(ignored)}")
    stored = resolve.find_hparam(flat.others, _HEAD_NAMES)
    family = "dofa" if family == "timm" and dofa.is_dofa(sd) else family
    if wavelengths is not None and family != "dofa":
        notes.append(f"wavelengths ignored: a {family} encoder, not DOFA")
    if family == "dofa":
        config: Any = dofa.infer(
            sd, notes, num_heads=num_heads, stored_heads=stored, wavelengths=wavelengths,
            others=flat.others,
        )
    elif family == "croma":
        config = croma.infer(
            sd, notes, num_heads=num_heads, prefix=chosen.prefix, tensors=flat.tensors
        )
    elif family == "timm":
        config = infer.infer_timm(sd, notes, num_heads=num_heads, stored_heads=stored)
    else:
        config = infer.infer_open_clip(sd, notes, num_heads=num_heads, stored_heads=stored)
    check_keys(family, config, sd)
    return LoadedCheckpoint(
        p,
        "",
        family,
        sd,
        config,
        chosen.prefix,
        [(c.prefix, c.num_blocks) for c in candidates],
        ignored,
        notes,
        head,
    )


def _depth(config: Any) -> int:
    return getattr(config, "depth", None) or getattr(config, "layers", 0)


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
    model = instantiate(loaded.family, config, "cpu")
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as exc:
        first = " ".join(str(exc).split())[:200]
        raise CheckpointError(f"{loaded.path}: weights do not fit the model ({first})") from exc
    return model.to(device).eval()
