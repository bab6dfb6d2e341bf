"""What goes into the models: image size (and the position-embedding resample it needs),
band names, and the default sample count and batch size of a device."""

from __future__ import annotations

import dataclasses
import re
import warnings
from collections.abc import Callable, Sequence

import torch

from cka_geo.checkpoints import LoadedCheckpoint
from cka_geo.errors import DataError, UsageError

#: Default (samples, batch size) of the embedded probes per device type, before the cap by
#: the distinct crops of the scene (:func:`cka_geo.data.distinct_crops`).
DEVICE_DEFAULTS = {"cpu": (512, 32), "cuda": (2048, 128)}
#: Fewest batches a default batch size leaves for the intervals.
MIN_DEFAULT_BATCHES = 10
#: Largest default image side on CPU (a ViT-S/14 compare stays well under 5 minutes on 2 cores).
CPU_MAX_SIDE = 224
#: Fewest distinct default probes: 10 batches of the 4 images the unbiased estimator needs.
MIN_DEFAULT_PROBES = 4 * MIN_DEFAULT_BATCHES

RESAMPLE_RULES = {
    True: "bicubic with antialias to the new grid (timm resample_abs_pos_embed)",
    False: "bicubic without antialias to the new grid size, in float32 "
    "(Hugging Face ViT/DINOv2 interpolate_pos_encoding)",
}


