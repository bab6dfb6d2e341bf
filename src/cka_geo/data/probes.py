"""The default probe set of ``cka-geo compare``: distinct crops of the embedded scene.

The shipped scene (:func:`cka_geo.data.scene.full_scene`, 1707 x 1693 pixels at 10 m) is cut
into a centred grid of non-overlapping crops of the model's image size (crop side = image
side at 10 m; rectangular sizes too). :func:`distinct_crops` says how many there are; the
probes take them in a seeded order. More probes than that continue with seeded crops at
uniform positions, which overlap the first ones (a one-line RuntimeWarning says so).

Crops are normalised per band with the statistics of the training crop
(:func:`cka_geo.data.embedded.band_statistics`: the "scene" normalisation), computed in
float64 and returned as float32, so every pixel equals the one of
:func:`cka_geo.data.embedded.normalized_scene` where the two overlap.

Only numpy and torch are imported here.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence

import numpy as np
import torch

from cka_geo.data.embedded import _stats, band_indices
from cka_geo.data.scene import full_scene
from cka_geo.errors import UsageError

Size = int | tuple[int, int] | Sequence[int]


def _hw(value: Size, what: str) -> tuple[int, int]:
    vals = [value] if isinstance(value, (int, np.integer)) else list(value)
    ok = len(vals) in (1, 2) and all(
        isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= 1 for v in vals
    )
    if not ok:
        raise UsageError(f"probe {what} must be a positive integer or (height, width), got {value!r}")
    return int(vals[0]), int(vals[-1])


def scene_shape() -> tuple[int, int]:
    """(height, width) of the shipped scene on the 10 m grid."""
    scene, _ = full_scene()
    return int(scene.shape[-2]), int(scene.shape[-1])


def crop_side(size: Size, crop: Size | None = None) -> tuple[int, int]:
    """The crop cut from the scene for ``size`` probes: (height, width) in 10 m pixels.

    ``crop`` if given (it must fit the scene), else ``size``; a size larger than the scene
    takes the largest crop of the same aspect that fits (resized up to ``size``).

    Raises:
        UsageError: A size or crop that is not positive, or a crop larger than the scene.
    """
    h, w = _hw(size, "size")
    sh, sw = scene_shape()
    if crop is not None:
        ch, cw = _hw(crop, "crop")
        if ch > sh or cw > sw:
            raise UsageError(f"crop must fit the {sh}x{sw} scene, got {ch}x{cw}")
        return ch, cw
    if h <= sh and w <= sw:
        return h, w
    k = min(sh / h, sw / w)
    return max(1, min(sh, int(h * k))), max(1, min(sw, int(w * k)))


def distinct_crops(size: Size, crop: Size | None = None) -> int:
    """How many non-overlapping crops the scene holds for ``size`` probes (see :func:`crop_side`).

    Examples (the 1707 x 1693 scene): 224 -> 7 x 7 = 49, 112 -> 15 x 15 = 225, 518 -> 9.
    """
    ch, cw = crop_side(size, crop)
    sh, sw = scene_shape()
    return (sh // ch) * (sw // cw)


def _grid(ch: int, cw: int) -> np.ndarray:
    """Top-left corners of the centred grid of non-overlapping crops, row-major (K, 2)."""
    sh, sw = scene_shape()
    ny, nx = sh // ch, sw // cw
    oy, ox = (sh - ny * ch) // 2, (sw - nx * cw) // 2
    rows, cols = np.meshgrid(oy + ch * np.arange(ny), ox + cw * np.arange(nx), indexing="ij")
    return np.stack([rows.ravel(), cols.ravel()], axis=1).astype(np.int64)


def _probe_plan(
    n: int, bands: int | Sequence[str] | None, size: Size, seed: int, crop: Size | None
) -> tuple[np.ndarray, list[int], tuple[int, int], int]:
    """(positions (n, 2), band indices, crop (h, w), distinct count) of a probe set."""
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise UsageError(f"number of probe images must be a positive integer, got {n!r}")
    _hw(size, "size")
    idx = band_indices(bands)
    ch, cw = crop_side(size, crop)
    grid = _grid(ch, cw)
    rng = np.random.default_rng(seed)
    pos = grid[rng.permutation(len(grid))[: int(n)]]
    extra = int(n) - len(pos)
    if extra > 0:
        sh, sw = scene_shape()
        rows = rng.integers(0, sh - ch + 1, size=extra)
        cols = rng.integers(0, sw - cw + 1, size=extra)
        pos = np.concatenate([pos, np.stack([rows, cols], axis=1)])
        warnings.warn(
            f"{int(n)} probe images asked, the embedded scene holds {len(grid)} distinct "
            f"non-overlapping {ch}x{cw} crops: the other {extra} are seeded crops that overlap them",
            RuntimeWarning,
            stacklevel=3,
        )
    return pos, idx, (ch, cw), len(grid)


def _batches(
    pos: np.ndarray, idx: list[int], crop: tuple[int, int], size: tuple[int, int], batch_size: int, normalized: bool
) -> Iterator[torch.Tensor]:
    scene, _ = full_scene()
    mean, std = _stats()
    m, s = mean[idx][:, None, None], std[idx][:, None, None]
    ch, cw = crop
    for start in range(0, len(pos), batch_size):
        chunk = pos[start : start + batch_size]
        images = []
        for r, c in chunk:
            x = scene[idx, r : r + ch, c : c + cw]
            images.append(((x.astype(np.float64) - m) / s).astype(np.float32) if normalized else x.astype(np.float32))
        out = torch.from_numpy(np.stack(images))
        if (ch, cw) != size:
            out = torch.nn.functional.interpolate(out, size=size, mode="bilinear", align_corners=False)
        yield out.contiguous()


def iter_probe_batches(
    n: int,
    *,
    bands: int | Sequence[str] | None,
    size: Size,
    batch_size: int = 64,
    seed: int = 0,
    crop: Size | None = None,
    normalized: bool = True,
) -> Iterator[torch.Tensor]:
    """The probe images of :func:`probe_images` in batches (memory stays flat).

    The plan is made (and checked, and any warning given) on the call; the batches are cut
    as they are consumed. Their concatenation equals ``probe_images`` of the same arguments
    whatever ``batch_size``.

    Args:
        n: Number of probe images.
        bands: Band count (:data:`~cka_geo.data.embedded.BAND_SELECTIONS`) or band names.
        size: Output size in pixels, N or (height, width) (the model's image size).
        batch_size: Images per batch (the last batch may be smaller).
        seed: Seed of the crop order.
        crop: Crop cut from the scene, N or (height, width) (default: see :func:`crop_side`);
            a crop other than ``size`` is resized (bilinear).
        normalized: False gives the digital numbers as float32 instead of the z-scores.

    Returns:
        An iterator of float32 tensors (b, bands, height, width).

    Warns:
        RuntimeWarning: When ``n`` exceeds :func:`distinct_crops` (the rest overlap).
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise UsageError(f"batch_size must be >= 1, got {batch_size}")
    pos, idx, crop_hw, _ = _probe_plan(n, bands, size, seed, crop)
    return _batches(pos, idx, crop_hw, _hw(size, "size"), int(batch_size), normalized)


def probe_images(
    n: int,
    *,
    bands: int | Sequence[str] | None,
    size: Size,
    seed: int = 0,
    crop: Size | None = None,
) -> torch.Tensor:
    """The default probe set of ``cka-geo compare``: distinct seeded crops of the scene.

    The scene is tiled by a centred grid of non-overlapping crops (:func:`crop_side`, at
    10 m); ``numpy.random.default_rng(seed)`` permutes them and the first ``n`` are taken.
    Beyond :func:`distinct_crops` the same generator draws uniform positions (rows, then
    columns) whose crops overlap the others, with a RuntimeWarning. Each crop has the bands
    of :func:`~cka_geo.data.embedded.select_bands` ``(bands)``, normalised per band, and is
    resized bilinearly to ``size`` when the crop differs from it. Same arguments, same tensor.

    Args:
        n: Number of probe images (>= 1).
        bands: The model's band count (13, 12, 10, 6, 4, 3 or 1) or band names.
        size: The model's image size, N or (height, width).
        seed: Seed of the crop order.
        crop: Crop in the scene (pixels at 10 m) before resizing.

    Returns:
        float32 tensor (n, bands, height, width).

    Raises:
        DataError: For a band count the scene cannot serve (says to pass ``--data``).
        UsageError: For n, size or crop out of range.
    """
    batches = iter_probe_batches(n, bands=bands, size=size, batch_size=256, seed=seed, crop=crop)
    return torch.cat(list(batches), dim=0)


__all__ = ["crop_side", "distinct_crops", "iter_probe_batches", "probe_images", "scene_shape"]
