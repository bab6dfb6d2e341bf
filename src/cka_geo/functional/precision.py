"""Where floating-point arithmetic ends: exact rescaling and the round-off thresholds.

CKA is invariant to scaling either representation, so a layer's features can be
multiplied, per batch, by a power of two that brings their largest magnitude into
[0.5, 1) before any gram. A power of two scales exactly in binary floating point, so this
changes no digit for ordinary magnitudes, while magnitudes from 1e-30 to 1e30 neither
underflow nor overflow a float32 gram; the HSIC terms are scaled back, exactly, in float64.
The engine's fast path (:mod:`cka_geo.functional.batched`) skips the scaling pass where the
gram's largest diagonal entry lies in [2⁻⁴⁰, 2⁴⁰] (scale 1: the same digits) and redoes the
layers outside it scaled.

Two thresholds turn round-off into NaN instead of a made-up number (both stated in
README and tested against the float64 reference in tests/test_reliability_numerics.py):

* **Constant.** A batch of a layer is constant when its mean-centred features hold almost
  none of its raw energy, ``‖X − 1μᵀ‖_F ≤ τ ‖X‖_F``, with τ = :data:`CONSTANT_TOL` for
  float32 (about 80 float32 rounding units: what the rows of one image repeated through a
  float32 forward pass differ by), ``max(CONSTANT_TOL, 8 eps)`` for float16 and bfloat16,
  and :data:`CONSTANT_TOL_FLOAT64` for float64 features. What is left after centering is
  then the forward pass's rounding, not a representation.
* **Round-off level.** A batch's HSIC self term is at the round-off level of its gram when
  ``n(n−3) HSIC_1(K, K) ≤ ρ ‖K̃‖²_F`` (biased: ``(n−1)² HSIC(K, K) ≤ ρ ‖K‖²_F``): all the
  terms of Song's estimator are of the size of ‖K̃‖²_F, so a self term below that fraction
  of it is their cancellation. ρ = :data:`NOISE_TOL` for float32 grams and
  :data:`NOISE_TOL_FLOAT64` for float64 grams. This catches a too narrow RBF bandwidth
  (the gram is numerically the identity) and representations whose grams U-centering
  annihilates.

Such a batch is exactly constant (HSIC 0) in exact arithmetic, or indistinguishable from
it in the arithmetic used, so its HSIC terms count as 0; a layer with no batch above the
thresholds has CKA NaN, with a warning naming it.
"""

from __future__ import annotations

import torch

#: τ for float32 (and narrower, at least 8 eps) features: ‖X_c‖_F ≤ τ ‖X‖_F is constant.
CONSTANT_TOL = 1e-5
#: τ for float64 features.
CONSTANT_TOL_FLOAT64 = 1e-10
#: ρ for float32 grams: a self term n(n−3)·HSIC ≤ ρ ‖K̃‖²_F is round-off.
NOISE_TOL = 1e-4
#: ρ for float64 grams.
NOISE_TOL_FLOAT64 = 1e-11

# The scaled features' exponent is kept within float32's normal range.
_MAX_EXPONENT = 120


def constant_tol(dtype: torch.dtype) -> float:
    """τ of the constant-representation rule for features of ``dtype``."""
    if dtype == torch.float64:
        return CONSTANT_TOL_FLOAT64
    return max(CONSTANT_TOL, 8 * torch.finfo(dtype).eps)


def noise_tol(dtype: torch.dtype) -> float:
    """ρ of the round-off-level rule for grams of ``dtype``."""
    return NOISE_TOL_FLOAT64 if dtype == torch.float64 else NOISE_TOL


def pow2_scale(amax: torch.Tensor) -> torch.Tensor:
    """Powers of two ``2^-e`` that bring ``amax = m 2^e`` (m in [0.5, 1)) into [0.5, 1).

    Args:
        amax: Largest magnitudes, any shape (float).

    Returns:
        float64, amax's shape; 1 where amax is 0, NaN or Inf (left for the callers' checks).
    """
    amax = amax.to(torch.float64)
    _, e = torch.frexp(amax)
    e = e.clamp(-_MAX_EXPONENT, _MAX_EXPONENT)
    scale = torch.ldexp(torch.ones_like(amax), -e)
    ok = torch.isfinite(amax) & (amax > 0)
    return torch.where(ok, scale, torch.ones_like(scale))


def is_constant(centred_sq: torch.Tensor, raw_sq: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The constant rule: ``‖X_c‖²_F ≤ τ² ‖X‖²_F`` (both squared norms given), elementwise."""
    return centred_sq <= constant_tol(dtype) ** 2 * raw_sq


__all__ = [
    "CONSTANT_TOL",
    "CONSTANT_TOL_FLOAT64",
    "NOISE_TOL",
    "NOISE_TOL_FLOAT64",
    "constant_tol",
    "is_constant",
    "noise_tol",
    "pow2_scale",
]
