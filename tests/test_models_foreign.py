"""Foreign layouts (Hugging Face, open_clip, timm variants) convert exactly into the timm-named ViT.

Each test writes a hand-built state dict in a library's key layout (no library imported),
loads it, and compares every canonical sublayer with a float64 forward written from the
formulas (tests/_foreign_reference.py) on the foreign weights themselves.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from safetensors.torch import save_file

from _foreign_reference import forward, random_generic
from cka_geo.checkpoints import build_model, load_checkpoint
from cka_geo.errors import CheckpointError
from cka_geo.features import capture, forward_batch


def cat(*ts):
    return torch.cat(ts, 0)


def assert_matches(loaded, g, size, bands=3, rtol=1e-5):
    model = build_model(loaded).double()
    x = torch.randn(2, bands, *size, dtype=torch.float64)
    want = forward(g, x)
    names = list(want)
    with capture(model, names, pooling="flatten") as cap:
        got = forward_batch(model, x, cap).features
    for n in names:
        torch.testing.assert_close(got[n].double(), want[n].flatten(1), rtol=rtol, atol=1e-6, msg=n)  # capture returns float32


def timm_sd(g, swiglu_unpacked=False, qv_bias=False):
    sd = {"patch_embed.proj.weight": g["patch_w"], "patch_embed.proj.bias": g["patch_b"], "pos_embed": g["pos"]}
    for name, t in zip(("cls_token", "dist_token"), g["prefix"][:2], strict=False):
        sd[name] = t
    if len(g["prefix"]) == 2 and g["prefix"][1].shape[1] > 1:
        sd["reg_token"] = sd.pop("dist_token")
    if g["pre_norm"] is not None:
        sd["norm_pre.weight"], sd["norm_pre.bias"] = g["pre_norm"]
    for i, b in enumerate(g["blocks"]):
        p = f"blocks.{i}."
        sd[p + "norm1.weight"], sd[p + "norm1.bias"] = b["n1"]
        sd[p + "norm2.weight"], sd[p + "norm2.bias"] = b["n2"]
        sd[p + "attn.qkv.weight"] = cat(b["q"][0], b["k"][0], b["v"][0])
        if qv_bias:
            sd[p + "attn.q_bias"], sd[p + "attn.v_bias"] = b["q"][1], b["v"][1]
        else:
            sd[p + "attn.qkv.bias"] = cat(b["q"][1], b["k"][1], b["v"][1])
        sd[p + "attn.proj.weight"], sd[p + "attn.proj.bias"] = b["o"]
        if b["qn"] is not None:
            sd[p + "attn.q_norm.weight"], sd[p + "attn.q_norm.bias"] = b["qn"]
            sd[p + "attn.k_norm.weight"], sd[p + "attn.k_norm.bias"] = b["kn"]
        if swiglu_unpacked:
            h = b["fc1"][0].shape[0] // 2
            sd[p + "mlp.fc1_g.weight"], sd[p + "mlp.fc1_x.weight"] = b["fc1"][0][:h], b["fc1"][0][h:]
            sd[p + "mlp.fc1_g.bias"], sd[p + "mlp.fc1_x.bias"] = b["fc1"][1][:h], b["fc1"][1][h:]
        else:
            sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"] = b["fc1"]
        sd[p + "mlp.fc2.weight"], sd[p + "mlp.fc2.bias"] = b["fc2"]
        if b["ls1"] is not None:
            sd[p + "ls1.gamma"], sd[p + "ls2.gamma"] = b["ls1"], b["ls2"]
    return sd


def hf_sd(g, layout="4.x", dinov2=False, fold_cls=None):
    """Hugging Face ViT / DINOv2 keys: '4.x' (save_pretrained files) or '5.x' (module state_dict)."""
    sd = {
        "embeddings.patch_embeddings.projection.weight": g["patch_w"],
        "embeddings.patch_embeddings.projection.bias": g["patch_b"],
        "embeddings.cls_token": g["prefix"][0], "embeddings.position_embeddings": g["pos"],
        "embeddings.mask_token": torch.zeros(1, g["pos"].shape[-1], dtype=torch.float64),
        "pooler.dense.weight": torch.zeros(4, 4, dtype=torch.float64),
    }
    if fold_cls is not None:  # registers: HF positions cover the class token, not the registers
        sd["embeddings.register_tokens"] = g["prefix"][1]
        sd["embeddings.cls_token"] = g["prefix"][0] - fold_cls
        sd["embeddings.position_embeddings"] = torch.cat([fold_cls, g["pos"]], 1)
    base = "encoder.layer." if layout == "4.x" or dinov2 else "layers."
    for i, b in enumerate(g["blocks"]):
        p = f"{base}{i}."
        if layout == "4.x":
            names = {"q": "attention.attention.query", "k": "attention.attention.key",
                     "v": "attention.attention.value", "o": "attention.output.dense"}
        else:
            names = {"q": "attention.q_proj", "k": "attention.k_proj", "v": "attention.v_proj", "o": "attention.o_proj"}
        for n, key in names.items():
            sd[p + key + ".weight"], sd[p + key + ".bias"] = b[n]
        n1, n2 = ("norm1", "norm2") if dinov2 else ("layernorm_before", "layernorm_after")
        sd[p + n1 + ".weight"], sd[p + n1 + ".bias"] = b["n1"]
        sd[p + n2 + ".weight"], sd[p + n2 + ".bias"] = b["n2"]
        if g["glu"]:
            if layout == "4.x":
                sd[p + "mlp.weights_in.weight"], sd[p + "mlp.weights_in.bias"] = b["fc1"]
                sd[p + "mlp.weights_out.weight"], sd[p + "mlp.weights_out.bias"] = b["fc2"]
            else:
                h = b["fc1"][0].shape[0] // 2
                sd[p + "mlp.gate_proj.weight"], sd[p + "mlp.up_proj.weight"] = b["fc1"][0][:h], b["fc1"][0][h:]
                sd[p + "mlp.gate_proj.bias"], sd[p + "mlp.up_proj.bias"] = b["fc1"][1][:h], b["fc1"][1][h:]
                sd[p + "mlp.down_proj.weight"], sd[p + "mlp.down_proj.bias"] = b["fc2"]
        elif dinov2 or layout == "5.x":
            sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"] = b["fc1"]
            sd[p + "mlp.fc2.weight"], sd[p + "mlp.fc2.bias"] = b["fc2"]
        else:
            sd[p + "intermediate.dense.weight"], sd[p + "intermediate.dense.bias"] = b["fc1"]
            sd[p + "output.dense.weight"], sd[p + "output.dense.bias"] = b["fc2"]
        if b["ls1"] is not None:
            sd[p + "layer_scale1.lambda1"], sd[p + "layer_scale2.lambda1"] = b["ls1"], b["ls2"]
    d = g["pos"].shape[-1]
    sd["layernorm.weight"], sd["layernorm.bias"] = torch.ones(d, dtype=torch.float64), torch.zeros(d, dtype=torch.float64)
    return sd


def hf_folder(tmp_path, sd, config, prefix=""):
    folder = tmp_path / "hf"
    folder.mkdir()
    save_file({prefix + k: v.contiguous() for k, v in sd.items()}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def vit_config(g, **kw):
    base = {"architectures": ["ViTModel"], "model_type": "vit", "num_attention_heads": g["heads"],
            "layer_norm_eps": g["eps"], "hidden_act": "gelu", "image_size": 32, "patch_size": 8}
    return {**base, **kw}


@pytest.mark.parametrize("layout", ["4.x", "5.x"])
def test_hf_vit_folder_converts_exactly(tmp_path, layout):
    g = random_generic(eps=1e-12, heads=4, act="gelu_tanh")
    folder = hf_folder(tmp_path, hf_sd(g, layout), vit_config(g, hidden_act="gelu_pytorch_tanh",
                       architectures=["ViTForImageClassification"]), prefix="vit.")
    loaded = load_checkpoint(folder)
    c = loaded.config
    assert (loaded.source, loaded.prefix, c.num_heads, c.norm_eps, c.act) == ("hf_vit", "vit.", 4, 1e-12, "gelu_tanh")
    assert loaded.assumed == [] and "vit.pooler.dense.weight" in loaded.ignored
    assert_matches(loaded, g, (32, 32))


def test_hf_vit_twelve_heads_at_width_384_from_config(tmp_path):
    """Width 384 would be read as 6 heads; the stored config's 12 must win (never a silent wrong forward)."""
    g = random_generic(d=384, depth=1, heads=12, hidden=96, eps=1e-12)
    loaded = load_checkpoint(hf_folder(tmp_path, hf_sd(g), vit_config(g)))
    assert loaded.config.num_heads == 12
    assert_matches(loaded, g, (32, 32))


