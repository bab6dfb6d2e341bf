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
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import math
import platform
import sys
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from cka_geo import __version__
from cka_geo.accumulator import CKAResult, MinibatchCKA
from cka_geo.bootstrap import bootstrap_ratio
from cka_geo.budget import CKAWorkload, batches_for, check_fits
from cka_geo.checkpoints import LoadedCheckpoint, build_model, check_pair, load_checkpoint
from cka_geo.errors import DataError, FeatureError, UsageError
from cka_geo.features import capture, forward_batch, resolve_sublayers, sublayer_map
from cka_geo.functional import DEFAULT_RBF_FRAC, Estimator, Kernel, check_kernel, min_samples
from cka_geo.functional.precision import (
    CONSTANT_TOL,
    CONSTANT_TOL_FLOAT64,
    NOISE_TOL,
    NOISE_TOL_FLOAT64,
)
from cka_geo.results import CompareResult, LayerRecord
from cka_geo.sublayers import DEFAULT_KINDS, KINDS, POOLINGS, block_of, kind_of

#: The vocabulary's names under their older compare-module aliases.
SUBLAYER_KINDS = KINDS
DEFAULT_SUBLAYERS = DEFAULT_KINDS
DEFAULT_SAMPLES = 512
#: The numerical noise of CKA: the engine's stated accuracy against a float64 reference
#: (float32 grams). A CKA above ``1 - UNCHANGED_TOL`` counts as unchanged, and no verdict
#: ("most changed", "first to move", "largest own change") is drawn from a smaller change.
UNCHANGED_TOL = 1e-6
#: The RBF bandwidth fractions accepted: sigma = frac * median pairwise distance. Below 0.1
#: the gram of high-dimensional features is numerically the identity; above 10 its
#: structure is below float32 resolution (Kornblith et al. use 0.2-0.8).
RBF_FRAC_RANGE = (0.1, 10.0)
#: Most bootstrap replicates (beyond this the percentile interval does not move).
MAX_BOOTSTRAP = 100_000
#: Fewest batches for which a bootstrap interval over batches is worth its name.
MIN_INTERVAL_BATCHES = 10
_OWN = "{}#own"


