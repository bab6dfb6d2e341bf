"""One training loop for pretraining and fine-tuning (nanoGPT-style: plain, readable, resumable).

The model is any ``nn.Module`` with ``training_step(batch, generator) -> (loss, logs)``
(:class:`~cka_geo.train.objectives.MAE`, :class:`~cka_geo.train.objectives.SimCLR`,
:class:`~cka_geo.train.tasks.TaskModel`). :func:`fit` runs AdamW with linear warm-up and a
cosine decay computed from the global step (optionally with layer-wise decay, drop path,
gradient accumulation and mixed precision: :mod:`cka_geo.train.recipe`), and after every
epoch writes, atomically:

- ``checkpoints/epoch_NNN.pt`` and ``checkpoints/last.pt``: one dict ``{"format", "model",
  "optimizer", "config", "epoch", "step", "rng", "history"}`` (``epoch`` = epochs done;
  ``"scaler"`` too under ``16-mixed``;
  ``rng`` = torch, numpy and python global states plus the loop's own generator);
- ``metrics.csv`` and ``metrics.json``: every record so far (per-step losses and learning
  rates, per-epoch means and validation metrics, and whatever callbacks logged).

Determinism: the data order of epoch e is ``randperm`` under a generator seeded with
(seed, e) alone, and all of the objective's randomness comes from the loop's generator, whose
state is checkpointed. Resuming from ``last.pt`` after a kill therefore gives weights
bit-identical (on CPU) to an uninterrupted run. Callbacks run isolated (see
:mod:`cka_geo.train.callbacks`), so observing the model changes nothing.

Progress goes to a tqdm bar on stderr, shown only when stderr is a terminal.

Under ``torchrun`` the model trains with DistributedDataParallel on shares of the same
global batches, rank 0 writing (the hooks marked ``ddp`` below; :mod:`cka_geo.train.ddp`).
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import shutil
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from cka_geo import distributed
from cka_geo.atomic import atomic_path, write_text_atomic
from cka_geo.errors import CheckpointError, CkaGeoError, DataError, UsageError
from cka_geo.train import ddp
from cka_geo.train.callbacks import TrainContext, as_callbacks
from cka_geo.train.rng import _rng_state, _set_rng_state, seed_everything

CHECKPOINT_FORMAT = "cka-geo-train/1"

# Settings that may change when a run is resumed: how far it runs, where, and what it shows.
RESUMABLE = frozenset({"train.epochs", "train.device", "train.progress", "train.stop_after_epoch",
                       "train.log_every", "train.keep_checkpoints"})
_CHECKPOINT_KEYS = {"model": dict, "optimizer": dict, "config": dict, "epoch": int, "step": int, "rng": dict,
                    "history": dict}


class ResumeMismatch(UsageError):
    """A resumed run whose settings differ from the checkpoint's (``key`` dotted, e.g. ``train.lr``)."""

    def __init__(self, path: str | Path, key: str, old: Any, new: Any) -> None:
        super().__init__(f"{path}: the checkpoint's run has {key}={old!r}, this run {new!r}; "
                         "resume with the same settings")
        self.key, self.old, self.new = key, old, new


