"""README's Python examples run as written, given the variables a user brings."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from _train_helpers import cls_tiles, tiny_vit
from cka_geo.checkpoints import save_checkpoint
from cka_geo.train.tasks import TaskModel

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)


def test_the_readme_has_its_python_examples():
    assert len(BLOCKS) >= 2
    assert "from cka_geo import" in BLOCKS[0]


def user_files(tmp_path: Path) -> dict:
    """What a README reader has: two checkpoints of one ViT, probe images, a model, data."""
    torch.manual_seed(0)
    pre = tiny_vit(seed=1)
    ft = tiny_vit(seed=1)
    with torch.no_grad():
        ft.blocks[1].mlp.fc1.weight.add_(0.5 * torch.randn_like(ft.blocks[1].mlp.fc1.weight))
    save_checkpoint(tmp_path / "pre.pt", pre, pre.cfg)
    save_checkpoint(tmp_path / "ft.pt", ft, ft.cfg)
    save_checkpoint(tmp_path / "pretrained.safetensors", pre, pre.cfg)
    probes = torch.rand(16, 3, 16, 16)
    names = ["blocks.0.mlp.fc1", "blocks.1"]
    return {
        "my_batches": list(probes.split(8)),
        "probes": probes,
        "model": TaskModel(tiny_vit(seed=1), "classification", 3),
        "train_data": cls_tiles(12, seed=2),
        "names": names,
        "features_pre": {n: torch.randn(8, 32) for n in names},
        "features_ft": {n: torch.randn(8, 32) for n in names},
        "reference_encoder": pre,
    }


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_each_readme_python_block_runs(tmp_path, monkeypatch, index):
    monkeypatch.chdir(tmp_path)
    code = BLOCKS[index].replace("samples=1024", "samples=64")  # the same call, smaller
    namespace = user_files(tmp_path)
    exec(compile(code, f"README.md python block {index + 1}", "exec"), namespace)
    if "res" in namespace:  # the Python section's result object
        res = namespace["res"]
        assert res.matrix.shape == (len(res.names_a), len(res.names_b))
        assert namespace["results"]["summary"]["first_changed"] == "blocks.1.mlp.fc1"
