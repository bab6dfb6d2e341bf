"""DOFA: the timm-named ViT with DOFA's wavelength-conditioned (dynamic) patch embedding.

DOFA (Xiong et al. 2024; torchgeo ``torchgeo.models.dofa``) is a timm ViT (class token,
``pos_embed``, ``blocks.{i}`` as timm's) whose patch projection is not stored but generated
from the wavelengths of the input bands. ``patch_embed`` holds the generator, with DOFA's
names (checkpoint keys):

* ``fclayer`` (``w1``, ``w2``): a residual MLP, ``e + relu(w2(relu(w1(e))))``, applied to the
  sine/cosine encoding ``e`` (width 128) of each wavelength in nanometres;
* ``weight_generator``: ``transformer_encoder.layers.{j}`` (post-norm PyTorch
  ``TransformerEncoderLayer``: ``self_attn``, ``linear1``, ``linear2``, ``norm1``, ``norm2``;
  4 heads, GELU), ``weight_tokens`` (128 learned tokens), ``bias_token``, ``fc_weight`` and
  ``fc_bias``. The sequence [weight tokens, one token per band, bias token] goes through the
  encoder; ``fc_weight(out_band + token_band)`` gives band's p × p × D kernel, ``fc_bias`` of
  the last output the bias; both are scaled by 0.01.

The patch convolution then runs with stride p and padding 1, as DOFA's does. Everything after
the patch embedding is :class:`~cka_geo.models.vit.VisionTransformer`, so module names and
canonical sublayers are the ViT's. The wavelengths are part of the config
(:class:`DofaConfig`), so ``model(x)`` needs no extra argument.

The sine/cosine encoding is formed in float32, as DOFA forms it, whatever the model's dtype:
its arguments reach a few thousand radians, where float32 and float64 differ by ~1e-4.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from cka_geo.errors import UsageError
from cka_geo.models.vit import VisionTransformer, ViTConfig

#: Central wavelengths (µm) of the Sentinel-2 MSI bands, the values TerraTorch's DOFA
#: backbones map Sentinel-2 band names to (``terratorch.models.backbones.dofa_vit``).
S2_WAVELENGTHS: dict[str, float] = {
    "B1": 0.44, "B2": 0.49, "B3": 0.56, "B4": 0.665, "B5": 0.705, "B6": 0.74, "B7": 0.783,
    "B8": 0.832, "B8A": 0.864, "B9": 0.945, "B10": 1.373, "B11": 1.61, "B12": 2.20,
}  # fmt: skip


def _s2_l1c() -> list[float]:
    return list(S2_WAVELENGTHS.values())


@dataclass
class DofaConfig(ViTConfig):
    """A :class:`~cka_geo.models.vit.ViTConfig` plus DOFA's patch-embedding generator.

    Attributes:
        wavelengths: Central wavelength of each input band in µm (``in_chans`` of them);
            default the 13 Sentinel-2 L1C bands B1..B12 with B8A.
        dynamic_embed_dim: Width of the wavelength encoding and of the generator (128).
        generator_heads: Heads of the generator's transformer layers (4).
        generator_layers: Transformer layers in the generator (1).
        generator_hidden: Hidden width of their feed-forward networks (2048).
        weight_tokens: Learned weight tokens (128).
        generator_eps: LayerNorm epsilon in the generator (1e-5).
        scaler: Factor applied to the generated weights and bias (0.01).
    """

    in_chans: int = 13
    wavelengths: list[float] = field(default_factory=_s2_l1c)
    dynamic_embed_dim: int = 128
    generator_heads: int = 4
    generator_layers: int = 1
    generator_hidden: int = 2048
    weight_tokens: int = 128
    generator_eps: float = 1e-5
    scaler: float = 0.01

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.wavelengths, (list, tuple)) or len(self.wavelengths) != self.in_chans:
            raise UsageError(
                f"DofaConfig: {self.in_chans} bands need {self.in_chans} wavelengths, got "
                f"{self.wavelengths!r}"[:200]
            )
        for w in self.wavelengths:
            if isinstance(w, bool) or not isinstance(w, (int, float)) or not 0 < w < 1e6:
                raise UsageError(f"DofaConfig: wavelength {w!r} is not a positive number of µm")
        self.wavelengths = [float(w) for w in self.wavelengths]
        for name in ("dynamic_embed_dim", "generator_heads", "generator_layers",
                     "generator_hidden", "weight_tokens"):  # fmt: skip
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UsageError(f"DofaConfig.{name} must be a positive integer, got {value!r}")
        if self.dynamic_embed_dim % 2 or self.dynamic_embed_dim % self.generator_heads:
            raise UsageError(
                f"DofaConfig: dynamic_embed_dim {self.dynamic_embed_dim} must be even and "
                f"divisible by generator_heads {self.generator_heads}"
            )
        if self.patch_size < 3:
            raise UsageError(
                f"DofaConfig: patch_size {self.patch_size} < 3 (DOFA's padded patch "
                "convolution would change the grid)"
            )


def wavelength_encoding(wavelengths: list[float], dim: int, device: torch.device) -> torch.Tensor:
    """DOFA's sine/cosine encoding of wavelengths (µm -> nm), float32, (bands, dim).

    ``[sin(λ ω_k), cos(λ ω_k)]`` with λ in nm and ``ω_k = 10000^(-k / (dim/2))``,
    k = 0 .. dim/2 - 1, every step in float32.
    """
    lam = torch.tensor(wavelengths, dtype=torch.float32, device=device) * 1000
    omega = torch.arange(dim // 2, dtype=torch.float32, device=device) / (dim / 2.0)
    arg = lam[:, None] * (1.0 / 10000**omega)[None, :]
    return torch.cat([torch.sin(arg), torch.cos(arg)], dim=1)


class FCResLayer(nn.Module):
    """``x + relu(w2(relu(w1(x))))``."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, dim)
        self.w2 = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + F.relu(self.w2(F.relu(self.w1(x))))


