"""compare on degenerate probes and absurd sizes: NaN and a plain verdict, or a refusal first."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from cka_geo.budget import CKAWorkload, check_fits
from cka_geo.checkpoints import save_checkpoint
from cka_geo.cli import main
from cka_geo.errors import UsageError
from cka_geo.vit import VisionTransformer, ViTConfig

CFG = ViTConfig(img_size=16, patch_size=4, in_chans=13, embed_dim=32, depth=3, num_heads=2)


@pytest.fixture
def pair(tmp_path: Path) -> tuple[Path, Path]:
    torch.manual_seed(0)
    model = VisionTransformer(CFG)
    pre, ft = tmp_path / "pre.pt", tmp_path / "ft.pt"
    save_checkpoint(pre, model, CFG)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    sd["blocks.1.mlp.fc1.weight"] += 0.5 * torch.randn_like(sd["blocks.1.mlp.fc1.weight"])
    save_checkpoint(ft, sd, CFG)
    return pre, ft


def one_error_line(capsys) -> str:
    # the error is one line; the plan and progress lines may precede it
    err = [line for line in capsys.readouterr().err.strip().splitlines() if not line.startswith("cka-geo compare: ")]
    assert len(err) == 1, err
    assert err[0].startswith("cka-geo: error: ") and "internal error" not in err[0]
    return err[0]


@pytest.mark.parametrize("kind", ["blank", "repeated"])
def test_constant_probe_images_give_nan_and_no_verdict(tmp_path, pair, capsys, kind):
    pre, ft = pair
    images = np.zeros((16, 13, 16, 16), np.float32)
    if kind == "repeated":
        images[:] = np.random.default_rng(0).random((13, 16, 16), dtype=np.float32)
    np.save(tmp_path / "probes.npy", images)
    out = tmp_path / "out"
    code = main(["compare", str(pre), str(ft), "--data", str(tmp_path / "probes.npy"), "--batch-size", "8",
                 "--out", str(out), "--no-figures", "--format", "json"])
    assert code == 0
    res = json.loads((out / "results.json").read_text())
    assert all(v is None for v in res["diagonal"].values())
    assert all(v is None for v in res["own_change"].values())
    assert res["summary"]["most_changed"] is None and res["summary"]["first_changed"] is None
    assert res["summary"]["largest_own_change"] is None
    assert "undefined (NaN) at every sublayer" in res["summary"]["verdict"]
    assert res["degenerate_batches"]["pre"] == dict.fromkeys(res["layers"], 2)
    warned = [line for line in capsys.readouterr().err.splitlines() if "constant representation" in line]
    assert len(warned) == 1


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["--kernel", "rbf", "--rbf-frac", "1e-3"], "--rbf-frac"),
        (["--kernel", "rbf", "--rbf-frac", "50"], "--rbf-frac"),
        (["--estimator", "biased", "--samples", "2"], "--samples must be at least 3"),
        (["--estimator", "biased", "--batch-size", "2"], "--batch-size must be at least 3"),
        (["--bootstrap", "10000000"], "--bootstrap"),
        (["--seed", "-1"], "--seed"),
    ],
)
def test_absurd_flags_are_refused_with_exit_2_before_anything_runs(tmp_path, pair, capsys, args, named):
    pre, ft = pair
    out = tmp_path / "out"
    assert main(["compare", str(pre), str(ft), "--out", str(out), *args]) == 2
    assert named in one_error_line(capsys)
    assert not out.exists()


@pytest.mark.parametrize(
    "args",
    [
        ["--estimator", "biased", "--samples", "300000"],  # one 300000² gram per sublayer
        ["--samples", "100000", "--batch-size", "100000"],
        ["--samples", "800", "--batch-size", "400", "--pooling", "tokens"],  # 400 x 16 token rows a batch
        ["--samples", "50000000", "--batch-size", "4"],  # per-batch terms of 12.5 M batches
    ],
)
def test_sizes_memory_cannot_hold_are_refused_before_the_first_forward(tmp_path, pair, capsys, monkeypatch, args):
    pre, ft = pair
    monkeypatch.setattr("cka_geo.budget.available_bytes", lambda device: 2 << 30)  # a 2 GiB machine
    start = time.perf_counter()
    assert main(["compare", str(pre), str(ft), "--out", str(tmp_path / "out"), *args]) == 2
    assert time.perf_counter() - start < 20
    line = one_error_line(capsys)
    assert "GiB" in line and "more than the 2.0 GiB free" in line and "--samples" in line


def test_the_memory_estimate_counts_each_component():
    work = CKAWorkload(rows=1000, width=10, layers_a=4, layers_b=8, batches=50, bootstrap=1000)
    needs = work.needs()
    assert needs["grams"] == 4 * 12 * 1000 * 1000
    assert needs["row products"] == 4 * 1000 * 4 * 8
    assert needs["per-batch terms"] == 2 * 8 * 50 * (32 + 12)
    assert needs["bootstrap"] == 8 * 1000 * (50 + 16)
    check_fits(work, torch.device("cpu"), "--x", available=sum(needs.values()))
    with pytest.raises(UsageError, match=r"--x need about .* \(grams: .*\), more than"):
        check_fits(work, torch.device("cpu"), "--x", available=sum(needs.values()) - 1)


def test_fewer_than_ten_batches_behind_an_interval_warn(tmp_path, pair, capsys):
    pre, ft = pair
    common = [str(pre), str(ft), "--no-figures", "--format", "json", "--no-own-change"]
    assert main(["compare", *common, "--samples", "32", "--batch-size", "8", "--out", str(tmp_path / "a")]) == 0
    assert "only 4 batches feed the intervals" in capsys.readouterr().err
    assert main(["compare", *common, "--samples", "40", "--batch-size", "4", "--out", str(tmp_path / "b")]) == 0
    assert "batches feed" not in capsys.readouterr().err


@pytest.mark.parametrize(
    ("option", "value"), [("pooling", "cls"), ("kernel", "rbf"), ("estimator", "biased"), ("pooling", "tokens")]
)
def test_settings_record_what_the_engine_did_and_the_numbers_follow_them(pair, option, value, monkeypatch):
    # The result must say what the capture and accumulator did, and its numbers must be the
    # ones those settings give: dropping or changing an option anywhere between the options
    # and the engine fails here (a mutation of the capture call is tried at the end).
    from cka_geo import compare as cmp
    from cka_geo.accumulator import MinibatchCKA
    from cka_geo.checkpoints import build_model, load_checkpoint
    from cka_geo.data import iter_probe_batches
    from cka_geo.features import capture, forward_batch, resolve_sublayers

    pre, ft = pair
    opts = {"samples": 32, "batch_size": 32 if option == "estimator" else 8, "bootstrap": 0, "own_change": False}
    res = cmp.compare_checkpoints(pre, ft, **opts, **{option: value})
    assert res["settings"][option] == value
    a, b = (build_model(load_checkpoint(p)) for p in (pre, ft))
    names = resolve_sublayers(a, kinds=("attn", "fc1", "fc2", "block"))
    settings = {"kernel": "linear", "estimator": "unbiased", "pooling": "mean", option: value}
    acc = MinibatchCKA(kernel=settings["kernel"], estimator=settings["estimator"])
    with capture(a, names, pooling=settings["pooling"]) as ca, capture(b, names, pooling=settings["pooling"]) as cb:
        for x in iter_probe_batches(32, bands=13, size=16, batch_size=opts["batch_size"], seed=0):
            acc.update(forward_batch(a, x, ca).features, forward_batch(b, x, cb).features)
    want = acc.compute().diagonal()
    for n in names:
        assert res["diagonal"][n] == pytest.approx(want[n], abs=1e-12), n
    if option == "pooling":
        from cka_geo.compare import run as run_module

        real = run_module.capture
        monkeypatch.setattr(run_module, "capture", lambda model, names, pooling="mean", **kw: real(model, names, **kw))
        mutated = cmp.compare_checkpoints(pre, ft, **opts, **{option: value})
        assert mutated["settings"]["pooling"] != value  # the record follows the capture, not the options


def test_the_assumptions_can_be_overridden_from_the_command_line(tmp_path, capsys):
    # A bare timm state dict stores no heads, eps or activation: each is assumed with a
    # warning naming its flag, and the flags take them away and reach the model.
    torch.manual_seed(0)
    sd = VisionTransformer(CFG).state_dict()
    pre, ft = tmp_path / "pre.pth", tmp_path / "ft.pth"
    torch.save(sd, pre)
    torch.save({k: v + 0.01 * torch.randn_like(v) for k, v in sd.items()}, ft)
    common = ["compare", str(pre), str(ft), "--samples", "16", "--batch-size", "8", "--no-figures",
              "--format", "json", "--bootstrap", "0"]
    assert main([*common, "--out", str(tmp_path / "a")]) == 0
    err = capsys.readouterr().err
    assert "assumed num_heads=" in err and "--num-heads" in err
    assert main([*common, "--num-heads", "2", "--norm-eps", "1e-5", "--act", "gelu_tanh", "--out", str(tmp_path / "b")]) == 0
    assert "assumed" not in capsys.readouterr().err
    res = json.loads((tmp_path / "b" / "results.json").read_text())
    cfg = res["model"]["config"]
    assert (cfg["num_heads"], cfg["norm_eps"], cfg["act"]) == (2, 1e-5, "gelu_tanh")
    assert res["checkpoints"]["pre"]["assumed"] == []


def test_interval_method_is_chosen_and_recorded(tmp_path, pair):
    pre, ft = pair
    common = [str(pre), str(ft), "--no-figures", "--format", "json", "--no-own-change", "--samples", "40", "--batch-size", "4"]
    got = {}
    for method in ("jackknife-t", "percentile", "none"):
        out = tmp_path / method
        assert main(["compare", *common, "--interval", method, "--out", str(out)]) == 0
        got[method] = json.loads((out / "results.json").read_text())
    jk, pc, no = got["jackknife-t"], got["percentile"], got["none"]
    assert jk["settings"]["interval_method"].startswith("jackknife-t over batches")
    assert jk["settings"]["bootstrap"] == 0
    assert pc["settings"]["interval_method"] == "percentile bootstrap over batches"
    assert pc["settings"]["bootstrap"] == 1000
    assert no["settings"]["interval_method"] is None
    assert all(v is None for v in no["intervals"].values())
    # same values, different intervals; each interval holds its estimate
    assert jk["diagonal"] == pc["diagonal"] == no["diagonal"]
    for name, value in jk["diagonal"].items():
        for res in (jk, pc):
            lo, hi = res["intervals"][name]
            assert lo <= value <= hi
    assert jk["intervals"] != pc["intervals"]
    assert main(["compare", *common, "--interval", "bca", "--out", str(tmp_path / "x")]) == 2


def test_a_global_medium_matmul_precision_does_not_reach_the_forwards(pair):
    """torchgeo and terratorch call torch.set_float32_matmul_precision("medium") at import;
    on CPUs with bf16 units (and on CUDA) that turns float32 matmuls into bf16 ones. A float32
    compare must be float32 anyway, and leave the process's setting as it found it."""
    from cka_geo.compare import compare_checkpoints

    pre, ft = pair
    kw = dict(samples=16, batch_size=8, own_change=False, progress=False, interval="none")
    exact = compare_checkpoints(pre, ft, **kw)
    old = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("medium")
    try:
        got = compare_checkpoints(pre, ft, **kw)
        assert torch.get_float32_matmul_precision() == "medium"
    finally:
        torch.set_float32_matmul_precision(old)
    assert got["diagonal"] == exact["diagonal"]
    assert got.matrix.tobytes() == exact.matrix.tobytes()
