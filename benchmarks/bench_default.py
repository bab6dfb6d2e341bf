"""How long the default `cka-geo compare PRE FT` takes: time per image per stage, extrapolated.

A ViT-S/14-shaped random encoder (width 384, 12 blocks, 6 heads, patch 14, 3 bands) at
224 px, the default sublayers and own-change view, the default probes (embedded crops,
``--normalize auto`` = imagenet for 3 bands) and the device's default batch size, over a
small sample count (default 64: two batches on a CPU). Printed: seconds per image in the
forward passes, in CKA and in total, and the default run's time extrapolated to the
device's default sample count (512 on CPU, 2048 on CUDA; the bootstrap is timed on its own).

Usage: python benchmarks/bench_default.py [--device cpu|cuda] [--samples 64] [--threads N]
"""

from __future__ import annotations

import argparse
import time

import torch

from cka_geo.compare import CompareOptions, run_cka
from cka_geo.compare.inputs import device_defaults
from cka_geo.compare.probes import Probes, cut_batches
from cka_geo.data.normalize import resolve
from cka_geo.features import resolve_sublayers
from cka_geo.sublayers import DEFAULT_KINDS
from cka_geo.vit import VisionTransformer, ViTConfig

CFG = ViTConfig(img_size=224, patch_size=14, in_chans=3, embed_dim=384, depth=12, num_heads=6)


def models(device: torch.device) -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(0)
    pre = VisionTransformer(CFG).to(device).eval()
    ft = VisionTransformer(CFG).to(device).eval()
    ft.load_state_dict(pre.state_dict())
    with torch.no_grad():
        for p in ft.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return pre, ft


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--samples", type=int, default=64)
    p.add_argument("--threads", type=int)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    default_n, batch = device_defaults(dev, None, None, None)
    n = args.samples
    pre, ft = models(dev)
    names = resolve_sublayers(pre, kinds=tuple(DEFAULT_KINDS))
    opts = CompareOptions(batch_size=batch, progress=False)
    probes = Probes(None, None, None, True, ("B4", "B3", "B2"))
    norm = resolve("auto", 3, probes.band_names, embedded=True, raw=True)
    batches, n, _, _ = cut_batches(probes, opts, n, batch, (224, 224), norm)
    on = batches
    if dev.type == "cuda":
        on = (b.to(dev) for b in batches)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"device: {name}; ViT-S/14 shape, 3 bands, 224 px; {n} images in batches of {batch}; "
          f"{len(names)} sublayers + own change; normalize {norm.name}")
    timings: dict[str, float] = {}
    t = time.perf_counter()
    result = run_cka(pre, ft, names, on, opts, n, timings)
    total = time.perf_counter() - t
    from cka_geo.bootstrap import bootstrap_ratio

    t = time.perf_counter()  # the bootstrap of the default run: 1000 replicates, two views
    L = len(names)
    for cols in (list(range(L)), list(range(L, 2 * L))):
        idx = list(range(L))
        bootstrap_ratio(result.batch_cross[:, idx, cols], result.batch_self_a[:, idx],  # type: ignore[index]
                        result.batch_self_b[:, cols], resamples=1000, confidence=0.95, seed=0)  # type: ignore[index]
    boot = time.perf_counter() - t
    fwd, cka = timings.get("forward", 0.0) / n, timings.get("cka", 0.0) / n
    per = total / n
    print(f"per image: forward {fwd * 1e3:.1f} ms, CKA {cka * 1e3:.1f} ms, total {per * 1e3:.1f} ms; "
          f"bootstrap (1000 x 2 views over {len(result.batch_sizes)} batches) {boot:.2f} s")
    est = per * default_n + boot * (default_n / batch) / max(1, len(result.batch_sizes))
    print(f"default compare ({default_n} images, batches of {batch}) extrapolated: {est:.0f} s ({est / 60:.1f} min)")


if __name__ == "__main__":
    main()
