"""Arguments and helpers shared by ``cka-geo pretrain``, ``finetune``, ``evaluate`` and ``demo``."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from cka_geo.errors import UsageError


def _number(text: str, kind: type, ok: Callable[[float], bool], what: str) -> Any:
    """``kind(text)`` if ``ok`` holds for it, else an argparse error saying ``what`` was expected."""
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if not ok(value):
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
    return value


def positive_int(text: str) -> int:
    """argparse type: an integer ≥ 1."""
    return int(_number(text, int, lambda v: v >= 1, "a positive integer"))


def nonneg_int(text: str) -> int:
    """argparse type: an integer ≥ 0."""
    return int(_number(text, int, lambda v: v >= 0, "an integer >= 0"))


def positive_float(text: str) -> float:
    """argparse type: a finite float > 0."""
    return float(_number(text, float, lambda v: 0 < v < float("inf"), "a positive number"))


def nonneg_float(text: str) -> float:
    """argparse type: a finite float >= 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}") from None
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}")
    return value


def drop_rate(text: str) -> float:
    """argparse type: a float in [0, 1)."""
    return float(_number(text, float, lambda v: 0 <= v < 1, "a number in [0, 1)"))


def fraction(text: str) -> float:
    """argparse type: a float in (0, 1]."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}")
    return value


SEED_MAX = 2**32 - 1


def seed_int(text: str) -> int:
    """argparse type: a seed in [0, 2**32 - 1] (what numpy, torch and python all accept)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer in [0, {SEED_MAX}], got {text!r}") from None
    if not 0 <= value <= SEED_MAX:
        raise argparse.ArgumentTypeError(f"expected an integer in [0, {SEED_MAX}], got {text!r}")
    return value


def int_list(text: str) -> list[int]:
    """argparse type: comma-separated integers, e.g. ``3,5,7,11``."""
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """Encoder architecture options (defaults: the demo's small ViT)."""
    g = p.add_argument_group("encoder")
    g.add_argument("--img-size", type=positive_int, default=32, help="tile size in pixels (default 32)")
    g.add_argument("--patch-size", type=positive_int, default=4, help="patch size (default 4)")
    g.add_argument("--bands", type=positive_int, default=13, help="input bands: 13, 12, 10, 6, 4, 3 or 1 (default 13)")
    g.add_argument("--embed-dim", type=positive_int, default=64, help="width (default 64)")
    g.add_argument("--depth", type=positive_int, default=12, help="blocks (default 12)")
    g.add_argument("--heads", type=positive_int, default=2, help="attention heads (default 2)")


def add_train_arguments(p: argparse.ArgumentParser, epochs: int, lr: float, batch_size: int = 32) -> None:
    """Loop options."""
    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=positive_int, default=epochs, help=f"epochs (default {epochs})")
    g.add_argument("--batch-size", type=positive_int, default=batch_size, help=f"batch size (default {batch_size})")
    g.add_argument("--lr", type=positive_float, default=lr, help=f"peak learning rate (default {lr:g})")
    g.add_argument("--weight-decay", type=nonneg_float, default=0.05, help="AdamW weight decay (default 0.05)")
    g.add_argument("--warmup-steps", type=nonneg_int, default=20,
                   help="linear warm-up steps, then cosine decay to 0.1 x --lr (default 20)")
    g.add_argument("--layer-decay", type=fraction, default=1.0,
                   help="layer-wise LR decay (BEiT/MAE): block i trains at lr * decay^(depth - i), the patch "
                        "embedding at lr * decay^(depth + 1), the head at lr (default 1: none)")
    g.add_argument("--drop-path", type=drop_rate, default=0.0,
                   help="stochastic depth rate of the last block, linear from 0 at the first (default 0: off)")
    g.add_argument("--accum-steps", type=positive_int, default=1,
                   help="micro-batches of --batch-size per optimizer step (gradient accumulation; default 1)")
    g.add_argument("--precision", choices=("32", "bf16-mixed", "16-mixed"), default="32",
                   help="float32, or autocast to bfloat16 / float16 (with a gradient scaler) (default 32)")
    g.add_argument("--seed", type=seed_int, default=0, help="seed of initialisation, data order and masks (default 0)")
    g.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads (default: available cores, at most 4)")
    g.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda or cuda:N (default auto)")
    g.add_argument("--resume", nargs="?", const="auto", default=None, metavar="CKPT",
                   help="continue an interrupted run (default file: OUT/checkpoints/last.pt) with the same "
                        "options; only --epochs, --device, --threads and --progress may differ")
    g.add_argument("--stop-after-epoch", type=positive_int, default=None, help=argparse.SUPPRESS)
    g.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bar on stderr (default: when stderr is a terminal)")


