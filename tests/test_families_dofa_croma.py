"""DOFA and CROMA: hand-built files in their exact key layouts, loaded, built and checked
sublayer by sublayer against float64 references written here from the formulas."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from cka_geo.checkpoints import build_model, check_pair, load_checkpoint, save_checkpoint
from cka_geo.errors import ArchitectureMismatchError, CheckpointError, DataError, UsageError
from cka_geo.features import capture, sublayer_map

G = "patch_embed.weight_generator."


def _rand(*shape, scale=0.2):
    return torch.randn(*shape) * scale


def _ln_params(sd, key, d):
    sd[f"{key}.weight"] = 1 + _rand(d, scale=0.1)
    sd[f"{key}.bias"] = _rand(d, scale=0.1)


def _linear(sd, key, out, inp, bias=True, scale=None):
    sd[f"{key}.weight"] = _rand(out, inp, scale=scale or inp**-0.5)
    if bias:
        sd[f"{key}.bias"] = _rand(out, scale=0.05)


# ------------------------------------------------------------------------------ DOFA


def dofa_state_dict(width=128, depth=2, patch=8, grid=4, dyn=128, hidden=2048, tokens=128, classes=5):
    """torchgeo's DOFA key layout (``DOFA.state_dict()``), random weights."""
    torch.manual_seed(0)
    sd = {"cls_token": _rand(1, 1, width), "pos_embed": _rand(1, 1 + grid * grid, width)}
    sd[f"{G}weight_tokens"] = _rand(tokens, dyn, scale=0.02)
    sd[f"{G}bias_token"] = _rand(1, dyn, scale=0.02)
    layer = f"{G}transformer_encoder.layers.0."
    _linear(sd, layer + "self_attn.out_proj", dyn, dyn)
    sd[layer + "self_attn.in_proj_weight"] = _rand(3 * dyn, dyn, scale=dyn**-0.5)
    sd[layer + "self_attn.in_proj_bias"] = _rand(3 * dyn, scale=0.05)
    _linear(sd, layer + "linear1", hidden, dyn)
    _linear(sd, layer + "linear2", dyn, hidden)
    _ln_params(sd, layer + "norm1", dyn)
    _ln_params(sd, layer + "norm2", dyn)
    _linear(sd, f"{G}fc_weight", patch * patch * width, dyn, scale=5 * dyn**-0.5)
    _linear(sd, f"{G}fc_bias", width, dyn, scale=5 * dyn**-0.5)
    _linear(sd, "patch_embed.fclayer.w1", dyn, dyn)
    _linear(sd, "patch_embed.fclayer.w2", dyn, dyn)
    for i in range(depth):
        b = f"blocks.{i}."
        _ln_params(sd, b + "norm1", width)
        _linear(sd, b + "attn.qkv", 3 * width, width)
        _linear(sd, b + "attn.proj", width, width)
        _ln_params(sd, b + "norm2", width)
        _linear(sd, b + "mlp.fc1", 4 * width, width)
        _linear(sd, b + "mlp.fc2", width, 4 * width)
    _ln_params(sd, "fc_norm", width)
    _linear(sd, "head", classes, width)
    return sd


def _ln(x, sd, key, eps):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * sd[f"{key}.weight"] + sd[f"{key}.bias"]


def _lin(x, sd, key):
    y = x @ sd[f"{key}.weight"].T
    return y + sd[f"{key}.bias"] if f"{key}.bias" in sd else y


def _gelu(x):
    return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))


