"""Symmetric grams as diagonal and upper blocks (functional/blocks.py) against float64 references."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import reference as ref
from cka_geo.accumulator import MinibatchCKA
from cka_geo.functional import blocks
from cka_geo.functional.blocks import (
    GramBlocks,
    common_layout,
    frobenius_blocks,
    parts_for,
    split_full,
)


def test_parts_follow_the_batch_size_and_divisibility():
    assert [parts_for(n) for n in (3, 64, 127, 128, 129, 130, 256, 511, 512, 514, 1024)] == [
        1, 1, 1, 2, 1, 2, 2, 1, 4, 2, 4]
    assert parts_for(1024, "rbf") == 1  # RBF grams come whole


def _stack(count: int, n: int, p: int, seed: int, offset: float = 0.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(count, n, p, generator=g) + offset


@pytest.mark.parametrize("n", [128, 130, 512, 520])
def test_blocks_hold_the_gram_and_give_its_sums_in_float64(n):
    x = _stack(3, n, 20, n)
    b = GramBlocks.empty(3, n, parts_for(n), torch.float32, "cpu")
    assert b.parts == parts_for(n) > 1
    b.multiply(x)
    k = b.full()
    assert torch.equal(k, k.transpose(1, 2))  # exactly symmetric
    want = torch.einsum("lip,ljp->lij", x.double(), x.double())
    assert ((k.double() - want).abs().max() / want.abs().max()).item() < 1e-6
    # Row sums and norm from the pieces equal float64 sums of the assembled float32 gram.
    k64 = k.double()
    np.testing.assert_allclose(b.row_sums().numpy(), k64.sum(-1).numpy(), rtol=1e-6, atol=1e-6 * n)
    np.testing.assert_allclose(b.squared_norm().numpy(), k64.square().sum((1, 2)).numpy(), rtol=1e-6)
    # The pieces hold (m + 1) / (2m) of the entries.
    assert GramBlocks.numel(3, n, b.parts) == 3 * n * n * (b.parts + 1) // (2 * b.parts)


@settings(max_examples=20, deadline=None)
@given(st.sampled_from([128, 256, 512]), st.integers(0, 10_000))
def test_frobenius_of_blocks_is_the_float64_product_of_the_whole_grams(n, seed):
    a, c = _stack(4, n, 8, seed), _stack(3, n, 8, seed + 1, 2.0)
    ka, kb = (GramBlocks.empty(len(x), n, parts_for(n), torch.float32, "cpu") for x in (a, c))
    ka.multiply(a)
    kb.multiply(c)
    fa, fb = ka.full().double(), kb.full().double()
    want = torch.einsum("aij,bij->ab", fa, fb)
    scale = torch.outer(fa.flatten(1).norm(dim=1), fb.flatten(1).norm(dim=1))  # Cauchy-Schwarz bound
    got = frobenius_blocks(ka, kb)
    assert got.dtype == torch.float64
    assert ((got - want).abs() / scale).max().item() < 1e-6
    # Grams of other layouts (e.g. kept from a run with other thresholds) are compared whole.
    whole = split_full(kb.full(), 1)
    with pytest.raises(ValueError, match="parts"):
        frobenius_blocks(ka, whole)
    got_whole = frobenius_blocks(*common_layout(ka, whole))
    assert ((got_whole - want).abs() / scale).max().item() < 1e-6


def test_bit_identical_grams_are_found_in_every_piece():
    x = _stack(3, 256, 8, 0)
    ka = GramBlocks.empty(3, 256, 2, torch.float32, "cpu")
    ka.multiply(x)
    kb = GramBlocks.empty(3, 256, 2, torch.float32, "cpu")
    kb.multiply(x)
    kb.upper[0][2, 5, 7] += 1.0  # one entry above the diagonal of layer 2
    kb.diag[1, 1, 3, 4] += 1.0  # one entry in the second diagonal block of layer 1
    idx = torch.arange(3)
    assert ka.equal(idx, kb, idx).tolist() == [True, False, False]


def test_assign_writes_whole_grams_and_blocks_into_chosen_layers():
    x = _stack(4, 128, 6, 3)
    full = torch.einsum("lip,ljp->lij", x, x)
    full = (full + full.transpose(1, 2)) / 2  # symmetric input for split_full
    b = GramBlocks.empty(4, 128, 2, torch.float32, "cpu")
    b.diag.zero_()
    for u in b.upper:
        u.zero_()
    b.assign([3, 1], full[[0, 2]])
    got = b.full()
    assert torch.equal(got[3], full[0]) and torch.equal(got[1], full[2])
    assert not got[0].any() and not got[2].any()


@settings(max_examples=12, deadline=None)
@given(st.integers(0, 10_000), st.sampled_from([0.0, 10.0]), st.sampled_from([128, 130, 512]),
       st.sampled_from(["unbiased", "biased"]))
def test_cka_from_blocks_is_the_float64_cka(seed, offset, n, estimator):
    rng = np.random.default_rng(seed)
    def feats(k: int, shift: float) -> list[np.ndarray]:
        z = rng.standard_normal((n, 4))
        return [(np.tanh(z @ rng.standard_normal((4, 12))) + 0.3 * rng.standard_normal((n, 12)) + shift)
                .astype(np.float32) for _ in range(k)]
    ba, bb = [feats(3, offset) for _ in range(2)], [feats(2, 0.0) for _ in range(2)]
    acc = MinibatchCKA(estimator=estimator)
    for fa, fb in zip(ba, bb, strict=True):
        acc.update({f"a{i}": torch.from_numpy(x) for i, x in enumerate(fa)},
                   {f"b{i}": torch.from_numpy(y) for i, y in enumerate(fb)})
    got = acc.compute().matrix
    c64 = [[(x.astype(np.float64) - x.astype(np.float64).mean(0)) for x in f] for f in ba]
    d64 = [[(y.astype(np.float64) - y.astype(np.float64).mean(0)) for y in f] for f in bb]
    want = ref.minibatch_cka_matrix(c64, d64, "linear", estimator)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)


def test_blocks_and_whole_grams_give_the_same_cka(monkeypatch):
    # The split changes which float32 entries are computed, not the estimator: the same CKA to
    # float32 rounding, and identical inputs still give exactly 1.
    x = torch.from_numpy(np.random.default_rng(1).standard_normal((512, 3, 16)).astype(np.float32))
    y = x + 0.5 * torch.randn(512, 3, 16)
    def run() -> np.ndarray:
        acc = MinibatchCKA()
        acc.update({f"a{i}": x[:, i] for i in range(3)}, {f"b{i}": y[:, i] for i in range(3)})
        return acc.compute().matrix
    split = run()
    monkeypatch.setattr(blocks, "TWO_PARTS", 10**9)
    monkeypatch.setattr(blocks, "FOUR_PARTS", 10**9)
    whole = run()
    np.testing.assert_allclose(split, whole, rtol=0, atol=1e-6)
    acc = MinibatchCKA()
    feats = {f"a{i}": x[:, i] for i in range(3)}
    acc.update(feats, dict(feats))
    assert np.all(np.diag(acc.compute().matrix) == 1.0)


@pytest.mark.parametrize("n", [256, 512])
def test_a_layer_alone_in_its_stack_has_the_bits_of_the_same_layer_in_a_larger_stack(n):
    # Model B holds a copy of A's last layer only: its grams come from a stack of one (a batch-one
    # product, which torch may split by thread), A's from a stack of five. With torch's threads
    # on a quiet machine the grams must still be bit-identical, so CKA is exactly 1.
    from cka_geo.functional import batched

    threads = torch.get_num_threads()
    x = torch.randn(5, n, 1024, generator=torch.Generator().manual_seed(n))
    try:
        torch.set_num_threads(max(2, threads))
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(batched, "oversubscribed", lambda: False)
            acc = MinibatchCKA()
            acc.update({f"a{i}": x[i] for i in range(5)}, {"b": x[4].clone()})
            assert acc.compute().matrix[4, 0] == 1.0
    finally:
        torch.set_num_threads(threads)


def test_four_parts_find_a_changed_entry_in_any_block_row():
    x = _stack(4, 512, 8, 5)
    ka, kb = (GramBlocks.empty(4, 512, 4, torch.float32, "cpu") for _ in range(2))
    ka.multiply(x)
    kb.multiply(x)
    assert len(kb.upper) == 3
    kb.upper[1][1, 3, 100] += 1.0
    kb.upper[2][3, 127, 0] += 1.0
    idx = torch.arange(4)
    assert ka.equal(idx, kb, idx).tolist() == [True, False, True, False]
    # Non-consecutive layers written from blocks (the engine's interleaved widths).
    out = GramBlocks.empty(4, 512, 4, torch.float32, "cpu")
    out.assign([0, 1, 2, 3], ka)
    out.assign([3, 0], kb.layers(1, 3))
    full, src = out.full(), kb.full()
    assert torch.equal(full[3], src[1]) and torch.equal(full[0], src[2])
    assert torch.equal(full[1], ka.full()[1]) and torch.equal(out.to("cpu").diag, out.diag)


def test_reused_buffers_across_batch_sizes_give_each_batch_its_own_terms():
    # One accumulator sees 520, 130, 512, 64 and 1024 rows (two, one and four parts) in its
    # reused buffers; each batch's terms equal those of a fresh accumulator, bit for bit.
    sizes = [520, 130, 512, 64, 1024]
    g = torch.Generator().manual_seed(7)
    batches = [({f"a{i}": torch.randn(n, 24, generator=g) + i for i in range(3)},
                {f"b{i}": torch.randn(n, 40 if i else 24, generator=g) for i in range(2)}) for n in sizes]
    acc = MinibatchCKA()
    for fa, fb in batches:
        acc.update(fa, fb)
    res = acc.compute()
    for k, (fa, fb) in enumerate(batches):
        alone = MinibatchCKA()
        alone.update(fa, fb)
        one = alone.compute()
        assert np.array_equal(res.batch_cross[k], one.batch_cross[0])
        assert np.array_equal(res.batch_self_a[k], one.batch_self_a[0])


def test_grams_of_two_layouts_give_the_same_terms_and_identical_ones_still_cka_one():
    import dataclasses

    from cka_geo.functional.minibatch import batch_grams, batch_terms

    g = torch.Generator().manual_seed(3)
    feats = {f"a{i}": torch.randn(256, 12, generator=g) + i for i in range(3)}
    ga = batch_grams(feats)
    assert ga.grams.parts == 2
    gb = dataclasses.replace(ga, grams=split_full(ga.grams.full(), 1))  # the same grams, whole
    same, mixed = batch_terms(ga, batch_grams(feats)), batch_terms(ga, gb)
    scale = torch.outer(same.self_a, same.self_a).sqrt()  # CKA units: the cross term over its norms
    assert ((mixed.cross - same.cross).abs() / scale).max().item() < 1e-6
    assert torch.equal(mixed.cross.diagonal(), mixed.self_a)  # found bit-identical across layouts