@dataclass
class CompareOptions:
    """Settings of a comparison (all recorded in the results).

    Attributes:
        data: None for the embedded Sentinel-2 probe set (sized to the model's bands and
            image size), a folder of .tif/.npy images, or a .npy/.pt array (N, C, H, W) or
            image time series (N, T, C, H, W) (see ``time_mode``).
        sublayers: Sublayer kinds among attn, fc1, act, fc2, block.
        names: Explicit canonical names instead of kinds (order kept).
        kernel: ``"linear"`` or ``"rbf"``.
        rbf_frac: RBF bandwidth fraction of the median pairwise distance.
        estimator: ``"unbiased"`` (minibatch HSIC_1, Nguyen et al. 2021) or ``"biased"``
            (full-batch CKA of Kornblith et al. 2019: every sample in one batch; memory
            grows with samples, so for small N).
        pooling: ``"mean"`` (patch tokens), ``"cls"``, ``"flatten"`` or ``"tokens"``.
        samples: Probe images to use (default 512 for the embedded set, all for user data).
        batch_size: Images per batch (also the unit of the bootstrap).
        device: ``"auto"`` (CUDA if available), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
        seed: Seed of the embedded probe crops and of the bootstrap.
        time_mode: For time-series input: ``"frames"`` (each frame an example: N·T rows)
            or ``"mean"`` (features averaged over time: N rows).
        trust: Allow pickle code in checkpoint files (only for files you trust).
        prefix: Encoder prefix override for both files.
        num_heads: Attention heads when not stored in the files (default width / 64).
        own_change: Also compute each sublayer's own change.
        bootstrap: Bootstrap replicates for the intervals (0 for none).
        confidence: Level of the intervals.
        progress: Show a progress bar on stderr (default: when stderr is a terminal).
    """

    data: str | None = None
    sublayers: tuple[str, ...] = DEFAULT_SUBLAYERS
    names: tuple[str, ...] | None = None
    kernel: Kernel = "linear"
    rbf_frac: float = DEFAULT_RBF_FRAC
    estimator: Estimator = "unbiased"
    pooling: str = "mean"
    samples: int | None = None
    batch_size: int = 32
    device: str = "auto"
    seed: int = 0
    time_mode: str = "frames"
    trust: bool = False
    prefix: str | None = None
    num_heads: int | None = None
    own_change: bool = True
    bootstrap: int = 1000
    confidence: float = 0.95
    progress: bool | None = None

    def validate(self) -> None:
        """Raise UsageError naming the first bad option."""
        check_kernel(self.kernel, self.estimator)
        bad = [s for s in self.sublayers if s not in SUBLAYER_KINDS]
        if bad or not self.sublayers:
            raise UsageError(f"unknown sublayer {bad[0] if bad else '(none)'!r}; choose from {', '.join(SUBLAYER_KINDS)}")
        if self.pooling not in POOLINGS:
            raise UsageError(f"unknown pooling {self.pooling!r}; choose from {', '.join(POOLINGS)}")
        if self.samples is not None and self.samples < min_samples(self.estimator):
            raise UsageError(f"--samples must be at least {min_samples(self.estimator)}, got {self.samples}")
        if self.batch_size < min_samples(self.estimator):
            raise UsageError(f"--batch-size must be at least {min_samples(self.estimator)}, got {self.batch_size}")
        lo, hi = RBF_FRAC_RANGE
        if self.kernel == "rbf" and not lo <= self.rbf_frac <= hi:
            raise UsageError(
                f"--rbf-frac must be in [{lo:g}, {hi:g}] (sigma as a fraction of the median pairwise "
                f"distance; 0.2-0.8 are usual), got {self.rbf_frac:g}"
            )
        if not 0 < self.confidence < 1:
            raise UsageError(f"--confidence must be in (0, 1), got {self.confidence}")
        if not 0 <= self.bootstrap <= MAX_BOOTSTRAP:
            raise UsageError(f"--bootstrap must be in [0, {MAX_BOOTSTRAP}], got {self.bootstrap}")
        if not 0 <= self.seed < 2**32:
            raise UsageError(f"--seed must be in [0, 2**32 - 1], got {self.seed}")


