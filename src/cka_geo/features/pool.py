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


def pool_tokens(x: torch.Tensor, pooling: str, num_prefix_tokens: int) -> torch.Tensor:
    """Pool (B, T, D) tokens to examples × features, float32, contiguous, same device.

    Args:
        x: Tokens (B, T, D), prefix tokens first.
        pooling: ``mean``, ``cls``, ``flatten`` or ``tokens`` (see the module docstring).
        num_prefix_tokens: Leading non-patch tokens P.

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
        return x.reshape(b, t * d).to(torch.float32).contiguous()
    if pooling == "cls":
        if num_prefix_tokens < 1:
            raise UsageError("pooling 'cls' needs a class token; the model has no prefix tokens")
        return x[:, 0].to(torch.float32).contiguous()
    if t <= num_prefix_tokens:
        raise FeatureError(
            f"{t} tokens with {num_prefix_tokens} prefix tokens leave no patch tokens to pool"
        )
    patches = x[:, num_prefix_tokens:]
    if pooling == "mean":
        return patches.mean(dim=1, dtype=torch.float32).contiguous()
    if pooling == "tokens":
        return patches.reshape(b * (t - num_prefix_tokens), d).to(torch.float32).contiguous()
    raise UsageError(f"unknown pooling {pooling!r} (choose from {', '.join(POOLINGS)}){did_you_mean(pooling, POOLINGS)}")
