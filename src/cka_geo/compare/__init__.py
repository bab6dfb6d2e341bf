"""The main job: CKA between a pretrained and a fine-tuned checkpoint, sublayer by sublayer.

Flow: load both files safely and check they share one architecture
(:mod:`cka_geo.checkpoints`), build the two encoders, run the same probe images through both
in the same order (:mod:`cka_geo.features`, one pass per model and batch) and accumulate CKA
for every pair of sublayers (:class:`cka_geo.accumulator.MinibatchCKA`).

Two views are reported:

* Same-layer CKA, ``CKA(pre sublayer s, ft sublayer s)``: how different the representation at
  s is. It carries every upstream change downstream, so its minimum is rarely where the
  change was made.
* Own change, ``CKA(pre sublayer s, ft's s applied to pre's input of s)``: what sublayer s
  itself does differently, given the same input. The fine-tuned module is applied inside the
  pretrained model's forward pass (the capture's ``apply``), so no extra forward runs. It is
  accumulated in the same accumulator as extra columns, so each pretrained gram is made once.

The stages live in small modules: :mod:`~cka_geo.compare.options`,
:mod:`~cka_geo.compare.probes`, :mod:`~cka_geo.compare.run`,
:mod:`~cka_geo.compare.verdict`, :mod:`~cka_geo.compare.build`,
:mod:`~cka_geo.compare.job` (one pretrained model against one or many fine-tunes, the
pretrained forward shared) and :mod:`~cka_geo.compare.cross` (two architectures, every layer
against every layer); everything public is importable from here.
"""

from cka_geo.compare.build import DEGENERATE_RULE, build_results, share_stored_heads
from cka_geo.compare.cross import compare_cross
from cka_geo.compare.job import compare_checkpoints, compare_many, compare_models
from cka_geo.compare.options import (
    DEFAULT_SAMPLES,
    DEFAULT_SUBLAYERS,
    MAX_BOOTSTRAP,
    MIN_INTERVAL_BATCHES,
    POOLINGS,
    RBF_FRAC_RANGE,
    SUBLAYER_KINDS,
    UNCHANGED_TOL,
    CompareOptions,
    resolve_device,
)
from cka_geo.compare.probes import probe_batches
from cka_geo.compare.run import check_memory, run_cka, run_many
from cka_geo.compare.verdict import summarize
from cka_geo.results import SCHEMA, CompareResult

__all__ = [
    "DEFAULT_SAMPLES",
    "DEFAULT_SUBLAYERS",
    "DEGENERATE_RULE",
    "MAX_BOOTSTRAP",
    "MIN_INTERVAL_BATCHES",
    "POOLINGS",
    "RBF_FRAC_RANGE",
    "SCHEMA",
    "SUBLAYER_KINDS",
    "UNCHANGED_TOL",
    "CompareOptions",
    "CompareResult",
    "build_results",
    "check_memory",
    "compare_checkpoints",
    "compare_cross",
    "compare_many",
    "compare_models",
    "probe_batches",
    "resolve_device",
    "run_cka",
    "run_many",
    "share_stored_heads",
    "summarize",
]
