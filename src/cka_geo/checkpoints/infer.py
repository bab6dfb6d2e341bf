"""Inferring the architecture from a timm-named encoder state dict (keys relative to the encoder).

What the weights tell: depth, width, bands, patch size, image size (from the position
embedding), MLP hidden width and type (plain or packed SwiGLU), qkv bias, q/k norm, layer
scale, class / distillation / register tokens, pre-norm, final norm vs fc_norm. What they do
not (heads, LayerNorm epsilon, activation, a rectangular image size) comes from
:class:`~cka_geo.checkpoints.known.Hparams`: given > stored > known family > assumed with a
warning. Every fact is written to ``notes``.
"""

from __future__ import annotations

import math
import re

import torch

from cka_geo.checkpoints.known import Hparams
from cka_geo.checkpoints.limits import (
    MAX_BANDS,
    MAX_BLOCKS,
    MAX_HIDDEN,
    MAX_IMG_SIZE,
    MAX_PATCH_SIZE,
    MAX_WIDTH,
    bounded,
    check_config,
)
from cka_geo.errors import CheckpointError
from cka_geo.models.vit import ViTConfig

DEFAULT_IMG_SIZE = 224


def block_indices(sd: dict[str, torch.Tensor], pattern: str) -> list[int]:
    """Sorted block indices; refuse gaps (pruned blocks) and more than MAX_BLOCKS blocks.

    ``pattern`` captures the index as group 1; indices of more than nine digits do not
    match it, so their keys are refused later as unknown.
    """
    rx = re.compile(pattern)
    indices = sorted({int(m[1]) for k in sd if (m := rx.match(k))})
    if indices and indices[-1] >= MAX_BLOCKS:
        raise CheckpointError(
            f"block index {indices[-1]} in the keys: more than {MAX_BLOCKS} blocks is refused"
        )
    missing = sorted(set(range(indices[-1] + 1)) - set(indices)) if indices else []
    if missing:
        raise CheckpointError(
            f"blocks are not contiguous (found {indices}, missing {missing}): checkpoints with "
            "pruned blocks are not supported"
        )
    return indices


def _grid(tokens: int, what: str) -> int:
    g = math.isqrt(max(tokens, 0))
    if tokens < 1 or g * g != tokens:
        raise CheckpointError(
            f"{what} has {tokens} patch positions, not a square grid "
            "(multi-frame or non-square checkpoints are not supported)"
        )
    return g


def _image_size(grid: int, patch: int, what: str) -> int:
    """grid × patch, refused above MAX_IMG_SIZE, naming the key that implies it."""
    img = grid * patch
    if img > MAX_IMG_SIZE:
        raise CheckpointError(
            f"{what} implies a {grid}×{grid} patch grid of {patch} px, a {img} px image: "
            f"more than {MAX_IMG_SIZE} px is refused"
        )
    return img


def _patch_embedding(w: torch.Tensor, key: str) -> tuple[int, int, int]:
    """(width, bands, patch) of a 4-D square patch embedding, each within its limit."""
    if w.ndim != 4 or w.shape[-1] != w.shape[-2]:
        raise CheckpointError(f"{key} has unexpected shape {tuple(w.shape)}")
    width = bounded(w.shape[0], 1, MAX_WIDTH, f"the width ({key} dim 0)")
    bands = bounded(w.shape[1], 1, MAX_BANDS, f"the band count ({key} dim 1)")
    patch = bounded(w.shape[-1], 1, MAX_PATCH_SIZE, f"the patch size ({key} dims 2-3)")
    return width, bands, patch


def _matrix(sd: dict[str, torch.Tensor], key: str, rows: str) -> int:
    """Rows of a 2-D weight, within MAX_HIDDEN."""
    w = sd[key]
    if w.ndim != 2:
        raise CheckpointError(f"{key} has unexpected shape {tuple(w.shape)} (expected 2-D)")
    return bounded(w.shape[0], 1, MAX_HIDDEN, f"{rows} ({key} dim 0)")


