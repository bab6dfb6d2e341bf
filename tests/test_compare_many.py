"""`cka-geo compare PRE FT1 FT2 ...`: one shared pretrained forward, results equal to separate runs."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest
import torch

from cka_geo.checkpoints import build_model, load_checkpoint, save_checkpoint
from cka_geo.cli import main
from cka_geo.compare import CompareOptions, compare_checkpoints, compare_many, run_many
from cka_geo.compare.probes import probe_batches
from cka_geo.features import resolve_sublayers
from cka_geo.runs import RUNS_CSV_COLUMNS, run_names
from cka_geo.vit import VisionTransformer, ViTConfig

CFG = ViTConfig(img_size=16, patch_size=4, in_chans=13, embed_dim=32, depth=3, num_heads=2)
pytestmark = pytest.mark.filterwarnings("ignore:only 4 batches feed the bootstrap:RuntimeWarning")
FAST = {"samples": 48, "batch_size": 12, "bootstrap": 50, "progress": False}


def _planted(model: VisionTransformer, key: str, seed: int) -> dict[str, torch.Tensor]:
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(seed)
    sd[key] += 3.0 * sd[key].std() * torch.randn(sd[key].shape, generator=g)
    return sd


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """pre.pt, a/ft.pt (fc1 of block 1 changed), b/ft.pt (attn of block 2), c.safetensors (block 0 fc2)."""
    root = tmp_path_factory.mktemp("many")
    torch.manual_seed(0)
    model = VisionTransformer(CFG)
    out = {"pre": root / "pre.pt", "a": root / "a" / "ft.pt", "b": root / "b" / "ft.pt", "c": root / "c.safetensors"}
    out["a"].parent.mkdir()
    out["b"].parent.mkdir()
    save_checkpoint(out["pre"], model, CFG)
    save_checkpoint(out["a"], _planted(model, "blocks.1.mlp.fc1.weight", 1), CFG)
    save_checkpoint(out["b"], _planted(model, "blocks.2.attn.proj.weight", 2), CFG)
    save_checkpoint(out["c"], _planted(model, "blocks.0.mlp.fc2.weight", 3), CFG)
    return out


def _without_time(res: dict) -> str:
    """Every entry but the clock's: the creation time and the seconds per stage."""
    out = {k: v for k, v in res.items() if k != "created"}
    out["settings"] = {k: v for k, v in res["settings"].items() if k != "seconds"}
    return json.dumps(out, sort_keys=True, allow_nan=False)


@pytest.mark.parametrize("extra", [{}, {"own_change": False, "estimator": "biased", "bootstrap": 0, "kernel": "rbf"}])
def test_each_run_equals_a_separate_two_checkpoint_run_bit_for_bit(files, extra):
    fts = [files["a"], files["b"], files["c"]]
    opts = {**FAST, **extra}
    many = compare_many(files["pre"], fts, **opts)
    assert len(many) == 3
    for ft, res in zip(fts, many, strict=True):
        alone = compare_checkpoints(files["pre"], ft, **opts)
        assert _without_time(res) == _without_time(alone)  # every value, interval and record
    firsts = [r["summary"]["first_changed"] for r in many]
    if not extra:  # the planted changes, each found in its own run
        assert firsts == ["blocks.1.mlp.fc1", "blocks.2.attn", "blocks.0.mlp.fc2"]


def test_the_pretrained_model_runs_once_per_batch_whatever_the_number_of_runs(files):
    pre = build_model(load_checkpoint(files["pre"]))
    fts = [build_model(load_checkpoint(files[k])) for k in ("a", "b", "c")]
    calls = {"pre": 0, "ft": [0, 0, 0]}

    def count_pre(*_: object) -> None:
        calls["pre"] += 1

    pre.patch_embed.register_forward_hook(count_pre)
    for k, m in enumerate(fts):
        m.patch_embed.register_forward_hook(lambda *_, k=k: calls["ft"].__setitem__(k, calls["ft"][k] + 1))
    opts = CompareOptions(**FAST)
    names = resolve_sublayers(pre, kinds=opts.sublayers)
    batches, n, _, _ = probe_batches(opts, 13, 16)
    results = run_many(pre, fts, names, batches, opts, n)
    assert len(results) == 3
    assert calls == {"pre": 4, "ft": [4, 4, 4]}  # 48 images in batches of 12: 4, not 4 x 3
    assert all(r.samples == 48 for r in results)


def test_run_names_come_from_the_files_and_collisions_are_resolved():
    assert run_names(["x/ft_lr1e-4.safetensors", "y/ft_lr1e-3.pt"]) == ["ft_lr1e-4", "ft_lr1e-3"]
    assert run_names(["a/last.ckpt", "b/last.ckpt", "c.pt"]) == ["a-last", "b-last", "c"]
    assert run_names(["a/ft.pt", "a/ft.pt", "a/ft.pt"]) == ["a-ft", "a-ft-2", "a-ft-3"]
    assert run_names(["ft.pt", "ft.pth"]) == ["ft", "ft-2"]  # no parent folder to tell them apart
    assert run_names(["runs/my model (v2).tar.pt", {"w": 1}]) == ["my_model_v2", "run2"]
    assert run_names(["a/b.c.pt", "b.c"]) == ["a-b.c", "b.c"]  # only the one in a folder is prefixed


