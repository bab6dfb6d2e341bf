"""``cka-geo demo``: the whole story on a laptop CPU, from the embedded Sentinel-2 crop.

1. Pretrain a small ViT (13 bands, 32 px tiles, patch 4, width 64, 12 blocks) as a masked
   autoencoder on the training tiles.
2. Fine-tune it twice for water segmentation (NDWI-derived masks), both settings changing
   the encoder: full fine-tuning with a linear per-patch decoder, and with the UPerNet-style
   decoder on blocks [3, 5, 7, 11].
3. Compare each ``ft.pt`` with ``pre.pt`` (:func:`cka_geo.compare.compare_checkpoints`),
   sublayer by sublayer.
4. Write figures (``figures/`` for the two settings side by side, and the compare figures in
   each ``compare_*/``), ``summary.md`` and ``summary.json``: which sublayer changed most,
   and which sublayer kind (attn, fc1, fc2) changed most on average over depth.

Every step is seeded; with the same ``--threads`` the numbers repeat exactly.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from cka_geo.commands import _training as T
from cka_geo.errors import CkaGeoError
from cka_geo.sublayers import DEFAULT_KINDS, parse

NAME = "demo"
HELP = "Pretrain, fine-tune twice and compare, on the embedded Sentinel-2 crop (a few minutes on a CPU)."

SETTINGS = ("linear", "upernet")
KINDS = DEFAULT_KINDS


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of ``cka-geo demo``."""
    p.add_argument("--out", type=Path, default=Path("cka-geo-demo"),
                   help="output folder (default ./cka-geo-demo), replaced as a whole when the demo is done; an "
                        "existing folder must be empty or hold an earlier demo, else it is refused")
    p.add_argument("--threads", type=T.positive_int, default=None,
                   help="torch CPU threads (default: available cores, at most 4; use 1 on a busy machine)")
    p.add_argument("--seed", type=T.seed_int, default=0, help="seed of everything (default 0)")
    p.add_argument("--pretrain-epochs", type=T.positive_int, default=30, help="MAE epochs (default 30)")
    p.add_argument("--finetune-epochs", type=T.positive_int, default=5, help="fine-tuning epochs (default 5)")
    p.add_argument("--samples", type=T.positive_int, default=512, help="probe images for CKA (default 512)")
    p.add_argument("--quick", action="store_true", help="a tiny run (2 blocks, 1 epoch each) to check the plumbing")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bars on stderr (default: when stderr is a terminal)")


def _label(decoder: str, depth: int) -> str:
    from cka_geo.train.decoders import default_taps

    if decoder == "upernet":
        return f"full fine-tune, UPerNet decoder on blocks {default_taps(depth)}"
    return f"full fine-tune, {decoder} decoder"


def _profile(values: dict[str, float | None], depth: int) -> dict[str, list[float | None]]:
    out: dict[str, list[float | None]] = {k: [None] * depth for k in KINDS}
    for name, v in values.items():
        parsed = parse(name)
        if parsed is not None and parsed[1] in out:
            out[parsed[1]][parsed[0]] = v
    return out


def _mean(xs: list[float | None]) -> float:
    v = [x for x in xs if x is not None]
    return sum(v) / len(v) if v else float("nan")


def _figures(results: dict[str, dict[str, Any]], depth: int, fig_dir: Path) -> list[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    from cka_geo.atomic import atomic_path

    fig_dir.mkdir(parents=True, exist_ok=True)
    colors = {"attn": "tab:blue", "fc1": "tab:red", "fc2": "tab:green", "block": "black"}
    paths = []
    for key, title, fname in (("diagonal", "same-layer CKA(pre, ft)", "demo_depth_profile.png"),
                              ("own_change", "own change: CKA(pre s, ft s on pre's input)", "demo_own_change.png")):
        fig, axes = plt.subplots(1, len(results), figsize=(5.2 * len(results), 3.6), sharey=True, squeeze=False)
        for ax, (name, res) in zip(axes[0], results.items(), strict=True):
            prof = _profile(res.get(key) or {}, depth)
            for kind, ys in prof.items():
                pts = [(i, 1 - y) for i, y in enumerate(ys) if y is not None]
                ax.plot([i for i, _ in pts], [v for _, v in pts], marker="o", ms=3, color=colors[kind], label=kind)
            ax.set_title(_label(name, depth), fontsize=9)
            ax.set_xlabel("block")
            ax.set_xticks(range(depth))
            ax.grid(alpha=0.3)
        axes[0][0].set_ylabel("1 − CKA (higher: more change)")
        axes[0][0].legend(fontsize=8)
        fig.suptitle(f"cka-geo demo: {title}", fontsize=10)
        fig.tight_layout()
        path = fig_dir / fname
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=120, format="png")
        plt.close(fig)
        paths.append(path)
    return paths


