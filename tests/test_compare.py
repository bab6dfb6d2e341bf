"""`cka-geo compare` end to end on tiny checkpoints with planted changes."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from cka_geo.checkpoints import save_checkpoint
from cka_geo.cli import main
from cka_geo.compare import CompareOptions, compare_checkpoints
from cka_geo.vit import VisionTransformer, ViTConfig

CFG = ViTConfig(img_size=16, patch_size=4, in_chans=13, embed_dim=32, depth=4, num_heads=2)
FAST = {"samples": 64, "batch_size": 16, "bootstrap": 200}


def make_pair(tmp_path: Path, key: str | None, scale: float = 0.5, cfg: ViTConfig = CFG) -> tuple[Path, Path]:
    torch.manual_seed(0)
    model = VisionTransformer(cfg)
    pre, ft = tmp_path / "pre.pt", tmp_path / "ft.safetensors"
    save_checkpoint(pre, model, cfg)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    if key is not None:
        g = torch.Generator().manual_seed(1)
        sd[key] += scale * sd[key].std() * torch.randn(sd[key].shape, generator=g)
    save_checkpoint(ft, sd, cfg)
    return pre, ft


def order(results: dict) -> list[str]:
    return results["layers"]


def test_identical_checkpoints_give_one_everywhere_and_say_nothing_changed(tmp_path):
    pre, ft = make_pair(tmp_path, None)
    res = compare_checkpoints(pre, ft, **FAST)
    assert all(abs(v - 1) < 1e-6 for v in res["diagonal"].values())
    assert all(abs(v - 1) < 1e-6 for v in res["own_change"].values())
    assert res["summary"]["identical"] is True and res["summary"]["changed"] is False
    assert "identical" in res["summary"]["verdict"]


@pytest.mark.parametrize(
    ("key", "where"),
    [("blocks.2.mlp.fc1.weight", "blocks.2.mlp.fc1"), ("blocks.1.attn.proj.weight", "blocks.1.attn")],
)
def test_a_planted_change_is_found_where_it_was_planted(tmp_path, key, where):
    pre, ft = make_pair(tmp_path, key, scale=3.0)
    res = compare_checkpoints(pre, ft, **FAST)
    names = order(res)
    k = names.index(where)
    for name in names[:k]:  # upstream of the change: untouched
        assert abs(res["diagonal"][name] - 1) < 1e-6, name
    assert res["diagonal"][where] < 1 - 1e-4
    assert res["summary"]["first_changed"] == where
    assert res["summary"]["largest_own_change"] == where
    block = f"blocks.{where.split('.')[1]}"
    for name, value in res["own_change"].items():
        if name == where:
            assert value < 1 - 1e-4
        elif name == block:  # the block's own change contains its sublayer's
            assert value < 1 - 1e-5
        else:
            assert abs(value - 1) < 1e-6, name
    assert res["weights"]["relative_change"][where] > 0
    assert res["summary"]["identical"] is False


def test_a_frozen_fine_tune_with_a_new_head_is_reported(tmp_path):
    torch.manual_seed(0)
    model = VisionTransformer(CFG)
    pre, ft = tmp_path / "pre.pt", tmp_path / "ft.pt"
    save_checkpoint(pre, model, CFG)
    # a Lightning-style container: same encoder under model.encoder., plus a trained head
    sd = {f"model.encoder.{k}": v.clone() for k, v in model.state_dict().items()}
    sd["model.head.weight"] = torch.randn(5, CFG.embed_dim)
    torch.save({"state_dict": sd, "epoch": 3}, ft)
    res = compare_checkpoints(pre, ft, **FAST)
    assert res["summary"]["identical"] is True
    assert res["checkpoints"]["ft"]["prefix"].endswith("model.encoder.")
    from cka_geo.report import describe_checkpoints

    lines = describe_checkpoints(res)
    assert "encoder at 'state_dict.model.encoder.', 1 other key ignored" in lines[1]
    assert any("num_heads=2 taken from" in line for line in lines)


def test_results_record_every_setting_and_the_checkpoints(tmp_path):
    pre, ft = make_pair(tmp_path, "blocks.3.mlp.fc2.weight")
    res = compare_checkpoints(pre, ft, kernel="rbf", rbf_frac=0.8, **FAST)
    s = res["settings"]
    assert (s["kernel"], s["rbf_frac"], s["estimator"], s["pooling"], s["samples"], s["seed"]) == (
        "rbf", 0.8, "unbiased", "mean", 64, 0)
    assert res["checkpoints"]["pre"]["sha256"] != res["checkpoints"]["ft"]["sha256"]
    assert len(res["checkpoints"]["pre"]["sha256"]) == 64
    L = len(res["layers"])
    assert np.array(res["matrix"]).shape == (L, L)
    assert res["versions"]["torch"] == torch.__version__
    json.dumps(res, allow_nan=False)  # strict JSON


def test_biased_full_batch_and_pooling_options(tmp_path):
    pre, ft = make_pair(tmp_path, "blocks.0.mlp.fc1.weight")
    res = compare_checkpoints(pre, ft, estimator="biased", pooling="cls", samples=32, batch_size=8, bootstrap=0)
    assert res["settings"]["batches"] == 1
    assert res["summary"]["first_changed"] == "blocks.0.mlp.fc1"
    assert res["intervals"]["blocks.0.mlp.fc1"] is None


def test_user_array_data(tmp_path):
    pre, ft = make_pair(tmp_path, "blocks.1.mlp.fc1.weight")
    data = tmp_path / "probes.npy"
    np.save(data, np.random.default_rng(0).standard_normal((40, 13, 16, 16)).astype(np.float32))
    res = compare_checkpoints(pre, ft, options=CompareOptions(data=str(data), batch_size=8, bootstrap=100))
    assert res["settings"]["samples"] == 40
    assert res["summary"]["first_changed"] == "blocks.1.mlp.fc1"


def cli(args: list[str], capsys) -> tuple[int, str, str]:
    code = main(args)
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_prints_the_table_and_writes_json_and_csv(tmp_path, capsys):
    pre, ft = make_pair(tmp_path, "blocks.2.mlp.fc1.weight")
    out_dir = tmp_path / "out"
    code, out, err = cli([ "compare", str(pre), str(ft), "--samples", "64", "--batch-size", "16",
                           "--out", str(out_dir), "--no-figures"], capsys)
    assert code == 0, err
    assert "blocks.2.mlp.fc1" in out and "largest own change: blocks.2.mlp.fc1" in out
    lines = out.splitlines()
    assert lines[1].split() == ["block", "attn", "fc1", "fc2", "block"]
    saved = json.loads((out_dir / "results.json").read_text())
    assert saved["schema"] == "cka-geo/compare/v1"
    csv_rows = (out_dir / "results.csv").read_text().splitlines()
    assert len(csv_rows) == 1 + len(saved["layers"])


def one_line_error(code: int, err: str, want_code: int, pattern: str) -> None:
    assert code == want_code
    # the error is one line; the plan and progress lines ("cka-geo compare: ...") may precede it
    lines = [line for line in err.strip().splitlines() if not line.startswith("cka-geo compare: ")]
    assert len(lines) == 1, err
    assert lines[0].startswith("cka-geo: error: ") or lines[0].startswith("usage")
    assert pattern in lines[0], lines[0]


class _Evil:
    def __init__(self, target: str) -> None:
        self.target = target

    def __reduce__(self):
        return (Path.touch, (Path(self.target),))


def test_cli_errors_are_one_line_with_exit_codes_and_leave_no_output(tmp_path, capsys):
    pre, ft = make_pair(tmp_path, "blocks.2.mlp.fc1.weight")
    out_dir = tmp_path / "out"
    base = ["--samples", "32", "--batch-size", "16", "--out", str(out_dir), "--no-figures"]

    code, _, err = cli(["compare", str(tmp_path / "missing.pt"), str(ft), *base], capsys)
    one_line_error(code, err, 2, "missing.pt: no such file")

    evil = tmp_path / "evil.pt"
    marker = tmp_path / "pwned"
    with open(evil, "wb") as fh:
        pickle.dump({"state_dict": {"x": _Evil(str(marker))}}, fh)
    code, _, err = cli(["compare", str(pre), str(evil), *base], capsys)
    assert code == 1 and not marker.exists()
    assert "evil.pt" in err and len(err.strip().splitlines()) == 1

    other = tmp_path / "other.pt"
    wide = ViTConfig(img_size=16, patch_size=4, in_chans=13, embed_dim=48, depth=4, num_heads=2)
    save_checkpoint(other, VisionTransformer(wide), wide)
    code, _, err = cli(["compare", str(pre), str(other), *base], capsys)
    one_line_error(code, err, 1, "differ")

    wrong_bands = tmp_path / "rgb.npy"
    np.save(wrong_bands, np.zeros((8, 3, 16, 16), dtype=np.float32))
    code, _, err = cli(["compare", str(pre), str(ft), *base, "--data", str(wrong_bands)], capsys)
    one_line_error(code, err, 1, "3 bands, expected 13")

    few = tmp_path / "few.npy"
    np.save(few, np.random.default_rng(0).standard_normal((3, 13, 16, 16)).astype(np.float32))
    code, _, err = cli(["compare", str(pre), str(ft), *base[2:], "--data", str(few)], capsys)
    one_line_error(code, err, 1, "at least 4")

    code, _, err = cli(["compare", str(pre), str(ft), "--samples", "2", "--out", str(out_dir)], capsys)
    one_line_error(code, err, 2, "--samples must be at least 4")

    nan_data = tmp_path / "nan.npy"
    arr = np.random.default_rng(0).standard_normal((16, 13, 16, 16)).astype(np.float32)
    arr[3, 0, 0, 0] = np.nan
    np.save(nan_data, arr)
    code, _, err = cli(["compare", str(pre), str(ft), *base[2:], "--data", str(nan_data)], capsys)
    one_line_error(code, err, 1, "NaN")

    code, _, err = cli(["compare", str(pre), str(ft), *base, "--sublayers", "mlp"], capsys)
    assert code == 2 and "invalid choice: 'mlp'" in err

    assert not out_dir.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]


def test_nan_features_from_the_model_name_the_layer(tmp_path, capsys):
    pre, _ = make_pair(tmp_path, None)
    model = VisionTransformer(CFG)
    sd = model.state_dict()
    sd["blocks.1.mlp.fc2.bias"][0] = float("nan")
    ft = tmp_path / "nan.pt"
    save_checkpoint(ft, sd, CFG)
    code, _, err = cli(["compare", str(pre), str(ft), "--samples", "32", "--batch-size", "16",
                        "--out", str(tmp_path / "o"), "--no-figures"], capsys)
    one_line_error(code, err, 1, "'blocks.1.mlp.fc2' of model B has NaN or Inf")


def test_python_dash_m_is_the_console_script(tmp_path):
    pre, ft = make_pair(tmp_path, "blocks.3.mlp.fc1.weight")
    proc = subprocess.run(
        [sys.executable, "-m", "cka_geo", "compare", str(pre), str(ft), "--samples", "32", "--batch-size", "16",
         "--out", str(tmp_path / "o"), "--no-figures", "--format", "table"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "first to move: blocks.3.mlp.fc1" in proc.stdout
    # stderr: what was loaded, no progress bar when stderr is not a terminal
    assert "\r" not in proc.stderr and "img/s" not in proc.stderr
    assert f"pre: {pre}: timm ViT, 4 blocks, width 32, 13 bands, 16 px, patch 4; bare encoder" in proc.stderr


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def test_figures_are_written_and_the_json_round_trips_through_plot(tmp_path, capsys):
    pre, ft = make_pair(tmp_path, "blocks.2.mlp.fc1.weight")
    out_dir = tmp_path / "out"
    code, _, err = cli(["compare", str(pre), str(ft), "--samples", "32", "--batch-size", "16", "--out", str(out_dir)], capsys)
    assert code == 0, err
    figures = sorted(p.name for p in out_dir.glob("*.png"))
    assert figures == ["change_bars.png", "depth_profile.png", "heatmap.png"]
    sizes = {name: png_size(out_dir / name) for name in figures}
    assert all(w >= 600 and h >= 400 for w, h in sizes.values())
    redraw = tmp_path / "redraw"
    code, _out, err = cli(["plot", str(out_dir / "results.json"), "--out", str(redraw)], capsys)
    assert code == 0, err
    assert {name: png_size(redraw / name) for name in figures} == sizes


@pytest.mark.parametrize(("time_mode", "rows"), [("frames", 24 * 3), ("mean", 24)])
def test_time_series_data(tmp_path, time_mode, rows):
    pre, ft = make_pair(tmp_path, "blocks.1.mlp.fc1.weight")
    data = tmp_path / "series.npy"
    np.save(data, np.random.default_rng(0).standard_normal((24, 3, 13, 16, 16)).astype(np.float32))
    res = compare_checkpoints(pre, ft, data=str(data), batch_size=8, bootstrap=50, time_mode=time_mode)
    assert res["settings"]["samples"] == rows and res["settings"]["time_mode"] == time_mode
    assert res["summary"]["first_changed"] == "blocks.1.mlp.fc1"


def test_a_folder_of_mixed_sizes_and_a_short_last_batch(tmp_path, capsys):
    pre, ft = make_pair(tmp_path, "blocks.1.mlp.fc1.weight")
    folder = tmp_path / "tiles"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        np.save(folder / f"t{i}.npy", rng.standard_normal((13, 16, 16)).astype(np.float32))
    np.save(folder / "t9.npy", rng.standard_normal((13, 32, 32)).astype(np.float32))
    code, _, err = cli(["compare", str(pre), str(ft), "--data", str(folder), "--no-figures", "--out", str(tmp_path / "o")], capsys)
    one_line_error(code, err, 1, "t9.npy has shape (13, 32, 32) but")
    (folder / "t9.npy").unlink()
    code, out, err = cli(["compare", str(pre), str(ft), "--data", str(folder), "--batch-size", "4", "-q",
                          "--no-figures", "--format", "table"], capsys)
    assert code == 0 and "first to move: blocks.1.mlp.fc1" in out
    assert err == "cka-geo: warning: skipping a batch of 2 samples: the unbiased estimator needs at least 4\n"


def test_an_unexpected_exception_is_one_line_unless_debugging(tmp_path, capsys, monkeypatch):
    import cka_geo.commands.compare as command

    def boom(args):
        raise ValueError("something broke\nsecond line")

    monkeypatch.setattr(command, "run", boom)
    pre, ft = make_pair(tmp_path, None)
    code, _, err = cli(["compare", str(pre), str(ft)], capsys)
    assert code == 1
    assert err == ("cka-geo: internal error: ValueError: something broke "
                   "(set CKA_GEO_DEBUG=1 for the traceback, and please report it)\n")
    monkeypatch.setenv("CKA_GEO_DEBUG", "1")
    with pytest.raises(ValueError, match="something broke"):
        main(["compare", str(pre), str(ft)])