def test_the_cli_writes_one_folder_per_run_a_tidy_csv_and_a_verdict_line_each(files, tmp_path, capsys):
    out = tmp_path / "out"
    fts = [files["a"], files["b"]]
    code = main(["compare", str(files["pre"]), *map(str, fts), "--samples", "48", "--batch-size", "12",
                 "--bootstrap", "50", "--out", str(out), "--no-figures", "-q"])
    stdout, err = capsys.readouterr()
    assert code == 0, err
    assert stdout.splitlines() == [
        "a-ft  " + json.loads((out / "runs/a-ft/results.json").read_text())["summary"]["verdict"],
        "b-ft  " + json.loads((out / "runs/b-ft/results.json").read_text())["summary"]["verdict"],
    ]
    assert sorted(p.name for p in out.iterdir()) == ["runs", "runs.csv", "runs.json"]
    rows = list(csv.DictReader(io.StringIO((out / "runs.csv").read_text())))
    layers = json.loads((out / "runs/a-ft/results.json").read_text())["layers"]
    assert tuple(rows[0]) == RUNS_CSV_COLUMNS and RUNS_CSV_COLUMNS[0] == "run"
    assert len(rows) == 2 * len(layers) == 2 * 12
    assert [r["run"] for r in rows] == ["a-ft"] * 12 + ["b-ft"] * 12
    # the tidy rows are the runs' own CSV rows
    for name in ("a-ft", "b-ft"):
        own = list(csv.DictReader(io.StringIO((out / f"runs/{name}/results.csv").read_text())))
        assert [{k: v for k, v in r.items() if k != "run"} for r in rows if r["run"] == name] == own
    index = json.loads((out / "runs.json").read_text())
    assert index["schema"] == "cka-geo/compare-runs/v1"
    assert [r["results"] for r in index["runs"]] == ["runs/a-ft/results.json", "runs/b-ft/results.json"]
    assert index["runs"][1]["ft"] == str(files["b"])


def test_the_multi_run_figure_is_drawn_with_a_line_per_run(files, tmp_path):
    from cka_geo.plotting.runs import draw_runs_depth

    results = compare_many(files["pre"], [files["a"], files["b"], files["c"]], **FAST)
    fig = draw_runs_depth(["a", "b", "c"], results)
    axes = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title(loc="left").split(":")[0] for ax in axes] == ["attn", "mlp.fc1", "mlp.fc2", "block out"]
    assert all(len(ax.get_lines()) == 3 for ax in axes)
    fc1 = axes[1].get_lines()[0]  # run a: 1 − CKA at blocks.1.mlp.fc1 is its largest fc1 change
    assert list(fc1.get_xdata()) == [0, 1, 2] and max(fc1.get_ydata()) == fc1.get_ydata()[1] > 1e-4
    footer = fig._supxlabel.get_text().replace("\n", " ")
    assert "pretrained: pre.pt" in footer and "c (c.safetensors)" in footer and "n = 48 samples" in footer


def test_a_later_failure_leaves_the_earlier_output_whole(files, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    args = ["compare", str(files["pre"]), str(files["a"]), str(files["c"]), "--samples", "16", "--batch-size",
            "8", "--bootstrap", "0", "--sublayers", "fc1", "block", "--out", str(out), "--no-figures", "-q"]
    assert main(args) == 0
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    import cka_geo.report as report

    real = report.write_results
    seen: list[Path] = []

    def fail_on_second(results, out_dir, formats=("json", "csv")):
        seen.append(out_dir)
        if len(seen) == 2:
            raise OSError(28, "No space left on device")
        return real(results, out_dir, formats)

    monkeypatch.setattr(report, "write_results", fail_on_second)
    assert main(args) == 1
    assert "No space left" in capsys.readouterr().err
    after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before  # not the first run's new files, nor a missing runs.csv
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no hidden leftovers


def test_a_fine_tune_of_another_architecture_is_refused_with_a_hint_to_cross(files, tmp_path, capsys):
    wide = ViTConfig(img_size=16, patch_size=4, in_chans=13, embed_dim=48, depth=3, num_heads=2)
    other = tmp_path / "wide.pt"
    save_checkpoint(other, VisionTransformer(wide), wide)
    out = tmp_path / "out"
    code = main(["compare", str(files["pre"]), str(files["a"]), str(other), "--samples", "48", "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1
    assert "wide.pt" in err[0] and "use --cross" in err[0]
    assert not out.exists()
    code = main(["compare", str(files["pre"]), str(files["a"]), str(files["b"]), "--cross", "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err == ["cka-geo: error: --cross compares two checkpoints, PRE and one other; got 3"]


def test_the_memory_check_counts_every_run(files, monkeypatch):
    import cka_geo.budget as budget
    from cka_geo.errors import UsageError

    pre = build_model(load_checkpoint(files["pre"]))
    opts = CompareOptions(samples=4096, batch_size=16, bootstrap=0)
    names = resolve_sublayers(pre, kinds=opts.sublayers)
    needs: dict[int, int] = {}

    def record(work, device, what, available=None):
        needs[work.runs] = sum(work.needs().values())

    monkeypatch.setattr("cka_geo.compare.run.check_fits", record)
    from cka_geo.compare.run import check_memory

    for runs in (1, 8):
        check_memory(pre, names, (13, 16, 16), opts, 4096, torch.device("cpu"), runs=runs)
    assert needs[8] > 5 * needs[1]  # the per-batch terms of each run are kept
    monkeypatch.setattr("cka_geo.compare.run.check_fits", budget.check_fits)
    monkeypatch.setattr(budget, "available_bytes", lambda device: (needs[1] + needs[8]) // 2)
    check_memory(pre, names, (13, 16, 16), opts, 4096, torch.device("cpu"), runs=1)
    with pytest.raises(UsageError, match="for 8 fine-tuned checkpoints need about"):
        check_memory(pre, names, (13, 16, 16), opts, 4096, torch.device("cpu"), runs=8)
