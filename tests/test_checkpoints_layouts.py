"""Every layout of shared/checkpoint-formats.md, as a tiny random file, loads as it is.

Each test writes exactly the keys and containers of one producer, loads the file, checks the
chosen prefix and the inferred spec, and checks that the built model computes what a model
built from the original weights computes.
"""

from __future__ import annotations

import argparse
from collections import OrderedDict

import pytest
import torch
from safetensors.torch import save_file

from cka_geo.checkpoints import build_model, load_checkpoint
from cka_geo.errors import CheckpointError
from cka_geo.openclip import OpenClipVisionConfig, OpenClipVisionTransformer
from cka_geo.vit import VisionTransformer, ViTConfig


class AttributeDict(dict):
    """Stands in for Lightning's AttributeDict: a dict subclass that needs pickle."""


def randomise(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            base = 1.0 if "norm" in name or "ln" in name or "gamma" in name else 0.0
            param.copy_(base + 0.2 * torch.randn_like(param))
    return model.eval()


def tiny_vit(**kw) -> VisionTransformer:
    args = {
        "img_size": 32,
        "patch_size": 8,
        "in_chans": 13,
        "embed_dim": 64,
        "depth": 3,
        "num_heads": 1,
    }
    return randomise(VisionTransformer(ViTConfig(**{**args, **kw})))


def prefixed(model: torch.nn.Module, prefix: str, drop: tuple[str, ...] = ()) -> OrderedDict:
    return OrderedDict(
        (prefix + k, v.clone()) for k, v in model.state_dict().items() if not k.startswith(drop)
    )


def decoder_keys(prefix: str, depth: int = 2, width: int = 16) -> dict[str, torch.Tensor]:
    """MAE-style decoder keys (the decoder has its own, narrower width)."""
    sd: dict[str, torch.Tensor] = {
        f"{prefix}mask_token": torch.randn(1, 1, width),
        f"{prefix}decoder_embed.weight": torch.randn(width, 64),
        f"{prefix}decoder_pos_embed": torch.randn(1, 17, width),
        f"{prefix}decoder_norm.weight": torch.ones(width),
        f"{prefix}decoder_pred.weight": torch.randn(13 * 64, width),
    }
    for i in range(depth):
        sd[f"{prefix}decoder_blocks.{i}.attn.qkv.weight"] = torch.randn(3 * width, width)
        sd[f"{prefix}decoder_blocks.{i}.mlp.fc1.weight"] = torch.randn(4 * width, width)
        sd[f"{prefix}decoder_blocks.{i}.mlp.fc2.weight"] = torch.randn(width, 4 * width)
    return sd


def assert_same_function(
    built: torch.nn.Module, model: torch.nn.Module, bands: int = 13, size: int = 32
):
    torch.manual_seed(5)
    x = torch.randn(2, bands, size, size)
    with torch.no_grad():
        torch.testing.assert_close(built.forward_features(x), model.forward_features(x))
        if isinstance(model, VisionTransformer):  # encoder only: compare before the head
            want = model.forward_head(model.forward_features(x), pre_logits=True)
        else:
            want = model(x)
        torch.testing.assert_close(built(x), want)
    assert not built.training


def load_and_check(path, model, *, prefix, notes=(), **kw):
    loaded = load_checkpoint(path, **kw)
    assert loaded.prefix == prefix, loaded.notes
    cfg, want = loaded.config, model.cfg
    for field in (
        "img_size",
        "patch_size",
        "in_chans",
        "embed_dim",
        "depth",
        "num_heads",
        "qkv_bias",
        "class_token",
        "hidden_dim",
        "final_norm",
        "use_fc_norm",
        "no_embed_class",
    ):
        assert getattr(cfg, field) == getattr(want, field), field
    assert (cfg.layer_scale is None) == (want.layer_scale is None)
    for note in notes:
        assert any(note in n for n in loaded.notes), (note, loaded.notes)
    assert loaded.family == "timm"
    assert not any(k.startswith("head.") for k in loaded.state_dict)
    assert_same_function(build_model(loaded), model)
    return loaded


# ------------------------------------------------------------------------- timm family


def test_torchgeo_raw_state_dict_with_norm_and_head(tmp_path):
    model = tiny_vit(num_classes=4)
    torch.save(model.state_dict(), tmp_path / "ssl4eo_vits16.pth")
    loaded = load_and_check(tmp_path / "ssl4eo_vits16.pth", model, prefix="")
    assert sorted(loaded.ignored) == ["head.bias", "head.weight"]
    assert set(loaded.head) == {"head.weight", "head.bias"}


def test_torchgeo_raw_without_norm_and_head(tmp_path):
    model = tiny_vit(final_norm=False)
    torch.save(model.state_dict(), tmp_path / "scalemae.pth")
    loaded = load_and_check(tmp_path / "scalemae.pth", model, prefix="", notes=["no final norm"])
    assert loaded.ignored == []


def test_softcon_layer_scale_and_six_bands(tmp_path):
    model = tiny_vit(in_chans=6, layer_scale=1e-5, patch_size=4, img_size=16, embed_dim=48)
    torch.save(model.state_dict(), tmp_path / "softcon.pth")
    loaded = load_checkpoint(tmp_path / "softcon.pth", num_heads=1)
    assert loaded.config.layer_scale is not None and loaded.config.in_chans == 6
    assert loaded.config.img_size == 16 and loaded.config.patch_size == 4
    assert_same_function(build_model(loaded), model, bands=6, size=16)


def test_safetensors_raw_timm(tmp_path):
    model = tiny_vit(qkv_bias=False)
    save_file(dict(model.state_dict()), str(tmp_path / "model.safetensors"))
    loaded = load_and_check(tmp_path / "model.safetensors", model, prefix="")
    assert loaded.config.qkv_bias is False


def test_ssl4eo_moco_prefers_base_encoder(tmp_path):
    model = tiny_vit()
    momentum = tiny_vit(layer_scale=None)
    randomise(momentum, seed=9)
    sd = prefixed(model, "module.base_encoder.")
    sd.update(prefixed(momentum, "module.momentum_encoder."))
    sd["module.base_encoder.head.0.weight"] = torch.randn(32, 64)
    sd["module.predictor.0.weight"] = torch.randn(32, 32)
    torch.save(
        {
            "epoch": 99,
            "arch": "vit_small",
            "state_dict": sd,
            "optimizer": {"state": {}, "param_groups": []},
        },
        tmp_path / "checkpoint_0099.pth.tar",
    )
    loaded = load_and_check(
        tmp_path / "checkpoint_0099.pth.tar",
        model,
        prefix="state_dict.module.base_encoder.",
        notes=[
            "unwrapped ckpt['state_dict']",
            "stripped 'module.base_encoder.'",
            "momentum_encoder",
        ],
    )
    assert ("state_dict.module.momentum_encoder.", 3) in loaded.candidates
    assert "state_dict.module.predictor.0.weight" in loaded.ignored
    # the user may pick the other encoder, by its full prefix or a unique suffix
    other = load_checkpoint(tmp_path / "checkpoint_0099.pth.tar", prefix="module.momentum_encoder.")
    assert_same_function(build_model(other), momentum)


def test_ssl4eo_dino_prefers_teacher(tmp_path):
    teacher, student = tiny_vit(), randomise(tiny_vit(), seed=3)
    ckpt = {
        "student": {
            **prefixed(student, "module.backbone."),
            "module.head.mlp.0.weight": torch.randn(8, 64),
        },
        "teacher": {**prefixed(teacher, "backbone."), "head.mlp.0.weight": torch.randn(8, 64)},
        "optimizer": {"state": {0: {"exp_avg": torch.zeros(3)}}, "param_groups": [{"lr": 0.1}]},
        "epoch": 100,
        "dino_loss": {"center": torch.zeros(1, 8)},
    }
    torch.save(ckpt, tmp_path / "checkpoint.pth")
    load_and_check(
        tmp_path / "checkpoint.pth",
        model=teacher,
        prefix="teacher.backbone.",
        notes=["unwrapped ckpt['teacher'] (DINO: the teacher is preferred", "stripped 'backbone.'"],
    )


def test_mae_original_with_decoder_and_pickled_args(tmp_path):
    model = tiny_vit()
    ckpt = {
        "model": {**model.state_dict(), **decoder_keys("")},
        "optimizer": {"state": {}, "param_groups": []},
        "epoch": 799,
        "scaler": {"scale": 1024.0},
        "args": argparse.Namespace(model="mae_vit_small", norm_pix_loss=True),
    }
    torch.save(ckpt, tmp_path / "checkpoint-799.pth")
    loaded = load_and_check(
        tmp_path / "checkpoint-799.pth",
        model,
        prefix="model.",
        notes=["argparse.Namespace", "restricted unpickler", "unwrapped ckpt['model']"],
    )
    assert "model.decoder_blocks.0.mlp.fc1.weight" in loaded.ignored
    assert "model.mask_token" in loaded.ignored
    assert ("model.decoder_", 2) in loaded.candidates


def test_mae_finetuned_fc_norm(tmp_path):
    model = tiny_vit(global_pool="avg")
    torch.save({"model": model.state_dict()}, tmp_path / "ft.pth")
    loaded = load_and_check(tmp_path / "ft.pth", model, prefix="model.")
    assert loaded.config.global_pool == "avg"


def test_prithvi_eo1_conv3d_raw_with_decoder(tmp_path):
    # Prithvi (TerraTorch prithvi_mae.py) uses nn.LayerNorm's default eps 1e-5: a known fact
    model = tiny_vit(in_chans=6, norm_eps=1e-5)
    sd = prefixed(model, "")
    sd["patch_embed.proj.weight"] = sd["patch_embed.proj.weight"].unsqueeze(2)  # Conv3d, tubelet 1
    sd.update(decoder_keys(""))
    torch.save(sd, tmp_path / "Prithvi_100M.pt")
    loaded = load_checkpoint(tmp_path / "Prithvi_100M.pt")
    assert loaded.prefix == "" and loaded.config.in_chans == 6
    assert any("Conv3d" in n for n in loaded.notes)
    assert loaded.source == "prithvi" and loaded.config.norm_eps == 1e-5
    assert any(n.startswith("norm_eps=1e-05 (prithvi fact") for n in loaded.notes)
    assert_same_function(build_model(loaded), model, bands=6)


def test_prithvi_eo2_encoder_prefix_and_decoder(tmp_path):
    model = tiny_vit(in_chans=6, norm_eps=1e-5)
    sd = prefixed(model, "encoder.")
    sd["encoder.patch_embed.proj.weight"] = sd["encoder.patch_embed.proj.weight"].unsqueeze(2)
    sd.update(decoder_keys("decoder."))
    torch.save(sd, tmp_path / "Prithvi_EO_V2.pt")
    loaded = load_checkpoint(tmp_path / "Prithvi_EO_V2.pt")
    assert loaded.prefix == "encoder."
    assert "decoder.decoder_blocks.1.mlp.fc1.weight" in loaded.ignored
    assert_same_function(build_model(loaded), model, bands=6)


def test_prithvi_multi_frame_is_refused(tmp_path):
    model = tiny_vit()
    sd = prefixed(model, "")
    sd["patch_embed.proj.weight"] = sd["patch_embed.proj.weight"].unsqueeze(2).repeat(1, 1, 2, 1, 1)
    torch.save(sd, tmp_path / "p.pt")
    with pytest.raises(CheckpointError, match=r"p\.pt: .*multi-frame"):
        load_checkpoint(tmp_path / "p.pt")


@pytest.mark.parametrize(
    "inner", ["model.encoder.", "model.encoder.dofa_model.", "model.encoder.vit_model."]
)
def test_terratorch_lightning_ckpt_reads_heads_from_hyper_parameters(tmp_path, inner):
    model = tiny_vit(num_heads=2)
    sd = prefixed(model, inner)
    sd["model.decoder.convs.0.weight"] = torch.randn(8, 64, 1, 1)
    sd["model.head.head.weight"] = torch.randn(3, 8, 1, 1)
    ckpt = {
        "epoch": 4,
        "global_step": 100,
        "pytorch-lightning_version": "2.4.0",
        "state_dict": sd,
        "hyper_parameters": AttributeDict(
            model_args=AttributeDict(backbone="vit", num_heads=2), lr=1e-4
        ),
        "optimizer_states": [{"state": {}, "param_groups": [{"lr": 1e-4}]}],
        "lr_schedulers": [{"last_epoch": 4}],
    }
    torch.save(ckpt, tmp_path / "epoch=4.ckpt")
    loaded = load_and_check(
        tmp_path / "epoch=4.ckpt",
        model,
        prefix=f"state_dict.{inner}",
        notes=["AttributeDict", "num_heads=2 read from hyper_parameters"],
    )
    assert loaded.config.num_heads == 2
    assert "state_dict.model.decoder.convs.0.weight" in loaded.ignored


def test_torchgeo_classification_task_ckpt(tmp_path):
    model = tiny_vit(num_classes=10)
    ckpt = {
        "state_dict": prefixed(model, "model."),
        "hyper_parameters": {
            "model": "vit_small_patch16_224",
            "in_channels": 13,
            "num_classes": 10,
        },
    }
    torch.save(ckpt, tmp_path / "last.ckpt")
    loaded = load_and_check(tmp_path / "last.ckpt", model, prefix="state_dict.model.")
    assert sorted(loaded.ignored) == ["state_dict.model.head.bias", "state_dict.model.head.weight"]


def test_pangaea_checkpoint_best(tmp_path):
    model = tiny_vit()
    ckpt = {
        "model": {
            **prefixed(model, "encoder."),
            "decoder.conv_seg.weight": torch.randn(3, 8, 1, 1),
        },
        "optimizer": {"state": {}, "param_groups": []},
        "lr_scheduler": {"last_epoch": 3},
        "epoch": 3,
    }
    torch.save(ckpt, tmp_path / "checkpoint_best.pth")
    load_and_check(tmp_path / "checkpoint_best.pth", model, prefix="model.encoder.")


@pytest.mark.parametrize("wrap", ["module.", "_orig_mod.", "module._orig_mod."])
def test_ddp_and_compile_wrappers(tmp_path, wrap):
    model = tiny_vit()
    torch.save(prefixed(model, wrap), tmp_path / "w.pt")
    load_and_check(tmp_path / "w.pt", model, prefix=wrap, notes=[f"stripped {wrap!r}"])


def test_bin_suffix_and_missing_pos_embed(tmp_path):
    model = tiny_vit()
    with torch.no_grad():
        model.pos_embed.zero_()
    sd = prefixed(model, "", drop=("pos_embed",))
    torch.save(sd, tmp_path / "pytorch_model.bin")
    loaded = load_checkpoint(tmp_path / "pytorch_model.bin")
    assert loaded.config.img_size == 224 and loaded.config.dynamic_img_size
    assert any("no pos_embed" in n for n in loaded.notes)
    assert_same_function(build_model(loaded), model)


def test_no_embed_class_and_missing_biases(tmp_path):
    model = tiny_vit(no_embed_class=True)
    with torch.no_grad():
        model.patch_embed.proj.bias.zero_()
        model.blocks[0].mlp.fc2.bias.zero_()
    sd = prefixed(model, "")
    del sd["patch_embed.proj.bias"], sd["blocks.0.mlp.fc2.bias"]
    torch.save(sd, tmp_path / "nb.pt")
    load_and_check(tmp_path / "nb.pt", model, prefix="", notes=["no_embed_class", "zero biases"])


def test_pruned_blocks_are_refused(tmp_path):
    sd = prefixed(tiny_vit(), "")
    for k in [k for k in sd if k.startswith("blocks.1.")]:
        del sd[k]
    torch.save(sd, tmp_path / "pruned.pt")
    with pytest.raises(
        CheckpointError, match=r"pruned\.pt: blocks are not contiguous .*missing \[1\]"
    ):
        load_checkpoint(tmp_path / "pruned.pt")


def test_unknown_prefix_lists_candidates(tmp_path):
    torch.save(prefixed(tiny_vit(), "backbone."), tmp_path / "b.pt")
    with pytest.raises(
        CheckpointError, match=r"'nope\.' matches none of the candidates: 'backbone\.'"
    ):
        load_checkpoint(tmp_path / "b.pt", prefix="nope.")


def test_no_blocks_at_all(tmp_path):
    torch.save({"weight": torch.zeros(3)}, tmp_path / "x.pt")
    with pytest.raises(CheckpointError, match=r"x\.pt: no ViT blocks found"):
        load_checkpoint(tmp_path / "x.pt")


# --------------------------------------------------------------------- open_clip family


def tiny_clip(in_chans: int = 3, patch: int = 8, heads: int = 1) -> OpenClipVisionTransformer:
    cfg = OpenClipVisionConfig(
        image_size=32,
        patch_size=patch,
        in_chans=in_chans,
        width=64,
        layers=2,
        heads=heads,
        mlp_hidden_dim=256,
        output_dim=16,
    )
    return randomise(OpenClipVisionTransformer(cfg))


def text_tower(width: int = 32, layers: int = 2) -> dict[str, torch.Tensor]:
    sd = {
        "token_embedding.weight": torch.randn(100, width),
        "positional_embedding": torch.randn(7, width),
        "ln_final.weight": torch.ones(width),
        "text_projection": torch.randn(width, 16),
        "logit_scale": torch.tensor(4.6),
    }
    for i in range(layers):
        sd[f"transformer.resblocks.{i}.attn.in_proj_weight"] = torch.randn(3 * width, width)
        sd[f"transformer.resblocks.{i}.mlp.c_fc.weight"] = torch.randn(4 * width, width)
        sd[f"transformer.resblocks.{i}.mlp.c_proj.weight"] = torch.randn(width, 4 * width)
    return sd


@pytest.mark.parametrize(
    ("name", "bands", "patch"), [("RemoteCLIP-ViT-B-32.pt", 3, 8), ("ms-clip.safetensors", 13, 4)]
)
def test_open_clip_full_clip_state_dict(tmp_path, name, bands, patch):
    visual = tiny_clip(bands, patch)
    sd = {**{f"visual.{k}": v.clone() for k, v in visual.state_dict().items()}, **text_tower()}
    path = tmp_path / name
    if path.suffix == ".safetensors":
        save_file(sd, str(path))
    else:
        torch.save(sd, path)
    with pytest.warns(RuntimeWarning, match=r"assumed act=gelu .*override: --act / load_checkpoint\(act="):
        loaded = load_checkpoint(path, num_heads=1)
    # converted on load into the timm-named ViT (ln_pre -> norm_pre, in_proj -> qkv)
    assert loaded.family == "timm" and loaded.source == "open_clip" and loaded.prefix == "visual."
    assert loaded.assumed == ["act=gelu"]
    cfg = loaded.config
    assert (cfg.embed_dim, cfg.depth, cfg.in_chans, cfg.patch_size, cfg.img_size) == (64, 2, bands, patch, 32)
    assert (cfg.hidden_dim, cfg.num_heads, cfg.pre_norm, cfg.norm_eps) == (256, 1, True, 1e-5)
    assert ("", 2) in loaded.candidates  # the text tower, listed but not chosen
    assert "token_embedding.weight" in loaded.ignored and "logit_scale" in loaded.ignored
    assert "visual.proj" in loaded.ignored  # the joint-embedding projection, kept aside
    built = build_model(loaded)
    assert built.batch_first is True and built.num_prefix_tokens == 1
    assert_same_sublayers(built, visual, bands=bands)


def assert_same_sublayers(built: torch.nn.Module, tower: OpenClipVisionTransformer, bands: int = 3):
    """Every canonical sublayer of the converted ViT equals the open_clip tower's own module."""
    from cka_geo.features import capture, forward_batch

    x = torch.randn(2, bands, 32, 32)
    names = list(tower.canonical_sublayers())
    with capture(built, names, pooling="flatten") as cap:
        mine = forward_batch(built, x, cap).features
    with capture(tower, names, pooling="flatten") as cap:
        theirs = forward_batch(tower, x, cap).features
    for name in names:
        torch.testing.assert_close(mine[name], theirs[name], rtol=1e-5, atol=1e-6, msg=name)
    with torch.no_grad():
        pooled = built.forward_head(built.forward_features(x), pre_logits=True)
        torch.testing.assert_close(pooled @ tower.proj, tower(x), rtol=1e-5, atol=1e-6)


def test_open_clip_heads_given(tmp_path):
    visual = tiny_clip(heads=4)
    torch.save(
        {"state_dict": {f"module.visual.{k}": v for k, v in visual.state_dict().items()}},
        tmp_path / "c.pt",
    )
    loaded = load_checkpoint(tmp_path / "c.pt", num_heads=4, act="gelu")
    assert loaded.prefix == "state_dict.module.visual." and loaded.config.num_heads == 4
    assert loaded.assumed == []
    assert_same_sublayers(build_model(loaded), visual, bands=3)


def test_open_clip_quick_gelu_stored(tmp_path):
    """OpenAI-style weights run QuickGELU; a stored open_clip config says so."""
    cfg = OpenClipVisionConfig(image_size=32, patch_size=8, width=64, layers=2, heads=2,
                               mlp_hidden_dim=128, output_dim=16, act="quick_gelu")
    visual = randomise(OpenClipVisionTransformer(cfg))
    torch.save({"state_dict": {f"visual.{k}": v for k, v in visual.state_dict().items()},
                "model_cfg": {"quick_gelu": True, "vision_cfg": {"heads": 2}}}, tmp_path / "q.pt")
    loaded = load_checkpoint(tmp_path / "q.pt")
    assert (loaded.config.act, loaded.config.num_heads, loaded.assumed) == ("quick_gelu", 2, [])
    assert_same_sublayers(build_model(loaded), visual, bands=3)


def test_open_clip_canonical_sublayers_and_sequence_first():
    model = tiny_clip()
    subs = model.canonical_sublayers()
    assert subs["blocks.1.attn"] == "transformer.resblocks.1.attn"
    assert subs["blocks.1.mlp.fc1"] == "transformer.resblocks.1.mlp.c_fc"
    assert subs["blocks.1.mlp.act"] == "transformer.resblocks.1.mlp.gelu"
    assert subs["blocks.1.mlp.fc2"] == "transformer.resblocks.1.mlp.c_proj"
    assert subs["blocks.1"] == "transformer.resblocks.1"
    modules = dict(model.named_modules())
    assert all(p in modules for p in subs.values())
    shapes = {}
    hook = modules["transformer.resblocks.0.mlp.c_fc"].register_forward_hook(
        lambda m, i, o: shapes.update(fc1=tuple(o.shape))
    )
    model(torch.zeros(2, 3, 32, 32))
    hook.remove()
    assert shapes["fc1"] == (17, 2, 256)  # (tokens, batch, hidden): sequence-first


# ---------------------------------------------------------- recognised but unsupported


def test_croma_dict_of_dicts_refused(tmp_path):
    s2 = {f"transformer.layers.{i}.1.net.0.weight": torch.randn(16, 8) for i in range(2)}
    s2.update({f"transformer.layers.{i}.0.to_qkv.weight": torch.randn(24, 8) for i in range(2)})
    torch.save(
        {"s2_encoder": s2, "s1_encoder": dict(s2), "joint_encoder": {}}, tmp_path / "CROMA_base.pt"
    )
    with pytest.raises(CheckpointError, match=r"CROMA_base\.pt: CROMA checkpoint detected") as info:
        load_checkpoint(tmp_path / "CROMA_base.pt")
    assert "\n" not in str(info.value)


def test_pangaea_croma_refused(tmp_path):
    sd = {
        f"encoder.s2_encoder.transformer.layers.{i}.1.net.0.weight": torch.randn(16, 8)
        for i in range(2)
    }
    torch.save({"model": sd, "epoch": 1}, tmp_path / "checkpoint_best.pth")
    with pytest.raises(CheckpointError, match="CROMA"):
        load_checkpoint(tmp_path / "checkpoint_best.pth")


def test_galileo_refused(tmp_path):
    sd = {}
    for i in range(2):
        for n in ("q", "k", "v", "proj"):
            sd[f"blocks.{i}.attn.{n}.weight"] = torch.randn(8, 8)
        sd[f"blocks.{i}.mlp.fc1.weight"] = torch.randn(32, 8)
    torch.save(sd, tmp_path / "galileo.pt")
    with pytest.raises(CheckpointError, match="Galileo checkpoint detected"):
        load_checkpoint(tmp_path / "galileo.pt")


def _terramind_reference(
    sd: dict, mod: str, x: torch.Tensor, heads: int, depth: int
) -> torch.Tensor:
    """TerraMind's encoder for one image modality, written from its definition."""
    import torch.nn.functional as F

    b, c, h, w = x.shape
    p = 16
    patches = (
        x.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1).reshape(b, -1, p * p * c)
    )
    e = f"encoder_embeddings.{mod}."
    t = patches @ sd[e + "proj.weight"].T + sd[e + "pos_emb"] + sd[e + "mod_emb"]
    d = t.shape[-1]
    for i in range(depth):
        g = f"encoder.{i}."
        y = F.layer_norm(t, (d,), sd[g + "norm1.weight"], sd[g + "norm1.bias"], eps=1e-6)
        q, k, v = (
            (y @ sd[g + "attn.qkv.weight"].T)
            .reshape(b, -1, 3, heads, d // heads)
            .permute(2, 0, 3, 1, 4)
        )
        a = ((q @ k.transpose(-1, -2)) * (d // heads) ** -0.5).softmax(-1) @ v
        t = t + a.transpose(1, 2).reshape(b, -1, d) @ sd[g + "attn.proj.weight"].T
        y = F.layer_norm(t, (d,), sd[g + "norm2.weight"], sd[g + "norm2.bias"], eps=1e-6)
        t = t + F.gelu(y @ sd[g + "mlp.fc1.weight"].T) @ sd[g + "mlp.fc2.weight"].T
    return F.layer_norm(t, (d,), sd["encoder_norm.weight"], sd["encoder_norm.bias"], eps=1e-6)


def test_terramind_maps_onto_timm(tmp_path):
    torch.manual_seed(0)
    d, depth, heads = 32, 2, 2
    sd: dict[str, torch.Tensor] = {}
    for mod, bands in (("untok_sen2l2a@64", 12), ("untok_sen2l1c@64", 13), ("untok_sen1grd@64", 2)):
        sd[f"encoder_embeddings.{mod}.proj.weight"] = 0.05 * torch.randn(d, 16 * 16 * bands)
        sd[f"encoder_embeddings.{mod}.pos_emb"] = torch.randn(1, 16, d)
        sd[f"encoder_embeddings.{mod}.mod_emb"] = torch.randn(1, 1, d)
    sd["encoder_embeddings.tok_lulc@224.token_emb.weight"] = torch.randn(10, d)
    for i in range(depth):
        g = f"encoder.{i}."
        for n in ("norm1", "norm2"):
            sd[g + n + ".weight"] = 1 + 0.1 * torch.randn(d)
            sd[g + n + ".bias"] = torch.zeros(d)  # TerraMind stores bias-free norms' zero buffers
        sd[g + "attn.qkv.weight"] = 0.2 * torch.randn(3 * d, d)
        sd[g + "attn.proj.weight"] = 0.2 * torch.randn(d, d)
        sd[g + "mlp.fc1.weight"] = 0.2 * torch.randn(4 * d, d)
        sd[g + "mlp.fc2.weight"] = 0.2 * torch.randn(d, 4 * d)
    sd["encoder_norm.weight"], sd["encoder_norm.bias"] = torch.ones(d), torch.zeros(d)
    sd["decoder.0.self_attn.qkv.weight"] = torch.randn(3 * d, d)
    sd["decoder_norm.weight"] = torch.ones(d)
    torch.save({"model": sd}, tmp_path / "TerraMind_v1_base.pt")
    loaded = load_checkpoint(tmp_path / "TerraMind_v1_base.pt", num_heads=heads)
    assert loaded.family == "timm" and loaded.prefix == "model."
    cfg = loaded.config
    assert (cfg.in_chans, cfg.patch_size, cfg.img_size, cfg.depth, cfg.embed_dim) == (
        13,
        16,
        64,
        2,
        32,
    )
    assert not cfg.class_token and not cfg.qkv_bias
    assert any("untok_sen2l1c@64" in n and "untok_sen2l2a@64" in n for n in loaded.notes)
    assert "model.encoder_embeddings.untok_sen1grd@64.proj.weight" in loaded.ignored
    assert "model.decoder.0.self_attn.qkv.weight" in loaded.ignored
    x = torch.randn(2, 13, 64, 64)
    with torch.no_grad():
        got = build_model(loaded).forward_features(x)
    want = _terramind_reference(sd, "untok_sen2l1c@64", x, heads, depth)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
