"""Stacks of symmetric grams kept as their diagonal blocks and the blocks above them.

A gram K = X Xᵀ (n, n) is symmetric. With its rows cut into m parts of h = n / m rows, K is
known from its m diagonal blocks K_ii (h, h) and the m(m − 1)/2 blocks above them, kept here
as m − 1 block rows U_i = K[part i, parts i+1 … m−1] (h, (m − 1 − i) h): (m + 1) / (2m) of
its entries (3/4 for m = 2, 5/8 for m = 4). Each piece is one batched matmul over all the
layers of a stack, so the grams cost that fraction of a full X Xᵀ's multiply-adds, and every
later pass over them (the unbiased estimator's zero diagonal, the row sums, the norm, the
Frobenius products of the cross terms) reads that fraction of the memory. The sums follow
from the symmetry::

    ⟨K, L⟩_F = Σ_i ⟨K_ii, L_ii⟩_F + 2 Σ_i ⟨U_i^K, U_i^L⟩_F          (‖K‖²_F: L = K)
    (K 1)[part i] = K_ii 1 + U_i 1 + Σ_{j<i} (U_j's columns in part i)ᵀ 1

The products use the same entries each side, so a gram is exactly symmetric (a full X Xᵀ
may differ from its transpose by a rounding), and bit-identical features still give
bit-identical pieces. Small batches keep one part (the full gram): their matmuls are too
small to gain from the split. Measured on 2 cores for 36 layers of width 384 (the matmuls
alone): 0.84x the time of the full grams at 256 rows, 0.80x at 512, 0.70x at 1024.
"""

from __future__ import annotations

import contextlib

import torch

from cka_geo.functional.batched import frobenius, one_thread

#: Fewest rows for two parts, and for four (each part at least 64 rows).
TWO_PARTS, FOUR_PARTS = 128, 512


def parts_for(n: int, kernel: str = "linear") -> int:
    """How many row parts a batch of ``n`` rows is cut into (1 for RBF: its grams come whole)."""
    if kernel == "linear":
        for m, least in ((4, FOUR_PARTS), (2, TWO_PARTS)):
            if n >= least and n % m == 0:
                return m
    return 1