@dataclass
class TrainConfig:
    """Settings of one run (stored in every checkpoint).

    Attributes:
        epochs: Total epochs.
        batch_size: Samples per step (the last batch of an epoch may be smaller).
        lr: Peak learning rate.
        min_lr_ratio: Final learning rate as a fraction of ``lr`` (cosine decay).
        warmup_steps: Linear warm-up steps.
        weight_decay: AdamW decay on weights with ≥ 2 dimensions (none on biases, norms,
            embeddings' 1-d parameters).
        betas: AdamW betas.
        grad_clip: Max global gradient norm, or None.
        seed: Seed of the data order and of the loop's generator.
        stop_after_epoch: Stop (as if killed) once this many epochs are done; the run can
            be resumed. None runs to ``epochs``.
        keep_checkpoints: Per-epoch files to keep (newest), or None for all.
        progress: Show a progress bar; None: only if stderr is a terminal.
        log_every: Record the step loss every this many steps.
        device: Where to train (``"cpu"``, ``"cuda"``, ``"cuda:N"``); batches are moved there.
            Bit-identical resume is guaranteed on CPU only.
        layer_decay, drop_path, accum_steps, precision: The recipe (:mod:`cka_geo.train.recipe`):
            layer-wise LR decay (1: none), last block's drop-path rate (0: off), micro-batches of
            ``batch_size`` per optimizer step (each weighted by its share of the step's samples,
            so k x b equals one batch of k·b), ``"32"``, ``"bf16-mixed"`` or ``"16-mixed"``.
    """

    epochs: int = 10
    batch_size: int = 32
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 0
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float | None = 1.0
    seed: int = 0
    stop_after_epoch: int | None = None
    keep_checkpoints: int | None = None
    progress: bool | None = None
    log_every: int = 1
    device: str = "cpu"
    layer_decay: float = 1.0
    drop_path: float = 0.0
    accum_steps: int = 1
    precision: str = "32"

    def __post_init__(self) -> None:
        from cka_geo.train.recipe import check_recipe

        if self.epochs < 1 or self.batch_size < 1:
            raise UsageError(f"epochs and batch size must be positive, got {self.epochs} and {self.batch_size}")
        if not self.lr > 0:
            raise UsageError(f"learning rate must be positive, got {self.lr}")
        check_recipe(self.layer_decay, self.drop_path, self.accum_steps, self.precision)
        self.betas = tuple(self.betas)  # type: ignore[assignment]


@dataclass
class TrainResult:
    """What :func:`fit` returns.

    Attributes:
        epochs_done: Epochs completed (including those before a resume).
        step: Optimizer steps completed.
        finished: Whether all ``epochs`` are done (False after ``stop_after_epoch``).
        history: ``{"epochs": [...], "steps": [...]}`` records, as in ``metrics.json``.
        checkpoint: Path of the last checkpoint written, or None.
    """

    epochs_done: int
    step: int
    finished: bool
    history: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    checkpoint: Path | None = None


def get_lr(step: int, total_steps: int, cfg: TrainConfig) -> float:
    """Learning rate at ``step``: linear warm-up, then cosine from ``lr`` to ``lr·min_lr_ratio``."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, total_steps - cfg.warmup_steps)
    t = min(1.0, (step - cfg.warmup_steps) / span)
    lo = cfg.lr * cfg.min_lr_ratio
    return lo + 0.5 * (1 + math.cos(math.pi * t)) * (cfg.lr - lo)


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters; decay only on tensors with ≥ 2 dimensions (groups of
    :func:`cka_geo.train.recipe.param_groups`, with their ``lr_scale``, under layer decay)."""
    if cfg.layer_decay != 1:
        from cka_geo.train.recipe import param_groups

        return torch.optim.AdamW(param_groups(model, cfg.weight_decay, cfg.layer_decay), lr=cfg.lr, betas=cfg.betas)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise UsageError("the model has no trainable parameters")
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas)


@contextlib.contextmanager
def isolated(model: nn.Module) -> Iterator[None]:
    """Run a callback without effect on the run: no grad, RNG states and module modes restored."""
    rng = _rng_state()
    modes = [m.training for m in model.modules()]
    try:
        with torch.no_grad():
            yield
    finally:
        _set_rng_state(rng)
        for m, mode in zip(model.modules(), modes, strict=True):
            m.training = mode


def _collate(dataset: Any, idx: torch.Tensor) -> Any:
    from torch.utils.data import default_collate

    return default_collate([dataset[int(i)] for i in idx])


