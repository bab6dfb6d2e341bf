"""torch.distributed: 2 gloo processes on the CPU (torchrun) against one process.

The launches are real ``python -m torch.distributed.run --standalone --nproc-per-node 2 -m
cka_geo ...`` runs (a free port each); the one-process references run in this process with
the same thread count (1), so the per-batch terms, and hence the sums, are the same.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cka_geo import distributed
from cka_geo.accumulator import MinibatchCKA
from cka_geo.checkpoints import save_checkpoint
from cka_geo.cli import main
from cka_geo.compare import CompareOptions, compare_checkpoints
from cka_geo.compare.shard import ShardCKA, merge, owns, shard_images
from cka_geo.errors import DataError, UsageError
from cka_geo.vit import VisionTransformer, ViTConfig

SRC = Path(__file__).resolve().parents[1] / "src"
CFG = ViTConfig(img_size=16, patch_size=4, in_chans=13, embed_dim=32, depth=2, num_heads=2)
COMPARE = ["--samples", "48", "--batch-size", "4", "--bootstrap", "200", "--format", "json", "--no-figures"]
FINETUNE = ["--task", "classification", "--batch-size", "16", "--stride", "64", "--warmup-steps", "2",
            "--threads", "1", "--epochs", "2"]


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny ViT and a copy with block 1's fc1 perturbed."""
    d = tmp_path_factory.mktemp("pair")
    torch.manual_seed(0)
    model = VisionTransformer(CFG)
    save_checkpoint(d / "pre.pt", model, CFG)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    w = sd["blocks.1.mlp.fc1.weight"]
    sd["blocks.1.mlp.fc1.weight"] = w + 0.5 * w.std() * torch.randn(w.shape, generator=torch.Generator().manual_seed(1))
    save_checkpoint(d / "ft.pt", sd, CFG)
    return d / "pre.pt", d / "ft.pt"