def resolve_device(device: str) -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU; refuse unsupported or absent devices.

    The one resolver of every command: :func:`cka_geo.devices.resolve_device`.
    """
    from cka_geo.devices import resolve_device as resolve

    return resolve(device)


def _model_geometry(loaded: LoadedCheckpoint) -> tuple[int, int | tuple[int, int]]:
    cfg = loaded.config
    size = getattr(cfg, "img_size", None) or cfg.image_size
    return int(cfg.in_chans), size if isinstance(size, tuple) else int(size)


def probe_batches(
    opts: CompareOptions, bands: int, size: int | tuple[int, int]
) -> tuple[Iterator[torch.Tensor], int, str, tuple[int, ...]]:
    """The probe images in batches, how many there are, a description for the record, and
    the shape of one image ((C, H, W), or (T, C, H, W) for a time series). ``size`` may be
    (height, width): the embedded crops are then cut to that rectangle."""
    from cka_geo.data import ImageFolder, iter_probe_batches, load_array_probes
    from cka_geo.data.folders import iter_batches

    if opts.data is None:
        n = opts.samples or DEFAULT_SAMPLES
        h, w = size if isinstance(size, tuple) else (size, size)
        desc = f"embedded Sentinel-2 L1C crops (seed {opts.seed})" + (f", cut to {h}x{w}" if h != w else "")
        batches = iter_probe_batches(n, bands=bands, size=max(h, w), batch_size=opts.batch_size, seed=opts.seed)
        if h != w:
            batches = (b[..., :h, :w] for b in batches)
        return batches, n, desc, (bands, h, w)
    if isinstance(size, tuple):
        raise DataError("--data with a rectangular model is not supported yet (use the embedded probes)")
    path = Path(opts.data)
    if not path.exists():
        raise DataError(f"{path}: no such file or folder (--data)")
    if path.is_dir():
        ds = ImageFolder(path, bands=bands)
        first = ds[0]
        first = first[0] if isinstance(first, tuple) else first
        if tuple(first.shape[-2:]) != (size, size):
            raise DataError(f"{path}: images are {first.shape[-2]}x{first.shape[-1]}, the model expects {size}x{size}")
        total = len(ds)
        shape = tuple(first.shape)
        source: Iterator[torch.Tensor] = iter_batches(ds, opts.batch_size)
    else:
        arr = load_array_probes(path, bands=bands, time_series=True)
        if arr.shape[-2:] != (size, size):
            raise DataError(f"{path}: images are {arr.shape[-2]}x{arr.shape[-1]}, the model expects {size}x{size}")
        total = arr.shape[0]
        shape = tuple(arr.shape[1:])
        source = iter(arr.split(opts.batch_size))
    n = total if opts.samples is None else opts.samples
    if n > total:
        raise DataError(f"{path}: holds {total} images, fewer than --samples {n}")
    if n < min_samples(opts.estimator):
        raise DataError(f"{path}: holds {total} images; CKA needs at least {min_samples(opts.estimator)}")

    def take() -> Iterator[torch.Tensor]:
        left = n
        for batch in source:
            if left <= 0:
                return
            yield batch[:left]
            left -= batch.shape[0]

    return take(), n, str(path), shape


def _progress(total: int, enabled: bool | None) -> Any:
    from tqdm import tqdm

    return tqdm(
        total=total,
        unit="img",
        desc="cka-geo compare",
        file=sys.stderr,
        disable=not (sys.stderr.isatty() if enabled is None else enabled),
        leave=False,
    )


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
    """
    clock = _Clock(timings, next(model_pre.parameters()).device)
    paths_ft = sublayer_map(model_ft)
    apply = {n: model_ft.get_submodule(paths_ft[n]) for n in names} if opts.own_change else None
    acc = MinibatchCKA(kernel=opts.kernel, estimator=opts.estimator, rbf_frac=opts.rbf_frac)
    full_batch = opts.estimator == "biased"
    held_a: list[dict[str, torch.Tensor]] = []
    held_b: list[dict[str, torch.Tensor]] = []
    time_series = False
    with (
        capture(model_pre, names, pooling=opts.pooling, apply=apply) as cap_pre,
        capture(model_ft, names, pooling=opts.pooling) as cap_ft,
        _progress(total, opts.progress) as bar,
    ):
        for x in batches:
            time_series = time_series or x.ndim == 5
            with clock("forward"):
                pre = forward_batch(model_pre, x, cap_pre, time_mode=opts.time_mode)
                ft = forward_batch(model_ft, x, cap_ft, time_mode=opts.time_mode)
            cols = dict(ft.features)
            cols.update({_OWN.format(n): f for n, f in pre.applied.items()})
            if full_batch:
                held_a.append(pre.features)
                held_b.append(cols)
            else:
                with clock("cka"):
                    acc.update(pre.features, cols)
            bar.update(x.shape[0])
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
    rows = per_image * (total if full else min(opts.batch_size, total))
    work = CKAWorkload(
        rows=rows,
        width=width,
        layers_a=len(names),
        layers_b=len(names) * (2 if opts.own_change else 1),
        batches=1 if full else batches_for(total, opts.batch_size),
        bootstrap=opts.bootstrap,
        held_rows=rows if full else 0,
    )
    what = f"--samples {total} with --batch-size {opts.batch_size} and --bootstrap {opts.bootstrap}"
    if full:
        what = f"--estimator biased (one batch of every sample) with --samples {total}"
    if per_image > 1:
        what += f" ({per_image} rows per image: --pooling {opts.pooling} / --time-mode {opts.time_mode})"
    check_fits(work, device, what)


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


DEGENERATE_RULE = (
    f"a batch of a layer counts as 0 when ||X - mean||_F <= {CONSTANT_TOL:g} ||X||_F (float32; "
    f"{CONSTANT_TOL_FLOAT64:g} for float64) or its self-HSIC <= {NOISE_TOL:g} ||K||_F^2 / n(n-3) "
    f"(float32 grams; {NOISE_TOL_FLOAT64:g} for float64); a layer with no other batch has CKA NaN"
)


