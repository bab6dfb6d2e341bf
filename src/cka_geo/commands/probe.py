"""``cka-geo probe``: a linear probe per depth of a checkpoint's encoder on the embedded tiles."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from cka_geo.commands import _training as T
from cka_geo.errors import DataError, UsageError

NAME = "probe"
HELP = "Fit one ridge linear probe per sublayer of a checkpoint on the embedded Sentinel-2 tiles or --data."


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of ``cka-geo probe``."""
    p.add_argument("checkpoint", type=Path, help="encoder checkpoint (.safetensors, .pt, .pth, .ckpt, .bin)")
    p.add_argument("--task", choices=("classification", "regression"), default=None,
                   help="embedded tiles: dominant cover class (accuracy, macro-F1) or vegetation fraction (RMSE, R²), "
                        "default classification; --data: the layout's (class folders, csv regression)")
    p.add_argument("--sublayers", nargs="+", default=["block"], metavar="KIND_OR_NAME",
                   help="sublayer kinds (attn fc1 act fc2 block) and/or canonical names (default: block)")
    p.add_argument("--pooling", choices=("mean", "cls"), default="mean", help="token pooling (default mean)")
    p.add_argument("--image-size", "--tile-size", dest="tile_size", type=T.positive_int, default=None,
                   help="tile size in pixels, up to 128 and a multiple of the patch size (default: the model's image "
                        "size; another size resamples the position embedding as the checkpoint's family does, said on "
                        "stderr and recorded)")
    p.add_argument("--batch-size", type=T.positive_int, default=64, help="batch size (default 64)")
    p.add_argument("--cv-folds", type=T.positive_int, default=5, help="folds choosing the ridge strength (default 5)")
    p.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda or cuda:N (default auto)")
    p.add_argument("--out", type=Path, default=None,
                   help="write probe.json, probe.csv and probe_depth.png into this folder, replaced as a whole; "
                        "an existing folder must be empty or hold an earlier probe run, else it is refused")
    p.add_argument("--no-figure", action="store_true", help="skip probe_depth.png")
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="allow pickled code in the checkpoint file (only for files you trust)")
    p.add_argument("--prefix", help="encoder prefix in the file when the automatic choice is wrong")
    p.add_argument("--threads", type=T.positive_int, default=None, help="torch CPU threads")
    T.add_data_arguments(p, inputs=False)
    p.add_argument("--bands", nargs="+", metavar="BAND", default=None,
                   help="--data: Sentinel-2 bands to feed, by name, as for compare")
    p.add_argument("--normalize", default="auto", metavar="PRESET",
                   help="--data: as for compare (auto, none, imagenet, s2-div10000, scene or a mean/std .json)")


def _batches(data: object, batch_size: int) -> object:
    from torch.utils.data import DataLoader

    return DataLoader(data, batch_size=batch_size, shuffle=False, num_workers=0)  # type: ignore[arg-type]


def run(args: argparse.Namespace) -> int:
    """Print the per-layer table and the best layer; write the files when ``--out`` is given."""
    import contextlib

    from cka_geo.commands._output import claim
    from cka_geo.probing import write_probe

    T.set_threads(args.threads)
    if args.data is not None:
        args.image_size = None if args.tile_size is None else [args.tile_size]
    else:
        args.image_size = None
        T.refuse_input_options(args)
    if not args.checkpoint.is_file():
        raise UsageError(f"{args.checkpoint}: no such checkpoint")
    device = T.resolve_device(args.device)
    with contextlib.ExitStack() as stack:
        out = None if args.out is None else stack.enter_context(claim(args.out, NAME, inputs=(args.checkpoint,)))
        result = _probe(args, device)
        print(result.format_table())
        if out is not None:
            with out.replace() as tmp:
                written = write_probe(result, tmp, figure=not args.no_figure)
            print(f"wrote {', '.join(p.name for p in written)} to {args.out}", file=sys.stderr)
    return 0


def _probe(args: argparse.Namespace, device: str) -> Any:
    """Load the checkpoint, run the tiles through it and fit the probes."""
    from cka_geo.checkpoints import build_model, load_checkpoint
    from cka_geo.data import EmbeddedS2Tiles
    from cka_geo.probing import probe_layers

    loaded = load_checkpoint(args.checkpoint, trust=args.trust_checkpoint, prefix=args.prefix)
    if args.data is not None:
        return _probe_data(args, device, loaded)
    args.task = args.task or "classification"
    cfg = loaded.config
    img = getattr(cfg, "img_size", None) or getattr(cfg, "image_size", None)
    bands = getattr(cfg, "in_chans", None)
    if not img or not bands:
        raise DataError(f"{args.checkpoint}: the encoder config gives no image size or band count")
    tile = args.tile_size or int(img)
    if tile > 128:
        raise DataError(f"{args.checkpoint}: image size {tile} exceeds the embedded tiles' 128 pixels")
    from cka_geo.compare.inputs import at_size

    resample = at_size(loaded, loaded, (tile, tile), f"--image-size {tile}")
    try:
        train = EmbeddedS2Tiles("train", tile_size=tile, task=args.task, bands=int(bands))
        test = EmbeddedS2Tiles("test", tile_size=tile, task=args.task, bands=int(bands))
    except DataError:
        from cka_geo.data import BAND_SELECTIONS

        served = ", ".join(str(b) for b in BAND_SELECTIONS)
        raise DataError(
            f"{args.checkpoint}: the embedded tiles cannot serve a {bands}-band model (they serve {served} bands)"
        ) from None
    model = build_model(loaded, device=device)
    result = probe_layers(
        model, _batches(train, args.batch_size), _batches(test, args.batch_size),  # type: ignore[arg-type]
        task=args.task, sublayers=args.sublayers, pooling=args.pooling, cv_folds=args.cv_folds,
        num_classes=train.num_classes or None,
    )
    result.extra.update({"checkpoint": str(args.checkpoint), "sha256": loaded.sha256, "tile_size": tile, "image_size": [tile, tile],
                         "pos_embed_resample": resample,
                         "bands": int(bands), "data": "embedded Sentinel-2 tiles (train/test splits)"})
    return result


def _probe_data(args: argparse.Namespace, device: str, loaded: Any) -> Any:
    """Probe on the train/test splits of ``--data`` (the model as it is: no band adaptation)."""
    from cka_geo.checkpoints import build_model
    from cka_geo.probing import probe_layers
    from cka_geo.train.start import Prepared, plan_inputs

    data = T.user_data(args, args.task)
    if data.task not in ("classification", "regression"):
        raise UsageError(f"--data {args.data}: probes fit classification or regression, not {data.task}")
    select, norm, record = plan_inputs(loaded, data, bands=args.bands, normalize=args.normalize,
                                       image_size=args.image_size, band_rule="off")
    train, test = (Prepared(data.splits[s], select, norm) for s in ("train", "test"))
    if not len(test):
        raise DataError(f"{args.data}: the test split is empty ({data.split_rule})")
    model = build_model(loaded, device=device)
    result = probe_layers(
        model, _batches(train, args.batch_size), _batches(test, args.batch_size),  # type: ignore[arg-type]
        task=data.task, sublayers=args.sublayers, pooling=args.pooling, cv_folds=args.cv_folds,
        num_classes=data.num_outputs if data.task == "classification" else None,
    )
    result.extra.update({"checkpoint": str(args.checkpoint), "sha256": loaded.sha256,
                         "image_size": record["image_size"], "pos_embed_resample": record["pos_embed_resample"],
                         "bands": record["band_names"], "normalize": record["normalize"],
                         "data": {**T.data_options(args), **data.record}})
    return result
