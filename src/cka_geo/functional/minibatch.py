"""The per-batch maths of minibatch CKA, for every pair of layers at once.

Over minibatches k (Nguyen, Raghu & Kornblith 2021, eq. 3)::

    CKA(a, b) = Σ_k HSIC(K_k^a, L_k^b) / sqrt(Σ_k HSIC(K_k^a, K_k^a) · Σ_k HSIC(L_k^b, L_k^b))

with HSIC the unbiased HSIC_1 of Song et al. (2012) by default. Two pure steps per batch:

1. :func:`batch_grams`: each layer's features (n, p) → its gram (n, n), made once per batch
   by batched matmuls per width group, with float64 row sums, total and squared norm. A
   gram is symmetric, so batches of 128 rows or more keep only its diagonal blocks and the
   blocks above them (:mod:`cka_geo.functional.blocks`: 3/4 or 5/8 of the work).
2. :func:`batch_terms`: two models' grams → every HSIC cross term (L_A, L_B) from a few
   matmuls over chunks of the gram entries (float32 partial sums of at most 8192 terms,
   added in float64) with
   Song's row-sum corrections, and the self terms from the squared norms.

:func:`cka_from_sums` turns summed terms into CKA. The stateful wrappers
(:class:`cka_geo.accumulator.MinibatchCKA`, the torchmetrics ``CKAMetric``, the training
``CKAMonitor``) only sum these terms.

Numerics (:mod:`cka_geo.functional.precision`): features are scaled by a power of two per
layer and batch (exact) where their magnitude needs it, and shifted by a sampled mean, or
centred, before the gram where they have an offset (:mod:`cka_geo.functional.batched`); the HSIC terms are scaled
back in float64. A batch of a layer that is constant within round-off, or whose self term is at the
round-off level of its gram, contributes exactly 0 (its true value, or indistinguishable
from it); bit-identical grams give cross terms equal to their self terms, so identical
inputs give CKA exactly 1. Nothing is clamped and no epsilon is added.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import numpy as np
import torch

from cka_geo.errors import FeatureError, UsageError
from cka_geo.functional.batched import (
    GramWork,
    fast_checks,
    fast_linear_grams,
    one_thread,
    scaled_stack,
)
from cka_geo.functional.blocks import GramBlocks, common_layout, frobenius_blocks, parts_for
from cka_geo.functional.kernels import check_kernel, gram_rbf, min_samples
from cka_geo.functional.precision import constant_tol, noise_tol

#: Largest stack of one width's features made at once for the batched gram matmul.
STACK_BYTES = 64 << 20


@dataclass
class BatchGrams:
    """One model's grams for one batch, ready for :func:`batch_terms`.

    Attributes:
        names: Layer names, in order.
        n: Rows (samples) of the batch.
        grams: The L (n, n) grams of the scaled, centred features, as diagonal and upper
            blocks (:class:`~cka_geo.functional.blocks.GramBlocks`; zero diagonal for the
            unbiased estimator; RBF grams shifted by a constant that centering removes).
        rows: (L, n) float64 row sums of the grams.
        total: (L,) float64 sums of the grams.
        sq: (L,) float64 squared Frobenius norms of the grams.
        scale: (L,) float64 power of two each layer's features were multiplied by.
        constant: (L,) bool, the layer is constant within round-off in this batch.
        sigma: (L,) float64 RBF sigmas in the features' own units, or None (linear).
        kernel: The kernel the grams were made with.
        feats: The features the grams came from, kept only to word an error message; None
            for grams meant to be kept.
    """

    names: list[str]
    n: int
    grams: GramBlocks
    rows: torch.Tensor
    total: torch.Tensor
    sq: torch.Tensor
    scale: torch.Tensor
    constant: torch.Tensor
    sigma: torch.Tensor | None = None
    kernel: str = "linear"
    feats: Mapping[str, torch.Tensor] | None = None

    def to(self, device: torch.device | str) -> BatchGrams:
        """The same grams on ``device`` (``self`` if already there)."""
        if self.grams.device == torch.device(device):
            return self
        sigma = None if self.sigma is None else self.sigma.to(device)
        return BatchGrams(
            self.names, self.n, self.grams.to(device), self.rows.to(device), self.total.to(device),
            self.sq.to(device), self.scale.to(device), self.constant.to(device), sigma, self.kernel, None,
        )


@dataclass
class BatchTerms:
    """The HSIC terms of one batch: what the accumulators sum.

    Attributes:
        cross: (L_A, L_B) float64 HSIC(K^a, L^b).
        self_a: (L_A,) float64 HSIC(K^a, K^a).
        self_b: (L_B,) float64 HSIC(L^b, L^b).
        n: Rows of the batch.
        degenerate_a: (L_A,) bool, layers of A whose terms are 0 in this batch (constant
            within round-off, or a self term at the round-off level of its gram).
        degenerate_b: (L_B,) bool, likewise for B.
        sigma_a: (L_A,) RBF sigmas of A, or None.
        sigma_b: (L_B,) RBF sigmas of B, or None.
    """

    cross: torch.Tensor
    self_a: torch.Tensor
    self_b: torch.Tensor
    n: int
    degenerate_a: torch.Tensor
    degenerate_b: torch.Tensor
    sigma_a: torch.Tensor | None = None
    sigma_b: torch.Tensor | None = None


@contextlib.contextmanager
def full_fp32_matmul() -> Iterator[None]:
    """Run float32 matmuls at full float32 precision inside the block.

    A global ``torch.set_float32_matmul_precision("high")`` or
    ``torch.backends.cuda.matmul.allow_tf32 = True`` (common in training scripts) would let
    the grams run in TF32/bf16 with ~1e-3 relative error; the accuracy this engine states
    (1e-6 against a float64 reference) needs full float32. The settings are restored after.
    """
    backends = [
        b for b in (torch.backends.cuda.matmul, getattr(torch.backends.mkldnn, "matmul", None))
        if b is not None and hasattr(b, "fp32_precision")
    ]
    if backends:  # torch >= 2.9: per-backend settings; never mix with the legacy API
        saved = [b.fp32_precision for b in backends]
        for b in backends:
            b.fp32_precision = "ieee"
        try:
            yield
        finally:
            for b, value in zip(backends, saved, strict=True):
                b.fp32_precision = value
        return
    precision = torch.get_float32_matmul_precision()
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.set_float32_matmul_precision("highest")
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(precision)
        torch.backends.cuda.matmul.allow_tf32 = tf32


def too_small(n: int, estimator: str) -> bool:
    """Whether a batch of ``n`` rows is too small for ``estimator``; warns when it is.

    The one rule for small batches (typically the last one) in every accumulator: skip it
    with a warning, never produce NaN. Callers count the skipped samples.
    """
    if n >= min_samples(estimator):
        return False
    warnings.warn(
        f"skipping a batch of {n} samples: the {estimator} estimator needs at least {min_samples(estimator)}",
        RuntimeWarning,
        stacklevel=3,
    )
    return True


def check_batch(
    feats: Mapping[str, torch.Tensor | np.ndarray], which: str = "A", names: list[str] | None = None
) -> tuple[dict[str, torch.Tensor], int]:
    """Validate one model's features of one batch.

    Args:
        feats: Layer name -> (n, p) floating tensor or numpy array.
        which: ``"A"`` or ``"B"``, for error messages.
        names: The layer names of earlier batches, which these must repeat in order.

    Returns:
        The features as detached tensors (numpy arrays converted), and n.

    Raises:
        FeatureError: Not a non-empty mapping, other layers than before, a layer that is not
            a floating (samples, features) tensor with at least one feature, or layers with
            different sample counts.
    """
    if not isinstance(feats, Mapping) or not feats:
        raise FeatureError(f"features of model {which} must be a non-empty mapping name -> (n, p) tensor")
    got = list(feats)
    if names is not None and got != names:
        if set(got) != set(names):
            missing = sorted(set(names) - set(got))
            extra = sorted(set(got) - set(names))
            raise FeatureError(
                f"model {which}: layers differ from the first batch (missing {missing}, unexpected {extra})"
            )
        raise FeatureError(f"model {which}: layers arrive in another order than in the first batch")
    out: dict[str, torch.Tensor] = {}
    n = None
    for name, x in feats.items():
        if isinstance(x, np.ndarray) and x.dtype.kind == "f":
            x = torch.from_numpy(np.ascontiguousarray(x))
        if not isinstance(x, torch.Tensor) or x.ndim != 2 or not x.is_floating_point() or x.shape[1] == 0:
            desc = f"shape {tuple(x.shape)} {x.dtype}" if hasattr(x, "shape") else type(x).__name__
            raise FeatureError(
                f"layer {name!r} of model {which}: expected a floating (samples, features) tensor "
                f"with at least one feature, got {desc}"
            )
        if n is None:
            n = x.shape[0]
        elif x.shape[0] != n:
            raise FeatureError(f"layer {name!r} of model {which} has {x.shape[0]} samples, others have {n}")
        out[name] = x.detach() if x.requires_grad else x  # detach() costs a dispatch per layer
    return out, int(n)  # type: ignore[arg-type]


def gram_dtype_for(tensors: list[torch.Tensor], gram_dtype: torch.dtype | None = None) -> torch.dtype:
    """float64 grams for all-float64 features, float32 otherwise, unless ``gram_dtype`` is set."""
    if gram_dtype is not None:
        return gram_dtype
    return torch.float64 if all(t.dtype == torch.float64 for t in tensors) else torch.float32


def batch_grams(
    feats: Mapping[str, torch.Tensor],
    *,
    kernel: str = "linear",
    estimator: str = "unbiased",
    rbf_frac: float = 0.4,
    gram_dtype: torch.dtype | None = None,
    out: GramBlocks | None = None,
    work: GramWork | None = None,
) -> BatchGrams:
    """The grams of every layer of one batch, with their float64 sums.

    Args:
        feats: Layer name -> (n, p_layer) features, as checked by :func:`check_batch`.
        kernel: ``"linear"`` or ``"rbf"``.
        estimator: ``"unbiased"`` zeroes the grams' diagonals (K̃ of Song et al.).
        rbf_frac: RBF bandwidth fraction (median rule, per layer and batch).
        gram_dtype: dtype of the matmuls (see :func:`gram_dtype_for`).
        out: Grams whose buffer to reuse; a new one is made when None, too small or of
            another dtype or device.
        work: One model's work buffers and layer offsets, kept between its batches (see
            :class:`~cka_geo.functional.batched.GramWork`); None makes a new one.

    Returns:
        The :class:`BatchGrams` (``grams`` is ``out`` when it fitted).
    """
    check_kernel(kernel, estimator)
    names = list(feats)
    tensors = list(feats.values())
    n, device = tensors[0].shape[0], tensors[0].device
    dtype = gram_dtype_for(tensors, gram_dtype)
    count = len(tensors)
    b = _Batch(
        tensors, kernel, estimator, rbf_frac, dtype,
        out=GramBlocks.empty(count, n, parts_for(n, kernel), dtype, device, reuse=out),
        scale=torch.ones(count, dtype=torch.float64, device=device),
        constant=torch.zeros(count, dtype=torch.bool, device=device),
        sigma=torch.empty(count, dtype=torch.float64, device=device) if kernel == "rbf" else None,
    )
    out = b.out
    work = GramWork() if work is None else work
    fast = _FastLayers(count, device)
    with full_fp32_matmul():
        for idx in _chunks(tensors, n, dtype):
            _chunk_grams(b, idx, work, fast)
    rows, sq = _sums(out, estimator)
    total = rows.sum(-1)
    if fast.idx:
        # The fast path's grams are checked from their own sums (one host sync); the layers
        # they send back are redone by the scaled, centred path and their sums taken again.
        sum_all = total + (fast.trace if estimator == "unbiased" else 0.0)
        is_const, redo = fast_checks(fast.trace, fast.shift_sq, fast.peak, sum_all, n, dtype)
        b.constant = torch.where(fast.mask, is_const, b.constant)
        again = (redo & fast.mask).nonzero().flatten().tolist()
        if again:
            with full_fp32_matmul():
                for part in _chunks([tensors[i] for i in again], n, dtype):  # one width per stack
                    layers = [again[j] for j in part]
                    _general_grams(b, layers)
            for i in again:  # the redone layers' sums alone (one layer's sums: its bits in any stack)
                with one_thread(always=True):
                    rows[i], sq[i] = (s[0] for s in _sums(out.layers(i, i + 1), estimator))
            total = rows.sum(-1)
    return BatchGrams(names, n, out, rows, total, sq, b.scale, b.constant, b.sigma, kernel, feats)


@dataclass
class _Batch:
    """One model's batch while its grams are made: its features and settings, and what each
    layer gets (its gram in ``out``, its scale, constant flag and RBF sigma)."""

    tensors: list[torch.Tensor]
    kernel: str
    estimator: str
    rbf_frac: float
    dtype: torch.dtype
    out: GramBlocks
    scale: torch.Tensor
    constant: torch.Tensor
    sigma: torch.Tensor | None


def _sums(out: GramBlocks, estimator: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero the grams' diagonals (unbiased estimator); their float64 row sums and squared norms."""
    with one_thread():
        if estimator == "unbiased":
            out.diagonal().zero_()
        return out.row_sums(), out.squared_norm()  # at most n terms per float32 sum; no float64 copy of K


