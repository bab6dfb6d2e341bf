"""Cost of the fine-tuning recipe's options per optimizer step, as ratios to the plain loop.

A ViT-S/16-shaped encoder (width 384, 6 heads; depth 4 to stay short) with a linear
classification head, 64 x 64 images of 13 bands, one optimizer step of 32 samples:
float32 in one batch (the baseline), then ``--accum-steps 4`` (4 x 8), ``--layer-decay 0.65``,
``--drop-path 0.1``, ``--precision bf16-mixed`` and ``16-mixed``. Each timed as the best of
``--repeats`` epochs of ``--steps`` steps (after one warm-up epoch), interleaved so that all
see the same machine. Printed: seconds per step and the ratio to the baseline.

Usage: python benchmarks/bench_recipe.py [--device cpu|cuda] [--steps 3] [--repeats 3]
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.utils.data import TensorDataset

from cka_geo.models.vit import VisionTransformer, ViTConfig
from cka_geo.train import TrainConfig, fit
from cka_geo.train.tasks import TaskModel

VARIANTS = {
    "float32, 1 x 32": {},
    "accum 4 x 8": {"batch_size": 8, "accum_steps": 4},
    "layer decay 0.65": {"layer_decay": 0.65},
    "drop path 0.1": {"drop_path": 0.1},
    "bf16-mixed": {"precision": "bf16-mixed"},
    "16-mixed": {"precision": "16-mixed"},
}


def _model(device: str) -> TaskModel:
    torch.manual_seed(0)
    cfg = ViTConfig(img_size=64, patch_size=16, in_chans=13, embed_dim=384, depth=4, num_heads=6)
    return TaskModel(VisionTransformer(cfg), "classification", 10).to(device)


def main() -> None:
    """Print seconds per step and ratios to the float32 baseline."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    g = torch.Generator().manual_seed(0)
    n = 32 * args.steps
    data = TensorDataset(torch.randn(n, 13, 64, 64, generator=g), torch.randint(0, 10, (n,), generator=g))
    best = {k: float("inf") for k in VARIANTS}
    for rep in range(args.repeats + 1):
        for name, kw in VARIANTS.items():
            model = _model(args.device)
            cfg = TrainConfig(**{"epochs": 1, "batch_size": 32, "progress": False, "device": args.device, **kw})
            t0 = time.perf_counter()
            fit(model, data, cfg)
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            if rep:  # the first round warms up
                best[name] = min(best[name], (time.perf_counter() - t0) / args.steps)
    base = best["float32, 1 x 32"]
    print(f"device {args.device}, torch {torch.__version__}, {torch.get_num_threads()} threads; best of {args.repeats}")
    for name, sec in best.items():
        print(f"{name:>18}: {sec * 1000:8.1f} ms/step  x{sec / base:5.2f}")


if __name__ == "__main__":
    main()
