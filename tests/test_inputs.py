"""compare's inputs: image size and the position-embedding resample, bands, normalisation,
device defaults and the plain progress lines (issue 12, points 1, 2 and 4)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from cka_geo.checkpoints import save_checkpoint
from cka_geo.cli import main
from cka_geo.compare import CompareOptions, compare_checkpoints
from cka_geo.compare.inputs import canonical_band, default_image_size, device_defaults
from cka_geo.data import embedded as emb
from cka_geo.data import probes as probes_mod
from cka_geo.data.normalize import IMAGENET_MEAN, IMAGENET_STD, looks_raw, resolve
from cka_geo.data.scene import full_scene
from cka_geo.errors import DataError
from cka_geo.models.vit_layers import resample_pos_embed
from cka_geo.vit import VisionTransformer, ViTConfig

CFG = ViTConfig(img_size=32, patch_size=8, in_chans=3, embed_dim=32, depth=2, num_heads=2)
FAST = {"samples": 40, "batch_size": 8, "bootstrap": 50}


def make_pair(tmp_path: Path, cfg: ViTConfig = CFG) -> tuple[Path, Path]:
    torch.manual_seed(0)
    model = VisionTransformer(cfg)
    pre, ft = tmp_path / "pre.pt", tmp_path / "ft.pt"
    save_checkpoint(pre, model, cfg)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    sd["blocks.1.mlp.fc1.weight"] += 0.5 * torch.randn_like(sd["blocks.1.mlp.fc1.weight"])
    save_checkpoint(ft, sd, cfg)
    return pre, ft


# ------------------------------------------------------------------ resolution


@pytest.mark.parametrize("size", [16, 48])
def test_a_32px_model_compared_at_16_and_48_px(tmp_path, size):
    pre, ft = make_pair(tmp_path)
    with pytest.warns(RuntimeWarning, match=rf"image size {size}x{size} differs .* 4x4 to a {size // 8}x{size // 8}"):
        res = compare_checkpoints(pre, ft, image_size=size, **FAST)
    s = res["settings"]
    assert s["image_size"] == [size, size] and s["native_image_size"] == [32, 32]
    assert "antialias" in s["pos_embed_resample"] and "without" not in s["pos_embed_resample"]
    assert all(math.isfinite(v) for v in res["diagonal"].values())


def test_native_size_records_no_resample(tmp_path):
    pre, ft = make_pair(tmp_path)
    res = compare_checkpoints(pre, ft, **FAST)
    assert res["settings"]["image_size"] == [32, 32] and res["settings"]["pos_embed_resample"] is None


def test_rectangular_size(tmp_path):
    pre, ft = make_pair(tmp_path)
    with pytest.warns(RuntimeWarning, match="16x48"):
        res = compare_checkpoints(pre, ft, image_size=(16, 48), **FAST)
    assert res["settings"]["image_size"] == [16, 48]


def _cubic(t: np.ndarray, a: float = -0.75) -> np.ndarray:
    t = np.abs(t)
    return np.where(t <= 1, ((a + 2) * t - (a + 3)) * t * t + 1,
                    np.where(t < 2, ((t - 5) * t + 8) * t * a - 4 * a, 0.0))


def _resize_1d(x: np.ndarray, out: int, axis: int) -> np.ndarray:
    """Keys bicubic (a = -0.75), half-pixel centres, border replicated, no antialias: the
    formula of Hugging Face's DINOv2 interpolate_pos_encoding (interpolate(size=...))."""
    n = x.shape[axis]
    src = (np.arange(out) + 0.5) * n / out - 0.5
    base = np.floor(src).astype(int)
    res = 0.0
    for k in range(-1, 3):
        idx = np.clip(base + k, 0, n - 1)
        w = _cubic(src - (base + k))
        shape = [1] * x.ndim
        shape[axis] = out
        res = res + np.take(x, idx, axis=axis) * w.reshape(shape)
    return res


def test_dinov2_resample_equals_an_independent_reference():
    # The config the Hugging Face ViT/DINOv2 conversion gives (pos_embed_antialias=False).
    cfg = ViTConfig(img_size=28, patch_size=7, in_chans=3, embed_dim=16, depth=1, num_heads=2,
                    pos_embed_antialias=False, dynamic_img_size=True)
    model = VisionTransformer(cfg).eval()
    with torch.no_grad():
        model.pos_embed.normal_()
    pos = model.pos_embed.detach().double()
    grid = pos[0, 1:].reshape(4, 4, 16).numpy()
    for new in [(2, 2), (6, 6), (3, 5)]:
        want = _resize_1d(_resize_1d(grid, new[0], 0), new[1], 1).reshape(-1, 16)
        got = resample_pos_embed(pos, new, 1, (4, 4), antialias=False)[0, 1:].numpy()
        np.testing.assert_allclose(got, want, atol=1e-12)
    x = torch.randn(1, 3, 42, 42)  # the model itself uses it: patch tokens + resampled positions
    with torch.no_grad():
        tokens = model.embed(x)
        patches = model.patch_embed(x)
    want = _resize_1d(_resize_1d(grid, 6, 0), 6, 1).reshape(-1, 16)
    torch.testing.assert_close((tokens[0, 1:] - patches[0]).double(), torch.from_numpy(want), atol=1e-5, rtol=0)


