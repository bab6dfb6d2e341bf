"""How probe images are scaled before they reach the model (``--normalize``).

Sentinel-2 L1C/L2A products store reflectance x 10000 as uint16 digital numbers (DN). The
presets, each applied per band as ``(x - mean) / std``:

* ``none``: the values as given (no scaling at all).
* ``imagenet``: RGB models pretrained on natural images. Reflectance in [0, 1] (DN / 10000)
  then the ImageNet statistics mean (0.485, 0.456, 0.406), std (0.229, 0.224, 0.225)
  (torchvision / timm ``IMAGENET_DEFAULT_MEAN`` / ``IMAGENET_DEFAULT_STD``). Three bands
  only, in R, G, B order (``--bands B04 B03 B02``).
* ``s2-div10000`` (alias ``ssl4eo``): DN / 10000, reflectance in about [0, 1]; the
  scaling of the SSL4EO-S12 weights in torchgeo (``K.Normalize(mean=0, std=10000)``,
  torchgeo ``models/vit.py`` ``_ssl4eo_s12_transforms``) for L1C and L2A alike, and of
  most GeoFMs that take reflectance. L2A products of processing baseline 04.00 and later
  (from 25 January 2022) carry an offset of +1000 DN (``BOA_ADD_OFFSET``): subtract it
  before, or use a mean/std file.
* ``scene``: z-score per band by the embedded scene's own statistics
  (:func:`cka_geo.data.embedded.band_statistics`), the embedded probes' normalisation
  before presets existed. Needs Sentinel-2 band names (the embedded set, or ``--bands``).
* a ``.json`` file ``{"mean": [...], "std": [...]}`` with one value per band, applied to
  the values as given (DN for raw data).
* ``auto``: from the model and its bands: a 3-band model gets ``imagenet`` on reflectance,
  any other the ``scene`` z-score on the embedded set; user ``--data`` is used as given
  unless it holds raw DNs, which are then scaled to reflectance (``s2-div10000``, or
  ``imagenet`` for 3 bands).

Raw DNs are recognised by an integer dtype or values far above reflectance (max > 100).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cka_geo.errors import DataError, UsageError

#: Sentinel-2 products: reflectance = DN / QUANTIFICATION_VALUE (L1C and L2A).
S2_SCALE = 10000.0
#: ImageNet statistics of RGB in [0, 1] (torchvision, timm IMAGENET_DEFAULT_MEAN/STD).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: Values above this are not reflectance: raw digital numbers.
RAW_DN_MAX = 100.0
PRESETS = ("auto", "none", "imagenet", "s2-div10000", "ssl4eo", "scene")


@dataclass(frozen=True)
class Normalization:
    """A resolved normalisation: ``((x / scale) - mean) / std`` per band.

    Attributes:
        name: The preset (``imagenet``, ``s2-div10000``, ``scene``, ``none``) or the file.
        scale: Divisor applied first (10000 for DN -> reflectance, 1 for none).
        mean: Per-band means after scaling (None for none).
        std: Per-band standard deviations after scaling (None for none).
        detail: One line for the record: the numbers and where they come from.
    """

    name: str
    scale: float = 1.0
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    detail: str = "values as given"

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise (..., C, H, W) float images; returns float32."""
        out = x.to(torch.float64)
        if self.scale != 1.0:
            out = out / self.scale
        if self.mean is not None and self.std is not None:
            shape = (len(self.mean), 1, 1)
            mean = torch.tensor(self.mean, dtype=torch.float64).reshape(shape)
            std = torch.tensor(self.std, dtype=torch.float64).reshape(shape)
            out = (out - mean) / std
        return out.to(torch.float32)

    def record(self) -> dict[str, object]:
        """The dict of results.json ``settings.normalize``."""
        return {
            "name": self.name,
            "scale": self.scale,
            "mean": list(self.mean) if self.mean is not None else None,
            "std": list(self.std) if self.std is not None else None,
            "detail": self.detail,
        }


def check_preset(value: str) -> None:
    """Refuse an unknown ``--normalize`` (a preset name or an existing .json file)."""
    if value in PRESETS:
        return
    if not value.endswith(".json"):
        raise UsageError(f"--normalize {value!r}: choose from {', '.join(PRESETS)} or a .json mean/std file")


