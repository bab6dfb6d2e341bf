"""CKAMetric: the engine's sums as torchmetrics states, exact under any grouping of batches.

What is exactly true (and tested as such): for the same minibatches the metric's sums are
the engine's sums, bit for bit; grouping those batches into other update calls, other
metric objects or other processes changes only the order of float64 additions (1e-12).
What is not: other batch sizes give another minibatch estimate of the same CKA (tested to
differ, and to agree within sampling noise and with a float64 reference).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import reference as ref
from _metric_helpers import features as _features
from _metric_helpers import split as _split
from cka_geo.accumulator import MinibatchCKA
from cka_geo.errors import FeatureError, UsageError
from cka_geo.integrations.torchmetrics import CKAMetric

NAMES_A = ["a0", "a1", "a2"]
NAMES_B = ["b0", "b1"]


@settings(max_examples=15, deadline=None)
@given(
    sizes=st.lists(st.integers(2, 24), min_size=1, max_size=5).filter(lambda s: max(s) >= 4),
    kernel=st.sampled_from(["linear", "rbf"]),
    estimator=st.sampled_from(["unbiased", "biased"]),
    seed=st.integers(0, 1000),
)
def test_equals_the_engine_exactly_for_the_same_batches(sizes, kernel, estimator, seed):
    fa, fb = _features(sum(sizes), seed)
    metric = CKAMetric(NAMES_A, NAMES_B, kernel=kernel, estimator=estimator)
    engine = MinibatchCKA(kernel=kernel, estimator=estimator)
    with pytest.warns(RuntimeWarning) if min(sizes) < (4 if estimator == "unbiased" else 2) else _nothing():
        for ba, bb in zip(_split(fa, sizes), _split(fb, sizes), strict=True):
            metric.update(ba, bb)
            engine.update(ba, bb)
    res, out = engine.compute(), metric.compute()
    assert np.array_equal(metric.cross.numpy(), res.cross)
    assert np.array_equal(metric.self_a.numpy(), res.self_a)
    assert np.array_equal(metric.self_b.numpy(), res.self_b)
    assert np.array_equal(out["matrix"].numpy(), res.matrix, equal_nan=True)
    assert int(metric.samples) == res.samples and int(metric.samples_skipped) == res.samples_skipped
    assert out["diagonal"].numel() == 0 and metric.diagonal_names == []  # no shared names


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_matches_the_float64_reference_formula():
    fa, fb = _features(60, seed=4, dtype=torch.float64)
    sizes = [20, 20, 20]
    metric = CKAMetric(NAMES_A, NAMES_B)
    for ba, bb in zip(_split(fa, sizes), _split(fb, sizes), strict=True):
        metric.update(ba, bb)
    expect = ref.minibatch_cka_matrix(
        [[b[k].numpy() for k in NAMES_A] for b in _split(fa, sizes)],
        [[b[k].numpy() for k in NAMES_B] for b in _split(fb, sizes)],
    )
    np.testing.assert_allclose(metric.compute()["matrix"].numpy(), expect, rtol=1e-10, atol=1e-12)


def test_same_batches_in_any_grouping_order_or_object_give_the_same_result():
    fa, fb = _features(96, seed=1)
    batches = list(zip(_split(fa, [16] * 6), _split(fb, [16] * 6), strict=True))
    whole = CKAMetric(NAMES_A, NAMES_B)
    for ba, bb in batches:
        whole.update(ba, bb)
    expect = whole.compute()["matrix"]
    assert float(expect.max()) < 0.99 and float(expect[:2].min()) > 0.05

    backwards = CKAMetric(NAMES_A, NAMES_B)
    for ba, bb in reversed(batches):
        backwards.update(ba, bb)
    torch.testing.assert_close(backwards.compute()["matrix"], expect, rtol=1e-12, atol=0)

    # Two "processes" (even and odd batches), merged as a sync would.
    even, odd = CKAMetric(NAMES_A, NAMES_B), CKAMetric(NAMES_A, NAMES_B)
    for k, (ba, bb) in enumerate(batches):
        (even if k % 2 == 0 else odd).update(ba, bb)
    even.merge_state(odd)
    torch.testing.assert_close(even.compute()["matrix"], expect, rtol=1e-12, atol=0)
    assert int(even.samples) == 96 and int(even.batches) == 6

    # forward() (one update per call, batch value returned) accumulates the same sums.
    fwd = CKAMetric()
    for ba, bb in batches:
        batch_val = fwd(ba, bb)
    last = CKAMetric(NAMES_A, NAMES_B)
    last.update(*batches[-1])
    assert torch.equal(batch_val["matrix"], last.compute()["matrix"])
    assert torch.equal(fwd.compute()["matrix"], expect)


def test_other_batch_sizes_give_another_estimate_of_the_same_cka():
    fa, fb = _features(384, seed=2, dtype=torch.float64)
    results = {}
    for b in (32, 64, 384):
        m = CKAMetric(NAMES_A, NAMES_B)
        for ba, bb in zip(_split(fa, [b] * (384 // b)), _split(fb, [b] * (384 // b)), strict=True):
            m.update(ba, bb)
        results[b] = m.compute()["matrix"].numpy()
    # Not the same number: each batch contributes its own unbiased HSIC estimate ...
    assert not np.allclose(results[32], results[384], rtol=1e-6, atol=0)
    # ... of the same quantity: the estimates agree within sampling noise.
    np.testing.assert_allclose(results[32], results[384], atol=0.05)
    np.testing.assert_allclose(results[64], results[384], atol=0.05)
    full = ref.cka(fa["a0"].numpy(), fb["b1"].numpy(), "linear", "unbiased")
    assert results[384][0, 1] == pytest.approx(full, abs=1e-10)


def test_self_comparison_bare_tensors_reordering_and_errors():
    fa, _ = _features(32, seed=3)
    m = CKAMetric()
    m.update(fa)  # A with itself
    out = m.compute()
    assert m.names_a == m.names_b == NAMES_A == m.diagonal_names
    np.testing.assert_allclose(out["diagonal"].numpy(), 1.0, atol=1e-6)
    torch.testing.assert_close(out["matrix"], out["matrix"].T)
    assert m.diagonal_dict() == pytest.approx({f"cka/{n}": 1.0 for n in NAMES_A}, abs=1e-6)
    res = m.to_result()
    assert res.names_a == NAMES_A and res.samples == 32
    assert res.diagonal() == pytest.approx(dict.fromkeys(NAMES_A, 1.0), abs=1e-6)

    bare = CKAMetric()
    bare.update(fa["a0"], fa["a1"])
    named = CKAMetric(["features"], ["features"])
    named.update({"features": fa["a0"]}, {"features": fa["a1"]})
    assert bare.names_a == ["features"] and torch.equal(bare.compute()["matrix"], named.compute()["matrix"])

    ordered = CKAMetric(NAMES_A)
    ordered.update({k: fa[k] for k in reversed(NAMES_A)}, fa)  # reordered to the metric's names
    torch.testing.assert_close(ordered.compute()["matrix"], out["matrix"], rtol=0, atol=0)
    with pytest.raises(FeatureError, match="differ"):
        ordered.update({"a0": fa["a0"]}, fa)
    with pytest.raises(FeatureError, match="bare tensor"):
        ordered.update(fa["a0"], fa)
    with pytest.raises(UsageError):
        CKAMetric(["x", "x"])


@pytest.mark.filterwarnings("ignore:The ``compute`` method of metric")
def test_small_batches_are_skipped_and_an_empty_metric_refuses_to_compute():
    fa, fb = _features(8, seed=5)
    m = CKAMetric(NAMES_A, NAMES_B)
    with pytest.raises(FeatureError, match="no batch"):
        m.compute()
    with pytest.warns(RuntimeWarning, match="skipping a batch of 3"):
        m.update(*_split(fa, [3])[0:1], *_split(fb, [3])[0:1])
    assert int(m.samples_skipped) == 3
    m.update(fa, fb)
    assert int(m.samples) == 8 and int(m.batches) == 1
    m.reset()
    assert int(m.samples) == 0 and m.cross.shape == (3, 2)
    assert CKAMetric.full_state_update is False


_WORKER = textwrap.dedent(
    """
    import sys, torch, torch.distributed as dist
    sys.path.insert(0, {tests!r})
    from _metric_helpers import features, split
    from cka_geo.integrations.torchmetrics import CKAMetric

    rank, world, init, out = int(sys.argv[1]), 2, sys.argv[2], sys.argv[3]
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    fa, fb = features(112, seed=7)
    sizes = [16] * 7  # odd count: the ranks hold 4 and 3 batches
    metric = CKAMetric({names_a!r}, {names_b!r})
    for k, (ba, bb) in enumerate(zip(split(fa, sizes), split(fb, sizes))):
        if k % world == rank:
            metric.update(ba, bb)
    res = metric.compute()  # syncs: states summed over both ranks
    with metric.sync_context():
        counts = int(metric.samples), int(metric.batches)
        cross = metric.cross.clone()
    torch.save({{"matrix": res["matrix"], "cross": cross, "samples": counts[0], "batches": counts[1],
                "local_batches": int(metric.batches)}}, out)
    dist.barrier()
    dist.destroy_process_group()
    """
)


def test_two_processes_with_gloo_equal_one_process(tmp_path):
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    script = tmp_path / "worker.py"
    script.write_text(_WORKER.format(tests=tests_dir, names_a=NAMES_A, names_b=NAMES_B))
    init = f"file://{tmp_path / 'rendezvous'}"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    t0 = time.time()
    procs = [
        subprocess.Popen([sys.executable, str(script), str(r), init, str(tmp_path / f"out{r}.pt")],
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for r in range(2)
    ]
    logs = [p.communicate(timeout=120)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), logs
    elapsed = time.time() - t0
    assert elapsed < 100, elapsed  # ~10 s on an idle 2-core machine (two interpreters start)

    fa, fb = _features(112, seed=7)
    one = CKAMetric(NAMES_A, NAMES_B)
    for ba, bb in zip(_split(fa, [16] * 7), _split(fb, [16] * 7), strict=True):
        one.update(ba, bb)
    expect = one.compute()["matrix"]
    for r in range(2):
        got = torch.load(tmp_path / f"out{r}.pt")
        assert got["samples"] == 112 and got["batches"] == 7 and got["local_batches"] == 4 - r
        torch.testing.assert_close(got["matrix"], expect, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(got["cross"], one.cross, rtol=1e-12, atol=1e-15)  # summed, not averaged
