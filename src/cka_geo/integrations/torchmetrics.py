"""Minibatch CKA as a ``torchmetrics.Metric`` (optional extra: ``pip install cka-geo[metrics]``).

:class:`CKAMetric` is a thin stateful wrapper of the functional core
(:func:`cka_geo.functional.minibatch.batch_grams` and
:func:`~cka_geo.functional.minibatch.batch_terms`, which
:class:`cka_geo.accumulator.MinibatchCKA` sums too): states are the float64 sums of the
cross terms (L_A × L_B), the self terms of A (L_A) and of B (L_B), the counts of degenerate
batches per layer, and sample/batch counts, all reduced with ``"sum"``. Synchronising across processes therefore adds the very numbers
one process would have added.

What does and does not depend on batching (minibatch CKA, Nguyen et al. 2021):

* The result is a function of the *set of minibatches*: the same batches give the same CKA
  however they are grouped into ``update`` calls, ordered, or spread over processes (equal up
  to the rounding of float64 additions done in another order, ~1e-15 relative; bit-identical
  to :class:`~cka_geo.accumulator.MinibatchCKA` for the same batches in the same order).
* It is *not* a function of the samples alone: each batch contributes its own unbiased
  HSIC_1 estimate, so splitting the same samples into other batches (another batch size)
  gives another, equally consistent, estimate of the same population CKA. The values differ
  by sampling noise, not by a bias, and agree as batches grow. Keep the batch size fixed
  when comparing numbers.

Example:
    >>> import torch
    >>> metric = CKAMetric(["fc1", "block"], ["fc1", "block"])
    >>> for _ in range(3):
    ...     x = torch.randn(16, 8)
    ...     metric.update({"fc1": x, "block": x.tanh()}, {"fc1": 2 * x, "block": x + 1})
    >>> out = metric.compute()
    >>> out["matrix"].shape, metric.diagonal_names
    (torch.Size([2, 2]), ['fc1', 'block'])
    >>> round(float(out["diagonal"][0]), 6)
    1.0
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torchmetrics import Metric

from cka_geo.accumulator import CKAResult, warn_degenerate
from cka_geo.errors import FeatureError, UsageError
from cka_geo.functional.kernels import (
    DEFAULT_RBF_FRAC,
    Estimator,
    Kernel,
    check_kernel,
    min_samples,
)
from cka_geo.functional.minibatch import (
    batch_grams,
    batch_terms,
    check_batch,
    check_rbf_frac,
    cka_from_sums,
    too_small,
)

DEFAULT_NAME = "features"
"""Layer name of features passed as a bare tensor when no names were given."""


class CKAMetric(Metric):
    """Minibatch CKA between every layer of model A and every layer of model B.

    Args:
        names_a: Layer names of model A (rows), fixing the state sizes now. Give them for
            distributed use: a process that saw no batch must still hold states of the right
            shape. None: taken from the first ``update``.
        names_b: Layer names of model B (columns); default ``names_a``.
        kernel: ``"linear"`` or ``"rbf"``.
        estimator: ``"unbiased"`` (HSIC_1, the minibatch estimator) or ``"biased"``.
        rbf_frac: RBF bandwidth fraction (median rule, per batch and layer).
        gram_dtype: dtype of the feature matmuls (see
            :class:`~cka_geo.accumulator.MinibatchCKA`); sums are float64 always.
        **kwargs: Passed to ``torchmetrics.Metric`` (``sync_on_compute``,
            ``process_group``, ...).

    Attributes:
        names_a, names_b: Layer names (None until known).
        diagonal_names: Names present in both A and B, in A's order (the ``diagonal``).
    """

    is_differentiable = False
    higher_is_better = None
    full_state_update = False

    cross: Tensor
    self_a: Tensor
    self_b: Tensor
    samples: Tensor
    samples_skipped: Tensor
    batches: Tensor

    def __init__(
        self,
        names_a: Sequence[str] | None = None,
        names_b: Sequence[str] | None = None,
        *,
        kernel: Kernel = "linear",
        estimator: Estimator = "unbiased",
        rbf_frac: float = DEFAULT_RBF_FRAC,
        gram_dtype: torch.dtype | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        check_kernel(kernel, estimator)
        check_rbf_frac(kernel, rbf_frac)
        self._kernel, self._estimator, self.rbf_frac, self.gram_dtype = kernel, estimator, rbf_frac, gram_dtype
        for which, names in (("names_a", names_a), ("names_b", names_b)):
            if names is not None and (isinstance(names, str) or not names or len(set(names)) != len(names)):
                raise UsageError(f"CKAMetric: {which} must be a non-empty sequence of distinct names, got {names!r}")
        self.names_a: list[str] | None = list(names_a) if names_a is not None else None
        self.names_b: list[str] | None = list(names_b) if names_b is not None else self.names_a
        la = len(self.names_a) if self.names_a else 0
        lb = len(self.names_b) if self.names_b else 0
        f64 = torch.float64
        self.add_state("cross", default=torch.zeros(la, lb, dtype=f64), dist_reduce_fx="sum")
        self.add_state("self_a", default=torch.zeros(la, dtype=f64), dist_reduce_fx="sum")
        self.add_state("self_b", default=torch.zeros(lb, dtype=f64), dist_reduce_fx="sum")
        self.add_state("degenerate_a", default=torch.zeros(la, dtype=torch.int64), dist_reduce_fx="sum")
        self.add_state("degenerate_b", default=torch.zeros(lb, dtype=torch.int64), dist_reduce_fx="sum")
        self.add_state("samples", default=torch.zeros((), dtype=torch.int64), dist_reduce_fx="sum")
        self.add_state("samples_skipped", default=torch.zeros((), dtype=torch.int64), dist_reduce_fx="sum")
        self.add_state("batches", default=torch.zeros((), dtype=torch.int64), dist_reduce_fx="sum")

    @property
    def kernel(self) -> str:
        """The kernel."""
        return self._kernel

    @property
    def estimator(self) -> str:
        """The HSIC estimator."""
        return self._estimator

    @property
    def diagonal_names(self) -> list[str]:
        """Layer names in both A and B, in A's order."""
        if self.names_a is None or self.names_b is None:
            return []
        return [n for n in self.names_a if n in self.names_b]

    # -- update ----------------------------------------------------------------------------

    @staticmethod
    def _as_mapping(
        feats: Mapping[str, Tensor] | Tensor, names: list[str] | None, which: str
    ) -> dict[str, Tensor]:
        if isinstance(feats, Tensor):
            if names is not None and len(names) != 1:
                raise FeatureError(
                    f"model {which}: a bare tensor was given but the metric has {len(names)} layers; pass a mapping"
                )
            out = {names[0] if names else DEFAULT_NAME: feats}
        elif isinstance(feats, Mapping) and feats:
            out = dict(feats)
            if names is not None and list(out) != names:
                if set(out) != set(names):
                    raise FeatureError(
                        f"model {which}: layers {sorted(out)} differ from the metric's {sorted(names)}"
                    )
                out = {n: out[n] for n in names}
        else:
            raise FeatureError(f"model {which}: expected a tensor or a non-empty mapping name -> tensor")
        return {k: v.detach() if isinstance(v, Tensor) else v for k, v in out.items()}

    def _size_states(self, la: int, lb: int) -> None:
        dev = self.cross.device
        if self.cross.shape != (la, lb):
            self.cross = torch.zeros(la, lb, dtype=torch.float64, device=dev)
            self.self_a = torch.zeros(la, dtype=torch.float64, device=dev)
            self.self_b = torch.zeros(lb, dtype=torch.float64, device=dev)
            self.degenerate_a = torch.zeros(la, dtype=torch.int64, device=dev)
            self.degenerate_b = torch.zeros(lb, dtype=torch.int64, device=dev)

    def update(
        self, features_a: Mapping[str, Tensor] | Tensor, features_b: Mapping[str, Tensor] | Tensor | None = None
    ) -> None:
        """Add one minibatch.

        Args:
            features_a: Layer name -> (n, p) features of model A (or one (n, p) tensor).
            features_b: The same for model B, rows for the same samples in the same order;
                None compares A with itself.
        """
        fa = self._as_mapping(features_a, self.names_a, "A")
        if features_b is None and self.names_b is not None and self.names_b != self.names_a:
            raise FeatureError("features_b is None (A against itself) but the metric's B layers differ from A's")
        fb = None if features_b is None else self._as_mapping(features_b, self.names_b, "B")
        first = next(iter(fa.values()))
        n = first.shape[0] if isinstance(first, Tensor) and first.ndim >= 1 else 0
        if too_small(n, self.estimator):
            self.samples_skipped += n
            return
        fa, _ = check_batch(fa, "A")
        fb = None if fb is None else check_batch(fb, "B")[0]
        def grams(feats: dict[str, Tensor]) -> Any:
            return batch_grams(feats, kernel=self.kernel, estimator=self.estimator, rbf_frac=self.rbf_frac,
                               gram_dtype=self.gram_dtype)

        ga = grams(fa)
        gb = None if fb is None else grams(fb)
        terms = batch_terms(ga, gb, estimator=self.estimator, batch=int(self.batches) + 1)
        if self.names_a is None:
            self.names_a = list(ga.names)
        if self.names_b is None:
            self.names_b = list((gb or ga).names)
        self._size_states(len(self.names_a), len(self.names_b))  # only on the first batch
        dev = self.cross.device
        self.cross += terms.cross.to(dev)
        self.self_a += terms.self_a.to(dev)
        self.self_b += terms.self_b.to(dev)
        self.degenerate_a += terms.degenerate_a.to(dev)
        self.degenerate_b += terms.degenerate_b.to(dev)
        self.samples += terms.n
        self.batches += 1

    def _reduce_states(self, incoming_state: dict[str, Any]) -> None:
        # States sized by the first update: a side that has seen no batch yet holds empty
        # sums, which stand for zeros of the other side's shape.
        fixed = dict(incoming_state)
        for attr in ("cross", "self_a", "self_b", "degenerate_a", "degenerate_b"):
            local, other = getattr(self, attr), fixed.get(attr)
            if isinstance(other, Tensor) and other.shape != local.shape:
                if other.numel() == 0:
                    fixed[attr] = torch.zeros_like(local)
                elif local.numel() == 0:
                    setattr(self, attr, torch.zeros_like(other))
        super()._reduce_states(fixed)

    # -- results ---------------------------------------------------------------------------

    def compute(self) -> dict[str, Tensor]:
        """The CKA matrix and its diagonal.

        Returns:
            ``{"matrix": (L_A, L_B) float64, "diagonal": (len(diagonal_names),) float64}``
            (NaN for a constant layer), on the metric's device.

        Raises:
            FeatureError: If no batch was large enough for the estimator.
        """
        if int(self.batches) == 0 or self.names_a is None:
            raise FeatureError(
                f"CKAMetric: no batch with at least {min_samples(self.estimator)} samples was seen "
                f"({int(self.samples_skipped)} samples skipped)"
            )
        self_a, self_b = self.self_a.cpu().numpy(), self.self_b.cpu().numpy()
        matrix = cka_from_sums(self.cross.cpu().numpy(), self_a, self_b)
        names_b = self.names_b or self.names_a
        warn_degenerate(self.names_a, names_b, self_a, self_b, self.degenerate_a.cpu().numpy(),
                        self.degenerate_b.cpu().numpy(), int(self.batches))
        col = {n: j for j, n in enumerate(names_b)}
        diag = np.array([matrix[i, col[n]] for i, n in enumerate(self.names_a) if n in col], dtype=np.float64)
        dev = self.cross.device
        return {"matrix": torch.from_numpy(matrix).to(dev), "diagonal": torch.from_numpy(diag).to(dev)}

    def to_result(self) -> CKAResult:
        """The current sums as a :class:`~cka_geo.accumulator.CKAResult` (no per-batch terms)."""
        out = self.compute()
        return CKAResult(
            names_a=list(self.names_a or []),
            names_b=list(self.names_b or self.names_a or []),
            matrix=out["matrix"].cpu().numpy(),
            cross=self.cross.cpu().numpy(),
            self_a=self.self_a.cpu().numpy(),
            self_b=self.self_b.cpu().numpy(),
            batch_cross=None,
            batch_self_a=None,
            batch_self_b=None,
            batch_sizes=[],
            samples=int(self.samples),
            samples_skipped=int(self.samples_skipped),
            kernel=self.kernel,
            estimator=self.estimator,
            rbf_frac=self.rbf_frac if self.kernel == "rbf" else None,
            degenerate_a=self.degenerate_a.cpu().numpy(),
            degenerate_b=self.degenerate_b.cpu().numpy(),
            extra={"batches": int(self.batches)},
        )

    def diagonal_dict(self, prefix: str = "cka/") -> dict[str, float]:
        """``{prefix + name: same-layer CKA}``, ready for a logger."""
        diag = self.compute()["diagonal"].tolist()
        return {f"{prefix}{n}": v for n, v in zip(self.diagonal_names, diag, strict=True)}


__all__ = ["DEFAULT_NAME", "CKAMetric"]
