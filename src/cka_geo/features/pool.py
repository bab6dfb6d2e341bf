"""Token pooling: a sublayer output (B, T, D) -> rows of features."""

from __future__ import annotations

from typing import Any

import torch

from cka_geo.errors import FeatureError, UsageError
from cka_geo.sublayers import (
    POOLINGS,
    did_you_mean,
)


def _as_tokens(out: Any, name: str, batch_first: bool) -> torch.Tensor:
    """Normalise a sublayer output to a detached (B, T, D) tensor."""
    if isinstance(out, (tuple, list)):
        if not out:
            raise FeatureError(f"sublayer {name!r} returned an empty {type(out).__name__}")
        out = out[0]
    if not isinstance(out, torch.Tensor):
        raise FeatureError(f"sublayer {name!r} returned {type(out).__name__}, not a tensor")
    if out.ndim != 3:
        raise FeatureError(
            f"sublayer {name!r} output has shape {tuple(out.shape)}; expected (batch, tokens, width)"
        )
    out = out.detach()
    return out if batch_first else out.transpose(0, 1)


def pooled_shape(shape: tuple[int, ...], pooling: str, num_prefix_tokens: int) -> tuple[int, int]:
    """The (rows, features) :func:`pool_tokens` gives for (B, T, D) tokens of ``shape``."""
    b, t, d = shape
    if pooling == "flatten":
        return b, t * d
    if pooling == "tokens":
        return b * max(0, t - num_prefix_tokens), d
    return b, d


def pool_tokens(x: torch.Tensor, pooling: str, num_prefix_tokens: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """Pool (B, T, D) tokens to examples × features, float32, contiguous, same device.

    Args:
        x: Tokens (B, T, D), prefix tokens first.
        pooling: ``mean``, ``cls``, ``flatten`` or ``tokens`` (see the module docstring).
        num_prefix_tokens: Leading non-patch tokens P.
        out: A contiguous float32 tensor of :func:`pooled_shape` on ``x``'s device to
            write into (a slice of a per-width buffer), else a new one.

    Returns:
        (B, D), (B, D), (B, T·D) or (B·(T−P), D); for ``tokens`` row ``b·(T−P) + t`` is
        patch token ``t`` of sample ``b``.

    Example:
        >>> x = torch.arange(12.0).reshape(1, 3, 4)
        >>> pool_tokens(x, "mean", 1)
        tensor([[6., 7., 8., 9.]])
        >>> pool_tokens(x, "tokens", 1).shape
        torch.Size([2, 4])
    """
    b, t, d = x.shape
    if pooling == "flatten":
        flat = x.reshape(b, t * d)
        return flat.to(torch.float32).contiguous() if out is None else out.copy_(flat)
    if pooling == "cls":
        if num_prefix_tokens < 1:
            raise UsageError("pooling 'cls' needs a class token; the model has no prefix tokens")
        return x[:, 0].to(torch.float32).contiguous() if out is None else out.copy_(x[:, 0])
    if t <= num_prefix_tokens:
        raise FeatureError(
            f"{t} tokens with {num_prefix_tokens} prefix tokens leave no patch tokens to pool"
        )
    patches = x[:, num_prefix_tokens:]
    if pooling == "mean":
        if out is None:
            return patches.mean(dim=1, dtype=torch.float32).contiguous()
        return torch.mean(patches, dim=1, dtype=torch.float32, out=out)
    if pooling == "tokens":
        if out is None:
            return patches.reshape(b * (t - num_prefix_tokens), d).to(torch.float32).contiguous()
        out.view(b, t - num_prefix_tokens, d).copy_(patches)
        return out
    raise UsageError(f"unknown pooling {pooling!r} (choose from {', '.join(POOLINGS)}){did_you_mean(pooling, POOLINGS)}")
