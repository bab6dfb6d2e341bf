"""``cka-geo evaluate``: metrics of a fine-tuned checkpoint on the embedded tiles."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from cka_geo.commands import _training as T
from cka_geo.errors import UsageError

NAME = "evaluate"
HELP = "Evaluate an ft.pt written by cka-geo finetune on a split of the embedded tiles or of --data."


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of ``cka-geo evaluate``."""
    p.add_argument("checkpoint", type=Path, help="ft.pt (or a finetune run directory)")
    p.add_argument("--split", choices=("train", "val", "test"), default="test", help="tiles (default test)")
    p.add_argument("--data", default=None,
                   help="the dataset folder the run was fine-tuned on (its layout, split, bands and "
                        "normalisation are those stored in ft.pt); default: the embedded tiles")
    p.add_argument("--batch-size", type=T.positive_int, default=64, help="batch size (default 64)")
    p.add_argument("--json", action="store_true", help="print the metrics as JSON")
    p.add_argument("--threads", type=T.positive_int, default=None, help="torch CPU threads")
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="allow pickled code in the checkpoint file (only for files you trust)")


def run(args: argparse.Namespace) -> int:
    """Print accuracy/macro-F1/mIoU (or RMSE/R²) and the loss."""
    from cka_geo.train.runs import load_task_model
    from cka_geo.train.tasks import evaluate

    T.set_threads(args.threads)
    path = args.checkpoint / "ft.pt" if args.checkpoint.is_dir() else args.checkpoint
    if not path.is_file():
        raise UsageError(f"{path}: no such checkpoint")
    model = load_task_model(path, trust=args.trust_checkpoint)
    cfg = model.encoder.cfg
    if args.data is None:
        tiles = model.run_extra.get("tiles")  # the tiles' size the run trained at (another than the checkpoint's)
        size = int(tiles["image_size"][0]) if isinstance(tiles, dict) else T.square_size(cfg, path)
        data = T.embedded(args.split, model.task, size, cfg.in_chans, checkpoint=path)
    else:
        data = _user_split(args, path, model)
    metrics = evaluate(model, data, args.batch_size)
    if args.json:
        print(json.dumps({"checkpoint": str(path), "split": args.split, "task": model.task, **metrics}))
    else:
        print(f"{path} {args.split} ({model.task}, {len(data)} tiles): {T.format_metrics(metrics)}")
    return 0


def _user_split(args: argparse.Namespace, path: Path, model: object) -> object:
    """The ``--split`` of ``--data`` as the run prepared it (options stored in ft.pt)."""
    from cka_geo.errors import DataError
    from cka_geo.train.start import Prepared, stored_normalization

    extra = getattr(model, "run_extra", {})
    stored, inputs = extra.get("data"), extra.get("inputs")
    if not isinstance(stored, dict) or not isinstance(inputs, dict):
        raise UsageError(f"{path}: fine-tuned on the embedded tiles, not on a --data folder; evaluate without --data")
    task = getattr(model, "task", None)
    data = T.user_data(args, task, stored=stored)
    outputs = getattr(model, "num_outputs", None)
    if data.num_outputs != outputs:
        raise DataError(f"{args.data}: {data.num_outputs} {'targets' if task == 'regression' else 'classes'}, "
                        f"{path} predicts {outputs}")
    split = data.splits[args.split]
    if not len(split):
        raise DataError(f"{args.data}: the {args.split} split is empty ({data.split_rule})")
    return Prepared(split, inputs["select"], stored_normalization(inputs["normalize"]))
