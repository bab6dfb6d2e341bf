"""The functional core: grams, centerings, HSIC estimators, CKA and the minibatch maths.

Pure functions on tensors, the torchmetrics way; the stateful accumulators
(:class:`cka_geo.accumulator.MinibatchCKA`, the torchmetrics ``CKAMetric``, the training
``CKAMonitor``) are thin wrappers that sum what :mod:`cka_geo.functional.minibatch` returns.

* :mod:`~cka_geo.functional.kernels`: linear and RBF grams, the median bandwidth rule,
  double- and U-centering.
* :mod:`~cka_geo.functional.hsic`: biased HSIC, unbiased HSIC_1, full-batch CKA, and the
  feature-space linear CKA used as an independent check.
* :mod:`~cka_geo.functional.minibatch`: one batch's grams and HSIC terms for every layer
  pair at once, and CKA from summed terms.
* :mod:`~cka_geo.functional.batched`: the bulk steps as few, large operations (grams from
  one stack, cross terms as chunked matmuls, memory-bound steps on one thread).
* :mod:`~cka_geo.functional.blocks`: symmetric grams kept as their diagonal and upper
  blocks (:attr:`BatchGrams.grams`), with their sums and Frobenius products.
* :mod:`~cka_geo.functional.precision`: exact power-of-two rescaling and the round-off
  thresholds below which a representation counts as constant.
"""

from cka_geo.functional.hsic import *  # noqa: F403
from cka_geo.functional.kernels import *  # noqa: F403
from cka_geo.functional.minibatch import (
    BatchGrams,
    BatchTerms,
    batch_grams,
    batch_terms,
    check_batch,
    cka_from_sums,
    full_fp32_matmul,
    too_small,
)

# Everything of hsic and kernels, and the minibatch core above.
__all__ = [  # noqa: F405
    "DEFAULT_RBF_FRAC",
    "ESTIMATORS",
    "KERNELS",
    "BatchGrams",
    "BatchTerms",
    "Estimator",
    "Kernel",
    "as_features",
    "batch_grams",
    "batch_terms",
    "center_features",
    "center_gram",
    "check_batch",
    "check_kernel",
    "cka",
    "cka_from_grams",
    "cka_from_sums",
    "full_fp32_matmul",
    "gram",
    "gram_linear",
    "gram_rbf",
    "hsic",
    "linear_cka_feature_space",
    "min_samples",
    "rbf_sigma",
    "squared_distances",
    "too_small",
    "u_center_gram",
]
