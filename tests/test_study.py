"""cka-geo study: the tiny example end to end, its aggregates recomputed independently, resume, config errors."""

from __future__ import annotations

import csv
import json
import math
import os
import re
import shutil
from collections import defaultdict
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cka_geo.cli import main
from cka_geo.errors import UsageError
from cka_geo.study.aggregate import t_interval
from cka_geo.study.config import load_config, parse_config
from cka_geo.study.grid import expand, parse_shard, shard

stats = pytest.importorskip("scipy.stats")
pytest.importorskip("matplotlib")

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "study-tiny.toml"
KINDS = ("attn", "fc1", "act", "fc2")
NOISE = 1e-6  # cka_geo.compare.UNCHANGED_TOL, the verdict's noise level


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(encoding="utf-8") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    out = tmp_path_factory.mktemp("study") / "tiny"
    assert main(["study", str(EXAMPLE), "--out", str(out), "--threads", "1", "--device", "cpu"]) == 0
    return out


@pytest.fixture
def copy(study, tmp_path):
    dest = tmp_path / "tiny"
    shutil.copytree(study, dest)
    return dest


@pytest.fixture
def finetunes(monkeypatch):
    """Counts the fine-tunes run (every cell's first step)."""
    import cka_geo.train.runs as runs

    calls: list[str] = []
    real = runs.finetune

    def counting(*args, **kwargs):
        calls.append(str(args[2]))
        return real(*args, **kwargs)

    monkeypatch.setattr(runs, "finetune", counting)
    return calls


def test_table_has_one_row_per_cell_with_its_evaluated_metric(study):
    cfg = load_config(EXAMPLE)
    ids = [c.id for c in expand(cfg)]
    assert len(ids) == 2 * 1 * 2 * 1 * 2 * 2
    rows = _rows(study / "aggregate" / "cells.csv")
    assert [r["cell"] for r in rows] == ids
    for r in rows:
        ev = json.loads((study / "cells" / r["cell"] / "evaluate.json").read_text())
        in_memory = json.loads((study / "cells" / r["cell"] / "finetune" / "eval.json").read_text())["metrics"]["test"]
        assert ev["miou"] == pytest.approx(in_memory["miou"], abs=1e-6)  # the saved ft.pt reproduces the trained model
        assert float(r["primary"]) == pytest.approx(ev["miou"], rel=1e-5)
        assert float(r["train_samples"]) > 0
    small = {r["cell"]: int(r["train_samples"]) for r in rows}
    assert all(small[i] < small[i.replace("lf0.25", "lf1")] for i in ids if "lf0.25" in i)
    for stem in ("metrics", "localisation", "probing", "fc1_share"):
        assert (study / "aggregate" / "figures" / f"{stem}.png").stat().st_size > 1000
    summary = json.loads((study / "aggregate" / "summary.json").read_text())
    assert summary["cells"] == len(ids) and "Student-t" in summary["interval"]


def test_kendall_tau_is_scipys_on_the_table(study):
    means: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in _rows(study / "aggregate" / "cells.csv"):
        means[r["setting"]][r["encoder"]].append(float(r["primary"]))
    taus = _rows(study / "aggregate" / "kendall.csv")
    assert len(taus) == len(means) * (len(means) - 1) // 2
    for row in taus:
        a, b = means[row["setting_a"]], means[row["setting_b"]]
        encs = sorted(a)
        want = stats.kendalltau([sum(a[e]) / len(a[e]) for e in encs], [sum(b[e]) / len(b[e]) for e in encs])
        assert -1 <= float(row["tau"]) <= 1
        assert float(row["tau"]) == pytest.approx(want.statistic, abs=1e-9)
    for row in _rows(study / "aggregate" / "rankings.csv"):
        enc = means[row["setting"]]
        mine = sum(enc[row["encoder"]]) / len(enc[row["encoder"]])
        assert int(row["rank"]) == 1 + sum(sum(v) / len(v) > mine for v in enc.values())


