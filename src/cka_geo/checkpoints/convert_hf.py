"""Hugging Face ViT / DINOv2 encoders converted exactly into the timm-named ViT.

Two key layouts are read (keys relative to the model's prefix, e.g. ``vit.``):

* what ``save_pretrained`` writes (transformers 4.x modules, and 5.x files):
  ``embeddings.{cls_token, position_embeddings, register_tokens, distillation_token,
  patch_embeddings.projection}``, ``encoder.layer.{i}.attention.attention.{query,key,value}``,
  ``attention.output.dense``, ``intermediate.dense``, ``output.dense``,
  ``layernorm_before/after`` (ViT) or ``norm1/norm2``, ``mlp.fc1/fc2``, ``mlp.weights_in/out``
  (SwiGLU), ``layer_scale1/2.lambda1`` (DINOv2), ``layernorm``;
* the 5.x in-memory modules (``model.state_dict()``): ``layers.{i}.`` or
  ``encoder.layer.{i}.`` with ``attention.{q,k,v,o}_proj``, ``mlp.fc1/fc2`` and
  ``mlp.{gate,up,down}_proj``.

Mapping: q, k, v are stacked into ``attn.qkv``; DINOv2 registers (``register_tokens``) become
timm's ``reg_token`` with ``no_embed_class``, the class token's position folded into the
class token (as timm's own DINOv2 conversion); HF ViT / DINOv2 resize positions by bicubic
interpolation without antialiasing (``pos_embed_antialias=False``), DINOv2 with registers
with it. ``config.json`` supplies heads, LayerNorm
eps, activation and image size; without it, known facts or assumptions (see
:mod:`~cka_geo.checkpoints.known`).
"""

from __future__ import annotations

import re
from typing import Any

import torch

from cka_geo.errors import CheckpointError

#: Architectures (``config.json`` ``architectures``) and model types read.
ARCHITECTURES = {
    "ViTModel", "ViTForImageClassification", "ViTForMaskedImageModeling",
    "Dinov2Model", "Dinov2ForImageClassification", "Dinov2Backbone",
    "Dinov2WithRegistersModel", "Dinov2WithRegistersForImageClassification", "Dinov2WithRegistersBackbone",
    "DeiTModel", "DeiTForImageClassification", "DeiTForImageClassificationWithTeacher",
}
MODEL_TYPES = {"vit": "hf_vit", "deit": "hf_vit", "dinov2": "dinov2", "dinov2_with_registers": "dinov2"}
#: transformers ``hidden_act`` -> our activation.
HF_ACT = {
    "gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh",
    "quick_gelu": "quick_gelu", "silu": "silu", "swish": "silu",
}
#: Defaults of the transformers config classes (used when config.json omits a field).
HF_DEFAULT_EPS = {"hf_vit": 1e-12, "dinov2": 1e-6}

_LAYER = re.compile(r"^(?:encoder\.layer|layers)\.(\d{1,9})\.(.+)$")
_RENAME = {
    "attention.output.dense.": "attn.proj.",
    "attention.o_proj.": "attn.proj.",
    "intermediate.dense.": "mlp.fc1.",
    "output.dense.": "mlp.fc2.",
    "layernorm_before.": "norm1.",
    "layernorm_after.": "norm2.",
    "norm1.": "norm1.",
    "norm2.": "norm2.",
    "mlp.fc1.": "mlp.fc1.",
    "mlp.fc2.": "mlp.fc2.",
    "mlp.weights_in.": "mlp.fc1.",
    "mlp.weights_out.": "mlp.fc2.",
    "mlp.down_proj.": "mlp.fc2.",
    "layer_scale1.lambda1": "ls1.gamma",
    "layer_scale2.lambda1": "ls2.gamma",
}
_QKV = {
    "attention.attention.query.": 0, "attention.attention.key.": 1, "attention.attention.value.": 2,
    "attention.q_proj.": 0, "attention.k_proj.": 1, "attention.v_proj.": 2,
}
_GLU = {"mlp.gate_proj.": 0, "mlp.up_proj.": 1}
_EMBED = {
    "embeddings.cls_token": "cls_token",
    "embeddings.distillation_token": "dist_token",
    "embeddings.position_embeddings": "pos_embed",
    "embeddings.register_tokens": "reg_token",
    "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "layernorm.weight": "norm.weight",
    "layernorm.bias": "norm.bias",
}
_IGNORED = ("embeddings.mask_token", "pooler.", "classifier.", "cls_classifier.", "distillation_classifier.")


def family_of_keys(sd: dict[str, torch.Tensor]) -> str:
    """``"dinov2"`` when the blocks carry DINOv2's names (norm1, layer_scale), else ``"hf_vit"``."""
    return "dinov2" if any(".norm1." in k or ".layer_scale1." in k for k in sd) else "hf_vit"


