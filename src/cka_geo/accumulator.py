"""Minibatch CKA for every pair of layers at once (Nguyen, Raghu & Kornblith 2021, eq. 3).

Over minibatches k::

    CKA(a, b) = Σ_k HSIC(K_k^a, L_k^b) / sqrt(Σ_k HSIC(K_k^a, K_k^a) · Σ_k HSIC(L_k^b, L_k^b))

with HSIC the unbiased HSIC_1 of Song et al. (2012) by default. Memory does not depend on
the number of samples: per batch each layer's gram is made once, U-centred, flattened and
stacked into (L_A, b²) and (L_B, b²); every cross term of the L_A × L_B matrix is then one
matrix product and the self terms are squared row norms. The features are dropped as soon as
their gram exists. Sums are float64; nothing is clamped and no epsilon is added.

Both models must see the same samples in the same order (in eval mode).

Small batches: the unbiased estimator needs n >= 4 rows (the biased one n >= 2). A batch
with fewer rows (typically the last one) is skipped with a warning and counted in
``CKAResult.samples_skipped``; it never produces NaN. Choose a batch size that divides the
sample count to use every sample.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from cka_geo.errors import FeatureError, UsageError
from cka_geo.functional import (
    DEFAULT_RBF_FRAC,
    Estimator,
    Kernel,
    check_kernel,
    gram_rbf,
    min_samples,
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


#: Largest stack of one width's features made at once for the batched gram matmul.
_STACK_BYTES = 64 << 20


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

    The documented rule for small batches (typically the last one): skip it with a warning,
    never produce NaN. Callers count the skipped samples.
    """
    if n >= min_samples(estimator):
        return False
    warnings.warn(
        f"skipping a batch of {n} samples: the {estimator} estimator needs at least {min_samples(estimator)}",
        RuntimeWarning,
        stacklevel=3,
    )
    return True


def cka_from_sums(cross: np.ndarray, self_a: np.ndarray, self_b: np.ndarray) -> np.ndarray:
    """``cross / sqrt(self_a ⊗ self_b)``, NaN where a self term is 0 (constant layer)."""
    denom = np.sqrt(np.multiply.outer(self_a, self_b))
    with np.errstate(divide="ignore", invalid="ignore"):
        out = cross / denom
    return np.where(denom > 0, out, np.nan)


@dataclass
class BatchGrams:
    """One model's grams for one batch, ready for :meth:`MinibatchCKA.batch_terms`.

    Made by :meth:`MinibatchCKA.prepare`. A reference model's grams can be prepared once and
    reused against many other models (e.g. a training model at every logging step).

    Attributes:
        names: Layer names, in order.
        n: Rows (samples) of the batch.
        grams: (L, n, n) grams (zero diagonal for the unbiased estimator; RBF grams shifted
            by their mean).
        rows: (L, n) float64 row sums of the grams.
        total: (L,) float64 sums of the grams.
        sq: (L,) float64 squared Frobenius norms of the grams.
        sigma: (L,) float64 RBF sigmas, or None for the linear kernel.
        feats: The features the grams came from, kept only to word an error message; None
            for prepared grams meant to be kept.
    """

    names: list[str]
    n: int
    grams: torch.Tensor
    rows: torch.Tensor
    total: torch.Tensor
    sq: torch.Tensor
    sigma: torch.Tensor | None = None
    feats: Mapping[str, torch.Tensor] | None = None

    def to(self, device: torch.device | str) -> BatchGrams:
        """The same grams on ``device`` (``self`` if already there)."""
        if self.grams.device == torch.device(device):
            return self
        sigma = None if self.sigma is None else self.sigma.to(device)
        return BatchGrams(self.names, self.n, self.grams.to(device), self.rows.to(device),
                          self.total.to(device), self.sq.to(device), sigma, None)


