"""The training loop under ``torchrun``: DistributedDataParallel, the global batch's shards, per-rank RNG.

:func:`~cka_geo.train.loop.fit` calls these hooks; in a one-process run each is the
identity (no process group, no wrapper, weight 1, the loop's own generator).

- The batch size is the global batch: step ``i`` takes the same indices as one process
  (``randperm`` of (seed, epoch), slice ``i``), and rank ``r`` of ``world`` takes the
  ``r``-th contiguous share of them (:func:`local_rows`; ``--batch-size`` must be a
  multiple of ``world``). A short last batch is shared as evenly as it goes; a rank left
  without a sample repeats one at weight 0.
- Each rank's loss is weighted by its share of the batch (``rows * world / global
  rows``) before DDP averages the gradients, so the update is the gradient of the global
  batch's mean loss, as in one process (exactly so for a loss that is a mean over samples).
  The logged loss is that global mean (an all-reduce).
- Rank 0's generator is seeded with ``seed`` as in one process; rank ``r`` with a seed
  derived from (seed, r) (:func:`rank_seed`), so randomised objectives (MAE masks) draw
  different masks on each rank. Every rank's generator state is saved in the checkpoint
  (``rng["generator_ranks"]``) and restored on resume with the same number of ranks.
- Rank 0 alone writes checkpoints and metrics (``fit`` gets no ``out_dir`` elsewhere).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from cka_geo import distributed
from cka_geo.errors import UsageError

_GOLDEN = 0x9E3779B97F4A7C15


class _Step(nn.Module):
    """``training_step`` as ``forward``, so that DDP sees (and syncs) every step."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: Any, generator: torch.Generator) -> Any:
        return getattr(self.model, "training_step")(batch, generator)  # noqa: B009


def check_batch_size(batch_size: int) -> None:
    """Refuse a global batch that the ranks cannot share evenly.

    Raises:
        UsageError: Naming ``--batch-size`` and the number of ranks.
    """
    world = distributed.world()
    if batch_size % world:
        raise UsageError(f"--batch-size {batch_size} is the global batch, shared by {world} ranks: "
                         f"use a multiple of {world}")


def wrap(model: nn.Module, device: torch.device) -> Any:
    """A callable ``(batch, generator) -> (loss, logs)``: DDP over the model's step under torchrun."""
    if not distributed.active():
        return getattr(model, "training_step")  # noqa: B009
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    # static_graph: the same parameters take part in every step, and those a decoder's taps
    # leave unused (later blocks, the final norm) are handled without a graph walk per step
    return DistributedDataParallel(_Step(model), device_ids=ids, static_graph=True)


def local_rows(idx: torch.Tensor) -> tuple[torch.Tensor, float]:
    """This rank's share of one global batch's indices, and the weight of its loss."""
    world = distributed.world()
    if world == 1:
        return idx, 1.0
    r, n = distributed.rank(), len(idx)
    lo, hi = r * n // world, (r + 1) * n // world
    if hi == lo:  # a short last batch with fewer samples than ranks
        return idx[:1], 0.0
    return idx[lo:hi], (hi - lo) * world / n


def global_loss(loss: torch.Tensor, weight: float) -> float:
    """The global batch's mean loss from each rank's mean (``float(loss)`` in one process)."""
    if not distributed.active():
        return float(loss.detach())
    t = torch.tensor([float(loss.detach()) * weight / distributed.world()], dtype=torch.float64)
    return float(distributed.all_reduce_sum(t)[0])


def rank_seed(seed: int) -> int:
    """The seed of this rank's generator: ``seed`` on rank 0 (as in one process)."""
    r = distributed.rank()
    return seed if r == 0 else (seed + r * _GOLDEN) % 2**63


def generator_states(gen: torch.Generator) -> list[torch.Tensor] | None:
    """Every rank's generator state, in rank order (a collective); None in one process."""
    if not distributed.active():
        return None
    return list(distributed.gather(gen.get_state()))


def restore_generator(gen: torch.Generator, rng: dict[str, Any]) -> None:
    """Set ``gen`` from a checkpoint's ``rng``: this rank's saved state, else rank 0's.

    A run resumed on another number of ranks restarts ranks > 0 from their seeds' states
    (only randomised objectives notice).
    """
    states = rng.get("generator_ranks")
    r = distributed.rank()
    if isinstance(states, list) and len(states) == distributed.world():
        gen.set_state(states[r])
    elif r == 0:
        gen.set_state(rng["generator"])


__all__ = ["check_batch_size", "generator_states", "global_loss", "local_rows", "rank_seed",
           "restore_generator", "wrap"]