def test_data_of_a_non_multiple_size_is_refused_in_one_line(tmp_path, capsys):
    pre, ft = make_pair(tmp_path)
    data = tmp_path / "d.npy"
    np.save(data, np.random.default_rng(0).random((40, 3, 20, 20)).astype(np.float32))
    code = main(["compare", str(pre), str(ft), "--data", str(data), "--no-figures", "--out", str(tmp_path / "o")])
    err = [ln for ln in capsys.readouterr().err.strip().splitlines() if ln.startswith("cka-geo: error")]
    assert code == 1 and len(err) == 1
    assert "(--data): 20x20 is not a multiple of the model's patch size 8" in err[0]
    assert not (tmp_path / "o").exists()


def test_data_at_another_multiple_is_accepted(tmp_path):
    pre, ft = make_pair(tmp_path)
    data = tmp_path / "d.npy"
    np.save(data, np.random.default_rng(0).random((40, 3, 24, 24)).astype(np.float32))
    with pytest.warns(RuntimeWarning, match="24x24 differs"):
        res = compare_checkpoints(pre, ft, data=str(data), bootstrap=50)
    assert res["settings"]["image_size"] == [24, 24] and res["settings"]["normalize"]["name"] == "none"


# ------------------------------------------------------------------ bands and normalisation


def test_band_names_are_canonical():
    assert [canonical_band(b) for b in ("B04", "b4", "B8a", "B08A", "B12")] == ["B4", "B4", "B8A", "B8A", "B12"]


def test_auto_gives_imagenet_on_reflectance_for_rgb_and_the_scene_for_13_bands(tmp_path):
    pre, ft = make_pair(tmp_path)
    res = compare_checkpoints(pre, ft, **FAST)
    norm = res["settings"]["normalize"]
    assert norm["name"] == "imagenet" and norm["scale"] == 10000.0 and norm["mean"] == list(IMAGENET_MEAN)
    assert res["settings"]["bands"] == ["B4", "B3", "B2"]
    n13 = resolve("auto", 13, emb.BAND_NAMES, embedded=True, raw=True)
    assert n13.name == "scene"


def test_imagenet_probes_are_the_formula_on_the_raw_crops():
    from cka_geo.compare.probes import Probes, cut_batches

    probes = Probes(None, None, None, True, ("B4", "B3", "B2"))
    norm = resolve("imagenet", 3, probes.band_names, embedded=True, raw=True)
    batches, *_ = cut_batches(probes, CompareOptions(), 4, 4, (16, 16), norm)
    got = next(iter(batches))
    pos, idx, _, _ = probes_mod._probe_plan(4, ["B4", "B3", "B2"], 16, 0, None)
    scene, _ = full_scene()
    r, c = pos[0]
    raw = scene[idx, r : r + 16, c : c + 16].astype(np.float64) / 10000
    want = (raw - np.array(IMAGENET_MEAN)[:, None, None]) / np.array(IMAGENET_STD)[:, None, None]
    np.testing.assert_allclose(got[0].numpy(), want, atol=1e-6)


def test_scene_preset_is_the_z_scored_crops_as_before():
    from cka_geo.compare.probes import probe_batches

    batches, *_ = probe_batches(CompareOptions(samples=8, batch_size=8), 13, 16)
    want = emb.probe_images(8, bands=13, size=16)
    assert torch.equal(next(iter(batches)), want)


def test_bands_by_name_from_the_scene_and_from_13_band_data(tmp_path):
    pre, ft = make_pair(tmp_path)
    res = compare_checkpoints(pre, ft, bands=("B08", "B04", "B03"), normalize="s2-div10000", **FAST)
    assert res["settings"]["bands"] == ["B8", "B4", "B3"]
    assert res["settings"]["normalize"]["name"] == "s2-div10000"
    data = tmp_path / "d13.npy"
    np.save(data, np.random.default_rng(0).integers(0, 5000, (40, 13, 32, 32)).astype(np.uint16))
    res = compare_checkpoints(pre, ft, data=str(data), bands=("B04", "B03", "B02"), bootstrap=50)
    assert res["settings"]["bands"] == ["B4", "B3", "B2"]
    assert res["settings"]["normalize"]["name"] == "imagenet" and res["settings"]["normalize"]["scale"] == 10000.0


