"""Minibatch CKA over all layer pairs against the reference's per-pair loop."""

from __future__ import annotations

import itertools
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import reference as ref
from cka_geo.accumulator import MinibatchCKA, cka_matrix, full_fp32_matmul
from cka_geo.errors import FeatureError
from cka_geo.functional import cka


def layers(seed: int, n: int, widths: list[int], offset: float = 0.0, dtype=np.float64) -> list[np.ndarray]:
    """Related layers: each a random nonlinear map of a shared latent."""
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((n, 6))
    out = []
    for w in widths:
        out.append((np.tanh(z @ rng.standard_normal((6, w))) + 0.3 * rng.standard_normal((n, w)) + offset).astype(dtype))
    return out


def as_dict(arrays: list[np.ndarray], prefix: str) -> dict[str, torch.Tensor]:
    return {f"{prefix}{i}": torch.from_numpy(a) for i, a in enumerate(arrays)}


def split(arrays: list[np.ndarray], sizes: list[int]) -> list[list[np.ndarray]]:
    bounds = np.cumsum([0, *sizes])
    return [[a[s:e] for a in arrays] for s, e in itertools.pairwise(bounds)]


batching = st.tuples(st.integers(0, 2**31 - 1), st.lists(st.integers(4, 24), min_size=1, max_size=4))


@settings(max_examples=25, deadline=None)
@given(batching, st.sampled_from(["linear", "rbf"]), st.sampled_from(["unbiased", "biased"]))
def test_all_pairs_match_the_reference_per_pair_loop(case, kernel, estimator):
    seed, sizes = case
    n = sum(sizes)
    fa = layers(seed, n, [5, 9, 5])
    fb = layers(seed + 1, n, [7, 5])
    acc = MinibatchCKA(kernel=kernel, estimator=estimator)
    for ba, bb in zip(split(fa, sizes), split(fb, sizes), strict=True):
        acc.update(as_dict(ba, "a"), as_dict(bb, "b"))
    res = acc.compute()
    want = ref.minibatch_cka_matrix(split(fa, sizes), split(fb, sizes), kernel, estimator)
    np.testing.assert_allclose(res.matrix, want, rtol=0, atol=1e-10)
    assert res.names_a == ["a0", "a1", "a2"] and res.names_b == ["b0", "b1"]
    assert res.samples == n and res.batch_sizes == sizes
    assert res.batch_cross.shape == (len(sizes), 3, 2)
    np.testing.assert_allclose(res.batch_cross.sum(0), res.cross, rtol=1e-12, atol=1e-12)


def test_all_pairs_equal_a_loop_over_pairs_of_the_functional_core():
    fa, fb = layers(0, 64, [8, 16, 8, 4]), layers(1, 64, [8, 3])
    res = cka_matrix(as_dict(fa, "a"), as_dict(fb, "b"))
    for i, x in enumerate(fa):
        for j, y in enumerate(fb):
            assert res.matrix[i, j] == pytest.approx(cka(torch.from_numpy(x), torch.from_numpy(y)).item(), abs=1e-12)


def test_full_batch_biased_is_kornblith_cka():
    fa, fb = layers(2, 40, [6, 6]), layers(3, 40, [4])
    res = cka_matrix(as_dict(fa, "a"), as_dict(fb, "b"), estimator="biased")
    for i, x in enumerate(fa):
        assert res.matrix[i, 0] == pytest.approx(ref.cka(x, fb[0], "linear", "biased"), abs=1e-12)


def test_result_does_not_depend_on_the_order_of_batches():
    fa, fb = layers(4, 96, [8, 8, 16]), layers(5, 96, [8, 4])
    batches = list(zip(split(fa, [32] * 3), split(fb, [32] * 3), strict=True))
    results = []
    for order in ([0, 1, 2], [2, 0, 1], [1, 2, 0]):
        acc = MinibatchCKA()
        for k in order:
            acc.update(as_dict(batches[k][0], "a"), as_dict(batches[k][1], "b"))
        results.append(acc.compute().matrix)
    np.testing.assert_allclose(results[1], results[0], rtol=0, atol=1e-13)
    np.testing.assert_allclose(results[2], results[0], rtol=0, atol=1e-13)


def test_layer_order_is_the_callers():
    fa = layers(6, 32, [4, 8, 12])
    names = ["z", "a", "m"]
    res = cka_matrix(dict(zip(names, map(torch.from_numpy, fa), strict=True)))
    assert res.names_a == names == res.names_b
    # rows follow the names: swapping two layers swaps rows and columns
    res2 = cka_matrix({"a": torch.from_numpy(fa[1]), "z": torch.from_numpy(fa[0]), "m": torch.from_numpy(fa[2])})
    assert res.value("z", "a") == pytest.approx(res2.value("z", "a"), abs=1e-14)
    assert res.value("a", "m") == pytest.approx(res2.matrix[0, 2], abs=1e-14)


def test_self_comparison_without_b_equals_passing_a_twice():
    fa = layers(7, 48, [8, 16])
    once = cka_matrix(as_dict(fa, "a"))
    twice = cka_matrix(as_dict(fa, "a"), as_dict(fa, "a"))
    np.testing.assert_allclose(once.matrix, twice.matrix, rtol=0, atol=1e-14)
    np.testing.assert_allclose(np.diag(once.matrix), 1.0, atol=1e-12)


