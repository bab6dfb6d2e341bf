"""The engine's fast paths (functional/batched.py, the RBF median) against float64 references."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import reference as ref
from cka_geo.accumulator import MinibatchCKA
from cka_geo.errors import FeatureError
from cka_geo.functional import batched, minibatch, rbf_sigma
from cka_geo.functional.batched import (
    GramWork,
    as_stack,
    fast_checks,
    fast_linear_grams,
    frobenius,
    one_thread,
)
from cka_geo.functional.blocks import GramBlocks, parts_for


def c64(x: np.ndarray) -> np.ndarray:
    """Centred in float64: the reference's uncentred float64 gram would lose digits to an offset."""
    x = x.astype(np.float64)
    return x - x.mean(0)


def model(seed: int, n: int, widths: list[int], offset: float, scale: float) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((n, 6))
    out = []
    for w in widths:
        x = np.tanh(z @ rng.standard_normal((6, w))) + 0.5 * rng.standard_normal((n, w))
        out.append(((x + offset * rng.uniform(0.5, 1.5, w)) * scale).astype(np.float32))
    return out


def engine(batches_a, batches_b, stacked: bool = False, **kw) -> np.ndarray:
    acc = MinibatchCKA(**kw)
    for fa, fb in zip(batches_a, batches_b, strict=True):
        acc.update(*(_feats(f, p, stacked) for f, p in ((fa, "a"), (fb, "b"))))
    return acc.compute().matrix


def _feats(xs: list[np.ndarray], prefix: str, stacked: bool) -> dict[str, torch.Tensor]:
    if stacked and len({x.shape for x in xs}) == 1:  # one buffer, as capture gives them
        buf = torch.from_numpy(np.stack(xs))
        return {f"{prefix}{i}": buf[i] for i in range(len(xs))}
    return {f"{prefix}{i}": torch.from_numpy(x) for i, x in enumerate(xs)}


@settings(max_examples=25, deadline=None)
@given(
    st.integers(0, 10_000),
    st.sampled_from([0.0, 0.05, 0.3, 1.0, 10.0, 100.0]),
    st.sampled_from([1e-6, 1e-2, 1.0, 1e3]),
    st.sampled_from([[16, 8, 16], [12], [8, 8, 8]]),
    st.sampled_from([12, 33, 64]),
    st.sampled_from(["unbiased", "biased"]),
    st.booleans(),
)
def test_float32_features_of_any_offset_and_scale_give_the_float64_cka(seed, offset, scale, widths, n, estimator, stacked):
    # Offsets from none (uncentred grams) to 100x the spread (centred first), tiny and large
    # scales, widths in one group and in non-consecutive groups, separate and stacked layers.
    ba = [model(seed + i, n, widths, offset, scale) for i in range(3)]
    bb = [model(seed + 50 + i, n, [10, *widths[:1]], 0.0, 1.0) for i in range(3)]
    got = engine(ba, bb, stacked, estimator=estimator)
    want = ref.minibatch_cka_matrix([[c64(x) for x in f] for f in ba], [[c64(y) for y in f] for f in bb], "linear", estimator)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)


def test_stacked_and_separate_features_give_bit_identical_results():
    ba = [model(i, 40, [16, 16, 16], 0.2, 1.0) for i in range(2)]
    bb = [model(9 + i, 40, [16, 16], 5.0, 1.0) for i in range(2)]
    assert np.array_equal(engine(ba, bb, stacked=True), engine(ba, bb, stacked=False))


def test_as_stack_views_one_buffer_without_a_copy_and_refuses_other_layouts():
    buf = torch.randn(5, 7, 3)
    view = as_stack([buf[i] for i in range(5)])
    assert view is not None and view.data_ptr() == buf.data_ptr() and torch.equal(view, buf)
    assert torch.equal(as_stack([buf[i] for i in range(1, 4)]), buf[1:4])  # type: ignore[arg-type]
    assert as_stack([buf[0], buf[2]]) is None  # a gap
    assert as_stack([buf[1], buf[0]]) is None  # out of order
    assert as_stack([torch.randn(7, 3), torch.randn(7, 3)]) is None  # separate tensors
    assert as_stack([torch.randn(7, 3)]) is not None  # one contiguous layer is a stack
    assert as_stack([buf[0].T.contiguous().T]) is None  # column-major
    assert as_stack([buf[:, :, :2][0], buf[:, :, :2][1]]) is None  # not contiguous


