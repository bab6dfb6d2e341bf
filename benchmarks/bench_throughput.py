"""Images per second of `cka-geo compare` and of fine-tuning, and the cost of bf16 forwards.

Two encoder sizes, 13 bands: ``tiny`` (2 blocks, width 32, 16 px, patch 4) and ``vit-s``
(ViT-S/16-shaped: 12 blocks, width 384, 6 heads, patch 16; 64 px on a CPU so that a run
takes seconds, 224 px on CUDA). Printed, measured in this run:

- compare: images/s over both models, with the share of the time in the forward passes
  and in CKA (attn, fc1, fc2, block sublayers and the own change; batches of 32), for
  float32 forwards and for bf16 autocast forwards, and the largest |CKA(bf16) - CKA(float32)|
  over the whole matrix (pre vs a perturbed copy, the embedded probes);
- fine-tuning: images/s of :func:`cka_geo.train.fit` steps (classification, full
  adaptation, AdamW, forward + backward + step) on random tiles.

One process; the GPU when there is one (the same script). ``--quick`` runs fewer images.

Usage: python benchmarks/bench_throughput.py [--device cpu|cuda] [--quick] [--sizes tiny vit-s]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from _pair import model_pair
from torch.utils.data import TensorDataset

from cka_geo.compare import CompareOptions, run_cka
from cka_geo.data import iter_probe_batches
from cka_geo.features import resolve_sublayers
from cka_geo.vit import VisionTransformer, ViTConfig

SIZES = {
    "tiny": {"embed_dim": 32, "depth": 2, "num_heads": 2, "patch_size": 4, "img": 16},
    "vit-s": {"embed_dim": 384, "depth": 12, "num_heads": 6, "patch_size": 16, "img": 64},
}


def config(size: str, device: torch.device) -> ViTConfig:
    s = dict(SIZES[size])
    img = s.pop("img")
    if size == "vit-s" and device.type == "cuda":
        img = 224
    return ViTConfig(img_size=img, in_chans=13, **s)


def pair(cfg: ViTConfig, device: torch.device, change: float) -> tuple[torch.nn.Module, torch.nn.Module]:
    return model_pair(cfg, device, change, relative=True)


def compare(
    cfg: ViTConfig, n: int, device: torch.device, precision: str, change: float
) -> tuple[float, float, dict[str, float], np.ndarray]:
    """Wall and CPU seconds, the forward/CKA split, and the CKA matrix of one run."""
    pre, ft = pair(cfg, device, change)
    names = resolve_sublayers(pre, kinds=("attn", "fc1", "fc2", "block"))
    opts = CompareOptions(batch_size=32, progress=False, forward_precision=precision)
    size = cfg.img_size if isinstance(cfg.img_size, int) else cfg.img_size[0]
    batches = (b.to(device) for b in iter_probe_batches(n, bands=13, size=size, batch_size=32, seed=0))
    timings: dict[str, float] = {}
    t, c = time.perf_counter(), time.process_time()
    res = run_cka(pre, ft, names, batches, opts, n, timings)
    return time.perf_counter() - t, time.process_time() - c, timings, res.matrix


def finetune(cfg: ViTConfig, n: int, device: torch.device) -> tuple[float, float]:
    """Images per wall second and per CPU second of fine-tuning steps."""
    from cka_geo.train import TrainConfig, fit
    from cka_geo.train.tasks import TaskModel

    torch.manual_seed(0)
    model = TaskModel(VisionTransformer(cfg), "classification", 4)
    size = cfg.img_size if isinstance(cfg.img_size, int) else cfg.img_size[0]
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(n, 13, size, size, generator=g), torch.randint(0, 4, (n,), generator=g))
    tc = TrainConfig(epochs=1, batch_size=16, lr=1e-4, device=str(device), progress=False)
    fit(model, TensorDataset(data.tensors[0][:16], data.tensors[1][:16]), tc)  # warm-up
    t, c = time.perf_counter(), time.process_time()
    fit(model, data, tc)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return n / (time.perf_counter() - t), n / (time.process_time() - c)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--sizes", nargs="+", choices=tuple(SIZES), default=list(SIZES))
    p.add_argument("--quick", action="store_true", help="fewer images (a smoke run)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--change", type=float, default=0.1, help="ft = pre + change * std * noise, per tensor (default 0.1)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} CPU threads")
    for size in args.sizes:
        cfg = config(size, device)
        n_cmp = (64 if args.quick else 256) if size == "tiny" or device.type == "cuda" else (32 if args.quick else 128)
        n_ft = 32 if args.quick else (256 if size == "tiny" else 64)
        print(f"\n{size}: {cfg.depth} blocks, width {cfg.embed_dim}, {cfg.img_size} px, patch {cfg.patch_size}")
        compare(cfg, 32, device, "float32", args.change)  # warm-up: first-call costs, probe scene
        matrices = {}
        for precision in ("float32", "bf16"):
            wall, cpu, t, matrices[precision] = compare(cfg, n_cmp, device, precision, args.change)
            fwd, cka = t.get("forward", 0.0), t.get("cka", 0.0)
            print(f"  compare {precision:7s}: {n_cmp / wall:8.1f} images/s ({n_cmp / cpu:.1f} per CPU s; "
                  f"{n_cmp} images); forwards {fwd / wall:5.1%}, CKA {cka / wall:5.1%} of {wall:.2f} s")
        err = np.nanmax(np.abs(matrices["bf16"] - matrices["float32"]))
        m = matrices["float32"]
        change = 1 - np.diag(m[:, : m.shape[0]])
        print(f"  bf16 forwards: max |CKA(bf16) - CKA(float32)| = {err:.1e} over the matrix; "
              f"same-layer 1 - CKA in [{np.nanmin(change):.1e}, {np.nanmax(change):.1e}]")
        wall_ips, cpu_ips = finetune(cfg, n_ft, device)
        print(f"  fine-tune: {wall_ips:8.1f} images/s ({cpu_ips:.1f} per CPU s; {n_ft} images, batches of 16)")


if __name__ == "__main__":
    main()
