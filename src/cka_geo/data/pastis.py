"""A PASTIS-like layout: image time series (T, C, H, W) with semantic masks."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from cka_geo import walk
from cka_geo.data.readers import (
    _as_stats,
    _one_line,
    _read_raw,
    _to_tensor,
)
from cka_geo.errors import DataError, UsageError


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
