"""The run: both models over the same batches, every sublayer pair accumulated, and the
memory check that comes before it."""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterator
from typing import Any

import torch

from cka_geo import distributed
from cka_geo.accumulator import CKAResult, MinibatchCKA
from cka_geo.budget import CKAWorkload, batches_for, check_fits
from cka_geo.compare.options import _OWN, CompareOptions
from cka_geo.compare.shard import ShardCKA, merge, owns, shard_images
from cka_geo.errors import UsageError
from cka_geo.features import capture, forward_batch, sublayer_map


def _progress(total: int, enabled: bool | None) -> Any:
    """A tqdm bar on a terminal; plain lines (:class:`PlainProgress`) otherwise; nothing
    with ``enabled=False``."""
    tty = sys.stderr.isatty()
    if enabled is False:
        return PlainProgress(total, enabled=False)
    if not tty:
        return PlainProgress(total)
    from tqdm import tqdm

    return tqdm(total=total, unit="img", desc="cka-geo compare", file=sys.stderr, leave=False)


class PlainProgress:
    """Progress as plain stderr lines, for logs (stderr not a terminal): the estimated total
    after the first batch, then a line every 10 % of the images or every 30 s."""

    EVERY_S = 30.0

    def __init__(self, total: int, enabled: bool = True) -> None:
        self.total, self.enabled, self.done = total, enabled, 0
        self.start = time.perf_counter()
        self.last_t, self.last_tenth = self.start, 0

    def __enter__(self) -> PlainProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def update(self, n: int) -> None:
        """Count ``n`` more images; print a line when one is due."""
        first = self.done == 0
        self.done += n
        if not self.enabled or self.total <= 0:
            return
        now = time.perf_counter()
        spent = now - self.start
        tenth = 10 * self.done // self.total
        if first:
            eta = spent / self.done * self.total
            print(f"cka-geo compare: first batch {spent:.1f} s; estimated total {_span(eta)}", file=sys.stderr, flush=True)
        elif tenth > self.last_tenth or now - self.last_t >= self.EVERY_S:
            left = spent / self.done * (self.total - self.done)
            when = f"in {_span(spent)}" if left <= 0 else f"{_span(spent)} spent, about {_span(left)} left"
            print(
                f"cka-geo compare: {self.done}/{self.total} images ({100 * self.done // self.total} %), {when}",
                file=sys.stderr,
                flush=True,
            )
        else:
            return
        self.last_t, self.last_tenth = now, tenth