def torchrun(args: list[str], cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """``torchrun --standalone --nproc-per-node 2`` of ``args`` (``-m cka_geo ...`` or a script)."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                           "MASTER_PORT", "CKA_GEO_DEBUG")}
    env.update(PYTHONPATH=f"{SRC}{os.pathsep}{env.get('PYTHONPATH', '')}", OMP_NUM_THREADS="1",
               CKA_GEO_DIST_TIMEOUT="60")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def ours(text: str) -> list[str]:
    """cka-geo's own lines (not torchrun's)."""
    return [line for line in text.splitlines() if line.startswith("cka-geo")]


# -- the shards and the merge, without processes --------------------------------------------


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 5), st.integers(5, 60), st.integers(4, 9), st.integers(0, 2**31 - 1))
def test_merged_shards_equal_one_accumulator_bit_for_bit(world, n, batch, seed):
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((n, 5))
    feats = {"a": np.tanh(z @ rng.standard_normal((5, 7))), "b": z @ rng.standard_normal((5, 3))}
    other = {"c": np.sin(z @ rng.standard_normal((5, 4)))}
    cut = [(start, min(start + batch, n)) for start in range(0, n, batch)]
    one = MinibatchCKA()
    shards = [ShardCKA() for _ in range(world)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a short last batch is skipped with a warning
        for i, (s, e) in enumerate(cut):
            fa = {k: torch.from_numpy(v[s:e]) for k, v in feats.items()}
            fb = {k: torch.from_numpy(v[s:e]) for k, v in other.items()}
            one.update(fa, fb)
            r = i % world
            assert owns(i, r, world)
            shards[r].batch = i
            shards[r].update(fa, fb)
        want = one.compute()
        got = merge([s.payload() for s in shards], shards[0]).compute()
    assert np.array_equal(got.matrix, want.matrix, equal_nan=True)
    assert np.array_equal(got.batch_cross, want.batch_cross) and got.batch_sizes == want.batch_sizes
    assert got.samples_skipped == want.samples_skipped
    assert sum(shard_images(n, batch, r, world) for r in range(world)) == n


def test_a_bad_launcher_environment_is_one_usage_error(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    assert distributed.launcher_env() is None
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert distributed.launcher_env() is None  # torchrun --nproc-per-node 1: one process
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UsageError, match="RANK is not set"):
        distributed.launcher_env()
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("MASTER_PORT", "29500")
    with pytest.raises(UsageError, match=r"RANK=2 is not in \[0, WORLD_SIZE=2\)"):
        distributed.launcher_env()
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(UsageError, match="MASTER_ADDR is not set"):
        distributed.launcher_env()
    monkeypatch.setenv("MASTER_ADDR", "localhost")
    assert distributed.launcher_env() == distributed.Env(1, 2, 0)
    monkeypatch.setenv("MASTER_PORT", "x")
    with pytest.raises(UsageError, match="MASTER_PORT='x' is not an integer"):
        distributed.launcher_env()


def test_ranks_failing_alike_print_their_line_once(monkeypatch, tmp_path):
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert distributed.say_once("cka-geo: error: x") and distributed.say_once("cka-geo: error: x")  # not torchrun
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-1")
    assert distributed.say_once("cka-geo: error: x")  # rank 0, say
    assert not distributed.say_once("cka-geo: error: x")  # rank 1, the same line
    assert distributed.say_once("cka-geo: error: y")  # another line
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-2")
    assert distributed.say_once("cka-geo: error: x")  # another job


def test_commands_without_torchrun_support_refuse_it_in_one_line(monkeypatch, capsys, tmp_path):
    for key, value in {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "localhost",
                       "MASTER_PORT": "29500"}.items():
        monkeypatch.setenv(key, value)
    assert main(["plot", str(tmp_path / "r.json")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "plot does not run under torchrun (WORLD_SIZE=2)" in err[0]
    assert not distributed.active()


def test_shares_of_a_global_batch_cover_it_and_weigh_to_its_mean(monkeypatch):
    from cka_geo.train import ddp

    for world in (2, 3, 4):
        for n in (1, 2, 5, 8, 16):
            idx = torch.arange(100, 100 + n)
            got, weights = [], []
            for r in range(world):
                monkeypatch.setitem(distributed._state, "env", distributed.Env(r, world, r))
                rows, w = ddp.local_rows(idx)
                weights.append(w)
                if w:
                    got.append(rows)
            assert torch.equal(torch.cat(got), idx)  # every sample once, in order
            assert sum(weights) == pytest.approx(world)  # DDP's mean of weighted means = the batch mean
        monkeypatch.setitem(distributed._state, "env", distributed.Env(0, world, 0))
        with pytest.raises(UsageError, match=f"--batch-size 7 is the global batch, shared by {world} ranks"):
            ddp.check_batch_size(7)
    monkeypatch.setitem(distributed._state, "env", distributed.Env(1, 2, 1))
    assert ddp.rank_seed(5) != 5
    monkeypatch.setitem(distributed._state, "env", None)
    assert ddp.rank_seed(5) == 5


def test_the_biased_estimator_is_not_sharded(monkeypatch, pair):
    monkeypatch.setitem(distributed._state, "env", distributed.Env(0, 2, 0))
    monkeypatch.setattr(distributed, "init", lambda device: torch.device(device))
    with pytest.raises(UsageError, match=r"--estimator biased puts every sample in one batch.*2 ranks"):
        compare_checkpoints(*pair, samples=16, batch_size=8, estimator="biased", bootstrap=0, progress=False)


def test_a_rank_reads_only_its_own_batches_of_a_folder(monkeypatch, tmp_path):
    from cka_geo.compare.probes import cut_batches, open_probes
    from cka_geo.data import ImageFolder
    from cka_geo.data.normalize import resolve

    rng = np.random.default_rng(0)
    (tmp_path / "tiles").mkdir()
    for i in range(10):
        np.save(tmp_path / f"tiles/t{i}.npy", rng.standard_normal((13, 16, 16)).astype(np.float32))
    opts = CompareOptions(data=str(tmp_path / "tiles"), normalize="none")

    def batches(rank: int, world: int) -> list[torch.Tensor]:
        env = None if world == 1 else distributed.Env(rank, world, rank)
        monkeypatch.setitem(distributed._state, "env", env)
        probes = open_probes(opts, 13)
        norm = resolve("none", 13, probes.band_names, embedded=False, raw=probes.raw)
        return list(cut_batches(probes, opts, 10, 4, (16, 16), norm)[0])

    one = batches(0, 1)
    read: list[int] = []
    get = ImageFolder.__getitem__
    monkeypatch.setattr(ImageFolder, "__getitem__", lambda self, i: read.append(i) or get(self, i))
    two = batches(1, 2)
    assert sorted(set(read) - {0}) == [4, 5, 6, 7]  # batch 1 of 3 (0 is read to open the folder)
    assert [b.shape[0] for b in two] == [0, 4, 0] and torch.equal(two[1], one[1])
    np.save(tmp_path / "tiles/t5.npy", rng.standard_normal((13, 8, 8)).astype(np.float32))
    with pytest.raises(DataError, match=r"has shape .* all images of a probe set must have one size"):
        batches(1, 2)


# -- bf16 forwards ----------------------------------------------------------------------------


def test_bf16_forwards_are_recorded_and_stay_close_to_float32(pair):
    opts = {"samples": 16, "batch_size": 8, "bootstrap": 0, "progress": False}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        f32 = compare_checkpoints(*pair, **opts)
        bf16 = compare_checkpoints(*pair, forward_precision="bf16", **opts)
    assert f32.to_dict()["settings"]["forward_precision"] == "float32"  # as written to results.json
    assert bf16.to_dict()["settings"]["forward_precision"] == "bf16"
    diff = np.nanmax(np.abs(bf16.matrix - f32.matrix))
    assert 0 < diff < 0.05, diff  # really bf16 (not float32), and still the same picture
    with pytest.raises(UsageError, match="--forward-precision 'fp8'"):
        CompareOptions(forward_precision="fp8").validate()


def test_the_forward_precision_flag_is_checked_in_one_line(pair, capsys):
    assert main(["compare", *map(str, pair), "--forward-precision", "fp16"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--forward-precision" in err[0] and "'fp16'" in err[0]


# -- torchrun, 2 gloo ranks -------------------------------------------------------------------


def test_two_rank_compare_equals_one_process(pair, tmp_path, one_thread, capsys):
    pre, ft = pair
    run = torchrun(["-m", "cka_geo", "compare", str(pre), str(ft), *COMPARE, "--out", "two"], tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    plans = [line for line in ours(run.stderr) if "images of" in line]
    assert len(plans) == 1 and "2 ranks" in plans[0]  # rank 0 alone prints
    assert sorted(os.listdir(tmp_path / "two")) == ["results.json"]
    assert main(["compare", str(pre), str(ft), *COMPARE, "--out", str(tmp_path / "one"), "-q"]) == 0
    capsys.readouterr()
    one, two = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("one", "two"))
    a, b = (np.array(r["matrix"], dtype=float) for r in (one, two))
    assert np.nanmax(np.abs(a - b)) <= 1e-10  # observed: bit for bit
    assert one["layers"] == two["layers"]
    for key in ("diagonal", "own_change", "intervals", "own_change_intervals"):  # intervals: same seed and terms
        for name in one["layers"]:
            assert np.allclose(one[key][name], two[key][name], rtol=0, atol=1e-10), (key, name)
    assert np.isfinite(np.array([one["intervals"][n] for n in one["layers"]], dtype=float)).all()
    assert two["settings"]["ranks"] == 2 and one["settings"]["ranks"] == 1
    assert two["settings"]["batches"] == one["settings"]["batches"] == 12


def test_two_rank_finetune_with_a_resume_equals_one_process(pair, tmp_path, one_thread, capsys):
    pre, _ = pair
    cut = torchrun(["-m", "cka_geo", "finetune", str(pre), "--out", "two", *FINETUNE, "--stop-after-epoch", "1"],
                   tmp_path)
    assert cut.returncode == 0, cut.stderr[-2000:]
    assert not (tmp_path / "two/ft.pt").exists() and (tmp_path / "two/checkpoints/last.pt").is_file()
    ckpt = torch.load(tmp_path / "two/checkpoints/last.pt", weights_only=True)
    assert len(ckpt["rng"]["generator_ranks"]) == 2
    done = torchrun(["-m", "cka_geo", "finetune", str(pre), "--out", "two", *FINETUNE, "--resume"], tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert len([line for line in done.stdout.splitlines() if line.startswith("test:")]) == 1
    assert main(["finetune", str(pre), "--out", str(tmp_path / "one"), *FINETUNE]) == 0
    capsys.readouterr()
    assert sorted(os.listdir(tmp_path / "two")) == sorted(os.listdir(tmp_path / "one"))
    a = torch.load(tmp_path / "one/ft.pt", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "two/ft.pt", weights_only=True)["state_dict"]
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst < 1e-4, worst  # float32 reductions in another order (observed ~4e-6)
    moved = max(float((a[k] - torch.load(pre, weights_only=True)["state_dict"][k]).abs().max()) for k in a)
    assert moved > 100 * worst  # the runs trained: the agreement is not that of two untouched copies
    la, lb = (json.loads((tmp_path / d / "metrics.json").read_text())["steps"] for d in ("one", "two"))
    assert [s["step"] for s in la] == [s["step"] for s in lb]
    assert [s["loss"] for s in lb] == pytest.approx([s["loss"] for s in la], rel=1e-4)


FAIL = """
import os, sys
from cka_geo.compare import job, run