def test_hf_dinov2_registers_layerscale_swiglu(tmp_path):
    gen = random_generic(n_prefix=(1, 2), covers=False, ls=True, glu=True, act="silu", eps=1e-6)
    fold = torch.randn(1, 1, 32, dtype=torch.float64) * 0.1
    sd = hf_sd(gen, "4.x", dinov2=True, fold_cls=fold)
    cfg = {"architectures": ["Dinov2WithRegistersModel"], "model_type": "dinov2_with_registers",
           "num_attention_heads": 4, "layer_norm_eps": 1e-6, "use_swiglu_ffn": True, "image_size": 32}
    loaded = load_checkpoint(hf_folder(tmp_path, sd, cfg))
    c = loaded.config
    assert (c.reg_tokens, c.mlp_type, c.act, c.no_embed_class) == (2, "swiglu", "silu", True)
    assert build_model(loaded).num_prefix_tokens == 3
    assert_matches(loaded, gen, (32, 32))
    # Dinov2WithRegisters resizes positions (bicubic, antialiased): another size runs
    assert c.dynamic_img_size and c.pos_embed_antialias


def test_hf_5x_state_dict_file_without_config_warns_heads(tmp_path):
    g = random_generic(heads=2, eps=1e-12)
    save_file({k: v.contiguous() for k, v in hf_sd(g, "5.x").items()}, str(tmp_path / "w.safetensors"))
    with pytest.warns(RuntimeWarning, match=r"assumed num_heads=1 .*--num-heads"):
        loaded = load_checkpoint(tmp_path / "w.safetensors")
    assert loaded.assumed == ["num_heads=1"]
    assert_matches(load_checkpoint(tmp_path / "w.safetensors", num_heads=2), g, (32, 32))


