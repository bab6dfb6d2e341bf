"""Hugging Face ViT / DINOv2 (save_pretrained folders and in-memory modules) run as transformers runs them."""

from __future__ import annotations

import pytest
import torch
from _match import assert_same, canonical_spec
from conftest import need

from cka_geo.checkpoints import load_checkpoint
from cka_geo.checkpoints.memory import load_model
from cka_geo.errors import CheckpointError

SMALL = {"hidden_size": 48, "num_hidden_layers": 2, "num_attention_heads": 3, "image_size": 32, "patch_size": 8}


def randomise(model):
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def vit_spec(base, swiglu=False, dinov2=False):
    act = ("mlp.down_proj", "in") if swiglu else ("mlp.activation_fn", "out")
    fc1 = ("mlp.gate_proj", "mlp.up_proj") if swiglu else "mlp.fc1"
    fc2 = "mlp.down_proj" if swiglu else "mlp.fc2"
    return canonical_spec(2, base=base, attn="attention.o_proj", fc1=fc1, act=act, fc2=fc2)


CASES = {
    "vit": ("ViTModel", "ViTConfig", {"intermediate_size": 96, "hidden_act": "gelu"}, "layers.{i}", False),
    "vit_cls_tanh": ("ViTForImageClassification", "ViTConfig",
                     {"intermediate_size": 96, "hidden_act": "gelu_pytorch_tanh", "num_labels": 4}, "vit.layers.{i}", False),
    "dinov2": ("Dinov2Model", "Dinov2Config", {"mlp_ratio": 2}, "encoder.layer.{i}", False),
    "dinov2_swiglu": ("Dinov2Model", "Dinov2Config", {"mlp_ratio": 2, "use_swiglu_ffn": True}, "encoder.layer.{i}", True),
    "dinov2_registers": ("Dinov2WithRegistersModel", "Dinov2WithRegistersConfig",
                         {"mlp_ratio": 2, "num_register_tokens": 4}, "encoder.layer.{i}", False),
}


def make(name):
    tf = need("transformers")
    cls, cfg_cls, kw, base, swiglu = CASES[name]
    model = randomise(getattr(tf, cls)(getattr(tf, cfg_cls)(**SMALL, **kw)))
    return model, base, swiglu


def run_of(model, x, interpolate=False):
    inner = getattr(model, "vit", model)
    kwargs = {"interpolate_pos_encoding": True} if interpolate and "ViT" in type(model).__name__ else {}
    return lambda: inner(pixel_values=x, **kwargs)


@pytest.mark.parametrize("name", list(CASES))
def test_save_pretrained_folder(tmp_path, name):
    model, base, swiglu = make(name)
    model.save_pretrained(tmp_path / "hf")
    loaded = load_checkpoint(tmp_path / "hf")
    assert loaded.assumed == [] and loaded.config.num_heads == 3
    for size in ((32, 32), (48, 40)):  # native, and another resolution (positions resized as HF does)
        x = torch.randn(2, 3, *size)
        assert_same(loaded, model, vit_spec(base, swiglu), x, run_of(model, x, interpolate=True))


@pytest.mark.parametrize("name", ["vit", "dinov2_swiglu"])
def test_in_memory_module(name):
    model, base, swiglu = make(name)
    loaded = load_model(model)
    assert loaded.assumed == [] and loaded.config.num_heads == 3
    x = torch.randn(2, 3, 32, 32)
    assert_same(loaded, model, vit_spec(base, swiglu), x, run_of(model, x))


def test_single_file_beside_its_config(tmp_path):
    model, _, _ = make("vit")
    model.save_pretrained(tmp_path / "hf")
    loaded = load_checkpoint(tmp_path / "hf" / "model.safetensors")
    assert any("config.json" in n for n in loaded.notes)


def test_unsupported_architecture_refused_in_one_line(tmp_path):
    tf = need("transformers")
    model = tf.ViTMAEModel(tf.ViTMAEConfig(hidden_size=48, num_hidden_layers=1, num_attention_heads=3,
                                           intermediate_size=96, image_size=32, patch_size=8))
    model.save_pretrained(tmp_path / "mae")
    with pytest.raises(CheckpointError, match=r"config\.json: Hugging Face architecture ViTMAEModel is not supported") as info:
        load_checkpoint(tmp_path / "mae")
    assert "\n" not in str(info.value)


def test_dinov2_at_another_size_resamples_positions_as_transformers(tmp_path):
    """compare --image-size 48 on a 32-px DINOv2: the rule said and recorded is transformers'
    (bicubic, no antialias, to the new grid size) and the embeddings equal its own."""
    import warnings

    from cka_geo.checkpoints import build_model
    from cka_geo.compare import compare_checkpoints
    from cka_geo.compare.inputs import RESAMPLE_RULES

    model, _base, _swiglu = make("dinov2")
    model.save_pretrained(tmp_path / "hf")
    loaded = load_checkpoint(tmp_path / "hf")
    ours = build_model(loaded)
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        torch.testing.assert_close(ours.embed(x), model.embeddings(x), rtol=1e-5, atol=1e-5)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        res = compare_checkpoints(tmp_path / "hf", tmp_path / "hf", image_size=48, samples=40, batch_size=8,
                                  bootstrap=0, progress=False)
    assert res["settings"]["pos_embed_resample"] == RESAMPLE_RULES[False]
    assert any("pos_embed resampled from a 4x4 to a 6x6" in str(w.message) for w in seen)