def set_threads(n: int | None) -> int:
    """``torch.set_num_threads``: ``n`` or min(available cores, 4).

    The models trained here are small: beyond 4 threads the OpenMP barriers cost more than
    they save, and on a busy machine even 2 threads can be slower than 1.
    """
    import torch

    if n is None:
        try:
            cores = len(os.sched_getaffinity(0))
        except AttributeError:  # not on Linux
            cores = os.cpu_count() or 1
        n = max(1, min(cores, 4))
    torch.set_num_threads(n)
    return n


def train_config(args: argparse.Namespace) -> Any:
    """A :class:`~cka_geo.train.loop.TrainConfig` from the parsed options."""
    from cka_geo.train import TrainConfig

    return TrainConfig(
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
        warmup_steps=args.warmup_steps, seed=args.seed, progress=args.progress,
        stop_after_epoch=args.stop_after_epoch, device=resolve_device(args.device),
        layer_decay=getattr(args, "layer_decay", 1.0), drop_path=getattr(args, "drop_path", 0.0),
        accum_steps=getattr(args, "accum_steps", 1), precision=getattr(args, "precision", "32"),
    )


def resolve_device(name: str) -> str:
    """``--device`` checked by :func:`cka_geo.devices.resolve_device` (``"auto"`` resolved)."""
    from cka_geo.devices import resolve_device as resolve

    return str(resolve(name))


def resume_path(args: argparse.Namespace, out: Any) -> Any:
    """The checkpoint ``--resume`` names, or None; refuses a missing one."""
    from pathlib import Path

    if args.resume is None:
        return None
    path = Path(out) / "checkpoints" / "last.pt" if args.resume == "auto" else Path(args.resume)
    if not path.is_file():
        raise UsageError(f"--resume: {path} does not exist")
    return path


def resumes_in_place(resume: Any, out: Any) -> bool:
    """Whether the ``--resume`` checkpoint lies inside ``--out`` (the run continues there)."""
    if resume is None:
        return False
    r, o = os.path.realpath(resume), os.path.realpath(out)
    return r.startswith(o.rstrip(os.sep) + os.sep)


# What each stored setting of a training run is called on the command line.
RESUME_FLAGS = {
    "train.batch_size": "--batch-size", "train.lr": "--lr", "train.weight_decay": "--weight-decay",
    "train.warmup_steps": "--warmup-steps", "train.seed": "--seed", "train.layer_decay": "--layer-decay",
    "train.drop_path": "--drop-path", "train.accum_steps": "--accum-steps", "train.precision": "--precision",
    "objective": "--objective", "objective_kwargs.mask_ratio": "--mask-ratio",
    "objective_kwargs.decoder_dim": "--decoder-dim", "objective_kwargs.decoder_depth": "--decoder-depth",
    "objective_kwargs.temperature": "--temperature",
    "encoder.img_size": "--img-size", "encoder.patch_size": "--patch-size", "encoder.in_chans": "--bands",
    "encoder.embed_dim": "--embed-dim", "encoder.depth": "--depth", "encoder.num_heads": "--heads",
    "task.task": "--task", "task.num_outputs": "--task", "task.decoder": "--decoder", "task.taps": "--taps",
    "task.decoder_channels": "--decoder-channels", "task.adaptation": "--adapt", "task.last_k": "--last-k",
    "label_fraction": "--label-fraction", "fraction_seed": "--fraction-seed", "data.stride": "--stride", "data.image_size": "--image-size",
    "train_samples": "--stride", "data.path": "--data", "data.layout": "--layout", "data.target": "--target",
    "data.labels": "--labels", "data.split_seed": "--split-seed", "data.val_fraction": "--val-fraction",
    "data.test_fraction": "--test-fraction", "inputs.bands": "--bands", "inputs.normalize.name": "--normalize",
    "inputs.image_size": "--image-size", "inputs.adapt.band_rule": "--band-rule",
    "inputs.adapt.model_bands": "--model-bands",
}


