"""The fine-tuning recipe: layer-wise LR decay, warm-up + cosine, drop path, gradient
accumulation, mixed precision, and resume refusing a changed recipe."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from _train_helpers import cls_tiles, tiny_vit
from cka_geo.errors import UsageError
from cka_geo.train import TrainConfig, fit
from cka_geo.train.loop import get_lr, load_train_checkpoint, make_optimizer
from cka_geo.train.recipe import layer_id, set_drop_path
from cka_geo.train.tasks import TaskModel


def _model(depth: int = 3, seed: int = 0) -> TaskModel:
    torch.manual_seed(seed)
    return TaskModel(tiny_vit(depth=depth, seed=seed), "classification", 3)


def _expected_id(name: str, depth: int) -> int:
    """BEiT's get_layer_id_for_vit, written out independently for these names."""
    if not name.startswith("encoder."):
        return depth + 1
    rest = name.removeprefix("encoder.")
    if rest.split(".")[0] in ("cls_token", "pos_embed", "patch_embed", "reg_token", "dist_token"):
        return 0
    if rest.startswith("blocks."):
        return int(rest.split(".")[1]) + 1
    return depth + 1


def test_layer_decay_groups_follow_the_formula():
    depth, decay = 3, 0.65
    model = _model(depth)
    opt = make_optimizer(model, TrainConfig(lr=1e-3, layer_decay=decay))
    scale = {id(p): g["lr_scale"] for g in opt.param_groups for p in g["params"]}
    wd = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    names = dict(model.named_parameters())
    assert len(scale) == len(names)
    for name, p in names.items():
        assert layer_id(name, depth) == _expected_id(name, depth), name
        assert scale[id(p)] == pytest.approx(decay ** (depth + 1 - _expected_id(name, depth)), rel=1e-15), name
        assert wd[id(p)] == (0.05 if p.ndim >= 2 else 0.0)
    assert scale[id(names["head.weight"])] == 1.0
    assert scale[id(names["encoder.patch_embed.proj.weight"])] == pytest.approx(decay**4)


def test_layer_decay_scales_the_first_adamw_step_per_layer():
    """AdamW's first step moves every element with a gradient by lr_group (bias-corrected m/√v = ±1)."""
    depth, decay, lr = 2, 0.5, 1e-3
    model = _model(depth)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    cfg = TrainConfig(epochs=1, batch_size=8, lr=lr, layer_decay=decay, weight_decay=0.0, grad_clip=None,
                      warmup_steps=0, progress=False)
    fit(model, cls_tiles(8, 0, img=16), cfg)
    for n, p in model.named_parameters():
        step = (p.detach() - before[n]).abs()
        moved = step[step > 0]
        want = lr * decay ** (depth + 1 - _expected_id(n, depth))
        assert moved.numel(), n
        assert float(moved.max()) == pytest.approx(want, rel=1e-3), n


@settings(max_examples=60, deadline=None)
@given(lr=st.floats(1e-5, 1.0), warmup=st.integers(0, 50), extra=st.integers(1, 200), frac=st.floats(0, 1))
def test_warmup_cosine_values(lr, warmup, extra, frac):
    total = warmup + extra
    cfg = TrainConfig(lr=lr, warmup_steps=warmup, min_lr_ratio=0.1)
    step = min(total - 1, int(frac * total))
    if step < warmup:
        want = lr * (step + 1) / warmup
    else:
        t = (step - warmup) / extra
        want = 0.1 * lr + 0.5 * (1 + math.cos(math.pi * t)) * 0.9 * lr
    assert get_lr(step, total, cfg) == pytest.approx(want, rel=1e-12, abs=1e-300)
    assert 0 < get_lr(step, total, cfg) <= lr * (1 + 1e-12)


@pytest.mark.parametrize(("n", "micro", "k"), [(8, 2, 4), (20, 3, 3)])  # 20 = 9 + 9 + 2: a short last step
def test_grad_accumulation_equals_one_big_batch(n, micro, k):
    """In float64, so that the only difference left is the order of the sums (Adam amplifies
    float32 round-off in near-zero gradients to ~1e-5)."""
    tiles = cls_tiles(n, 1, img=16)
    data = torch.utils.data.TensorDataset(tiles.tensors[0].double(), tiles.tensors[1])
    big, acc = _model(2, seed=3).double(), _model(2, seed=3).double()
    common = {"epochs": 1, "lr": 1e-3, "warmup_steps": 1, "progress": False}
    r1 = fit(big, data, TrainConfig(batch_size=micro * k, **common))
    r2 = fit(acc, data, TrainConfig(batch_size=micro, accum_steps=k, **common))
    assert r1.step == r2.step == math.ceil(n / (micro * k))
    for (name, a), b in zip(big.state_dict().items(), acc.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)
    losses1 = [r["loss"] for r in r1.history["steps"]]
    losses2 = [r["loss"] for r in r2.history["steps"]]
    assert losses1 == pytest.approx(losses2, abs=1e-6)


