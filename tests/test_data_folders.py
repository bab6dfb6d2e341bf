"""Loaders for users' data, on tiny files written by the tests."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch

from cka_geo.data import folders as fo
from cka_geo.errors import DataError, UsageError


def _one_line(exc: pytest.ExceptionInfo[BaseException]) -> str:
    msg = str(exc.value)
    assert "\n" not in msg
    return msg


def _rand(shape: tuple[int, ...], seed: int = 0, dtype: type = np.uint16) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 5000, size=shape).astype(dtype)


# ------------------------------------------------------------------------ read_image


def test_read_image_layouts(tmp_path: Path) -> None:
    chw = _rand((5, 8, 9))
    tifffile.imwrite(tmp_path / "chw.tif", chw, photometric="minisblack")
    tifffile.imwrite(tmp_path / "hwc.tif", np.moveaxis(chw, 0, 2), photometric="minisblack")
    np.save(tmp_path / "chw.npy", chw)
    np.save(tmp_path / "hwc.npy", np.moveaxis(chw, 0, 2))
    np.save(tmp_path / "one.npy", chw[0])
    for name in ("chw.tif", "hwc.tif", "chw.npy", "hwc.npy"):
        assert np.array_equal(fo.read_image(tmp_path / name), chw), name
        assert np.array_equal(fo.read_image(tmp_path / name, bands=5), chw), name
    assert fo.read_image(tmp_path / "one.npy").shape == (1, 8, 9)
    # 12 x 12 x 12 is ambiguous: layout settles it
    cube = _rand((12, 12, 12))
    np.save(tmp_path / "cube.npy", cube)
    assert np.array_equal(
        fo.read_image(tmp_path / "cube.npy", layout="hwc"), np.moveaxis(cube, 2, 0)
    )
    assert np.array_equal(fo.read_image(tmp_path / "cube.npy", layout="chw"), cube)


def test_read_image_errors(tmp_path: Path) -> None:
    np.save(tmp_path / "a.npy", _rand((4, 8, 8)))
    with pytest.raises(DataError) as e:
        fo.read_image(tmp_path / "a.npy", bands=13)
    msg = _one_line(e)
    assert "a.npy" in msg and "4 bands" in msg and "expected 13" in msg
    (tmp_path / "b.png").write_bytes(b"x")
    with pytest.raises(DataError) as e:
        fo.read_image(tmp_path / "b.png")
    assert "b.png" in _one_line(e) and "unknown suffix" in str(e.value)
    (tmp_path / "broken.tif").write_bytes(b"not a tiff at all")
    with pytest.raises(DataError) as e:
        fo.read_image(tmp_path / "broken.tif")
    assert "broken.tif" in _one_line(e) and "cannot read" in str(e.value)
    np.save(tmp_path / "r4.npy", np.zeros((1, 2, 3, 4)))
    with pytest.raises(DataError) as e:
        fo.read_image(tmp_path / "r4.npy")
    assert "r4.npy" in _one_line(e)
    with pytest.raises(DataError):
        fo.read_image(tmp_path / "missing.npy")


# ------------------------------------------------------------------------ ImageFolder


def _tile_folder(root: Path, n: int = 3, c: int = 4, hw: int = 8, ext: str = ".tif") -> list[Path]:
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        arr = _rand((c, hw, hw), seed=i)
        p = root / f"tile_{i}{ext}"
        if ext == ".npy":
            np.save(p, arr)
        else:
            tifffile.imwrite(p, np.moveaxis(arr, 0, 2), photometric="minisblack")  # (H, W, C)
        paths.append(p)
    return paths


def test_image_folder_with_csv_labels(tmp_path: Path) -> None:
    _tile_folder(tmp_path / "img")
    (tmp_path / "labels.csv").write_text(
        "filename,label\ntile_2.tif,0\ntile_0.tif,2\ntile_1.tif,1\n"
    )
    ds = fo.ImageFolder(tmp_path / "img", bands=4, labels=tmp_path / "labels.csv")
    assert len(ds) == 3 and ds.bands == 4
    x, y = ds[0]
    assert x.shape == (4, 8, 8) and x.dtype == torch.float32
    assert np.array_equal(x.numpy(), _rand((4, 8, 8), seed=0).astype(np.float32))
    assert [int(ds[i][1]) for i in range(3)] == [2, 1, 0]
    assert y.dtype == torch.long
    # headerless, float labels
    (tmp_path / "reg.csv").write_text("tile_0.tif,0.5\ntile_1.tif,1.5\ntile_2.tif,2.5\n")
    ds = fo.ImageFolder(tmp_path / "img", labels=tmp_path / "reg.csv")
    assert ds.labels is not None and ds.labels.dtype == torch.float32
    assert ds.labels.tolist() == [0.5, 1.5, 2.5]


def test_image_folder_npy_labels_and_normalisation(tmp_path: Path) -> None:
    _tile_folder(tmp_path / "img", ext=".npy")
    np.save(tmp_path / "y.npy", np.array([3, 4, 5]))
    mean, std = [1.0, 2.0, 3.0, 4.0], [2.0, 2.0, 4.0, 8.0]
    ds = fo.ImageFolder(tmp_path / "img", labels=tmp_path / "y.npy", mean=mean, std=std)
    x, y = ds[1]
    raw = _rand((4, 8, 8), seed=1).astype(np.float64)
    ref = (raw - np.array(mean)[:, None, None]) / np.array(std)[:, None, None]
    assert np.allclose(x.numpy(), ref, rtol=1e-6) and int(y) == 4
    np.save(tmp_path / "bad.npy", np.array([1, 2]))
    with pytest.raises(DataError) as e:
        fo.ImageFolder(tmp_path / "img", labels=tmp_path / "bad.npy")
    assert "bad.npy" in _one_line(e)
    with pytest.raises(UsageError):
        fo.ImageFolder(tmp_path / "img", mean=[0.0, 1.0])


def test_image_folder_with_masks(tmp_path: Path) -> None:
    _tile_folder(tmp_path / "img")
    (tmp_path / "mask").mkdir()
    for i in range(3):
        np.save(tmp_path / "mask" / f"tile_{i}.npy", np.full((8, 8), i, dtype=np.uint8))
    ds = fo.ImageFolder(tmp_path / "img", masks=tmp_path / "mask")
    _x, m = ds[2]
    assert m.shape == (8, 8) and m.dtype == torch.long and int(m.max()) == 2
    # no target: the image alone
    assert isinstance(fo.ImageFolder(tmp_path / "img")[0], torch.Tensor)
    batches = list(fo.iter_batches(ds, 2))
    assert [b.shape for b in batches] == [(2, 4, 8, 8), (1, 4, 8, 8)]


def test_image_folder_mask_size_mismatch(tmp_path: Path) -> None:
    _tile_folder(tmp_path / "img", n=2)
    (tmp_path / "mask").mkdir()
    np.save(tmp_path / "mask" / "tile_0.npy", np.zeros((8, 8), dtype=np.uint8))
    tifffile.imwrite(tmp_path / "mask" / "tile_1.tif", np.zeros((6, 8), dtype=np.uint8))
    with pytest.raises(DataError) as e:
        fo.ImageFolder(tmp_path / "img", masks=tmp_path / "mask")
    msg = _one_line(e)
    assert "tile_1.tif" in msg and str(tmp_path / "img") in msg and str(tmp_path / "mask") in msg
    assert "6x8" in msg and "8x8" in msg


def test_image_folder_missing_mask_or_label(tmp_path: Path) -> None:
    _tile_folder(tmp_path / "img", n=2)
    (tmp_path / "mask").mkdir()
    np.save(tmp_path / "mask" / "tile_0.npy", np.zeros((8, 8), dtype=np.uint8))
    with pytest.raises(DataError) as e:
        fo.ImageFolder(tmp_path / "img", masks=tmp_path / "mask")
    assert "tile_1" in _one_line(e)
    (tmp_path / "l.csv").write_text("file,label\ntile_0.tif,1\n")
    with pytest.raises(DataError) as e:
        fo.ImageFolder(tmp_path / "img", labels=tmp_path / "l.csv")
    assert "tile_1.tif" in _one_line(e)


def test_image_folder_wrong_band_count(tmp_path: Path) -> None:
    _tile_folder(tmp_path / "img", n=2, c=4)
    np.save(tmp_path / "img" / "tile_9.npy", _rand((3, 8, 8)))
    with pytest.raises(DataError) as e:
        fo.ImageFolder(tmp_path / "img", bands=4)
    msg = _one_line(e)
    assert "tile_9.npy" in msg and "3 bands" in msg and "expected 4" in msg
    # without an explicit count the first file sets it
    with pytest.raises(DataError) as e:
        fo.ImageFolder(tmp_path / "img")
    assert "tile_9.npy" in _one_line(e)


def test_image_folder_empty_and_unknown_suffix(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("side file")
    with pytest.raises(DataError) as e:
        fo.ImageFolder(tmp_path / "empty")
    assert "empty folder" in _one_line(e) and str(tmp_path / "empty") in str(e.value)
    _tile_folder(tmp_path / "img", n=1)
    (tmp_path / "img" / "thumb.png").write_bytes(b"x")
    with pytest.raises(DataError) as e:
        fo.ImageFolder(tmp_path / "img")
    assert "thumb.png" in _one_line(e) and "unknown suffix" in str(e.value)
    with pytest.raises(DataError):
        fo.ImageFolder(tmp_path / "nope")


def test_image_folder_unreadable_file(tmp_path: Path) -> None:
    _tile_folder(tmp_path / "img", n=1)
    (tmp_path / "img" / "zz.tif").write_bytes(b"garbage")
    with pytest.raises(DataError) as e:
        fo.ImageFolder(tmp_path / "img")
    assert "zz.tif" in _one_line(e) and "cannot read" in str(e.value)


# ------------------------------------------------------------------------ array probes


def test_load_array_probes(tmp_path: Path) -> None:
    arr = np.random.default_rng(0).normal(size=(5, 3, 4, 4)).astype(np.float32)
    np.save(tmp_path / "p.npy", arr)
    torch.save(torch.from_numpy(arr), tmp_path / "p.pt")
    torch.save({"images": torch.from_numpy(arr), "labels": torch.arange(5)}, tmp_path / "d.pt")
    for name in ("p.npy", "p.pt", "d.pt"):
        x = fo.load_array_probes(tmp_path / name, bands=3, size=4)
        assert x.dtype == torch.float32 and torch.equal(x, torch.from_numpy(arr)), name
    with pytest.raises(DataError) as e:
        fo.load_array_probes(tmp_path / "p.npy", bands=13)
    assert "p.npy" in _one_line(e) and "3 bands" in str(e.value) and "expected 13" in str(e.value)
    with pytest.raises(DataError) as e:
        fo.load_array_probes(tmp_path / "p.npy", size=224)
    assert "4x4" in _one_line(e)
    np.save(tmp_path / "r3.npy", arr[0])
    with pytest.raises(DataError) as e:
        fo.load_array_probes(tmp_path / "r3.npy")
    assert "r3.npy" in _one_line(e) and "(N, C, H, W)" in str(e.value)
    np.save(tmp_path / "e.npy", arr[:0])
    with pytest.raises(DataError) as e:
        fo.load_array_probes(tmp_path / "e.npy")
    assert "empty" in _one_line(e)
    (tmp_path / "p.h5").write_bytes(b"x")
    with pytest.raises(DataError) as e:
        fo.load_array_probes(tmp_path / "p.h5")
    assert "unknown suffix" in _one_line(e)
    (tmp_path / "bad.pt").write_bytes(b"not a torch file")
    with pytest.raises(DataError) as e:
        fo.load_array_probes(tmp_path / "bad.pt")
    assert "bad.pt" in _one_line(e) and "cannot read" in str(e.value)


# ------------------------------------------------------------------------ Sen1Floods11


def _sen1floods11(root: Path, chips: list[str], hw: int = 16) -> Path:
    base = root / "v1.1" / "data" / "flood_events" / "HandLabeled"
    (base / "S2Hand").mkdir(parents=True)
    (base / "LabelHand").mkdir()
    for i, chip in enumerate(chips):
        img = _rand((13, hw, hw), seed=i, dtype=np.int16)
        tifffile.imwrite(base / "S2Hand" / f"{chip}_S2Hand.tif", img, photometric="minisblack")
        mask = np.random.default_rng(i).integers(-1, 2, size=(hw, hw)).astype(np.int16)
        tifffile.imwrite(base / "LabelHand" / f"{chip}_LabelHand.tif", mask)
    splits = root / "v1.1" / "splits" / "flood_handlabeled"
    splits.mkdir(parents=True)
    (splits / "flood_train_data.csv").write_text(
        "".join(f"{c}_S1Hand.tif,{c}_LabelHand.tif\n" for c in chips[:2])
    )
    (splits / "flood_test_data.csv").write_text(f"{chips[2]}_S1Hand.tif,{chips[2]}_LabelHand.tif\n")
    return base


def test_sen1floods11_layout(tmp_path: Path) -> None:
    chips = ["Bolivia_103757", "Ghana_103272", "India_1"]
    base = _sen1floods11(tmp_path, chips)
    ds = fo.Sen1Floods11(tmp_path)
    assert len(ds) == 3 and ds.ignore_index == -1
    x, m = ds[1]
    assert x.shape == (13, 16, 16) and x.dtype == torch.float32
    assert np.array_equal(x.numpy(), _rand((13, 16, 16), seed=1, dtype=np.int16))
    assert m.dtype == torch.long and set(m.unique().tolist()) <= {-1, 0, 1} and (m == -1).any()
    assert fo.Sen1Floods11(tmp_path, split="train").chips == chips[:2]
    assert fo.Sen1Floods11(tmp_path, split="test").chips == chips[2:]
    with pytest.raises(DataError) as e:
        fo.Sen1Floods11(tmp_path, split="val")
    assert "flood_valid_data.csv" in _one_line(e)
    six = fo.Sen1Floods11(tmp_path, bands=[1, 2, 3, 8, 11, 12])
    assert six[0][0].shape == (6, 16, 16)
    # the S2 folder given directly also works
    assert len(fo.Sen1Floods11(base)) == 3


def test_sen1floods11_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError) as e:
        fo.Sen1Floods11(tmp_path)
    assert "S2Hand" in _one_line(e)
    base = _sen1floods11(tmp_path, ["A_1", "B_2", "C_3"])
    # wrong band count in one chip
    tifffile.imwrite(
        base / "S2Hand" / "A_1_S2Hand.tif", _rand((12, 16, 16)), photometric="minisblack"
    )
    ds = fo.Sen1Floods11(tmp_path)
    with pytest.raises(DataError) as e:
        ds[0]
    assert "A_1_S2Hand.tif" in _one_line(e) and "12 bands" in str(e.value)
    # mask of another size
    tifffile.imwrite(base / "LabelHand" / "B_2_LabelHand.tif", np.zeros((8, 16), dtype=np.int16))
    with pytest.raises(DataError) as e:
        ds[1]
    msg = _one_line(e)
    assert "B_2_LabelHand.tif" in msg and "B_2_S2Hand.tif" in msg
    # missing label
    (base / "LabelHand" / "C_3_LabelHand.tif").unlink()
    with pytest.raises(DataError) as e:
        fo.Sen1Floods11(tmp_path)
    assert "C_3" in _one_line(e)
    # empty image folder
    for p in (base / "S2Hand").iterdir():
        p.unlink()
    with pytest.raises(DataError) as e:
        fo.Sen1Floods11(tmp_path)
    assert "empty folder" in _one_line(e)


# ------------------------------------------------------------------------ PASTIS-like


def _pastis(root: Path, lengths: dict[int, tuple[int, int]], c: int = 10, hw: int = 8) -> None:
    (root / "DATA_S2").mkdir(parents=True)
    (root / "ANNOTATIONS").mkdir()
    feats = []
    for pid, (t, fold) in lengths.items():
        series = np.arange(t, dtype=np.int16)[:, None, None, None] * np.ones(
            (1, c, hw, hw), np.int16
        )
        np.save(root / "DATA_S2" / f"S2_{pid}.npy", series)
        target = np.stack([np.full((hw, hw), pid % 20), np.zeros((hw, hw)), np.zeros((hw, hw))])
        np.save(root / "ANNOTATIONS" / f"TARGET_{pid}.npy", target.astype(np.uint8))
        dates = {str(i): 20180901 + i for i in range(t)}
        props = {"ID_PATCH": pid, "Fold": fold, "dates-S2": json.dumps(dates) if pid % 2 else dates}
        feats.append({"type": "Feature", "properties": props, "geometry": None})
    (root / "metadata.geojson").write_text(
        json.dumps({"type": "FeatureCollection", "features": feats})
    )


def test_evenly_spaced_frames() -> None:
    assert fo.evenly_spaced_frames(43, 6) == [0, 8, 17, 25, 34, 42]
    assert fo.evenly_spaced_frames(6, 6) == list(range(6))
    assert fo.evenly_spaced_frames(1, 3) == [0, 0, 0]
    idx = fo.evenly_spaced_frames(61, 6)
    assert idx[0] == 0 and idx[-1] == 60 and max(np.diff(idx)) - min(np.diff(idx)) <= 1
    with pytest.raises(UsageError):
        fo.evenly_spaced_frames(0, 6)


def test_pastis_like(tmp_path: Path) -> None:
    _pastis(tmp_path, {10001: (43, 1), 10002: (38, 4), 20003: (61, 5)})
    ds = fo.PastisLike(tmp_path)
    assert len(ds) == 3 and ds.patch_ids == [10001, 10002, 20003] and ds.ignore_index == 19
    x, y = ds[0]
    assert x.shape == (6, 10, 8, 8) and x.dtype == torch.float32
    # frame t holds the value t: the served frames are the evenly spaced ones
    assert x[:, 0, 0, 0].tolist() == fo.evenly_spaced_frames(43, 6)
    assert y.shape == (8, 8) and y.dtype == torch.long and int(y[0, 0]) == 10001 % 20
    assert ds.dates(1) == [20180901 + i for i in fo.evenly_spaced_frames(38, 6)]
    assert fo.PastisLike(tmp_path, folds=[4, 5]).patch_ids == [10002, 20003]
    assert fo.PastisLike(tmp_path, frames=None)[2][0].shape[0] == 61
    assert fo.PastisLike(tmp_path, frames=[0, -1])[0][0][:, 0, 0, 0].tolist() == [0, 42]


def test_pastis_like_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError) as e:
        fo.PastisLike(tmp_path)
    assert "metadata.geojson" in _one_line(e)
    _pastis(tmp_path, {1: (5, 1), 2: (5, 2)}, c=4)
    with pytest.raises(DataError) as e:
        fo.PastisLike(tmp_path)[0]
    assert (
        "S2_1.npy" in _one_line(e) and "4 bands" in str(e.value) and "expected 10" in str(e.value)
    )
    ds = fo.PastisLike(tmp_path, bands=4)
    np.save(tmp_path / "ANNOTATIONS" / "TARGET_2.npy", np.zeros((3, 4, 4), np.uint8))
    with pytest.raises(DataError) as e:
        ds[1]
    msg = _one_line(e)
    assert "TARGET_2.npy" in msg and "S2_2.npy" in msg
    with pytest.raises(DataError) as e:
        fo.PastisLike(tmp_path, folds=[5])
    assert "no patch" in _one_line(e)
    (tmp_path / "DATA_S2" / "S2_1.npy").unlink()
    with pytest.raises(DataError) as e:
        fo.PastisLike(tmp_path)
    assert "S2_1.npy" in _one_line(e)
