"""From a chosen encoder candidate to timm-named tensors and what is known of its hyperparameters.

Every family the loader reads ends as the one timm-named ViT
(:class:`~cka_geo.models.vit.VisionTransformer`): timm layouts as they are (with the exact
renames of :func:`~cka_geo.checkpoints.infer.adapt_variants`), open_clip towers
(:mod:`~cka_geo.checkpoints.convert_openclip`), Hugging Face ViT / DINOv2
(:mod:`~cka_geo.checkpoints.convert_hf`) and TerraMind
(:mod:`~cka_geo.checkpoints.terramind`). Hyperparameters the weights do not reveal are
gathered into a :class:`~cka_geo.checkpoints.known.Hparams`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from cka_geo.checkpoints import convert_hf, convert_openclip, resolve, terramind
from cka_geo.checkpoints.known import STORED_NAMES, Hparams
from cka_geo.errors import CheckpointError

#: Encoder keys per family (relative to the prefix); anything else is ignored.
KEEP: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "timm": (
        ("patch_embed.", "blocks.", "norm.", "fc_norm.", "norm_pre.", "attn_pool."),
        ("cls_token", "pos_embed", "reg_token", "dist_token"),
    ),
    "open_clip": (
        ("conv1.", "ln_pre.", "transformer.", "ln_post.", "attn_pool."),
        ("class_embedding", "positional_embedding", "proj"),
    ),
    "terramind": (("encoder.", "encoder_norm.", "encoder_embeddings."), ()),
    "hf": (("embeddings.", "encoder.layer.", "layers.", "layernorm."), ()),
}
#: Weight files of a Hugging Face ``save_pretrained`` folder, in order of preference.
HF_WEIGHTS = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json")


def hf_folder(path: Path) -> tuple[list[Path], Path | None]:
    """(weight files, config.json or None) for a path: a folder, or a file with a config beside it.

    Raises:
        CheckpointError: A folder with neither a weight file nor shards.
    """
    if not path.is_dir():
        config = path.parent / "config.json"
        return [path], (config if config.is_file() else None)
    config = path / "config.json"
    for name in HF_WEIGHTS:
        f = path / name
        if f.is_file():
            if name.endswith(".index.json"):
                try:
                    index = json.loads(f.read_text())
                    shards = sorted(set(index["weight_map"].values()))
                except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
                    raise CheckpointError(f"{f}: not a readable shard index ({exc})") from None
                files = [path / str(s) for s in shards]
                if not all(s.is_file() and s.parent == path for s in files):
                    raise CheckpointError(f"{f}: a shard it names is missing or outside the folder")
                return files, (config if config.is_file() else None)
            return [f], (config if config.is_file() else None)
    raise CheckpointError(
        f"{path}: is a directory without {', '.join(HF_WEIGHTS)} "
        "(pass the checkpoint file inside, or a Hugging Face save_pretrained folder)"
    )


def read_config_json(path: Path) -> dict[str, Any]:
    """A Hugging Face ``config.json`` as a dict; one line naming it when unreadable."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: not readable JSON ({exc})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: not a JSON object")
    return data


def _is_act(v: Any) -> bool:
    return isinstance(v, str) and v in convert_hf.HF_ACT


def stored_hparams(others: dict[str, Any]) -> dict[str, tuple[Any, str]]:
    """Facts stored in non-tensor entries (Lightning ``hyper_parameters``, TerraTorch
    ``model_args``, timm ``pretrained_cfg``), each unique value with where it was found."""
    accept = {
        "num_heads": None,
        "norm_eps": lambda v: isinstance(v, float) and 0 < v < 1,
        "act": _is_act,
        "img_size": lambda v: (isinstance(v, int) and not isinstance(v, bool) and v > 0)
        or (isinstance(v, (list, tuple)) and len(v) == 2 and all(isinstance(x, int) and x > 0 for x in v)),
    }
    out: dict[str, tuple[Any, str]] = {}
    for name, names in STORED_NAMES.items():
        hit = resolve.find_hparam(others, names, accept[name])
        if hit is not None:
            value, where = hit
            if name == "act":
                value = convert_hf.HF_ACT[value]
            if name == "img_size" and isinstance(value, tuple):
                value = value[0] if value[0] == value[1] else (int(value[0]), int(value[1]))
            out[name] = (value, where)
    return out


