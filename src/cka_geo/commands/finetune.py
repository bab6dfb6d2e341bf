"""``cka-geo finetune``: fine-tune a checkpoint for segmentation, classification or regression."""

from __future__ import annotations

import argparse
from pathlib import Path

from cka_geo.commands import _training as T
from cka_geo.errors import UsageError

NAME = "finetune"
HELP = "Fine-tune a ViT checkpoint on the embedded tiles; writes pre.pt and ft.pt for compare."


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of ``cka-geo finetune``."""
    p.add_argument("checkpoint", type=Path, help="the pretrained encoder (any format compare reads)")
    p.add_argument("--out", required=True, type=Path,
                   help="run folder (pre.pt, ft.pt, eval.json, checkpoints/, metrics.*); a rerun replaces it as a whole "
                        "when done; an existing folder must be empty or hold an earlier finetune run, else it is refused")
    p.add_argument("--task", choices=("segmentation", "classification", "regression"), default="segmentation",
                   help="water mask, dominant cover class, or vegetation fraction (default segmentation)")
    p.add_argument("--decoder", choices=("linear", "upernet", "progressive"), default="linear",
                   help="segmentation decoder (default linear)")
    p.add_argument("--taps", type=T.int_list, default=None,
                   help="decoder blocks, e.g. 3,5,7,11 (default: scaled from [3,5,7,11] of 12 blocks)")
    p.add_argument("--decoder-channels", type=T.positive_int, default=32, help="decoder width (default 32)")
    p.add_argument("--adapt", choices=("full", "frozen", "last-k"), default="full",
                   help="what trains in the encoder (default full)")
    p.add_argument("--last-k", type=T.positive_int, default=None, help="blocks trained with --adapt last-k")
    p.add_argument("--label-fraction", type=T.fraction, default=1.0, help="share of training labels (stratified)")
    p.add_argument("--fraction-seed", type=T.seed_int, default=0, help="seed of the label-fraction draw (default 0)")
    p.add_argument("--stride", type=T.positive_int, default=None, help="training tile stride (default img-size / 2)")
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="allow pickled code in the checkpoint file (only for files you trust)")
    p.add_argument("--trust", dest="trust_checkpoint", action="store_true", help=argparse.SUPPRESS)  # deprecated spelling
    T.add_train_arguments(p, epochs=10, lr=1e-3)


def run(args: argparse.Namespace) -> int:
    """Fine-tune, evaluate on val and test, print the test metrics."""
    import contextlib

    from cka_geo import distributed
    from cka_geo.commands._output import claim
    from cka_geo.train.runs import finetune, load_encoder

    T.set_threads(args.threads)
    if args.adapt == "last-k" and args.last_k is None:
        raise UsageError("--adapt last-k needs --last-k N")
    if args.adapt != "last-k" and args.last_k is not None:
        raise UsageError("--last-k is only used with --adapt last-k")
    if args.task != "segmentation" and (args.decoder != "linear" or args.taps):
        raise UsageError(f"--decoder/--taps apply to segmentation, not {args.task}")
    if not args.checkpoint.is_file():
        raise UsageError(f"{args.checkpoint}: no such checkpoint")
    train_cfg = T.train_config(args)
    distributed.init(train_cfg.device)  # under torchrun: join the ranks; rank 0 alone claims --out
    resume = T.resume_path(args, args.out)
    in_place = T.resumes_in_place(resume, args.out)
    main = distributed.is_main()
    claimed = claim(args.out, NAME, inputs=(args.checkpoint, resume), in_place=in_place) if main else None
    with claimed or contextlib.nullcontext() as out:  # before any work (ddp: ranks > 0 write nothing)
        encoder = load_encoder(args.checkpoint, trust=args.trust_checkpoint)
        size, bands = T.square_size(encoder.cfg, args.checkpoint), encoder.cfg.in_chans
        stride = args.stride or max(1, size // 2)
        train = T.embedded("train", args.task, size, bands, stride=stride, checkpoint=args.checkpoint)
        val = T.embedded("val", args.task, size, bands, checkpoint=args.checkpoint)
        test = T.embedded("test", args.task, size, bands, checkpoint=args.checkpoint)
        outputs = train.num_classes or 1
        place = out.train_dir(in_place) if out is not None else contextlib.nullcontext(args.out)
        with place as work, T.resume_errors(NAME, resume):
            res = finetune(encoder, train, work, train_cfg, task=args.task, num_outputs=outputs,
                           decoder=args.decoder, taps=args.taps, decoder_channels=args.decoder_channels,
                           adaptation=args.adapt, last_k=args.last_k or 0, label_fraction=args.label_fraction,
                           fraction_seed=args.fraction_seed, val_data=val, test_data=test, resume=resume,
                           run_info={"data": {"stride": stride}}, source=str(args.checkpoint))
    if out is None:
        return 0
    if res.ft_path is None:
        print(f"stopped after epoch {res.train.epochs_done}; resume with --resume")
        return 0
    print(f"{out.final(res.pre_path, work)}  {out.final(res.ft_path, work)}")
    print(f"test: {T.format_metrics(res.metrics['test'])}")
    return 0

