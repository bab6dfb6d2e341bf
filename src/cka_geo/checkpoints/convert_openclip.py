"""open_clip visual towers (RemoteCLIP, MS-CLIP, OpenAI CLIP) converted exactly into the timm-named ViT.

Keys are relative to the tower (without ``visual.``). The mapping is the one timm's own
``_convert_openai_clip`` applies: ``conv1`` -> ``patch_embed.proj`` (bias 0),
``class_embedding`` -> ``cls_token``, ``positional_embedding`` -> ``pos_embed``, ``ln_pre`` ->
``norm_pre``, ``transformer.resblocks.{i}`` -> ``blocks.{i}`` with ``ln_1/ln_2`` ->
``norm1/norm2``, ``attn.in_proj_*`` -> ``attn.qkv.*``, ``attn.out_proj`` -> ``attn.proj``,
``mlp.c_fc/c_proj`` -> ``mlp.fc1/fc2``, ``ls_1/ls_2`` -> ``ls1/ls2``, ``ln_post`` -> ``norm``
(timm normalises every token, open_clip the pooled one: the class token is the same).
``proj`` (the projection into the joint embedding) and an attentional pooler
(``attn_pool.*``, ``ln_post`` after it) lie outside the canonical sublayers: kept aside
(ignored, with a note). Heads and the activation (GELU, or QuickGELU for OpenAI's weights)
are not in the weights: read from a stored open_clip config when there is one, else assumed
with a warning. open_clip does not resize positions, so only the native size is exact.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from cka_geo.errors import CheckpointError

_BLOCK = re.compile(r"^transformer\.resblocks\.(\d{1,9})\.(.+)$")
_BLOCK_RENAME = {  # open_clip -> timm, within a block
    "ln_1.": "norm1.", "ln_2.": "norm2.", "ls_1.": "ls1.", "ls_2.": "ls2.",
    "attn.in_proj_weight": "attn.qkv.weight", "attn.in_proj_bias": "attn.qkv.bias",
    "attn.out_proj.": "attn.proj.", "mlp.c_fc.": "mlp.fc1.", "mlp.c_proj.": "mlp.fc2.",
}  # fmt: skip
#: open_clip model-config names (``vision_cfg``) of what the weights do not reveal.
CONFIG_NAMES = {"heads": "num_heads", "quick_gelu": "act", "image_size": "img_size"}


def to_timm(sd: dict[str, torch.Tensor], notes: list[str]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """timm-named tensors from an open_clip visual tower; (tensors, keys kept aside).

    Raises:
        CheckpointError: A tower key with no timm equivalent (named), e.g. a custom
            attention block's ``ln_inner``.
    """
    out: dict[str, torch.Tensor] = {}
    aside: list[str] = []
    for key, value in sd.items():
        m = _BLOCK.match(key)
        if m is not None:
            rest = m[2]
            part = next((p for p in _BLOCK_RENAME if rest.startswith(p)), None)
            if part is None:
                raise CheckpointError(
                    f"open_clip block key {key[:80]!r} has no timm equivalent (custom attention "
                    "or MLP norms are not supported)"
                )
            out[f"blocks.{m[1]}.{_BLOCK_RENAME[part]}{rest[len(part):]}"] = value
        elif key == "conv1.weight":
            out["patch_embed.proj.weight"] = value
        elif key == "class_embedding":
            out["cls_token"] = value.reshape(1, 1, -1)
        elif key == "positional_embedding":
            if value.ndim != 2:
                raise CheckpointError(f"positional_embedding has shape {tuple(value.shape)}, expected 2-D")
            out["pos_embed"] = value.unsqueeze(0)
        elif key.startswith("ln_pre."):
            out["norm_pre." + key[len("ln_pre."):]] = value
        elif key.startswith("ln_post."):
            out["norm." + key[len("ln_post."):]] = value
        elif key == "proj" or key.startswith("attn_pool."):
            aside.append(key)
        else:
            raise CheckpointError(f"open_clip tower key {key[:80]!r} has no timm equivalent")
    if "patch_embed.proj.weight" not in out or "pos_embed" not in out:
        raise CheckpointError("open_clip tower without conv1 or positional_embedding")
    if any(k.startswith("attn_pool.") for k in aside):
        out = {k: v for k, v in out.items() if not k.startswith("norm.")}
        notes.append("open_clip attentional pooler (attn_pool, ln_post) kept aside: outside the compared sublayers")
    if "proj" in aside:
        notes.append("open_clip proj (joint-embedding projection) kept aside: outside the compared sublayers")
    notes.append("open_clip tower converted to timm names (ln_pre -> norm_pre, in_proj -> qkv, ln_post -> norm)")
    return out, aside


def stored_facts(others: dict[str, Any]) -> dict[str, tuple[Any, str]]:
    """Facts from an open_clip model config stored in the file (``vision_cfg``, ``quick_gelu``)."""
    facts: dict[str, tuple[Any, str]] = {}
    for key, value in others.items():
        last = key.split(".")[-1]
        if last == "quick_gelu" and isinstance(value, bool):
            facts["act"] = ("quick_gelu" if value else "gelu", key)
        elif last in ("heads", "width_heads") and isinstance(value, int) and not isinstance(value, bool):
            facts.setdefault("num_heads", (value, key))
    return facts
