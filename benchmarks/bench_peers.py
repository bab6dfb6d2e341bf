"""cka-geo's minibatch engine against pytorch-cka and the bare matmuls, in one interleaved run.

Not part of the test suite; it needs the peer, installed in a bench-only environment
(never in the project's own)::

    python3 -m venv /work/venv-bench
    /work/venv-bench/bin/pip install -c constraints.txt -r benchmarks/requirements-peers.txt
    PYTHONPATH=src /work/venv-bench/bin/python benchmarks/bench_peers.py [--batches 64 128 256 512 1024] [--load]

Timed in interleaved rounds (medians), per batch size, on the standard workload (36 x 36
layers, N = 2048, d = 384, float32 features; model B's features carry a +10 offset):

* ``cka-geo``: :class:`cka_geo.accumulator.MinibatchCKA` fed separate (n, d) tensors;
* ``cka-geo stacked``: the same fed views of one (L, n, d) buffer per model (no stacking copy);
* ``peer raw``: pytorch-cka's batched maths alone, its own ``CKA._accumulate_hsic`` (one
  ``mm`` per gram, ``torch.stack``, ``cka.hsic.hsic``; float32 sums, no centering);
* ``peer full``: pytorch-cka's ``compute_cka`` with models that return the features;
* ``bare``: the minimal matmuls on features already stacked and centred (one ``bmm`` per
  model into a reused buffer and one cross product per batch), the roofline of the full grams;
* ``bare blocks``: the same for the grams cka-geo makes (diagonal and upper blocks,
  :mod:`cka_geo.functional.blocks`: 3/4 of the multiply-adds from 128 rows, 5/8 from 512),
  one product per piece: the roofline of cka-geo's own maths.

Printed: seconds, cka-geo as a fraction of each roofline (bare / cka-geo; above 100 % where
the blocks save more than the rest costs) and its speed-up
over each peer (peer / cka-geo); an RBF row (pytorch-cka has no RBF kernel); each engine's
largest CKA error against a float64 reference (float64 centred features, U-centred grams,
float64 sums) on features with a +10 offset and on tiny-scale (1e-6) features. ``--load``
repeats the timings with one competing CPU-bound process (a busy loop) running.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch
from torch import nn

from cka_geo.accumulator import MinibatchCKA
from cka_geo.functional.blocks import GramBlocks, parts_for

try:
    import cka as peer
    from cka.cka import CKA as PeerCKA
except ImportError:  # pragma: no cover - a message, not a test
    sys.exit("bench_peers needs pytorch-cka: see the module docstring for the bench-only environment")

L, D, N = 36, 384, 2048

Batch = tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]


def make_batches(n: int, b: int, layers: int, offset: float, scale: float, seed: int = 0) -> list[Batch]:
    """Two models' features sharing structure; B's with ``offset``, both times ``scale``."""
    g = torch.Generator().manual_seed(seed)
    mix_a = [torch.randn(32, D, generator=g) for _ in range(layers)]
    mix_b = [torch.randn(32, D, generator=g) for _ in range(layers)]
    out = []
    for _ in range(n // b):
        z = torch.randn(b, 32, generator=g)
        fa = {f"a{i}": (torch.tanh(z @ m) + 0.5 * torch.randn(b, D, generator=g)) * scale for i, m in enumerate(mix_a)}
        fb = {f"b{i}": (torch.relu(z @ m) + 0.5 * torch.randn(b, D, generator=g) + offset) * scale for i, m in enumerate(mix_b)}
        out.append((fa, fb))
    return out


def stacked(batches: list[Batch]) -> list[Batch]:
    """The same features as views of one (L, n, d) buffer per model and batch."""
    out = []
    for fa, fb in batches:
        sa, sb = torch.stack(list(fa.values())), torch.stack(list(fb.values()))
        out.append(({k: sa[i] for i, k in enumerate(fa)}, {k: sb[i] for i, k in enumerate(fb)}))
    return out


# -- the contenders ----------------------------------------------------------------------------


def run_geo(batches: list[Batch], kernel: str = "linear") -> torch.Tensor:
    acc = MinibatchCKA(kernel=kernel, keep_batches=False)  # type: ignore[arg-type]
    for fa, fb in batches:
        acc.update(fa, fb)
    return torch.from_numpy(acc.compute().matrix)


def _peer(layers: int) -> PeerCKA:
    m1 = nn.Sequential(*[nn.Identity() for _ in range(layers)])
    m2 = nn.Sequential(*[nn.Identity() for _ in range(layers)])
    names = [str(i) for i in range(layers)]
    return PeerCKA(m1, m2, layers=names, device="cpu")


def run_peer_raw(batches: list[Batch]) -> torch.Tensor:
    """pytorch-cka's per-batch maths (its own method) on features put where its hooks put them."""
    layers = len(batches[0][0])
    c = _peer(layers)
    hxy, hxx, hyy = torch.zeros(layers, layers), torch.zeros(layers), torch.zeros(layers)
    for fa, fb in batches:
        c._model1_layer_to_feature = dict(zip(c.model1_layer_to_module, fa.values(), strict=True))
        c._model2_layer_to_feature = dict(zip(c.model2_layer_to_module, fb.values(), strict=True))
        c._accumulate_hsic(hxy, hxx, hyy)
    return c._compute_cka_matrix(hxy, hxx, hyy)


