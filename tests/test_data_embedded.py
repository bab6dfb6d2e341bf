"""The embedded Sentinel-2 scene: file, metadata, statistics, tiles, splits, probe images."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import warnings
from importlib import resources

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from cka_geo.data import embedded as emb
from cka_geo.data import probes
from cka_geo.data.scene import decode_band, encode_band, full_scene
from cka_geo.errors import DataError, UsageError


def test_scene_shape_dtype_and_band_order() -> None:
    bands, meta = emb.load_embedded_scene()
    assert bands.shape == (13, 640, 640)
    assert bands.dtype == np.uint16
    assert not bands.flags.writeable
    assert meta["band_names"] == list(emb.BAND_NAMES)
    assert emb.BAND_NAMES == (
        "B1", "B2", "B3", "B4", "B5", "B6", "B7", "B8", "B8A", "B9", "B10", "B11", "B12",
    )  # fmt: skip
    # L1C reflectance x 10000: real, non-constant, within the physical range
    assert bands.max() < 20000
    assert all(bands[i].std() > 0 for i in range(13))
    f32, _ = emb.load_embedded_scene(np.float32)
    assert f32.dtype == np.float32 and np.array_equal(f32, bands.astype(np.float32))
    with pytest.raises(UsageError):
        emb.load_embedded_scene(np.float64)  # type: ignore[arg-type]


def test_metadata_sidecar() -> None:
    _, meta = emb.load_embedded_scene()
    assert meta["source_sha256"] == (
        "b99ec8eac055809609ba804a0518774ebe50e3c6b6c276067c6b23d2d5929753"
    )
    assert meta["attribution"].startswith("Contains modified Copernicus Sentinel data")
    assert meta["native_resolution_m"] == [60, 10, 10, 10, 20, 20, 20, 10, 20, 60, 60, 20, 20]
    wl = meta["central_wavelength_nm"]
    assert len(wl) == 13 and wl[emb.BAND_NAMES.index("B8")] < wl[emb.BAND_NAMES.index("B8A")]
    assert {"row0", "col0", "height", "width"} <= set(meta["window"])
    assert (meta["window"]["height"], meta["window"]["width"]) == (640, 640)
    assert meta["scene"]["shape"] == [13, 1707, 1693]
    assert meta["epsg"] == 32618


def test_package_data_size_limit() -> None:
    root = resources.files("cka_geo.data")
    total = sum((root / n).read_bytes().__len__() for n in ("s2_l1c_scene.npz", "s2_l1c_scene.json"))
    assert total <= 16_000_000


#: sha256 of the 640 x 640 training crop's uint16 bytes (C order) as the 640 x 640 npz shipped
#: before the whole scene held them: training tiles, labels and statistics stay bit-identical.
CROP_SHA256 = "2b8095c3ffdfcce042983b6e75c8f42f075b57fa811d9027daeff1d9538963c4"


def test_training_crop_is_bit_identical_to_the_former_crop() -> None:
    bands, meta = emb.load_embedded_scene()
    assert hashlib.sha256(np.ascontiguousarray(bands).tobytes()).hexdigest() == CROP_SHA256
    # it is the window the sidecar names, of the whole scene on the 10 m grid
    scene, smeta = full_scene()
    r, c = smeta["crop"]["row_in_scene"], smeta["crop"]["col_in_scene"]
    assert np.array_equal(scene[:, r : r + 640, c : c + 640], bands)
    assert (meta["window"]["row0"], meta["window"]["col0"]) == (560, 420)
    assert smeta["window"]["row0"] + r == 560 and smeta["window"]["col0"] + c == 420


def test_scene_bands_stay_on_their_native_grids_and_round_trip() -> None:
    root = resources.files("cka_geo.data")
    scene, meta = full_scene()
    assert scene.shape == (13, 1707, 1693) and not scene.flags.writeable
    with (root / "s2_l1c_scene.npz").open("rb") as fh, np.load(fh) as npz:
        for i, (name, res) in enumerate(zip(meta["band_names"], meta["native_resolution_m"], strict=True)):
            stored = decode_band(npz[name])
            assert meta["grids"][name]["pixel_size"] == res
            # stored at native resolution: ~1707 / (res / 10) rows, never upsampled
            assert abs(stored.shape[0] - 1707 * 10 / res) <= 2 and abs(stored.shape[1] - 1693 * 10 / res) <= 2
            k = res // 10
            # nearest neighbour in map coordinates: each coarse pixel is a k x k block of the 10 m grid
            g = meta["grids"][name]
            dy = round((g["y0"] - meta["window"]["y0"]) / 10.0)
            dx = round((meta["window"]["x0"] - g["x0"]) / 10.0)
            rows = (np.arange(1707) + dy) // k
            cols = (np.arange(1693) + dx) // k
            assert dy >= 0 and dx >= 0
            assert np.array_equal(scene[i], stored[rows[:, None], cols[None, :]])


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 6), st.integers(1, 6), st.integers(0, 2**32 - 1))
def test_band_encoding_round_trips(h: int, w: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    values = rng.integers(0, 2**16, size=(h, w), dtype=np.uint16)
    values[0, 0] = 65535
    planes = encode_band(values)
    assert planes.dtype == np.uint8 and planes.shape == (2, h, w)
    assert np.array_equal(decode_band(planes), values)
    smooth = np.full((h, w), 3000, dtype=np.uint16)
    assert not encode_band(smooth)[:, 1:].any()  # equal rows: zero residuals


def test_band_statistics_match_float64_reference() -> None:
    bands, meta = emb.load_embedded_scene()
    mean, std = emb.band_statistics()
    for i in range(13):
        x = bands[i].astype(np.float64).ravel()
        ref_mean = x.sum() / x.size
        ref_std = np.sqrt(((x - ref_mean) ** 2).sum() / x.size)
        assert mean[i] == pytest.approx(ref_mean, rel=1e-12)
        assert std[i] == pytest.approx(ref_std, rel=1e-10)
    # the sidecar documents the same numbers
    assert np.allclose(meta["band_mean"], mean) and np.allclose(meta["band_std"], std)
    m6, s6 = emb.band_statistics(6)
    idx = [emb.BAND_NAMES.index(b) for b in ("B2", "B3", "B4", "B8A", "B11", "B12")]
    assert np.array_equal(m6, mean[idx]) and np.array_equal(s6, std[idx])
    norm = emb.normalized_scene()
    assert norm.dtype == np.float32
    assert np.allclose(norm.reshape(13, -1).mean(1), 0, atol=1e-4)
    assert np.allclose(norm.reshape(13, -1).std(1), 1, atol=1e-4)


def test_scene_labels_are_non_trivial() -> None:
    cover = emb.embedded_cover_map()
    frac = np.bincount(cover.ravel(), minlength=3) / cover.size
    assert all(f > 0.15 for f in frac), frac  # water, vegetation and other all present


def test_block_split_pattern() -> None:
    grid = [[emb.block_split(r, c) for c in range(5)] for r in range(5)]
    for line in [*grid, *zip(*grid, strict=True)]:
        assert list(line).count("val") == 1 and list(line).count("test") == 1
    assert sum(row.count("train") for row in grid) == 15


@pytest.mark.parametrize("tile", [16, 32, 48, 64])
def test_splits_are_disjoint_and_cover_split_blocks(tile: int) -> None:
    masks = {}
    for split in ("train", "val", "test"):
        ds = emb.EmbeddedS2Tiles(split, tile_size=tile, task="classification")
        m = np.zeros((640, 640), dtype=np.int64)
        for r, c in ds.positions:
            # tile inside one block of the right split
            assert r // 128 == (r + tile - 1) // 128 and c // 128 == (c + tile - 1) // 128
            assert emb.block_split(r // 128, c // 128) == split
            m[r : r + tile, c : c + tile] += 1
        assert m.max() == 1  # no overlap inside a split with the default stride
        masks[split] = m > 0
    assert not (masks["train"] & masks["val"]).any()
    assert not (masks["train"] & masks["test"]).any()
    assert not (masks["val"] & masks["test"]).any()
    per_block = (128 // tile) ** 2
    assert len(emb.EmbeddedS2Tiles("train", tile_size=tile)) == 15 * per_block


def test_tiles_deterministic_and_normalised() -> None:
    a = emb.EmbeddedS2Tiles("val", tile_size=32, task="segmentation")
    b = emb.EmbeddedS2Tiles("val", tile_size=32, task="segmentation")
    assert np.array_equal(a.positions, b.positions)
    x, y = a[5]
    x2, y2 = b[5]
    assert torch.equal(x, x2) and torch.equal(y, y2)
    assert x.dtype == torch.float32 and x.shape == (13, 32, 32)
    r, c = a.positions[5]
    bands, _ = emb.load_embedded_scene()
    mean, std = emb.band_statistics()
    ref = (bands[:, r : r + 32, c : c + 32].astype(np.float64) - mean[:, None, None]) / std[
        :, None, None
    ]
    assert np.allclose(x.numpy(), ref, atol=1e-5)
    # the water mask is NDWI > 0 of the raw tile
    g, n = bands[2, r : r + 32, c : c + 32], bands[7, r : r + 32, c : c + 32]
    g64, n64 = g.astype(np.float64), n.astype(np.float64)
    assert np.array_equal(y.numpy(), ((g64 - n64) / (g64 + n64) > 0).astype(np.int64))


def test_task_targets_agree_with_cover_fractions() -> None:
    cls = emb.EmbeddedS2Tiles("train", tile_size=32, task="classification")
    reg = emb.EmbeddedS2Tiles("train", tile_size=32, task="regression")
    seg = emb.EmbeddedS2Tiles("train", tile_size=32, task="segmentation")
    cover = emb.embedded_cover_map()
    for i in (0, 17, 101, len(cls) - 1):
        r, c = cls.positions[i]
        counts = np.bincount(cover[r : r + 32, c : c + 32].ravel(), minlength=3)
        assert int(cls[i][1]) == int(np.argmax(counts))
        assert float(reg[i][1]) == pytest.approx(counts[1] / 1024)
        assert int(seg[i][1].sum()) == counts[0]
    assert cls.num_classes == 3 and cls.class_names == ("water", "vegetation", "other")
    assert reg.targets.dtype == torch.float32 and reg.num_classes == 0
    # every class present in every split: the classification task is not trivial
    for split in ("train", "val", "test"):
        t = emb.EmbeddedS2Tiles(split, tile_size=32, task="classification").targets
        assert (torch.bincount(t, minlength=3) >= 10).all()


def test_augmentation_moves_image_and_mask_together() -> None:
    ds = emb.EmbeddedS2Tiles("train", tile_size=32, task="segmentation", augment=True)
    plain = emb.EmbeddedS2Tiles("train", tile_size=32, task="segmentation")
    x0, y0 = plain[3]
    torch.manual_seed(0)
    seen = set()
    for _ in range(40):
        x, y = ds[3]
        # the same dihedral transform maps image and mask
        found = False
        for k in range(4):
            for flip in (False, True):
                xt = torch.rot90(torch.flip(x0, (-1,)) if flip else x0, k, (-2, -1))
                yt = torch.rot90(torch.flip(y0, (-1,)) if flip else y0, k, (-2, -1))
                if torch.equal(xt, x) and torch.equal(yt, y):
                    found = True
                    seen.add((k, flip))
        assert found
    assert len(seen) > 4
    torch.manual_seed(1)
    a = [ds[3][0] for _ in range(3)]
    torch.manual_seed(1)
    b = [ds[3][0] for _ in range(3)]
    assert all(torch.equal(u, v) for u, v in zip(a, b, strict=True))


def test_tiles_band_selection_and_bad_arguments() -> None:
    ds = emb.EmbeddedS2Tiles("test", tile_size=16, bands=4)
    assert ds.band_names == ("B2", "B3", "B4", "B8") and ds[0][0].shape == (4, 16, 16)
    ds = emb.EmbeddedS2Tiles("test", tile_size=16, bands=["b8", "B4"])
    assert ds.band_names == ("B8", "B4")
    with pytest.raises(UsageError):
        emb.EmbeddedS2Tiles("holdout")  # type: ignore[arg-type]
    with pytest.raises(UsageError):
        emb.EmbeddedS2Tiles("train", task="detection")  # type: ignore[arg-type]
    with pytest.raises(UsageError):
        emb.EmbeddedS2Tiles("train", tile_size=200)
    with pytest.raises(DataError):
        emb.EmbeddedS2Tiles("train", bands=["B13"])


@pytest.mark.parametrize(
    ("bands", "size"), [(13, 16), (12, 32), (10, 64), (6, 224), (4, 8), (3, 48), (1, 20)]
)
def test_probe_images_shapes(bands: int, size: int) -> None:
    x = emb.probe_images(3, bands=bands, size=size)
    assert x.shape == (3, bands, size, size) and x.dtype == torch.float32
    assert torch.isfinite(x).all()


def _scene_z(idx: list[int]) -> np.ndarray:
    """Independent float64 reference of the normalised whole scene (training-crop stats)."""
    scene, _ = full_scene()
    crop, _ = emb.load_embedded_scene()
    ref = crop.reshape(13, -1).astype(np.float64)
    mean, std = ref.mean(axis=1), ref.std(axis=1)
    return (scene[idx].astype(np.float64) - mean[idx, None, None]) / std[idx, None, None]


def test_probe_images_content_and_band_rule() -> None:
    assert emb.select_bands(12) == tuple(b for b in emb.BAND_NAMES if b != "B10")
    assert emb.select_bands(10) == ("B2", "B3", "B4", "B5", "B6", "B7", "B8", "B8A", "B11", "B12")
    assert emb.select_bands(6) == ("B2", "B3", "B4", "B8A", "B11", "B12")
    assert emb.select_bands(3) == ("B4", "B3", "B2")
    x13 = emb.probe_images(4, bands=13, size=(32, 48), seed=7)
    x3 = emb.probe_images(4, bands=3, size=(32, 48), seed=7)
    assert x13.shape == (4, 13, 32, 48)
    # same crops, bands picked from the 13
    assert torch.equal(x3, x13[:, [3, 2, 1]])
    # documented positions: the centred grid of non-overlapping crops, permuted by default_rng(seed)
    h, w = probes.scene_shape()
    ny, nx = h // 32, w // 48
    oy, ox = (h - 32 * ny) // 2, (w - 48 * nx) // 2
    order = np.random.default_rng(7).permutation(ny * nx)[:4]
    z = _scene_z(list(range(13)))
    for i, k in enumerate(order):
        r, c = oy + 32 * (k // nx), ox + 48 * (k % nx)
        np.testing.assert_allclose(x13[i].numpy(), z[:, r : r + 32, c : c + 48], rtol=1e-6, atol=1e-6)


def test_probe_pixels_equal_the_scene_normalisation_of_the_crop() -> None:
    # every default probe lying inside the training crop equals normalized_scene there, bit for bit
    _, meta = full_scene()
    r0, c0 = meta["crop"]["row_in_scene"], meta["crop"]["col_in_scene"]
    norm = emb.normalized_scene()
    pos, _, _, k = probes._probe_plan(probes.distinct_crops(64), 13, 64, 0, None)
    x = emb.probe_images(k, bands=13, size=64)
    inside = [i for i, (r, c) in enumerate(pos) if r0 <= r <= r0 + 576 and c0 <= c <= c0 + 576]
    assert len(inside) >= 49
    for i in inside:
        r, c = pos[i][0] - r0, pos[i][1] - c0
        assert torch.equal(x[i], torch.from_numpy(norm[:, r : r + 64, c : c + 64].copy()))


def _brute_force_packing(h: int, w: int, ch: int, cw: int) -> int:
    """Most non-overlapping ch x cw crops in an h x w grid, by exhaustive search."""
    free = np.ones((h, w), dtype=bool)
    best = 0

    def go(cell: int, placed: int) -> None:
        nonlocal best
        best = max(best, placed)
        if placed + int(free.ravel()[cell:].sum()) // (ch * cw) <= best:
            return
        while cell < h * w and not free.ravel()[cell]:
            cell += 1
        if cell == h * w:
            return
        r, c = divmod(cell, w)
        if r + ch <= h and c + cw <= w and free[r : r + ch, c : c + cw].all():
            free[r : r + ch, c : c + cw] = False
            go(cell + 1, placed + 1)
            free[r : r + ch, c : c + cw] = True
        free[r, c] = False  # leave this cell uncovered
        go(cell + 1, placed)
        free[r, c] = True

    go(0, 0)
    return best


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 7), st.integers(1, 7), st.integers(1, 4), st.integers(1, 4))
def test_distinct_count_is_the_most_non_overlapping_crops(h: int, w: int, ch: int, cw: int) -> None:
    assume(ch <= h and cw <= w)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(probes, "scene_shape", lambda: (h, w))
        assert probes.distinct_crops((ch, cw)) == _brute_force_packing(h, w, ch, cw)


def test_distinct_counts_of_the_shipped_scene() -> None:
    assert probes.scene_shape() == (1707, 1693)
    table = {64: 676, 96: 289, 112: 225, 120: 196, 128: 169, 196: 64, 224: 49, 256: 36, 384: 16, 518: 9}
    assert {s: probes.distinct_crops(s) for s in table} == table
    assert probes.distinct_crops((224, 448)) == 7 * 3
    assert probes.distinct_crops(4000) == 1  # larger than the scene: one (resized) crop


@settings(max_examples=12, deadline=None)
@given(st.integers(150, 600), st.integers(150, 600), st.integers(0, 2**16))
def test_default_probes_are_distinct_non_overlapping_crops(h: int, w: int, seed: int) -> None:
    k = probes.distinct_crops((h, w))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning up to the distinct count
        pos, _, crop, count = probes._probe_plan(k, 1, (h, w), seed, None)
    assert crop == (h, w) and count == k and len(pos) == k
    sh, sw = probes.scene_shape()
    assert (pos >= 0).all() and (pos[:, 0] + h <= sh).all() and (pos[:, 1] + w <= sw).all()
    dr = np.abs(pos[:, None, 0] - pos[None, :, 0])
    dc = np.abs(pos[:, None, 1] - pos[None, :, 1])
    apart = (dr >= h) | (dc >= w)
    assert apart[~np.eye(k, dtype=bool)].all()


def test_more_probes_than_distinct_crops_overlap_with_one_warning() -> None:
    k = probes.distinct_crops(518)
    with pytest.warns(RuntimeWarning) as rec:
        x = emb.probe_images(k + 3, bands=1, size=518, seed=1)
    msgs = [str(r.message) for r in rec if issubclass(r.category, RuntimeWarning)]
    assert len(msgs) == 1 and "\n" not in msgs[0]
    assert f"holds {k} distinct non-overlapping 518x518 crops" in msgs[0] and "other 3" in msgs[0]
    first = emb.probe_images(k, bands=1, size=518, seed=1)
    assert torch.equal(x[:k], first)  # the distinct crops come first, unchanged
    flat = x.reshape(len(x), -1)
    assert len({tuple(row[:64].tolist()) for row in flat}) == len(x)  # all distinct images


def test_probe_images_deterministic_by_seed_and_batched() -> None:
    a = emb.probe_images(20, bands=4, size=24, seed=3)
    b = emb.probe_images(20, bands=4, size=24, seed=3)
    c = emb.probe_images(20, bands=4, size=24, seed=4)
    assert torch.equal(a, b) and not torch.equal(a, c)
    batches = list(emb.iter_probe_batches(20, bands=4, size=24, seed=3, batch_size=7))
    assert [len(t) for t in batches] == [7, 7, 6]
    assert torch.equal(torch.cat(batches), a)


def test_probe_images_resize_when_crop_smaller() -> None:
    x = emb.probe_images(2, bands=3, size=64, crop=16, seed=0)
    assert x.shape == (2, 3, 64, 64)
    small = emb.probe_images(2, bands=3, size=16, crop=16, seed=0)
    ref = torch.nn.functional.interpolate(small, size=(64, 64), mode="bilinear")
    assert torch.allclose(x, ref)
    assert probes.crop_side(4000) == (1693, 1693)  # larger than the scene: the largest square
    assert probes.crop_side((4000, 2000)) == (1707, 853)  # same aspect


@pytest.mark.parametrize("count", [2, 5, 7, 8, 9, 11, 14])
def test_probe_images_unsupported_band_count(count: int) -> None:
    with pytest.raises(DataError) as info:
        emb.probe_images(2, bands=count, size=16)
    msg = str(info.value)
    assert "\n" not in msg and "--data" in msg and f"{count}-band" in msg


def test_probe_images_bad_arguments() -> None:
    with pytest.raises(UsageError):
        emb.probe_images(0, bands=3, size=16)
    with pytest.raises(UsageError):
        emb.probe_images(2, bands=3, size=0)
    with pytest.raises(UsageError):
        emb.probe_images(2, bands=3, size=16, crop=2000)
    with pytest.raises(UsageError):
        emb.probe_images(2, bands=3, size=(16, 16, 16))


def test_import_stays_light() -> None:
    code = (
        "import sys, cka_geo.data, cka_geo.data.folders;"
        "bad=[m for m in ('PIL','tifffile','matplotlib') if m in sys.modules];"
        "print(bad)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_sidecar_json_is_valid_and_matches_npz() -> None:
    root = resources.files("cka_geo.data")
    meta = json.loads((root / "s2_l1c_scene.json").read_text())
    bands, _ = full_scene()
    assert meta["shape"] == list(bands.shape)
    assert meta["dtype"] == "uint16"
