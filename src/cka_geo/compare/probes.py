"""The probe images of a comparison: the embedded Sentinel-2 crops, a folder or an array."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch

from cka_geo.checkpoints import LoadedCheckpoint
from cka_geo.compare.options import DEFAULT_SAMPLES, CompareOptions
from cka_geo.errors import DataError
from cka_geo.functional import min_samples


def _model_geometry(loaded: LoadedCheckpoint) -> tuple[int, int | tuple[int, int]]:
    cfg = loaded.config
    size = getattr(cfg, "img_size", None) or cfg.image_size
    return int(cfg.in_chans), size if isinstance(size, tuple) else int(size)


def probe_batches(
    opts: CompareOptions, bands: int, size: int | tuple[int, int]
) -> tuple[Iterator[torch.Tensor], int, str, tuple[int, ...]]:
    """The probe images in batches, how many there are, a description for the record, and
    the shape of one image ((C, H, W), or (T, C, H, W) for a time series). ``size`` may be
    (height, width): the embedded crops are then cut to that rectangle."""
    from cka_geo.data import ImageFolder, iter_probe_batches, load_array_probes
    from cka_geo.data.folders import iter_batches

    if opts.data is None:
        n = opts.samples or DEFAULT_SAMPLES
        h, w = size if isinstance(size, tuple) else (size, size)
        desc = f"embedded Sentinel-2 L1C crops (seed {opts.seed})" + (f", cut to {h}x{w}" if h != w else "")
        batches = iter_probe_batches(n, bands=bands, size=max(h, w), batch_size=opts.batch_size, seed=opts.seed)
        if h != w:
            batches = (b[..., :h, :w] for b in batches)
        return batches, n, desc, (bands, h, w)
    if isinstance(size, tuple):
        raise DataError("--data with a rectangular model is not supported yet (use the embedded probes)")
    path = Path(opts.data)
    if not path.exists():
        raise DataError(f"{path}: no such file or folder (--data)")
    if path.is_dir():
        ds = ImageFolder(path, bands=bands)
        first = ds[0]
        first = first[0] if isinstance(first, tuple) else first
        if tuple(first.shape[-2:]) != (size, size):
            raise DataError(f"{path}: images are {first.shape[-2]}x{first.shape[-1]}, the model expects {size}x{size}")
        total = len(ds)
        shape = tuple(first.shape)
        source: Iterator[torch.Tensor] = iter_batches(ds, opts.batch_size)
    else:
        arr = load_array_probes(path, bands=bands, time_series=True)
        if arr.shape[-2:] != (size, size):
            raise DataError(f"{path}: images are {arr.shape[-2]}x{arr.shape[-1]}, the model expects {size}x{size}")
        total = arr.shape[0]
        shape = tuple(arr.shape[1:])
        source = iter(arr.split(opts.batch_size))
    n = total if opts.samples is None else opts.samples
    if n > total:
        raise DataError(f"{path}: holds {total} images, fewer than --samples {n}")
    if n < min_samples(opts.estimator):
        raise DataError(f"{path}: holds {total} images; CKA needs at least {min_samples(opts.estimator)}")

    def take() -> Iterator[torch.Tensor]:
        left = n
        for batch in source:
            if left <= 0:
                return
            yield batch[:left]
            left -= batch.shape[0]

    return take(), n, str(path), shape