class _Lookup(nn.Module):
    """Returns the stored features of the batch whose first sample index it is given."""

    def __init__(self, feats: list[torch.Tensor], b: int) -> None:
        super().__init__()
        self.feats, self.b = feats, b

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.feats[int(x[0]) // self.b]


class _Model(nn.Sequential):
    def forward(self, x: torch.Tensor) -> torch.Tensor:  # every layer sees the indices
        for m in self:
            m(x)
        return x


def run_peer_full(batches: list[Batch]) -> torch.Tensor:
    """pytorch-cka's ``compute_cka``, the models returning the stored features."""
    b = next(iter(batches[0][0].values())).shape[0]
    m1 = _Model(*[_Lookup([fa[k] for fa, _ in batches], b) for k in batches[0][0]])
    m2 = _Model(*[_Lookup([fb[k] for _, fb in batches], b) for k in batches[0][1]])
    idx = torch.arange(len(batches) * b, dtype=torch.float32)
    loader = torch.utils.data.DataLoader(idx, batch_size=b)
    names = [str(i) for i in range(len(m1))]
    return peer.compute_cka(m1, m2, loader, layers=names, device="cpu", progress=False)[0]


def run_bare(prepared: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    layers, n = prepared[0][0].shape[:2]
    ga, gb = torch.empty(layers, n, n), torch.empty(layers, n, n)  # reused, as the engine's are
    for x, y in prepared:
        torch.bmm(x, x.transpose(1, 2), out=ga)
        torch.bmm(y, y.transpose(1, 2), out=gb)
        ga.reshape(layers, -1) @ gb.reshape(layers, -1).T


def run_bare_blocks(prepared: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    layers, n = prepared[0][0].shape[:2]
    ga, gb = (GramBlocks.empty(layers, n, parts_for(n), torch.float32, "cpu") for _ in range(2))
    for x, y in prepared:
        ga.multiply(x)
        gb.multiply(y)
        for u, v in zip([ga.diag, *ga.upper], [gb.diag, *gb.upper], strict=True):
            u.reshape(layers, -1) @ v.reshape(layers, -1).T


def prepare_bare(batches: list[Batch]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    def centred(f: dict[str, torch.Tensor]) -> torch.Tensor:
        x = torch.stack(list(f.values()))
        return x - x.mean(1, keepdim=True)

    return [(centred(fa), centred(fb)) for fa, fb in batches]


# -- timing -------------------------------------------------------------------------------------


def interleaved(fns: dict[str, Callable[[], object]], rounds: int) -> dict[str, float]:
    """Median seconds of each function, run in turn round after round (one warm-up)."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def timing_table(sizes: list[int], rounds: int, label: str) -> None:
    print(f"\n{label}: medians of {rounds} interleaved rounds, {L} x {L} layers, N = {N}, d = {D}, "
          f"{torch.get_num_threads()} threads")
    print(f"{'batch':>5} {'cka-geo':>8} {'stacked':>8} {'peer raw':>8} {'peer full':>9} {'bare':>7} {'blocks':>7}"
          f"  {'% of bare':>9} {'% blocks':>8} {'vs raw':>7} {'vs full':>7}  {'rbf':>7}")
    for b in sizes:
        batches = make_batches(N, b, L, 10.0, 1.0)
        views, bare = stacked(batches), prepare_bare(batches)
        t = interleaved({
            "geo": lambda bs=batches: run_geo(bs),
            "stacked": lambda vs=views: run_geo(vs),
            "raw": lambda bs=batches: run_peer_raw(bs),
            "full": lambda bs=batches: run_peer_full(bs),
            "bare": lambda pr=bare: run_bare(pr),
            "blocks": lambda pr=bare: run_bare_blocks(pr),
            "rbf": lambda vs=views: run_geo(vs, "rbf"),
        }, rounds)
        best = min(t["geo"], t["stacked"])
        print(f"{b:5d} {t['geo']:8.3f} {t['stacked']:8.3f} {t['raw']:8.3f} {t['full']:9.3f} {t['bare']:7.3f}"
              f" {t['blocks']:7.3f}  {t['bare'] / best:9.0%} {t['blocks'] / best:8.0%} {t['raw'] / best:6.2f}x"
              f" {t['full'] / best:6.2f}x  {t['rbf']:7.3f}")


# -- accuracy -----------------------------------------------------------------------------------


def reference64(batches: list[Batch]) -> torch.Tensor:
    """Minibatch CKA in float64 throughout: centred features, U-centred grams, float64 sums."""

    def ucentred(f: dict[str, torch.Tensor]) -> torch.Tensor:
        rows = []
        for x in f.values():
            x = x.double() - x.double().mean(0)
            k = x @ x.T
            n = k.shape[0]
            k.fill_diagonal_(0)
            r = k.sum(1)
            u = k - r[:, None] / (n - 2) - r[None, :] / (n - 2) + r.sum() / ((n - 1) * (n - 2))
            u.fill_diagonal_(0)
            rows.append(u.reshape(-1) / (n * (n - 3)) ** 0.5)
        return torch.stack(rows)

    cross = sa = sb = None
    for fa, fb in batches:
        ua, ub = ucentred(fa), ucentred(fb)
        c, a, b = ua @ ub.T, (ua * ua).sum(1), (ub * ub).sum(1)
        cross, sa, sb = (c, a, b) if cross is None else (cross + c, sa + a, sb + b)  # type: ignore[operator]
    return cross / torch.sqrt(torch.outer(sa, sb))  # type: ignore[arg-type, operator]


def accuracy_table() -> None:
    print("\nmax |CKA error| against float64 (8 x 8 layers, N = 1024 in batches of 256):")
    for label, offset, scale in (("+10 offset", 10.0, 1.0), ("scale 1e-6", 0.0, 1e-6), ("plain", 0.0, 1.0)):
        batches = make_batches(1024, 256, 8, offset, scale, seed=1)
        for fa, _ in batches:  # both models offset
            for k in fa:
                fa[k] += offset * scale
        ref = reference64(batches)
        errs = {name: (fn(batches).double() - ref).abs().max().item()
                for name, fn in (("cka-geo", run_geo), ("peer raw", run_peer_raw), ("peer full", run_peer_full))}
        print(f"  {label:10s} " + "  ".join(f"{k} {v:.1e}" for k, v in errs.items()))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batches", type=int, nargs="+", default=[256], help="batch sizes (default: the standard 256)")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--load", action="store_true", help="repeat the timings with a competing busy-loop process")
    args = p.parse_args()
    print(f"torch {torch.__version__}, pytorch-cka {getattr(peer, '__version__', '?')}")
    accuracy_table()
    timing_table(args.batches, args.rounds, "quiet")
    if args.load:
        busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        try:
            time.sleep(1.0)
            timing_table(args.batches, args.rounds, "one competing CPU-bound process")
        finally:
            busy.kill()
            busy.wait()


if __name__ == "__main__":
    main()
