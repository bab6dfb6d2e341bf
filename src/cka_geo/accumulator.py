"""Minibatch CKA for every pair of layers at once (Nguyen, Raghu & Kornblith 2021, eq. 3).

Over minibatches k::

    CKA(a, b) = Σ_k HSIC(K_k^a, L_k^b) / sqrt(Σ_k HSIC(K_k^a, K_k^a) · Σ_k HSIC(L_k^b, L_k^b))

with HSIC the unbiased HSIC_1 of Song et al. (2012) by default. :class:`MinibatchCKA` is a
thin stateful wrapper: the per-batch maths (one gram per layer, every cross term from one
batched product, float64 sums, exact rescaling, the round-off rules) are the pure functions
of :mod:`cka_geo.functional.minibatch`. Memory does not depend on the number of samples.

Both models must see the same samples in the same order (in eval mode).

Small batches: the unbiased estimator needs n >= 4 rows (the biased one n >= 3). A batch
with fewer rows (typically the last one) is skipped with a warning and counted in
``CKAResult.samples_skipped``; it never produces NaN. Choose a batch size that divides the
sample count to use every sample.

Degenerate layers: a batch in which a layer is constant within round-off, or whose self-HSIC
is at the round-off level of its gram, contributes 0 (its value in exact arithmetic, or
indistinguishable from it) and is counted in ``CKAResult.degenerate_a``/``degenerate_b``; a
layer with no usable batch has CKA NaN with one warning naming it. Thresholds:
:mod:`cka_geo.functional.precision`.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from cka_geo.errors import FeatureError, UsageError
from cka_geo.functional.batched import GramWork
from cka_geo.functional.blocks import GramBlocks
from cka_geo.functional.kernels import (
    DEFAULT_RBF_FRAC,
    Estimator,
    Kernel,
    check_kernel,
    min_samples,
)
from cka_geo.functional.minibatch import (
    BatchGrams,
    BatchTerms,
    batch_grams,
    batch_terms,
    check_batch,
    check_rbf_frac,
    cka_from_sums,
    full_fp32_matmul,
    too_small,
)


@dataclass
class CKAResult:
    """CKA between every layer of model A and every layer of model B.

    Attributes:
        names_a: Layer names of model A, in the caller's order (rows).
        names_b: Layer names of model B, in the caller's order (columns).
        matrix: (L_A, L_B) float64 CKA.
        cross: (L_A, L_B) Σ_k HSIC(K_k^a, L_k^b).
        self_a: (L_A,) Σ_k HSIC(K_k^a, K_k^a).
        self_b: (L_B,) Σ_k HSIC(L_k^b, L_k^b).
        batch_cross: (batches, L_A, L_B) per-batch HSIC terms (for bootstrap intervals and
            merging across processes), or None if not kept.
        batch_self_a: (batches, L_A) per-batch self terms of A, or None.
        batch_self_b: (batches, L_B) per-batch self terms of B, or None.
        batch_sizes: Rows of each batch used.
        samples: Samples used (sum of batch_sizes).
        samples_skipped: Samples in batches too small for the estimator.
        kernel: ``"linear"`` or ``"rbf"``.
        estimator: ``"unbiased"`` or ``"biased"``.
        rbf_frac: The RBF bandwidth fraction, or None for the linear kernel.
        sigma_a: (batches, L_A) RBF sigma of each gram of A (median rule, per batch), or None.
        sigma_b: (batches, L_B) likewise for B, or None.
        degenerate_a: (L_A,) batches in which each layer of A was constant or at round-off
            level (its terms counted as 0), or None.
        degenerate_b: (L_B,) likewise for B, or None.
    """

    names_a: list[str]
    names_b: list[str]
    matrix: np.ndarray
    cross: np.ndarray
    self_a: np.ndarray
    self_b: np.ndarray
    batch_cross: np.ndarray | None
    batch_self_a: np.ndarray | None
    batch_self_b: np.ndarray | None
    batch_sizes: list[int]
    samples: int
    samples_skipped: int
    kernel: str
    estimator: str
    rbf_frac: float | None = None
    sigma_a: np.ndarray | None = None
    sigma_b: np.ndarray | None = None
    degenerate_a: np.ndarray | None = None
    degenerate_b: np.ndarray | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def diagonal(self) -> dict[str, float]:
        """CKA of each layer name present in both A and B with itself (same-layer CKA)."""
        col = {n: j for j, n in enumerate(self.names_b)}
        return {n: float(self.matrix[i, col[n]]) for i, n in enumerate(self.names_a) if n in col}

    def value(self, name_a: str, name_b: str | None = None) -> float:
        """CKA between layer ``name_a`` of A and ``name_b`` (default: the same name) of B."""
        name_b = name_a if name_b is None else name_b
        try:
            return float(self.matrix[self.names_a.index(name_a), self.names_b.index(name_b)])
        except ValueError:
            missing = name_a if name_a not in self.names_a else name_b
            raise UsageError(f"no layer named {missing!r} in this result") from None


class MinibatchCKA:
    """Accumulates minibatch CKA between all layers of two models.

    Args:
        kernel: ``"linear"`` or ``"rbf"``.
        estimator: ``"unbiased"`` (HSIC_1; the consistent minibatch estimator) or
            ``"biased"``. One batch holding every sample with ``"biased"`` is the classic
            full-batch CKA of Kornblith et al.
        rbf_frac: RBF bandwidth fraction; sigma is set per batch and per layer by the median
            rule of :func:`cka_geo.functional.rbf_sigma` and recorded.
        keep_batches: Keep the per-batch terms (needed for bootstrap intervals).
        gram_dtype: dtype of the feature matmuls: None uses float64 for float64 features
            and float32 otherwise (bf16/fp16 features are upcast). Centering and all sums
            are float64 regardless.

    Example:
        >>> acc = MinibatchCKA()
        >>> for _ in range(3):
        ...     x = torch.randn(32, 16)
        ...     acc.update({"a": x, "b": x ** 3}, {"a": 2 * x})
        >>> res = acc.compute()
        >>> res.names_a, res.names_b, res.matrix.shape
        (['a', 'b'], ['a'], (2, 1))
        >>> round(res.value("a"), 6)
        1.0
    """

    def __init__(
        self,
        kernel: Kernel = "linear",
        estimator: Estimator = "unbiased",
        rbf_frac: float = DEFAULT_RBF_FRAC,
        keep_batches: bool = True,
        gram_dtype: torch.dtype | None = None,
    ) -> None:
        check_kernel(kernel, estimator)
        check_rbf_frac(kernel, rbf_frac)
        self.kernel = kernel
        self.estimator = estimator
        self.rbf_frac = rbf_frac
        self.keep_batches = keep_batches
        self.gram_dtype = gram_dtype
        self.reset()

    def reset(self) -> None:
        """Forget every batch seen."""
        self.names_a: list[str] | None = None
        self.names_b: list[str] | None = None
        self._cross: torch.Tensor | None = None
        self._self_a: torch.Tensor | None = None
        self._self_b: torch.Tensor | None = None
        self._degenerate_a: torch.Tensor | None = None
        self._degenerate_b: torch.Tensor | None = None
        self._batches: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self._sigmas: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._buffers: dict[str, GramBlocks] = {}
        self._work: dict[str, GramWork] = {}
        self.batch_sizes: list[int] = []
        self.samples_skipped = 0

    # -- per batch -------------------------------------------------------------------------

    def prepare(
        self, feats: Mapping[str, torch.Tensor], which: str = "A", *, keep: bool = True
    ) -> BatchGrams:
        """Grams and their sums for one model's features of one batch.

        Args:
            feats: Layer name -> features (n, p_layer) (tensors or numpy arrays).
            which: ``"A"`` or ``"B"``, for error messages.
            keep: Give the grams their own memory (to keep them, e.g. a reference model's
                grams reused at every step). ``False`` reuses this accumulator's buffer for
                ``which``: valid only until the next ``prepare`` of the same ``which``.

        Raises:
            FeatureError: Bad features, or fewer rows than the estimator needs.
        """
        feats, n = check_batch(feats, which)
        if n < min_samples(self.estimator):
            raise FeatureError(
                f"model {which}: a batch of {n} samples; the {self.estimator} estimator needs at "
                f"least {min_samples(self.estimator)}"
            )
        g = self._grams(feats, None if keep else which.lower(), which.lower())
        if keep:
            g.feats = None
        return g

    def _grams(self, feats: Mapping[str, torch.Tensor], slot: str | None, which: str) -> BatchGrams:
        g = batch_grams(
            feats,
            kernel=self.kernel,
            estimator=self.estimator,
            rbf_frac=self.rbf_frac,
            gram_dtype=self.gram_dtype,
            out=None if slot is None else self._buffers.get(slot),
            work=self._work.setdefault(which, GramWork()),
        )
        if slot is not None:
            self._buffers[slot] = g.grams
        return g

    def batch_terms(self, ga: BatchGrams, gb: BatchGrams | None = None) -> BatchTerms:
        """HSIC terms of one batch from prepared grams (``gb=None``: A against itself).

        This is the whole per-batch computation of :meth:`update`, which sums its result
        (:func:`cka_geo.functional.minibatch.batch_terms`).

        Raises:
            FeatureError: Different row counts, or NaN/Inf features.
        """
        return batch_terms(ga, gb, estimator=self.estimator, batch=len(self.batch_sizes) + 1)

    def update(
        self, feats_a: Mapping[str, torch.Tensor], feats_b: Mapping[str, torch.Tensor] | None = None
    ) -> None:
        """Add one minibatch.

        Args:
            feats_a: Layer name -> features (n, p_layer) of model A for this batch (tensors,
                detached here, or numpy arrays).
            feats_b: The same for model B, rows for the same samples in the same order.
                None compares A with itself (the matrix is then symmetric).
        """
        self_compare = feats_b is None
        feats_a, n = check_batch(feats_a, "A", self.names_a)
        if self_compare:
            n_b = n
        else:
            feats_b, n_b = check_batch(feats_b, "B", self.names_b)  # type: ignore[arg-type]
        if n != n_b:
            raise FeatureError(f"model A has {n} samples in this batch but model B has {n_b}")
        if self.names_a is None:
            self.names_a = list(feats_a)
            self.names_b = list(feats_a if self_compare else feats_b)  # type: ignore[arg-type]
        if too_small(n, self.estimator):
            self.samples_skipped += n
            return
        ga = self._grams(feats_a, "a", "a")
        gb = None if self_compare else self._grams(feats_b, "b", "b")  # type: ignore[arg-type]
        self._add(self.batch_terms(ga, gb))

    def update_grams(self, ga: BatchGrams, gb: BatchGrams | None = None) -> None:
        """Add one minibatch from grams made by :meth:`prepare` (``gb=None``: A with itself).

        Gives the same sums as :meth:`update` on the features the grams came from.
        """
        names_b = ga.names if gb is None else gb.names
        for which, got, names in (("A", ga.names, self.names_a), ("B", names_b, self.names_b)):
            if names is not None and got != names:
                raise FeatureError(f"model {which}: layers differ from the first batch ({got} vs {names})")
        if self.names_a is None:
            self.names_a, self.names_b = list(ga.names), list(names_b)
        self._add(self.batch_terms(ga, gb))

    def _add(self, t: BatchTerms) -> None:
        if self._cross is None:
            self._cross, self._self_a, self._self_b = t.cross.clone(), t.self_a.clone(), t.self_b.clone()
            self._degenerate_a = t.degenerate_a.to(torch.int64)
            self._degenerate_b = t.degenerate_b.to(torch.int64)
        else:
            self._cross += t.cross
            self._self_a += t.self_a  # type: ignore[operator]
            self._self_b += t.self_b  # type: ignore[operator]
            self._degenerate_a += t.degenerate_a  # type: ignore[operator]
            self._degenerate_b += t.degenerate_b  # type: ignore[operator]
        if self.keep_batches:
            self._batches.append((t.cross, t.self_a, t.self_b))
        if t.sigma_a is not None:
            self._sigmas.append((t.sigma_a, t.sigma_b))  # type: ignore[arg-type]
        self.batch_sizes.append(t.n)

    # -- results ---------------------------------------------------------------------------

    def compute(self) -> CKAResult:
        """The CKA matrix from every batch so far.

        Warns once, naming the layers, when a layer had no usable batch (its row or column
        is NaN) or was degenerate in some batches.

        Raises:
            FeatureError: if no batch was large enough for the estimator.
        """
        if self._cross is None:
            raise FeatureError(
                f"no batch with at least {min_samples(self.estimator)} samples was seen "
                f"({self.samples_skipped} samples skipped)"
            )
        cross = self._cross.cpu().numpy()
        self_a = self._self_a.cpu().numpy()  # type: ignore[union-attr]
        self_b = self._self_b.cpu().numpy()  # type: ignore[union-attr]
        deg_a = self._degenerate_a.cpu().numpy()  # type: ignore[union-attr]
        deg_b = self._degenerate_b.cpu().numpy()  # type: ignore[union-attr]
        matrix = cka_from_sums(cross, self_a, self_b)
        warn_degenerate(self.names_a, self.names_b, self_a, self_b, deg_a, deg_b, len(self.batch_sizes))  # type: ignore[arg-type]
        bc = bsa = bsb = None
        if self.keep_batches:
            bc = torch.stack([b[0] for b in self._batches]).cpu().numpy()
            bsa = torch.stack([b[1] for b in self._batches]).cpu().numpy()
            bsb = torch.stack([b[2] for b in self._batches]).cpu().numpy()
        sa = sb = None
        if self._sigmas:
            sa = torch.stack([s[0] for s in self._sigmas]).cpu().numpy()
            sb = torch.stack([s[1] for s in self._sigmas]).cpu().numpy()
        names_a, names_b = list(self.names_a), list(self.names_b)  # type: ignore[arg-type]
        return CKAResult(
            names_a, names_b, matrix, cross, self_a, self_b,  # sums
            bc, bsa, bsb, list(self.batch_sizes),  # per batch
            samples=int(sum(self.batch_sizes)), samples_skipped=self.samples_skipped,
            kernel=self.kernel, estimator=self.estimator,
            rbf_frac=self.rbf_frac if self.kernel == "rbf" else None,
            sigma_a=sa, sigma_b=sb, degenerate_a=deg_a, degenerate_b=deg_b,
        )


def warn_degenerate(
    names_a: list[str],
    names_b: list[str],
    self_a: np.ndarray,
    self_b: np.ndarray,
    deg_a: np.ndarray,
    deg_b: np.ndarray,
    batches: int,
) -> None:
    """Warn once for the layers with no usable batch (NaN), once for partly degenerate ones."""

    def pick(names: list[str], selfs: np.ndarray, deg: np.ndarray) -> tuple[list[str], list[str]]:
        undefined = [n for n, s in zip(names, selfs, strict=True) if not s > 0]
        partly = [f"{n} ({int(d)} of {batches})" for n, s, d in zip(names, selfs, deg, strict=True) if s > 0 and d]
        return undefined, partly

    def short(items: list[str]) -> str:
        return str(items) if len(items) <= 6 else f"{items[:3]} and {len(items) - 3} more".replace("]", ", ...]", 1)

    und_a, part_a = pick(names_a, self_a, deg_a)
    und_b, part_b = pick(names_b, self_b, deg_b)
    if und_a or und_b:
        warnings.warn(
            "constant representation (or one at the round-off level of its dtype, or an RBF bandwidth too "
            f"narrow for it) in every batch, CKA undefined (NaN): model A {short(und_a)}, model B {short(und_b)}",
            RuntimeWarning,
            stacklevel=3,
        )
    if part_a or part_b:
        warnings.warn(
            "constant or round-off-level representation in some batches, which count as 0: "
            f"model A {short(part_a)}, model B {short(part_b)}",
            RuntimeWarning,
            stacklevel=3,
        )


def cka_matrix(
    feats_a: Mapping[str, torch.Tensor],
    feats_b: Mapping[str, torch.Tensor] | None = None,
    *,
    kernel: Kernel = "linear",
    estimator: Estimator = "unbiased",
    rbf_frac: float = DEFAULT_RBF_FRAC,
    batch_size: int | None = None,
) -> CKAResult:
    """CKA between all layers of A and B from features of every sample held in memory.

    With ``batch_size=None`` this is full-batch CKA (biased: Kornblith et al. 2019;
    unbiased: debiased CKA); otherwise the samples are split into consecutive minibatches.
    """
    n = next(iter(feats_a.values())).shape[0]
    if batch_size is not None and batch_size < 1:
        raise UsageError(f"batch_size must be positive, got {batch_size}")
    step = n if batch_size is None else batch_size
    acc = MinibatchCKA(kernel=kernel, estimator=estimator, rbf_frac=rbf_frac)
    for start in range(0, n, max(step, 1)):
        sl = slice(start, start + step)
        acc.update(
            {k: v[sl] for k, v in feats_a.items()},
            None if feats_b is None else {k: v[sl] for k, v in feats_b.items()},
        )
    return acc.compute()




__all__ = [
    "BatchGrams",
    "BatchTerms",
    "CKAResult",
    "MinibatchCKA",
    "cka_from_sums",
    "cka_matrix",
    "full_fp32_matmul",
    "too_small",
]
