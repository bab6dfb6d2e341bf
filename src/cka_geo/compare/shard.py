"""A comparison sharded across the ranks of ``torchrun``: who takes which batch, and the merge.

Batch ``i`` (cut exactly as in one process) goes to rank ``i % world``. Each rank keeps its
batches' HSIC terms (:class:`ShardCKA`); :func:`merge` puts every rank's terms back in
batch order and sums them in that order, as one process does, so the sums, the matrix
and the bootstrap intervals equal the one-process run's bit for bit whenever each batch's
terms do (same device, dtype and CPU thread count on every rank as in the one-process run).
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import torch

from cka_geo.accumulator import MinibatchCKA
from cka_geo.functional.minibatch import BatchTerms


def owns(batch: int, rank: int, world: int) -> bool:
    """Whether ``rank`` of ``world`` computes batch number ``batch`` (0-based)."""
    return batch % world == rank


def shard_images(total: int, batch_size: int, rank: int, world: int) -> int:
    """Images in the batches ``rank`` takes of ``total`` images cut into ``batch_size``."""
    count = math.ceil(total / batch_size) if batch_size > 0 else 0
    return sum(min(batch_size, total - i * batch_size) for i in range(count) if owns(i, rank, world))


class ShardCKA(MinibatchCKA):
    """A :class:`MinibatchCKA` that also keeps each batch's terms (on the CPU) with its number.

    Set :attr:`batch` to the global batch number before each :meth:`update`.
    """

    def reset(self) -> None:
        """Forget every batch seen."""
        super().reset()
        self.batch = 0
        self.kept: list[tuple[int, BatchTerms]] = []

    def batch_terms(self, ga: Any, gb: Any = None) -> BatchTerms:
        """As :meth:`MinibatchCKA.batch_terms`, with errors naming the global batch number."""
        from cka_geo.functional.minibatch import batch_terms

        return batch_terms(ga, gb, estimator=self.estimator, batch=self.batch + 1)

    def _add(self, t: BatchTerms) -> None:
        super()._add(t)
        self.kept.append((self.batch, _to_cpu(t)))

    def payload(self) -> dict[str, Any]:
        """What this rank sends to the others: names, skipped samples, numbered terms."""
        return {"names": (self.names_a, self.names_b), "skipped": self.samples_skipped, "terms": self.kept}


def _to_cpu(t: BatchTerms) -> BatchTerms:
    def cpu(x: torch.Tensor) -> torch.Tensor:
        return x.detach().to("cpu")

    return replace(t, cross=cpu(t.cross), self_a=cpu(t.self_a), self_b=cpu(t.self_b),
                   degenerate_a=cpu(t.degenerate_a), degenerate_b=cpu(t.degenerate_b),
                   sigma_a=None if t.sigma_a is None else cpu(t.sigma_a),
                   sigma_b=None if t.sigma_b is None else cpu(t.sigma_b))


def merge(parts: list[dict[str, Any]], like: MinibatchCKA) -> MinibatchCKA:
    """One accumulator holding every rank's batches, added in batch order.

    Args:
        parts: :meth:`ShardCKA.payload` of every rank.
        like: An accumulator whose kernel, estimator and bandwidth the merge takes.
    """
    acc = MinibatchCKA(kernel=like.kernel, estimator=like.estimator, rbf_frac=like.rbf_frac,
                       keep_batches=like.keep_batches, gram_dtype=like.gram_dtype)
    for part in parts:
        names_a, names_b = part["names"]
        if acc.names_a is None and names_a is not None:
            acc.names_a, acc.names_b = list(names_a), list(names_b)
        acc.samples_skipped += int(part["skipped"])
    numbered = sorted(((i, t) for part in parts for i, t in part["terms"]), key=lambda item: item[0])
    for _i, terms in numbered:
        acc._add(terms)
    return acc


__all__ = ["ShardCKA", "merge", "owns", "shard_images"]
