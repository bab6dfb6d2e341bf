"""``cka-geo finetune``: fine-tune a checkpoint for segmentation, classification or regression."""

from __future__ import annotations

import argparse
from pathlib import Path

from cka_geo.commands import _training as T
from cka_geo.errors import UsageError

NAME = "finetune"
HELP = "Fine-tune a ViT checkpoint on the embedded tiles or --data; writes pre.pt and ft.pt for compare."


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of ``cka-geo finetune``."""
    p.add_argument("checkpoint", type=Path, help="the pretrained encoder (any format compare reads)")
    p.add_argument("--out", required=True, type=Path,
                   help="run folder (pre.pt, ft.pt, eval.json, checkpoints/, metrics.*); a rerun replaces it as a whole "
                        "when done; an existing folder must be empty or hold an earlier finetune run, else it is refused")
    p.add_argument("--task", choices=("segmentation", "classification", "regression", "multilabel"), default=None,
                   help="embedded tiles: water mask, dominant cover class, or vegetation fraction (default "
                        "segmentation); --data: the layout's task (csv: regression or multilabel)")
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
    p.add_argument("--prefix", help="--data: encoder prefix in the file when the automatic choice is wrong")
    p.add_argument("--num-heads", type=T.positive_int, default=None,
                   help="--data: attention heads when the file does not store them (as for compare)")
    T.add_data_arguments(p, adapt=True)
    T.add_train_arguments(p, epochs=10, lr=1e-3)


def run(args: argparse.Namespace) -> int:
    """Fine-tune, evaluate on val and test, print the test metrics."""
    import contextlib

    from cka_geo import distributed
    from cka_geo.commands._output import claim
    from cka_geo.train.runs import finetune, load_encoder

    T.set_threads(args.threads)
    T.refuse_input_options(args, image_size=True)
    if args.data is None and args.task == "multilabel":
        raise UsageError("--task multilabel needs --data (the embedded tiles have no multi-label targets)")
    if args.data is None and (args.prefix is not None or args.num_heads is not None):
        raise UsageError(f"{'--prefix' if args.prefix else '--num-heads'} applies to --data runs")
    if args.adapt == "last-k" and args.last_k is None:
        raise UsageError("--adapt last-k needs --last-k N")
    if args.adapt != "last-k" and args.last_k is not None:
        raise UsageError("--last-k is only used with --adapt last-k")
    if args.data is not None and args.stride is not None:
        raise UsageError("--stride applies to the embedded tiles, not --data")
    if not args.checkpoint.exists():
        raise UsageError(f"{args.checkpoint}: no such checkpoint")
    train_cfg = T.train_config(args)
    distributed.init(train_cfg.device)  # under torchrun: join the ranks; rank 0 alone claims --out
    resume = T.resume_path(args, args.out)
    in_place = T.resumes_in_place(resume, args.out)
    main = distributed.is_main()
    claimed = claim(args.out, NAME, inputs=(args.checkpoint, resume, args.data), in_place=in_place) if main else None
    with claimed or contextlib.nullcontext() as out:  # before any work (ddp: ranks > 0 write nothing)
        ft_extra: dict[str, object] = {}
        ignore = -1
        if args.data is None:
            task = args.task or "segmentation"
            _check_decoder(args, task)
            tile = T.tile_size_option(args)
            encoder = load_encoder(args.checkpoint, trust=args.trust_checkpoint, image_size=tile)
            size, bands = tile or T.square_size(encoder.cfg, args.checkpoint), encoder.cfg.in_chans
            stride = args.stride or max(1, size // 2)
            train = T.embedded("train", task, size, bands, stride=stride, checkpoint=args.checkpoint)
            val = T.embedded("val", task, size, bands, checkpoint=args.checkpoint)
            test = T.embedded("test", task, size, bands, checkpoint=args.checkpoint)
            outputs = train.num_classes or 1
            run_info: dict[str, object] = {"data": {"stride": stride, **({"image_size": size} if tile else {})}}
        else:
            from cka_geo.train.start import prepare_start

            data = T.user_data(args, args.task)
            task, outputs, ignore = data.task, data.num_outputs, data.ignore_index
            _check_decoder(args, task)
            start = prepare_start(args.checkpoint, data, trust=args.trust_checkpoint, prefix=args.prefix,
                                  num_heads=args.num_heads,
                                  bands=args.bands, normalize=args.normalize, image_size=args.image_size,
                                  band_rule=args.band_rule, model_bands=args.model_bands)
            encoder, train, val, test = start.encoder, start.splits["train"], start.splits["val"], start.splits["test"]
            val = val if len(val) else None
            test = test if len(test) else None
            run_info = {"data": T.data_options(args), "inputs": start.record}
            ft_extra = {"data": {**T.data_options(args), **data.record}, "inputs": start.record}
            if main:
                _say_inputs(start.record, data.record)
        place = out.train_dir(in_place) if out is not None else contextlib.nullcontext(args.out)
        with place as work, T.resume_errors(NAME, resume):
            res = finetune(encoder, train, work, train_cfg, task=task, num_outputs=outputs,
                           decoder=args.decoder, taps=args.taps, decoder_channels=args.decoder_channels,
                           adaptation=args.adapt, last_k=args.last_k or 0, label_fraction=args.label_fraction,
                           fraction_seed=args.fraction_seed, ignore_index=ignore, val_data=val, test_data=test,
                           resume=resume, run_info=run_info, source=str(args.checkpoint), ft_extra=ft_extra)
    if out is None:
        return 0
    if res.ft_path is None:
        print(f"stopped after epoch {res.train.epochs_done}; resume with --resume")
        return 0
    print(f"{out.final(res.pre_path, work)}  {out.final(res.ft_path, work)}")
    for split in ("test", "val"):
        if split in res.metrics:
            print(f"{split}: {T.format_metrics(res.metrics[split])}")
            break
    return 0


def _check_decoder(args: argparse.Namespace, task: str) -> None:
    if task != "segmentation" and (args.decoder != "linear" or args.taps):
        raise UsageError(f"--decoder/--taps apply to segmentation, not {task}")


def _say_inputs(inputs: dict[str, object], data: dict[str, object]) -> None:
    """One stderr line: what the data is and how it reaches the model."""
    import sys

    norm = inputs["normalize"]
    adapt = inputs.get("adapt")
    print(f"data: {data['path']} ({data['layout']}, {data['task']}; {data['sizes']}; {data['split']}); "
          f"normalize {norm['name'] if isinstance(norm, dict) else norm}"
          + (f"; patch embedding adapted ({adapt['rule']})" if isinstance(adapt, dict) else ""), file=sys.stderr)
