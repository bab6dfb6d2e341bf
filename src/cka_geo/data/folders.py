"""Loaders for users' data: tile folders, array probe sets, Sen1Floods11, PASTIS-like.

Conventions shared by every loader here:

* Images come out as float32 tensors (C, H, W) (time series: (T, C, H, W)), in the file's
  band order, optionally normalised with user-given per-band ``mean``/``std``.
* Supported image files: ``.tif``/``.tiff`` (read with tifffile, imported on first use) and
  ``.npy`` (numpy). A 2-D array is one band. A 3-D array is (C, H, W) or (H, W, C): with an
  expected band count the axis that has it is the band axis (first axis checked first);
  otherwise the smaller of the first and last axes is (ties: first). ``layout="chw"`` or
  ``"hwc"`` forces one.
* Every user-caused failure raises :class:`cka_geo.errors.DataError` with one line naming the
  file or folder: wrong band count (found vs expected), mask/image size mismatch (both
  files), empty folder, unreadable file, unknown suffix.

Only numpy and torch are imported at module level.
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import Dataset

from cka_geo import walk
from cka_geo.errors import DataError, UsageError

IMAGE_SUFFIXES: tuple[str, ...] = (".tif", ".tiff", ".npy")
ARRAY_SUFFIXES: tuple[str, ...] = (".npy", ".pt", ".pth")
#: Files a tile folder may hold beside its images; they are skipped, not read.
SIDE_SUFFIXES: tuple[str, ...] = (".csv", ".json", ".geojson", ".txt", ".md", ".xml", ".aux")

Layout = Literal["auto", "chw", "hwc"]


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _suffix(path: Path) -> str:
    return path.suffix.lower()


def _check_suffix(path: Path, allowed: Sequence[str]) -> None:
    if _suffix(path) not in allowed:
        raise DataError(
            f"{path}: unknown suffix {path.suffix or '(none)'!r} (expected {', '.join(allowed)})"
        )


def _read_raw(path: Path) -> np.ndarray:
    _check_suffix(path, IMAGE_SUFFIXES)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    try:
        if _suffix(path) == ".npy":
            return np.load(path, allow_pickle=False)
        import tifffile

        return tifffile.imread(path)
    except Exception as exc:
        raise DataError(f"{path}: cannot read: {_one_line(exc)}") from exc


def _peek_shape(path: Path) -> tuple[int, ...]:
    """Shape of an image file without reading its pixels (npy header, TIFF series)."""
    _check_suffix(path, IMAGE_SUFFIXES)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    try:
        if _suffix(path) == ".npy":
            return tuple(np.load(path, mmap_mode="r", allow_pickle=False).shape)
        import tifffile

        with tifffile.TiffFile(path) as tif:
            return tuple(tif.series[0].shape)
    except Exception as exc:
        raise DataError(f"{path}: cannot read: {_one_line(exc)}") from exc


def _band_axis(shape: tuple[int, ...], path: Path, bands: int | None, layout: Layout) -> int:
    """Index of the band axis of a 3-D image shape (0 or 2); validates the band count."""
    if len(shape) == 2:
        found = 1
        axis = -1
    elif len(shape) == 3:
        if layout == "chw":
            axis = 0
        elif layout == "hwc":
            axis = 2
        elif bands is not None and shape[0] == bands:
            axis = 0
        elif bands is not None and shape[2] == bands:
            axis = 2
        else:
            axis = 0 if shape[0] <= shape[2] else 2
        found = shape[axis]
    else:
        raise DataError(
            f"{path}: array of shape {tuple(shape)}; expected (H, W), (C, H, W) or (H, W, C)"
        )
    if bands is not None and found != bands:
        raise DataError(f"{path}: {found} bands, expected {bands} (shape {tuple(shape)})")
    return axis


def _hw(shape: tuple[int, ...], axis: int) -> tuple[int, int]:
    if axis == -1:
        return int(shape[0]), int(shape[1])
    rest = [s for i, s in enumerate(shape) if i != axis]
    return int(rest[0]), int(rest[1])


def read_image(
    path: str | Path, *, bands: int | None = None, layout: Layout = "auto"
) -> np.ndarray:
    """Read one image file as a (C, H, W) array in its stored dtype.

    Args:
        path: A ``.tif``/``.tiff`` (tifffile) or ``.npy`` file.
        bands: Expected band count (checked; also settles an ambiguous layout).
        layout: ``"auto"`` (see the module docstring), ``"chw"`` or ``"hwc"``.

    Returns:
        The image (C, H, W).

    Raises:
        DataError: Unknown suffix, unreadable file, bad rank or wrong band count.
    """
    path = Path(path)
    arr = _read_raw(path)
    axis = _band_axis(arr.shape, path, bands, layout)
    if axis == -1:
        return arr[None]
    return arr if axis == 0 else np.moveaxis(arr, 2, 0)


def read_mask(path: str | Path) -> np.ndarray:
    """Read a label mask as int64 (H, W); a (1, H, W) or (H, W, 1) array is squeezed."""
    path = Path(path)
    arr = _read_raw(path)
    if arr.ndim == 3 and 1 in (arr.shape[0], arr.shape[2]):
        arr = arr.reshape(arr.shape[1:] if arr.shape[0] == 1 else arr.shape[:2])
    if arr.ndim != 2:
        raise DataError(f"{path}: mask of shape {tuple(arr.shape)}; expected (H, W)")
    if np.issubdtype(arr.dtype, np.floating) and (
        not np.all(np.isfinite(arr)) or np.any(arr != np.round(arr))
    ):
        raise DataError(f"{path}: mask holds non-integer values")
    return arr.astype(np.int64)


def _as_stats(
    v: Sequence[float] | np.ndarray | None, n: int | None, name: str
) -> np.ndarray | None:
    if v is None:
        return None
    a = np.asarray(v, dtype=np.float64).reshape(-1)
    if n is not None and a.size != n:
        raise UsageError(f"{name} has {a.size} values, expected one per band ({n})")
    if name == "std" and np.any(a <= 0):
        raise UsageError("std values must be > 0")
    return a


def _to_tensor(
    img: np.ndarray, mean: np.ndarray | None, std: np.ndarray | None, path: Path
) -> torch.Tensor:
    x = np.asarray(img, dtype=np.float32)
    if mean is not None or std is not None:
        c = x.shape[-3]
        m = mean if mean is not None else np.zeros(c)
        s = std if std is not None else np.ones(c)
        if m.size != c or s.size != c:
            raise DataError(f"{path}: {c} bands but mean/std have {m.size}/{s.size} values")
        shape = (c, 1, 1)
        x = ((x - m.reshape(shape)) / s.reshape(shape)).astype(np.float32)
    return torch.from_numpy(np.ascontiguousarray(x))


def _list_images(root: Path) -> list[Path]:
    if not root.is_dir():
        raise DataError(f"{root}: not a folder")
    files = []
    for p in sorted(root.iterdir()):
        if p.name.startswith(".") or p.is_dir():
            continue
        if _suffix(p) in SIDE_SUFFIXES:
            continue
        _check_suffix(p, IMAGE_SUFFIXES)
        files.append(p)
    if not files:
        raise DataError(f"{root}: empty folder (no {', '.join(IMAGE_SUFFIXES)} files)")
    return files


def _read_label_csv(path: Path) -> dict[str, str]:
    try:
        with path.open(newline="", encoding="utf-8") as fh:
            rows = [r for r in csv.reader(fh) if r and any(c.strip() for c in r)]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"{path}: cannot read: {_one_line(exc)}") from exc
    if not rows:
        raise DataError(f"{path}: empty label file")
    header = [c.strip().lower() for c in rows[0]]
    fcol, lcol = 0, 1
    if "label" in header:
        lcol = header.index("label")
        names = [h for h in ("filename", "file", "path", "image", "name") if h in header]
        if not names:
            raise DataError(f"{path}: header has 'label' but no filename/file/image column")
        fcol = header.index(names[0])
        rows = rows[1:]
    out: dict[str, str] = {}
    for i, r in enumerate(rows):
        if len(r) <= max(fcol, lcol):
            raise DataError(f"{path}: row {i + 1} has {len(r)} columns, expected 2")
        out[Path(r[fcol].strip()).name] = r[lcol].strip()
    return out


def _parse_labels(values: list[str], path: Path) -> torch.Tensor:
    try:
        ints = [int(v) for v in values]
        return torch.tensor(ints, dtype=torch.long)
    except ValueError:
        pass
    try:
        return torch.tensor([float(v) for v in values], dtype=torch.float32)
    except ValueError as exc:
        raise DataError(f"{path}: labels must be numbers: {_one_line(exc)}") from exc


class ImageFolder(Dataset):
    """A folder of image tiles (``.tif``/``.tiff``/``.npy``), with optional labels or masks.

    Files are the folder's image files in sorted name order (not recursive; hidden files and
    side files such as .csv/.json are skipped; any other suffix is an error). Shapes are
    checked at construction from the file headers.

    Targets (at most one of):

    * ``labels``: a CSV file with a header holding ``label`` and one of ``filename``/
      ``file``/``path``/``image``/``name`` columns, or two columns ``file,label`` without
      header (matched by file name); or a ``.npy`` array of N labels in sorted file order.
      Integer labels give int64 targets, others float32.
    * ``masks``: a parallel folder with one mask per image of the same stem (any supported
      suffix), (H, W) integers; its size must equal the image's.

    Items: ``image`` alone without a target, else ``(image, target)``; image float32
    (C, H, W), normalised as ``(x - mean) / std`` when given.
    """

    def __init__(
        self,
        root: str | Path,
        *,
        bands: int | None = None,
        labels: str | Path | None = None,
        masks: str | Path | None = None,
        layout: Layout = "auto",
        mean: Sequence[float] | np.ndarray | None = None,
        std: Sequence[float] | np.ndarray | None = None,
        transform: Callable[..., Any] | None = None,
    ) -> None:
        """Index the folder and check every file's shape.

        Args:
            root: The folder of images.
            bands: Expected band count; every image must have it.
            labels: CSV or .npy label file (see the class docstring).
            masks: Folder of masks, matched by stem.
            layout: Band layout of 3-D arrays (``"auto"``, ``"chw"``, ``"hwc"``).
            mean: Per-band means for normalisation.
            std: Per-band standard deviations for normalisation.
            transform: Optional callable applied to ``image`` (no target) or to
                ``(image, target)`` and returning the same structure.

        Raises:
            DataError: Empty folder, unknown suffix, unreadable file, wrong band count,
                missing label or mask, mask/image size mismatch.
            UsageError: Both labels and masks given, or bad mean/std.
        """
        if labels is not None and masks is not None:
            raise UsageError("give labels or masks, not both")
        self.root = Path(root)
        self.layout: Layout = layout
        self.files = _list_images(self.root)
        self.transform = transform
        shapes = []
        for f in self.files:
            shape = _peek_shape(f)
            axis = _band_axis(shape, f, bands, layout)
            c = 1 if axis == -1 else shape[axis]
            if bands is None:
                bands = c  # the first file fixes the band count for the rest
            shapes.append(_hw(shape, axis))
        self.bands: int = int(bands) if bands is not None else 1
        self.mean = _as_stats(mean, self.bands, "mean")
        self.std = _as_stats(std, self.bands, "std")
        self.labels: torch.Tensor | None = None
        self.mask_files: list[Path] | None = None
        if labels is not None:
            self.labels = self._load_labels(Path(labels))
        if masks is not None:
            mroot = Path(masks)
            if not mroot.is_dir():
                raise DataError(f"{mroot}: mask folder not found")
            by_stem = {p.stem: p for p in mroot.iterdir() if _suffix(p) in IMAGE_SUFFIXES}
            self.mask_files = []
            for f, hw in zip(self.files, shapes, strict=True):
                m = by_stem.get(f.stem)
                if m is None:
                    raise DataError(f"{f}: no mask named {f.stem}.* in {mroot}")
                mshape = _peek_shape(m)
                mhw = mshape[-2:] if len(mshape) == 2 or mshape[0] == 1 else mshape[:2]
                if tuple(mhw) != hw:
                    raise DataError(
                        f"mask {m} is {mhw[0]}x{mhw[1]} but image {f} is {hw[0]}x{hw[1]}"
                    )
                self.mask_files.append(m)

    def _load_labels(self, path: Path) -> torch.Tensor:
        if _suffix(path) == ".npy":
            try:
                arr = np.load(path, allow_pickle=False)
            except Exception as exc:
                raise DataError(f"{path}: cannot read: {_one_line(exc)}") from exc
            if arr.ndim != 1 or arr.shape[0] != len(self.files):
                raise DataError(
                    f"{path}: {arr.shape} labels for {len(self.files)} images in {self.root}"
                )
            if np.issubdtype(arr.dtype, np.integer):
                return torch.from_numpy(arr.astype(np.int64))
            return torch.from_numpy(arr.astype(np.float32))
        _check_suffix(path, (".csv", ".npy"))
        table = _read_label_csv(path)
        values = []
        for f in self.files:
            if f.name not in table:
                raise DataError(f"{path}: no label for {f.name}")
            values.append(table[f.name])
        return _parse_labels(values, path)

    def __len__(self) -> int:
        """Number of images."""
        return len(self.files)

    def image(self, index: int) -> torch.Tensor:
        """Image ``index`` as float32 (C, H, W), normalised if mean/std were given."""
        f = self.files[index]
        img = read_image(f, bands=self.bands, layout=self.layout)
        return _to_tensor(img, self.mean, self.std, f)

    def __getitem__(self, index: int) -> Any:
        """``image`` or ``(image, target)`` (see the class docstring)."""
        x = self.image(index)
        if self.labels is not None:
            item: Any = (x, self.labels[index])
        elif self.mask_files is not None:
            mask = read_mask(self.mask_files[index])
            if mask.shape != tuple(x.shape[-2:]):
                raise DataError(
                    f"mask {self.mask_files[index]} is {mask.shape[0]}x{mask.shape[1]} but "
                    f"image {self.files[index]} is {x.shape[-2]}x{x.shape[-1]}"
                )
            item = (x, torch.from_numpy(mask))
        else:
            item = x
        if self.transform is not None:
            item = self.transform(*item) if isinstance(item, tuple) else self.transform(item)
        return item


def load_array_probes(
    path: str | Path,
    *,
    bands: int | None = None,
    size: int | None = None,
    time_series: bool = False,
) -> torch.Tensor:
    """Load a probe set stored as one array of shape (N, C, H, W).

    With ``time_series=True`` an image time series (N, T, C, H, W) is accepted as well.

    Args:
        path: ``.npy`` (read memory-mapped, then converted) or ``.pt``/``.pth`` (loaded with
            ``torch.load(weights_only=True)``; a tensor, or a dict holding exactly one
            tensor or an ``"images"`` tensor).
        bands: Expected C.
        size: Expected H and W.

    Returns:
        float32 tensor (N, C, H, W).

    Raises:
        DataError: Unknown suffix, unreadable file, wrong rank, band count or size, empty.
    """
    path = Path(path)
    _check_suffix(path, ARRAY_SUFFIXES)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    if _suffix(path) != ".npy":
        from cka_geo.checkpoints.pickle_scan import check_pickle_file

        try:  # a hostile pickle can crash the unpickler: look at it first
            check_pickle_file(path, DataError)
        except DataError as exc:
            reason = str(exc).removeprefix(f"{path}: ")
            raise DataError(f"{path}: cannot read: {reason}") from None
    try:
        if _suffix(path) == ".npy":
            arr: Any = np.load(path, mmap_mode="r", allow_pickle=False)
        else:
            arr = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise DataError(f"{path}: cannot read: {_one_line(exc)}") from exc
    if isinstance(arr, dict):
        tensors = {k: v for k, v in arr.items() if isinstance(v, torch.Tensor)}
        if "images" in tensors:
            arr = tensors["images"]
        elif len(tensors) == 1:
            arr = next(iter(tensors.values()))
        else:
            raise DataError(f"{path}: dict without an 'images' tensor ({len(tensors)} tensors)")
    if not isinstance(arr, (np.ndarray, torch.Tensor)):
        raise DataError(f"{path}: holds {type(arr).__name__}, expected an array (N, C, H, W)")
    if isinstance(arr, torch.Tensor) and (
        arr.layout != torch.strided
        or arr.numel() * arr.element_size() > arr.untyped_storage().nbytes()
    ):
        raise DataError(
            f"{path}: a tensor of shape {tuple(arr.shape)} claims more data than it holds"
        )
    shape = tuple(arr.shape)
    if len(shape) != 4 and not (time_series and len(shape) == 5):
        want = "(N, C, H, W) or (N, T, C, H, W)" if time_series else "(N, C, H, W)"
        raise DataError(f"{path}: array of shape {shape}; expected {want}")
    if shape[0] == 0 or 0 in shape:
        raise DataError(f"{path}: empty probe set (shape {shape})")
    if bands is not None and shape[-3] != bands:
        raise DataError(f"{path}: {shape[-3]} bands, expected {bands} (shape {shape})")
    if size is not None and shape[-2:] != (size, size):
        raise DataError(f"{path}: images are {shape[-2]}x{shape[-1]}, expected {size}x{size}")
    if isinstance(arr, torch.Tensor):
        out = arr.detach().to(torch.float32)
    else:
        out = torch.from_numpy(np.array(arr, dtype=np.float32))
    if not torch.isfinite(out).all():
        raise DataError(f"{path}: probe set holds NaN or Inf")
    return out.contiguous()


# --------------------------------------------------------------------------- Sen1Floods11

#: Folders searched (below the root given) for the hand-labelled chips: the bucket layout
#: ``v1.1/data/flood_events/HandLabeled/{S2Hand,LabelHand}`` and flatter copies.
_S1F11_PARENTS: tuple[str, ...] = (
    ".",
    "HandLabeled",
    "flood_events/HandLabeled",
    "data/flood_events/HandLabeled",
    "v1.1/data/flood_events/HandLabeled",
    "data",
    "v1.1/data",
)
_S1F11_IMAGE_DIRS = ("S2Hand", "S2L1CHand")
_S1F11_SPLIT_NAMES = {"train": "train", "val": "valid", "valid": "valid", "test": "test"}


def _strip_chip(name: str) -> str:
    name = Path(name.strip()).name
    for tail in ("_S2Hand.tif", "_S1Hand.tif", "_LabelHand.tif", "_S2Hand", "_S1Hand"):
        if name.endswith(tail):
            return name[: -len(tail)]
    return name


class Sen1Floods11(Dataset):
    """The Sen1Floods11 hand-labelled Sentinel-2 chips (or any folder in its layout).

    Layout (as in the ``sen1floods11`` bucket, v1.1): ``S2Hand/{chip}_S2Hand.tif`` holds the
    13 L1C bands (B1, B2, B3, B4, B5, B6, B7, B8, B8A, B9, B10, B11, B12), 512 x 512;
    ``LabelHand/{chip}_LabelHand.tif`` the mask: 1 water, 0 not water, -1 no data (kept as
    -1, :attr:`ignore_index`). The two folders are looked for in ``root`` and in
    ``HandLabeled``, ``data/flood_events/HandLabeled``,
    ``v1.1/data/flood_events/HandLabeled`` below it (``S2L1CHand`` is accepted for
    ``S2Hand``). ``chip`` is ``{Region}_{id}`` (e.g. ``Ghana_103272``).

    Splits: the official lists ``flood_{train,valid,test}_data.csv`` (one chip per line;
    the first column may be a ``*_S1Hand.tif``/``*_S2Hand.tif`` name or a bare chip id;
    ``.txt`` accepted) found anywhere below ``root``, or ``split_file`` given explicitly.
    ``split=None`` takes every chip.

    Items: ``(image float32 (C, H, W), mask int64 (H, W))``.
    """

    ignore_index = -1

    def __init__(
        self,
        root: str | Path,
        *,
        split: Literal["train", "val", "valid", "test"] | None = None,
        split_file: str | Path | None = None,
        bands: Sequence[int] | None = None,
        mean: Sequence[float] | np.ndarray | None = None,
        std: Sequence[float] | np.ndarray | None = None,
    ) -> None:
        """Find the chips.

        Args:
            root: The dataset folder.
            split: Which official split to read, or ``None`` for all chips.
            split_file: A chip list to use instead of the official split files.
            bands: Indices of the bands to keep (of the 13), in order; default all.
            mean: Per-band means (of the kept bands) for normalisation.
            std: Per-band standard deviations for normalisation.

        Raises:
            DataError: Folders or split file not found, no chips, missing label file.
        """
        self.root = Path(root)
        if not self.root.is_dir():
            raise DataError(f"{self.root}: not a folder")
        image_dir = label_dir = None
        for parent in _S1F11_PARENTS:
            base = self.root / parent
            for name in _S1F11_IMAGE_DIRS:
                if (base / name).is_dir() and (base / "LabelHand").is_dir():
                    image_dir, label_dir = base / name, base / "LabelHand"
                    break
            if image_dir is not None:
                break
        if image_dir is None or label_dir is None:
            raise DataError(
                f"{self.root}: no S2Hand/ and LabelHand/ folders (Sen1Floods11 layout) found"
            )
        self.image_dir, self.label_dir = image_dir, label_dir
        chips = sorted(_strip_chip(p.name) for p in image_dir.glob("*_S2Hand.tif"))
        if not chips:
            raise DataError(f"{image_dir}: empty folder (no *_S2Hand.tif chips)")
        if split is not None or split_file is not None:
            wanted = self._split_ids(split, split_file)
            have = set(chips)
            missing = [c for c in wanted if c not in have]
            if missing:
                raise DataError(
                    f"{image_dir}: {len(missing)} chip(s) of the split missing, e.g. "
                    f"{missing[0]}_S2Hand.tif"
                )
            chips = wanted
        self.chips = chips
        for c in chips:
            if not (label_dir / f"{c}_LabelHand.tif").is_file():
                ipath, mpath = image_dir / f"{c}_S2Hand.tif", label_dir / f"{c}_LabelHand.tif"
                raise DataError(f"{ipath}: no label file {mpath}")
        self.band_index = list(range(13)) if bands is None else [int(b) for b in bands]
        if any(not 0 <= b < 13 for b in self.band_index) or not self.band_index:
            raise UsageError(f"bands must be indices in 0..12, got {list(self.band_index)}")
        n = len(self.band_index)
        self.mean = _as_stats(mean, n, "mean")
        self.std = _as_stats(std, n, "std")

    def _split_ids(self, split: str | None, split_file: str | Path | None) -> list[str]:
        if split_file is not None:
            path = Path(split_file)
        else:
            if split not in _S1F11_SPLIT_NAMES:
                raise UsageError(f"split must be train, val, valid or test, got {split!r}")
            key = _S1F11_SPLIT_NAMES[split]
            found = sorted(
                p
                for pattern in (f"flood_{key}_data.csv", f"flood_{key}_data.txt")
                for p in self.root.rglob(pattern)
            )
            if not found:
                raise DataError(f"{self.root}: no split file flood_{key}_data.csv found")
            path = found[0]
        try:
            with path.open(newline="", encoding="utf-8") as fh:
                rows = [r for r in csv.reader(fh) if r and r[0].strip()]
        except (OSError, UnicodeDecodeError, csv.Error) as exc:
            raise DataError(f"{path}: cannot read: {_one_line(exc)}") from exc
        ids = [_strip_chip(r[0]) for r in rows]
        if not ids:
            raise DataError(f"{path}: empty split file")
        return ids

    def __len__(self) -> int:
        """Number of chips."""
        return len(self.chips)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(image, mask)`` of chip ``index``; mask -1 marks no data."""
        chip = self.chips[index]
        ipath = self.image_dir / f"{chip}_S2Hand.tif"
        mpath = self.label_dir / f"{chip}_LabelHand.tif"
        img = read_image(ipath, bands=13)[self.band_index]
        mask = read_mask(mpath)
        if mask.shape != img.shape[-2:]:
            raise DataError(
                f"mask {mpath} is {mask.shape[0]}x{mask.shape[1]} but image {ipath} is "
                f"{img.shape[-2]}x{img.shape[-1]}"
            )
        bad = ~np.isin(mask, (-1, 0, 1))
        if bad.any():
            raise DataError(f"{mpath}: mask values must be -1, 0 or 1, found {mask[bad][0]}")
        x = torch.nan_to_num(_to_tensor(img, self.mean, self.std, ipath))
        return x, torch.from_numpy(mask)


