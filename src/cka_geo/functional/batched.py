"""The engine's two bulk steps, written to run as few, large tensor operations as possible.

* :func:`fast_linear_grams`: one width's linear grams of one batch from one (L, n, p)
  stack: with features that already lie in one buffer (consecutive (n, p) slices of an
  (L, n, p) tensor, as :func:`cka_geo.features.hooks.capture` gives them) there is no
  stacking copy; layers with a small offset need no centering pass either, the others are
  shifted in one pass by the mean of a few sampled rows (no column sums of the whole batch),
  what each gram kept checked from its own sums (:func:`fast_checks`); no scaling pass where
  the grams' magnitudes are safe.
* :func:`frobenius`: every ⟨K_a, K_b⟩_F of two gram stacks as a few large matmuls over
  chunks of the n² gram entries, each float32 partial summing :data:`FROB_TERMS` terms at
  most, the partials added in float64.

Why few, large operations: every torch CPU operation on a tensor of more than a few thousand
elements is an OpenMP parallel region ending in a barrier. With another process competing
for the cores, a barrier waits for a descheduled thread for up to a scheduler time slice, so
the time goes with the number of regions, not with the work: the former per-layer scaling
loops and one small matmul per gram row (n of them per batch) made the engine 20 times slower
under one competing process. Here a batch costs a fixed handful of regions per width.

Where float32 is safe (the float64 guarantee is about the sums and the HSIC terms): the
features are shifted before the gram where they have an offset, by the mean of a few of
their rows, or centred where that shift would leave more than a bit of offset in the gram (no
cancellation against it; U-centering annihilates a shift, and H K H = X_c X_cᵀ, Kornblith et
al. 2019), scaled by an exact power of two (no under- or
overflow; unscaled wherever the gram's diagonal is within [2⁻⁴⁰, 2⁴⁰], which leaves every
float32 intermediate far inside its normal range), and every float32 sum runs over at most a few thousand terms of like size, whose
relative rounding error (≈ √m · 2⁻²⁴ for m terms) stays far below the 1e-6 stated for float32
input; the terms of Song et al.'s (2012) unbiased HSIC_1 and the minibatch sums of Nguyen,
Raghu & Kornblith (2021) are then formed and added in float64.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from cka_geo.functional.precision import is_constant, pow2_scale

if TYPE_CHECKING:
    from cka_geo.functional.blocks import GramBlocks

#: Most gram entries behind one float32 partial sum of the Frobenius products.
FROB_TERMS = 8192

# The safe range of a float32 gram's largest diagonal entry, max ‖x_i‖²: every gram entry is
# at most that (Cauchy-Schwarz), the n² products of two grams stay below 2¹²⁰ for n < 2²⁰, and
# their leading terms far above float32's smallest normal (2⁻¹²⁶). Outside it, the features
# are scaled by a power of two first.
_LOW, _HIGH = 2.0**-40, 2.0**40
# Multiply-adds under which the cross product runs on one thread (36 x 36 layers at n <= 128).
_SMALL_PRODUCT = 1 << 25
# Fewest gram entries per chunk when a Frobenius product is cut in two for the threads.
_HALF_CHUNK = 1024
# Most rows, evenly spaced through the batch, whose mean shifts a layer with an offset.
_HEAD = 16


def as_stack(tensors: list[torch.Tensor]) -> torch.Tensor | None:
    """The tensors as one (L, n, p) view when they are consecutive slices of one buffer.

    Args:
        tensors: (n, p) tensors of one shape, dtype and device.

    Returns:
        A view of their common storage with no copy, or None when they are not laid out so
        (then they must be stacked).
    """
    first = tensors[0]
    n, p = first.shape
    if not first.is_contiguous():
        return None
    step = n * p
    base, storage = first.storage_offset(), first.untyped_storage().data_ptr()
    for j, t in enumerate(tensors):
        if (
            t.shape != first.shape
            or t.dtype != first.dtype
            or not t.is_contiguous()
            or t.untyped_storage().data_ptr() != storage
            or t.storage_offset() != base + j * step
        ):
            return None
    return first.as_strided((len(tensors), n, p), (step, p, 1))


_LOADAVG = "/proc/loadavg"


def _cores() -> int:
    """The cores this process may run on (its affinity), else the machine's."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return os.cpu_count() or 1