@pytest.mark.parametrize(
    ("config", "match"),
    [({"architectures": ["SwinModel"], "model_type": "swin", "num_attention_heads": 2}, "SwinModel.* not supported"),
     ({"architectures": ["ViTModel"], "model_type": "vit"}, "missing or bad num_attention_heads")],
)
def test_hf_bad_config_is_one_line_naming_the_file(tmp_path, config, match):
    g = random_generic()
    folder = hf_folder(tmp_path, hf_sd(g), config)
    with pytest.raises(CheckpointError, match=match) as info:
        load_checkpoint(folder)
    assert "config.json" in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize(
    "kw", [{"qk_norm": True}, {"glu": True, "act": "silu"}, {"pre_norm": True, "act": "quick_gelu"},
           {"n_prefix": (1, 1), "covers": True}, {"n_prefix": (1, 4), "covers": False, "ls": True}],
)
def test_timm_variants_match_the_formulas(tmp_path, kw):
    g = random_generic(**kw)
    sd = timm_sd(g)
    if kw.get("n_prefix") == (1, 1):  # a DeiT distillation token
        sd["dist_token"] = sd.pop("reg_token", sd.get("dist_token"))
    torch.save(sd, tmp_path / "t.pth")
    loaded = load_checkpoint(tmp_path / "t.pth", num_heads=4, act=kw.get("act"))
    assert build_model(loaded).num_prefix_tokens == sum(g["prefix"][i].shape[1] for i in range(len(g["prefix"])))
    assert_matches(loaded, g, (32, 32))


def test_timm_unpacked_swiglu_and_eva_qv_bias(tmp_path):
    g = random_generic(glu=True, act="silu")
    sd = timm_sd(g, swiglu_unpacked=True, qv_bias=True)
    for b in g["blocks"]:  # EVA: no k bias
        b["k"] = (b["k"][0], torch.zeros_like(b["k"][1]))
    torch.save(sd, tmp_path / "eva.pth")
    loaded = load_checkpoint(tmp_path / "eva.pth", num_heads=4)
    assert loaded.config.mlp_type == "swiglu" and loaded.config.act == "silu"  # timm SwiGLU's SiLU, a known default
    assert_matches(loaded, g, (32, 32))


