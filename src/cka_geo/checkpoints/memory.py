"""Encoders from in-memory models and state dicts (timm, Hugging Face, open_clip, cka-geo).

No library is imported: a module is read through its ``state_dict()`` (converted like a file
of the same layout) and what it says about itself, duck-typed: a Hugging Face ``config``
(``to_dict()`` with a ``model_type``), else its own modules — the ``num_heads`` of its first
attention module, the ``eps`` of its first block LayerNorm, the class of its MLP activation,
timm's ``patch_embed.img_size`` / open_clip's ``image_size``. These count as stored facts,
so nothing is assumed that the live model knows.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from cka_geo.checkpoints import convert_hf
from cka_geo.errors import CheckpointError

#: Activation class names (and GELU's ``approximate``) -> our activation names.
_ACT_CLASSES = {"QuickGELU": "quick_gelu", "SiLU": "silu", "GELUTanh": "gelu_tanh", "GELU": "gelu"}
_SKIP = ("decoder", "text", "attn_pool", "head", "pooler", "classifier")
_BLOCKS = ("blocks.", "resblocks.", "layer.", "layers.")


def _act_name(module: nn.Module) -> str | None:
    name = type(module).__name__
    if name == "GELU" and getattr(module, "approximate", "none") == "tanh":
        return "gelu_tanh"
    return _ACT_CLASSES.get(name)


def module_facts(model: nn.Module) -> dict[str, tuple[Any, str]]:
    """Hyperparameters a live model states about itself (field -> (value, where))."""
    kind = type(model).__name__
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_dict") and getattr(config, "model_type", None):
        return convert_hf.config_facts(config.to_dict(), f"{kind}.config")[1]
    facts: dict[str, tuple[Any, str]] = {}
    for path, m in model.named_modules():
        if any(word in path for word in _SKIP) or not any(b in f"{path}." for b in _BLOCKS):
            continue
        heads = getattr(m, "num_heads", None)
        if "num_heads" not in facts and isinstance(heads, int) and not isinstance(heads, bool):
            facts["num_heads"] = (heads, f"{kind}.{path}.num_heads")
        if (
            "norm_eps" not in facts
            and isinstance(m, nn.LayerNorm)
            and not path.endswith(("q_norm", "k_norm"))
        ):
            facts["norm_eps"] = (float(m.eps), f"{kind}.{path}.eps")
        act = _act_name(m)
        if "act" not in facts and act is not None and ".mlp" in f".{path}":
            facts["act"] = (act, f"{kind}.{path} ({type(m).__name__})")
    size = getattr(getattr(model, "patch_embed", None), "img_size", None) or getattr(model, "image_size", None)
    if isinstance(size, (tuple, list)) and len(size) == 2 and all(isinstance(v, int) for v in size):
        facts["img_size"] = (size[0] if size[0] == size[1] else (int(size[0]), int(size[1])), f"{kind} image size")
    elif isinstance(size, int) and not isinstance(size, bool):
        facts["img_size"] = (size, f"{kind} image size")
    return facts


def load_model(
    model: nn.Module | dict[str, torch.Tensor],
    *,
    name: str | None = None,
    prefix: str | None = None,
    num_heads: int | None = None,
    norm_eps: float | None = None,
    act: str | None = None,
    img_size: int | tuple[int, int] | None = None,
) -> Any:
    """A :class:`~cka_geo.checkpoints.load.LoadedCheckpoint` from a module or a state dict.

    Args:
        model: A timm, Hugging Face, open_clip or cka-geo ViT (a full CLIP model: its
            ``visual`` tower), or a state dict in any layout a file may have.
        name: How to name it in notes and results (default ``<in-memory ClassName>``).
        prefix, num_heads, norm_eps, act, img_size: As for
            :func:`~cka_geo.checkpoints.load_checkpoint`.

    Raises:
        CheckpointError: Not a module or a dict of tensors, an unsupported model (rotary
            position embeddings), or what a file of the same layout would be refused for.
    """
    from cka_geo.checkpoints.load import LoadedCheckpoint, _resolve
    from cka_geo.models.vit import VisionTransformer

    label = name or f"<in-memory {type(model).__name__}>"
    path = Path(label)
    given = {"num_heads": num_heads, "norm_eps": norm_eps, "act": act, "img_size": img_size}
    if isinstance(model, VisionTransformer):
        sd = {k: v.detach() for k, v in model.state_dict().items() if not k.startswith("head.")}
        cfg = model.cfg.__class__(**{**model.cfg.to_dict(), "num_classes": 0})
        return LoadedCheckpoint(path, "", "timm", sd, cfg, "", [("", cfg.depth)], [],
                                ["a cka-geo VisionTransformer: its own config"], source="cka_geo")
    if isinstance(model, nn.Module):
        if getattr(model, "rope", None) is not None or getattr(model, "use_rot_pos_emb", False):
            raise CheckpointError(
                f"{label}: rotary position embeddings (EVA-02 / DINOv3 style) have no "
                "equivalent in the timm-named ViT; not supported"
            )
        visual = getattr(model, "visual", None)
        tower = visual if isinstance(visual, nn.Module) else model
        stored = module_facts(tower)
        obj: Any = {k: v.detach() for k, v in model.state_dict().items()}
    elif isinstance(model, dict):
        stored, obj = {}, model
    else:
        raise CheckpointError(f"{label}: a {type(model).__name__}, not an nn.Module or a state dict")
    notes = [f"{label}: read from memory (state_dict and the model's own attributes)"]
    loaded = _resolve(path, obj, None, notes, prefix=prefix, given=given, stored=stored)
    return loaded


