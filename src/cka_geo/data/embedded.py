"""The embedded Sentinel-2 L1C scene: its 640 x 640 training crop, tiles and statistics.

The package ships one real Sentinel-2 L1C scene (``s2_l1c_scene.npz`` + ``.json``, built by
``scripts/build_embedded_s2.py``; read by :mod:`cka_geo.data.scene`; see docs/data.md). The
training tiles, derived labels and band statistics use a fixed 640 x 640 window of it (the
"crop", 13 bands on a 10 m grid, uint16 top-of-atmosphere reflectance x 10000, band order
:data:`BAND_NAMES`); the probes of ``compare`` use the whole scene
(:mod:`cka_geo.data.probes`). Nothing is downloaded at run time.

Normalisation: per band, ``(x - mean) / std`` with the mean and the population standard
deviation (ddof 0) of that band over all 640 x 640 pixels of the crop, computed in float64
from the uint16 values (:func:`band_statistics`). Tiles and probe images are float32.

Only numpy and torch are imported here.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import Dataset

from cka_geo.data import labels as _labels
from cka_geo.data.scene import SCENE_JSON, full_scene
from cka_geo.errors import DataError, UsageError

#: Band order of the embedded scene (and of every 13-band array in cka-geo).
BAND_NAMES: tuple[str, ...] = (
    "B1", "B2", "B3", "B4", "B5", "B6", "B7", "B8", "B8A", "B9", "B10", "B11", "B12",
)  # fmt: skip

#: Which bands the embedded probe set serves to a model with a given band count.
#:
#: * 13: all (L1C order B1..B12 with B8A after B8: SSL4EO-S12 L1C, Sen1Floods11, EuroSAT-MS)
#: * 12: all but the cirrus band B10 (L2A-style stacks: SSL4EO-S12 L2A, CROMA, BigEarthNet)
#: * 10: the 10 m and 20 m bands B2 B3 B4 B5 B6 B7 B8 B8A B11 B12 (PASTIS, SatMAE, DOFA S2)
#: * 6: Prithvi/HLS bands B2 B3 B4 B8A B11 B12
#: * 4: the 10 m bands B2 B3 B4 B8
#: * 3: RGB as B4 B3 B2 (red, green, blue: the order of RGB ImageNet-style models)
#: * 1: the NIR band B8 (the 10 m band with the most land/water/vegetation contrast)
#:
#: Any other count has no conventional Sentinel-2 selection: pass your own data.
BAND_SELECTIONS: dict[int, tuple[str, ...]] = {
    13: BAND_NAMES,
    12: ("B1", "B2", "B3", "B4", "B5", "B6", "B7", "B8", "B8A", "B9", "B11", "B12"),
    10: ("B2", "B3", "B4", "B5", "B6", "B7", "B8", "B8A", "B11", "B12"),
    6: ("B2", "B3", "B4", "B8A", "B11", "B12"),
    4: ("B2", "B3", "B4", "B8"),
    3: ("B4", "B3", "B2"),
    1: ("B8",),
}

Split = Literal["train", "val", "test", "all"]
Task = Literal["segmentation", "classification", "regression"]


@functools.lru_cache(maxsize=1)
def _raw_scene() -> tuple[np.ndarray, dict[str, Any]]:
    """The 640 x 640 training crop (a window of :func:`cka_geo.data.scene.full_scene`)."""
    scene, meta = full_scene()
    try:
        crop = meta["crop"]
        r, c, h, w = (int(crop[k]) for k in ("row_in_scene", "col_in_scene", "height", "width"))
    except (KeyError, TypeError, ValueError) as exc:
        raise DataError(f"embedded scene cka_geo/data/{SCENE_JSON} has no valid crop: {exc}") from exc
    bands = np.ascontiguousarray(scene[:, r : r + h, c : c + w])
    if bands.shape != (len(BAND_NAMES), h, w):
        raise DataError(f"embedded scene cka_geo/data/{SCENE_JSON}: crop {h}x{w} at {r},{c} outside the scene")
    bands.setflags(write=False)
    out = {k: v for k, v in meta.items() if k not in ("crop", "window", "grids", "bounds_utm", "shape")}
    out.update(
        shape=[len(BAND_NAMES), h, w],
        window={k: crop[k] for k in ("row0", "col0", "height", "width", "grid")},
        transform=crop["transform"],
        bounds_utm=crop["bounds_utm"],
        approx_center_lat_lon=crop["approx_center_lat_lon"],
        scene={k: meta[k] for k in ("shape", "window", "bounds_utm")},
    )
    return bands, out


def load_embedded_scene(
    dtype: type[np.uint16] | type[np.float32] = np.uint16,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Return the embedded scene and its metadata.

    Args:
        dtype: ``np.uint16`` (the stored digital numbers, reflectance x 10000; the array is
            shared and read-only) or ``np.float32`` (a fresh copy of the same values).

    Returns:
        ``(bands, metadata)``: bands (13, 640, 640), the training crop, in :data:`BAND_NAMES`
        order; metadata the sidecar's entries for it (band names, wavelengths, native
        resolutions, ``window`` on the 10 m grid of B02, CRS/transform, source sha256,
        attribution, ...), ``scene`` (shape, window and bounds of the whole shipped scene)
        and ``band_mean``/``band_std``.

    Raises:
        UsageError: For another dtype.
        DataError: If the package data is missing or malformed.
    """
    bands, meta = _raw_scene()
    meta = dict(meta)
    mean, std = band_statistics()
    meta["band_mean"] = mean.tolist()
    meta["band_std"] = std.tolist()
    if dtype is np.uint16:
        return bands, meta
    if dtype is np.float32:
        return bands.astype(np.float32), meta
    raise UsageError(f"dtype must be numpy.uint16 or numpy.float32, got {dtype!r}")


