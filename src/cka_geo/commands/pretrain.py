"""``cka-geo pretrain``: self-supervised pretraining of a ViT on the embedded Sentinel-2 tiles."""

from __future__ import annotations

import argparse
from pathlib import Path

from cka_geo.commands import _training as T
from cka_geo.errors import UsageError

NAME = "pretrain"
HELP = "Pretrain a ViT (masked autoencoder or contrastive) on the embedded Sentinel-2 tiles."


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of ``cka-geo pretrain``."""
    p.add_argument("--out", required=True, type=Path,
                   help="run folder (pretrained.pt, checkpoints/, metrics.*); a rerun replaces it as a whole when "
                        "done; an existing folder must be empty or hold an earlier pretrain run, else it is refused")
    p.add_argument("--objective", choices=("mae", "simclr"), default="mae", help="objective (default mae)")
    p.add_argument("--mask-ratio", type=T.fraction, default=0.75, help="MAE: share of patches masked (default 0.75)")
    p.add_argument("--decoder-dim", type=T.positive_int, default=64, help="MAE decoder width (default 64)")
    p.add_argument("--decoder-depth", type=T.positive_int, default=1, help="MAE decoder blocks (default 1)")
    p.add_argument("--temperature", type=T.positive_float, default=0.2, help="SimCLR temperature (default 0.2)")
    p.add_argument("--stride", type=T.positive_int, default=None, help="tile stride in pixels (default img-size / 2)")
    T.add_model_arguments(p)
    T.add_train_arguments(p, epochs=30, lr=1.5e-3, batch_size=64)


def run(args: argparse.Namespace) -> int:
    """Train, write OUT/pretrained.pt, print its path and the final loss."""
    from cka_geo.commands._output import claim
    from cka_geo.models.vit import ViTConfig
    from cka_geo.train.runs import build_vit, pretrain

    T.set_threads(args.threads)
    if args.mask_ratio >= 1:
        raise UsageError("--mask-ratio must be below 1")
    cfg = ViTConfig(img_size=args.img_size, patch_size=args.patch_size, in_chans=args.bands,
                    embed_dim=args.embed_dim, depth=args.depth, num_heads=args.heads)
    train_cfg = T.train_config(args)
    resume = T.resume_path(args, args.out)
    in_place = T.resumes_in_place(resume, args.out)
    with claim(args.out, NAME, in_place=in_place) as out:  # before any work
        stride = args.stride or max(1, args.img_size // 2)
        data = T.embedded("train", "segmentation", args.img_size, args.bands, stride=stride)
        kwargs = ({"mask_ratio": args.mask_ratio, "decoder_dim": args.decoder_dim, "decoder_depth": args.decoder_depth}
                  if args.objective == "mae" else {"temperature": args.temperature})
        encoder = build_vit(cfg, args.seed)
        with out.train_dir(in_place) as work, T.resume_errors(NAME, resume):
            res = pretrain(encoder, data, work, train_cfg, objective=args.objective, objective_kwargs=kwargs,
                           resume=resume, run_info={"data": {"stride": stride}})
    loss = res.train.history["epochs"][-1]["train_loss"] if res.train.history["epochs"] else float("nan")
    if res.encoder_path is None:
        print(f"stopped after epoch {res.train.epochs_done}; resume with --resume  (loss {loss:.4f})")
    else:
        path = out.final(res.encoder_path, work)
        print(f"{path}  ({args.objective}, {res.train.epochs_done} epochs, final loss {loss:.4f})")
    return 0