_CHECK_EVERY = 0.25  # seconds between two looks at the run queue
_state = {"checked": -1.0, "busy": True}


def oversubscribed() -> bool:
    """Whether more threads are runnable than the machine has cores, right now (cached 0.25 s).

    Read from the run-queue count of Linux's ``/proc/loadavg`` (its fourth field, "running/
    total", counts this thread and any spinning worker of ours), against the cores this
    process may use (its CPU affinity). The count is host-wide, so in a container pinned to a
    few cores of a busy host it says busy (the safe choice); a CPU quota without pinning is
    not seen. Where it cannot be read, the machine is taken as busy (one thread).
    """
    now = time.monotonic()
    if now - _state["checked"] < _CHECK_EVERY:
        return bool(_state["busy"])
    try:
        with open(_LOADAVG, "rb") as f:
            running = int(f.read().split()[3].split(b"/")[0])
        busy = running > _cores()
    except (OSError, ValueError, IndexError):
        busy = True
    _state.update(checked=now, busy=busy)
    return busy


@contextlib.contextmanager
def one_thread(always: bool = False) -> Iterator[None]:
    """Run the block's memory-bound CPU steps on one thread when the machine is oversubscribed.

    For copies, centering and sums over grams: with another process competing for the cores,
    each of their parallel regions waits at its barrier for a descheduled thread (measured:
    a centering pass 1.6 ms on one thread, 28 ms on two, with the machine's two cores
    oversubscribed), so there they run on one thread; on a quiet machine (see
    :func:`oversubscribed`) they keep torch's threads, which halves them on two cores.

    The thread count must change no bit of a result, or CKA values would depend on the
    machine's load. torch splits a reduction with two or more outputs along its outputs (each
    output summed by one thread in one order) but a reduction to a single value into one
    partial per thread, and a batched matmul with a batch of one may be split along its inner
    dimension: so the callers pass ``always=True`` for stacks of one layer (and for the small
    cross products), which then run on one thread whatever the load. No effect on CUDA tensors.

    Args:
        always: One thread even on a quiet machine.
    """
    threads = torch.get_num_threads()
    if threads == 1 or not (always or oversubscribed()):
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@dataclass
class GramWork:
    """Work buffers an accumulator keeps between batches, so that grams need no new memory.

    Only memory: what a batch computes depends on its own features alone.

    Attributes:
        buffers: Buffers for stacked or centred features, by shape, dtype and device.
    """

    buffers: dict[tuple[Any, ...], torch.Tensor] = field(default_factory=dict)

    def buffer(self, like: torch.Tensor, count: int) -> torch.Tensor:
        """A (count, n, p) buffer of ``like``'s dtype and device, reused between calls."""
        key = (count, *like.shape, like.dtype, like.device)
        buf = self.buffers.get(key)
        if buf is None:
            buf = self.buffers[key] = torch.empty((count, *like.shape), dtype=like.dtype, device=like.device)
        return buf


