"""Running a study: encoders made once, then each cell fine-tune -> evaluate -> compare -> probe.

Layout of the study folder ``OUT``::

    study.json, config.toml         what was asked (the config as given, the cell ids)
    encoders/NAME/                  encoder.json; pretrain/pretrained.pt (builtin encoders);
                                    probe/probe.json (layerwise probe of the pretrained encoder)
    cells/CELL_ID/                  cell.json (coordinates, settings, metrics, summary);
                                    finetune/ (pre.pt, ft.pt, eval.json, ...), evaluate.json,
                                    compare/ (results.json, results.csv), probe/ (probe.json)
    aggregate/                      tables, JSON and figures (:mod:`cka_geo.study.aggregate`)

Every encoder and cell folder is built in a hidden temporary sibling and renamed into place
when complete (:func:`cka_geo.atomic.atomic_dir`), so a folder that exists is finished; a
rerun skips it. A cell whose ``cell.json`` is missing, unreadable or lacks a file it lists is
redone; one run with other settings is refused in one line. A kill leaves a temporary that
the next run removes. Cells of other processes (``--shard``) are left alone; a cell another
live process is running is skipped (a lock per cell), and an encoder another process is
making is waited for.

Each step calls the commands' Python functions (not subprocesses):
:func:`cka_geo.train.runs.pretrain` / :func:`~cka_geo.train.runs.finetune`,
:func:`cka_geo.train.tasks.evaluate` on the reloaded ``ft.pt``,
:func:`cka_geo.compare.compare_checkpoints` with :func:`cka_geo.report.write_results`, and the
probe command's own code.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from cka_geo.atomic import atomic_dir, clean_stale, write_text_atomic
from cka_geo.errors import CkaGeoError, UsageError
from cka_geo.study.config import EncoderSpec, StudyConfig, TaskSpec
from cka_geo.study.grid import Cell, expand, shard

SCHEMA = "cka-geo/study/v1"
TOP_NAMES = {"study.json", "config.toml", "encoders", "cells", "aggregate"}
PRIMARY = {"segmentation": "miou", "classification": "accuracy", "regression": "r2", "multilabel": "map"}
"""The task metric that ranks encoders (higher is better for each)."""
CELL_FILES = ("finetune/pre.pt", "finetune/ft.pt", "evaluate.json", "compare/results.json")


def _say(text: str) -> None:
    print(f"cka-geo study: {text}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def _lock(path: Path, wait: bool) -> Iterator[bool]:
    """An exclusive lock on ``path`` (kept outside the study folder); yields whether it was taken."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: no lock
        yield True
        return
    base = Path(tempfile.gettempdir()) / f"cka-geo-locks-{os.getuid()}"
    base.mkdir(mode=0o700, exist_ok=True)
    key = hashlib.sha256(os.fsencode(os.path.realpath(path))).hexdigest()[:32]
    fd = os.open(base / f"study-{key}.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except OSError:
            yield False
            return
        yield True
    finally:
        os.close(fd)


def check_folder(out: Path) -> None:
    """Refuse an ``--out`` that is a file or holds anything but a study's files."""
    if os.path.lexists(out) and not out.is_dir():
        raise UsageError(f"--out {out}: exists and is not a folder; choose another --out")
    if out.is_dir():
        from cka_geo.atomic import is_temporary

        foreign = sorted(e for e in os.listdir(out) if e not in TOP_NAMES and not is_temporary(e) and e != ".DS_Store")
        if foreign:
            raise UsageError(f"--out {out}: the folder holds {foreign[0]!r}, which cka-geo study does not write; "
                             "choose another --out or empty it")


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _dump(obj: Any) -> str:
    return json.dumps(obj, indent=1, sort_keys=False, allow_nan=True, default=str) + "\n"


def _first_difference(old: Any, new: Any, key: str = "") -> str | None:
    if isinstance(old, dict) and isinstance(new, dict):
        for k in sorted(set(old) | set(new)):
            d = _first_difference(old.get(k), new.get(k), f"{key}.{k}" if key else k)
            if d:
                return d
        return None
    return None if old == new else f"{key} {old!r}, now {new!r}"


# --------------------------------------------------------------------------- encoders


def encoder_spec(cfg: StudyConfig, enc: EncoderSpec) -> dict[str, Any]:
    """What decides an encoder folder's contents (stored, compared on rerun)."""
    return {"name": enc.name, "checkpoint": enc.checkpoint, "builtin": enc.builtin, "image_size": enc.image_size,
            "probe": cfg.probe}


def encoder_path(out: Path, enc: EncoderSpec) -> Path:
    """The encoder's checkpoint: the user's file, or the builtin made in the study folder."""
    return out / "encoders" / enc.name / "pretrain" / "pretrained.pt" if enc.builtin is not None else Path(enc.checkpoint)


def prepare_encoder(cfg: StudyConfig, enc: EncoderSpec, out: Path, device: str) -> Path:
    """Make a builtin encoder and probe the pretrained encoder, once; return its checkpoint path."""
    folder = out / "encoders" / enc.name
    spec = encoder_spec(cfg, enc)
    if enc.builtin is None and not Path(enc.checkpoint).is_file():
        raise UsageError(f"{cfg.path}: encoders.{enc.name}.checkpoint: {enc.checkpoint}: no such file")
    with _lock(folder, wait=True):
        clean_stale(folder)
        done = _read_json(folder / "encoder.json")
        if isinstance(done, dict) and done.get("done"):
            diff = _first_difference(done.get("spec"), json.loads(json.dumps(spec)))
            if diff:
                raise UsageError(f"{folder}: made with other settings ({diff}); use another --out or remove the folder")
            if enc.builtin is None or (folder / "pretrain" / "pretrained.pt").is_file():
                return encoder_path(out, enc)
        t0 = time.perf_counter()
        with atomic_dir(folder) as tmp:
            info: dict[str, Any] = {"spec": spec}
            path = Path(enc.checkpoint)
            final = None
            if enc.builtin is not None:
                path, info["pretrain"] = _make_builtin(enc, tmp / "pretrain", device)
                final = folder / path.relative_to(tmp)
            if cfg.probe["enabled"]:
                info["probe"] = _probe(cfg, path, tmp / "probe", device, enc.trust, enc.image_size, final)
            info["seconds"] = round(time.perf_counter() - t0, 2)
            info["done"] = True
            write_text_atomic(tmp / "encoder.json", _dump(info))
        _say(f"encoder {enc.name} ready ({time.perf_counter() - t0:.1f} s)")
    return encoder_path(out, enc)


def _check_size(cfg: StudyConfig, enc: EncoderSpec, path: Path) -> None:
    """Refuse an ``image_size`` that is not a multiple of the checkpoint's patch, naming the key."""
    from cka_geo.checkpoints import load_checkpoint
    from cka_geo.compare.inputs import check_multiple
    from cka_geo.errors import DataError

    loaded = load_checkpoint(path, trust=enc.trust)
    size = enc.image_size or 0
    try:
        check_multiple((size, size), int(getattr(loaded.config, "patch_size", 1)), f"encoders.{enc.name}.image_size")
    except DataError as exc:
        raise UsageError(f"{cfg.path}: {exc}") from None


def _make_builtin(enc: EncoderSpec, folder: Path, device: str) -> tuple[Path, dict[str, Any]]:
    from cka_geo.commands import _training as T
    from cka_geo.models.vit import ViTConfig
    from cka_geo.train import TrainConfig
    from cka_geo.train.runs import build_vit, pretrain

    b = enc.builtin or {}
    vcfg = ViTConfig(img_size=b["img_size"], patch_size=b["patch_size"], in_chans=b["bands"],
                     embed_dim=b["embed_dim"], depth=b["depth"], num_heads=b["heads"])
    encoder = build_vit(vcfg, b["seed"])
    if enc.kind == "random":
        from cka_geo.checkpoints import save_checkpoint

        folder.mkdir(parents=True)
        path = save_checkpoint(folder / "pretrained.pt", encoder, vcfg, extra={"kind": "pretrained", "objective": "none"})
        return path, {"objective": "none"}
    data = T.embedded("train", "segmentation", b["img_size"], b["bands"], stride=b["stride"] or max(1, b["img_size"] // 2))
    kwargs = ({"mask_ratio": 0.75, "decoder_dim": 64, "decoder_depth": 1} if enc.kind == "mae" else {"temperature": 0.2})
    tcfg = TrainConfig(epochs=b["epochs"], batch_size=b["batch_size"], lr=b["lr"], warmup_steps=20, seed=b["seed"],
                       progress=False, device=device, keep_checkpoints=1)
    res = pretrain(encoder, data, folder, tcfg, objective=str(enc.kind), objective_kwargs=kwargs)
    shutil.rmtree(folder / "checkpoints", ignore_errors=True)  # the encoder file is what the study needs
    if res.encoder_path is None:  # pragma: no cover - all epochs always run here
        raise CkaGeoError(f"{folder}: pretraining wrote no encoder")
    losses = [r["train_loss"] for r in res.train.history["epochs"]]
    return res.encoder_path, {"objective": enc.kind, "epochs": len(losses), "loss_first": losses[0], "loss_last": losses[-1]}


def _probe(cfg: StudyConfig, checkpoint: Path, folder: Path, device: str, trust: bool,
           size: int | None = None, final: Path | None = None) -> dict[str, Any]:
    """The probe command's code on ``checkpoint`` (at ``size`` px if given); writes probe.json/csv; the summary.

    ``final`` is where ``checkpoint`` will be once its temporary folder is renamed (recorded).
    """
    from cka_geo.commands import probe as probe_module
    from cka_geo.commands.probe import _probe as probe_command
    from cka_geo.probing import write_probe

    p = cfg.probe
    # every option at the probe command's own default, then the study's settings
    parser = argparse.ArgumentParser()
    probe_module.add_arguments(parser)
    args = parser.parse_args([str(checkpoint)])
    vars(args).update(checkpoint=checkpoint, trust_checkpoint=trust, task=p["task"], batch_size=p["batch_size"],
                      sublayers=list(p["sublayers"]), pooling="mean", cv_folds=p["cv_folds"], tile_size=size)
    result = probe_command(args, device)
    if final is not None:
        result.extra["checkpoint"] = str(final)
    write_probe(result, folder, figure=False)
    return {"best": result.best, "best_metric": result.best_metric, "last": result.last,
            "best_is_intermediate": result.best_is_intermediate}


# --------------------------------------------------------------------------- cells


def cell_spec(cfg: StudyConfig, cell: Cell) -> dict[str, Any]:
    """What decides a cell's results (stored in cell.json, compared on rerun)."""
    return {**cell.keys(), "encoder_checkpoint": cell.encoder.checkpoint, "builtin": cell.encoder.builtin,
            "encoder_image_size": cell.encoder.image_size, "encoder_finetune_lr": cell.encoder.finetune_lr,
            # what the compare is given beyond [compare] (embedded tiles: the tiles' size and z-scoring)
            "compare_inputs": "data test split" if cell.task.data is not None else "tiles' size, scene z-score",
            "task_data": cell.task.data, "task_layout": cell.task.layout,
            "train": cfg.train, "compare": cfg.compare, "probe": cfg.probe}


def cell_state(cfg: StudyConfig, cell: Cell, out: Path) -> str:
    """``"done"``, ``"missing"`` or ``"broken"`` (cell.json unreadable or a file it needs gone)."""
    folder = out / "cells" / cell.id
    if not folder.is_dir():
        return "missing"
    info = _read_json(folder / "cell.json")
    if not isinstance(info, dict) or not info.get("done") or any(not (folder / f).is_file() for f in CELL_FILES):
        return "broken"
    if cfg.probe["enabled"] and not (folder / "probe" / "probe.json").is_file():
        return "broken"
    diff = _first_difference(info.get("spec"), json.loads(json.dumps(cell_spec(cfg, cell))))
    if diff:
        raise UsageError(f"{folder}: this cell was run with other settings ({diff}); use another --out or remove "
                         "the cell folder")
    return "done"


def _datasets(task: TaskSpec, size: int, bands: int, stride: int, checkpoint: Path) -> tuple[Any, Any, Any]:
    """Train, val and test data of a task at the encoder's size and bands."""
    from cka_geo.commands import _training as T

    return (T.embedded("train", task.task, size, bands, stride=stride, checkpoint=checkpoint),
            T.embedded("val", task.task, size, bands, checkpoint=checkpoint),
            T.embedded("test", task.task, size, bands, checkpoint=checkpoint))


def _user_task(task: TaskSpec, pre: Path, trust: bool) -> tuple[Any, Any, Any, Any, Any]:
    """A ``data`` task: encoder adapted to the data (finetune --data's rules), splits, the data."""
    from cka_geo.data.layouts import open_user_data
    from cka_geo.train.start import prepare_start

    data = open_user_data(task.data, task=task.task, layout=task.layout or "auto")  # type: ignore[arg-type]
    start = prepare_start(pre, data, trust=trust)
    s = start.splits
    return start.encoder, s["train"], (s["val"] if len(s["val"]) else None), s["test"], data


def _probe_array(test: Any, path: Path) -> str:
    """The test split's images, as the model sees them, in one (N, C, H, W) .npy for compare."""
    import numpy as np
    import torch

    if not len(test):
        raise UsageError(f"{path.parent}: the test split is empty; compare needs held-out images")
    np.save(path, torch.stack([test[i][0] for i in range(len(test))]).float().numpy())
    return str(path)


def run_cell(cfg: StudyConfig, cell: Cell, out: Path, pre: Path, device: str) -> dict[str, Any]:
    """Fine-tune, evaluate, compare and probe one cell into ``out/cells/ID`` (atomically); its cell.json."""
    from cka_geo.commands import _training as T
    from cka_geo.compare import compare_checkpoints
    from cka_geo.report import write_results
    from cka_geo.train import TrainConfig
    from cka_geo.train.runs import finetune, load_encoder, load_task_model
    from cka_geo.train.tasks import evaluate

    final = out / "cells" / cell.id
    tr, cp = cfg.train, cfg.compare
    times: dict[str, float] = {}
    with atomic_dir(final) as tmp:
        t = time.perf_counter()
        probes: dict[str, Any] = {"samples": cp["samples"]}
        if cell.task.data is None:
            with warnings.catch_warnings():  # the resample is recorded in the cell's compare settings
                warnings.simplefilter("ignore", RuntimeWarning)
                encoder = load_encoder(pre, trust=cell.encoder.trust, image_size=cell.encoder.image_size,
                                       what=f"encoders.{cell.encoder.name}.image_size")
            size = cell.encoder.image_size or T.square_size(encoder.cfg, pre)
            bands = int(encoder.cfg.in_chans)
            # the compare sees what the fine-tune saw: the tiles' size and z-scoring
            probes.update(image_size=size, normalize="scene")
            train, val, test = _datasets(cell.task, size, bands, tr["stride"] or max(1, size // 2), pre)
            task, outputs, ignore = cell.task.task, train.num_classes or 1, -1
        else:  # a user's dataset: compare on its test split, as the model sees it
            encoder, train, val, test, data = _user_task(cell.task, pre, cell.encoder.trust)
            task, outputs, ignore = data.task, data.num_outputs, data.ignore_index
            probes = {"data": _probe_array(test, tmp / "probes.npy"), "normalize": "none", "samples": None}
        lr = cell.encoder.finetune_lr or tr["lr"]
        tcfg = TrainConfig(epochs=tr["epochs"], batch_size=tr["batch_size"], lr=lr, weight_decay=tr["weight_decay"],
                           warmup_steps=tr["warmup_steps"], seed=cell.seed, progress=False, device=device,
                           keep_checkpoints=1)
        adaptation, last_k = cell.mode
        res = finetune(encoder, train, tmp / "finetune", tcfg, task=task, num_outputs=outputs, ignore_index=ignore,
                       decoder=cell.decoder, decoder_channels=tr["decoder_channels"], adaptation=adaptation,
                       last_k=last_k, label_fraction=cell.label_fraction, fraction_seed=cell.seed,
                       val_data=val, test_data=test, source=str(pre))
        times["finetune_s"] = time.perf_counter() - t
        if res.ft_path is None:  # pragma: no cover - all epochs always run here
            raise CkaGeoError(f"{final}: fine-tuning stopped early")
        # A finished cell keeps pre.pt and ft.pt, not the training checkpoints (model and
        # optimizer: 267 MB per epoch for a ViT-S/14), which only a resume of the run needs.
        shutil.rmtree(tmp / "finetune" / "checkpoints", ignore_errors=True)
        t = time.perf_counter()
        model = load_task_model(res.ft_path)  # the evaluate command's path: the model as saved
        metrics = evaluate(model, test, tr["batch_size"])
        write_text_atomic(tmp / "evaluate.json", _dump({"checkpoint": "finetune/ft.pt", "split": "test",
                                                        "task": model.task, **metrics}))
        times["evaluate_s"] = time.perf_counter() - t
        t = time.perf_counter()
        r = compare_checkpoints(res.pre_path, res.ft_path, device=device, **probes,
                                batch_size=cp["batch_size"], seed=cell.seed, bootstrap=cp["bootstrap"],
                                sublayers=tuple(cp["sublayers"]), progress=False)
        for record in r["checkpoints"].values():  # where the files will be, not the temporary folder
            record["path"] = str(final / Path(record["path"]).relative_to(tmp))
        write_results(r, tmp / "compare")
        (tmp / "probes.npy").unlink(missing_ok=True)
        times["compare_s"] = time.perf_counter() - t
        info: dict[str, Any] = {"spec": cell_spec(cfg, cell), "test": metrics,
                                "primary_metric": PRIMARY[task],
                                "train_samples": len(res.train_indices), "summary": r["summary"]}
        if cfg.probe["enabled"]:
            t = time.perf_counter()
            info["probe"] = _probe(cfg, res.ft_path, tmp / "probe", device, False, cell.encoder.image_size,
                                   final / Path(res.ft_path).relative_to(tmp))
            times["probe_s"] = time.perf_counter() - t
        info["timings_s"] = {k: round(v, 2) for k, v in times.items()}
        info["device"] = device
        info["done"] = True
        write_text_atomic(tmp / "cell.json", _dump(info))
    return info


def prepare_study(cfg: StudyConfig, out: Path) -> list[Cell]:
    """Check ``out``, write study.json and config.toml (when new or changed); the grid's cells."""
    check_folder(out)
    cells = expand(cfg)
    out.mkdir(parents=True, exist_ok=True)
    study = {"schema": SCHEMA, "name": cfg.name, "config": str(cfg.path), "cells": [c.id for c in cells]}
    if _read_json(out / "study.json") != study:
        write_text_atomic(out / "study.json", _dump(study))
    with contextlib.suppress(OSError):
        text = cfg.path.read_text(encoding="utf-8")
        if not (out / "config.toml").is_file() or (out / "config.toml").read_text(encoding="utf-8") != text:
            write_text_atomic(out / "config.toml", text)
    return cells


def run_cells(cfg: StudyConfig, out: Path, ids: list[str], device: str, threads: int | None = None) -> dict[str, int]:
    """Run the cells named by ``ids`` (finished ones skipped) on ``device``; counts of run/skipped/busy."""
    from cka_geo.commands import _training as T

    T.set_threads(threads)
    cells = {c.id: c for c in expand(cfg)}
    counts = {"run": 0, "skipped": 0, "busy": 0, "redone": 0}
    for k, cid in enumerate(ids, 1):
        cell = cells[cid]
        folder = out / "cells" / cid
        with _lock(folder, wait=False) as mine:
            if not mine:
                counts["busy"] += 1
                _say(f"[{k}/{len(ids)}] {cid}: another process is running it")
                continue
            clean_stale(folder)
            state = cell_state(cfg, cell, out)
            if state == "done":
                counts["skipped"] += 1
                continue
            if state == "broken":
                counts["redone"] += 1
                _say(f"[{k}/{len(ids)}] {cid}: incomplete, redone")
            t = time.perf_counter()
            info = run_cell(cfg, cell, out, encoder_path(out, cell.encoder), device)
            counts["run"] += 1
            metric = info["primary_metric"]
            _say(f"[{k}/{len(ids)}] {cid}: {metric} {info['test'][metric]:.4f}, "
                 f"{time.perf_counter() - t:.1f} s on {device}")
    return counts


def _worker(config_path: str, out: str, ids: list[str], device: str, threads: int | None) -> dict[str, int]:
    from cka_geo.study.config import load_config

    return run_cells(load_config(config_path), Path(out), ids, device, threads)


def run_study(cfg: StudyConfig, out: str | os.PathLike[str], *, devices: tuple[str, ...] = ("cpu",),
              shard_index: int = 0, shard_count: int = 1, threads: int | None = None,
              figures: bool = True) -> dict[str, Any]:
    """Run this process's share of the grid and aggregate when the whole grid is finished.

    Args:
        cfg: The parsed config.
        out: The study folder (created; resumed when it holds the same study).
        devices: Where cells run; with several, one worker process per device takes every
            ``len(devices)``-th cell of this shard (encoders are made first, here).
        shard_index, shard_count: This process takes cells ``k`` with ``k mod count == index``.
        threads: torch CPU threads per process (default: cores, at most 4).
        figures: Draw the aggregate figures (needs matplotlib).

    Returns:
        ``cells`` (grid size), ``mine`` (this shard's), ``run``, ``skipped``, ``redone``,
        ``busy``, ``finished`` (of the whole grid) and ``aggregate`` (its folder, or None).
    """
    from cka_geo.commands import _training as T

    folder = Path(out)
    for enc in cfg.encoders:  # before anything is written
        if enc.builtin is None and enc.image_size is not None and Path(enc.checkpoint).is_file():
            _check_size(cfg, enc, Path(enc.checkpoint))
    cells = prepare_study(cfg, folder)
    T.set_threads(threads)
    mine = shard(cells, shard_index, shard_count)
    for enc in cfg.encoders:
        if any(c.encoder.name == enc.name for c in mine) or shard_count == 1:
            prepare_encoder(cfg, enc, folder, devices[0])
    ids = [c.id for c in mine]
    totals = {"run": 0, "skipped": 0, "busy": 0, "redone": 0}
    if len(devices) == 1:
        totals = run_cells(cfg, folder, ids, devices[0], threads)
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=len(devices), mp_context=ctx) as pool:
            futures = [pool.submit(_worker, str(cfg.path), str(folder), ids[j::len(devices)], d, threads)
                       for j, d in enumerate(devices)]
            for f in futures:
                for k, v in f.result().items():
                    totals[k] += v
    finished = sum(cell_state(cfg, c, folder) == "done" for c in cells)
    agg = None
    if finished == len(cells):
        from cka_geo.study.aggregate import aggregate

        agg = aggregate(cfg, folder, figures=figures)
    return {"cells": len(cells), "mine": len(mine), **totals, "finished": finished, "aggregate": agg}


__all__ = ["PRIMARY", "SCHEMA", "cell_spec", "cell_state", "check_folder", "encoder_path", "prepare_encoder",
           "prepare_study", "run_cell", "run_cells", "run_study"]
