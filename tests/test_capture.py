"""Sublayer capture: selection, pooling, layouts, apply, time series, hook hygiene."""

from __future__ import annotations

import copy
import warnings
from collections import OrderedDict

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from cka_geo.errors import DataError, FeatureError, UsageError
from cka_geo.features import (
    capture,
    forward_batch,
    pool_tokens,
    resolve_sublayers,
    sublayer_map,
)
from cka_geo.vit import Block, VisionTransformer, ViTConfig

BANDS, IMG, PATCH, WIDTH, DEPTH = 13, 16, 4, 32, 3
GRID = (IMG // PATCH) ** 2  # 16 patch tokens


def make_vit(**kw) -> VisionTransformer:
    torch.manual_seed(0)
    cfg = dict(img_size=IMG, patch_size=PATCH, in_chans=BANDS, embed_dim=WIDTH, depth=DEPTH, num_heads=2)
    cfg.update(kw)
    return VisionTransformer(ViTConfig(**cfg)).eval()


def images(n: int = 4, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, BANDS, IMG, IMG, generator=g)


def all_hooks_gone(model: nn.Module) -> bool:
    return all(not m._forward_hooks and not m._forward_hooks_with_kwargs for m in model.modules())


def reference_tokens(model: VisionTransformer, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Sublayer outputs (B, T, D) recomputed in float64, module by module."""
    m = copy.deepcopy(model).double()
    out: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        h = m.embed(x.double())
        for i, blk in enumerate(m.blocks):
            a = blk.attn(blk.norm1(h))
            out[f"blocks.{i}.attn"] = a
            h = h + a
            f1 = blk.mlp.fc1(blk.norm2(h))
            out[f"blocks.{i}.mlp.fc1"] = f1
            g = torch.nn.functional.gelu(f1)
            out[f"blocks.{i}.mlp.act"] = g
            f2 = blk.mlp.fc2(g)
            out[f"blocks.{i}.mlp.fc2"] = f2
            h = h + f2
            out[f"blocks.{i}"] = h
    return out


# ----------------------------------------------------------------------------- selection


def test_default_selection_order():
    names = resolve_sublayers(make_vit())
    expected = [
        f"blocks.{i}{s}" for i in range(DEPTH) for s in (".attn", ".mlp.fc1", ".mlp.fc2", "")
    ]
    assert names == expected


def test_kinds_blocks_pattern():
    m = make_vit()
    assert resolve_sublayers(m, kinds=("block", "act"), blocks=[0, -1]) == [
        "blocks.0.mlp.act", "blocks.0", "blocks.2.mlp.act", "blocks.2",
    ]
    # a pattern alone searches every kind, act included
    assert resolve_sublayers(m, pattern=r"mlp\.act$") == [f"blocks.{i}.mlp.act" for i in range(DEPTH)]
    assert resolve_sublayers(m, kinds=["fc1"], pattern=r"^blocks\.1\.") == ["blocks.1.mlp.fc1"]


def test_explicit_names_keep_caller_order():
    m = make_vit()
    names = ["blocks.2", "blocks.0.mlp.fc1", "blocks.1.attn", "blocks.0.mlp.act"]
    assert resolve_sublayers(m, names) == names
    with capture(m, names) as cap:
        m(images(2))
        assert list(cap.pop()) == names


def test_unknown_name_lists_close_match():
    m = make_vit()
    with pytest.raises(UsageError, match=r"unknown sublayer 'blocks\.1\.mlp\.fc3'.*'blocks\.1\.mlp\.fc[12]'"):
        resolve_sublayers(m, ["blocks.1.mlp.fc3"])
    with pytest.raises(UsageError, match=r"did you mean 'blocks\.0\.attn'"):
        resolve_sublayers(m, ["block.0.attn"])
    with pytest.raises(UsageError, match="unknown sublayer kind 'fc'"):
        resolve_sublayers(m, kinds=["fc"])
    with pytest.raises(UsageError, match="out of range"):
        resolve_sublayers(m, blocks=[DEPTH])
    with pytest.raises(UsageError, match="bad sublayer pattern"):
        resolve_sublayers(m, pattern="(")
    with pytest.raises(UsageError, match="no sublayer matches"):
        resolve_sublayers(m, pattern="nothing")
    with pytest.raises(UsageError, match="given twice"):
        resolve_sublayers(m, ["blocks.0", "blocks.0"])
    with pytest.raises(UsageError, match="not both"):
        resolve_sublayers(m, ["blocks.0"], kinds=["attn"])


def test_validation_before_any_hook():
    m = make_vit()
    for kwargs in (
        {"names": ["blocks.0", "blocks.9"]},
        {"names": ["blocks.0"], "pooling": "max"},
        {"names": ["blocks.0"], "apply": {"blocks.1": nn.Identity()}},
        {"names": ["blocks.0"], "apply": {"blocks.0": 3}},
    ):
        with pytest.raises(UsageError), capture(m, **kwargs):
            pass
        assert all_hooks_gone(m)


def test_cls_pooling_refused_without_class_token():
    m = make_vit(class_token=False, global_pool="avg")
    with pytest.raises(UsageError, match="class token"), capture(m, ["blocks.0"], pooling="cls"):
        pass


class _TimmLike(nn.Module):
    """A timm-named model without canonical_sublayers()."""

    def __init__(self) -> None:
        super().__init__()
        cfg = ViTConfig(img_size=IMG, patch_size=PATCH, in_chans=BANDS, embed_dim=WIDTH, depth=2, num_heads=2)
        self.blocks = nn.Sequential(*(Block(cfg) for _ in range(2)))
        self.num_prefix_tokens = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)


def test_timm_fallback_without_canonical_sublayers():
    m = _TimmLike().eval()
    assert list(sublayer_map(m)) == [
        f"blocks.{i}{s}" for i in range(2) for s in (".attn", ".mlp.fc1", ".mlp.act", ".mlp.fc2", "")
    ]
    x = torch.randn(3, 5, WIDTH)
    with capture(m, ["blocks.1"], pooling="flatten") as cap:
        out = m(x)
        assert torch.allclose(cap.pop()["blocks.1"], out.reshape(3, -1))

    wrapped = nn.Module()
    wrapped.encoder = m
    assert sublayer_map(wrapped)["blocks.1.mlp.fc1"] == "encoder.blocks.1.mlp.fc1"
    with pytest.raises(UsageError, match="canonical_sublayers"):
        sublayer_map(nn.Linear(2, 2))


# ----------------------------------------------------------------------------- values


@pytest.mark.parametrize("pooling", ["mean", "cls", "flatten", "tokens"])
def test_pooled_values_match_float64_reference(pooling):
    m = make_vit()
    x = images(4)
    names = resolve_sublayers(m, kinds=("attn", "fc1", "act", "fc2", "block"))
    ref = reference_tokens(m, x)
    with capture(m, names, pooling=pooling) as cap:
        m(x)
        feats = cap.pop()
    assert list(feats) == names
    for name in names:
        r = ref[name]  # (B, T, D), float64
        b, t, d = r.shape
        if pooling == "mean":
            want = r[:, 1:].mean(1)
        elif pooling == "cls":
            want = r[:, 0]
        elif pooling == "flatten":
            want = r.reshape(b, t * d)
        else:
            want = torch.cat([r[i, 1:] for i in range(b)])  # sample-major
        got = feats[name]
        assert got.dtype == torch.float32 and got.is_contiguous()
        assert got.shape == want.shape, name
        torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=1e-4, msg=name)
    expected_rows = {"mean": 4, "cls": 4, "flatten": 4, "tokens": 4 * GRID}[pooling]
    assert feats["blocks.0.mlp.fc1"].shape[0] == expected_rows
    assert feats["blocks.0.mlp.fc1"].shape[1] == (4 * WIDTH * (GRID + 1) if pooling == "flatten" else 4 * WIDTH)


def test_block_output_matches_forward_intermediates():
    m = make_vit()
    x = images(3)
    with capture(m, ["blocks.1"], pooling="tokens") as cap:
        maps = m.forward_intermediates(x, [1])[0]  # (B, D, g, g), prefix dropped
        got = cap.pop()["blocks.1"]
    want = maps.flatten(2).transpose(1, 2).reshape(-1, WIDTH)
    assert torch.equal(got, want)


def test_no_grad_graph_retained():
    m = make_vit()
    assert any(p.requires_grad for p in m.parameters())
    with capture(m, ["blocks.0.attn", "blocks.2"]) as cap:
        y = m(images(2))
        feats = cap.pop()
        assert not torch.is_grad_enabled()
    assert torch.is_grad_enabled()
    assert y.grad_fn is None
    for f in feats.values():
        assert f.grad_fn is None and not f.requires_grad


def test_pop_errors_name_the_sublayer():
    m = make_vit()
    with capture(m, ["blocks.0", "blocks.2"]) as cap:
        with pytest.raises(FeatureError, match="run a forward pass"):
            cap.pop()
        m.forward_intermediates(images(2), [0])  # runs block 0 only
        with pytest.raises(FeatureError, match=r"'blocks\.2' \(blocks\.2\) did not fire"):
            cap.pop()
        m(images(2))
        m(images(2))
        with pytest.raises(FeatureError, match=r"'blocks\.0'.*fired 2 times"):
            cap.pop()
        m(images(2))  # state cleared by the failed pop
        assert set(cap.pop()) == {"blocks.0", "blocks.2"}


# ----------------------------------------------------------------------------- hooks


def test_hooks_removed_after_success_and_after_exception():
    m = make_vit()
    names = resolve_sublayers(m)
    with capture(m, names) as cap:
        assert not all_hooks_gone(m)
        m(images(2))
        cap.pop()
    assert all_hooks_gone(m)

    def boom(module, args):
        raise RuntimeError("boom in block 2")

    pre = m.blocks[2].register_forward_pre_hook(boom)
    try:
        with pytest.raises(RuntimeError, match="boom"), capture(m, names) as cap:
            m(images(2))  # blocks 0 and 1 fired, then the forward raises
    finally:
        pre.remove()
    assert all_hooks_gone(m)
    with pytest.raises(ValueError), capture(m, names):
        raise ValueError("raised in the with block")
    assert all_hooks_gone(m)


# ----------------------------------------------------------------------------- tuple / seq-first


class _ResBlock(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads)  # sequence-first, returns (out, weights)
        self.ln_2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(
            OrderedDict(c_fc=nn.Linear(d, 2 * d), gelu=nn.GELU(), c_proj=nn.Linear(2 * d, d))
        )

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        y = self.ln_1(x)
        x = x + self.attn(y, y, y, need_weights=False, attn_mask=attn_mask)[0]
        return x + self.mlp(self.ln_2(x))


class _SeqFirstNet(nn.Module):
    """open_clip-like: (T, B, D) inside, nn.MultiheadAttention, canonical_sublayers()."""

    batch_first = False
    num_prefix_tokens = 1

    def __init__(self, d: int = 16, depth: int = 2) -> None:
        super().__init__()
        self.resblocks = nn.ModuleList(_ResBlock(d, 2) for _ in range(depth))

    def canonical_sublayers(self) -> dict[str, str]:
        out = {}
        for i in range(len(self.resblocks)):
            p = f"resblocks.{i}"
            out |= {
                f"blocks.{i}.attn": f"{p}.attn",
                f"blocks.{i}.mlp.fc1": f"{p}.mlp.c_fc",
                f"blocks.{i}.mlp.act": f"{p}.mlp.gelu",
                f"blocks.{i}.mlp.fc2": f"{p}.mlp.c_proj",
                f"blocks.{i}": p,
            }
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, T, D)
        h = x.transpose(0, 1)
        mask = torch.zeros(h.shape[0], h.shape[0])
        for blk in self.resblocks:
            h = blk(h, attn_mask=mask)
        return h.transpose(0, 1)


def _seqfirst_reference(net: _SeqFirstNet, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Batch-first (B, T, D) float64 outputs, computed per sample with the modules' weights."""
    n = copy.deepcopy(net).double()
    out: dict[str, list[torch.Tensor]] = {}
    with torch.no_grad():
        for sample in x.double():
            h = sample  # (T, D)
            for i, blk in enumerate(n.resblocks):
                y = blk.ln_1(h)
                a = blk.attn(y, y, y, need_weights=False)[0]  # unbatched (T, D)
                h = h + a
                f1 = blk.mlp.c_fc(blk.ln_2(h))
                f2 = blk.mlp.c_proj(torch.nn.functional.gelu(f1))
                h = h + f2
                for k, v in ((f"blocks.{i}.attn", a), (f"blocks.{i}.mlp.fc1", f1),
                             (f"blocks.{i}.mlp.fc2", f2), (f"blocks.{i}", h)):
                    out.setdefault(k, []).append(v)
    return {k: torch.stack(v) for k, v in out.items()}


def test_tuple_output_and_sequence_first():
    torch.manual_seed(0)
    net = _SeqFirstNet().eval()
    x = torch.randn(3, 7, 16)
    ref = _seqfirst_reference(net, x)
    names = resolve_sublayers(net)
    assert names[:4] == ["blocks.0.attn", "blocks.0.mlp.fc1", "blocks.0.mlp.fc2", "blocks.0"]
    for pooling in ("mean", "tokens"):
        with capture(net, names, pooling=pooling) as cap:
            assert cap.batch_first is False and cap.num_prefix_tokens == 1
            net(x)
            feats = cap.pop()
        for name in names:
            r = ref[name][:, 1:]
            want = r.mean(1) if pooling == "mean" else r.reshape(-1, r.shape[-1])
            torch.testing.assert_close(feats[name].double(), want, atol=2e-5, rtol=1e-4, msg=name)
    assert all_hooks_gone(net)
    # a wrong layout claim is caught by forward_batch's row check
    with capture(net, ["blocks.0"], batch_first=True) as cap, pytest.raises(FeatureError, match="batch_first"):
        forward_batch(net, torch.randn(2, 1, 3, 4, 4), cap, forward=lambda f: net(f.reshape(2, 3, 16)))


# ----------------------------------------------------------------------------- apply


def test_apply_own_modules_gives_identical_features():
    m = make_vit()
    names = resolve_sublayers(m, kinds=("attn", "fc1", "act", "fc2", "block"))
    apply = {n: m.get_submodule(n) for n in names}  # own modules, incl. blocks with hooked children
    with capture(m, names, pooling="tokens", apply=apply) as cap:
        m(images(3))
        out, own = cap.pop(), cap.pop_applied()
    assert list(own) == names
    for n in names:
        assert torch.equal(out[n], own[n]), n
    assert all_hooks_gone(m)


def test_apply_perturbed_copy_differs_only_where_perturbed():
    pre = make_vit()
    ft = copy.deepcopy(pre)
    with torch.no_grad():
        ft.blocks[1].mlp.fc1.weight.add_(0.5 * torch.randn_like(ft.blocks[1].mlp.fc1.weight))
    names = resolve_sublayers(pre, kinds=("attn", "fc1", "act", "fc2", "block"))
    apply = {n: ft.get_submodule(n) for n in names}
    with capture(pre, names, apply=apply) as cap, capture(ft, names) as cap_ft:
        # both captured at once: ft's hooks must not fire while its modules are applied
        batch = forward_batch(pre, images(3), cap)
        ft_feats = forward_batch(ft, images(3), cap_ft).features
    changed = {n for n in names if not torch.equal(batch.features[n], batch.applied[n])}
    assert changed == {"blocks.1.mlp.fc1", "blocks.1"}
    # the applied block-0 output is ft's block 0 on the same input: equal to ft's own output
    assert torch.equal(batch.applied["blocks.0"], ft_feats["blocks.0"])


def test_apply_multihead_attention_args_and_kwargs():
    torch.manual_seed(0)
    pre = _SeqFirstNet().eval()
    ft = copy.deepcopy(pre)
    with torch.no_grad():
        ft.resblocks[0].attn.in_proj_weight.mul_(1.5)
    names = resolve_sublayers(pre)
    paths = pre.canonical_sublayers()
    apply = {n: ft.get_submodule(paths[n]) for n in names}
    with capture(pre, names, apply=apply) as cap:
        pre(torch.randn(2, 5, 16))
        out, app = cap.pop(), cap.pop_applied()
    changed = {n for n in names if not torch.allclose(out[n], app[n])}
    assert changed == {"blocks.0.attn", "blocks.0"}
    # a module path is accepted as the apply key too
    with capture(pre, ["blocks.1.attn"], apply={"resblocks.1.attn": pre.resblocks[1].attn}) as cap:
        pre(torch.randn(2, 5, 16))
        assert torch.equal(cap.pop()["blocks.1.attn"], cap.pop_applied()["blocks.1.attn"])


# ----------------------------------------------------------------------------- time series


@pytest.mark.parametrize("pooling", ["mean", "tokens"])
def test_time_series_frames_and_mean(pooling):
    m = make_vit()
    b, t = 2, 3
    g = torch.Generator().manual_seed(3)
    series = torch.randn(b, t, BANDS, IMG, IMG, generator=g)
    names = ["blocks.0.mlp.fc1", "blocks.2"]
    with capture(m, names, pooling=pooling) as cap:
        frames = forward_batch(m, series, cap, time_mode="frames").features
        mean = forward_batch(m, series, cap, time_mode="mean").features
        per_frame = [forward_batch(m, series[:, i], cap).features for i in range(t)]
    per = GRID if pooling == "tokens" else 1
    for n in names:
        d = frames[n].shape[1]
        assert frames[n].shape == (b * t * per, d)
        assert mean[n].shape == (b * per, d)
        # row (b*T + t)*per + k is token k of frame t of sample b
        want = torch.stack([pf[n].reshape(b, per, d) for pf in per_frame], dim=1)  # (b, t, per, d)
        torch.testing.assert_close(frames[n], want.reshape(-1, d), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(mean[n], want.mean(1).reshape(-1, d), atol=1e-5, rtol=1e-5)


def test_forward_batch_rejects_bad_input():
    m = make_vit()
    with capture(m, ["blocks.0"]) as cap:
        with pytest.raises(DataError, match="time series"):
            forward_batch(m, torch.zeros(2, 16, 16), cap)
        with pytest.raises(UsageError, match="time_mode"):
            forward_batch(m, images(2), cap, time_mode="max")


# ----------------------------------------------------------------------------- misc


def test_missing_prefix_attribute_warns_and_assumes_one():
    class Bare(_TimmLike):
        pass

    m = Bare().eval()
    del m.num_prefix_tokens
    with pytest.warns(UserWarning, match="assuming 1"), capture(m, ["blocks.0"]) as cap:
        assert cap.num_prefix_tokens == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with capture(m, ["blocks.0"], num_prefix_tokens=0) as cap:
            assert cap.settings["num_prefix_tokens"] == 0


@settings(max_examples=25, deadline=None)
@given(
    b=st.integers(1, 3), t=st.integers(2, 6), d=st.integers(1, 4), p=st.integers(0, 1),
    seed=st.integers(0, 2**31 - 1),
)
def test_pool_tokens_against_numpy(b, t, d, p, seed):
    x = np.random.default_rng(seed).standard_normal((b, t, d))
    xt = torch.from_numpy(x).to(torch.float16)  # pooled in float32 whatever the input dtype
    x16 = xt.double().numpy()
    np.testing.assert_allclose(pool_tokens(xt, "mean", p).double().numpy(), x16[:, p:].mean(1), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(pool_tokens(xt, "flatten", p).double().numpy(), x16.reshape(b, -1))
    tok = pool_tokens(xt, "tokens", p)
    assert tok.dtype == torch.float32
    for i in range(b):
        for j in range(t - p):
            np.testing.assert_array_equal(tok[i * (t - p) + j].double().numpy(), x16[i, p + j])
    if p:
        np.testing.assert_array_equal(pool_tokens(xt, "cls", p).double().numpy(), x16[:, 0])


@pytest.mark.parametrize("pooling", ["mean", "cls", "tokens", "flatten"])
def test_features_of_one_width_come_in_one_buffer_with_the_values_of_separate_pooling(pooling):
    """From the second pass on, each width's layers are consecutive slices of one buffer (no
    stacking copy in the engine), bit-identical to pooling each layer alone, never overwritten."""
    from cka_geo.functional.batched import as_stack

    model = make_vit()
    names = [f"blocks.{i}.{k}" for i in range(DEPTH) for k in ("attn", "mlp.fc1", "mlp.fc2", "block")]
    names = [n.replace(".block", "") for n in names]
    x1, x2 = images(4, 1), images(3, 2)
    with capture(model, names, pooling=pooling) as cap:
        first = forward_batch(model, x1, cap).features
        second = forward_batch(model, x2, cap).features
        third = forward_batch(model, x1, cap).features
    with capture(model, names, pooling=pooling) as cap:  # reference: a fresh capture's first pass
        ref1 = forward_batch(model, x1, cap).features
    with capture(model, names, pooling=pooling) as cap:
        ref2 = forward_batch(model, x2, cap).features
    for got, ref in ((first, ref1), (second, ref2), (third, ref1)):
        assert list(got) == names
        for n in names:
            assert torch.equal(got[n], ref[n]), n
    for feats in (second, third):  # another batch size (3) too
        by_width: dict[int, list[torch.Tensor]] = {}
        for n in names:
            by_width.setdefault(feats[n].shape[1], []).append(feats[n])
        assert len(by_width) == 2
        assert all(as_stack(group) is not None for group in by_width.values())
    assert as_stack([first[n] for n in names if n.endswith("fc2")]) is None  # the first pass learns the widths
    assert first[names[0]].data_ptr() != third[names[0]].data_ptr()  # each pass its own buffers