def _mha(q, k, v, heads, bias=None):
    """(T, D) or (B, T, D) projected q/k/v -> attention output before the out projection."""
    *lead, t, d = q.shape
    split = [t_.reshape(*lead, t_.shape[-2], heads, d // heads).transpose(-2, -3) for t_ in (q, k, v)]
    scores = split[0] @ split[1].transpose(-1, -2) / math.sqrt(d // heads)
    if bias is not None:
        scores = scores + bias
    out = torch.softmax(scores, dim=-1) @ split[2]
    return out.transpose(-2, -3).reshape(*lead, t, d)


def dofa_reference(sd, x, wavelengths, heads, patch):
    """DOFA's forward in float64, from its definition; canonical sublayer outputs."""
    sd = {k: v.double() for k, v in sd.items()}
    x = x.double()
    dyn = sd[f"{G}bias_token"].shape[1]
    # wavelength encoding: DOFA forms the sinusoid's argument in float32 (spec), then sin/cos
    lam = torch.tensor(wavelengths, dtype=torch.float32) * 1000
    omega = 1.0 / 10000 ** (torch.arange(dyn // 2, dtype=torch.float32) / (dyn / 2))
    arg = (lam[:, None] * omega[None, :]).double()
    e = torch.cat([arg.sin(), arg.cos()], dim=1)
    e = e + torch.relu(_lin(torch.relu(_lin(e, sd, "patch_embed.fclayer.w1")), sd, "patch_embed.fclayer.w2"))
    wt = sd[f"{G}weight_tokens"]
    seq = torch.cat([wt, e, sd[f"{G}bias_token"]])
    layer = f"{G}transformer_encoder.layers.0."
    q, k, v = (seq @ sd[layer + "self_attn.in_proj_weight"].T + sd[layer + "self_attn.in_proj_bias"]).chunk(3, -1)
    seq = _ln(seq + _lin(_mha(q, k, v, 4), sd, layer + "self_attn.out_proj"), sd, layer + "norm1", 1e-5)
    ff = _lin(_gelu(_lin(seq, sd, layer + "linear1")), sd, layer + "linear2")
    seq = _ln(seq + ff, sd, layer + "norm2", 1e-5)
    c, d = len(wavelengths), sd["cls_token"].shape[-1]
    kernels = _lin(seq[wt.shape[0] : -1] + e, sd, f"{G}fc_weight").reshape(c, patch, patch, d) * 0.01
    bias = _lin(seq[-1], sd, f"{G}fc_bias") * 0.01
    # patch convolution, stride p, zero padding 1: patch (r, c) starts at pixel (rp - 1, cp - 1)
    b, _, h, w = x.shape
    gh, gw = h // patch, w // patch
    xp = F.pad(x, (1, 1, 1, 1))[:, :, : gh * patch, : gw * patch]
    patches = xp.reshape(b, c, gh, patch, gw, patch)
    tokens = torch.einsum("bcrisj,cijd->brsd", patches, kernels).reshape(b, gh * gw, d) + bias
    pos = sd["pos_embed"]
    g = math.isqrt(pos.shape[1] - 1)
    grid = pos[:, 1:]
    if (gh, gw) != (g, g):  # bicubic, antialiased resampling (timm's) of the position grid
        grid = F.interpolate(grid.reshape(1, g, g, d).permute(0, 3, 1, 2), size=(gh, gw),
                             mode="bicubic", align_corners=False, antialias=True)
        grid = grid.permute(0, 2, 3, 1).reshape(1, gh * gw, d)
    z = torch.cat([(sd["cls_token"] + pos[:, :1]).expand(b, -1, -1), tokens + grid], dim=1)
    out = {}
    for i in range(len({k.split(".")[1] for k in sd if k.startswith("blocks.")})):
        p = f"blocks.{i}."
        q, k, v = _lin(_ln(z, sd, p + "norm1", 1e-6), sd, p + "attn.qkv").chunk(3, -1)
        out[f"blocks.{i}.attn"] = a = _lin(_mha(q, k, v, heads), sd, p + "attn.proj")
        z = z + a
        out[f"blocks.{i}.mlp.fc1"] = f1 = _lin(_ln(z, sd, p + "norm2", 1e-6), sd, p + "mlp.fc1")
        out[f"blocks.{i}.mlp.act"] = act = _gelu(f1)
        out[f"blocks.{i}.mlp.fc2"] = f2 = _lin(act, sd, p + "mlp.fc2")
        out[f"blocks.{i}"] = z = z + f2
    return out


def _captured(model, x, exact=False):
    """Canonical sublayer outputs (B, T·D): through capture (float32), or plain hooks."""
    names = sublayer_map(model)
    if not exact:
        with capture(model, list(names), pooling="flatten") as cap:
            model(x)
            return cap.pop()
    got = {}
    handles = [
        model.get_submodule(path).register_forward_hook(
            lambda m, a, o, n=name: got.__setitem__(n, o.reshape(o.shape[0], -1))
        )
        for name, path in names.items()
    ]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return {n: got[n] for n in names}


def _assert_close(model, x, ref, rtol):
    exact = next(model.parameters()).dtype == torch.float64
    got = _captured(model, x, exact)
    assert list(got) == list(ref)
    for name, r in ref.items():
        r = r.reshape(r.shape[0], -1)
        err = float((got[name].double() - r).abs().max() / r.abs().max())
        assert err < rtol, f"{name}: relative error {err:.2e}"


@pytest.mark.parametrize("size", [32, 48])  # native (4 x 4 patches) and another resolution
def test_dofa_matches_the_reference(tmp_path, size):
    sd = dofa_state_dict()
    torch.save(sd, tmp_path / "dofa_base_patch16_224.pth")
    loaded = load_checkpoint(tmp_path / "dofa_base_patch16_224.pth", wavelengths=["B4", "B3", "B2", "B8"])
    assert loaded.family == "dofa" and loaded.config.img_size == 32 and loaded.config.in_chans == 4
    wl = [0.665, 0.56, 0.49, 0.832]
    assert loaded.config.wavelengths == wl
    assert any("wavelengths (µm) used: [0.665, 0.56, 0.49, 0.832]" in n for n in loaded.notes)
    model = build_model(loaded)
    assert model.canonical_sublayers()["blocks.1.mlp.fc1"] == "blocks.1.mlp.fc1"
    x = torch.randn(2, 4, size, size)
    ref = dofa_reference(sd, x, wl, heads=2, patch=8)
    _assert_close(model, x, ref, 1e-5)  # float32 model
    _assert_close(model.double(), x.double(), ref, 1e-6)  # the float32 wavelength encoding


def test_dofa_default_wavelengths_and_overrides(tmp_path):
    sd = dofa_state_dict(width=64, depth=1, dyn=16, hidden=32, tokens=8)
    torch.save(sd, tmp_path / "dofa.pt")
    loaded = load_checkpoint(tmp_path / "dofa.pt")
    assert loaded.config.in_chans == 13 and loaded.config.wavelengths[8] == 0.864  # B8A
    assert any("13 Sentinel-2 L1C bands" in n for n in loaded.notes)
    assert load_checkpoint(tmp_path / "dofa.pt", wavelengths=10).config.in_chans == 10
    model = build_model(loaded, wavelengths=[0.49, 2.2])
    assert model(torch.randn(1, 2, 32, 32)).shape == (1, 64)
    with pytest.raises(DataError, match="13 bands but the model expects 2"):
        model(torch.randn(1, 13, 32, 32))
    # TerraTorch Lightning file: band names in hyper_parameters
    ckpt = {
        "state_dict": {f"model.encoder.dofa_model.{k}": v for k, v in sd.items()},
        "hyper_parameters": {"model_args": {"backbone_model_bands": ["BLUE", "GREEN", "RED"]}},
    }
    torch.save(ckpt, tmp_path / "epoch=1.ckpt")
    tt = load_checkpoint(tmp_path / "epoch=1.ckpt")
    assert tt.family == "dofa" and tt.config.wavelengths == [0.49, 0.56, 0.665]
    assert tt.prefix == "state_dict.model.encoder.dofa_model."
    report = check_pair(loaded, load_checkpoint(tmp_path / "dofa.pt"))
    assert report.identical and "blocks.0.mlp.fc1" in report.sublayer_change
    with pytest.raises(ArchitectureMismatchError, match="config wavelengths"):
        check_pair(loaded, load_checkpoint(tmp_path / "dofa.pt", wavelengths=12))


def test_dofa_project_file_roundtrip(tmp_path):
    torch.save(dofa_state_dict(width=64, depth=1, dyn=16, hidden=32, tokens=8), tmp_path / "d.pt")
    loaded = load_checkpoint(tmp_path / "d.pt", wavelengths=[0.5, 0.6, 0.7])
    model = build_model(loaded)
    save_checkpoint(tmp_path / "mine.safetensors", model, loaded.config)
    back = load_checkpoint(tmp_path / "mine.safetensors")
    assert back.family == "dofa" and back.config == loaded.config
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(build_model(back)(x), model(x))
    other = load_checkpoint(tmp_path / "mine.safetensors", wavelengths=["B2"])
    assert other.config.wavelengths == [0.49] and other.config.in_chans == 1


@pytest.mark.parametrize(
    ("wavelengths", "match"),
    [
        (7, "no Sentinel-2 selection of 7 bands is known"),
        (["B4", "B13"], "unknown band name 'B13'"),
        ([0.5, -1.0], "wavelength -1.0 is not a positive number"),
        ("B4", "must be a list"),
    ],
)
def test_dofa_bad_wavelengths_refused_in_one_line(tmp_path, wavelengths, match):
    torch.save(dofa_state_dict(width=64, depth=1, dyn=16, hidden=32, tokens=8), tmp_path / "d.pt")
    with pytest.raises(CheckpointError, match=match) as info:
        load_checkpoint(tmp_path / "d.pt", wavelengths=wavelengths)
    assert "\n" not in str(info.value) and str(info.value).startswith(str(tmp_path / "d.pt"))


def test_wavelengths_for_another_family(tmp_path):
    torch.save(croma_file(depth=1), tmp_path / "c.pt")
    loaded = load_checkpoint(tmp_path / "c.pt", wavelengths=[0.5])
    assert any(n.startswith("wavelengths ignored: a croma encoder") for n in loaded.notes)
    with pytest.raises(UsageError, match="wavelengths apply to DOFA only"):
        build_model(loaded, wavelengths=[0.5])


# ----------------------------------------------------------------------------- CROMA


def _croma_attention(sd, key, d, qkv_bias=False):
    _ln_params(sd, f"{key}.input_norm", d)
    _linear(sd, f"{key}.to_qkv", 3 * d, d, bias=qkv_bias)
    _linear(sd, f"{key}.to_out", d, d)


def _croma_ffn(sd, key, d):
    _ln_params(sd, f"{key}.input_norm", d)
    _linear(sd, f"{key}.net.0", 4 * d, d)
    _linear(sd, f"{key}.net.3", d, 4 * d)


def croma_encoder(width=32, depth=2, bands=12):
    """One of CROMA's ViT encoders (``s2_encoder`` / ``s1_encoder``) as torchgeo names it."""
    sd = {}
    _linear(sd, "linear_input", width, 64 * bands)
    for i in range(depth):
        _croma_attention(sd, f"transformer.layers.{i}.0", width)
        _croma_ffn(sd, f"transformer.layers.{i}.1", width)
    _ln_params(sd, "transformer.norm_out", width)
    return sd


def croma_file(width=32, depth=2, sar=True, optical=True):
    """CROMA's released layout: a dict of dicts (encoders, GAP heads, joint encoder)."""
    torch.manual_seed(1)
    out = {}
    if optical:
        out["s2_encoder"] = croma_encoder(width, depth, 12)
        gap = {}
        _ln_params(gap, "0", width)
        _linear(gap, "1", 4 * width, width)
        _linear(gap, "3", width, 4 * width)
        out["s2_GAP_FFN"] = gap
    if sar:
        out["s1_encoder"] = croma_encoder(width, max(depth // 2, 1), 2)
    if sar and optical:
        joint = {}
        for i in range(max(depth // 2, 1)):
            _croma_attention(joint, f"layers.{i}.0", width)
            _ln_params(joint, f"layers.{i}.1.input_norm", width)
            for n in ("to_q", "to_k", "to_v"):
                _linear(joint, f"layers.{i}.1.{n}", width, width, bias=False)
            _linear(joint, f"layers.{i}.1.to_out", width, width)
            _croma_ffn(joint, f"layers.{i}.2", width)
        _ln_params(joint, "norm_out", width)
        out["joint_encoder"] = joint
    return out


def croma_reference(sd, x, heads=16, patch=8):
    """CROMA's encoder in float64 from its definition: canonical sublayer outputs."""
    sd = {k: v.double() for k, v in sd.items()}
    b, c, h, w = x.shape
    gh, gw = h // patch, w // patch
    # patch (r, s) flattened as (band, row, col)
    patches = x.double().reshape(b, c, gh, patch, gw, patch).permute(0, 2, 4, 1, 3, 5)
    z = _lin(patches.reshape(b, gh * gw, c * patch * patch), sd, "linear_input")
    cells = [(r, s) for r in range(gh) for s in range(gw)]
    dist = torch.tensor([[math.hypot(p[0] - q[0], p[1] - q[1]) for q in cells] for p in cells],
                        dtype=torch.float64)
    slopes = torch.tensor([2.0 ** (-8.0 * (i + 1) / heads) for i in range(heads)], dtype=torch.float64)
    bias = -slopes[:, None, None] * dist  # (heads, N, N), broadcast over the batch
    out = {}
    depth = len({k.split(".")[2] for k in sd if k.startswith("transformer.layers.")})
    for i in range(depth):
        p = f"transformer.layers.{i}."
        q, k, v = _lin(_ln(z, sd, p + "0.input_norm", 1e-5), sd, p + "0.to_qkv").chunk(3, -1)
        out[f"blocks.{i}.attn"] = a = _lin(_mha(q, k, v, heads, bias), sd, p + "0.to_out")
        z = z + a
        out[f"blocks.{i}.mlp.fc1"] = f1 = _lin(_ln(z, sd, p + "1.input_norm", 1e-5), sd, p + "1.net.0")
        out[f"blocks.{i}.mlp.act"] = act = _gelu(f1)
        out[f"blocks.{i}.mlp.fc2"] = f2 = _lin(act, sd, p + "1.net.3")
        out[f"blocks.{i}"] = z = z + f2
    return out


@pytest.mark.parametrize("size", [(120, 120), (48, 64)])  # native, and a rectangular other size
def test_croma_matches_the_reference(tmp_path, size):
    ckpt = croma_file()
    torch.save(ckpt, tmp_path / "CROMA_base.pt")
    loaded = load_checkpoint(tmp_path / "CROMA_base.pt")
    assert loaded.family == "croma" and loaded.prefix == "s2_encoder."
    cfg = loaded.config
    assert (cfg.img_size, cfg.in_chans, cfg.embed_dim, cfg.depth, cfg.num_heads) == (120, 12, 32, 2, 16)
    assert any(k.startswith("joint_encoder.") for k in loaded.ignored)
    model = build_model(loaded)
    assert model.num_prefix_tokens == 0 and model.batch_first
    assert model.canonical_sublayers()["blocks.1.mlp.fc2"] == "transformer.layers.1.1.net.3"
    x = torch.randn(2, 12, *size)
    ref = croma_reference(ckpt["s2_encoder"], x)
    _assert_close(model, x, ref, 1e-5)
    _assert_close(model.double(), x.double(), ref, 1e-10)
    with capture(model, ["blocks.0.mlp.fc1"]) as cap:  # mean pooling over all tokens
        model(x.double())
        assert cap.pop()["blocks.0.mlp.fc1"].shape == (2, 128)
    with pytest.raises(UsageError, match="no class token"), capture(model, pooling="cls"):
        pass


def test_croma_sar_pangaea_and_project_file(tmp_path):
    ckpt = croma_file()
    torch.save(ckpt, tmp_path / "CROMA_base.pt")
    sar = load_checkpoint(tmp_path / "CROMA_base.pt", prefix="s1_encoder.")
    assert (sar.config.in_chans, sar.config.depth, sar.config.modality) == (2, 1, "sar")
    x = torch.randn(1, 2, 16, 24)
    _assert_close(build_model(sar), x, croma_reference(ckpt["s1_encoder"], x), 1e-5)
    pangaea = {"model": {f"encoder.s2_encoder.{k}": v for k, v in ckpt["s2_encoder"].items()},
               "epoch": 3}
    torch.save(pangaea, tmp_path / "checkpoint_best.pth")
    pl = load_checkpoint(tmp_path / "checkpoint_best.pth")
    assert pl.family == "croma" and pl.prefix == "model.encoder.s2_encoder."
    report = check_pair(load_checkpoint(tmp_path / "CROMA_base.pt"), pl)
    assert report.identical and "blocks.1.mlp.fc1" in report.sublayer_change
    model = build_model(pl)
    save_checkpoint(tmp_path / "mine.pt", model, pl.config)
    back = load_checkpoint(tmp_path / "mine.pt")
    assert back.family == "croma" and back.config == pl.config


@pytest.mark.parametrize(
    ("ckpt", "prefix", "match"),
    [
        (croma_file(optical=False), None, "only the SAR encoder .*pass prefix='s1_encoder.'"),
        (croma_file(), "joint_encoder.", "joint encoder .* is not supported"),
        ({"s2_encoder": {k: v for k, v in croma_encoder().items() if "linear_input" not in k}},
         None, "lacks linear_input.weight"),
    ],
)
def test_croma_refusals_in_one_line(tmp_path, ckpt, prefix, match):
    torch.save(ckpt, tmp_path / "CROMA.pt")
    with pytest.raises(CheckpointError, match=match) as info:
        load_checkpoint(tmp_path / "CROMA.pt", prefix=prefix)
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith(str(tmp_path / "CROMA.pt")) and "CROMA" in msg