class GramBlocks:
    """L symmetric (n, n) grams as m diagonal blocks and m − 1 upper block rows per layer.

    Attributes:
        count: L, the layers.
        n: Rows of each gram.
        parts: m.
        h: Rows per part, n / m.
        diag: (L, m, h, h) the diagonal blocks.
        upper: m − 1 tensors (L, h, (m − 1 − i) h), the block rows above the diagonal.
        flat: The one buffer every piece views, or None for a selection of layers.
    """

    def __init__(self, diag: torch.Tensor, upper: list[torch.Tensor], flat: torch.Tensor | None = None) -> None:
        self.diag, self.upper, self.flat = diag, upper, flat
        self.count, self.parts, self.h = diag.shape[0], diag.shape[1], diag.shape[2]
        self.n = self.parts * self.h

    @staticmethod
    def numel(count: int, n: int, parts: int) -> int:
        """Entries ``count`` grams of ``n`` rows in ``parts`` parts hold."""
        h = n // parts
        return count * parts * (parts + 1) // 2 * h * h

    @classmethod
    def empty(
        cls,
        count: int,
        n: int,
        parts: int,
        dtype: torch.dtype,
        device: torch.device | str,
        reuse: GramBlocks | None = None,
    ) -> GramBlocks:
        """New blocks, in ``reuse``'s buffer when it is large enough and of the same dtype and device."""
        if n % parts:
            raise ValueError(f"{n} rows do not split into {parts} parts")
        need, h = cls.numel(count, n, parts), n // parts
        flat = None if reuse is None else reuse.flat
        if flat is None or flat.numel() < need or flat.dtype != dtype or flat.device != torch.device(device):
            flat = torch.empty(need, dtype=dtype, device=device)
        sizes = [count * parts * h * h] + [count * h * (parts - 1 - i) * h for i in range(parts - 1)]
        pieces = flat[:need].split(sizes)
        diag = pieces[0].view(count, parts, h, h)
        upper = [p.view(count, h, (parts - 1 - i) * h) for i, p in enumerate(pieces[1:])]
        return cls(diag, upper, flat)

    @property
    def dtype(self) -> torch.dtype:
        return self.diag.dtype

    @property
    def device(self) -> torch.device:
        return self.diag.device

    def layers(self, start: int, stop: int) -> GramBlocks:
        """Views of the layers ``start:stop``."""
        return GramBlocks(self.diag[start:stop], [u[start:stop] for u in self.upper])

    def multiply(self, x: torch.Tensor) -> None:
        """Fill the blocks with X Xᵀ of the (L, n, p) features ``x`` (a stack with unit column stride)."""
        h, m = self.h, self.parts
        xs = x.reshape(self.count * m, h, x.shape[-1])
        # A product with a batch of one may be split along its inner dimension by thread (other
        # bits than the same product inside a larger batch): one layer runs on one thread, so
        # identical features give identical grams in stacks of any size (see one_thread).
        with one_thread(always=True) if self.count == 1 else contextlib.nullcontext():
            torch.bmm(xs, xs.transpose(1, 2), out=self.diag.view(self.count * m, h, h))
            for i, u in enumerate(self.upper):
                torch.bmm(x[:, i * h : (i + 1) * h], x[:, (i + 1) * h :].transpose(1, 2), out=u)

    def diagonal(self) -> torch.Tensor:
        """The grams' diagonals as an (L, m, h) view."""
        return self.diag.diagonal(dim1=-2, dim2=-1)

    def assign(self, idx: list[int], other: GramBlocks | torch.Tensor) -> None:
        """Copy ``other``'s grams (blocks of the same parts, or full (k, n, n) grams) into layers ``idx``."""
        if isinstance(other, GramBlocks):
            src = other
        else:  # one part is the whole gram: a view, no copy
            src = GramBlocks(other.unsqueeze(1), []) if self.parts == 1 else split_full(other, self.parts)
        sel = torch.tensor(idx, device=self.device)
        self.diag.index_copy_(0, sel, src.diag)
        for u, v in zip(self.upper, src.upper, strict=True):
            u.index_copy_(0, sel, v)

    def row_sums(self) -> torch.Tensor:
        """(L, n) float64 row sums K 1 (each a float32 sum of at most n entries when float32)."""
        count, m, h = self.count, self.parts, self.h
        rows = self.diag.sum(-1).to(torch.float64)
        for i, u in enumerate(self.upper):
            rows[:, i] += u.sum(-1)
            rows[:, i + 1 :] += u.sum(-2).view(count, m - 1 - i, h)
        return rows.view(count, self.n)

    def squared_norm(self) -> torch.Tensor:
        """(L,) float64 ‖K‖²_F, from float32 norms of gram rows squared and summed in float64."""
        sq = torch.linalg.vector_norm(self.diag, dim=-1).to(torch.float64).square().sum((1, 2))
        for u in self.upper:
            sq += 2 * torch.linalg.vector_norm(u, dim=-1).to(torch.float64).square().sum(-1)
        return sq

    def equal(self, ii: torch.Tensor, other: GramBlocks, jj: torch.Tensor) -> torch.Tensor:
        """(k,) bool: gram ``ii[k]`` here is bit-identical to gram ``jj[k]`` of ``other``."""
        same = (self.diag[ii] == other.diag[jj]).flatten(1).all(1)
        for u, v in zip(self.upper, other.upper, strict=True):
            same &= (u[ii] == v[jj]).flatten(1).all(1)
        return same

    def full(self) -> torch.Tensor:
        """The (L, n, n) grams, assembled (for tests and for grams of unlike parts)."""
        h = self.h
        k = self.diag.new_empty((self.count, self.n, self.n))
        for i in range(self.parts):
            k[:, i * h : (i + 1) * h, i * h : (i + 1) * h] = self.diag[:, i]
        for i, u in enumerate(self.upper):
            k[:, i * h : (i + 1) * h, (i + 1) * h :] = u
            k[:, (i + 1) * h :, i * h : (i + 1) * h] = u.transpose(1, 2)
        return k

    def to(self, device: torch.device | str) -> GramBlocks:
        """The same grams on ``device`` (``self`` if already there)."""
        target = torch.device(device)
        if target.type == self.device.type and target.index in (None, self.device.index):
            return self
        out = GramBlocks.empty(self.count, self.n, self.parts, self.dtype, device)
        out.diag.copy_(self.diag)
        for u, v in zip(out.upper, self.upper, strict=True):
            u.copy_(v)
        return out


def split_full(k: torch.Tensor, parts: int) -> GramBlocks:
    """Full (L, n, n) symmetric grams as blocks of ``parts`` parts (copies; the upper triangle is kept)."""
    count, n = k.shape[0], k.shape[-1]
    out = GramBlocks.empty(count, n, parts, k.dtype, k.device)
    h = out.h
    for i in range(parts):
        out.diag[:, i] = k[:, i * h : (i + 1) * h, i * h : (i + 1) * h]
    for i, u in enumerate(out.upper):
        u.copy_(k[:, i * h : (i + 1) * h, (i + 1) * h :])
    return out


def common_layout(a: GramBlocks, b: GramBlocks) -> tuple[GramBlocks, GramBlocks]:
    """``a`` and ``b`` in the same parts: as they are, or both whole when they differ (only
    grams made by hand or kept from other thresholds; the engine cuts a batch's grams alike)."""
    if a.parts == b.parts:
        return a, b
    return split_full(a.full(), 1), split_full(b.full(), 1)


def frobenius_blocks(a: GramBlocks, b: GramBlocks) -> torch.Tensor:
    """All ⟨K_a, K_b⟩_F, (L_A, L_B) float64: the diagonal blocks' products plus twice the upper ones'.

    Raises:
        ValueError: ``a`` and ``b`` are cut into different parts (see :func:`common_layout`).
    """
    if a.parts != b.parts:
        raise ValueError(f"grams in {a.parts} and {b.parts} parts: bring them to one layout first (common_layout)")
    out = frobenius(a.diag, b.diag)
    if a.upper:
        upper = sum(frobenius(u, v) for u, v in zip(a.upper, b.upper, strict=True))
        out += 2 * upper
    return out


__all__ = ["FOUR_PARTS", "TWO_PARTS", "GramBlocks", "common_layout", "frobenius_blocks", "parts_for", "split_full"]
