"""A Vision Transformer whose module names are timm's, for any band count.

The names double as checkpoint keys (``patch_embed.proj``, ``cls_token``, ``pos_embed``,
``blocks.{i}.norm1``, ``blocks.{i}.attn.qkv``, ``blocks.{i}.attn.proj``, ``blocks.{i}.ls1``,
``blocks.{i}.norm2``, ``blocks.{i}.mlp.fc1``, ``blocks.{i}.mlp.act``, ``blocks.{i}.mlp.fc2``,
``blocks.{i}.ls2``, ``norm``, ``fc_norm``, ``head``), so a timm / torchgeo state dict loads
with ``load_state_dict`` as it is, and the canonical sublayer names of cka-geo are module paths.

Shapes are written as (batch, tokens, width) = (B, T, D); T = prefix tokens + grid cells.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from cka_geo.errors import DataError, UsageError
from cka_geo.models.vit_layers import (
    ACTIVATIONS,
    MLP_TYPES,
    Attention,
    GluMlp,
    LayerScale,
    Mlp,
    PatchEmbed,
    resample_pos_embed,
)
from cka_geo.sublayers import normalize_block

__all__ = ["ViTConfig", "VisionTransformer", "resample_pos_embed"]


@dataclass
class ViTConfig:
    """Everything needed to build a :class:`VisionTransformer`; stored in every checkpoint
    the project writes, so that nothing is guessed when it is read back.

    Attributes:
        img_size: Square input size in pixels.
        patch_size: Square patch size in pixels.
        in_chans: Number of input bands.
        embed_dim: Width D.
        depth: Number of blocks.
        num_heads: Attention heads (timm convention: D / 64 for the standard sizes).
        mlp_ratio: Hidden width of the MLP as a multiple of D (ignored when
            ``mlp_hidden_dim`` is set).
        mlp_hidden_dim: Exact hidden width of the MLP, if not ``int(D * mlp_ratio)``.
        qkv_bias: Whether ``attn.qkv`` has a bias.
        class_token: Whether a class token is prepended (then ``pos_embed`` covers it).
        layer_scale: Initial value of the LayerScale ``gamma`` (``ls1``/``ls2``), or None
            for no layer scale (``nn.Identity``).
        final_norm: Whether ``norm`` follows the last block.
        global_pool: ``"token"`` (class token) or ``"avg"`` (mean of patch tokens, then
            ``fc_norm``) for :meth:`VisionTransformer.forward_head`.
        num_classes: Width of ``head``; 0 for none.
        norm_eps: LayerNorm epsilon (timm ViTs use 1e-6).
        dynamic_img_size: Resample ``pos_embed`` on the fly for other input sizes instead
            of refusing them.
        fc_norm: timm's ``fc_norm`` switch: True puts the final LayerNorm after pooling
            (``fc_norm``), False before it (``norm``); None (default) means
            ``global_pool == "avg"``.
        no_embed_class: timm's ``no_embed_class``: ``pos_embed`` covers the patch tokens
            only and the class token is prepended after the positions are added.
        reg_tokens: Register tokens (timm ``reg_token``, DINOv2 with registers), placed
            after the class (and distillation) token.
        dist_token: A DeiT distillation token (``dist_token``) after the class token.
        qk_norm: LayerNorm of queries and keys per head (``attn.q_norm``, ``attn.k_norm``).
        mlp_type: ``"mlp"`` (fc1 -> act -> fc2) or ``"swiglu"`` (packed ``fc1`` of
            2 x ``hidden_dim``, ``act`` = act(gate) * value, see
            :class:`~cka_geo.models.vit_layers.GluMlp`).
        act: ``"gelu"`` (exact), ``"gelu_tanh"``, ``"quick_gelu"`` or ``"silu"`` (for
            ``mlp_type="swiglu"``: the gate's activation).
        pre_norm: A LayerNorm ``norm_pre`` after the position embedding, before the blocks
            (CLIP's ``ln_pre``).
        pos_embed_antialias: Resample ``pos_embed`` for other sizes with antialiasing
            (timm) or without (Hugging Face ViT / DINOv2, TerraMind).

    ``img_size`` may be ``(height, width)`` for a rectangular patch grid.
    """

    img_size: int | tuple[int, int] = 224
    patch_size: int = 16
    in_chans: int = 3
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    mlp_hidden_dim: int | None = None
    qkv_bias: bool = True
    class_token: bool = True
    layer_scale: float | None = None
    final_norm: bool = True
    global_pool: str = "token"
    num_classes: int = 0
    norm_eps: float = 1e-6
    dynamic_img_size: bool = False
    fc_norm: bool | None = None
    no_embed_class: bool = False
    extra: dict[str, Any] = field(default_factory=dict)
    reg_tokens: int = 0
    dist_token: bool = False
    qk_norm: bool = False
    mlp_type: str = "mlp"
    act: str = "gelu"
    pre_norm: bool = False
    pos_embed_antialias: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.img_size, (list, tuple)):
            hw = tuple(self.img_size)
            if len(hw) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in hw):
                raise UsageError(f"ViTConfig.img_size must be an integer or (height, width), got {self.img_size!r}")
            self.img_size = hw[0] if hw[0] == hw[1] else (hw[0], hw[1])
        for name in ("img_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads"):
            value = getattr(self, name)
            if name == "img_size" and isinstance(value, tuple):
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise UsageError(f"ViTConfig.{name} must be a positive integer, got {value!r}")
        if not isinstance(self.reg_tokens, int) or isinstance(self.reg_tokens, bool) or self.reg_tokens < 0:
            raise UsageError(f"ViTConfig.reg_tokens must be a non-negative integer, got {self.reg_tokens!r}")
        if self.mlp_type not in MLP_TYPES:
            raise UsageError(f"ViTConfig.mlp_type must be one of {MLP_TYPES}, got {self.mlp_type!r}")
        if self.act not in ACTIVATIONS:
            raise UsageError(f"ViTConfig.act must be one of {ACTIVATIONS}, got {self.act!r}")
        if self.dist_token and not self.class_token:
            raise UsageError("ViTConfig: a distillation token needs a class token")
        if self.embed_dim % self.num_heads:
            raise UsageError(
                f"ViTConfig: embed_dim {self.embed_dim} is not divisible by num_heads "
                f"{self.num_heads}"
            )
        if any(side % self.patch_size for side in self.img_hw):
            raise UsageError(
                f"ViTConfig: img_size {self.img_size} is not a multiple of patch_size "
                f"{self.patch_size}"
            )
        if self.global_pool not in ("token", "avg"):
            raise UsageError(f"ViTConfig.global_pool must be 'token' or 'avg', got {self.global_pool!r}")
        if self.global_pool == "token" and not self.class_token:
            self.global_pool = "avg"

    @property
    def use_fc_norm(self) -> bool:
        """Whether the final LayerNorm is ``fc_norm`` (after pooling) rather than ``norm``."""
        return self.global_pool == "avg" if self.fc_norm is None else self.fc_norm

    @property
    def num_pos_tokens(self) -> int:
        """Length of ``pos_embed`` at ``img_size``."""
        prefix = 0 if self.no_embed_class else self.num_prefix_tokens
        gh, gw = self.grid_hw
        return prefix + gh * gw

    @property
    def hidden_dim(self) -> int:
        """Hidden width of the MLP (fc1 output)."""
        return self.mlp_hidden_dim or int(self.embed_dim * self.mlp_ratio)

    @property
    def img_hw(self) -> tuple[int, int]:
        """(height, width) in pixels."""
        return (self.img_size, self.img_size) if isinstance(self.img_size, int) else self.img_size

    @property
    def grid_hw(self) -> tuple[int, int]:
        """(rows, cols) of the patch grid at ``img_size``."""
        h, w = self.img_hw
        return h // self.patch_size, w // self.patch_size

    @property
    def grid_size(self) -> int:
        """Patches per side at a square ``img_size`` (see :attr:`grid_hw` for rectangles)."""
        gh, gw = self.grid_hw
        if gh != gw:
            raise UsageError(f"ViTConfig: the patch grid {gh}x{gw} is not square (use grid_hw)")
        return gh

    @property
    def num_prefix_tokens(self) -> int:
        """Tokens before the patch tokens: class token, distillation token, registers."""
        return int(self.class_token) + int(self.dist_token) + self.reg_tokens

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict that :meth:`from_dict` reads back."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ViTConfig:
        """Build from :meth:`to_dict` output; unknown keys are an error naming them."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise UsageError(f"ViTConfig: unknown keys {unknown}")
        return cls(**data)


class Block(nn.Module):
    """Pre-norm transformer block: x + ls1(attn(norm1(x))), then x + ls2(mlp(norm2(x)))."""

    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        d = cfg.embed_dim
        self.norm1 = nn.LayerNorm(d, eps=cfg.norm_eps)
        self.attn = Attention(d, cfg.num_heads, cfg.qkv_bias, cfg.qk_norm, cfg.norm_eps)
        self.ls1: nn.Module = LayerScale(d, cfg.layer_scale) if cfg.layer_scale is not None else nn.Identity()
        self.norm2 = nn.LayerNorm(d, eps=cfg.norm_eps)
        self.mlp: nn.Module = (
            GluMlp(d, cfg.hidden_dim, cfg.act) if cfg.mlp_type == "swiglu" else Mlp(d, cfg.hidden_dim, cfg.act)
        )
        self.ls2: nn.Module = LayerScale(d, cfg.layer_scale) if cfg.layer_scale is not None else nn.Identity()

    #: Stochastic depth: the probability of dropping each residual branch per sample, in
    #: train mode only (0: off, the default; set by :func:`cka_geo.train.recipe.set_drop_path`).
    drop_path_rate: float = 0.0

    def _drop_path(self, y: torch.Tensor) -> torch.Tensor:
        if not self.training or self.drop_path_rate <= 0:
            return y
        keep = 1.0 - self.drop_path_rate
        mask = y.new_empty((y.shape[0],) + (1,) * (y.ndim - 1)).bernoulli_(keep)
        return y * mask / keep

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self._drop_path(self.ls1(self.attn(self.norm1(x))))
        return x + self._drop_path(self.ls2(self.mlp(self.norm2(x))))


class VisionTransformer(nn.Module):
    """timm-compatible ViT. ``forward(x)`` equals timm's for the same weights and config.

    Args:
        cfg: The architecture.

    Example:
        >>> cfg = ViTConfig(img_size=32, patch_size=8, in_chans=13, embed_dim=64, depth=2, num_heads=1)
        >>> model = VisionTransformer(cfg).eval()
        >>> model.forward_features(torch.zeros(2, 13, 32, 32)).shape
        torch.Size([2, 17, 64])
    """

    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.embed_dim
        self.patch_embed: nn.Module = PatchEmbed(cfg.patch_size, cfg.in_chans, d)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d)) if cfg.class_token else None
        self.dist_token = nn.Parameter(torch.zeros(1, 1, d)) if cfg.dist_token else None
        self.reg_token = nn.Parameter(torch.zeros(1, cfg.reg_tokens, d)) if cfg.reg_tokens else None
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.num_pos_tokens, d))
        self.norm_pre: nn.Module = nn.LayerNorm(d, eps=cfg.norm_eps) if cfg.pre_norm else nn.Identity()
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        use_fc = cfg.use_fc_norm
        self.norm: nn.Module = nn.LayerNorm(d, eps=cfg.norm_eps) if cfg.final_norm and not use_fc else nn.Identity()
        self.fc_norm: nn.Module = nn.LayerNorm(d, eps=cfg.norm_eps) if cfg.final_norm and use_fc else nn.Identity()
        self.head: nn.Module = nn.Linear(d, cfg.num_classes) if cfg.num_classes > 0 else nn.Identity()
        self.init_weights()

    #: Blocks see (batch, tokens, width); capture relies on it (open_clip towers differ).
    batch_first = True

    @property
    def num_prefix_tokens(self) -> int:
        """Tokens before the patch tokens (class, distillation and register tokens)."""
        return self.cfg.num_prefix_tokens

    def canonical_sublayers(self) -> dict[str, str]:
        """Canonical sublayer name -> module path in this model, block by block.

        For this timm-named ViT the two coincide. Other families (open_clip) implement the
        same method with their own paths; sublayer capture relies on it.
        """
        names: dict[str, str] = {}
        for i in range(len(self.blocks)):
            for sub in ("attn", "mlp.fc1", "mlp.act", "mlp.fc2"):
                names[f"blocks.{i}.{sub}"] = f"blocks.{i}.{sub}"
            names[f"blocks.{i}"] = f"blocks.{i}"
        return names

    def init_weights(self) -> None:
        """timm-style init: truncated normal (std 0.02) for linears and embeddings.

        Nothing to do on the ``meta`` device (no values), where torch's random fills would
        import ``torch._dynamo`` (seconds, once per process) for tensors that get none.
        """
        if self.pos_embed.is_meta:
            return
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        for token in (self.cls_token, self.dist_token, self.reg_token):
            if token is not None:
                nn.init.normal_(token, std=1e-6)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def _check_input(self, x: torch.Tensor) -> tuple[int, int]:
        if x.ndim != 4:
            raise DataError(f"expected images of shape (batch, bands, H, W), got {tuple(x.shape)}")
        c, h, w = x.shape[1:]
        if c != self.cfg.in_chans:
            raise DataError(f"images have {c} bands but the model expects {self.cfg.in_chans}")
        p = self.cfg.patch_size
        if h % p or w % p:
            raise DataError(f"image size {h}x{w} is not a multiple of the patch size {p}")
        mh, mw = self.cfg.img_hw
        if (h, w) != (mh, mw) and not self.cfg.dynamic_img_size:
            raise DataError(
                f"image size {h}x{w} differs from the model's {mh}x{mw}"
                " (resize the data, or set dynamic_img_size)"
            )
        return h // p, w // p

    def _prefix(self, batch: int) -> list[torch.Tensor]:
        tokens = [t for t in (self.cls_token, self.dist_token, self.reg_token) if t is not None]
        return [t.expand(batch, -1, -1) for t in tokens]

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Patch-embed, prepend the prefix tokens, add positions, ``norm_pre``: (B, C, H, W) -> (B, T, D).

        As timm: with ``no_embed_class`` the positions are added to the patch tokens and
        the prefix tokens (class, distillation, registers) prepended after; otherwise the
        prefix tokens are prepended first and ``pos_embed`` covers them too.
        """
        grid = self._check_input(x)
        tokens = self.patch_embed(x)
        prefix = self._prefix(tokens.shape[0])
        cfg = self.cfg
        skip = 0 if cfg.no_embed_class else self.num_prefix_tokens
        pos = resample_pos_embed(self.pos_embed, grid, skip, cfg.grid_hw, cfg.pos_embed_antialias)
        if cfg.no_embed_class:
            tokens = torch.cat([*prefix, tokens + pos], dim=1)
        else:
            tokens = torch.cat([*prefix, tokens], dim=1) + pos
        return self.norm_pre(tokens)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> normed tokens (B, T, D)."""
        x = self.embed(x)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Pool the tokens (class token, or mean of patch tokens then ``fc_norm``), then ``head``."""
        x = x[:, self.num_prefix_tokens :].mean(dim=1) if self.cfg.global_pool == "avg" else x[:, 0]
        x = self.fc_norm(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(
        self, x: torch.Tensor, indices: list[int] | tuple[int, ...], norm: bool = False
    ) -> list[torch.Tensor]:
        """Outputs of the blocks in ``indices`` as feature maps (B, D, H/p, W/p).

        Args:
            x: Images (B, C, H, W).
            indices: Block indices (negative counts from the end), in the order wanted.
            norm: Apply the final ``norm`` to each output first.

        Returns:
            One map per index, prefix tokens dropped. Only the blocks up to the deepest
            index are run.
        """
        depth = len(self.blocks)
        wanted = []
        for i in indices:
            wanted.append(normalize_block(i, depth, "block index"))
        gh, gw = x.shape[-2] // self.cfg.patch_size, x.shape[-1] // self.cfg.patch_size
        x = self.embed(x)
        outs: dict[int, torch.Tensor] = {}
        for j, blk in enumerate(self.blocks[: max(wanted) + 1]):
            x = blk(x)
            if j in wanted:
                y = self.norm(x) if norm else x
                y = y[:, self.num_prefix_tokens :]
                outs[j] = y.transpose(1, 2).reshape(y.shape[0], -1, gh, gw)
        return [outs[j] for j in wanted]
