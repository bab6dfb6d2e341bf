"""The ViT against an independent float64 reference written from the architecture."""

from __future__ import annotations

import math

import pytest
import torch

from cka_geo.errors import DataError, UsageError
from cka_geo.vit import VisionTransformer, ViTConfig, resample_pos_embed

# ---------------------------------------------------------------------------- reference


def _ln(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, eps: float) -> torch.Tensor:
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * w + b


def _gelu(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def _softmax(s: torch.Tensor) -> torch.Tensor:
    e = torch.exp(s - s.max(-1, keepdim=True).values)
    return e / e.sum(-1, keepdim=True)


def reference_forward(sd: dict[str, torch.Tensor], cfg: ViTConfig, x: torch.Tensor) -> torch.Tensor:
    """timm's ViT forward in float64, written from the architecture (no nn modules)."""
    sd = {k: v.double() for k, v in sd.items()}
    x = x.double()
    b, c, h, w = x.shape
    p, d, nh = cfg.patch_size, cfg.embed_dim, cfg.num_heads
    gh, gw = h // p, w // p
    # patch conv as a matrix product over flattened (band, row, col) patches
    patches = x.reshape(b, c, gh, p, gw, p).permute(0, 2, 4, 1, 3, 5).reshape(b, gh * gw, c * p * p)
    t = patches @ sd["patch_embed.proj.weight"].reshape(d, -1).T + sd["patch_embed.proj.bias"]
    if cfg.no_embed_class:
        t = t + sd["pos_embed"]
        if cfg.class_token:
            t = torch.cat([sd["cls_token"].expand(b, 1, d), t], 1)
    else:
        if cfg.class_token:
            t = torch.cat([sd["cls_token"].expand(b, 1, d), t], 1)
        t = t + sd["pos_embed"]
    eps, hd = cfg.norm_eps, d // nh
    for i in range(cfg.depth):

        def g(n: str, i: int = i) -> torch.Tensor:
            return sd[f"blocks.{i}.{n}"]

        y = _ln(t, g("norm1.weight"), g("norm1.bias"), eps)
        qkv = y @ g("attn.qkv.weight").T
        if cfg.qkv_bias:
            qkv = qkv + g("attn.qkv.bias")
        q, k, v = (
            qkv[..., j * d : (j + 1) * d].reshape(b, -1, nh, hd).transpose(1, 2) for j in range(3)
        )
        a = _softmax(q @ k.transpose(-1, -2) / math.sqrt(hd)) @ v
        a = a.transpose(1, 2).reshape(b, -1, d) @ g("attn.proj.weight").T + g("attn.proj.bias")
        if cfg.layer_scale is not None:
            a = a * g("ls1.gamma")
        t = t + a
        y = _ln(t, g("norm2.weight"), g("norm2.bias"), eps)
        m = _gelu(y @ g("mlp.fc1.weight").T + g("mlp.fc1.bias")) @ g("mlp.fc2.weight").T + g(
            "mlp.fc2.bias"
        )
        if cfg.layer_scale is not None:
            m = m * g("ls2.gamma")
        t = t + m
    if "norm.weight" in sd:
        t = _ln(t, sd["norm.weight"], sd["norm.bias"], eps)
    pooled = t[:, cfg.num_prefix_tokens :].mean(1) if cfg.global_pool == "avg" else t[:, 0]
    if "fc_norm.weight" in sd:
        pooled = _ln(pooled, sd["fc_norm.weight"], sd["fc_norm.bias"], eps)
    if "head.weight" in sd:
        pooled = pooled @ sd["head.weight"].T + sd["head.bias"]
    return pooled


def randomised(cfg: ViTConfig, seed: int = 0) -> VisionTransformer:
    """A model whose every parameter (LayerNorm, gamma, biases too) is random."""
    torch.manual_seed(seed)
    model = VisionTransformer(cfg)
    with torch.no_grad():
        for name, param in model.named_parameters():
            base = (
                1.0
                if name.endswith(("norm1.weight", "norm2.weight", "norm.weight", "gamma"))
                else 0.0
            )
            param.copy_(base + 0.3 * torch.randn_like(param))
    return model.double().eval()


CONFIGS = {
    "cls-13bands-p8": ViTConfig(
        img_size=32, patch_size=8, in_chans=13, embed_dim=32, depth=2, num_heads=2
    ),
    "nocls-6bands-p4-ls": ViTConfig(
        img_size=16,
        patch_size=4,
        in_chans=6,
        embed_dim=24,
        depth=2,
        num_heads=3,
        class_token=False,
        layer_scale=0.5,
    ),
    "noqkvbias-3bands-head": ViTConfig(
        img_size=24,
        patch_size=8,
        in_chans=3,
        embed_dim=32,
        depth=3,
        num_heads=4,
        qkv_bias=False,
        num_classes=5,
        mlp_hidden_dim=40,
    ),
    "avg-fcnorm-2bands": ViTConfig(
        img_size=20,
        patch_size=5,
        in_chans=2,
        embed_dim=16,
        depth=1,
        num_heads=1,
        global_pool="avg",
        norm_eps=1e-5,
    ),
    "no-embed-class-nofinal": ViTConfig(
        img_size=16,
        patch_size=4,
        in_chans=4,
        embed_dim=16,
        depth=2,
        num_heads=2,
        no_embed_class=True,
        final_norm=False,
        layer_scale=1e-2,
    ),
    "nocls-norm-not-fcnorm": ViTConfig(
        img_size=16,
        patch_size=8,
        in_chans=13,
        embed_dim=16,
        depth=2,
        num_heads=2,
        class_token=False,
        fc_norm=False,
    ),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_forward_matches_float64_reference(name):
    cfg = CONFIGS[name]
    model = randomised(cfg)
    torch.manual_seed(1)
    x = torch.randn(3, cfg.in_chans, cfg.img_size, cfg.img_size, dtype=torch.float64)
    with torch.no_grad():
        got = model(x)
    want = reference_forward(model.state_dict(), cfg, x)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_reference_detects_a_wrong_head_count():
    """The oracle is sensitive to the head split (so the test above can fail)."""
    cfg = CONFIGS["cls-13bands-p8"]
    model = randomised(cfg)
    x = torch.randn(2, 13, 32, 32, dtype=torch.float64)
    other = ViTConfig(**{**cfg.to_dict(), "num_heads": 1})
    with torch.no_grad():
        assert not torch.allclose(model(x), reference_forward(model.state_dict(), other, x))


def test_module_names_are_timm_keys():
    cfg = ViTConfig(
        img_size=16, patch_size=8, in_chans=3, embed_dim=16, depth=1, num_heads=1, layer_scale=1.0
    )
    keys = set(VisionTransformer(cfg).state_dict())
    for key in (
        "patch_embed.proj.weight",
        "cls_token",
        "pos_embed",
        "blocks.0.norm1.weight",
        "blocks.0.attn.qkv.weight",
        "blocks.0.attn.proj.bias",
        "blocks.0.ls1.gamma",
        "blocks.0.mlp.fc1.weight",
        "blocks.0.mlp.fc2.bias",
        "blocks.0.ls2.gamma",
        "norm.weight",
    ):
        assert key in keys
    model = VisionTransformer(cfg)
    assert model.batch_first is True and model.num_prefix_tokens == 1
    subs = model.canonical_sublayers()
    assert list(subs) == [
        "blocks.0.attn",
        "blocks.0.mlp.fc1",
        "blocks.0.mlp.act",
        "blocks.0.mlp.fc2",
        "blocks.0",
    ]
    modules = dict(model.named_modules())
    assert all(path in modules for path in subs.values())


# ---------------------------------------------------------------- pos_embed resampling


def _aa_bicubic_weights(n_in: int, n_out: int) -> torch.Tensor:
    """(n_out, n_in) weights of an antialiased bicubic resize (Keys, a = -0.5, PIL style)."""

    def cubic(t: float) -> float:
        a, t = -0.5, abs(t)
        if t < 1:
            return (a + 2) * t**3 - (a + 3) * t**2 + 1
        if t < 2:
            return a * t**3 - 5 * a * t**2 + 8 * a * t - 4 * a
        return 0.0

    scale = n_in / n_out
    support = 2.0 * max(scale, 1.0)
    inv = 1.0 / max(scale, 1.0)
    w = torch.zeros(n_out, n_in, dtype=torch.float64)
    for i in range(n_out):
        center = scale * (i + 0.5)
        lo = max(int(center - support + 0.5), 0)
        hi = min(int(center + support + 0.5), n_in)
        for j in range(lo, hi):
            w[i, j] = cubic((j - center + 0.5) * inv)
        w[i] /= w[i].sum()
    return w


@pytest.mark.parametrize(("old", "new"), [(4, 6), (6, 4), (5, 5), (3, 7)])
def test_resample_pos_embed_matches_separable_reference(old, new):
    torch.manual_seed(0)
    d = 5
    pos = torch.randn(1, 1 + old * old, d, dtype=torch.float64)
    out = resample_pos_embed(pos, (new, new), num_prefix_tokens=1)
    assert out.shape == (1, 1 + new * new, d)
    assert torch.equal(out[:, :1], pos[:, :1])
    w = _aa_bicubic_weights(old, new)
    grid = pos[0, 1:].reshape(old, old, d)
    want = torch.einsum("ia,jb,abd->ijd", w, w, grid).reshape(1, new * new, d)
    torch.testing.assert_close(out[:, 1:], want, rtol=1e-9, atol=1e-9)


def test_resample_keeps_constants_and_rejects_non_square():
    pos = torch.full((1, 16, 3), 2.5, dtype=torch.float64)
    torch.testing.assert_close(
        resample_pos_embed(pos, (6, 3), 0), torch.full((1, 18, 3), 2.5, dtype=torch.float64)
    )
    with pytest.raises(DataError, match="not square"):
        resample_pos_embed(torch.zeros(1, 1 + 15, 3), (4, 4), 1)


def test_dynamic_img_size_runs_other_sizes_and_static_refuses():
    cfg = ViTConfig(img_size=16, patch_size=4, in_chans=3, embed_dim=16, depth=1, num_heads=2)
    model = randomised(cfg)
    with pytest.raises(DataError, match="differs"):
        model(torch.zeros(1, 3, 24, 24, dtype=torch.float64))
    with pytest.raises(DataError, match="bands"):
        model(torch.zeros(1, 4, 16, 16, dtype=torch.float64))
    dyn = (
        VisionTransformer(ViTConfig(**{**cfg.to_dict(), "dynamic_img_size": True})).double().eval()
    )
    dyn.load_state_dict(model.state_dict())
    x = torch.randn(2, 3, 24, 16, dtype=torch.float64)
    with torch.no_grad():
        assert dyn.forward_features(x).shape == (2, 1 + 6 * 4, 16)
        y = torch.randn(2, 3, 16, 16, dtype=torch.float64)
        assert torch.equal(dyn(y), model(y))


# ---------------------------------------------------------------- forward_intermediates


def test_forward_intermediates_shapes_and_values():
    cfg = ViTConfig(img_size=24, patch_size=4, in_chans=6, embed_dim=16, depth=4, num_heads=2)
    model = randomised(cfg)
    x = torch.randn(2, 6, 24, 24, dtype=torch.float64)
    with torch.no_grad():
        outs = model.forward_intermediates(x, [3, 0, -3])
        normed = model.forward_intermediates(x, [-1], norm=True)[0]
        t = model.embed(x)
        per_block = []
        for blk in model.blocks:
            t = blk(t)
            per_block.append(t)
    assert [tuple(o.shape) for o in outs] == [(2, 16, 6, 6)] * 3
    for o, j in zip(outs, [3, 0, 1], strict=True):
        want = per_block[j][:, 1:].transpose(1, 2).reshape(2, 16, 6, 6)
        torch.testing.assert_close(o, want, rtol=0, atol=0)
    want = model.norm(per_block[3])[:, 1:].transpose(1, 2).reshape(2, 16, 6, 6)
    torch.testing.assert_close(normed, want, rtol=0, atol=0)
    # a row of the map is a row of the patch grid
    torch.testing.assert_close(outs[0][:, :, 1, 2], per_block[3][:, 1 + 1 * 6 + 2])
    with pytest.raises(UsageError, match="out of range"):
        model.forward_intermediates(x, [4])


def test_config_validation_and_dict_round_trip():
    cfg = CONFIGS["nocls-6bands-p4-ls"]
    assert ViTConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(UsageError, match="divisible"):
        ViTConfig(embed_dim=30, num_heads=4)
    with pytest.raises(UsageError, match="unknown keys"):
        ViTConfig.from_dict({"bogus": 1})