class _FastLayers:
    """The layers of one batch made by :func:`fast_linear_grams`, and what it measured of them."""

    def __init__(self, count: int, device: torch.device) -> None:
        self.idx: list[int] = []
        self.mask = torch.zeros(count, dtype=torch.bool, device=device)
        self.trace, self.shift_sq, self.peak = torch.zeros(3, count, dtype=torch.float64, device=device)

    def record(self, idx: list[int], trace: torch.Tensor, shift_sq: torch.Tensor, peak: torch.Tensor) -> None:
        if idx == list(range(idx[0], idx[0] + len(idx))):  # consecutive: slices, no index tensor
            where: slice | torch.Tensor = slice(idx[0], idx[0] + len(idx))
        else:
            where = torch.tensor(idx, device=self.mask.device)
        self.trace[where], self.shift_sq[where], self.peak[where] = trace, shift_sq, peak
        self.mask[where] = True
        self.idx += idx


def _chunks(tensors: list[torch.Tensor], n: int, dtype: torch.dtype) -> Iterator[list[int]]:
    """Indices of layers of one width, in stacks under :data:`STACK_BYTES`."""
    groups: dict[int, list[int]] = {}
    for i, x in enumerate(tensors):
        groups.setdefault(x.shape[1], []).append(i)
    itemsize = torch.empty((), dtype=dtype).element_size()
    for width, members in groups.items():
        step = max(1, STACK_BYTES // (n * width * itemsize))
        for start in range(0, len(members), step):
            yield members[start : start + step]


def _chunk_grams(b: _Batch, idx: list[int], work: GramWork, fast: _FastLayers) -> None:
    """Grams of the layers ``idx`` (one width) into ``b.out``: by the fast path (recorded in
    ``fast``, checked once the sums are known) where it applies, else by the general one."""
    chunk, out, dtype = [b.tensors[i] for i in idx], b.out, b.dtype
    if b.kernel == "linear" and all(t.dtype == dtype for t in chunk):
        consecutive = idx == list(range(idx[0], idx[0] + len(idx)))
        n = chunk[0].shape[0]
        target = (out.layers(idx[0], idx[0] + len(idx)) if consecutive
                  else GramBlocks.empty(len(idx), n, out.parts, dtype, out.device))
        fast.record(idx, *fast_linear_grams(chunk, target, work))
        if not consecutive:
            out.assign(idx, target)
        return
    _general_grams(b, idx)


def _general_grams(b: _Batch, idx: list[int]) -> None:
    """Grams of the layers ``idx`` (one width) from scaled, centred features; fills their
    scale, constant flag and sigma in ``b``."""
    chunk, out, dtype, estimator = [b.tensors[i] for i in idx], b.out, b.dtype, b.estimator
    device = out.device
    single = len(idx) == 1  # reductions to one value: one thread whatever the load (see one_thread)
    with one_thread(single):
        x, s, offset_sq = scaled_stack(chunk, dtype)
    n = x.shape[1]
    sel = torch.tensor(idx, device=device)
    if b.kernel == "linear":
        blocks = GramBlocks.empty(len(idx), n, out.parts, dtype, device)
        blocks.multiply(x)
        out.assign(idx, blocks)
        centred_sq = blocks.diagonal().sum((-2, -1)).to(torch.float64)
        narrow = torch.zeros(len(idx), dtype=torch.bool, device=device)
    else:
        # RBF grams are whole (one part): consecutive layers are written in place.
        consecutive = idx == list(range(idx[0], idx[0] + len(idx)))
        whole = out.diag[idx[0] : idx[0] + len(idx), 0] if consecutive and out.parts == 1 else None
        g, sg = gram_rbf(x, b.rbf_frac, out=whole)
        b.sigma[idx] = sg / s  # type: ignore[index]  # back in the features' own units
        with one_thread(single):
            centred_sq = x.square().sum((1, 2)).to(torch.float64)
            narrow = _rbf_shift(g, estimator, dtype)
            if whole is None:
                out.assign(idx, g)
    b.constant[sel] = _constant(chunk, dtype, centred_sq, offset_sq) | narrow
    b.scale[sel] = s


def _rbf_shift(g: torch.Tensor, estimator: str, dtype: torch.dtype) -> torch.Tensor:
    """Shift RBF grams (L, n, n) in place by constants centering removes; the too-narrow flags."""
    n = g.shape[-1]
    # Every pair farther apart than the dtype can tell from 0: the gram is the identity
    # and the bandwidth too narrow for this batch (every CKA would be 1 or 0/0).
    g.diagonal(dim1=-2, dim2=-1).zero_()
    narrow = g.amax(dim=(1, 2)) < torch.finfo(dtype).eps
    off_mean = g.sum(dim=(1, 2), keepdim=True) / (n * (n - 1))
    if estimator == "unbiased":
        g -= off_mean  # a constant off the diagonal, which U-centering annihilates
    else:
        g.diagonal(dim1=-2, dim2=-1).fill_(1.0)
        g -= g.mean(dim=(1, 2), keepdim=True)  # a constant, which H · H annihilates
    return narrow


def _constant(
    chunk: list[torch.Tensor], dtype: torch.dtype, centred_sq: torch.Tensor, offset_sq: torch.Tensor
) -> torch.Tensor:
    """The constant rule ‖X_c‖² ≤ τ² ‖X‖² per layer, τ for the features' and the grams' dtype."""
    dtypes = {t.dtype for t in chunk}
    if len(dtypes) == 1:  # the usual case: one τ for the whole chunk
        tau = max(constant_tol(dtypes.pop()), constant_tol(dtype))
        return centred_sq <= tau**2 * (centred_sq + offset_sq)
    tol = torch.tensor(
        [max(constant_tol(t.dtype), constant_tol(dtype)) ** 2 for t in chunk],
        dtype=torch.float64,
        device=centred_sq.device,
    )
    return centred_sq <= tol * (centred_sq + offset_sq)


def _estimator_constants(n: int, estimator: str) -> tuple[float, float, float]:
    """(c1, c2, norm) with n_hsic = (‖K‖² + c1 (1ᵀK1)(1ᵀL1) − c2 1ᵀKL1) / norm."""
    if estimator == "unbiased":
        # Song et al. (2012), eq. 5, with K̃, L̃ the zero-diagonal grams:
        # n(n-3) HSIC_1 = tr(K̃L̃) + (1ᵀK̃1)(1ᵀL̃1)/((n-1)(n-2)) - 2/(n-2) 1ᵀK̃L̃1
        return 1.0 / ((n - 1) * (n - 2)), 2.0 / (n - 2), float(n * (n - 3))
    # tr(KHLH) = tr(KL) - 2/n 1ᵀKL1 + (1ᵀK1)(1ᵀL1)/n², over (n-1)²
    return 1.0 / n**2, 2.0 / n, float((n - 1) ** 2)


def batch_terms(
    ga: BatchGrams, gb: BatchGrams | None = None, *, estimator: str = "unbiased", batch: int | None = None
) -> BatchTerms:
    """HSIC terms of one batch from two models' grams (``gb=None``: A against itself).

    Args:
        ga: Grams of model A.
        gb: Grams of model B for the same samples, or None.
        estimator: The estimator the grams were made for.
        batch: The batch's number, for error messages.

    Raises:
        FeatureError: Different row counts, or a non-finite self term (NaN/Inf features).
    """
    self_compare = gb is None or gb is ga
    gb = ga if gb is None else gb
    if ga.n != gb.n:
        raise FeatureError(f"model A has {ga.n} samples in this batch but model B has {gb.n}")
    c1, c2, norm = _estimator_constants(ga.n, estimator)
    ka, kb = common_layout(ga.grams, gb.grams)
    with full_fp32_matmul():
        frob = frobenius_blocks(ka, kb)
    with one_thread(always=True):  # a float64 product over n: torch may split it by thread
        row_products = ga.rows @ gb.rows.T
    cross = (frob + c1 * torch.outer(ga.total, gb.total) - c2 * row_products) / norm
    self_a = (ga.sq + c1 * ga.total.square() - c2 * ga.rows.square().sum(-1)) / norm
    self_b = self_a if self_compare else (gb.sq + c1 * gb.total.square() - c2 * gb.rows.square().sum(-1)) / norm

    deg_a = ga.constant | (self_a * norm <= noise_tol(ga.grams.dtype) * ga.sq)
    deg_b = deg_a if self_compare else gb.constant | (self_b * norm <= noise_tol(gb.grams.dtype) * gb.sq)
    # Candidates for bit-identical grams (upstream of a fine-tuned change, or A against
    # itself): equal sums, norms and self terms; confirmed below by comparing the grams.
    same = (
        (ga.total[:, None] == gb.total[None, :])
        & (ga.sq[:, None] == gb.sq[None, :])
        & (self_a[:, None] == self_b[None, :])
        & ~deg_a[:, None]
        & ~deg_b[None, :]
    )
    finite = torch.isfinite(torch.cat([self_a, self_b])).all()
    ok, any_same = torch.stack([finite, same.any()]).tolist()  # one host sync per batch
    if not ok:
        if not bool(torch.isfinite(self_a).all()):
            _raise_nonfinite(ga, self_a, "A", batch)
        _raise_nonfinite(gb, self_b, "B", batch)
    if any_same:
        _identical_to_self(cross, self_a, ka, kb, same, self_compare)
    cross = cross.masked_fill(deg_a[:, None] | deg_b[None, :], 0.0)
    self_a = self_a.masked_fill(deg_a, 0.0)
    self_b = self_a if self_compare else self_b.masked_fill(deg_b, 0.0)
    if ga.kernel == "linear":  # K of features scaled by s is s² K; RBF grams do not scale
        inv_a = ga.scale.reciprocal().square()
        inv_b = inv_a if self_compare else gb.scale.reciprocal().square()
        cross = cross * torch.outer(inv_a, inv_b)
        self_a = self_a * (inv_a * inv_a)
        self_b = self_a if self_compare else self_b * (inv_b * inv_b)
    return BatchTerms(cross, self_a, self_b, ga.n, deg_a, deg_b, ga.sigma, gb.sigma)


def _identical_to_self(
    cross: torch.Tensor,
    self_a: torch.Tensor,
    ka: GramBlocks,
    kb: GramBlocks,
    same: torch.Tensor,
    self_compare: bool,
) -> None:
    """Set ``cross[i, j] = self_a[i]`` (⟨K, K⟩ by the self term's arithmetic) where gram i of
    A is bit-identical to gram j of B, for the candidate pairs in ``same`` (grams of one layout).

    The grams of the candidates are compared in chunks of at most :data:`STACK_BYTES`, with
    no host sync beyond finding the candidates (A against itself needs no comparison on the
    diagonal).
    """
    i, j = same.nonzero(as_tuple=True)
    per_gram = GramBlocks.numel(1, ka.n, ka.parts) * ka.diag.element_size()
    step = max(1, STACK_BYTES // per_gram)
    for start in range(0, i.numel(), step):
        ii, jj = i[start : start + step], j[start : start + step]
        equal = ka.equal(ii, kb, jj)
        if self_compare:
            equal |= ii == jj
        cross[ii, jj] = torch.where(equal, self_a[ii], cross[ii, jj])


def _raise_nonfinite(g: BatchGrams, self_terms: torch.Tensor, which: str, batch: int | None) -> None:
    bad = (~torch.isfinite(self_terms)).nonzero().flatten().tolist()
    name = g.names[bad[0]]
    where = "" if batch is None else f" (batch {batch})"
    raise FeatureError(f"layer {name!r} of model {which} has NaN or Inf values in its features{where}")


def cka_from_sums(cross: np.ndarray, self_a: np.ndarray, self_b: np.ndarray) -> np.ndarray:
    """``cross / sqrt(self_a ⊗ self_b)``, NaN where a self term is 0 (no usable batch)."""
    denom = np.sqrt(np.multiply.outer(self_a, self_b))
    with np.errstate(divide="ignore", invalid="ignore"):
        out = cross / denom
    return np.where(denom > 0, out, np.nan)


def check_rbf_frac(kernel: str, rbf_frac: float) -> None:
    """Raise UsageError for a non-positive RBF bandwidth fraction."""
    if kernel == "rbf" and not rbf_frac > 0:
        raise UsageError(f"rbf_frac must be positive, got {rbf_frac}")


__all__ = [
    "STACK_BYTES",
    "BatchGrams",
    "BatchTerms",
    "batch_grams",
    "batch_terms",
    "check_batch",
    "check_rbf_frac",
    "cka_from_sums",
    "full_fp32_matmul",
    "gram_dtype_for",
    "too_small",
]
