"""The Sen1Floods11 layout: S2 or S1 chips with hand-labelled water masks (ignore -1)."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch.utils.data import Dataset

from cka_geo.data.readers import (
    _as_stats,
    _one_line,
    _to_tensor,
    read_image,
    read_mask,
)
from cka_geo.errors import DataError, UsageError

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
