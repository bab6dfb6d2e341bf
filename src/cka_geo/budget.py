"""Memory a CKA run will need, checked before it starts.

A ``--samples``, ``--batch-size`` or ``--bootstrap`` that memory cannot hold must fail in one
line before any forward pass, not as a MemoryError (or a swapping machine) after minutes of
work. The estimate counts what the accumulator and the intervals hold; it is a lower bound
(the models' own activations come on top), so the check refuses only what cannot fit.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch

from cka_geo.errors import UsageError

_GIB = 1 << 30


@dataclass(frozen=True)
class CKAWorkload:
    """The shape of a CKA run.

    Attributes:
        rows: Rows of one batch's grams (images × tokens or frames per image; every sample
            for the biased estimator's single batch).
        width: Sum of the feature widths of all layers of both models, per row.
        layers_a: Layers of model A (matrix rows).
        layers_b: Layers of model B (matrix columns, own-change columns included).
        batches: Batches whose terms are kept (for the intervals).
        bootstrap: Bootstrap replicates (0: none).
        held_rows: Rows of features held until the end (the biased estimator's full batch),
            else 0.
        runs: Fine-tuned models compared with one pretrained model at once: each keeps its
            own per-batch terms, while grams and the bootstrap are made one run at a time
            (``width`` counts the features of every run).
    """

    rows: int
    width: int
    layers_a: int
    layers_b: int
    batches: int
    bootstrap: int
    held_rows: int = 0
    runs: int = 1

    def needs(self) -> dict[str, int]:
        """Bytes per component: grams, row products, features, kept terms, bootstrap."""
        la, lb, b = self.layers_a, self.layers_b, self.rows
        return {
            "grams": 4 * (la + lb) * b * b,
            "row products": 4 * b * la * lb,
            "features": 4 * max(self.held_rows, b) * self.width,
            "per-batch terms": 2 * 8 * self.batches * (la * lb + la + lb) * self.runs,
            "bootstrap": 8 * self.bootstrap * (self.batches + 4 * la) if self.batches >= 2 else 0,
        }


def available_bytes(device: torch.device) -> int | None:
    """Free memory on ``device``: MemAvailable on a Linux host, free GPU memory on CUDA."""
    if device.type == "cuda":
        try:
            return int(torch.cuda.mem_get_info(device)[0])
        except (RuntimeError, AssertionError):  # no driver to ask
            return None
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None


def check_fits(work: CKAWorkload, device: torch.device, options: str, available: int | None = None) -> None:
    """Raise UsageError naming ``options`` when the workload cannot fit in memory.

    Args:
        work: The run's shape.
        device: Where grams and terms live (host memory is checked for CPU runs; the GPU's
            free memory for grams on CUDA, the host's for the kept terms and bootstrap).
        options: The options that set the size, as the user wrote them (for the message).
        available: Bytes free (tests); None asks the machine.
    """
    needs = work.needs()
    on_device = needs["grams"] + needs["row products"] + needs["features"]
    on_host = needs["per-batch terms"] + needs["bootstrap"]
    checks = [(on_device + on_host, device if device.type != "cuda" else torch.device("cpu"))]
    if device.type == "cuda":
        checks = [(on_device, device), (on_host, torch.device("cpu"))]
    for need, where in checks:
        free = available if available is not None else available_bytes(where)
        if free is not None and need > free:
            worst = max(needs, key=lambda k: needs[k])
            raise UsageError(
                f"{options} need about {need / _GIB:.1f} GiB ({worst}: {needs[worst] / _GIB:.1f} GiB), more "
                f"than the {free / _GIB:.1f} GiB free on {where}; use fewer samples, a smaller batch size "
                "or fewer bootstrap replicates"
            )


def batches_for(samples: int, batch_size: int) -> int:
    """Batches of ``batch_size`` that ``samples`` make (the last may be smaller)."""
    return max(1, math.ceil(samples / batch_size))


__all__ = ["CKAWorkload", "available_bytes", "batches_for", "check_fits"]
