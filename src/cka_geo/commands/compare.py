"""``cka-geo compare PRE FT``: where did fine-tuning change the model?"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from cka_geo.commands._training import seed_int
from cka_geo.functional import DEFAULT_RBF_FRAC

if TYPE_CHECKING:
    from cka_geo.compare import CompareOptions

NAME = "compare"
HELP = "CKA between a pretrained and fine-tuned checkpoints (or two architectures: --cross), sublayer by sublayer"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of ``cka-geo compare``."""
    from cka_geo.compare import DEFAULT_SAMPLES, DEFAULT_SUBLAYERS, POOLINGS, SUBLAYER_KINDS

    p.add_argument("pre", help="pretrained checkpoint (.pt .pth .ckpt .bin .safetensors)")
    p.add_argument("ft", nargs="+", metavar="FT", help="fine-tuned checkpoint(s): several share one forward of the pretrained model per batch and write runs/<name>/ plus runs.csv, runs.json and depth_profile_runs.png")
    p.add_argument("--cross", action="store_true", help="PRE and FT of different architectures: every layer of one against every layer of the other (the full matrix and heatmap; no same-layer or own-change view)")
    p.add_argument("--data", help="probe images: a folder of .tif/.npy tiles, or a .npy/.pt array (N, C, H, W) or time series (N, T, C, H, W); default: the embedded Sentinel-2 set")
    p.add_argument("--sublayers", nargs="+", choices=SUBLAYER_KINDS, default=list(DEFAULT_SUBLAYERS), metavar="KIND", help=f"sublayer kinds among {', '.join(SUBLAYER_KINDS)} (default: %(default)s)")
    p.add_argument("--kernel", choices=("linear", "rbf"), default="linear")
    p.add_argument("--rbf-frac", type=float, default=DEFAULT_RBF_FRAC, help="RBF sigma as a fraction of the median pairwise distance, in [0.1, 10] (default: %(default)s)")
    p.add_argument("--estimator", choices=("unbiased", "biased"), default="unbiased", help="unbiased: minibatch HSIC_1; biased: full-batch CKA (small N)")
    p.add_argument("--pooling", choices=POOLINGS, default="mean", help="token pooling (default: %(default)s)")
    p.add_argument("--samples", type=int, help=f"probe images to use (default: all of --data; embedded: {DEFAULT_SAMPLES} on CPU, 2048 on CUDA, never more than the scene's distinct crops at the image size; more overlap, with a warning)")
    p.add_argument("--batch-size", type=int, help="images per batch, the unit of the bootstrap (default: 32 on CPU, 128 on CUDA, smaller where that leaves fewer than 10 batches)")
    p.add_argument("--image-size", type=int, nargs="+", metavar="PX", help="N or H W: the size the models see (default: that of --data; embedded: on CPU min(checkpoint's, 224) per side, on CUDA the checkpoint's, smaller where the scene holds fewer than 40 distinct crops); a multiple of the patch size; another size than the checkpoint's resamples its position embedding as its family does (timm: bicubic with antialias; Hugging Face ViT/DINOv2: bicubic without), said on stderr and recorded")
    p.add_argument("--bands", nargs="+", metavar="BAND", help="Sentinel-2 bands to feed, by name (e.g. B04 B03 B02), from the embedded scene or from --data with 13, 12, 10, 6, 4 or 3 bands in cka-geo's band order")
    p.add_argument("--normalize", default="auto", metavar="PRESET", help="auto (3-band models: imagenet on reflectance; others: the scene z-score on the embedded set, --data as given unless raw DNs, then DN / 10000), none, imagenet (DN / 10000 then ImageNet mean/std), s2-div10000 (alias ssl4eo: DN / 10000, as torchgeo's SSL4EO-S12), scene (z-score by the embedded scene's band statistics), or a .json {\"mean\": [...], \"std\": [...]} (default: auto)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: %(default)s)")
    p.add_argument("--seed", type=seed_int, default=0, help="seed of the embedded probe crops and the bootstrap (default 0)")
    p.add_argument("--time-mode", choices=("frames", "mean"), default="frames", help="time series: each frame an example, or the mean over time")
    p.add_argument("--bootstrap", type=int, default=1000, help="replicates of the percentile bootstrap (0: no intervals at all)")
    p.add_argument("--interval", choices=("jackknife-t", "percentile", "none"), default="jackknife-t",
                   help="interval over batches: jackknife-t (default; nominal coverage from 6 batches on, "
                   "benchmarks/bench_intervals.py), percentile (bootstrap; 84-92%% at 6-16 batches for a nominal 95%%) or none")
    p.add_argument("--confidence", type=float, default=0.95)
    p.add_argument("--no-own-change", action="store_true", help="skip each sublayer's own change")
    p.add_argument("--own-change", nargs="+", choices=SUBLAYER_KINDS, metavar="KIND", help="the own-change views to compute, among the compared kinds (default: all). Each costs its fine-tuned modules run on the pretrained inputs: block at most one more forward of the fine-tuned model, attn fc1 fc2 together about as much again (the default: about 1.5x the forward time of no own change on a CPU); settings.seconds records each stage")
    p.add_argument("--out", default="cka-geo-results", help="output folder (default: %(default)s), replaced as a whole by each run; an existing folder must be empty or hold an earlier compare run, else it is refused (choose another --out)")
    p.add_argument("--format", nargs="+", choices=("table", "json", "csv"), default=["table", "json", "csv"], help="outputs (default: all)")
    p.add_argument("--no-figures", action="store_true", help="do not draw figures")
    p.add_argument("--trust-checkpoint", action="store_true", help="allow pickled code in the checkpoint files (only for files you trust)")
    p.add_argument("--prefix", help="encoder prefix in the files when the automatic choice is wrong")
    p.add_argument("--num-heads", type=int, help="attention heads when the files do not store them (default: a known fact of the family, else width / 64 with a warning)")
    p.add_argument("--norm-eps", type=float, help="LayerNorm epsilon when the files do not store it (default: known, else 1e-6 with a warning)")
    p.add_argument("--act", choices=("gelu", "gelu_tanh", "quick_gelu", "silu"), help="MLP activation when the files do not say it (default: known, else gelu with a warning)")
    p.add_argument("--wavelengths", nargs="+", metavar="WL", help="DOFA: input band wavelengths in µm or band names (B02 B03 ... or RED NIR_NARROW ...; default: stored band names, else the 13 Sentinel-2 L1C bands)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None, help="progress on stderr: a bar on a terminal, else plain lines (the estimated total after the first batch, then every 10 %% or 30 s); --no-progress: none, nor the plan line (default: on)")
    p.add_argument("--forward-precision", choices=("float32", "bf16"), default="float32", help="dtype of the forwards: bf16 runs them under autocast (GPUs with bf16 units), the grams and sums stay float32/float64; its measured error is in docs/distributed.md (default: %(default)s)")
    p.add_argument("-q", "--quiet", action="store_true", help="print nothing on stderr but errors")


def run(args: argparse.Namespace) -> int:
    """Run the comparison, print the table, write JSON/CSV and figures."""
    from cka_geo import distributed
    from cka_geo.commands._output import claim
    from cka_geo.compare import CompareOptions, compare_checkpoints, resolve_device
    from cka_geo.errors import UsageError
    from cka_geo.report import describe_checkpoints, format_table, write_results

    for path in (args.pre, *args.ft):
        if not Path(path).exists():
            raise UsageError(f"{path}: no such file")
    if args.own_change and args.no_own_change:
        raise UsageError("--own-change and --no-own-change: choose one")
    if args.cross and len(args.ft) != 1:
        raise UsageError(f"--cross compares two checkpoints, PRE and one other; got {1 + len(args.ft)}")
    distributed.init(resolve_device(args.device))  # under torchrun: join the ranks before --out is claimed
    if distributed.world() > 1 and (args.cross or len(args.ft) > 1):
        raise UsageError("under torchrun, compare takes PRE and one fine-tune of the same architecture "
                         "(run --cross or several fine-tunes in one process)")
    opts = CompareOptions(
        data=args.data,
        sublayers=tuple(dict.fromkeys(args.sublayers)),
        kernel=args.kernel,
        rbf_frac=args.rbf_frac,
        estimator=args.estimator,
        pooling=args.pooling,
        samples=args.samples,
        batch_size=args.batch_size,
        device=args.device,
        seed=args.seed,
        time_mode=args.time_mode,
        trust=args.trust_checkpoint,
        prefix=args.prefix,
        num_heads=args.num_heads,
        norm_eps=args.norm_eps,
        act=args.act,
        wavelengths=tuple(_number_or_name(w) for w in args.wavelengths) if args.wavelengths else None,
        own_change=not args.no_own_change,
        own_kinds=tuple(dict.fromkeys(args.own_change)) if args.own_change else None,
        bootstrap=args.bootstrap,
        interval=args.interval,
        confidence=args.confidence,
        progress=args.progress,
        image_size=_size(args.image_size),
        bands=tuple(args.bands) if args.bands else None,
        normalize=args.normalize,
        forward_precision=args.forward_precision,
    )
    if args.quiet and args.progress is None:
        opts.progress = False
    main = distributed.is_main()  # under torchrun rank 0 alone claims --out, writes and prints
    if args.cross:
        from cka_geo.commands._compare_cross import run_cross

        return run_cross(args, opts)
    if len(args.ft) > 1:
        return _run_many(args, opts)
    files = [f for f in args.format if f != "table"]
    written = []
    with contextlib.ExitStack() as stack:
        out = None
        if main and (files or not args.no_figures):  # --out checked before the work, replaced whole after it
            out = stack.enter_context(claim(args.out, NAME, inputs=(args.pre, *args.ft, args.data)))
        results = compare_checkpoints(args.pre, args.ft[0], opts)
        if not main:
            return 0
        if not args.quiet:
            print("\n".join(describe_checkpoints(results)), file=sys.stderr)
        if out is not None:
            with out.replace() as tmp:
                if not args.no_figures:
                    from cka_geo.compare.job import timed
                    from cka_geo.plotting import plot_all

                    with timed(results["settings"]):
                        plot_all(results, tmp)
                write_results(results, tmp, tuple(files))
                written = sorted(p.name for p in tmp.iterdir())
    if opts.progress is not False:
        from cka_geo.compare.job import say_cost

        print(say_cost(results["settings"]["seconds"]), file=sys.stderr)
    if "table" in args.format:
        print(format_table(results))
    if written and not args.quiet:
        print(f"wrote {', '.join(written)} to {args.out}", file=sys.stderr)
    return 0


def _run_many(args: argparse.Namespace, opts: CompareOptions) -> int:
    """PRE against several fine-tunes: one results folder per run, the combined files, and
    one verdict line per run on stdout."""
    from cka_geo.commands._output import claim
    from cka_geo.compare import compare_many
    from cka_geo.report import describe_checkpoints
    from cka_geo.runs import run_names, write_runs

    names = run_names(args.ft)
    files = tuple(f for f in args.format if f != "table")
    written: list[str] = []
    with contextlib.ExitStack() as stack:
        out = None
        if files or not args.no_figures:
            out = stack.enter_context(claim(args.out, NAME, inputs=(args.pre, *args.ft, args.data)))
        results = compare_many(args.pre, args.ft, opts)
        if not args.quiet:
            lines: list[str] = []
            for k, (name, res) in enumerate(zip(names, results, strict=True)):
                for line in describe_checkpoints(res):
                    if not line.lstrip().startswith("pre:"):
                        lines.append(line.replace("ft:", f"ft {name}:", 1))
                    elif k == 0:
                        lines.append(line)
            print("\n".join(lines), file=sys.stderr)
        if out is not None:
            with out.replace() as tmp:
                write_runs(tmp, args.pre, names, results, files, figures=not args.no_figures)
                written = sorted(p.name for p in tmp.iterdir())
    if opts.progress is not False:
        from cka_geo.compare.job import say_cost

        print(say_cost(results[0]["settings"]["seconds"]), file=sys.stderr)
    if "table" in args.format:
        width = max(len(n) for n in names)
        print("\n".join(f"{n.ljust(width)}  {r['summary']['verdict']}" for n, r in zip(names, results, strict=True)))
    if written and not args.quiet:
        print(f"wrote {', '.join(written)} to {args.out} ({len(names)} runs in runs/: {', '.join(names)})", file=sys.stderr)
    return 0


def _number_or_name(text: str) -> float | str:
    try:
        return float(text)
    except ValueError:
        return text


def _size(values: list[int] | None) -> int | tuple[int, int] | None:
    from cka_geo.errors import UsageError

    if values is None:
        return None
    if len(values) not in (1, 2):
        raise UsageError(f"--image-size takes N or H W, got {len(values)} values")
    return values[0] if len(values) == 1 else (values[0], values[1])