if os.environ["RANK"] == "1":
    if sys.argv[1] == "early":  # before any collective: the launcher stops rank 0
        def refuse(*args, **kwargs):
            from cka_geo.errors import CheckpointError
            raise CheckpointError("planted.pt: refused on rank 1")
        job.load_checkpoint = refuse
    else:  # inside the batch loop: the error travels to rank 0
        forward = run.forward_batch
        def nan(model, x, cap, **kw):
            out = forward(model, x, cap, **kw)
            for f in out.features.values():
                f.fill_(float("nan"))
            return out
        run.forward_batch = nan
from cka_geo.cli import main
sys.exit(main(sys.argv[2:]))
"""


@pytest.mark.parametrize("when", [pytest.param("early", marks=pytest.mark.slow), "in-loop"])
def test_a_failing_rank_ends_the_job_with_one_line(pair, tmp_path, when):
    (tmp_path / "fail.py").write_text(FAIL)
    pre, ft = pair
    run = torchrun(["fail.py", when, "compare", str(pre), str(ft), *COMPARE, "--out", "o", "-q"], tmp_path, timeout=90)
    assert run.returncode != 0
    lines = [line for line in ours(run.stdout + run.stderr) if "error" in line]
    assert len(lines) == 1, run.stderr[-3000:]
    want = "planted.pt: refused on rank 1" if when == "early" else "NaN"
    assert want in lines[0]
    assert not (tmp_path / "o").exists()