def test_raw_dns_with_none_are_refused_with_advice(tmp_path, capsys):
    pre, ft = make_pair(tmp_path)
    data = tmp_path / "dn.npy"
    np.save(data, np.random.default_rng(0).integers(0, 5000, (40, 3, 32, 32)).astype(np.uint16))
    assert looks_raw(np.load(data)) and not looks_raw(torch.rand(2, 3, 4, 4))
    code = main(["compare", str(pre), str(ft), "--data", str(data), "--normalize", "none", "--no-figures",
                 "--out", str(tmp_path / "o")])
    err = [ln for ln in capsys.readouterr().err.strip().splitlines() if ln.startswith("cka-geo: error")]
    assert code == 1 and len(err) == 1 and "raw integer DNs" in err[0] and "s2-div10000" in err[0]


def test_a_mean_std_file_and_its_errors(tmp_path, capsys):
    pre, ft = make_pair(tmp_path)
    stats = tmp_path / "stats.json"
    stats.write_text(json.dumps({"mean": [1000, 1100, 1200], "std": [500, 510, 520]}))
    res = compare_checkpoints(pre, ft, normalize=str(stats), **FAST)
    assert res["settings"]["normalize"]["mean"] == [1000.0, 1100.0, 1200.0]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"mean": [0], "std": [1]}))
    code = main(["compare", str(pre), str(ft), "--normalize", str(bad), "--no-figures", "--out", str(tmp_path / "o")])
    err = [ln for ln in capsys.readouterr().err.strip().splitlines() if ln.startswith("cka-geo: error")]
    assert code == 2 and len(err) == 1 and "bad.json" in err[0] and "--normalize" in err[0]


def test_a_wrong_band_count_is_refused():
    with pytest.raises(Exception, match="--bands: 2 bands given, the model takes 3"):
        from cka_geo.compare.probes import open_probes

        open_probes(CompareOptions(bands=("B4", "B3")), 3)
    with pytest.raises(DataError):
        resolve("none", 3, None, embedded=False, raw=True)


# ------------------------------------------------------------------ defaults and progress


def test_device_defaults_leave_ten_batches():
    assert device_defaults(torch.device("cpu"), None, None, None) == (512, 32)
    assert device_defaults(torch.device("cuda"), None, None, None) == (2048, 128)
    n, b = device_defaults(torch.device("cpu"), None, None, 60)
    assert n == 60 and math.ceil(n / b) >= 10
    assert device_defaults(torch.device("cpu"), 100, 50, None) == (100, 50)  # given: kept


@pytest.mark.parametrize("device", ["cpu", "cuda"])
@pytest.mark.parametrize("distinct", [9, 40, 49, 64, 225, 289, 676, 5000])
def test_embedded_defaults_never_exceed_the_distinct_crops(device, distinct):
    dev = torch.device(device)
    n, b = device_defaults(dev, None, None, None, distinct)
    cap = {"cpu": 512, "cuda": 2048}[device]
    assert n <= min(cap, distinct) and n > min(cap, distinct) - b  # whole batches, at most one cut
    assert n % b == 0 and b >= 4
    if distinct >= 40:
        assert n // b >= 10  # at least 10 batches behind every interval
    # the user's choices win, and --data is not capped by the scene
    assert device_defaults(dev, 700, None, None, distinct)[0] == 700
    assert device_defaults(dev, None, 7, None, distinct) == (min(cap, distinct), 7)
    assert device_defaults(dev, None, None, 123, distinct)[0] == 123


