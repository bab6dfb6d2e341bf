"""compare_checkpoints: load, check, build, probe, run, and the typed result."""

from __future__ import annotations

import dataclasses
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
from cka_geo.compare.run import check_memory, run_cka
from cka_geo.data.probes import distinct_crops
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
    opts = dataclasses.replace(options or CompareOptions(), **kwargs)
    opts.validate()
    device = resolve_device(opts.device)
    a, b = (_load_any(x, opts) for x in (pre, ft))
    if opts.num_heads is None:
        share_stored_heads(a, b)
    pair = check_pair(a, b)
    bands = int(a.config.in_chans)
    probes = open_probes(opts, bands)
    hw = parse_size(opts.image_size) or probes.hw
    chosen = {"image_size": hw is None}
    if hw is None:  # the embedded scene at the device's default size
        hw = default_image_size(native_hw(a), int(getattr(a.config, "patch_size", 1)), device, distinct_crops)
    what = f"{opts.data} (--data)" if opts.data and opts.image_size is None else "--image-size"
    resample = at_size(a, b, hw, what)
    distinct = distinct_crops(hw) if probes.path is None else None
    n, batch_size = device_defaults(device, opts.samples, opts.batch_size, probes.total, distinct)
    chosen.update(samples=opts.samples is None and probes.total is None, batch_size=opts.batch_size is None)
    opts = dataclasses.replace(opts, batch_size=batch_size)
    from cka_geo.data.normalize import resolve

    norm = resolve(opts.normalize, bands, probes.band_names, embedded=probes.path is None, raw=probes.raw)
    model_pre = build_model(a, device=device)
    model_ft = build_model(b, device=device)
    if opts.names:
        names = resolve_sublayers(model_pre, list(opts.names))
    else:
        names = resolve_sublayers(model_pre, kinds=tuple(opts.sublayers))
    batches, n, data_desc, shape = cut_batches(probes, opts, n, batch_size, hw, norm)
    check_memory(model_pre, names, shape, opts, n, device)
    if opts.progress is not False:
        _say_plan(a, names, n, batch_size, hw, device, data_desc, norm.name, chosen)
    result = run_cka(model_pre, model_ft, names, batches, opts, n)
    out = build_results(result, names, opts, a, b, pair, data_desc, device)
    out.settings.update({
        "image_size": [hw[0], hw[1]],
        "native_image_size": list(native_hw(a)),
        "pos_embed_resample": resample,
        "bands": list(probes.band_names) if probes.band_names else None,
        "normalize": norm.record(),
        "defaults_by_device": {k: v for k, v in chosen.items() if v} or None,
        "probe_crops": embedded_record(hw, int(out.settings.get("samples") or n)) if probes.path is None else None,
    })
    return out


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
    device: Any, data: str, norm: str, chosen: dict[str, bool],
) -> None:
    """One stderr line: what the run will do (model, samples, batches, size, device)."""
    import math
    import sys

    cfg = a.config
    model = f"{a.family} ViT, {getattr(cfg, 'depth', '?')} blocks, width {getattr(cfg, 'embed_dim', '?')}, {cfg.in_chans} bands"
    by = [k.replace("_", " ") for k, v in chosen.items() if v]
    dflt = f" ({', '.join(by)}: {device.type.upper()} default)" if by else ""
    print(
        f"cka-geo compare: {model}; {n} images of {data} at {hw[0]}x{hw[1]} px in "
        f"{math.ceil(n / batch)} batches of {batch}{dflt}; normalize {norm}; {len(names)} sublayers; device {device}",
        file=sys.stderr,
        flush=True,
    )