def _fill_zero_biases(sd: dict[str, torch.Tensor], weights: list[str], notes: list[str]) -> None:
    added = []
    for w in weights:
        b = w[: -len("weight")] + "bias"
        if w in sd and b not in sd:
            sd[b] = torch.zeros(sd[w].shape[0], dtype=sd[w].dtype)
            added.append(b)
    if added:
        notes.append(
            f"added zero biases where the checkpoint has none: {', '.join(added[:4])}"
            + (" …" if len(added) > 4 else "")
        )


def adapt_variants(sd: dict[str, torch.Tensor], notes: list[str]) -> None:
    """Rename exact equivalents in place: EVA/BEiT ``attn.q_bias``/``v_bias`` -> ``attn.qkv.bias``
    (k bias 0), timm's unpacked SwiGLU ``fc1_g``/``fc1_x`` and DINOv2's ``w12``/``w3`` ->
    packed ``fc1``/``fc2``, EVA's ``gamma_1``/``gamma_2`` -> ``ls1``/``ls2``."""
    done: set[str] = set()
    for key in list(sd):
        m = re.match(r"^(blocks\.\d{1,9})\.(.+)$", key)
        if m is None or key not in sd:
            continue
        blk, rest = m[1], m[2]
        if rest == "attn.q_bias" and f"{blk}.attn.v_bias" in sd:
            q, v = sd.pop(key), sd.pop(f"{blk}.attn.v_bias")
            sd[f"{blk}.attn.qkv.bias"] = torch.cat([q, torch.zeros_like(q), v])
            done.add("q_bias/v_bias -> qkv.bias (k bias 0)")
        elif rest.startswith("mlp.fc1_g.") and f"{blk}.mlp.fc1_x.{rest[10:]}" in sd:
            g, x = sd.pop(key), sd.pop(f"{blk}.mlp.fc1_x.{rest[10:]}")
            sd[f"{blk}.mlp.fc1.{rest[10:]}"] = torch.cat([g, x])
            done.add("SwiGLU fc1_g/fc1_x -> packed fc1 (gate first)")
        elif rest.startswith(("mlp.w12.", "mlp.w3.")):
            new = rest.replace("mlp.w12.", "mlp.fc1.").replace("mlp.w3.", "mlp.fc2.")
            sd[f"{blk}.{new}"] = sd.pop(key)
            done.add("DINOv2 w12/w3 -> fc1/fc2")
        elif rest in ("gamma_1", "gamma_2"):
            sd[f"{blk}.ls{rest[-1]}.gamma"] = sd.pop(key)
            done.add("gamma_1/gamma_2 -> ls1/ls2")
    if done:
        notes.append("renamed exact equivalents: " + "; ".join(sorted(done)))


