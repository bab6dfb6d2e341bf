"""compare_checkpoints: load, check, build, probe, run, and the typed result."""

from __future__ import annotations

import contextlib
import dataclasses
import time
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from cka_geo.checkpoints import LoadedCheckpoint, build_model, check_pair, load_checkpoint
from cka_geo.compare.build import build_results, share_stored_heads
from cka_geo.compare.inputs import (
    at_size,
    default_image_size,
    device_defaults,
    native_hw,
    parse_size,
)
from cka_geo.compare.options import CompareOptions, resolve_device
from cka_geo.compare.probes import cut_batches, embedded_record, open_probes
from cka_geo.compare.run import check_memory, run_many
from cka_geo.data.probes import distinct_crops
from cka_geo.errors import ArchitectureMismatchError, UsageError
from cka_geo.features import resolve_sublayers
from cka_geo.results import CompareResult


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
    return compare_many(pre, [ft], options, **kwargs)[0]


def compare_many(
    pre: str | Path | nn.Module | dict,
    fts: Sequence[str | Path | nn.Module | dict],
    options: CompareOptions | None = None,
    **kwargs: Any,
) -> list[CompareResult]:
    """Compare one pretrained checkpoint with several fine-tuned ones of its architecture.

    Each probe batch goes once through the pretrained model and is shared by every
    fine-tuned one (:func:`~cka_geo.compare.run.run_many`); each result equals, bit for
    bit, that of :func:`compare_checkpoints` of ``pre`` and that fine-tune alone with the
    same options. Memory is flat in the number of samples and grows linearly in the number
    of fine-tunes (one model, its features and its per-batch terms each).

    Args:
        pre: The pretrained checkpoint, as for :func:`compare_checkpoints`.
        fts: The fine-tuned checkpoints (at least one), likewise.
        options: A :class:`CompareOptions`; keyword arguments override its fields.

    Returns:
        One :class:`~cka_geo.results.CompareResult` per fine-tune, in the order given.

    Raises:
        CkaGeoError: As :func:`compare_checkpoints`; a fine-tune of another architecture
            than ``pre`` is refused naming it, with a hint to ``--cross``.
    """
    if not fts:
        raise UsageError("compare needs at least one fine-tuned checkpoint")
    opts = dataclasses.replace(options or CompareOptions(), **kwargs)
    opts.validate()
    from cka_geo import distributed

    device = distributed.init(resolve_device(opts.device))  # cuda:LOCAL_RANK under torchrun
    if not distributed.is_main():
        opts = dataclasses.replace(opts, progress=False)  # rank 0 alone prints
    if distributed.world() > 1 and len(fts) > 1:
        raise UsageError("under torchrun, compare takes one fine-tuned checkpoint (several share one process)")
    started = time.perf_counter()
    a = _load_any(pre, opts)
    bs = [_load_any(x, opts) for x in fts]
    pairs = []
    for b in bs:
        if opts.num_heads is None:
            share_stored_heads(a, b)
        pairs.append(_check_pair(a, b))
    bands = int(a.config.in_chans)
    probes = open_probes(opts, bands)
    hw = parse_size(opts.image_size) or probes.hw
    chosen = {"image_size": hw is None}
    if hw is None:  # the embedded scene at the device's default size
        hw = default_image_size(native_hw(a), int(getattr(a.config, "patch_size", 1)), device, distinct_crops)
    what = f"{opts.data} (--data)" if opts.data and opts.image_size is None else "--image-size"
    resample = at_size(a, bs[0], hw, what)
    for b in bs[1:]:
        with warnings.catch_warnings():  # said once, for the first pair
            warnings.simplefilter("ignore", RuntimeWarning)
            at_size(a, b, hw, what)
    distinct = distinct_crops(hw) if probes.path is None else None
    n, batch_size = device_defaults(device, opts.samples, opts.batch_size, probes.total, distinct)
    chosen.update(samples=opts.samples is None and probes.total is None, batch_size=opts.batch_size is None)
    opts = dataclasses.replace(opts, batch_size=batch_size)
    from cka_geo.data.normalize import resolve

    norm = resolve(opts.normalize, bands, probes.band_names, embedded=probes.path is None, raw=probes.raw)
    model_pre = build_model(a, device=device)
    models_ft = [build_model(b, device=device) for b in bs]
    seconds: dict[str, float] = {"load": time.perf_counter() - started}
    if opts.names:
        names = resolve_sublayers(model_pre, list(opts.names))
    else:
        names = resolve_sublayers(model_pre, kinds=tuple(opts.sublayers))
    batches, n, data_desc, shape = cut_batches(probes, opts, n, batch_size, hw, norm)
    check_memory(model_pre, names, shape, opts, n, device, runs=len(bs))
    if opts.progress is not False:
        _say_plan(a, names, n, batch_size, hw, device, data_desc, norm.name, chosen, runs=len(bs))
    results = run_many(model_pre, models_ft, names, batches, opts, n, timings=seconds, sync=False)
    outs = []
    for result, b, pair in zip(results, bs, pairs, strict=True):
        t = time.perf_counter()
        out = build_results(result, names, opts, a, b, pair, data_desc, device)
        seconds["bootstrap"] = seconds.get("bootstrap", 0.0) + time.perf_counter() - t
        out.settings.update({
            "image_size": [hw[0], hw[1]],
            "native_image_size": list(native_hw(a)),
            "pos_embed_resample": resample,
            "bands": list(probes.band_names) if probes.band_names else None,
            "normalize": norm.record(),
            "defaults_by_device": {k: v for k, v in chosen.items() if v} or None,
            "probe_crops": embedded_record(hw, int(out.settings.get("samples") or n)) if probes.path is None else None,
        })
        outs.append(out)
    cost = stage_seconds(seconds, time.perf_counter() - started, len(bs))
    for out in outs:
        out.settings["seconds"] = cost  # one record, shared by the runs (and completed by the CLI)
    return outs


