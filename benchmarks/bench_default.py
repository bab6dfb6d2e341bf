"""How long the default `cka-geo compare PRE FT` of a DINOv2-ViT-S/14-shaped pair takes.

A ViT-S/14-shaped random encoder pair (width 384, 12 blocks, 6 heads, patch 14, 3 bands) with
the **518-px native config** of a real DINOv2 ViT-S/14, compared exactly as
``cka-geo compare`` does by default on the device: the image size, sample count and batch
size that compare chooses there (:func:`cka_geo.compare.inputs.default_image_size`,
:func:`~cka_geo.compare.inputs.device_defaults`: on CPU 224 px with the pos_embed resampled,
the scene's distinct 224-px crops, >= 10 batches), the default sublayers and own-change view,
``--normalize auto`` (imagenet for 3 bands) and the default bootstrap.

Printed: the plan; per image, the seconds in the forward passes, in CKA and in total
(:func:`~cka_geo.compare.run_cka` over the default probes); the bootstrap; the default run's
estimate from those; and (unless ``--no-full``) the measured wall time of a real default
``compare_models`` call (model conversion, probes, forwards, CKA, bootstrap, verdicts),
against the 5-minute goal on 2 CPU cores.

Usage: python benchmarks/bench_default.py [--device cpu|cuda] [--threads N] [--no-full]
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch
from _pair import model_pair

from cka_geo.compare import CompareOptions, compare_models, run_cka
from cka_geo.compare.inputs import default_image_size, device_defaults
from cka_geo.compare.probes import Probes, cut_batches
from cka_geo.data import distinct_crops
from cka_geo.data.normalize import resolve
from cka_geo.features import resolve_sublayers
from cka_geo.sublayers import DEFAULT_KINDS
from cka_geo.vit import ViTConfig

CFG = ViTConfig(img_size=518, patch_size=14, in_chans=3, embed_dim=384, depth=12, num_heads=6)
GOAL_S = 300.0


def models(device: torch.device, cfg: ViTConfig) -> tuple[torch.nn.Module, torch.nn.Module]:
    """A pretrained-like and a fine-tuned-like model: the second is the first plus 1 % noise."""
    return model_pair(cfg, device)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int)
    p.add_argument("--no-full", action="store_true", help="skip the end-to-end compare_models run")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    hw = default_image_size((CFG.img_size, CFG.img_size), CFG.patch_size, dev, distinct_crops)
    n, batch = device_defaults(dev, None, None, None, distinct_crops(hw))
    grid = (hw[0] // CFG.patch_size, hw[1] // CFG.patch_size)
    run_cfg = ViTConfig(img_size=hw, patch_size=14, in_chans=3, embed_dim=384, depth=12, num_heads=6)
    pre, ft = models(dev, run_cfg)  # at the run's size: the resample itself costs nothing per image
    names = resolve_sublayers(pre, kinds=tuple(DEFAULT_KINDS))
    opts = CompareOptions(batch_size=batch, progress=False)
    probes = Probes(None, None, None, True, ("B4", "B3", "B2"))
    norm = resolve("auto", 3, probes.band_names, embedded=True, raw=True)
    batches, n, desc, _ = cut_batches(probes, opts, n, batch, hw, norm)
    on = (b.to(dev) for b in batches) if dev.type == "cuda" else batches
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"device: {name}; ViT-S/14 shape, 518 px native, run at {hw[0]}x{hw[1]} ({grid[0]}x{grid[1]} patches); "
          f"{desc}; {n} images in {-(-n // batch)} batches of {batch}; {len(names)} sublayers + own change; "
          f"normalize {norm.name}")
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
    print(f"per image: forward {fwd * 1e3:.0f} ms, CKA {cka * 1e3:.0f} ms, total {per * 1e3:.0f} ms; "
          f"bootstrap (1000 x 2 views over {len(result.batch_sizes)} batches) {boot:.2f} s")
    est = total + boot
    print(f"default compare estimate: {est:.0f} s ({est / GOAL_S:.2f} of the {GOAL_S:.0f} s goal)")
    if args.no_full:
        return
    pre518, ft518 = models(dev, CFG)
    t = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the pos_embed resample line
        res = compare_models(pre518, ft518, CompareOptions(device=args.device, progress=False))
    full = time.perf_counter() - t
    st = res.settings
    print(f"measured default compare_models: {full:.0f} s ({full / GOAL_S:.2f} of the goal) at "
          f"{st['image_size'][0]}x{st['image_size'][1]}, {st['samples']} images in {st['batches']} batches "
          f"of {st['batch_size']}; probe crops {st['probe_crops']}")


if __name__ == "__main__":
    main()
