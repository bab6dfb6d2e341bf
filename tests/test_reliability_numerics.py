"""Never a made-up number: degenerate features, extreme magnitudes, identical inputs.

Every case is checked against the independent float64 reference in tests/reference.py, and
each round-off threshold of cka_geo.functional.precision is tested from both sides.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import reference as ref
from cka_geo.accumulator import MinibatchCKA, cka_matrix
from cka_geo.compare import UNCHANGED_TOL, summarize
from cka_geo.errors import FeatureError
from cka_geo.functional import cka
from cka_geo.functional.precision import CONSTANT_TOL, NOISE_TOL


def feats(seed: int, n: int, p: int, dtype=np.float64) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mix = rng.standard_normal((p, p)) / np.sqrt(p)
    return (rng.standard_normal((n, p)) @ mix + 0.3 * rng.standard_normal((n, p))).astype(dtype)


def run(fa: list[np.ndarray], fb: list[np.ndarray] | None, **kw) -> np.ndarray:
    """Minibatch CKA of one layer against one layer over the given batches."""
    acc = MinibatchCKA(**kw)
    for i, a in enumerate(fa):
        acc.update({"a": torch.from_numpy(a)}, None if fb is None else {"b": torch.from_numpy(fb[i])})
    return acc.compute().matrix


# -- magnitudes -------------------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(
    st.integers(-30, 30),
    st.integers(-30, 30),
    st.sampled_from([np.float32, np.float64]),
    st.sampled_from(["linear", "rbf"]),
    st.sampled_from(["unbiased", "biased"]),
)
def test_any_magnitude_from_1e_minus30_to_1e30_gives_the_float64_cka(ea, eb, dtype, kernel, estimator):
    a = [feats(1, 32, 12, dtype), feats(2, 32, 12, dtype)]
    b = [x[:, :8] ** 3 + feats(3 + i, 32, 8, dtype) for i, x in enumerate(a)]
    # A batch-to-batch change of scale (2.5x) checks that the terms are scaled back exactly.
    sa = [dtype(10.0**ea), dtype(2.5 * 10.0**ea)]
    sb = [dtype(10.0**eb), dtype(10.0**eb)]
    got = run([x * s for x, s in zip(a, sa, strict=True)], [y * s for y, s in zip(b, sb, strict=True)],
              kernel=kernel, estimator=estimator)[0, 0]
    want = ref.minibatch_cka_matrix(
        [[(x * s).astype(np.float64)] for x, s in zip(a, sa, strict=True)],
        [[(y * s).astype(np.float64)] for y, s in zip(b, sb, strict=True)],
        kernel,
        estimator,
    )[0, 0]
    assert np.isfinite(want)
    assert got == pytest.approx(want, abs=1e-6)


@pytest.mark.parametrize("mag", [1e-30, 1e-12, 1.0, 1e12, 1e30])
def test_full_batch_cka_is_magnitude_free_and_float64(mag):
    x, y = feats(4, 40, 6, np.float32) * np.float32(mag), feats(5, 40, 6, np.float32)
    want = ref.cka(x.astype(np.float64), y.astype(np.float64))
    assert cka(torch.from_numpy(x), torch.from_numpy(y)).item() == pytest.approx(want, abs=1e-12)


def test_float16_features_whose_gram_would_overflow_float16():
    x = (torch.randn(64, 16) * 300).half()  # x xᵀ ~ 1e6 > float16's 65504
    y = torch.randn(64, 16).half()
    want = ref.cka(x.double().numpy(), y.double().numpy())
    assert cka(x, y).item() == pytest.approx(want, abs=1e-10)
    acc = MinibatchCKA()
    acc.update({"x": x}, {"y": y})
    assert acc.compute().matrix[0, 0] == pytest.approx(want, abs=1e-6)


# -- identical inputs -------------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(
    st.integers(-30, 30),
    st.sampled_from(["linear", "rbf"]),
    st.sampled_from(["unbiased", "biased"]),
    st.sampled_from([1e-3, 0.1, 0.2, 0.4, 0.8, 10.0]),
    st.booleans(),
)
def test_identical_inputs_give_exactly_one_or_nan(exp, kernel, estimator, frac, float32):
    dtype = np.float32 if float32 else np.float64
    batches = [feats(10 + i, 24, 9, dtype) * dtype(10.0**exp) for i in range(3)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        got = run(batches, [b.copy() for b in batches], kernel=kernel, estimator=estimator, rbf_frac=frac)[0, 0]
        alone = run(batches, None, kernel=kernel, estimator=estimator, rbf_frac=frac)[0, 0]
        full = cka(torch.from_numpy(batches[0]), torch.from_numpy(batches[0].copy()), kernel, estimator, frac).item()
    for value in (got, alone, full):
        assert value == 1.0 or np.isnan(value), value
    if kernel == "linear" or frac >= 0.1:
        assert got == alone == full == 1.0


def test_upstream_layers_bit_identical_between_models_are_exactly_one():
    x = feats(20, 64, 16, np.float32)
    a = {"l0": torch.from_numpy(x), "l1": torch.from_numpy(np.tanh(x))}
    b = {"l0": torch.from_numpy(x.copy()), "l1": torch.from_numpy(np.tanh(x) + np.float32(1e-3) * x)}
    res = cka_matrix(a, b, batch_size=16)
    assert res.value("l0") == 1.0
    assert res.value("l1") < 1.0


# -- constant and round-off-level representations ---------------------------------------------


def constant_plus(noise: float, n: int = 32, p: int = 24, seed: int = 0) -> np.ndarray:
    """One float32 representation repeated n times, plus relative noise of size ``noise``."""
    rng = np.random.default_rng(seed)
    row = rng.standard_normal(p).astype(np.float32) * 5 + 3
    jitter = rng.standard_normal((n, p)).astype(np.float32) * np.float32(noise * np.linalg.norm(row) / np.sqrt(p))
    return (row[None, :] + jitter).astype(np.float32)


@pytest.mark.parametrize("noise", [0.0, 1e-7, 3e-7, 0.1 * CONSTANT_TOL])
@pytest.mark.parametrize("kernel", ["linear", "rbf"])
def test_a_representation_constant_within_float32_round_off_is_nan_with_one_warning(noise, kernel):
    a = [constant_plus(noise, seed=s) for s in range(3)]
    b = [feats(30 + s, 32, 8, np.float32) for s in range(3)]
    with pytest.warns(RuntimeWarning, match=r"constant representation.*model A \['a'\]"):
        got = run(a, b, kernel=kernel)
    assert np.isnan(got[0, 0])
    with pytest.warns(RuntimeWarning, match="constant within round-off"):
        assert torch.isnan(cka(torch.from_numpy(a[0]), torch.from_numpy(b[0]), kernel))


@pytest.mark.parametrize("noise", [30 * CONSTANT_TOL, 1e-2])
def test_above_the_constant_threshold_the_value_is_the_float64_one(noise):
    # The far side of the threshold: a small but real variation on a large offset is measured
    # exactly (the float32 centering loses nothing that U-centering keeps).
    a = [constant_plus(noise, seed=s) for s in range(3)]
    b = [x[:, :8] * 2 + feats(40 + s, 32, 8, np.float32) * np.float32(noise) for s, x in enumerate(a)]
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        got = run(a, b)[0, 0]
    # The reference gets float64 features centred first: its literal uncentred K = X Xᵀ would
    # itself lose these digits to the offset (the signal is r⁴ ~ 1e-14 of K's square).
    def c64(x: np.ndarray) -> np.ndarray:
        x = x.astype(np.float64)
        return x - x.mean(0)

    want = ref.minibatch_cka_matrix([[c64(x)] for x in a], [[c64(y)] for y in b])[0, 0]
    assert got == pytest.approx(want, abs=1e-6)


def test_all_but_one_identical_batch_has_zero_unbiased_self_hsic_and_counts_as_zero():
    # 15 copies of one sample and one other: the centred gram is rank one with two values,
    # and its U-centering vanishes identically, so HSIC_1(K, K) = 0 (checked in float64).
    x = np.repeat(feats(50, 1, 10), 16, axis=0)
    x[-1] += feats(51, 1, 10)[0]
    k = ref.gram(x, "linear")
    assert abs(ref.hsic_unbiased(k, k)) < 1e-12 * np.square(k).sum() / (16 * 13)
    y = feats(52, 16, 10)
    with pytest.warns(RuntimeWarning, match="constant representation"):
        assert np.isnan(run([x.astype(np.float32)], [y.astype(np.float32)])[0, 0])
    # Among other batches it contributes its true value, 0: the result is the reference's.
    others = [feats(53 + i, 16, 10) for i in range(3)]
    ys = [feats(60 + i, 16, 10) for i in range(4)]
    with pytest.warns(RuntimeWarning, match=r"in some batches.*a \(1 of 4\)"):
        got = run([x, *others], ys)[0, 0]
    want = ref.minibatch_cka_matrix([[x], *[[o] for o in others]], [[y] for y in ys])[0, 0]
    assert got == pytest.approx(want, abs=1e-12)


def test_a_partly_constant_layer_equals_the_reference_which_gives_those_batches_zero():
    a = [feats(70, 24, 6), np.ones((24, 6)) * 7.0, feats(71, 24, 6)]
    b = [feats(72, 24, 5), feats(73, 24, 5), feats(74, 24, 5)]
    with pytest.warns(RuntimeWarning, match=r"some batches.*a \(1 of 3\)"):
        got = run(a, b)[0, 0]
    want = ref.minibatch_cka_matrix([[x] for x in a], [[y] for y in b])[0, 0]
    assert got == pytest.approx(want, abs=1e-12)


@pytest.mark.parametrize("estimator", ["unbiased", "biased"])
def test_an_rbf_bandwidth_too_narrow_for_the_data_is_nan_not_a_change(estimator):
    x = feats(80, 32, 64, np.float32) * 10
    with pytest.warns(RuntimeWarning, match="RBF bandwidth too"):
        got = run([x], [x.copy()], kernel="rbf", rbf_frac=1e-3, estimator=estimator)
    assert np.isnan(got[0, 0])


def test_the_round_off_rule_is_n_n3_self_against_rho_times_the_gram_energy(monkeypatch):
    # Both sides of the documented rule n(n-3) HSIC_1(K, K) <= rho ||K~||_F^2, with rho set
    # just above and just below this batch's own ratio.
    from cka_geo.functional import precision
    from cka_geo.functional.minibatch import batch_grams, batch_terms

    x = torch.from_numpy(feats(90, 16, 4, np.float32))
    g = batch_grams({"x": x})
    t = batch_terms(g)
    ratio = float(t.self_a[0] * g.scale[0] ** 4 * 16 * 13 / g.sq[0])
    assert ratio > NOISE_TOL and not bool(t.degenerate_a[0])
    monkeypatch.setattr(precision, "NOISE_TOL", ratio * 1.001)
    assert bool(batch_terms(g).degenerate_a[0])
    monkeypatch.setattr(precision, "NOISE_TOL", ratio * 0.999)
    assert not bool(batch_terms(g).degenerate_a[0])


# -- bad values and types -------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nan_or_inf_raise_feature_error_in_both_apis(bad):
    x = torch.randn(16, 4)
    x[3, 1] = bad
    with pytest.raises(FeatureError, match="NaN or Inf"):
        cka(x, torch.randn(16, 4))
    acc = MinibatchCKA()
    with pytest.raises(FeatureError, match=r"layer 'x' of model A has NaN or Inf.*batch 1"):
        acc.update({"x": x}, {"y": torch.randn(16, 4)})


def test_numpy_arrays_and_grad_tensors_are_accepted():
    x, y = feats(100, 32, 6), feats(101, 32, 5)
    want = ref.cka(x, y)
    assert cka(x, y).item() == pytest.approx(want, abs=1e-12)
    acc = MinibatchCKA()
    acc.update({"x": x}, {"y": y})
    assert acc.compute().matrix[0, 0] == pytest.approx(want, abs=1e-12)
    xt = torch.from_numpy(x).requires_grad_()
    acc = MinibatchCKA()
    acc.update({"x": xt}, {"y": torch.from_numpy(y)})  # detached inside
    assert acc.compute().matrix[0, 0] == pytest.approx(want, abs=1e-12)
    value = cka(xt, torch.from_numpy(y))  # differentiable
    value.backward()
    assert xt.grad is not None and torch.isfinite(xt.grad).all() and xt.grad.abs().sum() > 0


def test_other_types_are_refused_in_one_line():
    with pytest.raises(FeatureError, match="torch tensor or a numpy array, got list"):
        cka([[1.0, 2.0]] * 8, torch.randn(8, 2))
    with pytest.raises(FeatureError, match="at least one feature"):
        MinibatchCKA().update({"x": torch.randn(8, 0)})


def test_the_biased_estimator_refuses_two_samples():
    with pytest.raises(FeatureError, match="at least 3"):
        cka(torch.randn(2, 3), torch.randn(2, 3), estimator="biased")
    acc = MinibatchCKA(estimator="biased")
    with pytest.warns(RuntimeWarning, match="skipping a batch of 2"):
        acc.update({"x": torch.randn(2, 3)})
    with pytest.raises(FeatureError, match="no batch with at least 3"):
        acc.compute()


# -- verdicts -------------------------------------------------------------------------------------


def test_no_verdict_from_nan_or_from_changes_inside_the_noise():
    layers = ["blocks.0.attn", "blocks.0.mlp.fc1", "blocks.0"]
    tiny = 1 - UNCHANGED_TOL / 10
    s = summarize(layers, {layers[0]: tiny, layers[1]: None, layers[2]: 1.0}, {n: tiny for n in layers}, False)
    assert s["most_changed"] is None and s["first_changed"] is None and s["largest_own_change"] is None
    assert s["changed"] is False and s["undefined"] == ["blocks.0.mlp.fc1"]
    assert "beyond the numerical noise" in s["verdict"] and "undefined" in s["verdict"]
    s = summarize(layers, dict.fromkeys(layers), None, False)
    assert s["most_changed"] is None and "undefined (NaN) at every sublayer" in s["verdict"]
    s = summarize(layers, {layers[0]: 0.9, layers[1]: None, layers[2]: 0.95}, {n: 1.0 for n in layers}, False)
    assert s["most_changed"] == layers[0] and s["first_changed"] == layers[0]
    assert s["largest_own_change"] is None and "own change exceeds the numerical noise" in s["verdict"]