@pytest.mark.parametrize("case", ["offset hidden", "sample off-centre"])
def test_a_shift_its_sampled_rows_misjudge_is_found_from_the_gram_and_the_layer_redone_centred(monkeypatch, case):
    # The 16 sampled rows (every 32nd of 512) either swing +-2c around 0 ("offset hidden": the
    # sample sees no offset, the gram keeps all of it) or sit 5 away from the rest ("sample
    # off-centre": the shift misses the mean). The gram's own sum shows the offset it kept.
    n, p, c = 512, 6, 3.0
    x = np.full((n, p), c, dtype=np.float32) + 1e-3 * np.random.default_rng(0).standard_normal((n, p)).astype(np.float32)
    if case == "offset hidden":
        x[::32] = 2 * c * np.where(np.arange(16)[:, None] % 2, 1.0, -1.0)
    else:
        x[::32] += 5.0
    y = model(1, n, [5], 0.0, 1.0)[0]
    out = GramBlocks.empty(2, n, parts_for(n), torch.float32, "cpu")
    trace, shift_sq, peak = fast_linear_grams([torch.from_numpy(x), torch.from_numpy(y[:, :1].repeat(6, 1))], out, GramWork())
    assert (shift_sq[0].item() > 0) == (case == "sample off-centre")
    _, redo = fast_checks(trace, shift_sq, peak, out.row_sums().sum(-1), n, torch.float32)
    assert redo.tolist() == [True, False]
    redone: list[list[int]] = []
    general = minibatch._general_grams
    monkeypatch.setattr(minibatch, "_general_grams", lambda b, idx: (redone.append(idx), general(b, idx)))
    got = engine([[x]], [[y]])[0, 0]
    assert redone == [[0]]
    want = ref.minibatch_cka_matrix([[c64(x)]], [[c64(y)]])[0, 0]
    assert got == pytest.approx(want, abs=1e-6)


def test_a_layer_with_an_offset_is_shifted_by_its_sampled_rows_and_kept():
    # The common case needs no redo: the shift leaves about ||X_c||^2 / 16 of offset.
    x = model(3, 256, [64], 10.0, 1.0)[0]
    out = GramBlocks.empty(1, 256, parts_for(256), torch.float32, "cpu")
    trace, shift_sq, peak = fast_linear_grams([torch.from_numpy(x)], out, GramWork())
    residual = out.row_sums().sum(-1) / 256
    centred = trace - residual
    assert shift_sq.item() > 100 * centred.item()  # the offset was large
    assert 0 < residual.item() < 0.25 * centred.item()
    x64 = x.astype(np.float64)
    assert centred.item() == pytest.approx(np.square(x64 - x64.mean(0)).sum(), rel=1e-5)
    constant, redo = fast_checks(trace, shift_sq, peak, residual * 256, 256, torch.float32)
    assert redo.tolist() == [False] and constant.tolist() == [False]


@pytest.mark.parametrize("n, terms", [(300, 8192), (64, 8192), (37, 100), (16, 1)])
def test_frobenius_chunks_equal_float64_products(monkeypatch, n, terms):
    # Whole chunks plus a remainder (300 = 11 x 27 + 3 rows), one chunk, many small ones.
    monkeypatch.setattr(batched, "FROB_TERMS", terms)
    g = torch.Generator().manual_seed(n)
    ka, kb = torch.randn(4, n, n, generator=g), torch.randn(3, n, n, generator=g) + 2.0
    want = torch.einsum("aij,bij->ab", ka.double(), kb.double())
    got = frobenius(ka, kb)
    assert got.dtype == torch.float64
    scale = torch.outer(ka.double().flatten(1).norm(dim=1), kb.double().flatten(1).norm(dim=1))
    assert ((got - want).abs() / scale).max().item() < 1e-6


