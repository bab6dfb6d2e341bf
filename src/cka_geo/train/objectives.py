"""Self-supervised pretraining objectives for :class:`~cka_geo.models.vit.VisionTransformer`.

Each objective is an ``nn.Module`` that owns the encoder as ``self.encoder`` (timm keys,
saved on their own as the pretrained checkpoint) and implements
``training_step(batch, generator) -> (loss, logs)``. All randomness (masks, augmentations)
comes from ``generator``, which the loop owns, saves and restores.

- :class:`MAE` (He et al. 2022): mask a random 75 % of the patches, encode the visible
  ones only, reconstruct every patch with a small transformer decoder, and take the mean
  squared error on the masked patches of per-patch normalised pixels (each target patch
  minus its mean, over its standard deviation).
- :class:`SimCLR` (Chen et al. 2020): two augmented views per image (random crop-resize,
  flips, 90° rotations, per-band gain and Gaussian noise), the pooled encoder output through
  a 2-layer projector, and the symmetric InfoNCE (NT-Xent) loss at temperature τ.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from cka_geo.errors import DataError
from cka_geo.models.vit import Block, VisionTransformer, ViTConfig


def _images(batch: Any) -> torch.Tensor:
    return batch[0] if isinstance(batch, (list, tuple)) else batch


def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, (H/p)(W/p), p·p·C), patches in row-major grid order."""
    b, c, h, w = x.shape
    x = x.reshape(b, c, h // p, p, w // p, p)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(x: torch.Tensor, p: int, c: int, h: int, w: int) -> torch.Tensor:
    """Inverse of :func:`patchify`."""
    b = x.shape[0]
    x = x.reshape(b, h // p, w // p, p, p, c).permute(0, 5, 1, 3, 2, 4)
    return x.reshape(b, c, h, w)


class MAE(nn.Module):
    """Masked autoencoder around a ViT encoder.

    Args:
        encoder: The ViT to pretrain.
        mask_ratio: Fraction of patches hidden from the encoder.
        decoder_dim: Width of the decoder.
        decoder_depth: Blocks of the decoder.
        decoder_heads: Heads of the decoder.
        norm_pix_loss: Normalise each target patch by its mean and std.
    """

    def __init__(
        self,
        encoder: VisionTransformer,
        mask_ratio: float = 0.75,
        decoder_dim: int = 64,
        decoder_depth: int = 1,
        decoder_heads: int = 2,
        norm_pix_loss: bool = True,
    ) -> None:
        super().__init__()
        cfg = encoder.cfg
        self.encoder = encoder
        self.mask_ratio = mask_ratio
        self.norm_pix_loss = norm_pix_loss
        n = cfg.grid_size**2
        dcfg = ViTConfig(
            img_size=cfg.img_size, patch_size=cfg.patch_size, in_chans=cfg.in_chans,
            embed_dim=decoder_dim, depth=decoder_depth, num_heads=decoder_heads, norm_eps=cfg.norm_eps,
        )
        self.decoder_embed = nn.Linear(cfg.embed_dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, cfg.num_prefix_tokens + n, decoder_dim))
        self.decoder_blocks = nn.ModuleList(Block(dcfg) for _ in range(decoder_depth))
        self.decoder_norm = nn.LayerNorm(decoder_dim, eps=cfg.norm_eps)
        self.decoder_pred = nn.Linear(decoder_dim, cfg.patch_size**2 * cfg.in_chans)
        nn.init.trunc_normal_(self.decoder_pos_embed, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        for m in [self.decoder_embed, self.decoder_pred, *self.decoder_blocks.modules()]:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def random_mask(self, b: int, n: int, generator: torch.Generator | None, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-sample random masking by argsort of uniform noise.

        Returns:
            ``ids_keep`` (B, n_keep), ``ids_restore`` (B, N), ``mask`` (B, N) with 1 = hidden.
        """
        n_keep = max(1, round(n * (1 - self.mask_ratio)))
        noise = torch.rand(b, n, generator=generator).to(device)
        ids_shuffle = noise.argsort(dim=1)
        ids_restore = ids_shuffle.argsort(dim=1)
        mask = torch.ones(b, n, device=device)
        mask[:, :n_keep] = 0
        mask = torch.gather(mask, 1, ids_restore)
        return ids_shuffle[:, :n_keep], ids_restore, mask

    def forward_encoder(self, x: torch.Tensor, ids_keep: torch.Tensor) -> torch.Tensor:
        """Encode the visible patches: (B, prefix + n_keep, D)."""
        enc = self.encoder
        enc._check_input(x)
        # pos_embed covers the class token too, unless timm's no_embed_class is set
        prefix_pos = 0 if getattr(enc.cfg, "no_embed_class", False) else enc.num_prefix_tokens
        tokens = enc.patch_embed(x) + enc.pos_embed[:, prefix_pos:]
        d = tokens.shape[-1]
        tokens = torch.gather(tokens, 1, ids_keep.unsqueeze(-1).expand(-1, -1, d))
        if enc.cls_token is not None:
            cls = enc.cls_token + enc.pos_embed[:, :1] if prefix_pos else enc.cls_token
            tokens = torch.cat([cls.expand(tokens.shape[0], -1, -1), tokens], dim=1)
        for blk in enc.blocks:
            tokens = blk(tokens)
        return enc.fc_norm(enc.norm(tokens))

    def forward_decoder(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """Predict every patch: (B, N, p·p·C)."""
        prefix = self.encoder.num_prefix_tokens
        x = self.decoder_embed(latent)
        b, n = ids_restore.shape
        visible = x[:, prefix:]
        masks = self.mask_token.expand(b, n - visible.shape[1], -1)
        full = torch.cat([visible, masks], dim=1)
        full = torch.gather(full, 1, ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        x = torch.cat([x[:, :prefix], full], dim=1) + self.decoder_pos_embed
        for blk in self.decoder_blocks:
            x = blk(x)
        return self.decoder_pred(self.decoder_norm(x))[:, prefix:]

    def loss(self, x: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean squared error on the masked patches (normalised pixels if ``norm_pix_loss``)."""
        target = patchify(x, self.encoder.cfg.patch_size)
        if self.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1e-6).sqrt()
        per_patch = ((pred - target) ** 2).mean(dim=-1)
        return (per_patch * mask).sum() / mask.sum()

    def training_step(self, batch: Any, generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict[str, float]]:
        """Loss on one batch of images (labels, if any, are ignored)."""
        x = _images(batch)
        cfg = self.encoder.cfg
        if self.encoder._check_input(x) != (cfg.grid_size, cfg.grid_size):
            raise DataError(f"MAE pretraining needs {cfg.img_size}x{cfg.img_size} images, got {tuple(x.shape[-2:])}")
        n = cfg.grid_size**2
        ids_keep, ids_restore, mask = self.random_mask(x.shape[0], n, generator, x.device)
        pred = self.forward_decoder(self.forward_encoder(x, ids_keep), ids_restore)
        loss = self.loss(x, pred, mask)
        return loss, {"loss": float(loss.detach())}


def augment(x: torch.Tensor, generator: torch.Generator | None, min_scale: float = 0.5, noise: float = 0.05) -> torch.Tensor:
    """One random view per image: crop-resize, flips, 90° rotation, per-band gain, noise.

    Args:
        x: Images (B, C, H, W).
        generator: Source of all randomness.
        min_scale: Smallest crop side as a fraction of the image side.
        noise: Standard deviation of the additive Gaussian noise.
    """
    b, c, h, w = x.shape
    out = []
    r = torch.rand(b, 6, generator=generator)
    for i in range(b):
        s = min_scale + (1 - min_scale) * float(r[i, 0])
        ch, cw = max(1, round(h * s)), max(1, round(w * s))
        top = int(float(r[i, 1]) * (h - ch + 1))
        left = int(float(r[i, 2]) * (w - cw + 1))
        v = x[i : i + 1, :, top : top + ch, left : left + cw]
        if (ch, cw) != (h, w):
            v = F.interpolate(v, size=(h, w), mode="bilinear", align_corners=False)
        if r[i, 3] < 0.5:
            v = v.flip(-1)
        v = torch.rot90(v, int(float(r[i, 4]) * 4) % 4, dims=(-2, -1)) if h == w else v
        out.append(v)
    v = torch.cat(out)
    gain = 1 + 0.1 * torch.randn(b, c, 1, 1, generator=generator)
    eps = noise * torch.randn(v.shape, generator=generator)
    return v * gain.to(v) + eps.to(v)


class SimCLR(nn.Module):
    """Contrastive joint-embedding objective (NT-Xent over two augmented views).

    Args:
        encoder: The ViT to pretrain.
        proj_dim: Output width of the projector.
        hidden_dim: Hidden width of the projector (default: encoder width).
        temperature: τ of the InfoNCE softmax.
    """

    def __init__(self, encoder: VisionTransformer, proj_dim: int = 64, hidden_dim: int | None = None, temperature: float = 0.2) -> None:
        super().__init__()
        d = encoder.cfg.embed_dim
        self.encoder = encoder
        self.temperature = temperature
        hidden = hidden_dim or d
        self.projector = nn.Sequential(nn.Linear(d, hidden), nn.GELU(), nn.Linear(hidden, proj_dim))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Projected, L2-normalised embedding (B, proj_dim)."""
        h = self.encoder.forward_head(self.encoder.forward_features(x), pre_logits=True)
        return F.normalize(self.projector(h), dim=-1)

    def training_step(self, batch: Any, generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict[str, float]]:
        """NT-Xent loss on two views of each image in the batch."""
        x = _images(batch)
        z = self.embed(torch.cat([augment(x, generator), augment(x, generator)]))
        b = x.shape[0]
        sim = z @ z.T / self.temperature
        sim = sim.masked_fill(torch.eye(2 * b, dtype=torch.bool, device=z.device), float("-inf"))
        target = torch.cat([torch.arange(b, 2 * b), torch.arange(0, b)]).to(z.device)
        loss = F.cross_entropy(sim, target)
        acc = float((sim.argmax(dim=1) == target).float().mean())
        return loss, {"loss": float(loss.detach()), "pos_top1": acc}


OBJECTIVES = ("mae", "simclr")


def build_objective(name: str, encoder: VisionTransformer, **kwargs: Any) -> nn.Module:
    """``"mae"`` -> :class:`MAE`, ``"simclr"`` -> :class:`SimCLR` (kwargs passed on)."""
    from cka_geo.errors import UsageError

    if name == "mae":
        return MAE(encoder, **kwargs)
    if name == "simclr":
        return SimCLR(encoder, **kwargs)
    raise UsageError(f"unknown objective {name!r}; choose one of {', '.join(OBJECTIVES)}")


__all__ = ["MAE", "OBJECTIVES", "SimCLR", "augment", "build_objective", "patchify", "unpatchify"]