def run(args: argparse.Namespace) -> int:
    """Run the demo; print the summary to stdout."""
    from cka_geo.commands._output import claim

    t0, c0 = time.perf_counter(), time.process_time()
    args.threads = T.set_threads(args.threads)
    with claim(args.out, NAME) as out, out.replace() as tmp:  # --out checked first, replaced whole at the end
        text = _run(args, tmp, lambda p: out.final(p, tmp), t0, c0)
    print(text, end="")
    return 0


def _run(args: argparse.Namespace, out: Path, final: Any, t0: float, c0: float) -> str:
    """Every step, writing into ``out``; ``final`` maps a path below ``out`` to where it will be."""
    import torch

    from cka_geo.atomic import write_text_atomic
    from cka_geo.models.vit import ViTConfig
    from cka_geo.train import TrainConfig
    from cka_geo.train.runs import build_vit, finetune, pretrain

    depth = 2 if args.quick else 12
    p_epochs = 1 if args.quick else args.pretrain_epochs
    f_epochs = 1 if args.quick else args.finetune_epochs
    samples = min(args.samples, 64) if args.quick else args.samples
    cfg = ViTConfig(img_size=32, patch_size=4, in_chans=13, embed_dim=64, depth=depth, num_heads=2)
    train_pre = T.embedded("train", "segmentation", 32, 13, stride=16)
    train = T.embedded("train", "segmentation", 32, 13, stride=16)
    val = T.embedded("val", "segmentation", 32, 13)
    test = T.embedded("test", "segmentation", 32, 13)
    if args.quick:
        train_pre = torch.utils.data.Subset(train_pre, range(64))
        train = torch.utils.data.Subset(train, range(64))
        val, test = torch.utils.data.Subset(val, range(32)), torch.utils.data.Subset(test, range(32))
    timings: dict[str, float] = {}

    t = time.perf_counter()
    pcfg = TrainConfig(epochs=p_epochs, batch_size=64, lr=1.5e-3, warmup_steps=20, seed=args.seed, progress=args.progress)
    pre = pretrain(build_vit(cfg, args.seed), train_pre, out / "pretrain", pcfg, objective="mae",
                   objective_kwargs={"mask_ratio": 0.75, "decoder_dim": 64, "decoder_depth": 1})
    timings["pretrain_s"] = time.perf_counter() - t
    mae_loss = [r["train_loss"] for r in pre.train.history["epochs"]]
    encoder_path = pre.encoder_path
    if encoder_path is None:  # pretrain always writes one; the type says it may not
        raise CkaGeoError(f"{out / 'pretrain'}: pretraining wrote no encoder")

    runs: dict[str, Any] = {}
    for decoder in SETTINGS:
        t = time.perf_counter()
        fcfg = TrainConfig(epochs=f_epochs, batch_size=32, lr=1e-3, warmup_steps=20, seed=args.seed, progress=args.progress)
        res = finetune(encoder_path, train, out / f"finetune_{decoder}", fcfg, task="segmentation",
                       num_outputs=2, decoder=decoder, decoder_channels=16, adaptation="full",
                       val_data=val, test_data=test, source=str(final(encoder_path)))
        timings[f"finetune_{decoder}_s"] = time.perf_counter() - t
        runs[decoder] = res

    results: dict[str, dict[str, Any]] = {}
    try:
        from cka_geo.compare import compare_checkpoints
        from cka_geo.report import write_results
    except ImportError:  # CALL SITE: compare not installed in this checkout
        compare_checkpoints = None  # type: ignore[assignment]
    for decoder, res in runs.items():
        if compare_checkpoints is None:
            break
        t = time.perf_counter()
        r = compare_checkpoints(res.pre_path, res.ft_path, device="cpu", samples=samples, batch_size=32,
                                seed=args.seed, bootstrap=200, progress=args.progress)
        for record in r["checkpoints"].values():  # where the files will be, not the temporary folder
            record["path"] = str(final(record["path"]))
        write_results(r, out / f"compare_{decoder}")
        try:  # the compare command's own figures: heatmap, depth profile, change bars
            from cka_geo.plotting import plot_all

            plot_all(r, out / f"compare_{decoder}")
        except ImportError:  # matplotlib (extra "plot") not installed
            pass
        timings[f"compare_{decoder}_s"] = time.perf_counter() - t
        results[decoder] = r

    figures = [final(p) for p in _figures(results, depth, out / "figures")] if results else []
    timings["total_s"] = time.perf_counter() - t0
    timings["total_cpu_s"] = time.process_time() - c0
    summary = _summary(args, cfg, mae_loss, runs, results, timings, figures, final)
    write_text_atomic(out / "summary.json", json.dumps(summary, indent=1) + "\n")
    text = _summary_text(summary)
    write_text_atomic(out / "summary.md", text)
    return text