def to_device(batch: Any, device: torch.device) -> Any:
    """Move the tensors of a (nested list/tuple/dict) batch to ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    return batch


def _epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))


def write_metrics(out_dir: Path, history: dict[str, list[dict[str, Any]]]) -> None:
    """Write ``metrics.json`` and ``metrics.csv`` (all records; union of columns) atomically."""
    write_text_atomic(out_dir / "metrics.json", json.dumps(history, indent=1, default=float) + "\n")
    rows = [{"kind": "epoch", **r} for r in history.get("epochs", [])] + [
        {"kind": "step", **r} for r in history.get("steps", [])
    ]
    rows.sort(key=lambda r: (r.get("step", 0), r["kind"] == "epoch"))
    cols: list[str] = []
    for r in rows:
        cols += [k for k in r if k not in cols]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    write_text_atomic(out_dir / "metrics.csv", buf.getvalue())


def load_train_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint written by :func:`fit` (weights-only: no pickle code runs)."""
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"{p}: no such checkpoint")
    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"{p}: cannot read training checkpoint ({type(exc).__name__})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{p}: not a cka-geo training checkpoint (format {CHECKPOINT_FORMAT})")
    for key, kind in _CHECKPOINT_KEYS.items():
        if not isinstance(ckpt.get(key), kind):
            raise CheckpointError(f"{p}: incomplete training checkpoint ({key!r} missing or not a {kind.__name__})")
    if not isinstance(ckpt["config"].get("train"), dict) or "generator" not in ckpt["rng"]:
        raise CheckpointError(f"{p}: incomplete training checkpoint (no train config or generator state)")
    return ckpt


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: list(d) if isinstance(d, tuple) else d}