def _named_family(others: dict[str, Any], prefix: str) -> str | None:
    """A family named by a stored backbone / model name, or by the encoder's prefix."""
    names = [prefix.lower()]
    for key in ("backbone", "model_name", "arch", "architecture", "name"):
        hit = resolve.find_hparam(others, (key,), lambda v: isinstance(v, str))
        if hit is not None:
            names.append(str(hit[0]).lower())
    for word, family in (("prithvi", "prithvi"), ("terramind", "terramind"), ("dinov2", "dinov2")):
        if any(word in n for n in names):
            return family
    return None


def to_timm(
    family: str,
    sd: dict[str, torch.Tensor],
    others: dict[str, Any],
    prefix: str,
    hp: Hparams,
    config_json: Path | None,
) -> tuple[dict[str, torch.Tensor], list[str], dict[str, Any]]:
    """(timm-named tensors, keys set aside (relative), layout facts) for a candidate's family.

    Fills ``hp.family`` and ``hp.stored``. Stored facts: the file's own entries, then (for a
    Hugging Face encoder) ``config.json``, which wins.
    """
    hp.stored.update(stored_hparams(others))
    layout: dict[str, Any] = {}
    aside: list[str] = []
    if family == "open_clip":
        hp.family = "open_clip"
        hp.stored.update(convert_openclip.stored_facts(others))
        out, aside = convert_openclip.to_timm(sd, hp.notes)
        return out, aside, layout
    if family == "terramind":
        hp.family = "terramind"
        out, modality = terramind.to_timm(sd, hp.notes)
        aside = [k for k in sd if k.startswith("encoder_embeddings.") and not k.startswith(f"encoder_embeddings.{modality}.")]
        layout["pos_embed_antialias"] = False
        return out, aside, layout
    if family == "hf":
        out, aside, layout = convert_hf.to_timm(sd, hp.notes)
        hp.family = convert_hf.family_of_keys(sd)
        if config_json is not None:
            cfg_family, facts = convert_hf.config_facts(read_config_json(config_json), str(config_json))
            hp.family = cfg_family
            hp.stored.update(facts)
        else:
            hp.notes.append("Hugging Face weights without config.json: hyperparameters from known facts")
            hp.stored.setdefault("norm_eps", (convert_hf.HF_DEFAULT_EPS[hp.family], "transformers default"))
        return out, aside, layout
    out = dict(sd)
    if out.get("patch_embed.proj.weight") is not None and out["patch_embed.proj.weight"].ndim == 5:
        hp.family = "prithvi"  # Prithvi's Conv3d patch embedding
    hp.family = _named_family(others, prefix) or hp.family
    for key in [k for k in out if k.startswith("attn_pool.")]:
        aside.append(key)
        del out[key]
    if aside:
        hp.notes.append("attention-pooling head (attn_pool, SigLIP) kept aside: outside the compared sublayers")
    return out, aside, layout


def legacy_open_clip(sd: dict[str, torch.Tensor], config: Any, notes: list[str]) -> tuple[dict[str, torch.Tensor], Any]:
    """A file cka-geo wrote for its former open_clip model class, as the timm-named ViT (exact)."""
    from cka_geo.models.vit import ViTConfig

    out, _ = convert_openclip.to_timm({k: v for k, v in sd.items() if k != "proj"}, notes)
    w = out["patch_embed.proj.weight"]
    out["patch_embed.proj.bias"] = torch.zeros(w.shape[0], dtype=w.dtype)
    vit = ViTConfig(
        img_size=config.image_size, patch_size=config.patch_size, in_chans=config.in_chans,
        embed_dim=config.width, depth=config.layers, num_heads=config.heads,
        mlp_hidden_dim=config.mlp_hidden_dim, qkv_bias=True, class_token=True,
        layer_scale=1.0 if config.layer_scale else None, norm_eps=config.norm_eps,
        act=config.act, pre_norm=True,
    )
    notes.append("an open_clip tower written by cka-geo: converted to the timm-named ViT")
    return out, vit
