"""The run: both models over the same batches, every sublayer pair accumulated, and the
memory check that comes before it."""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from cka_geo import distributed
from cka_geo.accumulator import CKAResult, MinibatchCKA
from cka_geo.budget import CKAWorkload, batches_for, check_fits
from cka_geo.compare.options import _OWN, CompareOptions, own_names
from cka_geo.compare.shard import ShardCKA, merge, owns, shard_images
from cka_geo.errors import UsageError
from cka_geo.features import capture, forward_batch, sublayer_map
from cka_geo.functional.minibatch import full_fp32_matmul


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
    It is :func:`run_many` with one fine-tuned model.
    """
    return run_many(model_pre, [model_ft], names, batches, opts, total, timings)[0]


def run_many(
    model_pre: torch.nn.Module,
    models_ft: Sequence[torch.nn.Module],
    names: list[str],
    batches: Iterator[torch.Tensor],
    opts: CompareOptions,
    total: int,
    timings: dict[str, float] | None = None,
    sync: bool = True,
) -> list[CKAResult]:
    """:func:`run_cka` of one pretrained model against several fine-tuned ones at once.

    Each batch goes once through the pretrained model, whatever the number of fine-tuned
    models: its features (and, with ``opts.own_change``, every fine-tuned model's sublayers
    applied to its inputs, one capture per fine-tuned model on the same forward pass) are
    shared by all of them. Each fine-tuned model has its own accumulator fed exactly what a
    two-model run feeds it, so each result equals that of :func:`run_cka` bit for bit.

    Memory: the per-batch features of every run are held during a batch, and each run
    keeps its own per-batch terms (for the intervals): both grow linearly in the number of
    runs; nothing grows with the number of samples (unbiased estimator).

    With ``timings``, seconds are added to ``"forward"`` (every forward pass, own change
    included), ``"own_change"`` (the part of it spent applying fine-tuned sublayers) and
    ``"cka"``; ``sync=False`` times CUDA spans by events instead of synchronising.

    Under ``torchrun`` (:mod:`cka_geo.distributed` initialised) each rank takes batches
    ``i % world == rank``, and every rank returns the same results: all batches' terms
    summed in batch order (:mod:`cka_geo.compare.shard`). An error on any rank is raised on
    every rank (:class:`~cka_geo.distributed.PeerFailed` on the others).
    """
    clock = _Clock(timings, next(model_pre.parameters()).device, sync=sync)
    own = own_names(names, opts)
    applies: list[dict[str, Any] | None] = [None]  # without own change one capture serves all
    if own:
        applies = []
        for model_ft in models_ft:
            paths_ft = sublayer_map(model_ft)
            applies.append({n: _Timed(model_ft.get_submodule(paths_ft[n]), clock) for n in own})
    full_batch = opts.estimator == "biased"
    # torchrun: batch i is computed by rank i % world, the terms merged in batch order
    # (cka_geo.compare.shard); one process takes every batch.
    rank, world = distributed.rank(), distributed.world()
    if world > 1 and full_batch:
        raise UsageError("--estimator biased puts every sample in one batch, which cannot be shared "
                         f"across {world} ranks; run it in one process (without torchrun)")
    kind = ShardCKA if world > 1 else MinibatchCKA
    accs: list[Any] = [kind(kernel=opts.kernel, estimator=opts.estimator, rbf_frac=opts.rbf_frac) for _ in models_ft]
    held_a: list[dict[str, torch.Tensor]] = []
    held_b: list[list[dict[str, torch.Tensor]]] = [[] for _ in models_ft]
    time_series = False
    device = next(model_pre.parameters()).device
    autocast = _forward_precision(opts, device)
    failure: Exception | None = None
    try:
        with contextlib.ExitStack() as stack:
            caps_pre = [
                stack.enter_context(capture(model_pre, names, pooling=opts.pooling, apply=apply)) for apply in applies
            ]
            caps_ft = [stack.enter_context(capture(m, names, pooling=opts.pooling)) for m in models_ft]
            bar = stack.enter_context(_progress(shard_images(total, opts.batch_size or total, rank, world), opts.progress))
            for i, x in enumerate(batches):
                if not owns(i, rank, world):
                    continue
                time_series = time_series or x.ndim == 5
                with clock("forward"), autocast():
                    pre = forward_batch(model_pre, x, caps_pre[0], time_mode=opts.time_mode)
                    # the other captures of the pretrained model were filled by that same forward
                    applied = [pre.applied] + [
                        forward_batch(model_pre, x, cap, time_mode=opts.time_mode, forward=_no_forward).applied
                        for cap in caps_pre[1:]
                    ]
                    applied += [{}] * (len(models_ft) - len(applied))
                    fts = [forward_batch(m, x, cap, time_mode=opts.time_mode)
                           for m, cap in zip(models_ft, caps_ft, strict=True)]
                if full_batch:
                    held_a.append(pre.features)
                for k, (acc, ft) in enumerate(zip(accs, fts, strict=True)):
                    cols = dict(ft.features)
                    cols.update({_OWN.format(n): f for n, f in applied[k].items()})
                    if full_batch:
                        held_b[k].append(cols)
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
    if world > 1:  # every rank gathers every batch's terms, merged in batch order
        merged: list[Any] = []
        for acc in accs:
            parts = distributed.gather({**acc.payload(), "time_series": time_series}, failure)
            time_series = any(p["time_series"] for p in parts)
            merged.append(merge(parts, acc))
        accs = merged
    results = []
    for k, acc in enumerate(accs):
        with clock("cka"):
            if full_batch:
                acc.update(
                    {n: torch.cat([h[n] for h in held_a]) for n in held_a[0]},
                    {n: torch.cat([h[n] for h in held_b[k]]) for n in held_b[k][0]},
                )
            result = acc.compute()
        # What was done, as the capture and the accumulator did it (not as asked): the
        # results' settings are filled from this record.
        result.extra["capture"] = {"pre": caps_pre[min(k, len(caps_pre) - 1)].settings, "ft": caps_ft[k].settings}
        result.extra["time_series"] = time_series
        results.append(result)
    clock.finish()
    return results


def _no_forward(frames: torch.Tensor) -> None:
    """The forward of a capture already filled by another's forward pass: nothing to run."""
    return None


