"""Users' labelled datasets for training, evaluation and probing (``--data`` of finetune,
evaluate, probe), in the layouts researchers have.

Layouts (``layout="auto"`` recognises them in this order):

* ``pastis``: ``metadata.geojson``, ``DATA_S2/``, ``ANNOTATIONS/`` (:class:`~cka_geo.data.PastisLike`);
  segmentation of 19 classes (18 crops and background; 19 void ignored); folds 1-3 train,
  4 val, 5 test (PASTIS's own). The series is averaged over its frames per pixel
  (``time_mode="mean"``): single-date encoders see one image.
* ``sen1floods11``: ``S2Hand/`` and ``LabelHand/`` (:class:`~cka_geo.data.Sen1Floods11`); water
  segmentation, 2 classes, -1 ignored; the official ``flood_{train,valid,test}_data.csv``.
* ``image-mask``: ``images/`` and ``masks/`` (same stems; :class:`~cka_geo.data.ImageFolder`);
  segmentation, classes 0..max found in the training masks, -1 ignored.
* ``csv``: image files beside a ``.csv`` (or ``labels=``): a ``filename`` column (or ``file``,
  ``path``, ``image``, ``name``) and the targets: for ``regression`` the numeric column(s)
  ``target`` names (comma-separated); for ``multilabel`` (BigEarthNet style) a column
  (``target``, default ``labels``) of class names separated by ``;`` or ``|``.
* ``class-folders``: ``root/<class>/*.tif|npy`` (EuroSAT style); classification, classes in
  sorted folder order.

Splits, first found: split folders ``root/{train,val,test}/`` each in the layout (class
folders and image-mask); files ``train.txt``, ``val.txt``, ``test.txt`` in ``root`` (one item
per line: a file name, a stem, or ``class/file`` for class folders); a ``split`` column in the
CSV; the layout's own (PASTIS folds, Sen1Floods11 lists); else a seeded split:
``numpy.random.default_rng(seed).permutation`` of the items, the first
``round(val_fraction * n)`` to val, the next ``round(test_fraction * n)`` to test (at least one
each when n >= 3), the rest to train.

Every mismatch is a :class:`~cka_geo.errors.DataError` of one line naming the file or folder.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Subset

from cka_geo.data.readers import (
    IMAGE_SUFFIXES,
    _band_axis,
    _hw,
    _one_line,
    _peek_shape,
    _suffix,
    read_image,
)
from cka_geo.errors import DataError, UsageError

LAYOUTS = ("auto", "class-folders", "image-mask", "sen1floods11", "pastis", "csv")
SPLITS = ("train", "val", "test")
_FILE_COLUMNS = ("filename", "file", "path", "image", "name")


@dataclass
class UserData:
    """A labelled dataset split three ways.

    Attributes:
        root: The ``--data`` folder.
        layout: The layout found or given.
        task: ``classification``, ``segmentation``, ``regression`` or ``multilabel``.
        splits: ``{"train", "val", "test"}`` -> datasets of ``(image, target)``.
        num_outputs: Classes or regression targets.
        classes: Class names (None for regression).
        ignore_index: Mask value ignored (segmentation).
        split_rule: How the splits were made, for the record.
    """

    root: Path
    layout: str
    task: str
    splits: dict[str, Any]
    num_outputs: int
    classes: list[str] | None = None
    ignore_index: int = -1
    split_rule: str = ""
    record: dict[str, Any] = field(default_factory=dict)


class FileTargets(Dataset):
    """Image files with one target each: ``(image float32 (C, H, W), target)``.

    Every file's header is read at construction: one band count and one size for all.
    """

    def __init__(self, files: Sequence[Path], targets: torch.Tensor, where: Path) -> None:
        if not files:
            raise DataError(f"{where}: no images")
        self.files, self.targets = list(files), targets
        self.bands = self.hw = None
        for f in self.files:
            shape = _peek_shape(f)
            axis = _band_axis(shape, f, self.bands, "auto")
            c, hw = (1 if axis == -1 else shape[axis]), _hw(shape, axis)
            if self.hw is None:
                self.bands, self.hw, first = c, hw, f
            elif hw != self.hw:
                raise DataError(f"{f} is {hw[0]}x{hw[1]} but {first} is {self.hw[0]}x{self.hw[1]}: one size for all")

    def __len__(self) -> int:
        """Number of images."""
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(image, target)`` of item ``i``."""
        img = read_image(self.files[i], bands=self.bands)
        return torch.from_numpy(np.ascontiguousarray(img, dtype=np.float32)), self.targets[i]