def _degenerate_record(result: CKAResult, names: list[str], own: bool) -> dict[str, dict[str, int]]:
    """Batches in which each sublayer counted as 0 (only the nonzero counts)."""
    if result.degenerate_a is None or result.degenerate_b is None:
        return {}
    L = len(names)
    views = {"pre": result.degenerate_a[:L], "ft": result.degenerate_b[:L]}
    if own:
        views["own"] = result.degenerate_b[L : 2 * L]
    return {k: {n: int(c) for n, c in zip(names, v, strict=True) if c} for k, v in views.items()}


def _num(x: float) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


def _heads_field(config: Any) -> str:
    return "num_heads" if hasattr(config, "num_heads") else "heads"


def _heads_assumed(loaded: LoadedCheckpoint) -> bool:
    return any(n.startswith("num_heads=") and "assumed" in n for n in loaded.notes)


def share_stored_heads(a: LoadedCheckpoint, b: LoadedCheckpoint) -> None:
    """Weights do not record the head count: where one file stores it and the other's was
    assumed (width / 64), use the stored one for both (and say so in the notes)."""
    for known, guessed in ((a, b), (b, a)):
        if _heads_assumed(guessed) and not _heads_assumed(known) and type(known.config) is type(guessed.config):
            field = _heads_field(known.config)
            heads = getattr(known.config, field)
            if getattr(guessed.config, field) != heads:
                guessed.config = dataclasses.replace(guessed.config, **{field: heads})
                guessed.notes.append(f"num_heads={heads} taken from {known.path}, which stores it")
            return


def _checkpoint_record(loaded: LoadedCheckpoint) -> dict[str, Any]:
    return {
        "path": str(loaded.path),
        "sha256": loaded.sha256,
        "family": loaded.family,
        "prefix": loaded.prefix,
        "candidates": [list(c) for c in loaded.candidates],
        "ignored_keys": len(loaded.ignored),
        "notes": list(loaded.notes),
        "source": loaded.source,
        "assumed": list(loaded.assumed),
    }


def _versions() -> dict[str, str]:
    return {
        "cka_geo": __version__,
        "torch": torch.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
    }


def summarize(
    layers: list[str], diagonal: dict[str, float | None], own: dict[str, float | None] | None, identical: bool
) -> dict[str, Any]:
    """Which sublayer changed most, the first that moved, and a one-line verdict.

    A verdict is drawn only from defined values (NaN, stored as None, is never ranked) and
    only from changes beyond the numerical noise (``1 - CKA > UNCHANGED_TOL``); the verdict
    says which sublayers were undefined.
    """

    def changed(values: dict[str, float | None]) -> dict[str, float]:
        return {k: v for k, v in values.items() if v is not None and 1 - v > UNCHANGED_TOL}

    def lowest(values: dict[str, float]) -> tuple[str | None, float | None]:
        if not values:
            return None, None
        k = min(values, key=lambda n: values[n])
        return k, values[k]

    moved = changed(diagonal)
    most, most_v = lowest(moved)
    first = next((n for n in layers if n in moved), None)
    undefined = [n for n in layers if diagonal.get(n) is None]
    out: dict[str, Any] = {
        "identical": identical,
        "changed": first is not None,
        "most_changed": most,
        "most_changed_cka": most_v,
        "first_changed": first,
        "undefined": undefined,
        "noise_level": UNCHANGED_TOL,
    }
    own_name = own_value = None
    if own is not None:
        # the block output's own change contains its sublayers'; rank sublayers proper
        own_name, own_value = lowest(changed({k: v for k, v in own.items() if kind_of(k) != "block"}))
        out["largest_own_change"] = own_name
        out["largest_own_change_cka"] = own_value
    if identical:
        text = "the two encoders are identical (a frozen-backbone fine-tune?): CKA is trivially 1, nothing changed"
    elif len(undefined) == len(layers):
        text = (
            "CKA is undefined (NaN) at every sublayer: the probe images give a constant representation "
            "(identical or blank images?); nothing can be said"
        )
    elif first is None:
        text = f"no sublayer's representation changed beyond the numerical noise (1 - CKA <= {UNCHANGED_TOL:g} everywhere)"
    else:
        text = f"most changed: {most} (CKA {most_v:.4f}); first to move: {first}"
        if own is not None:
            text += (
                f"; largest own change: {own_name} (CKA {own_value:.4f})" if own_name
                else "; no sublayer's own change exceeds the numerical noise"
            )
    if undefined and len(undefined) < len(layers) and not identical:
        shown = ", ".join(undefined[:3]) + (f" and {len(undefined) - 3} more" if len(undefined) > 3 else "")
        text += f"; undefined (constant representation, left out): {shown}"
    out["verdict"] = text
    return out