def _distinct(hw):
    return (1707 // hw[0]) * (1693 // hw[1])


def test_default_image_size_by_device():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    # CPU: min(native, 224) per side, rounded down to the patch multiple
    assert default_image_size((518, 518), 14, cpu, _distinct) == (224, 224)  # DINOv2 ViT-S/14
    assert default_image_size((224, 224), 16, cpu, _distinct) == (224, 224)
    assert default_image_size((384, 384), 16, cpu, _distinct) == (224, 224)
    assert default_image_size((256, 256), 10, cpu, _distinct) == (220, 220)
    assert default_image_size((96, 96), 8, cpu, _distinct) == (96, 96)  # smaller than 224: native
    assert default_image_size((120, 264), 12, cpu, _distinct) == (120, 216)
    # CUDA: the native size, unless the scene holds fewer than 40 distinct crops there
    assert default_image_size((224, 224), 16, cuda, _distinct) == (224, 224)
    assert default_image_size((120, 120), 8, cuda, _distinct) == (120, 120)
    hw = default_image_size((518, 518), 14, cuda, _distinct)
    assert hw == (238, 238) and _distinct(hw) >= 40 and _distinct((252, 252)) < 40
    assert default_image_size((512, 512), 16, cuda, _distinct) == (240, 240)


#: A DINOv2-ViT-S/14-shaped toy: 518 px native, patch 14 (narrow and shallow, to stay fast).
CFG518 = ViTConfig(img_size=518, patch_size=14, in_chans=3, embed_dim=24, depth=2, num_heads=2)


def test_default_run_on_the_embedded_scene_records_its_choices(tmp_path, capsys):
    pre, ft = make_pair(tmp_path, CFG518)
    with pytest.warns(RuntimeWarning, match="pos_embed resampled from a 37x37 to a 16x16 patch grid"):
        res = compare_checkpoints(pre, ft, bootstrap=50)
    st = res["settings"]
    # CPU: 224 px, capped at the 49 distinct 224 px crops, cut to 12 whole batches of 4
    assert st["image_size"] == [224, 224] and st["native_image_size"] == [518, 518]
    assert st["samples"] == 48 and st["batch_size"] == 4 and st["batches"] == 12
    assert st["defaults_by_device"] == {"image_size": True, "samples": True, "batch_size": True}
    assert st["probe_crops"] == {"scene": [1707, 1693], "crop": [224, 224], "distinct": 49, "overlapping": 0}
    assert "48 of its 49 distinct 224x224 crops" in st["data"]
    plan = [ln for ln in capsys.readouterr().err.splitlines() if "batches of" in ln]
    assert "48 images" in plan[0] and "of its 49 distinct 224x224 crops" in plan[0] and "224x224 px" in plan[0]
    assert "12 batches of 4 (image size, samples, batch size: CPU default)" in plan[0]


def test_samples_beyond_the_distinct_crops_warn_and_are_recorded(tmp_path):
    pre, ft = make_pair(tmp_path, CFG518)
    with pytest.warns(RuntimeWarning, match="holds 49 distinct non-overlapping 224x224 crops: the other 8"):
        res = compare_checkpoints(pre, ft, samples=57, bootstrap=50, progress=False)
    st = res["settings"]
    assert st["batch_size"] == 5 and st["samples"] == 55 and st["samples_skipped"] == 2  # a last batch of 2
    assert st["probe_crops"]["distinct"] == 49 and st["probe_crops"]["overlapping"] == 6
    assert "49 of its 49 distinct 224x224 crops and 8 overlapping ones" in st["data"]
    assert st["defaults_by_device"] == {"image_size": True, "batch_size": True}


def test_user_data_keeps_its_size_and_count(tmp_path):
    pre, ft = make_pair(tmp_path, CFG518)
    data = tmp_path / "d.npy"
    np.save(data, np.random.default_rng(0).normal(size=(40, 3, 28, 28)).astype(np.float32))
    with pytest.warns(RuntimeWarning, match="pos_embed resampled"):
        res = compare_checkpoints(pre, ft, data=str(data), bootstrap=50, progress=False)
    st = res["settings"]
    assert st["image_size"] == [28, 28] and st["samples"] == 40 and st["probe_crops"] is None
    assert st["defaults_by_device"] == {"batch_size": True}


def test_plan_estimate_and_plain_progress_lines_on_stderr(tmp_path, capsys):
    pre, ft = make_pair(tmp_path)
    res = compare_checkpoints(pre, ft, samples=80, bootstrap=50)
    err = capsys.readouterr().err.splitlines()
    plan = [ln for ln in err if "batches of" in ln]
    assert plan and "80 images" in plan[0] and "32x32 px" in plan[0] and "device cpu" in plan[0]
    assert "batch size: CPU default" in plan[0]
    assert any("estimated total" in ln for ln in err)
    assert sum("% )" in ln or " %)" in ln for ln in err) >= 3  # about every 10 %
    assert res["settings"]["batch_size"] == 8 and res["settings"]["batches"] == 10
    assert res["settings"]["defaults_by_device"] == {"image_size": True, "batch_size": True}
    compare_checkpoints(pre, ft, samples=40, bootstrap=50, progress=False)
    assert capsys.readouterr().err == ""


def test_probe_takes_another_image_size_and_refuses_a_non_multiple(tmp_path, capsys):
    cfg = ViTConfig(img_size=32, patch_size=8, in_chans=13, embed_dim=32, depth=2, num_heads=2)
    save_checkpoint(tmp_path / "m.pt", VisionTransformer(cfg), cfg)
    assert main(["probe", str(tmp_path / "m.pt"), "--image-size", "48", "--cv-folds", "2"]) == 0
    assert "cka-geo: warning: image size 48x48 differs from the model's 32x32" in capsys.readouterr().err
    code = main(["probe", str(tmp_path / "m.pt"), "--image-size", "50"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and err[-1].startswith("cka-geo: error: --image-size 50: 50x50 is not a multiple")
