"""CROMA's single-modality encoders (optical ``s2_encoder``, SAR ``s1_encoder``), keys as CROMA's.

CROMA (Fuller et al. 2023; torchgeo ``torchgeo.models.croma``) encodes an image as patch
tokens without a class token and without position embeddings; positions enter through a
2-D ALiBi bias added to every attention score. Module names, which double as checkpoint keys
relative to ``s2_encoder.``:

* ``linear_input``: a Linear over each patch flattened as (band, row, col), patch 8;
* ``transformer.layers.{i}.0``: attention (``input_norm``, ``to_qkv`` without bias,
  ``to_out``), pre-norm, output before the residual add;
* ``transformer.layers.{i}.1``: feed-forward (``input_norm``, ``net.0`` fc1, ``net.1`` GELU,
  ``net.3`` fc2; ``net.2`` is a dropout slot without weights);
* ``transformer.norm_out``: the final LayerNorm (eps 1e-5).

``transformer.layers.{i}`` is the pair [attention, ffn]; here it also runs the pair, so its
output is the block output and the canonical names of cka-geo map onto these paths
(:meth:`CromaEncoder.canonical_sublayers`).

ALiBi bias of head h (of H) between patches at grid cells (r1, c1) and (r2, c2):
``-s_h * sqrt((r1 - r2)² + (c1 - c2)²)`` with ``s_h = a^(h + 1)``, ``a = 2^(-2^-(log2 H - 3))``.
It is computed for the grid of each input, so any image size that is a multiple of the patch
works (torchgeo fixes it to the ``image_size`` the model was built with).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from cka_geo.errors import DataError, UsageError


@dataclass
class CromaConfig:
    """Everything needed to build a :class:`CromaEncoder`.

    Attributes:
        img_size: Native (square) input size in pixels (CROMA was trained on 120).
        patch_size: Square patch size (8 in every released CROMA).
        in_chans: Bands (12 for the optical encoder, 2 for SAR).
        embed_dim: Width D.
        depth: Number of [attention, ffn] layers.
        num_heads: Attention heads; CROMA's encoders always use 16.
        mlp_hidden_dim: Hidden width of the feed-forward network (4 D in CROMA).
        norm_eps: LayerNorm epsilon (PyTorch's default 1e-5, as CROMA).
        final_norm: Whether ``transformer.norm_out`` follows the last layer.
        modality: ``"optical"`` or ``"sar"`` (informational: which encoder this is).
    """

    img_size: int = 120
    patch_size: int = 8
    in_chans: int = 12
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 16
    mlp_hidden_dim: int = 3072
    norm_eps: float = 1e-5
    final_norm: bool = True
    modality: str = "optical"

    def __post_init__(self) -> None:
        for name in ("img_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads",
                     "mlp_hidden_dim"):  # fmt: skip
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UsageError(f"CromaConfig.{name} must be a positive integer, got {value!r}")
        if self.embed_dim % self.num_heads:
            raise UsageError(
                f"CromaConfig: embed_dim {self.embed_dim} is not divisible by num_heads "
                f"{self.num_heads}"
            )
        if self.img_size % self.patch_size:
            raise UsageError(
                f"CromaConfig: img_size {self.img_size} is not a multiple of patch_size "
                f"{self.patch_size}"
            )
        if self.modality not in ("optical", "sar"):
            raise UsageError(f"CromaConfig.modality must be 'optical' or 'sar', got {self.modality!r}")

    @property
    def grid_size(self) -> int:
        """Patches per side at ``img_size``."""
        return self.img_size // self.patch_size

    @property
    def num_prefix_tokens(self) -> int:
        """CROMA has no class token."""
        return 0

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict that :meth:`from_dict` reads back."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CromaConfig:
        """Build from :meth:`to_dict` output; unknown keys are an error naming them."""
        unknown = sorted(set(data) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise UsageError(f"CromaConfig: unknown keys {unknown}")
        return cls(**data)


def alibi_slopes(num_heads: int) -> torch.Tensor:
    """Per-head ALiBi slopes ``a^(h + 1)``, ``a = 2^(-2^-(log2 H - 3))`` (float64, (H,))."""
    start = 2.0 ** (-(2.0 ** -(math.log2(num_heads) - 3)))
    return torch.tensor([start ** (h + 1) for h in range(num_heads)], dtype=torch.float64)


def alibi_bias(num_heads: int, rows: int, cols: int) -> torch.Tensor:
    """2-D ALiBi bias (1, H, rows·cols, rows·cols), float64, patches in row-major order.

    Example:
        >>> b = alibi_bias(16, 2, 2)
        >>> tuple(b.shape), round(float(b[0, 0, 0, 3] / b[0, 0, 0, 1]), 6)  # diagonal: √2
        ((1, 16, 4, 4), 1.414214)
    """
    r, c = torch.meshgrid(
        torch.arange(rows, dtype=torch.float64), torch.arange(cols, dtype=torch.float64), indexing="ij"
    )
    pts = torch.stack([r.reshape(-1), c.reshape(-1)], dim=1)
    dist = (pts[:, None, :] - pts[None, :, :]).pow(2).sum(-1).sqrt()  # between grid cells
    return (-alibi_slopes(num_heads)[:, None, None] * dist).unsqueeze(0)


class CromaAttention(nn.Module):
    """Pre-norm multi-head self-attention with an additive bias; output after ``to_out``."""

    def __init__(self, dim: int, num_heads: int, eps: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.input_norm = nn.LayerNorm(dim, eps=eps)
        self.to_qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.to_out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        # (B, N, 3D) -> three (B, heads, N, head_dim); q, k, v are consecutive thirds of 3D
        q, k, v = (
            t.reshape(b, n, self.num_heads, d // self.num_heads).transpose(1, 2)
            for t in self.to_qkv(self.input_norm(x)).chunk(3, dim=-1)
        )
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)  # scale 1/sqrt(head_dim)
        return self.to_out(out.transpose(1, 2).reshape(b, n, d))


class CromaFFN(nn.Module):
    """Pre-norm feed-forward: ``net`` = fc1 (0), GELU (1), dropout slot (2), fc2 (3)."""

    def __init__(self, dim: int, hidden: int, eps: float) -> None:
        super().__init__()
        self.input_norm = nn.LayerNorm(dim, eps=eps)
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Identity(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.input_norm(x))


class CromaLayer(nn.ModuleList):
    """The pair [attention, ffn] of CROMA, which here also runs the block (its output is the
    residual stream after the pair)."""

    def __init__(self, cfg: CromaConfig) -> None:
        super().__init__(
            [
                CromaAttention(cfg.embed_dim, cfg.num_heads, cfg.norm_eps),
                CromaFFN(cfg.embed_dim, cfg.mlp_hidden_dim, cfg.norm_eps),
            ]
        )

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        x = x + self[0](x, bias)
        return x + self[1](x)


class CromaTransformer(nn.Module):
    """``layers`` (the pairs) and ``norm_out``."""

    def __init__(self, cfg: CromaConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(CromaLayer(cfg) for _ in range(cfg.depth))
        self.norm_out: nn.Module = (
            nn.LayerNorm(cfg.embed_dim, eps=cfg.norm_eps) if cfg.final_norm else nn.Identity()
        )

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x, bias)
        return self.norm_out(x)


class CromaEncoder(nn.Module):
    """A CROMA encoder: ``forward(x)`` equals torchgeo's ``s2_encoder(x, attn_bias)``.

    Args:
        cfg: The architecture.

    Example:
        >>> cfg = CromaConfig(img_size=16, in_chans=12, embed_dim=32, depth=2, num_heads=16,
        ...                   mlp_hidden_dim=64)
        >>> model = CromaEncoder(cfg).eval()
        >>> model(torch.zeros(2, 12, 16, 24)).shape  # any multiple of the patch
        torch.Size([2, 6, 32])
        >>> model.canonical_sublayers()["blocks.1.mlp.fc1"]
        'transformer.layers.1.1.net.0'
    """

    #: Sublayer outputs are (batch, tokens, width).
    batch_first = True
    #: No class token: every token is a patch.
    num_prefix_tokens = 0

    def __init__(self, cfg: CromaConfig) -> None:
        super().__init__()
        self.cfg = cfg
        p = cfg.patch_size
        self.linear_input = nn.Linear(p * p * cfg.in_chans, cfg.embed_dim)
        self.transformer = CromaTransformer(cfg)
        self._bias_cache: dict[tuple[Any, ...], torch.Tensor] = {}

    def canonical_sublayers(self) -> dict[str, str]:
        """Canonical sublayer name -> module path (``transformer.layers.{i}...``)."""
        names: dict[str, str] = {}
        for i in range(len(self.transformer.layers)):
            base = f"transformer.layers.{i}"
            names[f"blocks.{i}.attn"] = f"{base}.0"
            names[f"blocks.{i}.mlp.fc1"] = f"{base}.1.net.0"
            names[f"blocks.{i}.mlp.act"] = f"{base}.1.net.1"
            names[f"blocks.{i}.mlp.fc2"] = f"{base}.1.net.3"
            names[f"blocks.{i}"] = base
        return names

    def attn_bias(self, rows: int, cols: int, like: torch.Tensor) -> torch.Tensor:
        """The ALiBi bias for a rows × cols patch grid, in ``like``'s dtype and device."""
        key = (rows, cols, like.dtype, like.device)
        if key not in self._bias_cache:
            bias = alibi_bias(self.cfg.num_heads, rows, cols)
            self._bias_cache[key] = bias.to(device=like.device, dtype=like.dtype)
        return self._bias_cache[key]

    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, H/p · W/p, C·p·p): patches row-major, each flattened (band, row, col)."""
        if x.ndim != 4:
            raise DataError(f"expected images of shape (batch, bands, H, W), got {tuple(x.shape)}")
        b, c, h, w = x.shape
        p = self.cfg.patch_size
        if c != self.cfg.in_chans:
            raise DataError(f"images have {c} bands but the CROMA encoder expects {self.cfg.in_chans}")
        if h % p or w % p:
            raise DataError(f"image size {h}x{w} is not a multiple of CROMA's patch size {p}")
        x = x.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)
        return x.reshape(b, (h // p) * (w // p), c * p * p)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> encodings (B, patches, D) after ``norm_out``."""
        p = self.cfg.patch_size
        bias = self.attn_bias(x.shape[-2] // p, x.shape[-1] // p, self.linear_input.weight)
        return self.transformer(self.linear_input(self.patchify(x)), bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x)
