"""DOFA checkpoints: a timm ViT whose patch embedding is generated from wavelengths.

A DOFA encoder is recognised by ``patch_embed.weight_generator.*`` beside timm blocks
(torchgeo's released ``dofa_*_patch16_224`` files, raw; TerraTorch fine-tunes,
``state_dict`` → ``model.encoder.dofa_model.``). Everything but the patch embedding is
inferred as for any timm ViT (:func:`cka_geo.checkpoints.infer.infer_timm`); the patch size
and width come from ``fc_weight`` (p·p·D rows) and ``fc_bias`` (D rows).

The weights do not say which bands the model will see: the wavelengths are, first that
applies, the ``wavelengths`` given (µm, or Sentinel-2 / TerraTorch band names, or a band
count with a known Sentinel-2 selection), band names stored in the file (TerraTorch's
``model_bands`` / ``backbone_model_bands`` hyperparameters), else the 13 Sentinel-2 L1C bands
B1..B12 with B8A. The notes say which were used.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import torch

from cka_geo.checkpoints.infer import block_indices, infer_timm
from cka_geo.checkpoints.known import Hparams
from cka_geo.checkpoints.limits import MAX_HIDDEN, MAX_PATCH_SIZE, MAX_WIDTH, bounded, check_config
from cka_geo.errors import CheckpointError, UsageError
from cka_geo.models.dofa import S2_WAVELENGTHS, DofaConfig

_GEN = "patch_embed.weight_generator."
#: TerraTorch's band names (``dofa_vit.waves_list``) -> µm, beside the Sentinel-2 names.
TERRATORCH_WAVELENGTHS: dict[str, float] = {
    "COASTAL_AEROSOL": 0.44, "BLUE": 0.49, "GREEN": 0.56, "RED": 0.665, "RED_EDGE_1": 0.705,
    "RED_EDGE_2": 0.74, "RED_EDGE_3": 0.783, "NIR_BROAD": 0.832, "NIR_NARROW": 0.864,
    "WATER_VAPOR": 0.945, "CIRRUS": 1.373, "SWIR_1": 1.61, "SWIR_2": 2.20,
    "THERMAL_INFRARED_1": 10.90, "THERMAL_INFRARED_12": 12.00, "VV": 5.405, "VH": 5.405,
}  # fmt: skip
#: Hyperparameter names under which a file may store its band names.
BAND_KEYS = ("model_bands", "backbone_model_bands", "backbone_bands", "bands")

Wavelengths = Sequence[float] | Sequence[str] | int | None


def is_dofa(sd: dict[str, torch.Tensor]) -> bool:
    """Whether a timm-named encoder has DOFA's generated patch embedding."""
    return any(k.startswith(_GEN) for k in sd)


def _band_wavelength(name: str) -> float | None:
    key = name.split(".")[-1].strip().upper()
    if key in TERRATORCH_WAVELENGTHS:
        return TERRATORCH_WAVELENGTHS[key]
    if key.startswith("B") and key[1:].lstrip("0") in {b[1:] for b in S2_WAVELENGTHS}:
        return S2_WAVELENGTHS["B" + key[1:].lstrip("0")]
    return None


def resolve_wavelengths(
    wavelengths: Wavelengths, *, error: type[Exception] = UsageError
) -> tuple[list[float], str]:
    """(wavelengths in µm, how they were chosen) from what a user gave.

    Args:
        wavelengths: None (the 13 Sentinel-2 L1C bands), a band count with a known
            Sentinel-2 selection (13, 12, 10, 6, 4, 3, 1: as the embedded probe set serves
            them), band names (``"B8A"``, ``"B04"``, TerraTorch's ``"RED"``), or numbers (µm).
        error: The exception class for a refusal.

    Raises:
        error: One line: an unknown band count or name, a mix of names and numbers, or a
            wavelength that is not a positive number.
    """
    if wavelengths is None:
        return list(S2_WAVELENGTHS.values()), "the 13 Sentinel-2 L1C bands B1..B12 with B8A (default)"
    if isinstance(wavelengths, (bool, str, bytes)):
        raise error(f"wavelengths must be a list (µm or band names) or a band count, got {wavelengths!r}")
    if isinstance(wavelengths, int):
        from cka_geo.data.embedded import BAND_SELECTIONS

        if wavelengths not in BAND_SELECTIONS:
            raise error(
                f"DOFA needs the wavelengths of the input bands: no Sentinel-2 selection of "
                f"{wavelengths} bands is known (known: {sorted(BAND_SELECTIONS)}); pass "
                "wavelengths=[…] in µm or band names, one per band"
            )
        names = BAND_SELECTIONS[wavelengths]
        return [S2_WAVELENGTHS[n] for n in names], f"Sentinel-2 {' '.join(names)}"
    items: list[Any] = list(wavelengths)
    if not items:
        raise error("wavelengths is empty: give one per input band")
    if all(isinstance(w, str) for w in items):
        values = [_band_wavelength(w) for w in items]
        unknown = [w for w, v in zip(items, values, strict=True) if v is None]
        if unknown:
            raise error(
                f"unknown band name {unknown[0]!r} for DOFA (Sentinel-2 B1..B12, B8A, or "
                "TerraTorch names such as RED, NIR_NARROW); pass wavelengths in µm instead"
            )
        return [float(v) for v in values if v is not None], "band names " + " ".join(items)
    for w in items:
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not 0 < w < 1e6:
            raise error(f"wavelength {w!r} is not a positive number of µm (or a band name)")
    return [float(w) for w in items], "as given"