# --------------------------------------------------------------------------- PASTIS-like


def evenly_spaced_frames(num_dates: int, n: int) -> list[int]:
    """Indices of ``n`` dates evenly spaced over ``num_dates`` (first and last included).

    ``round(linspace(0, num_dates - 1, n))``; with fewer dates than ``n`` some repeat.

    Args:
        num_dates: Length of the time series (>= 1).
        n: Number of frames wanted (>= 1).

    Returns:
        ``n`` non-decreasing indices.
    """
    if num_dates < 1 or n < 1:
        raise UsageError(f"need num_dates >= 1 and n >= 1, got {num_dates} and {n}")
    return [int(v) for v in np.round(np.linspace(0, num_dates - 1, n)).astype(np.int64)]


class PastisLike(Dataset):
    """A PASTIS-like time-series layout.

    Layout (as in PASTIS / PASTIS-R)::

        root/metadata.geojson            # FeatureCollection; properties per patch:
                                         #   ID_PATCH, Fold (1..5), dates-S2 {"0": 20180924, ...}
        root/DATA_S2/S2_{ID_PATCH}.npy   # (T, C, H, W), PASTIS: C = 10, H = W = 128
        root/ANNOTATIONS/TARGET_{ID_PATCH}.npy  # (3, H, W), channel 0 the semantic class
                                                # (or a plain (H, W) class map)

    PASTIS classes are 0 background, 1-18 crop types, 19 void (:attr:`ignore_index`);
    its folds 1-3 are train, 4 val, 5 test. ``dates-S2`` may be a dict or a JSON string.

    Frames: ``frames=6`` (default) picks 6 evenly spaced dates per patch
    (:func:`evenly_spaced_frames`, as PANGAEA does), an int n picks n, a sequence picks
    those indices, ``None`` keeps all dates (patches then differ in length).

    Items: ``(series float32 (T', C, H, W), target int64 (H, W))``; :meth:`dates` gives the
    chosen frames' dates.
    """

    ignore_index = 19

    def __init__(
        self,
        root: str | Path,
        *,
        folds: Sequence[int] | None = None,
        frames: int | Sequence[int] | None = 6,
        bands: int | None = 10,
        mean: Sequence[float] | np.ndarray | None = None,
        std: Sequence[float] | np.ndarray | None = None,
    ) -> None:
        """Read the metadata and check that every patch's files exist.

        Args:
            root: The dataset folder.
            folds: Folds to keep (default all).
            frames: Frame choice (see the class docstring).
            bands: Expected band count C (``None``: not checked).
            mean: Per-band means for normalisation.
            std: Per-band standard deviations for normalisation.

        Raises:
            DataError: Missing or unreadable metadata, no patch, missing files.
        """
        self.root = Path(root)
        meta_path = self.root / "metadata.geojson"
        if not meta_path.is_file():
            raise DataError(f"{self.root}: no metadata.geojson (PASTIS-like layout)")
        try:
            meta = walk.loads_json(meta_path.read_text(encoding="utf-8"), root_name="metadata")
            feats = [f["properties"] for f in meta["features"]]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise DataError(f"{meta_path}: cannot read: {_one_line(exc)}") from exc
        patches = []
        for props in feats:
            try:
                pid = int(props["ID_PATCH"])
                fold = int(props.get("Fold", 0))
            except (KeyError, TypeError, ValueError) as exc:
                raise DataError(
                    f"{meta_path}: feature without ID_PATCH/Fold: {_one_line(exc)}"
                ) from exc
            if folds is None or fold in set(folds):
                dates = props.get("dates-S2", {})
                try:
                    if isinstance(dates, str):
                        dates = walk.loads_json(dates, root_name="dates-S2")
                    dates = {int(k): int(v) for k, v in (dates or {}).items()}
                except (ValueError, TypeError, AttributeError) as exc:
                    raise DataError(
                        f"{meta_path}: patch {pid}: dates-S2 is not an object of "
                        f"index -> date: {_one_line(exc)}"
                    ) from exc
                patches.append((pid, fold, dates))
        patches.sort(key=lambda t: t[0])
        if not patches:
            raise DataError(f"{meta_path}: no patch in folds {list(folds or [])}")
        self.patch_ids = [p[0] for p in patches]
        self.folds = [p[1] for p in patches]
        self._dates = [[v for _, v in sorted(d.items())] if d else [] for _, _, d in patches]
        for pid in self.patch_ids:
            for path in (self._data_path(pid), self._target_path(pid)):
                if not path.is_file():
                    raise DataError(f"{path}: missing (patch {pid} of {meta_path})")
        if isinstance(frames, int) and not isinstance(frames, bool) and frames < 1:
            raise UsageError(f"frames must be >= 1, got {frames}")
        self.frames = frames
        self.bands = bands
        self.mean = _as_stats(mean, bands, "mean")
        self.std = _as_stats(std, bands, "std")

    def _data_path(self, pid: int) -> Path:
        return self.root / "DATA_S2" / f"S2_{pid}.npy"

    def _target_path(self, pid: int) -> Path:
        return self.root / "ANNOTATIONS" / f"TARGET_{pid}.npy"

    def frame_indices(self, num_dates: int) -> list[int]:
        """Indices of the frames taken from a series of ``num_dates`` dates."""
        if self.frames is None:
            return list(range(num_dates))
        if isinstance(self.frames, int):
            return evenly_spaced_frames(num_dates, self.frames)
        idx = [int(i) for i in self.frames]
        if any(not -num_dates <= i < num_dates for i in idx):
            raise DataError(f"frame indices {idx} out of range for {num_dates} dates")
        return idx

    def dates(self, index: int) -> list[int]:
        """Dates (YYYYMMDD) of the frames served for patch ``index`` (from the metadata)."""
        d = self._dates[index]
        return [d[i] for i in self.frame_indices(len(d))] if d else []

    def __len__(self) -> int:
        """Number of patches."""
        return len(self.patch_ids)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(series (T', C, H, W), target (H, W))`` of patch ``index``."""
        pid = self.patch_ids[index]
        dpath, tpath = self._data_path(pid), self._target_path(pid)
        try:
            data = np.load(dpath, mmap_mode="r", allow_pickle=False)
        except Exception as exc:
            raise DataError(f"{dpath}: cannot read: {_one_line(exc)}") from exc
        if data.ndim != 4:
            raise DataError(f"{dpath}: array of shape {data.shape}; expected (T, C, H, W)")
        if self.bands is not None and data.shape[1] != self.bands:
            raise DataError(
                f"{dpath}: {data.shape[1]} bands, expected {self.bands} (shape {data.shape})"
            )
        series = np.asarray(data[self.frame_indices(data.shape[0])])
        target = _read_raw(tpath)
        if target.ndim == 3:
            target = target[0]
        if target.ndim != 2:
            raise DataError(f"{tpath}: target of shape {target.shape}; expected (3, H, W)")
        if target.shape != series.shape[-2:]:
            raise DataError(
                f"mask {tpath} is {target.shape[0]}x{target.shape[1]} but image {dpath} is "
                f"{series.shape[-2]}x{series.shape[-1]}"
            )
        x = _to_tensor(series, self.mean, self.std, dpath)
        return x, torch.from_numpy(target.astype(np.int64))


def iter_batches(dataset: Dataset, batch_size: int) -> Iterator[torch.Tensor]:
    """Yield the images of a dataset in stacked batches (targets dropped).

    Args:
        dataset: Any dataset whose items are an image tensor or ``(image, target)``.
        batch_size: Images per batch.

    Yields:
        Tensors (b, ...) of stacked images.
    """
    if batch_size < 1:
        raise UsageError(f"batch_size must be >= 1, got {batch_size}")
    files = getattr(dataset, "files", None)

    def name(i: int) -> str:
        return str(files[i]) if files is not None and i < len(files) else f"item {i}"

    buf: list[torch.Tensor] = []
    first: tuple[int, ...] | None = None
    for i in range(len(dataset)):  # type: ignore[arg-type]
        item = dataset[i]
        image = item[0] if isinstance(item, tuple) else item
        if first is None:
            first = tuple(image.shape)
        elif tuple(image.shape) != first:
            raise DataError(
                f"{name(i)} has shape {tuple(image.shape)} but {name(0)} has {first}: "
                "all images of a probe set must have one size"
            )
        buf.append(image)
        if len(buf) == batch_size:
            yield torch.stack(buf)
            buf = []
    if buf:
        yield torch.stack(buf)


__all__ = [
    "IMAGE_SUFFIXES",
    "ImageFolder",
    "PastisLike",
    "Sen1Floods11",
    "evenly_spaced_frames",
    "iter_batches",
    "load_array_probes",
    "read_image",
    "read_mask",
]
