"""The probe images of a comparison: the embedded Sentinel-2 crops, a folder or an array,
with their bands selected (``--bands``) and scaled (``--normalize``)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cka_geo.checkpoints import LoadedCheckpoint
from cka_geo.compare.inputs import data_band_names, pick_bands
from cka_geo.compare.options import DEFAULT_SAMPLES, CompareOptions
from cka_geo.data.normalize import Normalization, looks_raw
from cka_geo.errors import DataError
from cka_geo.functional import min_samples


def _model_geometry(loaded: LoadedCheckpoint) -> tuple[int, int | tuple[int, int]]:
    cfg = loaded.config
    size = getattr(cfg, "img_size", None) or cfg.image_size
    return int(cfg.in_chans), size if isinstance(size, tuple) else int(size)


@dataclass
class Probes:
    """An opened probe source, before its batches are cut.

    Attributes:
        path: The ``--data`` path (None for the embedded set).
        hw: (height, width) of the images (None for the embedded set: any size).
        total: Images available (None for the embedded set: any number).
        raw: Whether the values are raw DNs (always for the embedded set before scaling).
        band_names: Sentinel-2 names of the bands the model receives, when known.
        select: Indices of the ``--bands`` among the source's bands (None: all as stored).
    """

    path: Path | None
    hw: tuple[int, int] | None
    total: int | None
    raw: bool
    band_names: tuple[str, ...] | None
    select: list[int] | None = None
    _array: torch.Tensor | None = None
    _folder: Any = None
    shape: tuple[int, ...] = field(default_factory=tuple)


def open_probes(opts: CompareOptions, bands: int) -> Probes:
    """Open ``opts.data`` (or the embedded set) for a ``bands``-band model.

    Raises:
        DataError: Missing or unreadable data, wrong band count.
        UsageError: Bad ``--bands``.
    """
    from cka_geo.data import ImageFolder, load_array_probes
    from cka_geo.data.embedded import BAND_NAMES, BAND_SELECTIONS, select_bands

    if opts.data is None:
        if opts.bands:
            idx = pick_bands(opts.bands, BAND_NAMES, bands, "the embedded scene")
            names = tuple(BAND_NAMES[i] for i in idx)
        else:
            select_bands(bands)  # refuses a band count the scene cannot serve
            names = BAND_SELECTIONS[bands]
        return Probes(None, None, None, True, names)
    path = Path(opts.data)
    if not path.exists():
        raise DataError(f"{path}: no such file or folder (--data)")
    want = None if opts.bands else bands
    if path.is_dir():
        ds = ImageFolder(path, bands=want)
        first = ds[0]
        first = first[0] if isinstance(first, tuple) else first
        probes = Probes(path, (int(first.shape[-2]), int(first.shape[-1])), len(ds), looks_raw(first), None, _folder=ds)
        shape = tuple(first.shape)
    else:
        arr = load_array_probes(path, bands=want, time_series=True)
        raw = looks_raw(_peek_raw(path, arr))
        probes = Probes(path, (int(arr.shape[-2]), int(arr.shape[-1])), int(arr.shape[0]), raw, None, _array=arr)
        shape = tuple(arr.shape[1:])
    have = data_band_names(int(shape[-3]))
    if opts.bands:
        probes.select = pick_bands(opts.bands, have, bands, str(path))
        probes.band_names = tuple(have[i] for i in probes.select)  # type: ignore[index]
    else:
        probes.band_names = have
    probes.shape = shape
    return probes


def _peek_raw(path: Path, arr: torch.Tensor) -> torch.Tensor | np.ndarray:
    """The stored dtype matters (uint16 DNs become float32 on loading): look at the file."""
    if path.suffix.lower() == ".npy":
        stored = np.load(path, mmap_mode="r", allow_pickle=False)
        if np.issubdtype(stored.dtype, np.integer):
            return np.zeros(1, dtype=stored.dtype)
    return arr


def cut_batches(
    probes: Probes, opts: CompareOptions, n: int, batch_size: int, hw: tuple[int, int], norm: Normalization
) -> tuple[Iterator[torch.Tensor], int, str, tuple[int, ...]]:
    """The probe images in batches, how many, a description for the record, and the shape
    of one image ((C, H, W), or (T, C, H, W) for a time series)."""
    h, w = hw
    if probes.path is None:
        return _embedded(probes, opts, n, batch_size, hw, norm)
    path = probes.path
    if probes.hw != hw:
        ph, pw = probes.hw or hw
        raise DataError(f"{path}: images are {ph}x{pw}, --image-size is {h}x{w} (--data is not resized)")
    total = probes.total or 0
    if n > total:
        raise DataError(f"{path}: holds {total} images, fewer than --samples {n}")
    if n < min_samples(opts.estimator):
        raise DataError(f"{path}: holds {total} images; CKA needs at least {min_samples(opts.estimator)}")
    from cka_geo import distributed
    from cka_geo.compare.shard import owns

    rank, world = distributed.rank(), distributed.world()
    if probes._array is not None:
        source: Iterator[torch.Tensor | None] = iter(probes._array.split(batch_size))
    elif world == 1:
        from cka_geo.data.folders import iter_batches

        source = iter_batches(probes._folder, batch_size)
    else:
        source = _rank_folder_batches(probes, batch_size, n, rank, world)
    select = probes.select

    def take() -> Iterator[torch.Tensor]:
        left = n
        for i, got in enumerate(source):
            if left <= 0:
                return
            if got is None or not owns(i, rank, world):  # another rank's batch (torchrun): not read or scaled
                yield torch.empty(0)
                left -= batch_size
                continue
            batch = got[:left]
            if select is not None:
                batch = batch[..., select, :, :]
            yield norm.apply(batch) if norm.name != "none" else batch
            left -= batch.shape[0]

    shape = list(probes.shape)
    if select is not None:
        shape[-3] = len(select)
    return take(), n, str(path), tuple(shape)


def _rank_folder_batches(
    probes: Probes, batch_size: int, n: int, rank: int, world: int
) -> Iterator[torch.Tensor | None]:
    """A folder's batches under torchrun: this rank's read, the others' None (never read)."""
    from torch.utils.data import Subset

    from cka_geo.compare.shard import owns
    from cka_geo.data.folders import iter_batches

    ds = probes._folder
    files = list(getattr(ds, "files", []) or [])
    for i, start in enumerate(range(0, n, batch_size)):
        if not owns(i, rank, world):
            yield None
            continue
        end = min(start + batch_size, n)
        part = Subset(ds, range(start, end))
        part.files = files[start:end]  # type: ignore[attr-defined]  # iter_batches names them
        batch = next(iter_batches(part, batch_size))
        if tuple(batch.shape[1:]) != tuple(probes.shape):
            first = files[0] if files else "the first image"
            raise DataError(f"{files[start] if files else f'item {start}'} has shape {tuple(batch.shape[1:])} "
                            f"but {first} has {tuple(probes.shape)}: all images of a probe set must have one size")
        yield batch


