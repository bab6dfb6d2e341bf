"""What each own-change view costs, and what sharing the pretrained forward saves.

A ViT-S-shaped random pair (width 384, 12 blocks, 6 heads, patch 16, 3 bands; 224 px by
default) over a few batches of random images. Printed, as ratios to the forwards without
any own change (pre + ft): the forwards with the own-change views ``attn fc1 fc2``,
``block`` and all four (the default), and the whole run (forwards + CKA) over its
forwards, and the CPU time (less disturbed than wall time on a shared machine); then the
forwards of 3 fine-tunes sharing one pretrained forward against 3 separate runs.

Usage: python benchmarks/bench_own_change.py [--device cpu|cuda] [--samples 16] [--size 224] [--threads N]
"""

from __future__ import annotations

import argparse
import time

import torch

from cka_geo.compare import CompareOptions, run_many
from cka_geo.features import resolve_sublayers
from cka_geo.sublayers import DEFAULT_KINDS
from cka_geo.vit import VisionTransformer, ViTConfig


def models(cfg: ViTConfig, k: int, device: torch.device) -> list[torch.nn.Module]:
    torch.manual_seed(0)
    out = [VisionTransformer(cfg).to(device).eval() for _ in range(k + 1)]
    for m in out[1:]:
        m.load_state_dict(out[0].state_dict())
        with torch.no_grad():
            for p in m.parameters():
                p.add_(0.01 * torch.randn_like(p))
    return out


def timed(pre: torch.nn.Module, fts: list[torch.nn.Module], x: list[torch.Tensor], **kw: object) -> dict[str, float]:
    opts = CompareOptions(progress=False, batch_size=x[0].shape[0], **kw)  # type: ignore[arg-type]
    names = resolve_sublayers(pre, kinds=tuple(DEFAULT_KINDS))
    timings: dict[str, float] = {}
    start, cpu = time.perf_counter(), time.process_time()
    run_many(pre, fts, names, iter(x), opts, sum(b.shape[0] for b in x), timings)
    timings["total"] = time.perf_counter() - start
    timings["cpu"] = time.process_time() - cpu
    return timings


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--threads", type=int)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    cfg = ViTConfig(img_size=args.size, patch_size=16, in_chans=3, embed_dim=384, depth=12, num_heads=6)
    pre, *fts = models(cfg, 3, dev)
    g = torch.Generator().manual_seed(0)
    x = list(torch.randn(args.samples, 3, args.size, args.size, generator=g).split(args.batch_size))
    timed(pre, fts[:1], x[:1], own_change=False)  # warm-up
    base = timed(pre, fts[:1], x, own_change=False)
    print(f"{args.samples} images at {args.size} px on {dev}; forwards without own change: {base['forward']:.2f} s")
    for label, kw in (("attn fc1 fc2", {"own_kinds": ("attn", "fc1", "fc2")}), ("block", {"own_kinds": ("block",)}),
                      ("all (default)", {})):
        t = timed(pre, fts[:1], x, **kw)
        print(f"own change {label:14s} forwards {t['forward'] / base['forward']:.2f}x wall "
              f"(own change {t.get('own_change', 0.0):.2f} s); whole run / its forwards {t['total'] / t['forward']:.3f}; "
              f"CPU time {t['cpu'] / base['cpu']:.2f}x")
    shared = timed(pre, fts, x, own_change=False)
    alone = [timed(pre, [ft], x, own_change=False) for ft in fts]
    wall, cpu = sum(t["forward"] for t in alone), sum(t["cpu"] for t in alone)
    print(f"3 fine-tunes, pretrained forward shared: {shared['forward']:.2f} s against {wall:.2f} s in 3 runs "
          f"({shared['forward'] / wall:.2f}x wall, {shared['cpu'] / cpu:.2f}x CPU time; ideal 4/6 = 0.67x)")


if __name__ == "__main__":
    main()