def _summary(args: argparse.Namespace, cfg: Any, mae_loss: list[float], runs: dict[str, Any],
             results: dict[str, dict[str, Any]], timings: dict[str, float], figures: list[Path],
             final: Any = Path) -> dict[str, Any]:
    out: dict[str, Any] = {
        "model": cfg.to_dict(), "threads": args.threads, "seed": args.seed, "quick": args.quick,
        "pretrain": {"objective": "mae", "loss_first_epoch": mae_loss[0], "loss_last_epoch": mae_loss[-1],
                     "epochs": len(mae_loss)},
        "timings_s": {k: round(v, 1) for k, v in timings.items()},
        "figures": [str(p) for p in figures],
        "settings": {},
    }
    for decoder in SETTINGS:
        res = runs[decoder]
        entry: dict[str, Any] = {"label": _label(decoder, cfg.depth), "test": res.metrics.get("test", {}),
                                 "pre": str(final(res.pre_path)), "ft": str(final(res.ft_path))}
        r = results.get(decoder)
        if r is not None:
            depth = cfg.depth
            diag, own = _profile(r["diagonal"], depth), _profile(r.get("own_change") or {}, depth)
            entry["summary"] = r["summary"]
            entry["mean_1_minus_cka_by_kind"] = {k: 1 - _mean(diag[k]) for k in KINDS}
            entry["mean_own_change_by_kind"] = {k: 1 - _mean(own[k]) for k in KINDS if any(v is not None for v in own[k])}
            subl = {k: v for k, v in entry["mean_own_change_by_kind"].items() if k != "block"}
            entry["kind_with_largest_own_change"] = max(subl, key=lambda k: subl[k]) if subl else None
            entry["block_profile_1_minus_cka"] = [None if v is None else 1 - v for v in diag["block"]]
        else:
            entry["compare"] = "cka_geo.compare not available: run `cka-geo compare PRE FT` on the files above"
        out["settings"][decoder] = entry
    return out


def _summary_text(s: dict[str, Any]) -> str:
    m = s["model"]
    lines = [
        "# cka-geo demo",
        "",
        f"ViT: {m['depth']} blocks, width {m['embed_dim']}, patch {m['patch_size']}, {m['in_chans']} bands, "
        f"{m['img_size']} px tiles of the embedded Sentinel-2 L1C crop; {s['threads']} threads, seed {s['seed']}.",
        f"MAE pretraining: {s['pretrain']['epochs']} epochs, loss {s['pretrain']['loss_first_epoch']:.3f} -> "
        f"{s['pretrain']['loss_last_epoch']:.3f}.",
        "",
    ]
    for _, e in s["settings"].items():
        test = " ".join(f"{k}={v:.3f}" for k, v in e["test"].items() if k != "loss")
        lines.append(f"## {e['label']}")
        lines.append(f"- water segmentation, test tiles: {test}")
        if "summary" in e:
            lines.append(f"- {e['summary']['verdict']}")
            means = ", ".join(f"{k} {v:.4f}" for k, v in e["mean_1_minus_cka_by_kind"].items())
            lines.append(f"- mean 1 - CKA over blocks: {means}")
            if e.get("mean_own_change_by_kind"):
                own = ", ".join(f"{k} {v:.4f}" for k, v in e["mean_own_change_by_kind"].items())
                lines.append(f"- mean own change (1 - CKA) over blocks: {own}; largest among sublayers: "
                             f"{e['kind_with_largest_own_change']}")
            prof = " ".join("-" if v is None else f"{v:.3f}" for v in e["block_profile_1_minus_cka"])
            lines.append(f"- block outputs, 1 - CKA by depth: {prof}")
        else:
            lines.append(f"- {e['compare']}")
        lines.append("")
    t = s["timings_s"]
    lines.append("Run time (wall): " + ", ".join(f"{k[:-2]} {v:.0f} s" for k, v in t.items() if k != "total_cpu_s")
                 + f"; CPU time {t['total_cpu_s']:.0f} s over {s['threads']} threads.")
    if s["figures"]:
        lines.append("Figures: " + ", ".join(s["figures"]) + ".")
    return "\n".join(lines) + "\n"
