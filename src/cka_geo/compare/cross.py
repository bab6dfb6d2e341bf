"""compare_cross: two architectures, every sublayer of one against every sublayer of the other."""

from __future__ import annotations

import dataclasses
import datetime as _dt
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cka_geo.accumulator import CKAResult, MinibatchCKA
from cka_geo.budget import CKAWorkload, batches_for, check_fits
from cka_geo.checkpoints import LoadedCheckpoint, build_model
from cka_geo.compare.build import _checkpoint_record, _versions, run_settings
from cka_geo.compare.inputs import at_size, device_defaults, native_hw, parse_size
from cka_geo.compare.options import CompareOptions, resolve_device
from cka_geo.compare.probes import cut_batches, open_probes
from cka_geo.compare.run import _forward_precision, _progress
from cka_geo.errors import DataError, UsageError
from cka_geo.features import capture, forward_batch, resolve_sublayers
from cka_geo.results_cross import CrossResult


def _patch(loaded: LoadedCheckpoint) -> int:
    return int(getattr(loaded.config, "patch_size", 1))


def _describe(loaded: LoadedCheckpoint) -> str:
    cfg = loaded.config
    depth = getattr(cfg, "depth", None) or getattr(cfg, "layers", "?")
    width = getattr(cfg, "embed_dim", None) or getattr(cfg, "width", "?")
    return f"{loaded.family} ViT, {depth} blocks, width {width}, patch {_patch(loaded)}"


def _same_bands(a: LoadedCheckpoint, b: LoadedCheckpoint) -> None:
    ca, cb = int(a.config.in_chans), int(b.config.in_chans)
    if ca != cb:
        raise DataError(
            f"--cross: the same probe images cannot feed both: {a.path} takes {ca} bands, {b.path} takes {cb}"
        )


def feedable_size(a: LoadedCheckpoint, b: LoadedCheckpoint, opts: CompareOptions, data_hw: tuple[int, int] | None) -> tuple[int, int]:
    """The one image size both models can take, or a one-line refusal saying why not.

    ``--image-size``, else the size of ``--data``, else A's native size; it must be a
    multiple of both patch sizes (a model at another size than its own has its position
    embedding resampled by its family's rule).

    Raises:
        DataError: Different band counts, or a size that is not a multiple of both patches.
    """
    _same_bands(a, b)
    hw = parse_size(opts.image_size) or data_hw or native_hw(a)
    bad = [x for x in (a, b) if hw[0] % _patch(x) or hw[1] % _patch(x)]
    if bad:
        pa, pb = _patch(a), _patch(b)
        lcm = pa * pb // math.gcd(pa, pb)
        given = "--image-size" if opts.image_size is not None else "--data" if data_hw else f"{a.path}'s native size"
        raise DataError(
            f"--cross: the same probe images cannot feed both: {hw[0]}x{hw[1]} px ({given}) is not a multiple of "
            f"{bad[0].path}'s patch {_patch(bad[0])}; give --image-size N with N a multiple of {lcm} (patches {pa} and {pb})"
        )
    return hw