def compare_checkpoints(
    pre: str | Path | nn.Module | dict,
    ft: str | Path | nn.Module | dict,
    options: CompareOptions | None = None,
    **kwargs: Any,
) -> CompareResult:
    """Compare two checkpoints of one ViT and return the results (schema ``cka-geo/compare/v1``).

    Args:
        pre: The pretrained checkpoint: a file, a Hugging Face folder, or in memory (an
            ``nn.Module`` of timm, Hugging Face, open_clip or cka-geo, or a state dict).
        ft: The fine-tuned checkpoint, likewise.
        options: A :class:`CompareOptions`; keyword arguments override its fields.

    Returns:
        A :class:`~cka_geo.results.CompareResult`: per-layer records (same-layer CKA, own
        change, intervals, weight change), the full matrix (pre rows x ft columns), the
        ``summary`` and the ``settings`` as done. It reads like the ``cka-geo/compare/v1``
        dict (``result["summary"]["verdict"]``); ``result.to_dict()`` is that dict, as
        written to results.json (docs/results-schema.md).

    Raises:
        CkaGeoError: Bad options, unreadable or refused checkpoints, different
            architectures, probe data that does not fit the model, non-finite features.
    """
    opts = dataclasses.replace(options or CompareOptions(), **kwargs)
    opts.validate()
    device = resolve_device(opts.device)
    a, b = (_load_any(x, opts) for x in (pre, ft))
    if opts.num_heads is None:
        share_stored_heads(a, b)
    pair = check_pair(a, b)
    model_pre = build_model(a, device=device)
    model_ft = build_model(b, device=device)
    if opts.names:
        names = resolve_sublayers(model_pre, list(opts.names))
    else:
        names = resolve_sublayers(model_pre, kinds=tuple(opts.sublayers))
    bands, size = _model_geometry(a)
    batches, n, data_desc, shape = probe_batches(opts, bands, size)
    check_memory(model_pre, names, shape, opts, n, device)
    result = run_cka(model_pre, model_ft, names, batches, opts, n)
    return build_results(result, names, opts, a, b, pair, data_desc, device)


def compare_models(
    model_a: nn.Module | dict, model_b: nn.Module | dict, options: CompareOptions | None = None, **kwargs: Any
) -> CompareResult:
    """:func:`compare_checkpoints` of two in-memory models or state dicts (same options).

    A timm, Hugging Face, open_clip or cka-geo ViT is converted through its state dict and
    what it states about itself (``config``, its modules' ``num_heads`` / ``eps`` /
    activation): no library is imported. Canonical names are those of the files.
    """
    return compare_checkpoints(model_a, model_b, options, **kwargs)


def _load_any(x: Any, opts: CompareOptions) -> LoadedCheckpoint:
    if isinstance(x, (nn.Module, dict)):
        from cka_geo.checkpoints.memory import load_model

        return load_model(x, prefix=opts.prefix, num_heads=opts.num_heads)
    return load_checkpoint(x, trust=opts.trust, prefix=opts.prefix, num_heads=opts.num_heads)


