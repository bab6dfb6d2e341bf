"""timm ViTs (state_dict saved with torch.save / safetensors) load and run as timm runs them."""

from __future__ import annotations

import pytest
import torch
from _match import assert_same, canonical_spec
from conftest import need

from cka_geo.checkpoints import load_checkpoint

TINY = {"img_size": 32, "patch_size": 8, "embed_dim": 48, "depth": 2, "num_heads": 3, "num_classes": 5}
VARIANTS = {
    "plain": {},
    "registers": {"reg_tokens": 4, "no_embed_class": True, "class_token": True},
    "qk_norm": {"qk_norm": True},
    "pre_norm_quickgelu": {"pre_norm": True, "act_layer": "quick_gelu"},
    "swiglu_packed": {"mlp_layer": "swiglu_packed", "act_layer": "silu", "mlp_ratio": 8 / 3},
    "swiglu_unpacked": {"mlp_layer": "swiglu", "act_layer": "silu"},
    "layer_scale_gelu_tanh": {"init_values": 0.1, "act_layer": "gelu_tanh"},
    "no_embed_class_avg": {"no_embed_class": True, "global_pool": "avg", "fc_norm": True},
    "rectangular": {"img_size": (32, 48), "dynamic_img_size": True},
}


def build(timm, kw):
    from timm.layers import SwiGLU, SwiGLUPacked

    kw = dict(kw)
    mlp = kw.pop("mlp_layer", None)
    if mlp:
        kw["mlp_layer"] = SwiGLUPacked if mlp == "swiglu_packed" else SwiGLU
    from timm.models.vision_transformer import VisionTransformer

    model = VisionTransformer(**{**TINY, **kw}).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)  # no zero biases or unit gammas left
    return model


def spec_for(name, depth=2):
    if name == "swiglu_unpacked":
        return canonical_spec(depth, fc1=("mlp.fc1_g", "mlp.fc1_x"), act=("mlp.fc2", "in"))
    if name.startswith("swiglu"):
        return canonical_spec(depth, act=("mlp.fc2", "in"))
    return canonical_spec(depth)


@pytest.mark.parametrize("name", list(VARIANTS))
@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_timm_variant(tmp_path, name, suffix):
    timm = need("timm")
    model = build(timm, VARIANTS[name])
    path = tmp_path / f"vit{suffix}"
    if suffix == ".pth":
        torch.save(model.state_dict(), path)
    else:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    size = VARIANTS[name].get("img_size", 32)
    act = VARIANTS[name].get("act_layer")
    act = {"quick_gelu": "quick_gelu", "gelu_tanh": "gelu_tanh", "silu": "silu"}.get(act)
    loaded = load_checkpoint(path, num_heads=3, act=act, img_size=size if isinstance(size, tuple) else None)
    hw = size if isinstance(size, tuple) else (size, size)
    x = torch.randn(2, 3, *hw)
    assert_same(loaded, model, spec_for(name), x, lambda: model.forward_features(x))
    assert loaded.head  # the timm head, kept apart


def test_timm_other_resolution(tmp_path):
    timm = need("timm")
    model = build(timm, {"dynamic_img_size": True, "reg_tokens": 2})
    torch.save(model.state_dict(), tmp_path / "v.pth")
    loaded = load_checkpoint(tmp_path / "v.pth", num_heads=3)
    loaded.config.dynamic_img_size = True  # as the timm model was built
    x = torch.randn(2, 3, 48, 40)
    assert_same(loaded, model, spec_for("plain"), x, lambda: model.forward_features(x))


def test_deit_distilled(tmp_path):
    need("timm")
    from timm.models.deit import VisionTransformerDistilled

    model = VisionTransformerDistilled(**TINY).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    torch.save(model.state_dict(), tmp_path / "deit.pth")
    loaded = load_checkpoint(tmp_path / "deit.pth", num_heads=3)
    assert loaded.config.dist_token and loaded.config.num_prefix_tokens == 2
    x = torch.randn(2, 3, 32, 32)
    assert_same(loaded, model, spec_for("plain"), x, lambda: model.forward_features(x))


def test_eva_with_rope_is_refused_in_one_line():
    need("timm")
    from timm.models.eva import Eva

    from cka_geo.checkpoints.memory import load_model
    from cka_geo.errors import CheckpointError

    model = Eva(img_size=32, patch_size=8, embed_dim=48, depth=1, num_heads=3, use_rot_pos_emb=True)
    with pytest.raises(CheckpointError, match="rotary position embeddings") as info:
        load_model(model)
    assert "\n" not in str(info.value)


def test_the_timm_resample_rule_is_timms_resample_abs_pos_embed():
    """--image-size on a timm-family checkpoint: bicubic with antialias, as timm resamples."""
    timm = need("timm")
    from cka_geo.models.vit_layers import resample_pos_embed

    pos = torch.randn(1, 1 + 16 * 16, 24)
    for new in [(8, 8), (24, 24), (10, 20)]:
        want = timm.layers.resample_abs_pos_embed(pos, list(new), [16, 16], num_prefix_tokens=1)
        torch.testing.assert_close(resample_pos_embed(pos, new, 1, (16, 16), antialias=True), want, rtol=0, atol=1e-6)