@functools.lru_cache(maxsize=1)
def _stats() -> tuple[np.ndarray, np.ndarray]:
    bands, _ = _raw_scene()
    flat = bands.reshape(bands.shape[0], -1).astype(np.float64)
    mean = flat.mean(axis=1)
    std = flat.std(axis=1)
    mean.setflags(write=False)
    std.setflags(write=False)
    return mean, std


def band_statistics(
    bands: int | Sequence[str] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Per-band mean and standard deviation of the embedded scene (float64).

    Computed over all pixels of the scene from the uint16 values; the standard deviation is
    the population one (ddof 0).

    Args:
        bands: ``None`` for all 13 bands, a band count (see :data:`BAND_SELECTIONS`) or a
            sequence of band names.

    Returns:
        ``(mean, std)``, each float64 of shape (number of bands,).
    """
    mean, std = _stats()
    idx = band_indices(bands)
    return mean[idx].copy(), std[idx].copy()


def select_bands(bands: int | Sequence[str] | None) -> tuple[str, ...]:
    """Resolve a band count or a list of names to band names of the embedded scene.

    Args:
        bands: ``None`` (all 13), a count in :data:`BAND_SELECTIONS`, or band names.

    Returns:
        The band names, in the order the model receives them.

    Raises:
        DataError: For a count the embedded scene cannot serve (the message says to pass
            ``--data``) or an unknown band name.
    """
    if bands is None:
        return BAND_NAMES
    if isinstance(bands, (int, np.integer)) and not isinstance(bands, bool):
        sel = BAND_SELECTIONS.get(int(bands))
        if sel is None:
            served = ", ".join(str(k) for k in sorted(BAND_SELECTIONS))
            raise DataError(
                f"the embedded Sentinel-2 probe set cannot serve a {int(bands)}-band model "
                f"(it serves {served} bands); pass --data with images that have "
                f"{int(bands)} bands"
            )
        return sel
    if isinstance(bands, bool):
        raise DataError(f"bands must be a band count or band names, got {bands!r}")
    if isinstance(bands, str):
        bands = [bands]
    names = tuple(str(b).upper() for b in bands)
    unknown = [b for b in names if b not in BAND_NAMES]
    if unknown or not names:
        raise DataError(
            f"unknown Sentinel-2 band name(s) {unknown or '[]'}; expected names from "
            f"{', '.join(BAND_NAMES)}"
        )
    return names


def band_indices(bands: int | Sequence[str] | None) -> list[int]:
    """Indices into :data:`BAND_NAMES` of :func:`select_bands` ``(bands)``."""
    return [BAND_NAMES.index(b) for b in select_bands(bands)]


@functools.lru_cache(maxsize=1)
def _normalized_scene() -> np.ndarray:
    bands, _ = _raw_scene()
    mean, std = _stats()
    out = (bands.astype(np.float64) - mean[:, None, None]) / std[:, None, None]
    out = out.astype(np.float32)
    out.setflags(write=False)
    return out


def normalized_scene(bands: int | Sequence[str] | None = None) -> np.ndarray:
    """The scene normalised per band, float32 (C, 640, 640), for the selected bands."""
    return _normalized_scene()[band_indices(bands)]


@functools.lru_cache(maxsize=4)
def _cover(water_threshold: float, vegetation_threshold: float) -> np.ndarray:
    bands, _ = _raw_scene()
    g, r, n = (bands[BAND_NAMES.index(b)] for b in ("B3", "B4", "B8"))
    cover = _labels.cover_map(
        g,
        r,
        n,
        water_threshold=water_threshold,
        vegetation_threshold=vegetation_threshold,
    )
    cover.setflags(write=False)
    return cover


def embedded_cover_map(
    water_threshold: float = _labels.WATER_THRESHOLD,
    vegetation_threshold: float = _labels.VEGETATION_THRESHOLD,
) -> np.ndarray:
    """Derived per-pixel cover classes of the whole scene (see :mod:`cka_geo.data.labels`).

    Returns:
        int64 (640, 640): 0 water, 1 vegetation, 2 other. Read-only.
    """
    return _cover(float(water_threshold), float(vegetation_threshold))


def block_split(block_row: int, block_col: int) -> str:
    """Split of a block of the scene's block grid: ``(row + 2 * col) mod 5``.

    0 is ``"val"``, 1 is ``"test"``, 2-4 are ``"train"``: on the 5 x 5 grid of 128-pixel
    blocks every block row and every block column holds exactly one validation and one test
    block (15 train, 5 val, 5 test blocks), so each split samples the whole scene (land in
    the west, the bay in the east) while no two splits share a pixel.
    """
    k = (block_row + 2 * block_col) % 5
    return "val" if k == 0 else "test" if k == 1 else "train"


class EmbeddedS2Tiles(Dataset):
    """Normalised tiles of the embedded scene with a derived label.

    The scene is cut into square blocks of ``block_size`` pixels, each assigned to one split
    by :func:`block_split`; tiles are cut inside the blocks of the requested split (a tile
    never crosses a block edge), so the splits are spatially disjoint and fixed, whatever
    ``tile_size`` and ``stride``. Tile order: block by block in row-major order, then
    row-major inside the block.

    Items are ``(image, target)``: image float32 (C, tile, tile) normalised per band
    (:func:`band_statistics`); target by ``task``:

    * ``"segmentation"``: int64 (tile, tile) water mask (1 water, 0 not; NDWI > threshold).
    * ``"classification"``: int64 scalar, the tile's dominant cover class
      (0 water, 1 vegetation, 2 other; :data:`class_names`).
    * ``"regression"``: float32 scalar, the tile's vegetation fraction in [0, 1].

    All labels are derived from spectral indices (:mod:`cka_geo.data.labels`), not ground
    truth.

    With ``augment=True`` each item is flipped horizontally with probability 1/2 and
    rotated by a random multiple of 90 degrees (image and mask alike), drawn from torch's
    global random generator (seed it, or a DataLoader worker's, for reproducibility).

    Attributes:
        positions: int64 (N, 2) top-left (row, col) of each tile in the scene.
        targets: the N targets as one tensor (long for segmentation/classification,
            float for regression), e.g. for stratified label-fraction sampling.
        class_names: the classes of ``task`` (empty for regression).
        num_classes: ``len(class_names)`` (0 for regression).
        band_names: the bands served, in order.
        mean, std: the normalisation statistics (float64 arrays).
    """

    def __init__(
        self,
        split: Split = "train",
        *,
        tile_size: int = 32,
        task: Task = "segmentation",
        bands: int | Sequence[str] | None = None,
        stride: int | None = None,
        augment: bool = False,
        block_size: int = 128,
        water_threshold: float = _labels.WATER_THRESHOLD,
        vegetation_threshold: float = _labels.VEGETATION_THRESHOLD,
    ) -> None:
        """Build the tile index for one split.

        Args:
            split: ``"train"``, ``"val"``, ``"test"`` or ``"all"`` (every block).
            tile_size: Tile side in pixels, 1 to ``block_size``.
            task: ``"segmentation"``, ``"classification"`` or ``"regression"``.
            bands: ``None`` (13), a band count of :data:`BAND_SELECTIONS`, or band names.
            stride: Step between tiles inside a block (default ``tile_size``; smaller gives
                overlapping tiles, still within the split's blocks).
            augment: Random flips and 90-degree rotations.
            block_size: Side of the split blocks in pixels (default 128: a 5 x 5 grid).
            water_threshold: NDWI threshold of the water mask.
            vegetation_threshold: NDVI threshold of the vegetation class.

        Raises:
            UsageError: For an unknown split or task, or sizes out of range.
            DataError: For a band selection the scene cannot serve.
        """
        if split not in ("train", "val", "test", "all"):
            raise UsageError(f"split must be train, val, test or all, got {split!r}")
        if task not in ("segmentation", "classification", "regression"):
            raise UsageError(
                f"task must be segmentation, classification or regression, got {task!r}"
            )
        stride = tile_size if stride is None else stride
        if not 1 <= block_size <= 640:
            raise UsageError(f"block_size must be in 1..640, got {block_size}")
        if not 1 <= tile_size <= block_size:
            raise UsageError(f"tile_size must be in 1..block_size={block_size}, got {tile_size}")
        if stride < 1:
            raise UsageError(f"stride must be >= 1, got {stride}")
        self.split = split
        self.task = task
        self.tile_size = tile_size
        self.augment = augment
        self.band_names = select_bands(bands)
        self.mean, self.std = band_statistics(self.band_names)
        self._image = normalized_scene(self.band_names)
        cover = embedded_cover_map(water_threshold, vegetation_threshold)
        h, w = cover.shape
        pos: list[tuple[int, int]] = []
        for br in range(h // block_size):
            for bc in range(w // block_size):
                if split != "all" and block_split(br, bc) != split:
                    continue
                r_end, c_end = (br + 1) * block_size, (bc + 1) * block_size
                for r in range(br * block_size, r_end - tile_size + 1, stride):
                    for c in range(bc * block_size, c_end - tile_size + 1, stride):
                        pos.append((r, c))
        self.positions = np.asarray(pos, dtype=np.int64).reshape(-1, 2)
        t = tile_size
        if pos:
            tiles = np.stack([cover[r : r + t, c : c + t] for r, c in pos])
        else:
            tiles = np.zeros((0, t, t), dtype=np.int64)
        #: float64 (N, 3): fraction of water, vegetation, other in each tile.
        self.fractions = _labels.class_fractions(tiles)
        if task == "segmentation":
            self.class_names: tuple[str, ...] = ("not water", "water")
            self.targets = torch.from_numpy((tiles == _labels.WATER).astype(np.int64))
        elif task == "classification":
            self.class_names = _labels.COVER_CLASSES
            self.targets = torch.from_numpy(_labels.dominant_class(self.fractions).astype(np.int64))
        else:
            self.class_names = ()
            self.targets = torch.from_numpy(
                self.fractions[:, _labels.VEGETATION].astype(np.float32)
            )
        self.num_classes = len(self.class_names)

    def __len__(self) -> int:
        """Number of tiles in the split."""
        return int(self.positions.shape[0])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(image, target)`` of tile ``index`` (see the class docstring)."""
        if not -len(self) <= index < len(self):
            raise IndexError(f"tile index {index} out of range for {len(self)} tiles")
        r, c = (int(v) for v in self.positions[index])
        t = self.tile_size
        image = torch.from_numpy(self._image[:, r : r + t, c : c + t].copy())
        target = self.targets[index]
        if self.augment:
            k = int(torch.randint(4, ()).item())
            flip = bool(torch.randint(2, ()).item())
            image = _augment(image, k, flip)
            if self.task == "segmentation":
                target = _augment(target, k, flip)
        return image, target.clone()


def _augment(x: torch.Tensor, k: int, flip: bool) -> torch.Tensor:
    if flip:
        x = torch.flip(x, dims=(-1,))
    if k:
        x = torch.rot90(x, k, dims=(-2, -1))
    return x.contiguous()


def __getattr__(name: str) -> Any:
    """The probe functions moved to :mod:`cka_geo.data.probes`; the old names still work."""
    if name in ("iter_probe_batches", "probe_images", "distinct_crops"):
        from cka_geo.data import probes

        return getattr(probes, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "BAND_NAMES",
    "BAND_SELECTIONS",
    "EmbeddedS2Tiles",
    "band_indices",
    "band_statistics",
    "block_split",
    "embedded_cover_map",
    "load_embedded_scene",
    "normalized_scene",
    "select_bands",
]