def build_results(
    result: CKAResult,
    names: list[str],
    opts: CompareOptions,
    a: LoadedCheckpoint,
    b: LoadedCheckpoint,
    pair: Any,
    data_desc: str,
    device: torch.device,
) -> CompareResult:
    """Assemble the typed result from the accumulator's result."""
    L = len(names)
    captured = result.extra["capture"]
    pooling = captured["pre"]["pooling"]
    if captured["ft"]["pooling"] != pooling or captured["pre"]["sublayers"] != captured["ft"]["sublayers"]:
        raise FeatureError(
            f"the two models were captured differently (pooling {pooling!r} vs {captured['ft']['pooling']!r})"
        )
    matrix = result.matrix[:, :L]
    diag = {n: _num(matrix[i, i]) for i, n in enumerate(names)}
    own = own_iv = None
    boot = opts.bootstrap > 0 and result.batch_cross is not None and len(result.batch_sizes) >= 2

    def intervals(cols: list[int]) -> dict[str, list[float | None] | None]:
        if not boot:
            return {n: None for n in names}
        idx = np.arange(L)
        lo, hi = bootstrap_ratio(
            result.batch_cross[:, idx, cols],  # type: ignore[index]
            result.batch_self_a[:, idx],  # type: ignore[index]
            result.batch_self_b[:, cols],  # type: ignore[index]
            resamples=opts.bootstrap,
            confidence=opts.confidence,
            seed=opts.seed,
        )
        return {n: [_num(lo[i]), _num(hi[i])] for i, n in enumerate(names)}

    if boot and len(result.batch_sizes) < MIN_INTERVAL_BATCHES:
        warnings.warn(
            f"only {len(result.batch_sizes)} batches feed the bootstrap intervals (fewer than "
            f"{MIN_INTERVAL_BATCHES}): they are coarse and too narrow; use more --samples or a smaller --batch-size",
            RuntimeWarning,
            stacklevel=2,
        )
    iv = intervals(list(range(L)))
    if opts.own_change:
        own = {n: _num(result.matrix[i, L + i]) for i, n in enumerate(names)}
        own_iv = intervals(list(range(L, 2 * L)))
    settings = {
        "kernel": result.kernel,
        "rbf_frac": result.rbf_frac,
        "bandwidth_rule": "sigma = frac * sqrt(median squared distance over pairs i<j), per batch and layer"
        if result.kernel == "rbf"
        else None,
        "estimator": result.estimator,
        "estimator_detail": "minibatch CKA with unbiased HSIC_1 (Nguyen et al. 2021, eq. 3)"
        if result.estimator == "unbiased"
        else "full-batch biased CKA (Kornblith et al. 2019)",
        "pooling": pooling,
        "num_prefix_tokens": captured["pre"]["num_prefix_tokens"],
        "samples": result.samples,
        "samples_skipped": result.samples_skipped,
        "batch_size": opts.batch_size,
        "batches": len(result.batch_sizes),
        "seed": opts.seed,
        "data": data_desc,
        "time_mode": opts.time_mode if result.extra.get("time_series") else None,
        "device": str(device),
        "sublayers": list(opts.sublayers) if not opts.names else None,
        "bootstrap": opts.bootstrap if boot else 0,
        "confidence": opts.confidence,
        "interval_method": "percentile bootstrap over batches" if boot else None,
        "noise_level": UNCHANGED_TOL,
        "degenerate_rule": DEGENERATE_RULE,
    }
    rbf = None
    if result.sigma_a is not None:
        rbf = {
            "sigma_pre_mean": {n: _num(float(np.nanmean(result.sigma_a[:, i]))) for i, n in enumerate(names)},
            "sigma_ft_mean": {n: _num(float(np.nanmean(result.sigma_b[:, i]))) for i, n in enumerate(names)},  # type: ignore[index]
        }
    changes = pair.sublayer_change

    def pair_of(ivs: dict[str, list[float | None] | None] | None, n: str) -> tuple[float | None, float | None] | None:
        v = None if ivs is None else ivs.get(n)
        return None if v is None else (v[0], v[1])

    layers = [
        LayerRecord(
            name=n,
            block=block_of(n),
            kind=kind_of(n),
            cka=diag[n],
            interval=pair_of(iv, n),
            own=None if own is None else own[n],
            own_interval=pair_of(own_iv, n),
            weight_change=_num(changes.get(n)),
        )
        for n in names
    ]
    return CompareResult(
        layers=layers,
        matrix=np.asarray(matrix, dtype=float),
        summary=summarize(names, diag, own, pair.identical),
        settings=settings,
        sections={
            "rbf": rbf,
            "degenerate_batches": _degenerate_record(result, names, opts.own_change),
            "model": {"family": a.family, "config": dataclasses.asdict(a.config)},
            "checkpoints": {"pre": _checkpoint_record(a), "ft": _checkpoint_record(b)},
            "versions": _versions(),
        },
        created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        own_computed=own is not None,
    )