class TimeMean(Dataset):
    """A time-series dataset ``(T, C, H, W)`` seen as images: the per-pixel mean over frames."""

    def __init__(self, series: Dataset) -> None:
        self.series = series

    def __len__(self) -> int:
        """Number of series."""
        return len(self.series)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mean image (C, H, W), target)``."""
        x, y = self.series[i]
        return x.mean(dim=0), y


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")
                  and _suffix(p) in IMAGE_SUFFIXES)


def _subdirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def detect_layout(root: Path) -> str:
    """The layout of ``root`` (see the module docstring); refuses a folder that has none."""
    from cka_geo.data.sen1floods11 import _S1F11_PARENTS

    if (root / "metadata.geojson").is_file():
        return "pastis"
    if any((root / p / "S2Hand").is_dir() and (root / p / "LabelHand").is_dir() for p in _S1F11_PARENTS):
        return "sen1floods11"
    base = root / "train" if (root / "train").is_dir() else root
    if (base / "images").is_dir() and (base / "masks").is_dir():
        return "image-mask"
    if any(p.suffix.lower() == ".csv" for p in root.iterdir()) and _images_in(root):
        return "csv"
    if any(_images_in(d) for d in _subdirs(base)):
        return "class-folders"
    raise DataError(f"{root}: no known layout (class folders, images/ + masks/, Sen1Floods11, PASTIS-like "
                    "or images with a .csv; see docs/data.md)")


def _split_lists(root: Path) -> dict[str, list[str]] | None:
    found = {s: root / f"{s}.txt" for s in SPLITS if (root / f"{s}.txt").is_file()}
    if not found:
        return None
    if "train" not in found:
        raise DataError(f"{root}: split files {', '.join(p.name for p in found.values())} without train.txt")
    out = {}
    for s, p in found.items():
        try:
            out[s] = [ln.strip() for ln in p.read_text(encoding="utf-8").splitlines() if ln.strip()]
        except (OSError, UnicodeDecodeError) as exc:
            raise DataError(f"{p}: cannot read: {_one_line(exc)}") from exc
    return out


def _by_lists(keys: list[str], lists: dict[str, list[str]], root: Path) -> dict[str, list[int]]:
    """Item indices of each split file; every entry must name one item."""
    index: dict[str, int] = {}
    for i, k in enumerate(keys):
        for alias in (k, Path(k).name, Path(k).stem, str(Path(k).with_suffix(""))):
            index.setdefault(alias, i)
    out = {}
    for s, entries in lists.items():
        missing = [e for e in entries if e not in index]
        if missing:
            raise DataError(f"{root / (s + '.txt')}: {len(missing)} entries not in the data, e.g. {missing[0]!r}")
        out[s] = [index[e] for e in entries]
    return out


def seeded_split(n: int, seed: int, val_fraction: float, test_fraction: float) -> dict[str, list[int]]:
    """Train/val/test indices of ``n`` items by the seeded rule of the module docstring."""
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise UsageError(f"--val-fraction {val_fraction} and --test-fraction {test_fraction}: each in [0, 1), "
                         "together below 1")
    perm = np.random.default_rng(seed).permutation(n).tolist()
    nv, nt = round(val_fraction * n), round(test_fraction * n)
    if n >= 3:
        nv, nt = max(nv, 1 if val_fraction else 0), max(nt, 1 if test_fraction else 0)
    return {"val": sorted(perm[:nv]), "test": sorted(perm[nv : nv + nt]), "train": sorted(perm[nv + nt :])}


def _read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    try:
        with path.open(newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            rows = [r for r in reader if any((v or "").strip() for v in r.values())]
            header = [h.strip() for h in reader.fieldnames or []]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"{path}: cannot read: {_one_line(exc)}") from exc
    if not rows:
        raise DataError(f"{path}: no rows")
    return header, [{k.strip(): (v or "").strip() for k, v in r.items() if k is not None} for r in rows]


class _Opened:
    """Items of a layout before splitting: a dataset, item keys and per-split indices (or None)."""

    def __init__(self, dataset: Any, keys: list[str], splits: dict[str, list[int]] | None, rule: str) -> None:
        self.dataset, self.keys, self.splits, self.rule = dataset, keys, splits, rule


def _class_folders(base: Path, classes: list[str] | None) -> tuple[FileTargets, list[str], list[str]]:
    dirs = _subdirs(base)
    if not dirs:
        raise DataError(f"{base}: no class folders (root/<class>/*.tif|npy)")
    names = [d.name for d in dirs]
    if classes is None:
        classes = names
    else:
        missing = [c for c in classes if c not in names]
        extra = [n for n in names if n not in classes]
        if missing:
            raise DataError(f"{base}: missing class folder {missing[0]!r} (the training split has it)")
        if extra:
            raise DataError(f"{base / extra[0]}: class folder not in the training split")
    files, targets, keys = [], [], []
    for c, d in zip(names, dirs, strict=True):
        imgs = _images_in(d)
        if not imgs:
            raise DataError(f"{d}: empty class folder (no {', '.join(IMAGE_SUFFIXES)} files)")
        files += imgs
        targets += [classes.index(c)] * len(imgs)
        keys += [f"{c}/{p.name}" for p in imgs]
    return FileTargets(files, torch.tensor(targets, dtype=torch.long), base), classes, keys


def _csv_items(root: Path, task: str, target: str | None, labels: Path | None) -> tuple[FileTargets, list[str], list[str], list[str] | None]:
    """(dataset, keys, split column values, classes) of the csv layout."""
    if labels is None:
        found = sorted(p for p in root.iterdir() if p.suffix.lower() == ".csv")
        if len(found) != 1:
            raise DataError(f"{root}: {len(found)} .csv files; name the label file with --labels")
        labels = found[0]
    header, rows = _read_csv(labels)
    fcols = [c for c in _FILE_COLUMNS if c in header]
    if not fcols:
        raise DataError(f"{labels}: no file column (one of {', '.join(_FILE_COLUMNS)}); columns are {', '.join(header)}")
    if task not in ("regression", "multilabel"):
        raise UsageError(f"--data {root}: images with a .csv serve --task regression or multilabel, not {task}")
    cols = (target or ("labels" if task == "multilabel" else "target")).split(",")
    unknown = [c for c in cols if c not in header]
    if unknown:
        raise DataError(f"{labels}: unknown column {unknown[0]!r} (--target); columns are {', '.join(header)}")
    files = []
    for i, r in enumerate(rows):
        f = root / r[fcols[0]]
        if not f.is_file():
            raise DataError(f"{labels}: row {i + 1}: no image {f}")
        files.append(f)
    classes = None
    if task == "regression":
        try:
            t = torch.tensor([[float(r[c]) for c in cols] for r in rows], dtype=torch.float32)
        except ValueError as exc:
            raise DataError(f"{labels}: --target {','.join(cols)} must be numbers: {_one_line(exc)}") from None
        if not torch.isfinite(t).all():
            raise DataError(f"{labels}: --target {','.join(cols)} holds NaN or Inf")
    else:
        sets = [[n.strip() for n in r[cols[0]].replace("|", ";").split(";") if n.strip()] for r in rows]
        classes = sorted({n for s in sets for n in s})
        if not classes:
            raise DataError(f"{labels}: column {cols[0]!r} names no class")
        t = torch.zeros(len(rows), len(classes))
        for i, s in enumerate(sets):
            t[i, [classes.index(n) for n in s]] = 1.0
    split_col = [r.get("split", "") for r in rows] if "split" in header else []
    return FileTargets(files, t, labels), [str(p.relative_to(root)) for p in files], split_col, classes


def open_user_data(
    root: str | Path, *, task: str | None = None, layout: str = "auto", target: str | None = None,
    labels: str | Path | None = None, split_seed: int = 0, val_fraction: float = 0.1, test_fraction: float = 0.2,
) -> UserData:
    """Open ``root`` in its layout, with its task and three splits (see the module docstring).

    Args:
        root: The dataset folder.
        task: The task wanted (default: the layout's); refused when the layout cannot serve it.
        layout: One of :data:`LAYOUTS`.
        target: CSV column(s) of the targets (regression, multilabel).
        labels: The CSV file (default: the one ``.csv`` in ``root``).
        split_seed, val_fraction, test_fraction: The seeded split, where no split is given.

    Raises:
        DataError: Every mismatch, in one line naming the file or folder.
        UsageError: An unknown layout, or a task the layout does not serve.
    """
    from cka_geo.data.imagefolder import ImageFolder
    from cka_geo.data.pastis import PastisLike
    from cka_geo.data.sen1floods11 import Sen1Floods11

    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: no such folder (--data)")
    if layout not in LAYOUTS:
        raise UsageError(f"--layout {layout!r}: choose one of {', '.join(LAYOUTS)}")
    layout = detect_layout(root) if layout == "auto" else layout
    own = {"class-folders": "classification", "image-mask": "segmentation", "sen1floods11": "segmentation",
           "pastis": "segmentation", "csv": task or "regression"}[layout]
    if task is not None and task != own:
        raise UsageError(f"--data {root}: the {layout} layout serves --task {own}, not {task}")
    task = own
    seeded = f"seeded split (seed {split_seed}, val {val_fraction:g}, test {test_fraction:g})"
    classes: list[str] | None = None
    ignore = -1
    splits: dict[str, Any]
    ds: Any
    split_dirs = (root / "train").is_dir() and layout in ("class-folders", "image-mask")
    if layout == "pastis":
        folds = {"train": (1, 2, 3), "val": (4,), "test": (5,)}
        splits = {s: TimeMean(PastisLike(root, folds=f, bands=None)) for s, f in folds.items()}
        return _finish(UserData(root, layout, task, splits, 19, [str(i) for i in range(19)],
                                PastisLike.ignore_index, "PASTIS folds 1-3 train, 4 val, 5 test"))
    if layout == "sen1floods11":
        names = {"train": "train", "val": "valid", "test": "test"}
        if list(root.rglob("flood_train_data.*")):
            splits = {s: Sen1Floods11(root, split=n) for s, n in names.items()}  # type: ignore[arg-type]
            return _finish(UserData(root, layout, task, splits, 2, ["not water", "water"], -1,
                                    "official flood_{train,valid,test}_data.csv"))
        ds = Sen1Floods11(root)
        opened = _Opened(ds, list(ds.chips), None, seeded)
        classes = ["not water", "water"]
    elif split_dirs:
        parts = {s: root / s for s in SPLITS if (root / s).is_dir()}
        splits = {}
        for s, base in parts.items():
            if layout == "class-folders":
                splits[s], classes, _ = _class_folders(base, classes)
            else:
                splits[s] = ImageFolder(base / "images", masks=base / "masks")
        for s in SPLITS:
            if s not in splits:
                raise DataError(f"{root}: split folders {', '.join(parts)} without {s}/")
        return _finish(UserData(root, layout, task, splits, 0, classes, ignore, "split folders train/, val/, test/"))
    elif layout == "class-folders":
        ds, classes, keys = _class_folders(root, None)
        opened = _Opened(ds, keys, None, seeded)
    elif layout == "image-mask":
        ds = ImageFolder(root / "images", masks=root / "masks")
        opened = _Opened(ds, [p.name for p in ds.files], None, seeded)
    else:
        ds, keys, split_col, classes = _csv_items(root, task, target, Path(labels) if labels else None)
        opened = _Opened(ds, keys, None, seeded)
        if split_col:
            bad = sorted({v for v in split_col if v not in ("train", "val", "test")})
            if bad:
                raise DataError(f"{root}: split column value {bad[0]!r}; expected train, val or test")
            opened.splits = {s: [i for i, v in enumerate(split_col) if v == s] for s in SPLITS}
            opened.rule = "the split column of the .csv"
    lists = _split_lists(root)
    if lists is not None:
        opened.splits, opened.rule = _by_lists(opened.keys, lists, root), "split files " + ", ".join(
            f"{s}.txt" for s in lists)
    if opened.splits is None:
        opened.splits = seeded_split(len(opened.keys), split_seed, val_fraction, test_fraction)
    splits = {s: Subset(opened.dataset, opened.splits.get(s, [])) for s in SPLITS}
    if not len(splits["train"]):
        raise DataError(f"{root}: the train split is empty ({opened.rule})")
    return _finish(UserData(root, layout, task, splits, 0, classes, ignore, opened.rule))


def _finish(data: UserData) -> UserData:
    """Outputs of the task: classes, targets or the classes found in the training masks."""
    if data.task == "regression":
        t = data.splits["train"]
        first = t[0][1]
        data.num_outputs = int(first.numel())
    elif data.task == "segmentation" and data.classes is None:
        found = 0
        for i in range(len(data.splits["train"])):
            m = data.splits["train"][i][1]
            valid = m[m != data.ignore_index]
            found = max(found, int(valid.max()) + 1 if valid.numel() else 0)
        data.num_outputs = max(found, 2)
        data.classes = [str(i) for i in range(data.num_outputs)]
    else:
        data.num_outputs = len(data.classes or [])
    data.record = {"path": str(data.root), "layout": data.layout, "task": data.task, "split": data.split_rule,
                   "sizes": {s: len(d) for s, d in data.splits.items()}, "classes": data.classes}
    return data

__all__ = ["LAYOUTS", "FileTargets", "TimeMean", "UserData", "detect_layout", "open_user_data", "seeded_split"]