def check_memory(
    model: torch.nn.Module,
    names: list[str],
    image_shape: tuple[int, ...],
    opts: CompareOptions,
    total: int,
    device: torch.device,
    runs: int = 1,
) -> None:
    """Refuse, before the run, sizes whose grams, terms or bootstrap memory cannot hold.

    One blank image of the probes' shape goes through the model to learn the feature widths
    and the rows per image (tokens, frames); no probe is read. ``runs`` fine-tuned models
    compared at once (:func:`run_many`) hold their features side by side and keep a set of
    per-batch terms each.

    Raises:
        UsageError: Naming the options that set the size.
    """
    blank = torch.zeros((1, *image_shape), device=device)
    with capture(model, names, pooling=opts.pooling) as cap:
        feats = forward_batch(model, blank, cap, time_mode=opts.time_mode).features
    per_image = next(iter(feats.values())).shape[0]
    own = set(own_names(names, opts))
    # pretrained features (once per capture: one per run with own change), then each run's
    # fine-tuned features and own-change features
    one = sum(f.shape[1] for f in feats.values())
    width = one * (runs if own else 1) + runs * (one + sum(f.shape[1] for n, f in feats.items() if n in own))
    full = opts.estimator == "biased"
    batch = opts.batch_size or total
    rows = per_image * (total if full else min(batch, total))
    work = CKAWorkload(
        rows=rows,
        width=width,
        layers_a=len(names),
        layers_b=len(names) + len(own),
        batches=1 if full else batches_for(total, batch),
        bootstrap=opts.bootstrap,
        held_rows=rows if full else 0,
        runs=runs,
    )
    what = f"--samples {total} with --batch-size {batch} and --bootstrap {opts.bootstrap}"
    if full:
        what = f"--estimator biased (one batch of every sample) with --samples {total}"
    if per_image > 1:
        what += f" ({per_image} rows per image: --pooling {opts.pooling} / --time-mode {opts.time_mode})"
    if runs > 1:
        what += f" for {runs} fine-tuned checkpoints"
    check_fits(work, device, what)


def _forward_precision(opts: CompareOptions, device: torch.device) -> Any:
    """A context for the forwards: bf16 autocast with ``forward_precision="bf16"``, else
    full float32 matmuls.

    Only the forwards change: the captured features are pooled in float32 and the grams and
    sums are float32/float64 as in a float32 run. A float32 run is float32 whatever the
    process set: libraries set ``torch.set_float32_matmul_precision("medium")`` at import
    (torchgeo/terratorch do), which lets CPU (oneDNN) and CUDA matmuls run in bf16/TF32 and
    moved a real DINOv2's block outputs by 0.05 here.
    """
    if opts.forward_precision == "bf16":
        return lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return full_fp32_matmul


class _Clock:
    """Adds seconds per key to a dict; does nothing (and never syncs) without one.

    On CPU the wall time of each span. On CUDA, with ``sync`` (benchmarks), the device is
    synchronised around each span; without it (the stage costs every comparison records),
    or for spans marked ``events``, a pair of CUDA events is recorded and the spans are
    summed at :meth:`finish`, with one synchronisation.
    """

    def __init__(self, timings: dict[str, float] | None, device: torch.device, sync: bool = True) -> None:
        self.timings, self.device, self.sync = timings, device, sync
        self._pending: list[tuple[str, Any, Any]] = []

    @contextlib.contextmanager
    def __call__(self, key: str, events: bool = False) -> Iterator[None]:
        if self.timings is None:
            yield
            return
        cuda = self.device.type == "cuda"
        if cuda and (events or not self.sync):
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            yield
            end.record()
            self._pending.append((key, begin, end))
            return
        if cuda:
            torch.cuda.synchronize(self.device)
        start = time.perf_counter()
        yield
        if cuda:
            torch.cuda.synchronize(self.device)
        self.timings[key] = self.timings.get(key, 0.0) + time.perf_counter() - start

    def finish(self) -> None:
        """Add the spans timed by CUDA events (one synchronisation)."""
        if self.timings is None or not self._pending:
            return
        torch.cuda.synchronize(self.device)
        for key, begin, end in self._pending:
            self.timings[key] = self.timings.get(key, 0.0) + begin.elapsed_time(end) / 1000.0
        self._pending.clear()


class _Timed:
    """A fine-tuned sublayer applied for the own change, its time added to ``own_change``."""

    def __init__(self, module: torch.nn.Module, clock: _Clock) -> None:
        self.module, self.clock = module, clock

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with self.clock("own_change", events=True):
            return self.module(*args, **kwargs)