@pytest.fixture
def busy(monkeypatch):
    """The machine taken as oversubscribed: one_thread() goes to one thread."""
    monkeypatch.setattr(batched, "oversubscribed", lambda: True)


def test_one_thread_restores_the_thread_count_even_after_an_error(busy):
    before = torch.get_num_threads()
    with pytest.raises(RuntimeError, match="boom"), one_thread():
        assert torch.get_num_threads() == 1
        raise RuntimeError("boom")
    assert torch.get_num_threads() == before


@settings(max_examples=60, deadline=None)
@given(st.integers(4, 30), st.integers(0, 10_000), st.integers(1, 6), st.sampled_from([0.2, 0.4]))
def test_rbf_median_is_the_median_of_the_distinct_pairs_with_ties(n, seed, levels, frac):
    # Integer distances from a few levels: many ties, zeros among the pairs, both parities.
    rng = np.random.default_rng(seed)
    d = rng.integers(0, levels + 1, size=(n, n)).astype(np.float64)
    d = np.triu(d, 1) + np.triu(d, 1).T
    pairs = d[np.triu_indices(n, 1)]
    med = float(np.median(pairs))
    want = frac * np.sqrt(med if med > 0 else pairs.mean()) if pairs.any() else float("nan")
    for dtype in (torch.float64, torch.float32):
        got = rbf_sigma(torch.from_numpy(d).to(dtype), frac).item()
        assert got == pytest.approx(want, rel=1e-12, nan_ok=True)
    stack = torch.from_numpy(np.stack([d, 2 * d]))  # batched: per matrix
    np.testing.assert_allclose(rbf_sigma(stack, frac).numpy(), [want, want * np.sqrt(2)], rtol=1e-12)


@pytest.mark.parametrize(("running", "busy"), [(1, False), (os.cpu_count() or 1, False), ((os.cpu_count() or 1) + 1, True)])
def test_oversubscribed_reads_the_run_queue_and_a_missing_file_means_busy(tmp_path, monkeypatch, running, busy):
    f = tmp_path / "loadavg"
    f.write_text(f"2.10 2.05 1.90 {running}/345 6789\n")
    monkeypatch.setattr(batched, "_LOADAVG", str(f))
    monkeypatch.setitem(batched._state, "checked", -1.0)
    assert batched.oversubscribed() is busy
    f.write_text("0.00 0.00 0.00 1/1 1\n")  # cached: the next look is 0.25 s later
    assert batched.oversubscribed() is busy
    monkeypatch.setitem(batched._state, "checked", -1.0)
    monkeypatch.setattr(batched, "_LOADAVG", str(tmp_path / "absent"))
    assert batched.oversubscribed() is True


@pytest.mark.parametrize("kernel", ["linear", "rbf"])
@pytest.mark.parametrize(("n", "width", "offset", "layers"), [
    (5, 7, 0.0, 6), (64, 384, 10.0, 6), (300, 96, 0.0, 6), (130, 1536, 3.0, 6),
    (256, 96, 3.0, 1), (256, 96, 0.0, 2), (64, 384, 10.0, 1),  # one layer: reductions to one value
    (512, 64, 3.0, 4), (512, 64, 0.0, 1),  # four row parts (functional/blocks.py)
    # Products large enough for torch's threads: a piece with a remainder past its whole chunks
    # (1000 rows), pieces of one chunk (128 rows, many layers), one layer's large block products.
    (1000, 64, 0.0, 36), (128, 16, 3.0, 70), (512, 1024, 0.0, 1),
])
def test_the_thread_count_of_the_memory_bound_steps_changes_no_bit(monkeypatch, kernel, n, width, offset, layers):
    """Quiet (torch's threads in every step) and oversubscribed (one thread) give the same bits."""
    from cka_geo.accumulator import MinibatchCKA

    g = torch.Generator().manual_seed(n)
    feats = [({f"a{i}": torch.randn(n, width, generator=g) for i in range(layers)},
              {f"b{i}": torch.randn(n, width, generator=g) + offset for i in range(max(1, layers - 1))})
             for _ in range(2)]
    threads = torch.get_num_threads()
    sums = []
    try:
        for quiet, count in ((False, 1), (True, max(2, threads))):
            torch.set_num_threads(count)
            monkeypatch.setattr(batched, "oversubscribed", lambda q=quiet: not q)
            acc = MinibatchCKA(kernel=kernel, keep_batches=False)
            for fa, fb in feats:
                acc.update(fa, fb)
            sums.append((acc._cross.clone(), acc._self_a.clone(), acc._self_b.clone()))
    finally:
        torch.set_num_threads(threads)
    for x, y in zip(*sums, strict=True):
        assert torch.equal(x, y)