def fast_linear_grams(
    tensors: list[torch.Tensor], out: GramBlocks, work: GramWork
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Linear grams of one width's features of one batch into ``out``, unscaled.

    The features (all of the grams' dtype) are used as one (L, n, p) stack: their own
    buffer when they lie in one (no copy), else one stacking copy into ``work``. Each layer
    whose offset is large against its spread is shifted by the mean c of at most :data:`_HEAD`
    of its rows, evenly spaced through the batch (every ⌈n / 16⌉-th; one pass for all of
    them, no column sums of the whole batch); the others keep their own values (x − 0 is x exactly). Both give the same
    HSIC in exact arithmetic: U-centering (and H · H for the biased estimator) annihilates the
    row and column terms a shift adds to X Xᵀ. In float32 the shifted gram keeps a residual
    offset n ‖μ − c‖², about ‖X_c‖² / :data:`_HEAD`; :func:`fast_checks` reads what each
    gram kept from its own sums and sends a layer whose residual exceeds its centred energy
    (more than a bit lost to cancellation) to the scaled, centred path. Every choice is a pure
    function of the layer's own batch, so identical features give bit-identical grams in
    every model and wrapper.

    Args:
        tensors: L features (n, p) of one width and of ``out``'s dtype.
        out: Blocks for their L grams (see :class:`~cka_geo.functional.blocks.GramBlocks`).
        work: Work buffers.

    Returns:
        ``(trace, shift_sq, peak)``: (L,) float64 ‖X − 1cᵀ‖² (the grams' traces), n ‖c‖²
        (0 for layers not shifted) and max_i ‖x_i − c‖² (the largest diagonal entry), for
        :func:`fast_checks` once the grams' sums are known.
    """
    count, (n, _) = len(tensors), tensors[0].shape
    raw = as_stack(tensors)
    copied = raw is None
    single = count == 1  # reductions to one value, a matmul batch of one: one thread (see one_thread)
    if raw is None:
        raw = work.buffer(tensors[0], count)
        with one_thread(single):
            torch.stack(tensors, out=raw)  # 0.82x a loop of copies at 64 rows, 0.9x at 256, alike at 1024
    with one_thread(single):
        # The sampled rows' mean and spread only choose between two paths that are exact in
        # arithmetic (a small view, no pass over the batch); the gram's own sums check the choice.
        head = raw[:, :: -(-n // _HEAD)]  # at most _HEAD rows, evenly spaced over the whole batch (a view)
        c = head.mean(1, keepdim=True)
        spread = (head - c).square().sum((1, 2)) * (n / head.shape[1])
        shifted = n * c.square().sum((1, 2)) > 0.25 * spread
        x = raw
        if bool(shifted.any()):
            c = c * shifted.to(raw.dtype)[:, None, None]
            x = torch.sub(raw, c, out=raw if copied else work.buffer(tensors[0], count))
            shift_sq = n * c.square().sum((1, 2)).to(torch.float64)
        else:
            shift_sq = torch.zeros(count, dtype=torch.float64, device=raw.device)
    # A small product is bound by its parallel region's barrier, not its work: one thread then
    # when the machine is oversubscribed (a single layer runs on one thread always, inside
    # GramBlocks.multiply; see one_thread).
    with one_thread() if count * n * n * x.shape[-1] < _SMALL_PRODUCT else contextlib.nullcontext():
        out.multiply(x)
    with one_thread(single):
        diag = out.diagonal()
        trace = diag.sum((-2, -1), dtype=torch.float64)
        peak = diag.amax((-2, -1)).to(torch.float64)
    return trace, shift_sq, peak


def fast_checks(
    trace: torch.Tensor, shift_sq: torch.Tensor, peak: torch.Tensor, sum_all: torch.Tensor, n: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """What :func:`fast_linear_grams`' grams kept, from their own sums: (constant, redo) per layer.

    With K = (X − 1cᵀ)(X − 1cᵀ)ᵀ, its sum 1ᵀK1 = n² ‖μ − c‖² gives the residual offset
    r = n ‖μ − c‖² the gram kept, and its trace less r the centred energy ‖X_c‖². A layer is
    redone by the scaled, centred path when its largest diagonal entry left the safe range
    [2⁻⁴⁰, 2⁴⁰] (features far from unit magnitude, constant, NaN or Inf) or r exceeds ‖X_c‖².
    The constant rule (:func:`~cka_geo.functional.precision.is_constant`) is ‖X_c‖² ≤ τ² E
    with E = ‖X − 1cᵀ‖² + n ‖c‖² (‖X‖² for a layer not
    shifted; for a shifted one it differs from ‖X‖² by 2n c·(μ − c), a relative O(τ) where
    the rule decides).

    Args:
        trace: (L,) float64 traces of the grams (their diagonals before any zeroing).
        shift_sq: (L,) float64 n ‖c‖².
        peak: (L,) float64 largest diagonal entries.
        sum_all: (L,) float64 1ᵀK1 of the whole grams, diagonal included.
        n: Rows of the batch.
        dtype: The features' (and grams') dtype, which sets τ.
    """
    residual = sum_all / n
    centred = trace - residual
    redo = ~((peak >= _LOW) & (peak <= _HIGH)) | ~(residual <= centred)  # NaN: redo
    return is_constant(centred, trace + shift_sq, dtype), redo


def scaled_stack(chunk: list[torch.Tensor], dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Features scaled by powers of two into [0.5, 1), cast to ``dtype``, centred: (x, s, n ‖μ‖²).

    The general path (the RBF kernel, features of another dtype than the grams', magnitudes
    outside the fast path's safe range). float64 features headed for float32 grams are
    scaled before the cast (their range is wider than float32's); the others after.
    """
    if all(torch.promote_types(t.dtype, dtype) == dtype for t in chunk):
        # The usual case, every cast exact: one stack, then each layer's max |x| read from it.
        x = torch.stack([t.to(dtype) for t in chunk])
        s = pow2_scale(torch.maximum(x.amax((1, 2)), x.amin((1, 2)).neg()))  # 7x faster than an inf-norm
        x.mul_(s.to(dtype)[:, None, None])
    else:
        pre = [t.dtype == torch.float64 and dtype != torch.float64 for t in chunk]
        s = pow2_scale(torch.stack([t.abs().amax() for t in chunk]))
        x = torch.stack([(t * s[j]).to(dtype) if pre[j] else t.to(dtype) for j, t in enumerate(chunk)])
        post = s.clone()
        post[[j for j, p in enumerate(pre) if p]] = 1.0
        x.mul_(post.to(dtype)[:, None, None])
    mu = x.mean(dim=1, keepdim=True)
    x -= mu
    return x, s, x.shape[1] * mu.square().sum((1, 2)).to(torch.float64)


def frobenius(ka: torch.Tensor, kb: torch.Tensor) -> torch.Tensor:
    """All ⟨K_a, K_b⟩_F of two stacks of grams or gram pieces, (L_A, L_B) in float64.

    Args:
        ka: (L_A, ...) grams (or pieces of them) of model A.
        kb: (L_B, ...) the same entries of model B's.

    The entries of each layer are cut into chunks of at most :data:`FROB_TERMS`; each chunk
    is one matmul (L_A, m) @ (m, L_B) of the batched product, with no copy of either stack,
    and the float32 partials add in float64 (a single float32 sum over all n² entries would
    lose √(n²) more digits).
    """
    la, lb = ka.shape[0], kb.shape[0]
    flat_a, flat_b = ka.reshape(la, -1), kb.reshape(lb, -1)
    size = flat_a.shape[1]
    m = min(size, FROB_TERMS)
    if m == size and size >= 2 * _HALF_CHUNK:  # two chunks rather than one: a batch of two runs on both threads
        m = size // 2
    c = size // m
    head_a = flat_a[:, : c * m].unflatten(1, (c, m)).transpose(0, 1)  # (c, L_A, m), a view
    head_b = flat_b[:, : c * m].unflatten(1, (c, m)).permute(1, 2, 0)  # (c, m, L_B), a view
    # A batch of one chunk, which torch may split along its inner dimension by thread, and a
    # single output run on one thread whatever the load (see one_thread); a small product
    # (bound by its parallel region's barrier) on one thread when the machine is
    # oversubscribed. A batch of two or more chunks is split along the batch: the same bits on
    # any thread count. The remainder (under FROB_TERMS entries) is a batch of one: one thread.
    threads: contextlib.AbstractContextManager[None]
    if c == 1 or la * lb == 1:
        threads = one_thread(always=True)
    else:
        threads = one_thread() if la * lb * size < _SMALL_PRODUCT else contextlib.nullcontext()
    with threads:
        out = torch.bmm(head_a, head_b).sum(0, dtype=torch.float64)
    if c * m < size:
        with one_thread(always=True):
            out += (flat_a[:, c * m :] @ flat_b[:, c * m :].T).to(torch.float64)
    return out


__all__ = ["FROB_TERMS", "GramWork", "as_stack", "fast_checks", "fast_linear_grams", "frobenius", "one_thread", "oversubscribed",
           "scaled_stack"]