def _embedded(
    probes: Probes, opts: CompareOptions, n: int, batch_size: int, hw: tuple[int, int], norm: Normalization
) -> tuple[Iterator[torch.Tensor], int, str, tuple[int, ...]]:
    """Distinct crops of the embedded scene at ``hw`` (:mod:`cka_geo.data.probes`)."""
    from cka_geo.data import iter_probe_batches
    from cka_geo.data.probes import crop_side, distinct_crops

    h, w = hw
    names = list(probes.band_names or ())
    k = distinct_crops(hw)
    ch, cw = crop_side(hw)
    more = f" and {n - k} overlapping ones" if n > k else ""
    desc = f"the embedded Sentinel-2 L1C scene ({min(n, k)} of its {k} distinct {ch}x{cw} crops{more}, seed {opts.seed})"
    scene = norm.name == "scene"  # the z-scored scene, as before presets (bit-identical)

    def batches() -> Iterator[torch.Tensor]:  # planned at the first batch: after the memory check
        for b in iter_probe_batches(n, bands=names, size=hw, batch_size=batch_size, seed=opts.seed, normalized=scene):
            yield b if scene else norm.apply(b)

    return batches(), n, desc, (len(names), h, w)


def embedded_record(hw: tuple[int, int], n: int) -> dict[str, Any]:
    """The ``probe_crops`` setting of a run on the embedded scene: crop, distinct, overlapping."""
    from cka_geo.data.probes import crop_side, distinct_crops, scene_shape

    k = distinct_crops(hw)
    return {"scene": list(scene_shape()), "crop": list(crop_side(hw)), "distinct": k, "overlapping": max(0, n - k)}


def probe_batches(
    opts: CompareOptions, bands: int, size: int | tuple[int, int]
) -> tuple[Iterator[torch.Tensor], int, str, tuple[int, ...]]:
    """The probe images at ``size`` in batches (as :func:`cut_batches`), normalised by
    ``opts.normalize`` (default ``auto``); on the embedded scene at most its distinct crops
    unless ``opts.samples`` asks for more."""
    from cka_geo.data.normalize import resolve

    probes = open_probes(opts, bands)
    hw = size if isinstance(size, tuple) else (size, size)
    if opts.samples:
        n = opts.samples
    elif probes.total is not None:
        n = probes.total
    else:  # never more default probes than distinct crops
        from cka_geo.data.probes import distinct_crops

        n = min(DEFAULT_SAMPLES, distinct_crops(hw))
    norm = resolve(opts.normalize, bands, probes.band_names, embedded=probes.path is None, raw=probes.raw)
    return cut_batches(probes, opts, n, opts.batch_size or 32, hw, norm)