def test_layers_of_several_widths_sent_back_together_are_redone_one_width_at_a_time():
    # Magnitudes outside the fast path's safe range in layers of two widths (and one in range
    # between them): all sent back by one check, redone in stacks of one width each.
    ba = [[x * s for x, s in zip(model(40 + i, 48, [8, 16, 8, 16], 0.5, 1.0), (1e30, 1e-30, 1.0, 1e25), strict=True)]
          for i in range(2)]
    bb = [model(60 + i, 48, [12], 0.0, 1.0) for i in range(2)]
    got = engine(ba, bb)
    want = ref.minibatch_cka_matrix([[c64(x) for x in f] for f in ba], [[c64(y) for y in f] for f in bb])
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    bad = [[x.copy() for x in f] for f in ba]
    bad[1][0][3, 2] = np.nan
    bad[1][1][5, 1] = np.inf
    with pytest.raises(FeatureError, match=r"layer 'a0' of model A has NaN or Inf.*batch 2"):
        engine(bad, bb)


def test_a_layer_redone_in_every_batch_keeps_the_others_sums_and_its_own_bits():
    # A layer that does not depend on the input (peak 0: sent back every batch) between two
    # that do: the other layers' sums are untouched, and the redone layer's sums are those it
    # has when it is alone in a batch.
    from cka_geo.functional.minibatch import batch_grams

    for n in (64, 256, 512):
        xs = model(7, n, [32, 32, 32], 3.0, 1.0)
        xs[1] = np.full_like(xs[1], 2.5)  # constant: redone, flagged
        xs[2] = xs[2] * np.float32(1e25)  # outside the safe range: redone, scaled
        g = batch_grams({f"l{i}": torch.from_numpy(x) for i, x in enumerate(xs)})
        assert g.constant.tolist() == [False, True, False]
        for i, x in enumerate(xs):
            alone = batch_grams({"x": torch.from_numpy(x)})
            assert torch.equal(g.rows[i], alone.rows[0]) and torch.equal(g.sq[i], alone.sq[0]), (n, i)


@pytest.mark.parametrize("dtypes, gram", [((torch.float32,) * 3, torch.float32), ((torch.float16, torch.float32, torch.bfloat16), torch.float32),
                                          ((torch.float32, torch.float64, torch.float16), torch.float64)])
def test_the_general_paths_one_stack_scales_like_each_layer_alone(dtypes, gram):
    # The stack-then-max path against its per-layer definition: each layer scaled by the power
    # of two that brings its own max |x| into [0.5, 1), cast exactly, then centred.
    g = torch.Generator().manual_seed(5)
    chunk = [(torch.randn(20, 7, generator=g) * m + 3 * m).to(d) for m, d in zip((1e-9, 1.0, 3e3), dtypes, strict=True)]
    x, s, offset_sq = batched.scaled_stack(chunk, gram)
    for j, t in enumerate(chunk):
        _, e = torch.frexp(t.abs().amax().double())
        assert s[j].item() == 2.0 ** -e.item()
        want = t.to(gram) * s[j].to(gram)
        mu = want.mean(0, keepdim=True)
        assert torch.equal(x[j], want - mu)
        assert offset_sq[j].item() == pytest.approx(20 * mu.double().square().sum().item(), rel=1e-6)
