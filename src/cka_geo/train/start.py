"""The start of a run on users' data: any checkpoint compare reads, fed by compare's rules.

``--bands`` (:func:`cka_geo.compare.inputs.pick_bands`), ``--normalize``
(:func:`cka_geo.data.normalize.resolve`) and ``--image-size``
(:func:`cka_geo.compare.inputs.at_size`: the position embedding resampled on the fly by the
family's rule) mean what they mean for compare; this module only calls them.

Patch-embedding band adaptation (:func:`adapt_patch_weight`), when the data feeds C' bands to a
model of C bands (after ``--bands``):

* ``names`` (the default ``auto`` when both sides have Sentinel-2 band names and share at
  least one): the kernel of a data band the model has is copied; a data band the model lacks
  starts at zero; a model band the data lacks is dropped. The adapted model on the data then
  equals the pretrained model on its own bands with the missing ones zero.
* ``mean`` (asked for with ``--band-rule mean``, or ``auto`` without names): every new kernel
  is the mean of the C kernels times C / C' (timm's ``adapt_input_conv`` scaling for other
  counts), so an image whose bands are all equal gives the pretrained model's embedding.
* otherwise (``auto`` without names, or ``names`` without a shared band) it is refused.

The model's band names are ``--model-bands`` or cka-geo's conventional order for its count
(3: B4 B3 B2; 13: B1..B12 with B8A; see :data:`cka_geo.data.BAND_SELECTIONS`); the data's are
those of its layout (Sen1Floods11: the 13 L1C bands; PASTIS: 10) or likewise by count.
DOFA generates its patch embedding from wavelengths: other bands are given to it by name.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn
from torch.utils.data import Dataset

from cka_geo.errors import CheckpointError, DataError, UsageError

BAND_RULES = ("auto", "names", "mean", "off")


def adapt_patch_weight(
    weight: torch.Tensor, model_names: Sequence[str] | None, data_names: Sequence[str] | None,
    data_bands: int, rule: str = "auto",
) -> tuple[torch.Tensor, str]:
    """The patch kernels (D, C', p, p) for the data's bands, and the rule used (module docstring).

    Raises:
        DataError: No rule applies (naming the band counts and what is missing).
    """
    c = weight.shape[1]
    if rule not in BAND_RULES:
        raise UsageError(f"--band-rule {rule!r}: choose one of {', '.join(BAND_RULES)}")
    shared = [n for n in (data_names or ()) if n in (model_names or ())]
    if rule == "off":  # no adaptation asked for (probe): compare's rule
        raise DataError(f"the data has {data_bands} bands, the model {c}; pick {c} with --bands")
    if rule == "auto":
        rule = "names" if shared else "off"
    if rule == "off" or (rule == "names" and not shared):
        why = "no shared band names" if model_names and data_names else "band names unknown"
        raise DataError(f"the data has {data_bands} bands, the model {c} ({why}) and no rule adapts them; pick {c} "
                        "with --bands, or pass --band-rule mean (each kernel the mean one x C / C')")
    out = weight.new_zeros((weight.shape[0], data_bands, *weight.shape[2:]))
    if rule == "mean":
        out[:] = (weight.mean(dim=1, keepdim=True) * (c / data_bands))
        return out, f"mean: every kernel the mean of the model's {c} x {c}/{data_bands}"
    names_m, names_d = list(model_names or ()), list(data_names or ())
    for j, name in enumerate(names_d):
        if name in names_m:
            out[:, j] = weight[:, names_m.index(name)]
    new = [n for n in names_d if n not in names_m]
    dropped = [n for n in names_m if n not in names_d]
    return out, (f"names: {' '.join(shared)} copied" + (f"; {' '.join(new)} start at zero" if new else "")
                 + (f"; {' '.join(dropped)} dropped" if dropped else ""))


class Prepared(Dataset):
    """A dataset whose images get the run's band selection and normalisation."""

    def __init__(self, base: Any, select: list[int] | None, norm: Any) -> None:
        self.base, self.select, self.norm = base, select, norm
        from cka_geo.train.tasks import dataset_targets

        sub = getattr(base, "dataset", None)
        self.targets = dataset_targets(base) if isinstance(getattr(sub, "targets", None), torch.Tensor) else None

    def __len__(self) -> int:
        """Items of the base dataset."""
        return len(self.base)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(image, target)`` with bands selected and normalised."""
        x, y = self.base[i]
        if self.select is not None:
            x = x[..., self.select, :, :]
        return (self.norm.apply(x) if self.norm.name != "none" else x), y


@dataclass
class Start:
    """What a run on users' data starts from: the encoder, the prepared splits, the record."""

    encoder: Any
    splits: dict[str, Prepared]
    data: Any
    record: dict[str, Any] = field(default_factory=dict)


def _data_names(data: Any, count: int) -> tuple[str, ...] | None:
    from cka_geo.compare.inputs import data_band_names
    from cka_geo.data.embedded import BAND_NAMES

    if data.layout == "sen1floods11" and count == 13:
        return tuple(BAND_NAMES)
    return data_band_names(count)


def plan_inputs(
    loaded: Any, data: Any, *, bands: Sequence[str] | None, normalize: str, image_size: Any,
    band_rule: str = "off", model_bands: Sequence[str] | None = None,
) -> tuple[list[int] | None, Any, dict[str, Any]]:
    """Band selection, normalisation and image size of ``data`` for ``loaded`` (compare's rules).

    Returns:
        ``(select, normalization, record)``; the record holds what was decided, including the
        band adaptation to apply (``record["adapt"]``), and is stored with the run.
    """
    from cka_geo.compare.inputs import at_size, canonical_band, parse_size, pick_bands
    from cka_geo.data.normalize import looks_raw, resolve

    x0 = data.splits["train"][0][0]
    have = _data_names(data, int(x0.shape[-3]))
    c_model = int(loaded.config.in_chans)
    select = None
    names = have
    if bands:
        n_fed = c_model if band_rule == "off" else len(bands)  # --band-rule off: compare's count rule
        select = pick_bands(bands, have, n_fed, f"{data.root} (--data)")
        names = tuple(have[i] for i in select)  # type: ignore[index]
    fed = len(select) if select is not None else int(x0.shape[-3])
    adapt: dict[str, Any] | None = None
    if fed != c_model:
        m_names = tuple(canonical_band(b) for b in model_bands) if model_bands else _model_names(c_model)
        if loaded.family == "dofa":
            if names is None:
                raise DataError(f"{data.root}: {fed} bands without Sentinel-2 names for a DOFA model; pass --bands")
            adapt = {"rule": "dofa wavelengths", "bands": list(names)}
        else:
            w = loaded.state_dict["patch_embed.proj.weight"]
            try:
                _, how = adapt_patch_weight(w, m_names, names, fed, band_rule)
            except DataError as exc:
                raise DataError(f"{data.root}: {exc}") from None
            adapt = {"band_rule": band_rule, "rule": how, "count": fed,
                     "model_bands": list(m_names) if m_names else None, "data_bands": list(names) if names else None}
    norm = resolve(normalize, fed, names, embedded=False, raw=looks_raw(x0))
    data_hw = (int(x0.shape[-2]), int(x0.shape[-1]))
    hw = parse_size(image_size) or data_hw
    if hw != data_hw:
        raise DataError(f"{data.root}: images are {data_hw[0]}x{data_hw[1]}, --image-size is {hw[0]}x{hw[1]} "
                        "(--data is not resized)")
    what = f"{data.root} (--data)" if image_size is None else "--image-size"
    resample = at_size(loaded, loaded, hw, what)
    record = {"bands": list(bands) if bands else None, "band_names": list(names) if names else None,
              "select": select, "normalize": norm.record(), "image_size": list(hw),
              "pos_embed_resample": resample, "adapt": adapt}
    return select, norm, record


def stored_normalization(record: dict[str, Any]) -> Any:
    """The :class:`~cka_geo.data.normalize.Normalization` a run recorded (``Normalization.record()``)."""
    from cka_geo.data.normalize import Normalization

    def tup(v: Any) -> tuple[float, ...] | None:
        return None if v is None else tuple(float(x) for x in v)

    return Normalization(str(record["name"]), float(record["scale"]), tup(record["mean"]), tup(record["std"]),
                         str(record["detail"]))


def _model_names(count: int) -> tuple[str, ...] | None:
    from cka_geo.compare.inputs import data_band_names

    return data_band_names(count)


def build_encoder(loaded: Any, record: dict[str, Any]) -> Any:
    """The encoder of ``loaded`` (train mode, gradients on), its patch embedding adapted as planned."""
    from cka_geo.checkpoints import build_model
    from cka_geo.models.vit import VisionTransformer

    if loaded.family not in ("timm", "dofa"):
        raise CheckpointError(f"{loaded.path}: fine-tuning needs a ViT (timm layout or DOFA), found {loaded.family}")
    adapt = record.get("adapt")
    if adapt and adapt["rule"] == "dofa wavelengths":
        enc = build_model(loaded, wavelengths=adapt["bands"])
    else:
        enc = build_model(loaded)
    enc = cast(VisionTransformer, enc)
    if adapt and adapt["rule"] != "dofa wavelengths":
        old = cast(nn.Conv2d, enc.patch_embed.proj)
        w, _ = adapt_patch_weight(old.weight.data, adapt["model_bands"], adapt["data_bands"], adapt["count"],
                                  adapt["band_rule"])
        new = nn.Conv2d(w.shape[1], w.shape[0], kernel_size=cast(Any, old.kernel_size), stride=cast(Any, old.stride),
                        padding=cast(Any, old.padding), bias=old.bias is not None)
        with torch.no_grad():
            new.weight.copy_(w)
            if old.bias is not None:
                cast(torch.Tensor, new.bias).copy_(old.bias)
        enc.patch_embed.proj = new
        enc.cfg = dataclasses.replace(enc.cfg, in_chans=int(w.shape[1]))
    enc.requires_grad_(True)
    return enc.train()


def prepare_start(
    checkpoint: str | Path, data: Any, *, trust: bool = False, prefix: str | None = None, num_heads: int | None = None,
    bands: Sequence[str] | None = None, normalize: str = "auto", image_size: Any = None,
    band_rule: str = "auto", model_bands: Sequence[str] | None = None,
) -> Start:
    """Load ``checkpoint`` (any format compare reads), plan the inputs, build the adapted encoder."""
    from cka_geo.checkpoints import load_checkpoint

    loaded = load_checkpoint(checkpoint, trust=trust, prefix=prefix, num_heads=num_heads)
    if loaded.family not in ("timm", "dofa"):
        raise CheckpointError(f"{checkpoint}: fine-tuning needs a ViT (timm layout or DOFA), found {loaded.family}")
    select, norm, record = plan_inputs(loaded, data, bands=bands, normalize=normalize, image_size=image_size,
                                       band_rule=band_rule, model_bands=model_bands)
    encoder = build_encoder(loaded, record)
    splits = {s: Prepared(d, select, norm) for s, d in data.splits.items()}
    return Start(encoder, splits, data, record)


__all__ = ["BAND_RULES", "Prepared", "Start", "adapt_patch_weight", "build_encoder", "plan_inputs", "prepare_start",
           "stored_normalization"]
