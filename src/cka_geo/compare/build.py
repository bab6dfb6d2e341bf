"""From the accumulator's sums to the typed result: intervals, records, provenance."""

from __future__ import annotations

import dataclasses
import datetime as _dt
import math
import platform
import warnings
from typing import Any

import numpy as np
import torch

from cka_geo import __version__, distributed
from cka_geo.accumulator import CKAResult
from cka_geo.bootstrap import bootstrap_ratio, jackknife_ratio
from cka_geo.checkpoints import LoadedCheckpoint
from cka_geo.compare.options import (
    _OWN,
    MIN_INTERVAL_BATCHES,
    UNCHANGED_TOL,
    CompareOptions,
    own_names,
)
from cka_geo.compare.verdict import summarize
from cka_geo.errors import FeatureError
from cka_geo.functional.precision import (
    CONSTANT_TOL,
    CONSTANT_TOL_FLOAT64,
    NOISE_TOL,
    NOISE_TOL_FLOAT64,
)
from cka_geo.results import CompareResult, LayerRecord
from cka_geo.sublayers import KINDS, block_of, kind_of

DEGENERATE_RULE = (
    f"a batch of a layer counts as 0 when ||X - mean||_F <= {CONSTANT_TOL:g} ||X||_F (float32; "
    f"{CONSTANT_TOL_FLOAT64:g} for float64) or its self-HSIC <= {NOISE_TOL:g} ||K||_F^2 / n(n-3) "
    f"(float32 grams; {NOISE_TOL_FLOAT64:g} for float64); a layer with no other batch has CKA NaN"
)


#: How each --interval is recorded in results.json (settings.interval_method).
INTERVAL_METHODS = {
    "jackknife-t": "jackknife-t over batches (delete-one-batch standard error, Student t on batches - 1 dof)",
    "percentile": "percentile bootstrap over batches",
}


def run_settings(result: CKAResult, opts: CompareOptions, data_desc: str, device: Any) -> dict[str, Any]:
    """The settings every compare mode records the same way: samples, batches, seed, data, device."""
    return {
        "samples": result.samples,
        "samples_skipped": result.samples_skipped,
        "batch_size": opts.batch_size,
        "batches": len(result.batch_sizes),
        "seed": opts.seed,
        "data": data_desc,
        "time_mode": opts.time_mode if result.extra.get("time_series") else None,
        "device": str(device),
    }


def _degenerate_record(result: CKAResult, names: list[str], own: list[str]) -> dict[str, dict[str, int]]:
    """Batches in which each sublayer counted as 0 (only the nonzero counts)."""
    if result.degenerate_a is None or result.degenerate_b is None:
        return {}
    L = len(names)
    out = {
        "pre": {n: int(c) for n, c in zip(names, result.degenerate_a[:L], strict=True) if c},
        "ft": {n: int(c) for n, c in zip(names, result.degenerate_b[:L], strict=True) if c},
    }
    if own:
        out["own"] = {n: int(c) for n, c in zip(own, result.degenerate_b[L : L + len(own)], strict=True) if c}
    return out


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
    own: dict[str, float | None] | None = None
    own_iv: dict[str, list[float | None] | None] | None = None
    method = getattr(opts, "interval", "jackknife-t")
    boot = (
        method != "none" and opts.bootstrap > 0 and result.batch_cross is not None and len(result.batch_sizes) >= 2
    )

    def intervals(cols: list[int], rows: list[int] | None = None) -> dict[str, list[float | None] | None]:
        which = names if rows is None else [names[i] for i in rows]
        if not boot:
            return {n: None for n in which}
        idx = np.arange(L) if rows is None else np.asarray(rows)
        terms = (
            result.batch_cross[:, idx, cols],  # type: ignore[index]
            result.batch_self_a[:, idx],  # type: ignore[index]
            result.batch_self_b[:, cols],  # type: ignore[index]
        )
        if method == "percentile":
            lo, hi = bootstrap_ratio(*terms, resamples=opts.bootstrap, confidence=opts.confidence, seed=opts.seed)
        else:
            lo, hi = jackknife_ratio(*terms, confidence=opts.confidence)
        return {n: [_num(lo[i]), _num(hi[i])] for i, n in enumerate(which)}

    if boot and len(result.batch_sizes) < MIN_INTERVAL_BATCHES:
        warnings.warn(
            f"only {len(result.batch_sizes)} batches feed the intervals (fewer than "
            f"{MIN_INTERVAL_BATCHES}): their widths are rough (the percentile bootstrap's too narrow); "
            "use more --samples or a smaller --batch-size",
            RuntimeWarning,
            stacklevel=2,
        )
    iv = intervals(list(range(L)))
    own_list = own_names(names, opts)
    if own_list:
        col = {n: j for j, n in enumerate(result.names_b)}
        rows = [names.index(n) for n in own_list]
        cols = [col[_OWN.format(n)] for n in own_list]
        own = dict.fromkeys(names)
        own.update({n: _num(result.matrix[i, j]) for n, i, j in zip(own_list, rows, cols, strict=True)})
        own_iv = dict.fromkeys(names)
        own_iv.update(intervals(cols, rows))
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
        **run_settings(result, opts, data_desc, device),
        "sublayers": list(opts.sublayers) if not opts.names else None,
        "own_change_kinds": sorted({kind_of(n) for n in own_list}, key=list(KINDS).index) if own_list else None,
        "bootstrap": opts.bootstrap if boot and method == "percentile" else 0,
        "confidence": opts.confidence,
        "interval_method": INTERVAL_METHODS[method] if boot else None,
        "forward_precision": opts.forward_precision,
        "ranks": distributed.world(),
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
            "degenerate_batches": _degenerate_record(result, names, own_list),
            "model": {"family": a.family, "config": dataclasses.asdict(a.config)},
            "checkpoints": {"pre": _checkpoint_record(a), "ft": _checkpoint_record(b)},
            "versions": _versions(),
        },
        created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        own_computed=own is not None,
    )
