"""Features shared by the CKAMetric tests and their distributed worker (imports torch only)."""

from __future__ import annotations

import torch


def features(n: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> tuple[dict, dict]:
    """Layers of A (a0..a2) and B (b0, b1) sharing a signal (a2 is independent noise)."""
    g = torch.Generator().manual_seed(seed)
    f64 = torch.float64
    z = torch.randn(n, 6, generator=g, dtype=f64)
    a = {
        "a0": z @ torch.randn(6, 10, generator=g, dtype=f64),
        "a1": torch.tanh(z[:, :3]) + 0.3 * torch.randn(n, 3, generator=g, dtype=f64),
        "a2": torch.randn(n, 5, generator=g, dtype=f64),
    }
    b = {
        "b0": z[:, :4] ** 3 + 0.5 * torch.randn(n, 4, generator=g, dtype=f64),
        "b1": torch.cat([z, torch.randn(n, 2, generator=g, dtype=f64)], 1),
    }
    return {k: v.to(dtype) for k, v in a.items()}, {k: v.to(dtype) for k, v in b.items()}


def split(feats: dict, sizes: list[int]) -> list[dict]:
    """Consecutive row blocks of every layer."""
    out, start = [], 0
    for s in sizes:
        out.append({k: v[start : start + s] for k, v in feats.items()})
        start += s
    return out