@contextmanager
def resume_errors(command: str, resume: Any) -> Iterator[None]:
    """Turn a refused resume (:class:`~cka_geo.train.loop.ResumeMismatch`) into one line naming the option."""
    from cka_geo.train.loop import ResumeMismatch

    try:
        yield
    except ResumeMismatch as exc:
        if exc.key == "kind":
            raise UsageError(f"--resume {resume}: the checkpoint is of a cka-geo {exc.old} run, not {command}") from None
        from_file = command == "finetune" and (exc.key.startswith("encoder") or exc.key == "pre_sha256")
        if from_file:
            raise UsageError(f"--resume {resume}: the run started from another encoder than CHECKPOINT "
                             f"({exc.key} {exc.old!r}, now {exc.new!r}); pass the same checkpoint") from None
        flag = RESUME_FLAGS.get(exc.key)
        if flag is None:
            raise UsageError(f"--resume {resume}: the run was started with {exc.key}={exc.old!r}, this one has "
                             f"{exc.new!r}") from None
        raise UsageError(f"--resume {resume}: the run was started with {flag} {_show(exc.old)}, this one has "
                         f"{flag} {_show(exc.new)}; resume with the same {flag} (only --epochs, --device, "
                         "--threads and --progress may change)") from None


def _show(value: Any) -> str:
    if isinstance(value, list):
        return ",".join(str(v) for v in value)
    return "(default)" if value is None else str(value)


def embedded(split: str, task: str, tile_size: int, bands: int, stride: int | None = None,
             checkpoint: Any = None) -> Any:
    """The embedded Sentinel-2 tiles of one split (see :class:`cka_geo.data.EmbeddedS2Tiles`).

    Tiles the embedded scene cannot serve are refused naming ``--img-size``/``--bands``, or
    the ``checkpoint`` whose encoder asked for them.
    """
    from cka_geo.data import BAND_SELECTIONS, EmbeddedS2Tiles
    from cka_geo.errors import DataError

    if tile_size > 128:
        if checkpoint is not None:
            raise DataError(f"{checkpoint}: image size {tile_size} exceeds the embedded tiles' 128 pixels")
        raise UsageError(f"--img-size {tile_size}: embedded tiles are at most 128 pixels")
    if bands not in BAND_SELECTIONS:
        served = ", ".join(str(b) for b in sorted(BAND_SELECTIONS))
        if checkpoint is not None:
            raise DataError(f"{checkpoint}: a {bands}-band encoder; the embedded tiles serve {served} bands only")
        raise UsageError(f"--bands {bands}: the embedded tiles serve {served} bands only")
    return EmbeddedS2Tiles(split, tile_size=tile_size, task=task, bands=bands, stride=stride)  # type: ignore[arg-type]


def format_metrics(metrics: dict[str, float]) -> str:
    """``name=value`` pairs on one line."""
    return " ".join(f"{k}={v:.4f}" for k, v in metrics.items())


def tile_size_option(args: argparse.Namespace) -> int | None:
    """``--image-size`` for the embedded tiles: one side N (or N N), else None."""
    size = getattr(args, "image_size", None)
    if not size:
        return None
    if len(size) > 2 or size[0] != size[-1]:
        raise UsageError(f"--image-size {' '.join(map(str, size))}: the embedded tiles are square; give one size")
    return int(size[0])


def square_size(cfg: Any, path: Any) -> int:
    """The encoder's image size for training on square tiles; a rectangular one is refused."""
    size = cfg.img_size
    if isinstance(size, tuple):
        if size[0] != size[1]:
            raise UsageError(f"{path}: a {size[0]}x{size[1]} encoder; training takes square tiles only")
        size = size[0]
    return int(size)


