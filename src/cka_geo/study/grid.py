"""The study's grid: one cell per encoder x task x label fraction x decoder x adaptation x seed.

Cell ids are stable (built from the names and values only, in a fixed order), so a rerun
finds its finished cells again, and ``--shard i/n`` splits the same grid the same way in
every process: cell k of the grid (in config order) belongs to shard ``k mod n``.

Decoders are the segmentation decoders of :mod:`cka_geo.train.decoders`; classification
and regression heads are linear on the pooled features, so for those tasks the decoder axis
is the one value ``linear``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from cka_geo.errors import UsageError
from cka_geo.study.config import EncoderSpec, StudyConfig, TaskSpec


@dataclass(frozen=True)
class Cell:
    """One fine-tune -> evaluate -> compare -> probe run of the grid."""

    encoder: EncoderSpec
    task: TaskSpec
    label_fraction: float
    decoder: str
    adaptation: str
    seed: int

    @property
    def id(self) -> str:
        """The stable id, e.g. ``mae__water__lf0.5__linear__full__s0`` (also its folder name)."""
        return "__".join((self.encoder.name, self.task.name, f"lf{self.label_fraction:g}", self.decoder,
                          self.adaptation, f"s{self.seed}"))

    @property
    def setting(self) -> str:
        """The cell's setting without encoder and seed: what rankings compare encoders within."""
        return f"{self.task.name}/lf{self.label_fraction:g}/{self.decoder}/{self.adaptation}"

    @property
    def mode(self) -> tuple[str, int]:
        """``(adaptation, last_k)`` as :func:`cka_geo.train.runs.finetune` takes them."""
        if self.adaptation.startswith("last-"):
            return "last-k", int(self.adaptation.removeprefix("last-"))
        return self.adaptation, 0

    def keys(self) -> dict[str, Any]:
        """The grid coordinates (the columns of the study's tables)."""
        return {"cell": self.id, "encoder": self.encoder.name, "task": self.task.name, "task_type": self.task.task,
                "label_fraction": self.label_fraction, "decoder": self.decoder, "adaptation": self.adaptation,
                "seed": self.seed, "setting": self.setting}


def expand(cfg: StudyConfig) -> list[Cell]:
    """All cells of the grid, in config order (encoders, tasks, fractions, decoders, adaptations, seeds)."""
    cells: list[Cell] = []
    seen: set[str] = set()
    for enc in cfg.encoders:
        for task in cfg.tasks:
            decoders = cfg.decoders if task.task == "segmentation" else ["linear"]
            for frac in cfg.label_fractions:
                for dec in decoders:
                    for adapt in cfg.adaptations:
                        for seed in cfg.seeds:
                            cell = Cell(enc, task, frac, dec, adapt, seed)
                            if cell.id not in seen:
                                seen.add(cell.id)
                                cells.append(cell)
    return cells


def parse_shard(text: str) -> tuple[int, int]:
    """``"i/n"`` -> ``(i, n)`` with 0 <= i < n; anything else is refused naming ``--shard``."""
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if m is None or not 0 <= int(m.group(1)) < int(m.group(2)):
        raise UsageError(f"--shard {text!r}: expected i/n with 0 <= i < n, e.g. 0/2")
    return int(m.group(1)), int(m.group(2))


def shard(cells: list[Cell], index: int, count: int) -> list[Cell]:
    """The cells of shard ``index`` of ``count``: every ``count``-th cell from ``index``."""
    return cells[index::count]


__all__ = ["Cell", "expand", "parse_shard", "shard"]