def test_drop_path_off_by_default_and_identity_in_eval():
    model = _model(3)
    x = cls_tiles(4, 0, img=16).tensors[0]
    enc = model.encoder
    assert all(blk.drop_path_rate == 0.0 for blk in enc.blocks)
    ref = enc.eval().forward_features(x)
    assert set_drop_path(model, 0.3) == pytest.approx([0.0, 0.15, 0.3])
    torch.testing.assert_close(enc.eval().forward_features(x), ref, rtol=0, atol=0)
    torch.manual_seed(0)
    dropped = enc.train().forward_features(x)
    assert not torch.allclose(dropped, ref)
    set_drop_path(model, 0.0)
    torch.testing.assert_close(enc.train().forward_features(x), ref, rtol=0, atol=0)


def test_drop_path_keeps_or_drops_whole_samples():
    """With rate p a residual branch is, per sample, either dropped or scaled by 1 / (1 - p)."""
    blk = tiny_vit(depth=1).blocks[0]
    x = torch.randn(64, 5, 32)
    branch = blk.ls1(blk.attn(blk.norm1(x)))
    blk.drop_path_rate = 0.5
    torch.manual_seed(1)
    y = blk.train()._drop_path(branch)
    kept = [bool(torch.allclose(y[i], branch[i] / 0.5)) for i in range(64)]
    gone = [bool((y[i] == 0).all()) for i in range(64)]
    assert all(a != b for a, b in zip(kept, gone, strict=True))
    assert 16 < sum(kept) < 48


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
def test_mixed_precision_runs_on_cpu(precision, tmp_path):
    model = _model(2)
    before = model.head.weight.detach().clone()
    try:
        res = fit(model, cls_tiles(8, 0, img=16), TrainConfig(epochs=1, batch_size=4, precision=precision,
                                                              progress=False), tmp_path)
    except RuntimeError as exc:  # pragma: no cover - a torch build without CPU float16 autocast
        pytest.skip(f"CPU autocast {precision} unsupported here: {exc}")
    assert all(math.isfinite(r["loss"]) for r in res.history["steps"])
    assert model.head.weight.dtype == torch.float32 and not torch.equal(model.head.weight, before)
    ckpt = load_train_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert ckpt["config"]["train"]["precision"] == precision
    assert ("scaler" in ckpt) == (precision == "16-mixed")
    if precision == "16-mixed":
        assert ckpt["scaler"]["scale"] > 0


def test_recipe_options_are_checked():
    for kwargs, flag in [({"layer_decay": 0.0}, "--layer-decay"), ({"layer_decay": 1.5}, "--layer-decay"),
                         ({"drop_path": 1.0}, "--drop-path"), ({"accum_steps": 0}, "--accum-steps"),
                         ({"precision": "fp8"}, "--precision")]:
        with pytest.raises(UsageError, match=flag):
            TrainConfig(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(("flag", "value"), [("--layer-decay", "0.5"), ("--precision", "bf16-mixed"),
                                             ("--accum-steps", "2"), ("--drop-path", "0.1"),
                                             ("--band-rule", "mean"), ("--normalize", "s2-div10000")])
def test_resume_refuses_a_changed_recipe_option(flag, value, tmp_path, capsys):
    from cka_geo.cli import main
    from test_train_data import class_folders, small_checkpoint

    ckpt, data = small_checkpoint(tmp_path), class_folders(tmp_path / "eurosat")
    out = tmp_path / "run"
    base = ["finetune", str(ckpt), "--data", str(data), "--out", str(out), "--epochs", "2", "--batch-size", "8",
            "--threads", "1", "--no-progress"]
    assert main([*base, "--stop-after-epoch", "1"]) == 0
    capsys.readouterr()
    assert main([*base, "--resume", flag, value]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the data line
    assert err.startswith("cka-geo: error: --resume") and f"with {flag} " in err and "resume with the same" in err, err