def add_data_arguments(p: argparse.ArgumentParser, *, inputs: bool = True, adapt: bool = False) -> None:
    """``--data`` and its options (layout, targets, splits) and compare's input options."""
    g = p.add_argument_group("users' data (docs/data.md)")
    g.add_argument("--data", type=str, default=None,
                   help="a labelled dataset folder instead of the embedded tiles: class folders (root/<class>/*.tif), "
                        "images/ + masks/, Sen1Floods11, PASTIS-like, or images with a .csv (regression, multilabel)")
    g.add_argument("--layout", choices=("auto", "class-folders", "image-mask", "sen1floods11", "pastis", "csv"),
                   default="auto", help="the layout of --data (default: recognised)")
    g.add_argument("--target", default=None,
                   help="csv layout: the target column(s), comma-separated (regression; default 'target') or the "
                        "label column (multilabel, names split by ; or |; default 'labels')")
    g.add_argument("--labels", default=None, help="csv layout: the label file (default: the one .csv in --data)")
    g.add_argument("--split-seed", type=seed_int, default=0,
                   help="seed of the train/val/test split where --data gives none (default 0)")
    g.add_argument("--val-fraction", type=nonneg_float, default=0.1, help="seeded split: share for val (default 0.1)")
    g.add_argument("--test-fraction", type=nonneg_float, default=0.2, help="seeded split: share for test (default 0.2)")
    if not inputs:
        return
    g.add_argument("--bands", nargs="+", metavar="BAND", default=None,
                   help="Sentinel-2 bands of --data to feed, by name (e.g. B04 B03 B02), as for compare")
    g.add_argument("--normalize", default="auto", metavar="PRESET",
                   help="as for compare: auto, none, imagenet, s2-div10000 (ssl4eo), scene or a mean/std .json "
                        "(default auto: --data as given unless raw DNs, then DN / 10000; imagenet for 3 bands)")
    g.add_argument("--image-size", type=positive_int, nargs="+", default=None, metavar="PX",
                   help="N or H W, as for compare: must be the size of --data (finetune on the embedded tiles: their "
                        "size, up to 128); another size than the checkpoint's resamples its position embedding on "
                        "the fly as its family does")
    if adapt:
        g.add_argument("--band-rule", choices=("auto", "names", "mean", "off"), default="auto",
                       help="when --data has other bands than the model: copy kernels by band name, new bands at "
                            "zero (names; auto when names are known), every kernel the mean x C/C' (mean), or "
                            "refuse (off) (default auto; docs/training.md)")
        g.add_argument("--model-bands", nargs="+", metavar="BAND", default=None,
                       help="the model's band names (default: cka-geo's order for its count, e.g. B4 B3 B2)")


def user_data(args: argparse.Namespace, task: str | None, stored: dict[str, Any] | None = None) -> Any:
    """Open ``--data`` (:func:`cka_geo.data.layouts.open_user_data`); ``stored``: a run's data options."""
    from cka_geo.data.layouts import open_user_data

    o = stored if stored is not None else data_options(args)
    return open_user_data(args.data, task=task, layout=o["layout"], target=o["target"], labels=o["labels"],
                          split_seed=o["split_seed"], val_fraction=o["val_fraction"], test_fraction=o["test_fraction"])


def data_options(args: argparse.Namespace) -> dict[str, Any]:
    """The ``--data`` options as stored with a run (and compared on resume)."""
    return {"path": str(args.data), "layout": args.layout, "target": args.target, "labels": args.labels,
            "split_seed": args.split_seed, "val_fraction": args.val_fraction, "test_fraction": args.test_fraction}


def refuse_input_options(args: argparse.Namespace, image_size: bool = False) -> None:
    """``--bands``/``--normalize`` and the split options apply with ``--data`` only (and
    ``--image-size``, unless ``image_size``: the command also takes it for the embedded tiles)."""
    if args.data is not None:
        return
    given = [f for f, v, d in (("--bands", getattr(args, "bands", None), None),
                               ("--normalize", getattr(args, "normalize", "auto"), "auto"),
                               ("--image-size", None if image_size else getattr(args, "image_size", None), None),
                               ("--target", args.target, None), ("--labels", args.labels, None),
                               ("--layout", args.layout, "auto")) if v != d]
    if given:
        raise UsageError(f"{given[0]} applies to --data only")
