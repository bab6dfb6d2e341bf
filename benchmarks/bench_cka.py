"""Speed, accuracy and memory of the all-pairs minibatch CKA engine.

The standard workload (issue 2): 36 x 36 layer pairs, N = 2048 samples in batches of 256,
width d = 384, linear kernel, unbiased HSIC_1, float32 features. Printed, all measured in this
one run:

* seconds for the engine (best of repeats, interleaved with the bare matmuls below);
* achieved GFLOP/s over the minimal flop count: per batch the grams (2 b² d per layer, both
  models) plus one cross product (2 L_A L_B b²);
* torch's matmul GFLOP/s on this machine (a large square matmul, and a batched matmul of
  the grams' own shape) and the engine's rate as a fraction of the larger; and the same
  minimal matmuls run bare (features already stacked and centred, one bmm per model and
  one cross product per batch), timed alternately with the engine so that both see the
  same machine, with the engine's speed as a fraction of theirs;
* the speed-up over a per-pair loop that recomputes both grams for every pair, as common
  CKA code does (timed on the first batch, scaled by the number of batches);
* the largest error against a float64 reference (grams, U-centering and sums in float64);
* an RBF row; and the peak memory at N = 1024 versus N = 8192 (fresh processes).

Usage: python benchmarks/bench_cka.py [--device cpu|cuda] [--quick]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch

from cka_geo.accumulator import MinibatchCKA
from cka_geo.functional import gram_rbf, hsic

L, D, N, B = 36, 384, 2048, 256


def make_batches(n: int, b: int, device: torch.device, seed: int = 0) -> list[tuple[dict, dict]]:
    """Features of two 36-layer models whose layers share structure (not pure noise)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    mix_a = [torch.randn(32, D, generator=g) for _ in range(L)]
    mix_b = [torch.randn(32, D, generator=g) for _ in range(L)]
    out = []
    for _ in range(n // b):
        z = torch.randn(b, 32, generator=g)
        fa = {f"a{i}": (torch.tanh(z @ mix_a[i]) + 0.5 * torch.randn(b, D, generator=g)).to(device) for i in range(L)}
        fb = {f"b{i}": (torch.relu(z @ mix_b[i]) + 0.5 * torch.randn(b, D, generator=g) + 10).to(device) for i in range(L)}
        out.append((fa, fb))
    return out


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def run_engine(batches, kernel: str, device: torch.device):
    acc = MinibatchCKA(kernel=kernel)
    for fa, fb in batches:
        acc.update(fa, fb)
    res = acc.compute()
    sync(device)
    return res


def run_matmuls(batches, device: torch.device) -> None:
    """The minimal matmul work alone, as torch does it at its best: per batch one batched
    gram matmul per model on features already stacked and centred, and one cross product."""
    for x, y in batches:
        ga = torch.bmm(x, x.transpose(1, 2))
        gb = torch.bmm(y, y.transpose(1, 2))
        ga.reshape(L, -1) @ gb.reshape(L, -1).T
    sync(device)


def seconds(fn, device: torch.device) -> float:
    sync(device)
    t = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t


def time_engine(batches, kernel: str, device: torch.device, repeats: int) -> tuple[float, float, object]:
    """Best-of-``repeats`` seconds of the engine and of the bare matmuls, interleaved so that
    both see the same machine (a shared machine's speed drifts between runs)."""
    stacked = [(torch.stack(list(fa.values())), torch.stack(list(fb.values()))) for fa, fb in batches]
    res = run_engine(batches[:1], kernel, device)  # warm-up
    run_matmuls(stacked[:1], device)
    engine, bare = [], []
    for _ in range(repeats):
        engine.append(seconds(lambda: run_engine(batches, kernel, device), device))
        bare.append(seconds(lambda: run_matmuls(stacked, device), device))
    res = run_engine(batches, kernel, device)
    return min(engine), min(bare), res


def matmul_rate(device: torch.device) -> tuple[float, float]:
    """GFLOP/s of a 4096² float32 matmul and of a (36, 256, 384) gram-shaped bmm."""
    a = torch.randn(4096, 4096, device=device)
    x = torch.randn(L, B, D, device=device)
    rates = []
    for fn, flops in ((lambda: a @ a, 2 * 4096**3), (lambda: torch.bmm(x, x.transpose(1, 2)), 2 * L * B * B * D)):
        fn()
        sync(device)
        reps, t = 0, time.perf_counter()
        while time.perf_counter() - t < 1.0 or reps < 3:
            fn()
            reps += 1
        sync(device)
        rates.append(flops * reps / (time.perf_counter() - t) / 1e9)
    return rates[0], rates[1]


def reference64(batches, kernel: str) -> torch.Tensor:
    """Float64 throughout: grams, U-centering (written out here), products and sums."""
    cross = torch.zeros(L, L, dtype=torch.float64)
    sa = torch.zeros(L, dtype=torch.float64)
    sb = torch.zeros(L, dtype=torch.float64)

    def ucentred(feats: dict) -> torch.Tensor:
        rows = []
        for x in feats.values():
            x = x.detach().cpu().double()
            x = x - x.mean(0)
            k = x @ x.T if kernel == "linear" else gram_rbf(x, 0.4)[0]
            n = k.shape[0]
            k = k - torch.diag(torch.diag(k))
            r = k.sum(1)
            u = k - r[:, None] / (n - 2) - r[None, :] / (n - 2) + r.sum() / ((n - 1) * (n - 2))
            u = u - torch.diag(torch.diag(u))
            rows.append(u.reshape(-1) / (n * (n - 3)) ** 0.5)
        return torch.stack(rows)

    for fa, fb in batches:
        ua, ub = ucentred(fa), ucentred(fb)
        cross += ua @ ub.T
        sa += (ua * ua).sum(1)
        sb += (ub * ub).sum(1)
    return cross / torch.sqrt(torch.outer(sa, sb))


def per_pair_loop_seconds(batch, device: torch.device) -> float:
    """A per-pair loop on one batch: both grams recomputed for every pair, HSIC per pair."""
    fa, fb = batch
    sync(device)
    t = time.perf_counter()
    for x in fa.values():
        for y in fb.values():
            xc, yc = x - x.mean(0), y - y.mean(0)
            k, l = xc @ xc.T, yc @ yc.T
            kl, kk, ll = hsic(k, l), hsic(k, k), hsic(l, l)
            _ = kl / (kk * ll).sqrt()
    sync(device)
    return time.perf_counter() - t


def memory_child(n: int, device: str) -> None:
    """Run the engine over n samples made batch by batch; print peak memory as JSON."""
    dev = torch.device(device)
    g = torch.Generator(device="cpu").manual_seed(0)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    acc = MinibatchCKA()
    for _ in range(n // B):
        fa = {f"a{i}": torch.randn(B, D, generator=g).to(dev) for i in range(L)}
        fb = {f"b{i}": torch.randn(B, D, generator=g).to(dev) for i in range(L)}
        acc.update(fa, fb)
        del fa, fb
    acc.compute()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    cuda = torch.cuda.max_memory_allocated() if dev.type == "cuda" else None
    print(json.dumps({"rss_peak_mib": peak / 1024, "rss_growth_mib": (peak - base) / 1024, "cuda_peak_mib": None if cuda is None else cuda / 2**20}))


def peak_memory(n: int, device: str) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--memory-child", str(n), "--device", device],
        capture_output=True, text=True, check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--quick", action="store_true", help="skip the memory runs")
    p.add_argument("--memory-child", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.memory_child:
        memory_child(args.memory_child, args.device)
        return
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"device: {name}; torch {torch.__version__}")
    print(f"workload: {L} x {L} layer pairs, N = {N} in batches of {B}, d = {D}, unbiased HSIC_1, float32 input")
    batches = make_batches(N, B, device)
    nb = len(batches)
    flops = nb * (2 * (2 * L) * B * B * D + 2 * L * L * B * B)
    square, gram_shaped = matmul_rate(device)
    peak = max(square, gram_shaped)
    print(f"torch matmul: {square:.1f} GFLOP/s (4096² square), {gram_shaped:.1f} GFLOP/s ({L} x {B}x{D} bmm)")
    for kernel in ("linear", "rbf"):
        sec, bare, res = time_engine(batches, kernel, device, args.repeats)
        ref = reference64(batches, kernel)
        err = (torch.from_numpy(res.matrix) - ref).abs().max().item()
        rate = flops / sec / 1e9
        line = (
            f"{kernel:6s}: {sec:.3f} s, {rate:.1f} GFLOP/s over the minimal flops = {rate / peak:.0%} of the best matmul rate,"
            f" {bare / sec:.0%} of the same matmuls run bare ({flops / bare / 1e9:.1f} GFLOP/s, {bare:.3f} s);"
            f" max |error| vs float64 = {err:.1e}"
        )
        if kernel == "linear":
            loop = per_pair_loop_seconds(batches[0], device) * nb
            line += f"; per-pair loop {loop:.1f} s (1 batch timed, x{nb}) -> speed-up {loop / sec:.0f}x"
        print(line)
    if not args.quick:
        small, large = peak_memory(1024, args.device), peak_memory(8192, args.device)
        key = "cuda_peak_mib" if device.type == "cuda" else "rss_peak_mib"
        print(
            f"peak memory: N=1024 {small[key]:.0f} MiB, N=8192 {large[key]:.0f} MiB, ratio {large[key] / small[key]:.3f}"
            f" (growth during the run: {small['rss_growth_mib']:.0f} vs {large['rss_growth_mib']:.0f} MiB RSS)"
        )


if __name__ == "__main__":
    main()
