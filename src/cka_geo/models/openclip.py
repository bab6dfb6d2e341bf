"""An open_clip visual tower (RemoteCLIP, MS-CLIP) with open_clip's module names.

The names are open_clip's ``VisionTransformer`` attributes without the ``visual.`` prefix
(``conv1``, ``class_embedding``, ``positional_embedding``, ``ln_pre``,
``transformer.resblocks.{i}.ln_1 / attn / ls_1 / ln_2 / mlp.c_fc / mlp.gelu / mlp.c_proj /
ls_2``, ``ln_post``, ``proj``), so a tower's state dict loads with ``load_state_dict`` as
it is. The blocks run sequence-first, (tokens, batch, width), like older open_clip releases;
``attn`` is an ``nn.MultiheadAttention`` whose output is a tuple. Capture must handle both,
and reads :attr:`OpenClipVisionTransformer.batch_first` to know.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from cka_geo.errors import DataError, UsageError


@dataclass
class OpenClipVisionConfig:
    """Everything needed to build an :class:`OpenClipVisionTransformer`.

    Attributes:
        image_size: Square input size in pixels.
        patch_size: Square patch size (``conv1`` kernel and stride).
        in_chans: Input bands.
        width: Token width D.
        layers: Number of residual attention blocks.
        heads: Attention heads.
        mlp_hidden_dim: Width of ``mlp.c_fc``'s output.
        output_dim: Columns of ``proj``; 0 when the tower has no projection.
        act: ``"gelu"`` (open_clip default) or ``"quick_gelu"`` (OpenAI CLIP weights).
        layer_scale: Whether blocks carry ``ls_1``/``ls_2`` (open_clip ``ls_init_value``).
        norm_eps: LayerNorm epsilon (open_clip uses torch's default, 1e-5).
    """

    image_size: int = 224
    patch_size: int = 32
    in_chans: int = 3
    width: int = 768
    layers: int = 12
    heads: int = 12
    mlp_hidden_dim: int = 3072
    output_dim: int = 512
    act: str = "gelu"
    layer_scale: bool = False
    norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        for name in ("image_size", "patch_size", "in_chans", "width", "layers", "heads"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise UsageError(
                    f"OpenClipVisionConfig.{name} must be a positive integer, got {value!r}"
                )
        if self.width % self.heads:
            raise UsageError(
                f"OpenClipVisionConfig: width {self.width} is not divisible by heads {self.heads}"
            )
        if self.image_size % self.patch_size:
            raise UsageError(
                f"OpenClipVisionConfig: image_size {self.image_size} is not a multiple of "
                f"patch_size {self.patch_size}"
            )
        if self.act not in ("gelu", "quick_gelu"):
            raise UsageError(
                f"OpenClipVisionConfig.act must be 'gelu' or 'quick_gelu', got {self.act!r}"
            )

    @property
    def grid_size(self) -> int:
        """Patches per side at ``image_size``."""
        return self.image_size // self.patch_size

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict that :meth:`from_dict` reads back."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> OpenClipVisionConfig:
        """Build from :meth:`to_dict` output; unknown keys are an error naming them."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise UsageError(f"OpenClipVisionConfig: unknown keys {unknown}")
        return cls(**data)


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x), the activation of OpenAI's CLIP weights."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class LayerScale(nn.Module):
    """Per-channel scale ``gamma`` (open_clip's ``ls_1``/``ls_2``)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class ResidualAttentionBlock(nn.Module):
    """x + ls_1(attn(ln_1(x))), then x + ls_2(mlp(ln_2(x))); x is (T, B, D)."""

    def __init__(self, cfg: OpenClipVisionConfig) -> None:
        super().__init__()
        d = cfg.width
        self.ln_1 = nn.LayerNorm(d, eps=cfg.norm_eps)
        self.attn = nn.MultiheadAttention(d, cfg.heads)
        self.ls_1: nn.Module = LayerScale(d) if cfg.layer_scale else nn.Identity()
        self.ln_2 = nn.LayerNorm(d, eps=cfg.norm_eps)
        act: nn.Module = QuickGELU() if cfg.act == "quick_gelu" else nn.GELU()
        self.mlp = nn.Sequential(
            OrderedDict(
                c_fc=nn.Linear(d, cfg.mlp_hidden_dim),
                gelu=act,
                c_proj=nn.Linear(cfg.mlp_hidden_dim, d),
            )
        )
        self.ls_2: nn.Module = LayerScale(d) if cfg.layer_scale else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.ln_1(x)
        x = x + self.ls_1(self.attn(y, y, y, need_weights=False)[0])
        return x + self.ls_2(self.mlp(self.ln_2(x)))


class Transformer(nn.Module):
    """Holds ``resblocks`` (open_clip's name)."""

    def __init__(self, cfg: OpenClipVisionConfig) -> None:
        super().__init__()
        self.resblocks = nn.ModuleList(ResidualAttentionBlock(cfg) for _ in range(cfg.layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for blk in self.resblocks:
            x = blk(x)
        return x


class OpenClipVisionTransformer(nn.Module):
    """open_clip's visual tower; ``forward`` returns the projected class-token embedding.

    Args:
        cfg: The architecture.

    Example:
        >>> cfg = OpenClipVisionConfig(image_size=32, patch_size=8, in_chans=6, width=64,
        ...     layers=2, heads=2, mlp_hidden_dim=128, output_dim=16)
        >>> OpenClipVisionTransformer(cfg).eval()(torch.zeros(2, 6, 32, 32)).shape
        torch.Size([2, 16])
    """

    #: Blocks see (tokens, batch, width).
    batch_first = False
    num_prefix_tokens = 1

    def __init__(self, cfg: OpenClipVisionConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.width
        self.conv1 = nn.Conv2d(cfg.in_chans, d, cfg.patch_size, stride=cfg.patch_size, bias=False)
        scale = d**-0.5
        self.class_embedding = nn.Parameter(scale * torch.randn(d))
        self.positional_embedding = nn.Parameter(scale * torch.randn(cfg.grid_size**2 + 1, d))
        self.ln_pre = nn.LayerNorm(d, eps=cfg.norm_eps)
        self.transformer = Transformer(cfg)
        self.ln_post = nn.LayerNorm(d, eps=cfg.norm_eps)
        self.proj = nn.Parameter(scale * torch.randn(d, cfg.output_dim)) if cfg.output_dim else None

    def canonical_sublayers(self) -> dict[str, str]:
        """Canonical sublayer name -> module path (``blocks.{i}.mlp.fc1`` -> ``…mlp.c_fc``)."""
        names: dict[str, str] = {}
        for i in range(len(self.transformer.resblocks)):
            base = f"transformer.resblocks.{i}"
            names[f"blocks.{i}.attn"] = f"{base}.attn"
            names[f"blocks.{i}.mlp.fc1"] = f"{base}.mlp.c_fc"
            names[f"blocks.{i}.mlp.act"] = f"{base}.mlp.gelu"
            names[f"blocks.{i}.mlp.fc2"] = f"{base}.mlp.c_proj"
            names[f"blocks.{i}"] = base
        return names

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> ln_pre(class token + patches + positions), (B, T, D)."""
        if x.ndim != 4 or x.shape[1] != self.cfg.in_chans:
            raise DataError(
                f"expected images (batch, {self.cfg.in_chans}, H, W), got {tuple(x.shape)}"
            )
        if tuple(x.shape[-2:]) != (self.cfg.image_size, self.cfg.image_size):
            raise DataError(
                f"image size {x.shape[-2]}x{x.shape[-1]} differs from the model's "
                f"{self.cfg.image_size}x{self.cfg.image_size}"
            )
        x = self.conv1(x).flatten(2).transpose(1, 2)
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)
        return self.ln_pre(x)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> tokens after the last block, (B, T, D) (before ``ln_post``)."""
        x = self.embed(x).transpose(0, 1)  # (T, B, D): sequence-first
        return self.transformer(x).transpose(0, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = self.ln_post(self.forward_features(x)[:, 0])
        return pooled @ self.proj if self.proj is not None else pooled