@pytest.mark.parametrize("kind", ["offset", "small"])
@pytest.mark.parametrize("kernel", ["linear", "rbf"])
def test_float32_features_with_offset_or_small_scale_agree_with_float64_reference(kind, kernel):
    n, sizes = 512, [128] * 4
    fa = layers(8, n, [64, 256, 64], dtype=np.float32)
    fb = layers(9, n, [64, 256], dtype=np.float32)
    if kind == "offset":
        fa = [a + np.float32(10) for a in fa]
        fb = [b + np.float32(10) for b in fb]
    else:
        fa = [a * np.float32(1e-2) for a in fa]
        fb = [b * np.float32(1e-2) for b in fb]
    acc = MinibatchCKA(kernel=kernel)
    for ba, bb in zip(split(fa, sizes), split(fb, sizes), strict=True):
        acc.update(as_dict(ba, "a"), as_dict(bb, "b"))
    got = acc.compute().matrix
    as64 = [[a.astype(np.float64) for a in batch] for batch in split(fa, sizes)]
    bs64 = [[b.astype(np.float64) for b in batch] for batch in split(fb, sizes)]
    want = ref.minibatch_cka_matrix(as64, bs64, kernel)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)


def test_rbf_sigma_is_recorded_per_batch_and_layer():
    fa = layers(10, 40, [5, 7])
    acc = MinibatchCKA(kernel="rbf", rbf_frac=0.8)
    for batch in split(fa, [20, 20]):
        acc.update(as_dict(batch, "a"))
    res = acc.compute()
    assert res.sigma_a.shape == (2, 2) and res.rbf_frac == 0.8
    for k, batch in enumerate(split(fa, [20, 20])):
        for i, x in enumerate(batch):
            assert res.sigma_a[k, i] == pytest.approx(ref.rbf_sigma(x, 0.8), rel=1e-12)


def test_a_last_batch_too_small_is_skipped_with_a_warning_never_nan():
    fa, fb = layers(11, 35, [6, 6]), layers(12, 35, [5])
    acc = MinibatchCKA()
    parts_a, parts_b = split(fa, [16, 16, 3]), split(fb, [16, 16, 3])
    for ba, bb in zip(parts_a[:2], parts_b[:2], strict=True):
        acc.update(as_dict(ba, "a"), as_dict(bb, "b"))
    with pytest.warns(RuntimeWarning, match="skipping a batch of 3 samples"):
        acc.update(as_dict(parts_a[2], "a"), as_dict(parts_b[2], "b"))
    res = acc.compute()
    assert res.samples == 32 and res.samples_skipped == 3
    assert np.isfinite(res.matrix).all()
    np.testing.assert_allclose(res.matrix, ref.minibatch_cka_matrix(parts_a[:2], parts_b[:2]), atol=1e-10)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_features_raise_naming_the_layer(bad):
    fa = as_dict(layers(13, 16, [4, 4, 4]), "a")
    fa["a1"][3, 2] = bad
    with pytest.raises(FeatureError, match=r"layer 'a1' of model A has NaN or Inf"):
        MinibatchCKA().update(fa, as_dict(layers(14, 16, [3]), "b"))
    fb = as_dict(layers(14, 16, [3, 3]), "b")
    fb["b1"][0, 0] = bad
    with pytest.raises(FeatureError, match=r"layer 'b1' of model B"):
        MinibatchCKA().update(as_dict(layers(13, 16, [4]), "a"), fb)


def test_a_constant_layer_gives_a_nan_row_with_a_warning():
    fa = as_dict(layers(15, 24, [4, 4]), "a")
    fa["a0"] = torch.full((24, 4), 3.0, dtype=torch.float64)
    acc = MinibatchCKA()
    acc.update(fa, as_dict(layers(16, 24, [3, 5]), "b"))
    with pytest.warns(RuntimeWarning, match=r"constant representation.*\['a0'\]"):
        res = acc.compute()
    assert np.isnan(res.matrix[0]).all() and np.isfinite(res.matrix[1]).all()


def test_inconsistent_batches_are_refused():
    acc = MinibatchCKA()
    acc.update(as_dict(layers(0, 8, [3, 3]), "a"), as_dict(layers(1, 8, [3]), "b"))
    with pytest.raises(FeatureError, match=r"missing \['a1'\]"):
        acc.update(as_dict(layers(0, 8, [3]), "a"), as_dict(layers(1, 8, [3]), "b"))
    with pytest.raises(FeatureError, match="model A has 8 samples in this batch but model B has 9"):
        acc.update(as_dict(layers(0, 8, [3, 3]), "a"), as_dict(layers(1, 9, [3]), "b"))
    with pytest.raises(FeatureError, match="layer 'a1' of model A has 7 samples, others have 8"):
        acc.update({"a0": torch.randn(8, 3), "a1": torch.randn(7, 3)}, as_dict(layers(1, 8, [3]), "b"))
    with pytest.raises(FeatureError, match="no batch with at least 4 samples"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fresh = MinibatchCKA()
        fresh.update({"x": torch.randn(2, 3)})
        fresh.compute()


def test_a_global_low_matmul_precision_does_not_reach_the_grams():
    fa, fb = layers(20, 64, [32, 32], dtype=np.float32), layers(21, 64, [32], dtype=np.float32)
    want = cka_matrix(as_dict(fa, "a"), as_dict(fb, "b")).matrix
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("medium")
    try:
        got = cka_matrix(as_dict(fa, "a"), as_dict(fb, "b")).matrix
        assert torch.get_float32_matmul_precision() == "medium"  # restored after the update
        with full_fp32_matmul():  # (this CPU may lack bf16, so check the switch itself too)
            assert torch.backends.cuda.matmul.fp32_precision == "ieee"
            assert torch.backends.mkldnn.matmul.fp32_precision == "ieee"
        assert torch.backends.mkldnn.matmul.fp32_precision == "bf16"
    finally:
        torch.set_float32_matmul_precision(before)
    np.testing.assert_array_equal(got, want)