@dataclass
class BatchTerms:
    """The HSIC terms of one batch: what :class:`MinibatchCKA` sums.

    Attributes:
        cross: (L_A, L_B) float64 HSIC(K^a, L^b).
        self_a: (L_A,) float64 HSIC(K^a, K^a).
        self_b: (L_B,) float64 HSIC(L^b, L^b).
        n: Rows of the batch.
        sigma_a: (L_A,) RBF sigmas of A, or None.
        sigma_b: (L_B,) RBF sigmas of B, or None.
    """

    cross: torch.Tensor
    self_a: torch.Tensor
    self_b: torch.Tensor
    n: int
    sigma_a: torch.Tensor | None = None
    sigma_b: torch.Tensor | None = None


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
        if kernel == "rbf" and not rbf_frac > 0:
            raise UsageError(f"rbf_frac must be positive, got {rbf_frac}")
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
        self._batches: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self._sigmas: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._buffers: dict[str, torch.Tensor] = {}
        self.batch_sizes: list[int] = []
        self.samples_skipped = 0

    # -- per batch -------------------------------------------------------------------------

    def _validate(
        self, feats: Mapping[str, torch.Tensor], which: str, names: list[str] | None
    ) -> tuple[list[str], int]:
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
        n = None
        for name, x in feats.items():
            if not isinstance(x, torch.Tensor) or x.ndim != 2 or not x.is_floating_point():
                desc = f"shape {tuple(x.shape)} {x.dtype}" if isinstance(x, torch.Tensor) else type(x).__name__
                raise FeatureError(
                    f"layer {name!r} of model {which}: expected a floating (samples, features) tensor, got {desc}"
                )
            if n is None:
                n = x.shape[0]
            elif x.shape[0] != n:
                raise FeatureError(
                    f"layer {name!r} of model {which} has {x.shape[0]} samples, others have {n}"
                )
        return got, int(n)  # type: ignore[arg-type]

    def _grams(self, feats: Mapping[str, torch.Tensor], slot: str | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Grams of every layer, (L, n, n), in a buffer reused across batches.

        Unbiased estimator: the diagonal is zeroed (K̃ of Song et al.). RBF grams have their
        mean subtracted, a constant shift that both centerings annihilate, so that the
        float32 products below do not lose digits to the grams' large constant part.
        Returns the grams and the RBF sigmas (L,) float64 (None for the linear kernel).
        ``slot=None`` makes a fresh buffer (grams to keep) instead of reusing one.
        """
        tensors = list(feats.values())
        n, device = tensors[0].shape[0], tensors[0].device
        dtype = self.gram_dtype or (torch.float64 if all(t.dtype == torch.float64 for t in tensors) else torch.float32)
        buf = None if slot is None else self._buffers.get(slot)
        if buf is None or (buf.shape, buf.dtype, buf.device) != ((len(tensors), n, n), dtype, device):
            buf = torch.empty((len(tensors), n, n), dtype=dtype, device=device)
            if slot is not None:
                self._buffers[slot] = buf
        sigma = None
        if self.kernel == "rbf":
            sigma = torch.empty(len(tensors), dtype=torch.float64, device=device)
        # Layers of one width go through one batched matmul (much faster than one matmul per
        # layer), in chunks whose stacked features stay under _STACK_BYTES.
        groups: dict[int, list[int]] = {}
        for i, x in enumerate(tensors):
            groups.setdefault(x.shape[1], []).append(i)
        itemsize = torch.empty((), dtype=dtype).element_size()
        for width, members in groups.items():
            step = max(1, _STACK_BYTES // (n * width * itemsize))
            for start in range(0, len(members), step):
                idx = members[start : start + step]
                x = torch.stack([tensors[i].to(dtype) for i in idx])
                consecutive = idx == list(range(idx[0], idx[0] + len(idx)))
                if self.kernel == "linear":
                    x -= x.mean(dim=1, keepdim=True)
                    if consecutive:  # straight into the buffer
                        torch.bmm(x, x.transpose(1, 2), out=buf[idx[0] : idx[0] + len(idx)])
                        continue
                    g = torch.bmm(x, x.transpose(1, 2))
                else:
                    g, s = gram_rbf(x, self.rbf_frac)
                    g -= g.mean(dim=(1, 2), keepdim=True)
                    sigma[idx] = s  # type: ignore[index]
                buf.index_copy_(0, torch.tensor(idx, device=device), g)
                del x, g
        if self.estimator == "unbiased":
            buf.diagonal(dim1=-2, dim2=-1).zero_()
        return buf, sigma

    @staticmethod
    def _terms(k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Row sums (L, n), totals (L,) and squared Frobenius norms (L,) of grams, float64."""
        rows = k.sum(-1).to(torch.float64)  # n terms per row in the grams dtype; no float64 copy of K
        sq = torch.linalg.vector_norm(k, dim=-1).to(torch.float64).square().sum(-1)
        return rows, rows.sum(-1), sq

    @staticmethod
    def _frobenius(ka: torch.Tensor, kb: torch.Tensor) -> torch.Tensor:
        """All ⟨K_a, K_b⟩_F as one batched product over gram rows, summed in float64.

        Row i of every gram of A against row i of every gram of B: (n, L_A, n) @ (n, n, L_B).
        Each float32 partial sum runs over n terms only; the n partials add in float64.
        """
        part = torch.bmm(ka.permute(1, 0, 2), kb.permute(1, 2, 0))
        return part.sum(0, dtype=torch.float64)

    def _raise_nonfinite(self, g: BatchGrams, self_terms: torch.Tensor, which: str) -> None:
        bad = (~torch.isfinite(self_terms)).nonzero().flatten().tolist()
        name = g.names[bad[0]]
        if g.feats is None:
            what = "NaN or Inf values, or values too large for the gram's dtype,"
        elif not torch.isfinite(g.feats[name]).all():
            what = "NaN or Inf values"
        else:
            what = "values too large for the gram's dtype"
        raise FeatureError(
            f"layer {name!r} of model {which} has {what} in its features (batch {len(self.batch_sizes) + 1})"
        )

    def prepare(
        self, feats: Mapping[str, torch.Tensor], which: str = "A", *, keep: bool = True
    ) -> BatchGrams:
        """Grams and their sums for one model's features of one batch.

        Args:
            feats: Layer name -> features (n, p_layer).
            which: ``"A"`` or ``"B"``, for error messages.
            keep: Give the grams their own memory (to keep them, e.g. a reference model's
                grams reused at every step). ``False`` reuses this accumulator's buffer for
                ``which``: valid only until the next ``prepare`` of the same ``which``.

        Raises:
            FeatureError: Bad features, or fewer rows than the estimator needs.
        """
        names, n = self._validate(feats, which, None)
        if n < min_samples(self.estimator):
            raise FeatureError(
                f"model {which}: a batch of {n} samples; the {self.estimator} estimator needs at "
                f"least {min_samples(self.estimator)}"
            )
        return self._prepare(feats, names, n, None if keep else which.lower())

    def _prepare(
        self, feats: Mapping[str, torch.Tensor], names: list[str], n: int, slot: str | None
    ) -> BatchGrams:
        with full_fp32_matmul():
            k, sigma = self._grams(feats, slot)
        rows, tot, sq = self._terms(k)
        return BatchGrams(names, n, k, rows, tot, sq, sigma, feats if slot is not None else None)

    def batch_terms(self, ga: BatchGrams, gb: BatchGrams | None = None) -> BatchTerms:
        """HSIC terms of one batch from prepared grams (``gb=None``: A against itself).

        This is the whole per-batch computation of :meth:`update`, which sums its result;
        other accumulators (the torchmetrics Metric, the training monitor) sum the same
        terms.

        Raises:
            FeatureError: Different row counts, or a non-finite self term (NaN/Inf
                features, or values too large for the gram's dtype).
        """
        self_compare = gb is None or gb is ga
        gb = ga if gb is None else gb
        if ga.n != gb.n:
            raise FeatureError(f"model A has {ga.n} samples in this batch but model B has {gb.n}")
        n = ga.n
        frob = self._frobenius(ga.grams, gb.grams)
        rows_a, tot_a, sq_a = ga.rows, ga.total, ga.sq
        rows_b, tot_b, sq_b = gb.rows, gb.total, gb.sq
        if self.estimator == "unbiased":
            # Song et al. (2012), eq. 5, with K̃, L̃ the zero-diagonal grams:
            # n(n-3) HSIC_1 = tr(K̃L̃) + (1ᵀK̃1)(1ᵀL̃1)/((n-1)(n-2)) - 2/(n-2) 1ᵀK̃L̃1
            c1, c2, norm = 1.0 / ((n - 1) * (n - 2)), 2.0 / (n - 2), n * (n - 3)
        else:
            # tr(KHLH) = tr(KL) - 2/n 1ᵀKL1 + (1ᵀK1)(1ᵀL1)/n², over (n-1)²
            c1, c2, norm = 1.0 / n**2, 2.0 / n, (n - 1) ** 2
        cross = (frob + c1 * torch.outer(tot_a, tot_b) - c2 * rows_a @ rows_b.T) / norm
        self_a = (sq_a + c1 * tot_a.square() - c2 * rows_a.square().sum(-1)) / norm
        self_b = self_a if self_compare else (sq_b + c1 * tot_b.square() - c2 * rows_b.square().sum(-1)) / norm

        # One host sync per batch: a NaN/Inf anywhere shows up in the self terms.
        finite = torch.isfinite(torch.cat([self_a, self_b])).all()
        if not bool(finite):
            if not torch.isfinite(self_a).all():
                self._raise_nonfinite(ga, self_a, "A")
            self._raise_nonfinite(gb, self_b, "B")
        return BatchTerms(cross, self_a, self_b, n, ga.sigma, gb.sigma)

    def update(
        self, feats_a: Mapping[str, torch.Tensor], feats_b: Mapping[str, torch.Tensor] | None = None
    ) -> None:
        """Add one minibatch.

        Args:
            feats_a: Layer name -> features (n, p_layer) of model A for this batch.
            feats_b: The same for model B, rows for the same samples in the same order.
                None compares A with itself (the matrix is then symmetric).
        """
        self_compare = feats_b is None
        names_a, n = self._validate(feats_a, "A", self.names_a)
        if self_compare:
            names_b, n_b = names_a, n
        else:
            names_b, n_b = self._validate(feats_b, "B", self.names_b)  # type: ignore[arg-type]
        if n != n_b:
            raise FeatureError(f"model A has {n} samples in this batch but model B has {n_b}")
        if self.names_a is None:
            self.names_a, self.names_b = names_a, names_b
        if too_small(n, self.estimator):
            self.samples_skipped += n
            return
        ga = self._prepare(feats_a, names_a, n, "a")
        gb = None if self_compare else self._prepare(feats_b, names_b, n, "b")  # type: ignore[arg-type]
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
        else:
            self._cross += t.cross
            self._self_a += t.self_a  # type: ignore[operator]
            self._self_b += t.self_b  # type: ignore[operator]
        if self.keep_batches:
            self._batches.append((t.cross, t.self_a, t.self_b))
        if t.sigma_a is not None:
            self._sigmas.append((t.sigma_a, t.sigma_b))  # type: ignore[arg-type]
        self.batch_sizes.append(t.n)

    # -- results ---------------------------------------------------------------------------

    def compute(self) -> CKAResult:
        """The CKA matrix from every batch so far.

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
        matrix = cka_from_sums(cross, self_a, self_b)
        zero_a = [n for n, v in zip(self.names_a, self_a, strict=True) if not v > 0]  # type: ignore[arg-type]
        zero_b = [n for n, v in zip(self.names_b, self_b, strict=True) if not v > 0]  # type: ignore[arg-type]
        if zero_a or zero_b:
            warnings.warn(
                f"constant representation (zero self-HSIC), CKA undefined (NaN): model A {zero_a}, model B {zero_b}",
                RuntimeWarning,
                stacklevel=2,
            )
        bc = bsa = bsb = None
        if self.keep_batches:
            bc = torch.stack([b[0] for b in self._batches]).cpu().numpy()
            bsa = torch.stack([b[1] for b in self._batches]).cpu().numpy()
            bsb = torch.stack([b[2] for b in self._batches]).cpu().numpy()
        sa = sb = None
        if self._sigmas:
            sa = torch.stack([s[0] for s in self._sigmas]).cpu().numpy()
            sb = torch.stack([s[1] for s in self._sigmas]).cpu().numpy()
        return CKAResult(
            names_a=list(self.names_a),  # type: ignore[arg-type]
            names_b=list(self.names_b),  # type: ignore[arg-type]
            matrix=matrix,
            cross=cross,
            self_a=self_a,
            self_b=self_b,
            batch_cross=bc,
            batch_self_a=bsa,
            batch_self_b=bsb,
            batch_sizes=list(self.batch_sizes),
            samples=int(sum(self.batch_sizes)),
            samples_skipped=self.samples_skipped,
            kernel=self.kernel,
            estimator=self.estimator,
            rbf_frac=self.rbf_frac if self.kernel == "rbf" else None,
            sigma_a=sa,
            sigma_b=sb,
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




__all__ = ["BatchGrams", "BatchTerms", "CKAResult", "MinibatchCKA", "cka_from_sums", "cka_matrix"]
