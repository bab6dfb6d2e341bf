"""Training, evaluation and probing on users' data (--data) from any checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from cka_geo.checkpoints import load_checkpoint, save_checkpoint
from cka_geo.cli import main
from cka_geo.data.layouts import detect_layout, open_user_data, seeded_split
from cka_geo.errors import DataError, UsageError
from cka_geo.models.vit import VisionTransformer, ViTConfig
from cka_geo.train.start import adapt_patch_weight, prepare_start

CLASSES = ("Forest", "River", "Sea")


def small_checkpoint(tmp: Path, chans: int = 3, name: str = "pre.pt") -> Path:
    """A 3-band 16-px ViT written by save_checkpoint."""
    torch.manual_seed(0)
    enc = VisionTransformer(ViTConfig(img_size=16, patch_size=4, in_chans=chans, embed_dim=32, depth=2, num_heads=2))
    return save_checkpoint(tmp / name, enc, enc.cfg)


def class_folders(root: Path, bands: int = 13, per_class: int = 6, size: int = 16) -> Path:
    """EuroSAT-style root/<class>/*.npy whose class lifts the mean of band B4/B3/B2."""
    rng = np.random.default_rng(0)
    for k, c in enumerate(CLASSES):
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            x = rng.normal(size=(bands, size, size)).astype(np.float32)
            x[(3, 2, 1)[k] if bands == 13 else k] += 2.0
            np.save(root / c / f"{c}_{i}.npy", x)
    return root


def image_mask(root: Path, n: int = 8, size: int = 16, bands: int = 3) -> Path:
    rng = np.random.default_rng(1)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i in range(n):
        m = (rng.random((size, size)) > 0.5).astype(np.int64)
        m[0, 0] = -1
        x = rng.normal(size=(bands, size, size)).astype(np.float32) * 0.3 + m[None]
        np.save(root / "images" / f"t{i}.npy", x)
        np.save(root / "masks" / f"t{i}.npy", m)
    return root


def _run(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as exc:
        return int(exc.code or 0)


def _finetune(tmp: Path, data: Path, *extra: str) -> dict:
    out = tmp / "run"
    argv = ["finetune", str(small_checkpoint(tmp)), "--data", str(data), "--out", str(out), "--epochs", "1",
            "--batch-size", "4", "--threads", "1", "--no-progress", *extra]
    assert main(argv) == 0
    return json.loads((out / "eval.json").read_text())


def test_class_folders_finetune_evaluate_probe(tmp_path, capsys):
    data = class_folders(tmp_path / "eurosat")
    res = _finetune(tmp_path, data, "--layer-decay", "0.75", "--drop-path", "0.1", "--accum-steps", "2")
    assert res["task"]["task"] == "classification" and res["task"]["num_outputs"] == 3
    assert 0 <= res["metrics"]["test"]["accuracy"] <= 1
    capsys.readouterr()
    assert main(["evaluate", str(tmp_path / "run"), "--data", str(data), "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["accuracy"] == pytest.approx(res["metrics"]["test"]["accuracy"], abs=1e-12)
    assert got["loss"] == pytest.approx(res["metrics"]["test"]["loss"], rel=1e-6)
    ft = load_checkpoint(tmp_path / "run" / "ft.pt")
    assert ft.config.in_chans == 13  # the 3-band model adapted to the 13 bands by name
    assert ft.extra["inputs"]["adapt"]["rule"].startswith("names: B2 B3 B4 copied; B1 B5")
    pre = load_checkpoint(tmp_path / "run" / "pre.pt")
    assert pre.config.in_chans == 13 and pre.state_dict.keys() == ft.state_dict.keys()
    assert main(["probe", str(tmp_path / "run" / "pre.pt"), "--data", str(data), "--no-figure", "--cv-folds", "2",
                 "--batch-size", "8"]) == 0
    assert "blocks.1" in capsys.readouterr().out


def test_image_mask_segmentation_with_split_files(tmp_path):
    data = image_mask(tmp_path / "seg")
    (data / "train.txt").write_text("\n".join(f"t{i}" for i in range(5)))
    (data / "val.txt").write_text("t5\nt6.npy\n")
    (data / "test.txt").write_text("t7\n")
    ud = open_user_data(data)
    assert ud.layout == "image-mask" and ud.task == "segmentation" and ud.num_outputs == 2
    assert {s: len(d) for s, d in ud.splits.items()} == {"train": 5, "val": 2, "test": 1}
    res = _finetune(tmp_path, data, "--decoder", "linear")
    assert 0 <= res["metrics"]["test"]["miou"] <= 1


def test_sen1floods11_layout_trains(tmp_path):
    tifffile = pytest.importorskip("tifffile")
    root = tmp_path / "s1f11"
    (root / "S2Hand").mkdir(parents=True)
    (root / "LabelHand").mkdir()
    rng = np.random.default_rng(2)
    chips = [f"Ghana_{i}" for i in range(6)]
    for c in chips:
        tifffile.imwrite(root / "S2Hand" / f"{c}_S2Hand.tif", rng.integers(0, 3000, (13, 16, 16)).astype(np.uint16))
        m = rng.integers(-1, 2, (16, 16)).astype(np.int16)
        tifffile.imwrite(root / "LabelHand" / f"{c}_LabelHand.tif", m)
    for split, part in (("train", chips[:4]), ("valid", chips[4:5]), ("test", chips[5:])):
        (root / f"flood_{split}_data.csv").write_text("".join(f"{c}_S1Hand.tif,{c}_LabelHand.tif\n" for c in part))
    ud = open_user_data(root)
    assert ud.layout == "sen1floods11" and ud.ignore_index == -1 and len(ud.splits["train"]) == 4
    res = _finetune(tmp_path, root, "--bands", "B04", "B03", "B02")  # raw DN -> auto: imagenet on reflectance
    assert 0 <= res["metrics"]["test"]["miou"] <= 1
    ft = load_checkpoint(tmp_path / "run" / "ft.pt")
    assert ft.extra["inputs"]["normalize"]["name"] == "imagenet" and ft.extra["inputs"]["select"] == [3, 2, 1]


def test_pastis_like_layout_trains(tmp_path):
    root = tmp_path / "pastis"
    (root / "DATA_S2").mkdir(parents=True)
    (root / "ANNOTATIONS").mkdir()
    rng = np.random.default_rng(3)
    feats = []
    for pid, fold in zip(range(10, 15), (1, 2, 3, 4, 5), strict=True):
        np.save(root / "DATA_S2" / f"S2_{pid}.npy", rng.normal(size=(4, 10, 16, 16)).astype(np.float32))
        np.save(root / "ANNOTATIONS" / f"TARGET_{pid}.npy", rng.integers(0, 20, (3, 16, 16)))
        feats.append({"properties": {"ID_PATCH": pid, "Fold": fold, "dates-S2": {str(t): 20180900 + t for t in range(4)}}})
    (root / "metadata.geojson").write_text(json.dumps({"type": "FeatureCollection", "features": feats}))
    ud = open_user_data(root)
    x, _ = ud.splits["train"][0]
    assert x.shape == (10, 16, 16) and ud.num_outputs == 19 and ud.ignore_index == 19
    res = _finetune(tmp_path, root, "--band-rule", "mean")
    assert 0 <= res["metrics"]["test"]["miou"] <= 1


def _csv_folder(root: Path, rows: list[str], header: str) -> Path:
    root.mkdir()
    rng = np.random.default_rng(4)
    for i in range(len(rows)):
        np.save(root / f"p{i}.npy", rng.normal(size=(3, 16, 16)).astype(np.float32))
    (root / "labels.csv").write_text(header + "\n" + "\n".join(f"p{i}.npy,{r}" for i, r in enumerate(rows)) + "\n")
    return root


def test_csv_regression_and_multilabel(tmp_path):
    reg = _csv_folder(tmp_path / "reg", [f"{i / 10},{1 - i / 10}" for i in range(10)], "filename,ndvi,cover")
    ud = open_user_data(reg, task="regression", target="ndvi,cover")
    assert ud.num_outputs == 2 and ud.splits["train"][0][1].shape == (2,)
    (tmp_path / "a").mkdir()
    res = _finetune(tmp_path / "a", reg, "--task", "regression", "--target", "ndvi,cover")
    assert "rmse" in res["metrics"]["test"] and "r2" in res["metrics"]["test"]
    ml = _csv_folder(tmp_path / "ml", ["forest;water", "urban", "forest|urban", "water", "forest"] * 2, "file,labels")
    ud = open_user_data(ml, task="multilabel")
    assert ud.classes == ["forest", "urban", "water"] and ud.splits["train"].dataset.targets[0].tolist() == [1, 0, 1]
    (tmp_path / "b").mkdir()
    res = _finetune(tmp_path / "b", ml, "--task", "multilabel")
    assert 0 <= res["metrics"]["test"]["map"] <= 1 and "f1_micro" in res["metrics"]["test"]


@pytest.mark.parametrize(("make", "kwargs", "message"), [
    ("split_dirs_missing_class", {}, "missing class folder 'Sea'"),
    ("empty_class", {}, "empty class folder"),
    ("mask_size", {}, "is 8x8 but image"),
    ("csv", {"task": "regression", "target": "height"}, "unknown column 'height'"),
    ("csv", {"task": "regression", "target": "name"}, "must be numbers"),
    ("csv", {"task": "classification"}, "serve --task regression or multilabel, not classification"),
    ("split_file", {}, "entries not in the data, e.g. 'nope'"),
    ("sizes", {}, "one size for all"),
    ("nothing", {}, "no known layout"),
])
def test_every_mismatch_is_one_line(tmp_path, make, kwargs, message):
    root = tmp_path / "d"
    if make == "split_dirs_missing_class":
        class_folders(root / "train")
        class_folders(root / "test")
        class_folders(root / "val")
        import shutil

        shutil.rmtree(root / "val" / "Sea")
    elif make == "empty_class":
        class_folders(root)
        for f in (root / "Sea").iterdir():
            f.unlink()
    elif make == "mask_size":
        image_mask(root)
        np.save(root / "masks" / "t3.npy", np.zeros((8, 8), dtype=np.int64))
    elif make == "csv":
        _csv_folder(root, ["0.5,a"] * 4, "filename,target,name")
    elif make == "split_file":
        class_folders(root)
        (root / "train.txt").write_text("Forest/Forest_0.npy\nnope\n")
    elif make == "sizes":
        class_folders(root)
        np.save(root / "Sea" / "big.npy", np.zeros((13, 32, 32), dtype=np.float32))
    else:
        root.mkdir()
        (root / "readme.md").write_text("x")
    with pytest.raises((DataError, UsageError)) as info:
        open_user_data(root, **kwargs)
    text = str(info.value)
    assert message in text and "\n" not in text, text


def test_band_mismatch_without_a_rule_is_refused(tmp_path):
    data = class_folders(tmp_path / "d", bands=5)  # 5 bands: no Sentinel-2 names by count
    ud = open_user_data(data)
    with pytest.raises(DataError, match=r"d: the data has 5 bands, the model 3 \(band names unknown\).*--band-rule mean"):
        prepare_start(small_checkpoint(tmp_path), ud)
    start = prepare_start(small_checkpoint(tmp_path), ud, band_rule="mean")
    assert start.encoder.cfg.in_chans == 5 and start.record["adapt"]["rule"].startswith("mean")
    with pytest.raises(UsageError, match="no known Sentinel-2 band order"):
        prepare_start(small_checkpoint(tmp_path), ud, bands=["B4", "B3", "B2"], band_rule="off")
    assert _run(["finetune", str(small_checkpoint(tmp_path)), "--data", str(data), "--out", str(tmp_path / "o"),
                 "--image-size", "32"]) != 0


def test_name_rule_keeps_the_pretrained_embedding_on_its_bands():
    torch.manual_seed(0)
    w = torch.randn(8, 3, 4, 4, dtype=torch.float64)
    model, data = ("B4", "B3", "B2"), ("B1", "B2", "B3", "B4", "B8")
    new, how = adapt_patch_weight(w, model, data, 5)
    x = torch.randn(2, 5, 8, 8, dtype=torch.float64)
    ref = torch.nn.functional.conv2d(x[:, [3, 2, 1]], w, stride=4)
    torch.testing.assert_close(torch.nn.functional.conv2d(x, new, stride=4), ref)
    assert "B1 B8 start at zero" in how
    # a 13-band model on 4-band data: the absent bands are dropped (as zero input)
    w13 = torch.randn(8, 13, 4, 4, dtype=torch.float64)
    names13 = ("B1", "B2", "B3", "B4", "B5", "B6", "B7", "B8", "B8A", "B9", "B10", "B11", "B12")
    new4, _ = adapt_patch_weight(w13, names13, ("B2", "B3", "B4", "B8"), 4)
    x4 = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    full = torch.zeros(2, 13, 8, 8, dtype=torch.float64)
    full[:, [1, 2, 3, 7]] = x4
    torch.testing.assert_close(torch.nn.functional.conv2d(x4, new4, stride=4),
                               torch.nn.functional.conv2d(full, w13, stride=4))
    with pytest.raises(DataError, match="no shared band names"):
        adapt_patch_weight(w, model, ("B11", "B12"), 2, "names")


@pytest.mark.parametrize("c_new", [1, 2, 7, 13])
def test_mean_rule_keeps_the_embedding_of_a_flat_spectrum(c_new):
    torch.manual_seed(c_new)
    w = torch.randn(6, 3, 2, 2, dtype=torch.float64)
    new, _ = adapt_patch_weight(w, None, None, c_new, "mean")
    g = torch.randn(1, 1, 4, 4, dtype=torch.float64)
    torch.testing.assert_close(torch.nn.functional.conv2d(g.expand(1, c_new, 4, 4), new, stride=2),
                               torch.nn.functional.conv2d(g.expand(1, 3, 4, 4), w, stride=2))


def test_timm_layout_state_dict_as_the_start(tmp_path, capsys):
    """A plain state dict in timm names (no cka-geo config) is read as compare reads it."""
    torch.manual_seed(0)
    enc = VisionTransformer(ViTConfig(img_size=16, patch_size=4, in_chans=13, embed_dim=64, depth=2, num_heads=1))
    path = tmp_path / "timm_vit.pth"
    torch.save(enc.state_dict(), path)
    data = class_folders(tmp_path / "eurosat")
    out = tmp_path / "run"
    assert main(["finetune", str(path), "--data", str(data), "--out", str(out), "--epochs", "1", "--batch-size", "6",
                 "--threads", "1", "--no-progress"]) == 0
    assert "assumed num_heads=1" in capsys.readouterr().err  # said, as compare says it
    pre = load_checkpoint(out / "pre.pt")
    for k, v in enc.state_dict().items():
        torch.testing.assert_close(pre.state_dict[k], v, rtol=0, atol=0, msg=k)  # started from the file, unchanged


def test_seeded_split_is_a_partition():
    s = seeded_split(23, 5, 0.1, 0.2)
    assert sorted(s["train"] + s["val"] + s["test"]) == list(range(23))
    assert (len(s["val"]), len(s["test"])) == (2, 5) and s == seeded_split(23, 5, 0.1, 0.2)
    assert s != seeded_split(23, 6, 0.1, 0.2)


def test_layout_detection_and_split_folders(tmp_path):
    assert detect_layout(class_folders(tmp_path / "c")) == "class-folders"
    assert detect_layout(image_mask(tmp_path / "m")) == "image-mask"
    (tmp_path / "c" / "notes.csv").write_text("a,b\n")  # a side file does not make it a csv layout
    assert detect_layout(tmp_path / "c") == "class-folders"
    for split, n in (("train", 4), ("val", 1), ("test", 2)):
        class_folders(tmp_path / "s" / split, per_class=n)
        image_mask(tmp_path / "sm" / split, n=n + 1)
    ud = open_user_data(tmp_path / "s")
    assert ud.split_rule.startswith("split folders") and ud.classes == list(CLASSES)
    assert {s: len(d) for s, d in ud.splits.items()} == {"train": 12, "val": 3, "test": 6}
    assert int(ud.splits["test"][5][1]) == 2  # Sea, the third class folder
    um = open_user_data(tmp_path / "sm")
    assert um.layout == "image-mask" and {s: len(d) for s, d in um.splits.items()} == {"train": 5, "val": 2, "test": 3}


def _ap_reference(scores: np.ndarray, hits: np.ndarray) -> float:
    """Average precision by its definition: the mean, over the positives, of the precision of
    the top-k list that ends at each positive (scores distinct)."""
    order = np.argsort(-scores, kind="stable")
    ranks = np.flatnonzero(hits[order]) + 1
    return float(np.mean([hits[order][:r].sum() / r for r in ranks]))


def test_multilabel_meter_matches_definitions():
    from cka_geo.train.metrics import MultiLabelMeter

    rng = np.random.default_rng(7)
    logits = rng.normal(size=(40, 4))
    target = (rng.random((40, 4)) < 0.3).astype(np.float64)
    target[:, 3] = 0  # a class without positives: left out of mAP
    meter = MultiLabelMeter()
    for a in range(0, 40, 16):  # batches
        meter.update(torch.from_numpy(logits[a : a + 16]), torch.from_numpy(target[a : a + 16]))
    got = meter.compute()
    pred, t = logits > 0, target > 0.5
    tp, fp, fn = (pred & t).sum(0), (pred & ~t).sum(0), (~pred & t).sum(0)
    assert got["f1_micro"] == pytest.approx(2 * tp.sum() / (2 * tp.sum() + fp.sum() + fn.sum()), rel=1e-12)
    present = (2 * tp + fp + fn) > 0
    assert got["f1_macro"] == pytest.approx(np.mean((2 * tp / np.maximum(2 * tp + fp + fn, 1))[present]), rel=1e-12)
    assert got["map"] == pytest.approx(np.mean([_ap_reference(logits[:, c], t[:, c]) for c in range(3)]), rel=1e-12)


def test_dofa_gets_the_data_bands_by_wavelength(tmp_path):
    """DOFA's patch embedding is generated from wavelengths: a 3-band DOFA on 13-band data is
    rebuilt for the 13 bands (the generator's weights do not change)."""
    from cka_geo.models.dofa import DofaConfig, DofaVisionTransformer

    torch.manual_seed(0)
    cfg = DofaConfig(img_size=16, patch_size=4, in_chans=3, wavelengths=[0.665, 0.56, 0.49], embed_dim=32, depth=2,
                     num_heads=2, dynamic_embed_dim=16, generator_hidden=32, weight_tokens=8)
    model = DofaVisionTransformer(cfg)
    path = save_checkpoint(tmp_path / "dofa.pt", model, cfg)
    ud = open_user_data(class_folders(tmp_path / "d"))
    start = prepare_start(path, ud)
    assert start.encoder.cfg.in_chans == 13 and start.record["adapt"]["rule"] == "dofa wavelengths"
    assert start.encoder.cfg.wavelengths[3] == pytest.approx(0.665, abs=0.01)  # B4, red
    for k, v in model.state_dict().items():
        torch.testing.assert_close(start.encoder.state_dict()[k], v, rtol=0, atol=0, msg=k)


@pytest.mark.parametrize(("argv", "fragment"), [
    (["finetune", "p.pt", "--out", "o", "--bands", "B4"], "--bands applies to --data only"),
    (["finetune", "p.pt", "--out", "o", "--normalize", "imagenet"], "--normalize applies to --data only"),
    (["finetune", "p.pt", "--out", "o", "--task", "multilabel"], "--task multilabel needs --data"),
    (["finetune", "p.pt", "--out", "o", "--data", "d", "--stride", "8"], "--stride applies to the embedded tiles"),
    (["finetune", "p.pt", "--out", "o", "--precision", "fp8"], "--precision"),
    (["finetune", "p.pt", "--out", "o", "--layer-decay", "0"], "--layer-decay"),
    (["finetune", "p.pt", "--out", "o", "--drop-path", "1"], "--drop-path"),
    (["finetune", "p.pt", "--out", "o", "--band-rule", "copy"], "--band-rule"),
    (["probe", "p.pt", "--bands", "B4"], "--bands applies to --data only"),
])
def test_cli_usage_errors_of_the_new_options(argv, fragment, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "p.pt").write_bytes(b"")
    assert _run(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and fragment in err, err


def test_evaluate_data_refuses_a_run_of_the_embedded_tiles(tmp_path, capsys):
    from _train_helpers import cls_tiles, tiny_vit
    from cka_geo.train import TrainConfig
    from cka_geo.train.runs import finetune

    res = finetune(tiny_vit(chans=13), cls_tiles(6, 0, chans=13), tmp_path / "run", TrainConfig(epochs=1, progress=False),
                   task="classification", num_outputs=3)
    assert _run(["evaluate", str(res.ft_path), "--data", str(class_folders(tmp_path / "d"))]) == 2
    assert "fine-tuned on the embedded tiles, not on a --data folder" in capsys.readouterr().err