class GeneratorLayer(nn.Module):
    """A post-norm transformer encoder layer with PyTorch's names, on (tokens, dim)."""

    def __init__(self, dim: int, heads: int, hidden: int, eps: float) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(dim, heads)
        self.linear1 = nn.Linear(dim, hidden)
        self.linear2 = nn.Linear(hidden, dim)
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.norm2 = nn.LayerNorm(dim, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm1(x + self.self_attn(x, x, x, need_weights=False)[0])
        return self.norm2(x + self.linear2(F.gelu(self.linear1(x))))


class _Encoder(nn.Module):
    def __init__(self, cfg: DofaConfig) -> None:
        super().__init__()
        d = cfg.dynamic_embed_dim
        self.layers = nn.ModuleList(
            GeneratorLayer(d, cfg.generator_heads, cfg.generator_hidden, cfg.generator_eps)
            for _ in range(cfg.generator_layers)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class WeightGenerator(nn.Module):
    """Band tokens -> (per-band kernels (bands, p·p·D), bias (D,)), before the 0.01 scale."""

    def __init__(self, cfg: DofaConfig) -> None:
        super().__init__()
        d = cfg.dynamic_embed_dim
        self.transformer_encoder = _Encoder(cfg)
        self.fc_weight = nn.Linear(d, cfg.patch_size**2 * cfg.embed_dim)
        self.fc_bias = nn.Linear(d, cfg.embed_dim)
        self.weight_tokens = nn.Parameter(torch.randn(cfg.weight_tokens, d) * 0.02)
        self.bias_token = nn.Parameter(torch.randn(1, d) * 0.02)

    def forward(self, bands: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n = self.weight_tokens.shape[0]
        out = self.transformer_encoder(torch.cat([self.weight_tokens, bands, self.bias_token]))
        return self.fc_weight(out[n:-1] + bands), self.fc_bias(out[-1])


class DynamicPatchEmbed(nn.Module):
    """(B, C, H, W) -> (B, H/p · W/p, D) with weights generated from ``cfg.wavelengths``."""

    def __init__(self, cfg: DofaConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.patch_size = cfg.patch_size
        self.weight_generator = WeightGenerator(cfg)
        self.fclayer = FCResLayer(cfg.dynamic_embed_dim)

    def generate(self, wavelengths: list[float] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The patch convolution's weight (D, C, p, p) and bias (D,) for ``wavelengths``."""
        cfg = self.cfg
        wl = cfg.wavelengths if wavelengths is None else wavelengths
        w = self.fclayer.w1.weight
        enc = wavelength_encoding(list(wl), cfg.dynamic_embed_dim, w.device).to(w.dtype)
        kernels, bias = self.weight_generator(self.fclayer(enc))
        p, d = cfg.patch_size, cfg.embed_dim
        weight = kernels.reshape(len(wl), p, p, d).permute(3, 0, 1, 2) * cfg.scaler
        return weight, bias * cfg.scaler

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.generate()
        out = F.conv2d(x, weight, bias, stride=self.patch_size, padding=1)
        return out.flatten(2).transpose(1, 2)


class DofaVisionTransformer(VisionTransformer):
    """The timm-named ViT with :class:`DynamicPatchEmbed` as ``patch_embed``.

    Args:
        cfg: The architecture and the input's wavelengths.

    Example:
        >>> cfg = DofaConfig(img_size=32, patch_size=8, in_chans=3, wavelengths=[0.665, 0.56, 0.49],
        ...                  embed_dim=32, depth=2, num_heads=2, dynamic_embed_dim=16,
        ...                  generator_hidden=32, weight_tokens=8)
        >>> model = DofaVisionTransformer(cfg).eval()
        >>> model.forward_features(torch.zeros(2, 3, 32, 32)).shape
        torch.Size([2, 17, 32])
        >>> model.canonical_sublayers()["blocks.1.mlp.fc1"]
        'blocks.1.mlp.fc1'
    """

    def __init__(self, cfg: DofaConfig) -> None:
        super().__init__(cfg)
        self.patch_embed = DynamicPatchEmbed(cfg)
        for m in self.patch_embed.modules():
            if isinstance(m, nn.Linear) and not m.weight.is_meta:  # DOFA's init: Xavier uniform, bias 0.01
                nn.init.xavier_uniform_(m.weight)
                nn.init.constant_(m.bias, 0.01)
