"""A float64 ViT forward written from the formulas, for tests of foreign checkpoint layouts.

Independent of cka_geo's model code: patches by reshaping (no convolution), LayerNorm from
mean and variance, attention from an explicit softmax, activations from their definitions.
The weights come as a plain "generic" dict (one per block: q, k, v, o, fc1, fc2 …) that each
test builds straight from its foreign layout.
"""

from __future__ import annotations

import math

import torch


def layer_norm(x, w, b, eps):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * w + b


def act_fn(name, x):
    if name == "gelu":
        return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))
    if name == "gelu_tanh":
        return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))
    if name == "quick_gelu":
        return x / (1 + torch.exp(-1.702 * x))
    if name == "silu":
        return x / (1 + torch.exp(-x))
    raise ValueError(name)


def patches(img, p):
    """(B, C, H, W) -> (B, (H/p)(W/p), C*p*p), row-major over the grid, (C, py, px) inside."""
    b, c, h, w = img.shape
    x = img.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // p) * (w // p), c * p * p)


def forward(g: dict, img: torch.Tensor) -> dict[str, torch.Tensor]:
    """Canonical sublayer outputs (B, T, ·) of the generic ViT ``g`` on ``img`` (float64).

    ``g`` keys: ``patch_w`` (D, C, p, p), ``patch_b``, ``prefix`` (list of (1, n, D) tokens
    in order), ``pos`` (1, N, D), ``pos_covers_prefix`` (bool), ``pre_norm`` ((w, b) or
    None), ``eps``, ``act``, ``heads``, ``glu`` (bool), ``qk_norm`` ((w, b) pairs per block
    or None), ``blocks``: list of dicts with ``n1``, ``n2`` ((w, b)), ``q``, ``k``, ``v``,
    ``o``, ``fc1``, ``fc2`` ((w, b)), ``ls1``/``ls2`` (vectors or None), ``qn``/``kn``.
    """
    d = g["patch_w"].shape[0]
    p = g["patch_w"].shape[-1]
    x = patches(img, p) @ g["patch_w"].reshape(d, -1).T + g["patch_b"]
    bsz = img.shape[0]
    prefix = [t.expand(bsz, -1, -1) for t in g["prefix"]]
    if g["pos_covers_prefix"]:
        x = torch.cat([*prefix, x], 1) + g["pos"]
    else:
        x = torch.cat([*prefix, x + g["pos"]], 1)
    if g.get("pre_norm") is not None:
        x = layer_norm(x, *g["pre_norm"], g["eps"])
    out = {}
    h = g["heads"]
    for i, blk in enumerate(g["blocks"]):
        y = layer_norm(x, *blk["n1"], g["eps"])
        t = y.shape[1]
        q, k, v = (y @ blk[n][0].T + blk[n][1] for n in ("q", "k", "v"))
        q, k, v = (z.reshape(bsz, t, h, d // h).transpose(1, 2) for z in (q, k, v))
        if blk.get("qn") is not None:
            q = layer_norm(q, *blk["qn"], g["eps"])
            k = layer_norm(k, *blk["kn"], g["eps"])
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // h), -1) @ v
        a = att.transpose(1, 2).reshape(bsz, t, d) @ blk["o"][0].T + blk["o"][1]
        out[f"blocks.{i}.attn"] = a
        x = x + (a * blk["ls1"] if blk.get("ls1") is not None else a)
        y = layer_norm(x, *blk["n2"], g["eps"])
        f1 = y @ blk["fc1"][0].T + blk["fc1"][1]
        out[f"blocks.{i}.mlp.fc1"] = f1
        if g["glu"]:
            gate, val = f1.chunk(2, -1)
            ac = act_fn(g["act"], gate) * val
        else:
            ac = act_fn(g["act"], f1)
        out[f"blocks.{i}.mlp.act"] = ac
        f2 = ac @ blk["fc2"][0].T + blk["fc2"][1]
        out[f"blocks.{i}.mlp.fc2"] = f2
        x = x + (f2 * blk["ls2"] if blk.get("ls2") is not None else f2)
        out[f"blocks.{i}"] = x
    return out


def random_generic(
    *, d=32, depth=2, heads=4, bands=3, p=8, grid=(4, 4), hidden=64, n_prefix=(1,), glu=False,
    ls=False, qk_norm=False, pre_norm=False, covers=True, eps=1e-6, act="gelu", seed=0,
) -> dict:
    """Random generic weights (float64) with the given architecture."""
    gen = torch.Generator().manual_seed(seed)

    def r(*shape, s=0.3):
        return torch.randn(*shape, generator=gen, dtype=torch.float64) * s

    def lin(o, i):
        return (r(o, i, s=1 / math.sqrt(i)), r(o, s=0.1))

    def ln(n):
        return (1 + r(n, s=0.1), r(n, s=0.1))

    cells = grid[0] * grid[1]
    g = {
        "patch_w": r(d, bands, p, p, s=0.1), "patch_b": r(d, s=0.1),
        "prefix": [r(1, n, d) for n in n_prefix],
        "pos": r(1, cells + (sum(n_prefix) if covers else 0), d, s=0.1),
        "pos_covers_prefix": covers, "pre_norm": ln(d) if pre_norm else None,
        "eps": eps, "act": act, "heads": heads, "glu": glu, "blocks": [],
    }
    for _ in range(depth):
        g["blocks"].append({
            "n1": ln(d), "n2": ln(d), "q": lin(d, d), "k": lin(d, d), "v": lin(d, d), "o": lin(d, d),
            "fc1": lin(2 * hidden if glu else hidden, d), "fc2": lin(d, hidden),
            "ls1": 1 + r(d, s=0.1) if ls else None, "ls2": 1 + r(d, s=0.1) if ls else None,
            "qn": ln(d // heads) if qk_norm else None, "kn": ln(d // heads) if qk_norm else None,
        })
    return g