def _profiles(results: dict, key: str) -> dict[str, list[float]]:
    out: dict[str, list[float]] = defaultdict(list)
    for name, v in (results.get(key) or {}).items():
        parts = name.split(".")
        kind = "block" if len(parts) == 2 else parts[-1]
        if v is not None:
            out[kind].append(1 - v)
    return out


def test_fc1_share_matches_a_recount_of_the_cells_results(study):
    counts = {view: defaultdict(int) for view in ("same", "own")}
    for cell in expand(load_config(EXAMPLE)):
        res = json.loads((study / "cells" / cell.id / "compare" / "results.json").read_text())
        for view, key in (("same", "diagonal"), ("own", "own_change")):
            prof = _profiles(res, key)
            means = {k: sum(v) / len(v) for k, v in prof.items() if k in KINDS and v}
            if max(means.values()) <= NOISE:
                counts[view]["unchanged"] += 1
                continue
            counts[view][max(means, key=lambda k: means[k])] += 1
    rows = {r["view"]: r for r in _rows(study / "aggregate" / "fc1_share.csv")
            if r["encoder"] == "all" and r["adaptation"] == "all"}
    for view, c in counts.items():
        counted = sum(v for k, v in c.items() if k != "unchanged")
        assert int(rows[view]["counted"]) == counted
        assert int(rows[view]["most_fc1"]) == c["fc1"] and int(rows[view]["most_attn"]) == c["attn"]
        assert float(rows[view]["fc1_share"]) == pytest.approx(c["fc1"] / counted)


def test_localisation_interval_is_the_t_interval_over_seeds(study):
    rows = [r for r in _rows(study / "aggregate" / "localisation.csv") if r["level"] == "setting"]
    cells = expand(load_config(EXAMPLE))
    row = next(r for r in rows if r["kind"] == "fc1" and r["block"] == "1" and r["view"] == "own")
    vals = []
    for c in cells:
        if c.encoder.name == row["encoder"] and c.setting == row["setting"]:
            res = json.loads((study / "cells" / c.id / "compare" / "results.json").read_text())
            vals.append(1 - res["own_change"]["blocks.1.mlp.fc1"])
    assert len(vals) == 2
    m = sum(vals) / 2
    lo, hi = stats.t.interval(0.95, 1, loc=m, scale=stats.sem(vals))
    assert float(row["change"]) == pytest.approx(m, rel=1e-4)
    assert float(row["ci_lo"]) == pytest.approx(lo, rel=1e-4, abs=1e-9)
    assert float(row["ci_hi"]) == pytest.approx(hi, rel=1e-4, abs=1e-9)


@settings(max_examples=30, deadline=None)
@given(st.lists(st.floats(-10, 10, allow_nan=False), min_size=2, max_size=12))
def test_t_interval_equals_scipys(values):
    m, lo, hi = t_interval(values)
    sem = stats.sem(values)
    if sem == 0 or not math.isfinite(sem):
        assert lo == pytest.approx(m) and hi == pytest.approx(m)
        return
    want = stats.t.interval(0.95, len(values) - 1, loc=sum(values) / len(values), scale=sem)
    assert lo == pytest.approx(want[0], abs=1e-9) and hi == pytest.approx(want[1], abs=1e-9)


def test_rerun_skips_every_finished_cell(copy, finetunes, capsys):
    ft = sorted(copy.glob("cells/*/finetune/ft.pt"))
    before = [p.stat().st_mtime_ns for p in ft]
    assert main(["study", str(EXAMPLE), "--out", str(copy), "--device", "cpu", "--no-figures"]) == 0
    assert finetunes == []
    assert [p.stat().st_mtime_ns for p in ft] == before
    counts = json.loads(capsys.readouterr().err.strip().splitlines()[-1])
    assert counts["skipped"] == 16 and counts["run"] == 0