def to_timm(sd: dict[str, torch.Tensor], notes: list[str]) -> tuple[dict[str, torch.Tensor], list[str], dict[str, Any]]:
    """timm-named tensors from a Hugging Face encoder (keys relative to its prefix).

    Returns:
        (timm-named tensors, keys ignored, config facts implied by the layout:
        ``no_embed_class``, ``mlp_type``, ``pos_embed_antialias``, ``dynamic_img_size``).

    Raises:
        CheckpointError: A block key this converter does not know (named), or q/k/v parts
            missing.
    """
    out: dict[str, torch.Tensor] = {}
    ignored: list[str] = []
    qkv: dict[tuple[int, str], dict[int, torch.Tensor]] = {}
    glu: dict[tuple[int, str], dict[int, torch.Tensor]] = {}
    facts: dict[str, Any] = {"pos_embed_antialias": False, "dynamic_img_size": True}
    for key, value in sd.items():
        if key in _EMBED:
            out[_EMBED[key]] = value
            continue
        if key.startswith(_IGNORED):
            ignored.append(key)
            continue
        m = _LAYER.match(key)
        if m is None:
            raise CheckpointError(f"Hugging Face encoder key {key[:80]!r} is not a ViT/DINOv2 key this loader knows")
        i, rest = int(m[1]), m[2]
        part = next((p for p in _QKV if rest.startswith(p)), None)
        if part is not None:
            qkv.setdefault((i, rest[len(part):]), {})[_QKV[part]] = value
            continue
        part = next((p for p in _GLU if rest.startswith(p)), None)
        if part is not None:
            glu.setdefault((i, rest[len(part):]), {})[_GLU[part]] = value
            continue
        part = next((p for p in _RENAME if rest.startswith(p)), None)
        if part is None:
            raise CheckpointError(f"Hugging Face block key {key[:80]!r} is not one this loader knows")
        if part.startswith("mlp.weights_") or part == "mlp.down_proj.":
            facts["mlp_type"] = "swiglu"
        out[f"blocks.{i}.{_RENAME[part]}{rest[len(part):]}"] = value
    for (i, what), parts in sorted(qkv.items()):
        if sorted(parts) != [0, 1, 2]:
            raise CheckpointError(f"Hugging Face block {i}: query/key/value {what} incomplete")
        out[f"blocks.{i}.attn.qkv.{what}"] = torch.cat([parts[0], parts[1], parts[2]], dim=0)
    for (i, what), parts in sorted(glu.items()):
        if sorted(parts) != [0, 1]:
            raise CheckpointError(f"Hugging Face block {i}: gate_proj/up_proj {what} incomplete")
        out[f"blocks.{i}.mlp.fc1.{what}"] = torch.cat([parts[0], parts[1]], dim=0)
        facts["mlp_type"] = "swiglu"
    if "reg_token" in out:
        pos, cls = out.get("pos_embed"), out.get("cls_token")
        if pos is None or cls is None:
            raise CheckpointError("Hugging Face DINOv2 with registers lacks its class token or positions")
        out["cls_token"] = cls + pos[:, :1]
        out["pos_embed"] = pos[:, 1:]
        facts["no_embed_class"] = True
        facts["pos_embed_antialias"] = True  # Dinov2WithRegisters resizes with antialias=True
        notes.append("DINOv2 registers: the class token's position folded into cls_token (timm no_embed_class)")
    notes.append(f"Hugging Face layout converted to timm names ({len(out)} tensors)")
    return out, ignored, facts


def config_facts(config: dict[str, Any], where: str) -> tuple[str, dict[str, tuple[Any, str]]]:
    """(family, stored facts) from a ``config.json`` dict; unknown architecture refused.

    Raises:
        CheckpointError: Not a ViT/DINOv2/DeiT architecture, or ``num_attention_heads``
            missing; one line naming ``where``.
    """
    if not isinstance(config, dict):
        raise CheckpointError(f"{where}: not a JSON object")
    archs = config.get("architectures") or []
    model_type = config.get("model_type")
    if model_type not in MODEL_TYPES or (archs and not set(archs) & ARCHITECTURES):
        shown = ", ".join(map(str, archs)) if archs else repr(model_type)
        raise CheckpointError(
            f"{where}: Hugging Face architecture {shown} is not supported "
            f"(supported model types: {', '.join(sorted(MODEL_TYPES))})"
        )
    family = MODEL_TYPES[model_type]
    src = f"{where}"
    heads = config.get("num_attention_heads")
    if not isinstance(heads, int) or isinstance(heads, bool) or heads < 1:
        raise CheckpointError(f"{where}: missing or bad num_attention_heads ({heads!r})")
    facts: dict[str, tuple[Any, str]] = {"num_heads": (heads, f"{src} num_attention_heads")}
    eps = config.get("layer_norm_eps", HF_DEFAULT_EPS[family])
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not eps > 0:
        raise CheckpointError(f"{where}: bad layer_norm_eps ({eps!r})")
    facts["norm_eps"] = (float(eps), f"{src} layer_norm_eps" if "layer_norm_eps" in config else "transformers default")
    if config.get("use_swiglu_ffn"):
        facts["act"] = ("silu", f"{src} use_swiglu_ffn")
    else:
        act = config.get("hidden_act", "gelu")
        if act not in HF_ACT:
            raise CheckpointError(f"{where}: hidden_act {act!r} is not supported (known: {', '.join(HF_ACT)})")
        facts["act"] = (HF_ACT[act], f"{src} hidden_act={act!r}")
    size = config.get("image_size")
    if isinstance(size, int) and not isinstance(size, bool):
        facts["img_size"] = (size, f"{src} image_size")
    elif isinstance(size, (list, tuple)) and len(size) == 2 and all(isinstance(v, int) for v in size):
        facts["img_size"] = (size[0] if size[0] == size[1] else (int(size[0]), int(size[1])), f"{src} image_size")
    return family, facts
