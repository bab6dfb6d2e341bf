"""CLI: pretrain -> finetune -> evaluate on the embedded tiles, and one-line usage errors."""

from __future__ import annotations

import json

import pytest

from cka_geo.cli import main

TINY = ["--depth", "2", "--embed-dim", "32", "--heads", "2", "--img-size", "16", "--threads", "2"]


def _exit_code(argv: list[str]) -> int:
    """main's return value, or the code of the SystemExit argparse raises."""
    try:
        return main(argv)
    except SystemExit as exc:
        return int(exc.code or 0)


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["pretrain"], "--out"),
        (["pretrain", "--out", "x", "--epochs", "0"], "--epochs"),
        (["pretrain", "--out", "x", "--objective", "byol"], "--objective"),
        (["pretrain", "--out", "x", "--mask-ratio", "1.5"], "--mask-ratio"),
        (["finetune"], "checkpoint"),
        (["finetune", "p.pt", "--out", "o", "--label-fraction", "0"], "--label-fraction"),
        (["finetune", "p.pt", "--out", "o", "--decoder", "fcn"], "--decoder"),
        (["finetune", "p.pt", "--out", "o", "--adapt", "lora"], "--adapt"),
        (["finetune", "p.pt", "--out", "o", "--taps", "3,x"], "--taps"),
        (["finetune", "missing.pt", "--out", "o"], "missing.pt"),
        (["finetune", "missing.pt", "--out", "o", "--adapt", "last-k"], "--last-k"),
        (["evaluate", "missing.pt"], "missing.pt"),
        (["evaluate", "ft.pt", "--split", "holdout"], "--split"),
        (["demo", "--threads", "0"], "--threads"),
        (["demo", "--samples", "many"], "--samples"),
        (["pretrain", "--out", "x", "--lr", "-1"], "--lr"),
    ],
)
def test_usage_errors_exit_2_with_one_line(argv, fragment, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert _exit_code(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert fragment in err


def test_pretrain_finetune_evaluate_roundtrip(tmp_path, capsys):
    pre_dir, ft_dir = tmp_path / "pre", tmp_path / "ft"
    assert main(["pretrain", "--out", str(pre_dir), "--epochs", "1", "--batch-size", "64", "--stride", "32", *TINY]) == 0
    assert (pre_dir / "pretrained.pt").is_file() and (pre_dir / "metrics.csv").is_file()
    assert main(["finetune", str(pre_dir / "pretrained.pt"), "--out", str(ft_dir), "--epochs", "1",
                 "--adapt", "last-k", "--last-k", "1", "--label-fraction", "0.2", "--stride", "32",
                 "--threads", "2"]) == 0
    capsys.readouterr()
    assert main(["evaluate", str(ft_dir), "--split", "val", "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["task"] == "segmentation" and 0 <= metrics["miou"] <= 1
    saved = json.loads((ft_dir / "eval.json").read_text())
    assert metrics["miou"] == pytest.approx(saved["metrics"]["val"]["miou"], abs=1e-12)

    from cka_geo.checkpoints import load_checkpoint

    pre, ft = load_checkpoint(ft_dir / "pre.pt"), load_checkpoint(ft_dir / "ft.pt")
    assert pre.state_dict.keys() == ft.state_dict.keys()
    changed = {k for k in pre.state_dict if not (pre.state_dict[k] == ft.state_dict[k]).all()}
    assert changed and all(k.startswith("blocks.1.") for k in changed)  # last-k = 1 of 2 blocks
    assert "task_head" in ft.extra and not ft.ignored


@pytest.mark.slow
def test_demo_quick_end_to_end(tmp_path, capsys):
    assert main(["demo", "--quick", "--out", str(tmp_path / "d"), "--threads", "2"]) == 0
    out = capsys.readouterr().out
    assert "most changed" in out and "Run time" in out and "CPU time" in out
    summary = json.loads((tmp_path / "d/summary.json").read_text())
    for decoder in ("linear", "upernet"):
        entry = summary["settings"][decoder]
        assert entry["summary"]["changed"]  # full fine-tuning moved the encoder
        assert (tmp_path / f"d/compare_{decoder}/results.json").is_file()
    pytest.importorskip("matplotlib")
    assert (tmp_path / "d/figures/demo_depth_profile.png").stat().st_size > 1000
    assert (tmp_path / "d/compare_upernet/heatmap.png").is_file()


def test_cli_resume_matches_uninterrupted(tmp_path, capsys):
    common = ["--epochs", "2", "--batch-size", "16", "--stride", "64", *TINY]
    assert main(["pretrain", "--out", str(tmp_path / "full"), *common]) == 0
    assert main(["pretrain", "--out", str(tmp_path / "cut"), "--stop-after-epoch", "1", *common]) == 0
    assert "resume" in capsys.readouterr().out
    assert not (tmp_path / "cut/pretrained.pt").exists()
    assert main(["pretrain", "--out", str(tmp_path / "cut"), "--resume", *common]) == 0
    import torch

    a = torch.load(tmp_path / "full/pretrained.pt", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "cut/pretrained.pt", weights_only=True)["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_finetune_on_the_tiles_at_another_image_size_and_evaluate_at_it(tmp_path, capsys):
    """--image-size on the embedded tiles: trained at 32 px (not the checkpoint's 48), and evaluate
    reads the tiles' size from ft.pt: its metrics are the run's own."""
    import torch

    from cka_geo.checkpoints import load_checkpoint, save_checkpoint
    from cka_geo.models.vit import VisionTransformer, ViTConfig

    torch.manual_seed(0)
    cfg = ViTConfig(img_size=48, patch_size=8, in_chans=3, embed_dim=16, depth=2, num_heads=2)
    save_checkpoint(tmp_path / "rgb.pt", VisionTransformer(cfg), cfg)
    out = tmp_path / "ft"
    base = ["finetune", str(tmp_path / "rgb.pt"), "--epochs", "1", "--stride", "32", "--threads", "1", "--no-progress"]
    assert main([*base, "--out", str(out), "--image-size", "32"]) == 0
    assert "pos_embed resampled from a 6x6 to a 4x4 patch grid" in capsys.readouterr().err
    assert load_checkpoint(out / "ft.pt").extra["tiles"] == {"image_size": [32, 32]}
    assert main(["evaluate", str(out), "--split", "test", "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    saved = json.loads((out / "eval.json").read_text())["metrics"]["test"]
    assert metrics["miou"] == pytest.approx(saved["miou"], abs=1e-12)
    assert metrics["loss"] == pytest.approx(saved["loss"], rel=1e-6)  # float32 sums over other batches
    for size, code, fragment in ((["36"], 1, "--image-size: 36x36 is not a multiple of the model's patch size 8"),
                                 (["32", "40"], 2, "the embedded tiles are square")):  # 1: data, as compare
        bad = tmp_path / f"bad{size[0]}"
        assert _exit_code([*base, "--out", str(bad), "--image-size", *size]) == code
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and fragment in err, err
        assert not bad.exists()