def _pos_grid(
    tokens: int, prefix: int, patch: int, hp: Hparams, what: str
) -> tuple[int | tuple[int, int], bool]:
    """(image size, no_embed_class) from the token count of ``pos_embed``.

    A stored or given image size decides (rectangular grids need one); else
    ``tokens - prefix`` a square grid (positions cover the prefix tokens), else ``tokens``
    a square grid (timm ``no_embed_class``), which is an assumption when a prefix token
    exists: a rectangle of ``tokens - prefix`` cells would fit too.
    """
    given = hp.given.get("img_size")
    for size, where in ((given, "given"), (hp.stored.get("img_size", (None, ""))[0], "stored")):
        if size is None:
            continue
        hw = (size, size) if isinstance(size, int) else tuple(size)
        cells = (hw[0] // patch) * (hw[1] // patch) if len(hw) == 2 and not (hw[0] % patch or hw[1] % patch) else -1
        if cells > 0 and tokens in (cells + prefix, cells):
            _image_size(max(hw) // patch, patch, what)
            hp.pick("img_size", None, "")
            return (size if isinstance(size, int) else (int(hw[0]), int(hw[1]))), tokens == cells and prefix > 0
        if where == "given":
            raise CheckpointError(
                f"img_size {size} as given does not fit {what}: {tokens} positions, "
                f"neither the patches of a {hw[0]}x{hw[1]} px image nor them plus {prefix} prefix token(s)"
            )
        hp.notes.append(f"img_size {size} stored in {hp.stored['img_size'][1]} does not fit {what}: ignored")
    g = math.isqrt(max(tokens - prefix, 0))
    if tokens > prefix and g * g == tokens - prefix:
        return _image_size(g, patch, what), False
    if prefix:
        img = _image_size(_grid(tokens, "pos_embed"), patch, what)
        hp.pick(
            "img_size", img,
            f"{what}: {tokens} positions read as a {img // patch}x{img // patch} grid without the "
            f"prefix token (timm no_embed_class), not {tokens - prefix} cells of a rectangle",
        )
        return img, True
    return _image_size(_grid(tokens, "pos_embed"), patch, what), False


def infer_timm(sd: dict[str, torch.Tensor], hp: Hparams, layout: dict[str, object] | None = None) -> ViTConfig:
    """ViTConfig of a timm-named encoder; adapts ``sd`` in place where that is exact.

    Exact adaptations: a Conv3d patch embedding with kernel depth 1 is squeezed to 2-D; a
    patch embedding or LayerNorm without bias gets a zero bias; a missing ``pos_embed``
    becomes zeros (image size 224, or 14 patches when 224 is not a multiple of the patch);
    the renames of :func:`adapt_variants`. Shapes that imply sizes beyond
    :mod:`cka_geo.checkpoints.limits` are refused first.

    Args:
        sd: timm-named encoder tensors.
        hp: What is given, stored and known (notes and assumptions are added to it).
        layout: Config fields a converter fixed (``pos_embed_antialias``, ``no_embed_class``…).
    """
    notes = hp.notes
    layout = dict(layout or {})
    if "patch_embed.proj.weight" not in sd:
        if any(k.startswith("patch_embed.weight_generator.") for k in sd):
            raise CheckpointError(
                "DOFA's wavelength-conditioned patch embedding (patch_embed.weight_generator) "
                "is not supported"
            )
        raise CheckpointError("no patch embedding (patch_embed.proj.weight) beside the blocks")
    adapt_variants(sd, notes)
    w = sd["patch_embed.proj.weight"]
    if w.ndim == 5:
        if w.shape[2] != 1:
            raise CheckpointError(
                f"patch_embed.proj.weight {tuple(w.shape)} is a 3-D (tubelet {w.shape[2]}) "
                "embedding: multi-frame checkpoints are not supported"
            )
        sd["patch_embed.proj.weight"] = w = w[:, :, 0]
        notes.append("squeezed the Conv3d patch embedding (tubelet 1) to 2-D")
    width, bands, patch = _patch_embedding(w, "patch_embed.proj.weight")
    _fill_zero_biases(sd, ["patch_embed.proj.weight"], notes)
    depth = len(block_indices(sd, r"^blocks\.(\d{1,9})\."))
    class_token = "cls_token" in sd
    dist_token = "dist_token" in sd
    reg = sd.get("reg_token")
    if reg is not None and (reg.ndim != 3 or reg.shape[0] != 1 or reg.shape[2] != width):
        raise CheckpointError(f"reg_token has shape {tuple(reg.shape)}, expected (1, registers, {width})")
    reg_tokens = bounded(reg.shape[1], 1, 1024, "the register count (reg_token dim 1)") if reg is not None else 0
    prefix = int(class_token) + int(dist_token) + reg_tokens
    no_embed_class = bool(layout.pop("no_embed_class", False))
    missing_pos = "pos_embed" not in sd
    if not missing_pos:
        pos = sd["pos_embed"]
        if pos.ndim != 3 or pos.shape[0] != 1 or pos.shape[1] < 1:
            raise CheckpointError(
                f"pos_embed has shape {tuple(pos.shape)}, expected (1, tokens, width)"
            )
        what = f"pos_embed {tuple(pos.shape)}"
        img, guessed = _pos_grid(pos.shape[1], 0 if no_embed_class else prefix, patch, hp, what)
        no_embed_class = no_embed_class or guessed
        if guessed:
            notes.append("pos_embed covers the patch tokens only (timm no_embed_class)")
    else:
        img = DEFAULT_IMG_SIZE if DEFAULT_IMG_SIZE % patch == 0 else 14 * patch
        sd["pos_embed"] = torch.zeros(1, prefix + (img // patch) ** 2, width)
        notes.append(
            f"no pos_embed: zeros used, image size {img} assumed (any size works: dynamic_img_size)"
        )
    if "blocks.0.mlp.fc1.weight" not in sd or "blocks.0.mlp.fc2.weight" not in sd:
        raise CheckpointError("no blocks.0.mlp.fc1.weight / fc2.weight: the first block is missing")
    fc1 = _matrix(sd, "blocks.0.mlp.fc1.weight", "the MLP width")
    fc2_in = sd["blocks.0.mlp.fc2.weight"].shape[-1]
    swiglu = layout.pop("mlp_type", None) == "swiglu" or (fc1 == 2 * fc2_in and fc1 != 0)
    hidden = fc2_in if swiglu else fc1
    if swiglu:
        notes.append(f"SwiGLU MLP: packed fc1 of 2 x {hidden} (gate, value), fc2 from {hidden}")
    has_norm, has_fc_norm = "norm.weight" in sd, "fc_norm.weight" in sd
    norms = [k for k in sd if k.endswith(("norm1.weight", "norm2.weight"))] + [
        k for k in ("norm.weight", "fc_norm.weight", "norm_pre.weight") if k in sd
    ]
    linears = [
        f"blocks.{i}.{name}.weight"
        for i in range(depth)
        for name in ("attn.proj", "mlp.fc1", "mlp.fc2")
    ]
    _fill_zero_biases(sd, norms + linears, notes)
    if not (has_norm or has_fc_norm):
        notes.append("no final norm (norm / fc_norm) in the checkpoint: built without one")
    heads = hp.pick("num_heads", width // 64 if width % 64 == 0 else 1, f"width {width} / 64", width=width)
    if not isinstance(heads, int) or isinstance(heads, bool) or heads < 1 or width % heads:
        raise CheckpointError(f"num_heads {heads!r} does not divide the width {width}")
    eps = hp.pick("norm_eps", 1e-6, "timm default")
    act = hp.pick("act", "silu" if swiglu else "gelu", "SwiGLU gate" if swiglu else "GELU", fact="act_glu" if swiglu else None)
    try:
        config = ViTConfig(
            img_size=img,
            patch_size=patch,
            in_chans=bands,
            embed_dim=width,
            depth=depth,
            num_heads=heads,
            mlp_ratio=4.0,
            mlp_hidden_dim=None if hidden == 4 * width else hidden,
            qkv_bias="blocks.0.attn.qkv.bias" in sd,
            class_token=class_token,
            layer_scale=1.0 if "blocks.0.ls1.gamma" in sd else None,
            final_norm=has_norm or has_fc_norm,
            global_pool="avg" if has_fc_norm or not class_token else "token",
            fc_norm=has_fc_norm,
            norm_eps=float(eps),
            dynamic_img_size=missing_pos or bool(layout.pop("dynamic_img_size", False)),
            no_embed_class=no_embed_class,
            reg_tokens=reg_tokens,
            dist_token=dist_token,
            qk_norm="blocks.0.attn.q_norm.weight" in sd,
            mlp_type="swiglu" if swiglu else "mlp",
            act=act,
            pre_norm="norm_pre.weight" in sd,
            **layout,  # type: ignore[arg-type]
        )
    except (ValueError, TypeError) as exc:
        raise CheckpointError(f"inferred an impossible ViT: {exc}") from exc
    check_config(config, "inferred config")
    return config