def stage_seconds(timings: dict[str, float], total: float, runs: int) -> dict[str, Any]:
    """The cost of a comparison per stage, in seconds: ``load`` (files and models),
    ``forward`` (forward passes, own change excluded), ``own_change`` (fine-tuned sublayers
    applied to the pretrained inputs), ``cka`` (grams, HSIC terms, the matrix),
    ``bootstrap`` (intervals and records), ``figures`` (None until drawn), ``total``, and
    the ``runs`` that shared them."""
    own = timings.get("own_change", 0.0)
    return {
        "load": round(timings.get("load", 0.0), 4),
        "forward": round(max(timings.get("forward", 0.0) - own, 0.0), 4),
        "own_change": round(own, 4),
        "cka": round(timings.get("cka", 0.0), 4),
        "bootstrap": round(timings.get("bootstrap", 0.0), 4),
        "figures": None,
        "total": round(total, 4),
        "runs": runs,
    }


@contextlib.contextmanager
def timed(settings: dict) -> Iterator[None]:
    """Add the seconds of the block to ``settings["seconds"]``'s ``figures`` and ``total``."""
    start = time.perf_counter()
    yield
    spent = time.perf_counter() - start
    seconds = settings.get("seconds")
    if isinstance(seconds, dict):
        seconds["figures"] = round((seconds.get("figures") or 0.0) + spent, 4)
        seconds["total"] = round(seconds.get("total", 0.0) + spent, 4)


def say_cost(seconds: dict[str, Any]) -> str:
    """The final progress line: the total and what each stage took."""
    from cka_geo.compare.run import _span

    parts = [f"{label} {_span(seconds[key])}" for key, label in (
        ("load", "load"), ("forward", "forwards"), ("own_change", "own change"), ("cka", "CKA"),
        ("bootstrap", "bootstrap"), ("figures", "figures")) if seconds.get(key) is not None]
    return f"cka-geo compare: done in {_span(seconds['total'])} ({', '.join(parts)})"


def _check_pair(a: LoadedCheckpoint, b: LoadedCheckpoint) -> Any:
    """:func:`check_pair`, its refusal of two architectures hinting at ``--cross``."""
    try:
        return check_pair(a, b)
    except ArchitectureMismatchError as exc:
        raise ArchitectureMismatchError(
            f"{exc}; to compare two architectures layer against layer use --cross (compare_cross)"
        ) from None


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

        return load_model(x, prefix=opts.prefix, num_heads=opts.num_heads, norm_eps=opts.norm_eps, act=opts.act)
    wavelengths: Any = list(opts.wavelengths) if opts.wavelengths else None
    return load_checkpoint(
        x, trust=opts.trust, prefix=opts.prefix, num_heads=opts.num_heads, norm_eps=opts.norm_eps,
        act=opts.act, wavelengths=wavelengths,
    )


def _say_plan(
    a: LoadedCheckpoint, names: list[str], n: int, batch: int, hw: tuple[int, int],
    device: Any, data: str, norm: str, chosen: dict[str, bool], runs: int = 1,
) -> None:
    """One stderr line: what the run will do (model, samples, batches, size, device)."""
    import math
    import sys

    from cka_geo import distributed

    cfg = a.config
    model = f"{a.family} ViT, {getattr(cfg, 'depth', '?')} blocks, width {getattr(cfg, 'embed_dim', '?')}, {cfg.in_chans} bands"
    by = [k.replace("_", " ") for k, v in chosen.items() if v]
    ranks = distributed.world()
    where = str(device)
    if ranks > 1:
        where += f" x {ranks} ranks (batch i on rank i % {ranks}; progress of rank 0's batches)"
    dflt = f" ({', '.join(by)}: {device.type.upper()} default)" if by else ""
    print(
        f"cka-geo compare: {model}; {n} images of {data} at {hw[0]}x{hw[1]} px in "
        f"{math.ceil(n / batch)} batches of {batch}{dflt}; normalize {norm}; {len(names)} sublayers; device {where}"
        + (f"; {runs} fine-tuned checkpoints, the pretrained forward shared" if runs > 1 else ""),
        file=sys.stderr,
        flush=True,
    )