def stored_config(cfg: TrainConfig, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """What :func:`fit` stores as a checkpoint's ``config``: the loop settings and ``extra``."""
    return {"train": asdict(cfg), **(extra or {})}


def check_resume(ckpt: dict[str, Any], config: dict[str, Any], path: str | Path) -> None:
    """Refuse to resume when a setting that shapes the run differs from the checkpoint's.

    Everything stored in the checkpoint's config must match ``config`` (the loop settings,
    the objective, the model, the task, the data), except :data:`RESUMABLE` (epochs to run
    to, device, progress bar, logging, checkpoints kept). Settings the checkpoint does not
    store (written by an older version) are not compared.

    Raises:
        ResumeMismatch: Naming the first differing setting.
    """
    old, new = _flat(ckpt["config"]), _flat(config)
    keys = [*new, *(k for k in old if k not in new)]
    for key in sorted(keys, key=lambda k: k != "kind"):  # a pretrain vs finetune checkpoint first
        if key in RESUMABLE or key not in old:
            continue
        if old[key] != new.get(key):
            raise ResumeMismatch(path, key, old[key], new.get(key))


def fit(
    model: nn.Module,
    train_data: Any,
    cfg: TrainConfig,
    out_dir: str | Path | None = None,
    *,
    val_fn: Callable[[nn.Module], dict[str, float]] | None = None,
    callbacks: Iterable[Any] | None = None,
    resume: str | Path | None = None,
    run_config: dict[str, Any] | None = None,
) -> TrainResult:
    """Train ``model`` on ``train_data``; checkpoint and record metrics after every epoch.

    Args:
        model: Module with ``training_step(batch, generator)``; only parameters with
            ``requires_grad`` are optimised.
        train_data: Map-style dataset (``len`` and ``[i]``) whose items collate with
            ``default_collate``.
        cfg: Settings.
        out_dir: Run directory for checkpoints and metrics; None writes nothing.
        val_fn: Called with the model after each epoch; its dict is recorded as ``val_*``.
        callbacks: Objects following :class:`~cka_geo.train.callbacks.Callback`.
        resume: A checkpoint of an earlier run of the same configuration to continue from.
        run_config: Extra JSON-able settings stored in the checkpoints (model, objective...).

    Returns:
        A :class:`TrainResult`.
    """
    cbs = as_callbacks(callbacks)
    n = len(train_data)
    if n == 0:
        raise DataError("the training dataset is empty")
    out = Path(out_dir) if out_dir is not None else None
    per_step = cfg.batch_size * cfg.accum_steps
    steps_per_epoch = math.ceil(n / per_step)
    total_steps = cfg.epochs * steps_per_epoch
    from cka_geo.devices import resolve_device

    device = distributed.init(resolve_device(cfg.device))  # ddp: cuda:LOCAL_RANK under torchrun
    ddp.check_batch_size(cfg.batch_size)  # ddp: the global batch, shared evenly
    if not distributed.is_main():  # ddp: rank 0 alone writes
        out = None
    config = stored_config(cfg, run_config)
    ckpt = None
    if resume is not None:
        ckpt = load_train_checkpoint(resume)
        check_resume(ckpt, config, resume)
    model.to(device)
    from cka_geo.train import recipe

    if cfg.drop_path:
        recipe.set_drop_path(model, cfg.drop_path)
    opt = make_optimizer(model, cfg)
    scaler = recipe.grad_scaler(cfg.precision, device)
    gen = torch.Generator().manual_seed(ddp.rank_seed(cfg.seed))  # ddp: cfg.seed on rank 0
    history: dict[str, list[dict[str, Any]]] = {"epochs": [], "steps": []}
    start_epoch, step = 0, 0

    if ckpt is not None:
        try:
            model.load_state_dict(ckpt["model"])
            opt.load_state_dict(ckpt["optimizer"])
            ddp.restore_generator(gen, ckpt["rng"])  # ddp: this rank's state
            _set_rng_state(ckpt["rng"])
            if "scaler" in ckpt:
                scaler.load_state_dict(ckpt["scaler"])
        except (RuntimeError, ValueError, KeyError, TypeError, IndexError) as exc:
            reason = " ".join(str(exc).split())[:160] or type(exc).__name__
            raise CheckpointError(f"{resume}: the checkpoint does not fit this run's model ({reason})") from None
        start_epoch, step, history = ckpt["epoch"], ckpt["step"], ckpt["history"]

    step_fn = ddp.wrap(model, device)  # ddp: DistributedDataParallel under torchrun, else training_step
    ctx = TrainContext(model=model, encoder=getattr(model, "encoder", None), step=step,
                       epoch=start_epoch, epochs=cfg.epochs, out_dir=out)

    def sink(values: dict[str, Any]) -> None:
        history["steps"].append({"step": ctx.step, "epoch": ctx.epoch, **values})

    ctx.sink = sink
    for cb in cbs:
        with isolated(model):
            cb.on_train_start(ctx)

    from tqdm.auto import tqdm

    show = (sys.stderr.isatty() if cfg.progress is None else cfg.progress) and distributed.is_main()
    bar = tqdm(total=(cfg.epochs - start_epoch) * steps_per_epoch, file=sys.stderr, disable=not show,
               desc="train", dynamic_ncols=True, leave=False)
    last_path: Path | None = None
    epochs_done = start_epoch
    try:
        for epoch in range(start_epoch, cfg.epochs):
            ctx.epoch = epoch
            model.train()
            order = _epoch_order(n, cfg.seed, epoch)
            losses = []
            for i in range(steps_per_epoch):
                idx = order[i * per_step : (i + 1) * per_step]
                lr = get_lr(step, total_steps, cfg)
                for group in opt.param_groups:
                    group["lr"] = lr * group.get("lr_scale", 1.0)
                opt.zero_grad(set_to_none=True)
                step_loss = 0.0
                for j in range(0, len(idx), cfg.batch_size):  # one micro-batch unless accum_steps > 1
                    micro = idx[j : j + cfg.batch_size]
                    rows, weight = ddp.local_rows(micro)  # ddp: this rank's share of the micro-batch
                    batch = to_device(_collate(train_data, rows), device)
                    with recipe.autocast(cfg.precision, device):
                        loss, logs = step_fn(batch, gen)
                    value = ddp.global_loss(loss, weight)  # ddp: the micro-batch's mean, on every rank
                    if not math.isfinite(value):
                        raise CkaGeoError(f"loss became {value} at step {step} (epoch {epoch}); "
                                          "lower the learning rate")
                    share = len(micro) / len(idx) * weight  # accumulation share x ddp: share of the batch
                    scaler.scale(loss if share == 1 else loss * share).backward()
                    step_loss += value * len(micro) / len(idx)
                if cfg.grad_clip:
                    scaler.unscale_(opt)
                    torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], cfg.grad_clip)
                scaler.step(opt)
                scaler.update()
                step += 1
                losses.append(step_loss)
                logs = {**logs, "loss": step_loss} if "loss" in logs else logs
                ctx.step, ctx.loss, ctx.logs = step, losses[-1], {**logs, "lr": lr}
                if step % cfg.log_every == 0:
                    history["steps"].append({"step": step, "epoch": epoch, "lr": lr, **logs})
                for cb in cbs:
                    with isolated(model):
                        cb.on_step_end(ctx)
                bar.update(1)
                bar.set_postfix(epoch=epoch, loss=f"{losses[-1]:.4f}")
            record: dict[str, Any] = {"epoch": epoch, "step": step, "train_loss": float(np.mean(losses))}
            if val_fn is not None:
                record.update({f"val_{k}": float(v) for k, v in val_fn(model).items()})
            ctx.logs = record
            for cb in cbs:
                with isolated(model):
                    cb.on_epoch_end(ctx)
            history["epochs"].append(record)
            epochs_done = epoch + 1
            gens = ddp.generator_states(gen)  # ddp: a collective, on every rank
            if out is not None:
                write_metrics(out, history)
                last_path = _save(out, epochs_done, step, model, opt, gen, config, history, cfg.keep_checkpoints,
                                  scaler, gens)
            if cfg.stop_after_epoch is not None and epochs_done >= cfg.stop_after_epoch and epochs_done < cfg.epochs:
                break
    finally:
        bar.close()
    finished = epochs_done >= cfg.epochs
    if finished:
        for cb in cbs:
            with isolated(model):
                cb.on_train_end(ctx)
        if out is not None:
            write_metrics(out, history)
    if last_path is None and out is not None and (out / "checkpoints" / "last.pt").is_file():
        last_path = out / "checkpoints" / "last.pt"
    return TrainResult(epochs_done, step, finished, history, last_path)