def stored_band_names(others: dict[str, Any]) -> tuple[list[str], str] | None:
    """A list of band names stored once in the file's plain entries (TerraTorch hparams)."""
    hits = {
        key: value
        for key, value in others.items()
        if key.split(".")[-1] in BAND_KEYS
        and isinstance(value, (list, tuple))
        and value
        and all(isinstance(v, str) for v in value)
    }
    distinct = {tuple(v) for v in hits.values()}
    if len(distinct) != 1:
        return None
    key = sorted(hits)[0]
    return list(hits[key]), key


def with_wavelengths(
    config: DofaConfig, wavelengths: Wavelengths, notes: list[str], *, error: type[Exception] = UsageError
) -> DofaConfig:
    """``config`` for other input bands (the generator's weights do not depend on them)."""
    wl, how = resolve_wavelengths(wavelengths, error=error)
    notes.append(f"DOFA: wavelengths (µm) used: {wl} ({how})")
    return dataclasses.replace(config, in_chans=len(wl), wavelengths=wl)


def _need(sd: dict[str, torch.Tensor], key: str, ndim: int) -> torch.Tensor:
    t = sd.get(key)
    if t is None or t.ndim != ndim:
        what = "missing" if t is None else f"of shape {tuple(t.shape)}, not {ndim}-D"
        raise CheckpointError(f"DOFA checkpoint: {key} is {what}")
    return t


def infer(
    sd: dict[str, torch.Tensor],
    hp: Hparams,
    layout: dict[str, object] | None,
    *,
    wavelengths: Wavelengths,
    others: dict[str, Any],
) -> DofaConfig:
    """DofaConfig of a DOFA encoder (timm keys relative to the prefix); adapts ``sd`` as
    :func:`~cka_geo.checkpoints.infer.infer_timm` does (zero biases, missing ``pos_embed``).

    Raises:
        CheckpointError: Missing or inconsistent generator keys, sizes beyond the limits,
            wavelengths that cannot be resolved (one line).
    """
    notes = hp.notes
    fc_bias = _need(sd, f"{_GEN}fc_bias.weight", 2)
    fc_weight = _need(sd, f"{_GEN}fc_weight.weight", 2)
    tokens = _need(sd, f"{_GEN}weight_tokens", 2)
    bounded(tokens.shape[0], 1, MAX_WIDTH, f"the number of weight tokens ({_GEN}weight_tokens)")
    _need(sd, "patch_embed.fclayer.w1.weight", 2)
    width = bounded(fc_bias.shape[0], 1, MAX_WIDTH, f"the width ({_GEN}fc_bias.weight dim 0)")
    dyn = bounded(fc_bias.shape[1], 1, MAX_WIDTH, f"the generator width ({_GEN}fc_bias.weight dim 1)")
    pp = fc_weight.shape[0] // width
    patch = math.isqrt(pp)
    if fc_weight.shape[0] % width or patch * patch != pp or tuple(fc_weight.shape[1:]) != (dyn,):
        raise CheckpointError(
            f"DOFA checkpoint: {_GEN}fc_weight.weight {tuple(fc_weight.shape)} is not "
            f"(patch² × {width}, {dyn})"
        )
    bounded(patch, 1, MAX_PATCH_SIZE, "the patch size (fc_weight rows / width)")
    layers = block_indices(
        sd, r"^patch_embed\.weight_generator\.transformer_encoder\.layers\.(\d{1,9})\."
    )
    if not layers:
        raise CheckpointError(f"DOFA checkpoint: no {_GEN}transformer_encoder.layers.0")
    hidden = _need(sd, f"{_GEN}transformer_encoder.layers.0.linear1.weight", 2).shape[0]
    bounded(hidden, 1, MAX_HIDDEN, "the generator's MLP width")
    given = wavelengths
    if given is None and (stored := stored_band_names(others)) is not None:
        given = stored[0]
        notes.append(f"DOFA: band names read from {stored[1]}")
    wl, how = resolve_wavelengths(given, error=CheckpointError)
    body = {k: v for k, v in sd.items() if not k.startswith("patch_embed.")}
    body["patch_embed.proj.weight"] = torch.empty(width, len(wl), patch, patch, device="meta")
    body["patch_embed.proj.bias"] = torch.empty(width, device="meta")
    base = infer_timm(body, hp, layout)
    sd.update({k: v for k, v in body.items() if not k.startswith("patch_embed.") and k not in sd})
    notes.append(
        f"DOFA: patch embedding generated from wavelengths (patch {patch}, generator width {dyn}, "
        f"{len(layers)} layer(s), 4 heads assumed, {tokens.shape[0]} weight tokens)"
    )
    notes.append(f"DOFA: wavelengths (µm) used: {wl} ({how}); pass wavelengths= for other bands")
    notes.append(
        f"DOFA: other image sizes than {base.img_size} resample pos_embed bicubically (timm); "
        "torchgeo's DOFA runs only at its own img_size"
    )
    try:
        config = DofaConfig(
            **{**base.to_dict(), "in_chans": len(wl), "dynamic_img_size": True},
            wavelengths=wl,
            dynamic_embed_dim=dyn,
            generator_layers=len(layers),
            generator_hidden=hidden,
            weight_tokens=tokens.shape[0],
        )
    except ValueError as exc:
        raise CheckpointError(f"DOFA checkpoint: inferred an impossible model: {exc}") from exc
    check_config(config, "inferred config")
    return config