def compare_cross(
    pre: str | Path | nn.Module | dict,
    ft: str | Path | nn.Module | dict,
    options: CompareOptions | None = None,
    **kwargs: Any,
) -> CrossResult:
    """CKA of every sublayer of checkpoint A (``pre``) against every sublayer of B (``ft``).

    For two different architectures (widths, depths, patch sizes or families): the full
    L_A x L_B matrix, without a same-layer view or an own change (there is no same layer).
    Both models see the same probe images at one size (:func:`feedable_size`); each
    checkpoint's position embedding is resampled by its own family's rule when that size
    is not its native one, and the rule is recorded per model. The probes are normalised
    once (both take the same bands). No bootstrap intervals are computed.

    Raises:
        CkaGeoError: Bad options (``names`` is refused: each model has its own names),
            unreadable checkpoints, probe images that cannot feed both models.
    """
    from cka_geo.compare.job import _load_any
    from cka_geo.data.normalize import resolve

    opts = dataclasses.replace(options or CompareOptions(), **kwargs)
    opts.validate()
    if opts.names:
        raise UsageError("--cross compares sublayer kinds (--sublayers), not explicit names: each model has its own")
    device = resolve_device(opts.device)
    a, b = _load_any(pre, opts), _load_any(ft, opts)
    _same_bands(a, b)
    bands = int(a.config.in_chans)
    probes = open_probes(opts, bands)
    hw = feedable_size(a, b, opts, probes.hw)
    what = f"{opts.data} (--data)" if opts.data and opts.image_size is None else "--image-size"
    resample = {"pre": at_size(a, a, hw, what), "ft": at_size(b, b, hw, what)}
    n, batch_size = device_defaults(device, opts.samples, opts.batch_size, probes.total)
    opts = dataclasses.replace(opts, batch_size=batch_size, own_change=False, bootstrap=0)
    norm = resolve(opts.normalize, bands, probes.band_names, embedded=probes.path is None, raw=probes.raw)
    model_a, model_b = build_model(a, device=device), build_model(b, device=device)
    names_a = resolve_sublayers(model_a, kinds=tuple(opts.sublayers))
    names_b = resolve_sublayers(model_b, kinds=tuple(opts.sublayers))
    batches, n, data_desc, shape = cut_batches(probes, opts, n, batch_size, hw, norm)
    _check_memory(model_a, model_b, names_a, names_b, shape, opts, n, device)
    result = _run(model_a, model_b, names_a, names_b, batches, opts, n)
    cap = result.extra["capture"]
    settings = {
        "mode": "cross",
        "kernel": result.kernel,
        "rbf_frac": result.rbf_frac,
        "estimator": result.estimator,
        "pooling": cap["pre"]["pooling"],
        "num_prefix_tokens": {"pre": cap["pre"]["num_prefix_tokens"], "ft": cap["ft"]["num_prefix_tokens"]},
        **run_settings(result, opts, data_desc, device),
        "sublayers": list(opts.sublayers),
        "bootstrap": 0,
        "image_size": [hw[0], hw[1]],
        "native_image_size": {"pre": list(native_hw(a)), "ft": list(native_hw(b))},
        "pos_embed_resample": resample,
        "bands": list(probes.band_names) if probes.band_names else None,
        "normalize": norm.record(),
    }
    return CrossResult(
        names_a,
        names_b,
        result.matrix,
        settings,
        sections={
            "models": {
                role: {"family": x.family, "config": dataclasses.asdict(x.config), "description": _describe(x)}
                for role, x in (("pre", a), ("ft", b))
            },
            "checkpoints": {"pre": _checkpoint_record(a), "ft": _checkpoint_record(b)},
            "versions": _versions(),
        },
        created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    )


def _run(
    model_a: nn.Module, model_b: nn.Module, names_a: list[str], names_b: list[str],
    batches: Any, opts: CompareOptions, total: int,
) -> CKAResult:
    """Both models over the same batches; every sublayer of A against every one of B."""
    acc = MinibatchCKA(kernel=opts.kernel, estimator=opts.estimator, rbf_frac=opts.rbf_frac)
    held_a: list[dict[str, torch.Tensor]] = []
    held_b: list[dict[str, torch.Tensor]] = []
    time_series = False
    precision = _forward_precision(opts, next(model_a.parameters()).device)
    with (
        capture(model_a, names_a, pooling=opts.pooling) as cap_a,
        capture(model_b, names_b, pooling=opts.pooling) as cap_b,
        _progress(total, opts.progress) as bar,
    ):
        for x in batches:
            time_series = time_series or x.ndim == 5
            with precision():  # full float32 matmuls, or bf16 autocast with --forward-precision bf16
                fa = forward_batch(model_a, x, cap_a, time_mode=opts.time_mode).features
                fb = forward_batch(model_b, x, cap_b, time_mode=opts.time_mode).features
            if opts.estimator == "biased":
                held_a.append(fa)
                held_b.append(fb)
            else:
                acc.update(fa, fb)
            bar.update(x.shape[0])
    if held_a:
        acc.update({n: torch.cat([h[n] for h in held_a]) for n in names_a}, {n: torch.cat([h[n] for h in held_b]) for n in names_b})
    result = acc.compute()
    result.extra["capture"] = {"pre": cap_a.settings, "ft": cap_b.settings}
    result.extra["time_series"] = time_series
    return result


def _check_memory(
    model_a: nn.Module, model_b: nn.Module, names_a: list[str], names_b: list[str],
    shape: tuple[int, ...], opts: CompareOptions, total: int, device: torch.device,
) -> None:
    """As :func:`cka_geo.compare.run.check_memory`, for two models of their own widths."""
    blank = torch.zeros((1, *shape), device=device)
    widths, per = 0, 1
    for model, names in ((model_a, names_a), (model_b, names_b)):
        with capture(model, names, pooling=opts.pooling) as cap:
            feats = forward_batch(model, blank, cap, time_mode=opts.time_mode).features
        widths += sum(f.shape[1] for f in feats.values())
        per = max(per, next(iter(feats.values())).shape[0])
    full = opts.estimator == "biased"
    batch = opts.batch_size or total
    rows = per * (total if full else min(batch, total))
    work = CKAWorkload(
        rows=rows, width=widths, layers_a=len(names_a), layers_b=len(names_b),
        batches=1 if full else batches_for(total, batch), bootstrap=0, held_rows=rows if full else 0,
    )
    what = f"--cross with --samples {total} and --batch-size {batch}"
    if full:
        what = f"--cross with --estimator biased (one batch of every sample) and --samples {total}"
    check_fits(work, device, what)