def test_broken_and_killed_cells_are_redone_and_only_they(copy, finetunes, capsys):
    ids = [c.id for c in expand(load_config(EXAMPLE))]
    broken, killed = ids[3], ids[10]
    (copy / "cells" / broken / "compare" / "results.json").unlink()  # a cell left incomplete
    shutil.rmtree(copy / "cells" / killed)  # a cell killed mid-run: only its temporary is left
    stale = copy / "cells" / f".{killed}.cka-geo-999999999-abc.tmp"
    stale.mkdir()
    (stale / "junk").write_text("half")
    others = {i: (copy / "cells" / i / "cell.json").stat().st_mtime_ns for i in ids if i not in (broken, killed)}
    assert main(["study", str(EXAMPLE), "--out", str(copy), "--device", "cpu", "--no-figures"]) == 0
    assert sorted(Path(p).name.split(".cka-geo")[0].lstrip(".") for p in (Path(c).parent for c in finetunes)) == sorted(
        [broken, killed])
    assert not stale.exists()
    assert (copy / "cells" / broken / "compare" / "results.json").is_file()
    assert {i: (copy / "cells" / i / "cell.json").stat().st_mtime_ns for i in others} == others
    counts = json.loads(capsys.readouterr().err.strip().splitlines()[-1])
    assert (counts["run"], counts["redone"], counts["skipped"]) == (2, 1, 14)