def test_rectangular_grid_not_misread_as_80px(tmp_path):
    """(64, 96) px with patch 16 and a class token: 1 + 4*6 = 25 positions, also 5x5 = 80 px."""
    g = random_generic(p=16, grid=(4, 6))
    torch.save({"state_dict": timm_sd(g), "hyper_parameters": {"img_size": [64, 96], "num_heads": 4}},
               tmp_path / "r.ckpt")
    loaded = load_checkpoint(tmp_path / "r.ckpt")
    assert loaded.config.img_size == (64, 96) and not loaded.config.no_embed_class
    assert_matches(loaded, g, (64, 96))
    torch.save(timm_sd(g), tmp_path / "bare.pth")  # nothing stored: the guess is said, never silent
    with pytest.warns(RuntimeWarning, match=r"img_size=80 .*img_size=\(h, w\)"):
        guess = load_checkpoint(tmp_path / "bare.pth", num_heads=4)
    assert guess.config.img_size == 80 and "img_size=80" in guess.assumed
    assert load_checkpoint(tmp_path / "bare.pth", num_heads=4, img_size=(64, 96)).config.img_size == (64, 96)


def test_hparams_stored_beats_known_beats_assumed(tmp_path):
    g = random_generic(d=64, heads=4, eps=1e-5)
    sd = timm_sd(g)
    sd["patch_embed.proj.weight"] = sd["patch_embed.proj.weight"].unsqueeze(2)  # Prithvi Conv3d
    torch.save(sd, tmp_path / "prithvi.pt")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        known = load_checkpoint(tmp_path / "prithvi.pt", num_heads=4)
    assert known.config.norm_eps == 1e-5 and not caught  # a known Prithvi fact, no warning
    torch.save({"state_dict": sd, "hyper_parameters": {"model_args": {"num_heads": 4, "norm_eps": 1e-6}}},
               tmp_path / "stored.ckpt")
    stored = load_checkpoint(tmp_path / "stored.ckpt")
    assert (stored.config.num_heads, stored.config.norm_eps, stored.assumed) == (4, 1e-6, [])
    assert any("read from hyper_parameters.model_args.num_heads" in n for n in stored.notes)


def test_prithvi_600_has_16_heads_from_the_table(tmp_path):
    sd = {"patch_embed.proj.weight": torch.randn(1280, 6, 1, 14, 14), "pos_embed": torch.zeros(1, 5, 1280),
          "cls_token": torch.zeros(1, 1, 1280)}
    for name, shape in {"norm1.weight": (1280,), "attn.qkv.weight": (3840, 1280), "attn.proj.weight": (1280, 1280),
                        "norm2.weight": (1280,), "mlp.fc1.weight": (16, 1280), "mlp.fc2.weight": (1280, 16)}.items():
        sd[f"blocks.0.{name}"] = torch.zeros(shape)
    torch.save(sd, tmp_path / "p600.pt")
    loaded = load_checkpoint(tmp_path / "p600.pt")  # 1280 / 64 would be 20
    assert loaded.config.num_heads == 16 and loaded.assumed == []


def test_in_memory_compare_of_state_dicts_and_models(tmp_path):
    from cka_geo.compare import compare_models
    from cka_geo.vit import VisionTransformer, ViTConfig

    cfg = ViTConfig(img_size=32, patch_size=8, in_chans=13, embed_dim=32, depth=2, num_heads=4, reg_tokens=2)
    a = VisionTransformer(cfg).eval()
    b = VisionTransformer(cfg).eval()
    res = compare_models(a, b, samples=8, batch_size=8)
    assert res["layers"][0] == "blocks.0.attn" and 0 < res["diagonal"]["blocks.1"] < 1
    same = compare_models(a, {k: v.clone() for k, v in a.state_dict().items()}, samples=8, batch_size=8, num_heads=4)
    assert same["summary"]["identical"]