def looks_raw(x: torch.Tensor | np.ndarray) -> bool:
    """Whether images hold raw integer DNs: an integer dtype, or values above reflectance."""
    if isinstance(x, np.ndarray):
        if np.issubdtype(x.dtype, np.integer):
            return True
        return bool(x.size) and float(np.nanmax(np.abs(x))) > RAW_DN_MAX
    if not x.is_floating_point():
        return True
    return bool(x.numel()) and float(x.abs().max()) > RAW_DN_MAX


def resolve(
    value: str, bands: int, band_names: tuple[str, ...] | None, *, embedded: bool, raw: bool
) -> Normalization:
    """The normalisation ``--normalize value`` means for these probes.

    Args:
        value: A preset of :data:`PRESETS` or a .json file.
        bands: The model's band count.
        band_names: Sentinel-2 band names of the probes, when known.
        embedded: Whether the probes are the embedded scene's (raw DNs, before scaling).
        raw: Whether the probes hold raw DNs (always for the embedded set).

    Raises:
        UsageError: A preset that does not fit the bands; a bad file (naming it).
        DataError: Raw DNs with ``none`` (one line with the advice).
    """
    check_preset(value)
    if value == "auto":
        if embedded or raw:
            value = "imagenet" if bands == 3 else "scene" if embedded else "s2-div10000"
        else:
            value = "none"  # user data that is not raw DN: as given
    if value == "none":
        if raw and not embedded:
            raise DataError(
                "--data holds raw integer DNs (values >> 1): pass --normalize s2-div10000 "
                "(reflectance), imagenet (RGB), scene or a mean/std .json"
            )
        return Normalization("none")
    if value == "imagenet":
        if bands != 3:
            raise UsageError(f"--normalize imagenet: takes 3 bands (R, G, B), the model has {bands}")
        scale = S2_SCALE if raw else 1.0
        how = "DN / 10000 to reflectance, then " if raw else ""
        return Normalization(
            "imagenet", scale, IMAGENET_MEAN, IMAGENET_STD,
            f"{how}ImageNet mean {IMAGENET_MEAN} std {IMAGENET_STD} (torchvision/timm IMAGENET_DEFAULT_*)",
        )
    if value in ("s2-div10000", "ssl4eo"):
        if not raw:
            return Normalization("s2-div10000", 1.0, None, None, "values already reflectance: kept as given")
        return Normalization(
            "s2-div10000", S2_SCALE, None, None,
            "DN / 10000 (SSL4EO-S12 in torchgeo: K.Normalize(mean=0, std=10000))",
        )
    if value == "scene":
        if band_names is None:
            raise UsageError("--normalize scene: needs Sentinel-2 band names (pass --bands)")
        from cka_geo.data.embedded import band_statistics

        mean, std = band_statistics(list(band_names))
        return Normalization(
            "scene", 1.0, tuple(float(m) for m in mean), tuple(float(s) for s in std),
            "z-score per band by the embedded scene's mean and std (DN, ddof 0)",
        )
    return _from_file(Path(value), bands)


def _from_file(path: Path, bands: int) -> Normalization:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise UsageError(f"{path}: no such file (--normalize)") from None
    except (OSError, ValueError) as exc:
        raise UsageError(f"{path}: cannot read a mean/std JSON (--normalize): {exc}") from None
    if not isinstance(data, dict) or "mean" not in data or "std" not in data:
        raise UsageError(f"{path}: expected {{\"mean\": [...], \"std\": [...]}} (--normalize)")
    try:
        mean = tuple(float(v) for v in data["mean"])
        std = tuple(float(v) for v in data["std"])
    except (TypeError, ValueError):
        raise UsageError(f"{path}: mean and std must be lists of numbers (--normalize)") from None
    if len(mean) != bands or len(std) != bands:
        raise UsageError(f"{path}: {len(mean)} means and {len(std)} stds for a {bands}-band model (--normalize)")
    if not all(np.isfinite(mean)) or not all(np.isfinite(s) and s > 0 for s in std):
        raise UsageError(f"{path}: means must be finite and stds positive (--normalize)")
    return Normalization(str(path), 1.0, mean, std, f"per-band mean/std from {path.name}")