def test_changed_settings_are_refused_naming_the_key(copy, tmp_path, capsys):
    cfg = tmp_path / "changed.toml"
    cfg.write_text(EXAMPLE.read_text().replace("epochs = 1\n", "epochs = 2\n", 1))
    assert main(["study", str(cfg), "--out", str(copy), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "train.epochs 1, now 2" in err


@pytest.mark.parametrize(("edit", "named"), [
    (("[train]", "[train]\nepoch = 3"), "train.epoch: unknown key"),
    (("[study]", "[study]\ncolour = 1"), "study.colour: unknown key"),
    (('adaptations = ["full", "last-1"]', 'adaptations = ["full", "last"]'), "study.adaptations[1]"),
    (("label_fractions = [0.25, 1.0]", "label_fractions = [0, 1.0]"), "study.label_fractions[0]"),
    (('checkpoint = "builtin:mae"', 'checkpoint = "builtin:dino"'), "encoders.mae.checkpoint"),
    (('task = "segmentation"', 'task = "detection"'), "tasks.water.task"),
    (("cv_folds = 3", "cv_folds = 1"), "probe.cv_folds"),
    (("seeds = [0, 1]", "seeds = [0, 0]"), "study.seeds"),
])
def test_a_bad_config_gives_one_line_naming_the_key(edit, named, tmp_path, capsys):
    text = EXAMPLE.read_text()
    assert edit[0] in text
    bad = tmp_path / "bad.toml"
    bad.write_text(text.replace(edit[0], edit[1], 1))
    with pytest.raises(UsageError, match=named.replace("[", r"\[").replace("]", r"\]")):
        load_config(bad)
    assert main(["study", str(bad), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and named in err and str(bad) in err
    assert not (tmp_path / "out").exists()


def test_path_encoders_decoders_and_shards():
    text = """
[study]
decoders = ["linear", "upernet"]
adaptations = ["frozen", "last-2"]
seeds = [3, 4, 5]
[encoders.a]
checkpoint = "ckpts/a.pt"
[encoders.b]
checkpoint = "builtin:random"
depth = 4
[tasks.water]
task = "segmentation"
[tasks.cover]
task = "classification"
"""
    cfg = parse_config(text, "/studies/s.toml")
    assert cfg.encoders[0].checkpoint == "/studies/ckpts/a.pt" and cfg.encoders[1].builtin["depth"] == 4
    cells = expand(cfg)
    # decoders apply to segmentation only: 2 encoders x (2 + 1 decoders) x 2 adaptations x 3 seeds
    assert len(cells) == 2 * 3 * 2 * 3 and len({c.id for c in cells}) == len(cells)
    assert [c.id for c in cells] == [c.id for c in expand(parse_config(text, "/studies/s.toml"))]
    assert {c.decoder for c in cells if c.task.task == "classification"} == {"linear"}
    assert {c.mode for c in cells} == {("frozen", 0), ("last-k", 2)}
    parts = [shard(cells, i, 4) for i in range(4)]
    assert sorted(c.id for p in parts for c in p) == sorted(c.id for c in cells)
    assert all(not {c.id for c in parts[i]} & {c.id for c in parts[j]} for i in range(4) for j in range(i))
    assert parse_shard("1/4") == (1, 4)
    for bad in ("4/4", "-1/2", "1", "a/b"):
        with pytest.raises(UsageError, match="--shard"):
            parse_shard(bad)
    with pytest.raises(UsageError, match=r"encoders.a.depth: only builtin"):
        parse_config(text.replace('checkpoint = "ckpts/a.pt"', 'checkpoint = "ckpts/a.pt"\ndepth = 2'), "s.toml")


def test_a_foreign_folder_and_a_missing_checkpoint_are_refused(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "thesis.tex").write_text("mine")
    assert main(["study", str(EXAMPLE), "--out", str(out)]) == 2
    assert "thesis.tex" in capsys.readouterr().err
    assert os.listdir(out) == ["thesis.tex"]
    cfg = tmp_path / "s.toml"
    cfg.write_text('[encoders.x]\ncheckpoint = "nope.pt"\n[tasks.t]\ntask = "classification"\n')
    assert main(["study", str(cfg), "--out", str(tmp_path / "o2"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "encoders.x.checkpoint" in err and "nope.pt" in err


MINI = """
[study]
seeds = [0, 1]
adaptations = ["full", "frozen"]
[train]
epochs = 1
stride = 32
[compare]
samples = 32
batch_size = 8
bootstrap = 0
[probe]
enabled = false
[encoders.r]
checkpoint = "builtin:random"
depth = 1
embed_dim = 16
patch_size = 8
[tasks.cover]
task = "classification"
"""


def test_shards_split_the_cells_and_the_last_one_aggregates_frozen_cells_left_out(tmp_path, capsys):
    cfg = tmp_path / "mini.toml"
    cfg.write_text(MINI)
    out = tmp_path / "mini"
    assert main(["study", str(cfg), "--out", str(out), "--shard", "1/2", "--device", "cpu", "--no-figures"]) == 0
    assert "2 of 4 cells finished" in capsys.readouterr().out
    assert sorted(os.listdir(out / "cells")) == ["r__cover__lf1__linear__frozen__s1", "r__cover__lf1__linear__full__s1"]
    assert not (out / "aggregate").exists()
    assert main(["study", str(cfg), "--out", str(out), "--shard", "0/2", "--device", "cpu", "--no-figures"]) == 0
    assert capsys.readouterr().out.strip() == str(out / "aggregate")
    rows = {r["view"]: r for r in _rows(out / "aggregate" / "fc1_share.csv")
            if r["encoder"] == "all" and r["adaptation"] == "all"}
    for view in ("same", "own"):  # the frozen encoder is bit-identical to its start: no most changed kind
        assert (rows[view]["counted"], rows[view]["unchanged"]) == ("2", "2")
    frozen = [r for r in _rows(out / "aggregate" / "cells.csv") if r["adaptation"] == "frozen"]
    assert all(r["most_changed_kind_same"] == "" and float(r["mean_change_fc1_same"]) == 0 for r in frozen)


def test_a_task_on_a_users_class_folders_trains_there_and_compares_on_its_test_split(tmp_path):
    """A ``data`` task: finetune --data's rules, and compare probes from that data's test split."""
    import numpy as np

    rng = np.random.default_rng(0)
    root = tmp_path / "eurosat"
    for c, name in enumerate(("forest", "sea")):
        (root / name).mkdir(parents=True)
        for i in range(12):
            img = rng.normal(0.0, 1.0, (13, 32, 32)).astype(np.float32) + 2.0 * c
            np.save(root / name / f"{i}.npy", img)
    cfg = tmp_path / "s.toml"
    cfg.write_text(MINI.replace('[tasks.cover]\ntask = "classification"',
                                f'[tasks.mine]\ntask = "classification"\ndata = "{root}"')
                       .replace('seeds = [0, 1]', 'seeds = [0]').replace('"full", "frozen"', '"full"'))
    out = tmp_path / "o"
    assert main(["study", str(cfg), "--out", str(out), "--threads", "1", "--device", "cpu", "--no-figures"]) == 0
    (cell,) = (out / "cells").iterdir()
    info = json.loads((cell / "cell.json").read_text())
    res = json.loads((cell / "compare" / "results.json").read_text())
    assert info["primary_metric"] == "accuracy" and 0.0 <= info["test"]["accuracy"] <= 1.0
    assert res["settings"]["normalize"]["name"] == "none"  # the split's images, already normalised
    assert "probes.npy" in res["settings"]["data"]
    assert 3 <= res["settings"]["samples"] < 24  # the held-out test images only (seeded split)
    assert not (cell / "probes.npy").exists()
    bad = tmp_path / "bad.toml"
    bad.write_text(MINI.replace('task = "classification"', 'task = "multilabel"'))
    assert main(["study", str(bad), "--out", str(tmp_path / "o3")]) == 2


def test_a_checkpoint_encoder_at_another_image_size_with_its_own_lr(tmp_path, capsys):
    """``image_size`` resamples a file encoder's pos_embed for the tiles; compare and probe see that size."""
    import torch

    from cka_geo.checkpoints import save_checkpoint
    from cka_geo.models.vit import VisionTransformer, ViTConfig

    torch.manual_seed(0)
    vcfg = ViTConfig(img_size=48, patch_size=8, in_chans=3, embed_dim=16, depth=2, num_heads=2)
    save_checkpoint(tmp_path / "rgb.pt", VisionTransformer(vcfg), vcfg)
    cfg = tmp_path / "s.toml"
    cfg.write_text(MINI.replace('checkpoint = "builtin:random"\ndepth = 1\nembed_dim = 16\npatch_size = 8',
                                'checkpoint = "rgb.pt"\nimage_size = 32\nfinetune_lr = 0.003')
                       .replace("seeds = [0, 1]", "seeds = [0]").replace('"full", "frozen"', '"full"')
                       .replace("enabled = false", "enabled = true\ncv_folds = 2")
                       .replace("epochs = 1", "epochs = 1\nwarmup_steps = 1"))
    out = tmp_path / "o"
    assert main(["study", str(cfg), "--out", str(out), "--threads", "1", "--device", "cpu", "--no-figures"]) == 0
    (cell,) = (out / "cells").iterdir()
    res = json.loads((cell / "compare" / "results.json").read_text())
    assert res["settings"]["image_size"] == [32, 32]  # not the checkpoint's 48
    assert res["settings"]["normalize"]["name"] == "scene"  # the tiles' z-scoring, not imagenet for 3 bands
    assert res["settings"]["pos_embed_resample"]
    probe = json.loads((cell / "probe" / "probe.json").read_text())
    assert probe["extra"]["tile_size"] == 32
    assert probe["extra"]["checkpoint"] == str(cell / "finetune" / "ft.pt")  # where it is, not the temporary
    enc_probe = json.loads((out / "encoders" / "r" / "probe" / "probe.json").read_text())
    assert enc_probe["extra"]["tile_size"] == 32
    steps = json.loads((cell / "finetune" / "metrics.json").read_text())["steps"]
    assert max(st["lr"] for st in steps) == pytest.approx(0.003)  # the peak of warmup and schedule: finetune_lr
    assert not (cell / "finetune" / "checkpoints").exists()  # a finished cell keeps pre.pt and ft.pt only
    bad = tmp_path / "bad.toml"
    for edit, named in (("image_size = 32", "image_size = 200"), ("finetune_lr = 0.003", "finetune_lr = -1")):
        bad.write_text(cfg.read_text().replace(edit, named))
        key = "encoders.r." + named.split(" =")[0]
        with pytest.raises(UsageError, match=re.escape(key)):
            load_config(bad)
    bad.write_text(cfg.read_text().replace("image_size = 32", "image_size = 36"))
    assert main(["study", str(bad), "--out", str(tmp_path / "o36"), "--device", "cpu", "--no-figures"]) == 2
    assert "encoders.r.image_size: 36x36 is not a multiple of the model's patch size 8" in capsys.readouterr().err
    assert not (tmp_path / "o36").exists()  # refused before anything is written
    with pytest.raises(UsageError, match=r"encoders\.r\.image_size: a builtin encoder.s size is img_size"):
        parse_config(MINI.replace("depth = 1", "depth = 1\nimage_size = 16"), "m.toml")


def test_kind_change_and_share_intervals_recomputed_from_the_cells_table(study):
    from cka_geo.study.aggregate import wilson_interval

    cells = _rows(study / "aggregate" / "cells.csv")
    kinds = _rows(study / "aggregate" / "kind_change.csv")
    for view in ("same", "own"):
        sel = [r for r in cells if r["encoder"] == "mae" and r["adaptation"] == "full"
               and r[f"most_changed_kind_{view}"]]
        per_seed = defaultdict(lambda: defaultdict(list))
        for r in sel:
            for k in ("attn", "fc1", "fc2"):
                per_seed[r["seed"]][k].append(float(r[f"mean_change_{k}_{view}"]))
        means = {s: {k: sum(v) / len(v) for k, v in d.items()} for s, d in per_seed.items()}
        row = {r["kind"]: r for r in kinds if (r["view"], r["encoder"], r["adaptation"]) == (view, "mae", "full")}
        fc1 = [m["fc1"] for m in means.values()]
        assert float(row["fc1"]["change"]) == pytest.approx(sum(fc1) / len(fc1), rel=1e-4)
        if len(fc1) > 1 and stats.sem(fc1) > 0:
            lo, _ = stats.t.interval(0.95, len(fc1) - 1, loc=sum(fc1) / len(fc1), scale=stats.sem(fc1))
            assert float(row["fc1"]["ci_lo"]) == pytest.approx(lo, rel=1e-4, abs=1e-9)
        margin = [m["fc1"] - max(m["attn"], m["fc2"]) for m in means.values()]
        assert float(row["fc1_margin"]["change"]) == pytest.approx(sum(margin) / len(margin), rel=1e-4, abs=1e-9)
    for k, n in ((0, 5), (3, 7), (7, 7), (40, 100)):
        ci = stats.binomtest(k, n).proportion_ci(0.95, method="wilson")
        assert wilson_interval(k, n) == pytest.approx((ci.low, ci.high), abs=1e-9)
    assert all(math.isnan(v) for v in wilson_interval(0, 0))


def test_builtin_encoders_and_cells_keep_their_models_not_their_training_checkpoints(study):
    assert (study / "encoders" / "mae" / "pretrain" / "pretrained.pt").is_file()
    assert not (study / "encoders" / "mae" / "pretrain" / "checkpoints").exists()
    for cell in expand(load_config(EXAMPLE)):
        folder = study / "cells" / cell.id / "finetune"
        assert (folder / "ft.pt").is_file() and not (folder / "checkpoints").exists()


def test_report_quotes_the_tables(study):
    tables = json.loads((study / "aggregate" / "tables.json").read_text())
    report = (study / "aggregate" / "report.md").read_text()
    overall = next(r for r in tables["fc1_share"] if (r["view"], r["encoder"], r["adaptation"]) == ("own", "mae", "full"))
    assert f"{overall['most_fc1']}/{overall['counted']} = " in report
    fc1 = next(r for r in tables["kind_change"]
               if (r["view"], r["encoder"], r["adaptation"], r["kind"]) == ("same", "mae", "last-1", "fc1"))
    assert f"{fc1['change']:.4f} [{fc1['ci_lo']:.4f}, {fc1['ci_hi']:.4f}]" in report
    rank = tables["rankings"][0]
    assert f"{rank['mean']:.3f} ± {rank['sd']:.3f} (#{rank['rank']})" in report
    adapt = [r for r in tables["localisation"] if r["level"] == "adaptation"]
    assert {r["adaptation"] for r in adapt} == {"full", "last-1"}