def _save(out: Path, epochs_done: int, step: int, model: nn.Module, opt: torch.optim.Optimizer,
          gen: torch.Generator, config: dict[str, Any], history: dict[str, Any], keep: int | None,
          scaler: torch.amp.GradScaler | None = None, gens: list[torch.Tensor] | None = None) -> Path:
    ckpt: dict[str, Any] = {
        "format": CHECKPOINT_FORMAT,
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "config": config,
        "epoch": epochs_done,
        "step": step,
        "rng": {**_rng_state(), "generator": gen.get_state(),
                **({"generator_ranks": gens} if gens is not None else {})},  # ddp: every rank's
        "history": history,
    }
    if scaler is not None and scaler.is_enabled():
        ckpt["scaler"] = scaler.state_dict()
    ckdir = out / "checkpoints"
    path = ckdir / f"epoch_{epochs_done:03d}.pt"
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:  # a file object: a full disk is an OSError
        torch.save(ckpt, fh)
    with atomic_path(ckdir / "last.pt") as tmp:
        shutil.copyfile(path, tmp)
    if keep is not None:
        for old in sorted(ckdir.glob("epoch_*.pt"))[:-keep]:
            old.unlink()
    return ckdir / "last.pt"


__all__ = [
    "CHECKPOINT_FORMAT", "RESUMABLE", "ResumeMismatch", "TrainConfig", "TrainResult", "check_resume",
    "fit", "get_lr", "isolated", "load_train_checkpoint", "make_optimizer", "seed_everything",
    "stored_config", "write_metrics",
]
