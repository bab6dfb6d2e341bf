"""The layers of :class:`~cka_geo.models.vit.VisionTransformer`, with timm's module names.

Shapes are written as (batch, tokens, width) = (B, T, D).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from cka_geo.errors import DataError

#: Activations by config name: exact GELU (timm, HF ``gelu``), tanh GELU (HF ``gelu_new``,
#: ``gelu_pytorch_tanh``), QuickGELU (OpenAI CLIP weights), SiLU (the gate of SwiGLU).
ACTIVATIONS = ("gelu", "gelu_tanh", "quick_gelu", "silu")
#: MLP types: ``"mlp"`` (fc1 -> act -> fc2) or ``"swiglu"`` (packed fc1 of 2 x hidden).
MLP_TYPES = ("mlp", "swiglu")


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x), the activation of OpenAI's CLIP weights."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


def make_activation(name: str) -> nn.Module:
    """The activation module for a config name in :data:`ACTIVATIONS`."""
    if name == "gelu_tanh":
        return nn.GELU(approximate="tanh")
    if name == "quick_gelu":
        return QuickGELU()
    if name == "silu":
        return nn.SiLU()
    return nn.GELU()


class PatchEmbed(nn.Module):
    """(B, C, H, W) -> (B, H/p * W/p, D) by a strided convolution ``proj``."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    """Multi-head self-attention; the output is after ``proj`` (timm's ``attn`` module).

    With ``qk_norm`` the queries and keys are layer-normed per head (``q_norm``,
    ``k_norm`` over the head dimension) before the dot products, as timm's ``qk_norm``.
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool, qk_norm: bool = False, eps: float = 1e-6) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.q_norm: nn.Module = nn.LayerNorm(self.head_dim, eps=eps) if qk_norm else nn.Identity()
        self.k_norm: nn.Module = nn.LayerNorm(self.head_dim, eps=eps) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        # (B, T, 3D) -> (3, B, heads, T, head_dim)
        qkv = self.qkv(x).reshape(b, t, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(b, t, d))


class LayerScale(nn.Module):
    """Per-channel scale ``gamma`` (timm's ``ls1``/``ls2``)."""

    def __init__(self, dim: int, init_values: float) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init_values)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Mlp(nn.Module):
    """fc1 -> activation (``act``) -> fc2."""

    def __init__(self, dim: int, hidden: int, act: str = "gelu") -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = make_activation(act)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class GatedActivation(nn.Module):
    """(…, 2h) -> act(gate) * value, with gate = the first h channels, value = the last h.

    The order is timm's ``GluMlp(gate_last=False)`` / ``SwiGLUPacked``, DINOv2's ``w12``
    and Hugging Face's ``weights_in``; timm's unpacked ``SwiGLU`` is ``fc1_g`` then ``fc1_x``.
    """

    def __init__(self, act: str) -> None:
        super().__init__()
        self.inner = make_activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, value = x.chunk(2, dim=-1)
        return self.inner(gate) * value


class GluMlp(nn.Module):
    """SwiGLU with a packed ``fc1`` (D -> 2h), ``act`` = act(gate) * value, ``fc2`` (h -> D).

    Canonical sublayers: ``mlp.fc1`` is the packed pre-activation output (gate and value
    branches concatenated, 2h wide), ``mlp.act`` the gated product fc2 sees (h wide).
    """

    def __init__(self, dim: int, hidden: int, act: str = "silu") -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, 2 * hidden)
        self.act = GatedActivation(act)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def resample_pos_embed(
    pos_embed: torch.Tensor,
    new_grid: tuple[int, int],
    num_prefix_tokens: int,
    old_grid: tuple[int, int] | None = None,
    antialias: bool = True,
) -> torch.Tensor:
    """Resample an absolute position embedding to another patch grid.

    Args:
        pos_embed: (1, prefix + rows*cols, D).
        new_grid: (rows, cols) of the new grid.
        num_prefix_tokens: Leading tokens (class token) kept as they are.
        old_grid: (rows, cols) of the stored grid; default: square.
        antialias: Bicubic with antialiasing (timm) or without (Hugging Face, TerraMind).

    Returns:
        (1, prefix + rows*cols, D), bicubic interpolation of the grid part.
    """
    prefix, grid = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    if old_grid is None:
        old = math.isqrt(grid.shape[1])
        if old * old != grid.shape[1]:
            raise DataError(f"pos_embed grid of {grid.shape[1]} tokens is not square")
        old_grid = (old, old)
    if tuple(old_grid) == tuple(new_grid):
        return pos_embed
    d = grid.shape[-1]
    grid = grid.reshape(1, old_grid[0], old_grid[1], d).permute(0, 3, 1, 2)
    if grid.dtype not in (torch.float32, torch.float64):
        grid = grid.float()
    grid = F.interpolate(grid, size=new_grid, mode="bicubic", align_corners=False, antialias=antialias)
    grid = grid.permute(0, 2, 3, 1).reshape(1, new_grid[0] * new_grid[1], d).to(pos_embed.dtype)
    return torch.cat([prefix, grid], dim=1)