def _span(seconds: float) -> str:
    if seconds < 10:
        return f"{seconds:.1f} s"
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def run_cka(
    model_pre: torch.nn.Module,
    model_ft: torch.nn.Module,
    names: list[str],
    batches: Iterator[torch.Tensor],
    opts: CompareOptions,
    total: int,
    timings: dict[str, float] | None = None,
) -> CKAResult:
    """Accumulate CKA of every pre sublayer against every ft sublayer (and own changes).

    Columns of the result: ``names`` for the fine-tuned model, then ``name#own`` for the
    fine-tuned sublayer applied to the pretrained model's input when ``opts.own_change``.
    With ``timings`` (for benchmarks), seconds spent in forward passes and in CKA are added
    to its ``"forward"`` and ``"cka"`` keys (the device is synchronised around each step).

    Under ``torchrun`` (:mod:`cka_geo.distributed` initialised) each rank takes batches
    ``i % world == rank``, and every rank returns the same result: all batches' terms
    summed in batch order (:mod:`cka_geo.compare.shard`). An error on any rank is raised on
    every rank (:class:`~cka_geo.distributed.PeerFailed` on the others).
    """
    clock = _Clock(timings, next(model_pre.parameters()).device)
    paths_ft = sublayer_map(model_ft)
    apply = {n: model_ft.get_submodule(paths_ft[n]) for n in names} if opts.own_change else None
    full_batch = opts.estimator == "biased"
    # torchrun: batch i is computed by rank i % world, the terms merged in batch order
    # (cka_geo.compare.shard); one process takes every batch.
    rank, world = distributed.rank(), distributed.world()
    if world > 1 and full_batch:
        raise UsageError("--estimator biased puts every sample in one batch, which cannot be shared "
                         f"across {world} ranks; run it in one process (without torchrun)")
    kind = ShardCKA if world > 1 else MinibatchCKA
    acc = kind(kernel=opts.kernel, estimator=opts.estimator, rbf_frac=opts.rbf_frac)
    held_a: list[dict[str, torch.Tensor]] = []
    held_b: list[dict[str, torch.Tensor]] = []
    time_series = False
    autocast = _forward_precision(opts, next(model_pre.parameters()).device)
    failure: Exception | None = None
    try:
        with (
            capture(model_pre, names, pooling=opts.pooling, apply=apply) as cap_pre,
            capture(model_ft, names, pooling=opts.pooling) as cap_ft,
            _progress(shard_images(total, opts.batch_size or total, rank, world), opts.progress) as bar,
        ):
            for i, x in enumerate(batches):
                if not owns(i, rank, world):
                    continue
                time_series = time_series or x.ndim == 5
                with clock("forward"), autocast():
                    pre = forward_batch(model_pre, x, cap_pre, time_mode=opts.time_mode)
                    ft = forward_batch(model_ft, x, cap_ft, time_mode=opts.time_mode)
                cols = dict(ft.features)
                cols.update({_OWN.format(n): f for n, f in pre.applied.items()})
                if full_batch:
                    held_a.append(pre.features)
                    held_b.append(cols)
                else:
                    with clock("cka"):
                        if isinstance(acc, ShardCKA):
                            acc.batch = i
                        acc.update(pre.features, cols)
                bar.update(x.shape[0])
    except Exception as exc:  # sent to the other ranks, then raised here
        if world == 1:
            raise
        failure = exc
    if isinstance(acc, ShardCKA):
        parts = distributed.gather({**acc.payload(), "time_series": time_series}, failure)
        time_series = any(p["time_series"] for p in parts)
        acc = merge(parts, acc)
    with clock("cka"):
        if full_batch:
            acc.update(
                {n: torch.cat([h[n] for h in held_a]) for n in held_a[0]},
                {n: torch.cat([h[n] for h in held_b]) for n in held_b[0]},
            )
        result = acc.compute()
    # What was done, as the capture and the accumulator did it (not as asked): the results'
    # settings are filled from this record.
    result.extra["capture"] = {"pre": cap_pre.settings, "ft": cap_ft.settings}
    result.extra["time_series"] = time_series
    return result


def check_memory(
    model: torch.nn.Module,
    names: list[str],
    image_shape: tuple[int, ...],
    opts: CompareOptions,
    total: int,
    device: torch.device,
) -> None:
    """Refuse, before the run, sizes whose grams, terms or bootstrap memory cannot hold.

    One blank image of the probes' shape goes through the model to learn the feature widths
    and the rows per image (tokens, frames); no probe is read.

    Raises:
        UsageError: Naming the options that set the size.
    """
    blank = torch.zeros((1, *image_shape), device=device)
    with capture(model, names, pooling=opts.pooling) as cap:
        feats = forward_batch(model, blank, cap, time_mode=opts.time_mode).features
    per_image = next(iter(feats.values())).shape[0]
    width = sum(f.shape[1] for f in feats.values()) * (3 if opts.own_change else 2)
    full = opts.estimator == "biased"
    batch = opts.batch_size or total
    rows = per_image * (total if full else min(batch, total))
    work = CKAWorkload(
        rows=rows,
        width=width,
        layers_a=len(names),
        layers_b=len(names) * (2 if opts.own_change else 1),
        batches=1 if full else batches_for(total, batch),
        bootstrap=opts.bootstrap,
        held_rows=rows if full else 0,
    )
    what = f"--samples {total} with --batch-size {batch} and --bootstrap {opts.bootstrap}"
    if full:
        what = f"--estimator biased (one batch of every sample) with --samples {total}"
    if per_image > 1:
        what += f" ({per_image} rows per image: --pooling {opts.pooling} / --time-mode {opts.time_mode})"
    check_fits(work, device, what)


def _forward_precision(opts: CompareOptions, device: torch.device) -> Any:
    """A context for the forwards: bf16 autocast with ``forward_precision="bf16"``, else nothing.

    Only the forwards change: the captured features are pooled in float32 and the grams and
    sums are float32/float64 as in a float32 run.
    """
    if opts.forward_precision == "bf16":
        return lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext


class _Clock:
    """Adds wall seconds per key to a dict; does nothing (and never syncs) without one."""

    def __init__(self, timings: dict[str, float] | None, device: torch.device) -> None:
        self.timings, self.device = timings, device

    @contextlib.contextmanager
    def __call__(self, key: str) -> Iterator[None]:
        if self.timings is None:
            yield
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        start = time.perf_counter()
        yield
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.timings[key] = self.timings.get(key, 0.0) + time.perf_counter() - start
