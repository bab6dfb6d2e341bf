"""Where the time of `cka-geo compare` goes: forward passes versus CKA, and its memory.

A ViT-S/16-shaped encoder (12 blocks, width 384, 6 heads, 13 bands), N = 1024 probe
images, all four sublayer types (attn, fc1, fc2, block; 48 layers) and the own-change view
(48 more columns), batches of 64. Printed, measured in this run: seconds in the forward
passes (both models, with the capture hooks and the own-change modules) and seconds in CKA,
and the ratio (target: CKA <= 15 % of the forward time); then peak memory at N = 1024 and
N = 4096 in fresh processes (target: within 1.1x).

The image size defaults to 224 on CUDA. On a CPU it defaults to 96 so that the run takes
minutes: the forward passes then cost less than at 224 while CKA costs the same (it sees
pooled features), so the CPU ratio is an upper bound of the ratio at 224.

Usage: python benchmarks/bench_compare.py [--device cpu|cuda] [--img-size 224] [--samples 1024]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch
from _pair import model_pair

from cka_geo.compare import CompareOptions, run_cka
from cka_geo.data import iter_probe_batches
from cka_geo.features import resolve_sublayers
from cka_geo.vit import ViTConfig


def models(img: int, device: torch.device) -> tuple[torch.nn.Module, torch.nn.Module]:
    cfg = ViTConfig(img_size=img, patch_size=16, in_chans=13, embed_dim=384, depth=12, num_heads=6)
    return model_pair(cfg, device)


def run(n: int, img: int, batch: int, device: torch.device) -> tuple[dict[str, float], float]:
    pre, ft = models(img, device)
    names = resolve_sublayers(pre, kinds=("attn", "fc1", "fc2", "block"))
    opts = CompareOptions(batch_size=batch, progress=False)
    timings: dict[str, float] = {}
    t = time.perf_counter()
    run_cka(pre, ft, names, iter_probe_batches(n, bands=13, size=img, batch_size=batch), opts, n, timings)
    return timings, time.perf_counter() - t


def child(n: int, img: int, batch: int, device: str) -> None:
    dev = torch.device(device)
    run(n, img, batch, dev)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    cuda = torch.cuda.max_memory_allocated(dev) / 2**20 if dev.type == "cuda" else None
    print(json.dumps({"rss_mib": rss, "cuda_mib": cuda}))


def measure(n: int, img: int, batch: int, device: str) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--child", str(n), "--img-size", str(img), "--batch-size", str(batch), "--device", device],
        capture_output=True, text=True, check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--img-size", type=int)
    p.add_argument("--samples", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--skip-memory", action="store_true")
    p.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    dev = torch.device(args.device)
    img = args.img_size or (224 if dev.type == "cuda" else 96)
    if args.child:
        child(args.child, img, args.batch_size, args.device)
        return
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"device: {name}; ViT-S/16 shape, 13 bands, {img} px; N = {args.samples}, batches of {args.batch_size}; "
          "48 sublayers + 48 own-change columns")
    timings, total = run(args.samples, img, args.batch_size, dev)
    fwd, cka = timings["forward"], timings["cka"]
    print(f"forward passes {fwd:.2f} s, CKA {cka:.2f} s -> CKA = {cka / fwd:.1%} of the forward time (target <= 15%); total {total:.2f} s")
    if not args.skip_memory:
        small, large = measure(1024, img, args.batch_size, args.device), measure(4096, img, args.batch_size, args.device)
        key = "cuda_mib" if dev.type == "cuda" else "rss_mib"
        print(f"peak memory: N=1024 {small[key]:.0f} MiB, N=4096 {large[key]:.0f} MiB, ratio {large[key] / small[key]:.3f} (target <= 1.1)")


if __name__ == "__main__":
    main()
