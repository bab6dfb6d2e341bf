"""Tile folders (images, optional labels or masks), array probe sets, and stacking into batches."""

from __future__ import annotations

import csv
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from cka_geo.data.readers import (
    ARRAY_SUFFIXES,
    IMAGE_SUFFIXES,
    SIDE_SUFFIXES,
    Layout,
    _as_stats,
    _band_axis,
    _check_suffix,
    _hw,
    _one_line,
    _peek_shape,
    _suffix,
    _to_tensor,
    read_image,
    read_mask,
)
from cka_geo.errors import DataError, UsageError


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