def device_defaults(
    device: torch.device,
    samples: int | None,
    batch_size: int | None,
    available: int | None,
    distinct: int | None = None,
) -> tuple[int, int]:
    """(samples, batch size) where not given: by device, leaving at least 10 batches.

    The embedded default is the device's sample count capped by ``distinct``; with the batch
    size also by default, it is cut to whole batches (the last one is never a stub).

    Args:
        device: The resolved device (``cuda`` gets larger defaults than ``cpu``).
        samples: ``--samples`` or None.
        batch_size: ``--batch-size`` or None.
        available: Images in ``--data`` (None for the embedded set).
        distinct: Distinct crops of the embedded scene at the run's size (None: no cap).
    """
    dflt_n, dflt_b = DEVICE_DEFAULTS["cuda" if device.type == "cuda" else "cpu"]
    embedded_default = samples is None and available is None
    n = samples if samples is not None else (available if available is not None else dflt_n)
    if embedded_default and distinct is not None:
        n = min(n, distinct)
    if batch_size is None:
        batch_size = max(4, min(dflt_b, n // MIN_DEFAULT_BATCHES))
        if embedded_default and n >= batch_size:
            n -= n % batch_size
    return n, batch_size


def default_image_size(
    native: tuple[int, int], patch: int, device: torch.device, distinct: Callable[[tuple[int, int]], int]
) -> tuple[int, int]:
    """The image size of a default run on the embedded probes.

    On CPU: ``min(native, 224)`` per side, rounded down to a multiple of the patch size (a
    518-px DINOv2 runs at 224). On CUDA: the native size. On either, if the scene holds fewer
    than :data:`MIN_DEFAULT_PROBES` distinct crops at that size, the largest patch multiple
    below it (same aspect) that holds that many.

    Args:
        native: The checkpoint's (height, width).
        patch: Its patch size.
        device: The resolved device.
        distinct: Distinct crops of the scene at a (height, width).
    """

    def fit(side: int, cap: int) -> int:
        return side if side <= cap else max(patch, cap // patch * patch)

    hw = native if device.type == "cuda" else (fit(native[0], CPU_MAX_SIDE), fit(native[1], CPU_MAX_SIDE))
    while distinct(hw) < MIN_DEFAULT_PROBES and max(hw) > patch:
        top = max(hw)  # one patch off the longer side, the aspect kept
        hw = (fit(hw[0], hw[0] * (top - patch) // top), fit(hw[1], hw[1] * (top - patch) // top))
    return hw


def parse_size(values: Sequence[int] | int | None) -> tuple[int, int] | None:
    """``--image-size N`` or ``H W`` as (height, width); refuse other counts or sizes < 1."""
    if values is None:
        return None
    vals = [values] if isinstance(values, int) else list(values)
    if len(vals) not in (1, 2) or any(isinstance(v, bool) or int(v) < 1 for v in vals):
        raise UsageError(f"--image-size takes N or H W (positive pixels), got {' '.join(map(str, vals))}")
    h, w = int(vals[0]), int(vals[-1])
    return h, w


def native_hw(loaded: LoadedCheckpoint) -> tuple[int, int]:
    """The checkpoint's own image size (height, width)."""
    cfg = loaded.config
    size = getattr(cfg, "img_size", None) or cfg.image_size
    return (int(size[0]), int(size[1])) if isinstance(size, tuple) else (int(size), int(size))


def check_multiple(hw: tuple[int, int], patch: int, what: str) -> None:
    """Refuse a size that is not a multiple of the patch size, in one line naming ``what``."""
    if hw[0] % patch or hw[1] % patch:
        raise DataError(f"{what}: {hw[0]}x{hw[1]} is not a multiple of the model's patch size {patch}")


def at_size(a: LoadedCheckpoint, b: LoadedCheckpoint, hw: tuple[int, int], what: str) -> str | None:
    """Let both models take ``hw`` images; the resample rule used (None at native size).

    The stored position embedding stays as it is and is resampled on the fly by the rule of
    the checkpoint's family (``pos_embed_antialias``); a one-line RuntimeWarning says so.

    Raises:
        DataError: A model that cannot take another size, or a size not a patch multiple.
    """
    native = native_hw(a)
    cfg = a.config
    patch = int(getattr(cfg, "patch_size", 1))
    check_multiple(hw, patch, what)
    if hw == native:
        return None
    if not hasattr(cfg, "dynamic_img_size"):
        raise DataError(f"{what}: {hw[0]}x{hw[1]}: the {a.family} model takes only its native {native[0]}x{native[1]}")
    rule = RESAMPLE_RULES[bool(getattr(cfg, "pos_embed_antialias", True))]
    for loaded in (a, b):
        loaded.config = dataclasses.replace(loaded.config, dynamic_img_size=True)
    old = (native[0] // patch, native[1] // patch)
    new = (hw[0] // patch, hw[1] // patch)
    warnings.warn(
        f"image size {hw[0]}x{hw[1]} differs from the model's {native[0]}x{native[1]}: pos_embed "
        f"resampled from a {old[0]}x{old[1]} to a {new[0]}x{new[1]} patch grid, {rule}",
        RuntimeWarning,
        stacklevel=3,
    )
    return rule


_BAND = re.compile(r"^B0*(\d+)(A?)$")


def canonical_band(name: str) -> str:
    """``B04`` / ``b4`` -> ``B4``, ``B8a`` -> ``B8A`` (the embedded scene's names)."""
    m = _BAND.match(str(name).strip().upper())
    return f"B{m.group(1)}{m.group(2)}" if m else str(name).strip().upper()


def data_band_names(count: int) -> tuple[str, ...] | None:
    """Sentinel-2 names of a ``count``-band stack in cka-geo's conventional orders."""
    from cka_geo.data.embedded import BAND_SELECTIONS

    return BAND_SELECTIONS.get(count)


def pick_bands(wanted: Sequence[str], have: tuple[str, ...] | None, model_bands: int, what: str) -> list[int]:
    """Indices of ``--bands`` names among the bands ``have``; refuse unknown names or counts."""
    names = [canonical_band(b) for b in wanted]
    if len(names) != model_bands:
        raise UsageError(f"--bands: {len(names)} bands given, the model takes {model_bands}")
    if have is None:
        raise UsageError(f"--bands: {what} has no known Sentinel-2 band order (13, 12, 10, 6, 4, 3 or 1 bands)")
    missing = [n for n in names if n not in have]
    if missing:
        raise UsageError(f"--bands: {', '.join(missing)} not among the bands of {what} ({' '.join(have)})")
    return [have.index(n) for n in names]
