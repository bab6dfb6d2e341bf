"""Pretraining and fine-tuning end to end: what ``cka-geo pretrain/finetune/evaluate`` run.

Files of a pretraining run (``out_dir``): ``pretrained.pt`` (the encoder alone, written by
:func:`cka_geo.checkpoints.save_checkpoint`, timm keys, exact config), ``checkpoints/``
(per-epoch training checkpoints with the objective's decoder and optimizer, for resuming),
``metrics.csv``/``metrics.json``.

Files of a fine-tuning run: ``pre.pt`` (the starting encoder, exactly as loaded), ``ft.pt``
(the fine-tuned encoder; the task head rides in the file's ``task_head`` extra entry, outside
the state dict, so ``compare`` sees the encoder only), ``checkpoints/``, ``metrics.*`` and
``eval.json`` (validation and test metrics). ``cka-geo compare pre.pt ft.pt`` works on them
as they are.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
from torch.utils.data import Subset

from cka_geo import distributed
from cka_geo.atomic import write_text_atomic
from cka_geo.errors import CheckpointError
from cka_geo.models.vit import VisionTransformer, ViTConfig
from cka_geo.train.loop import (
    TrainConfig,
    TrainResult,
    check_resume,
    fit,
    load_train_checkpoint,
    seed_everything,
    stored_config,
)
from cka_geo.train.objectives import build_objective
from cka_geo.train.tasks import (
    TaskModel,
    dataset_targets,
    evaluate,
    label_strata,
    set_adaptation,
    stratified_indices,
)


def build_vit(cfg: ViTConfig, seed: int = 0) -> VisionTransformer:
    """A freshly initialised encoder, seeded."""
    seed_everything(seed)
    return VisionTransformer(cfg)


@dataclass
class PretrainResult:
    """Paths and history of a pretraining run."""

    encoder_path: Path | None
    train: TrainResult


def pretrain(
    encoder: VisionTransformer,
    train_data: Any,
    out_dir: str | Path,
    cfg: TrainConfig,
    *,
    objective: str = "mae",
    objective_kwargs: dict[str, Any] | None = None,
    callbacks: list[Any] | None = None,
    resume: str | Path | None = None,
    run_info: dict[str, Any] | None = None,
) -> PretrainResult:
    """Self-supervised pretraining; writes ``pretrained.pt`` when all epochs are done.

    Args:
        encoder: The ViT to train (changed in place).
        train_data: Dataset of images or ``(image, target)`` pairs (targets unused).
        out_dir: Run directory.
        cfg: Loop settings.
        objective: ``"mae"`` or ``"simclr"``.
        objective_kwargs: Passed to the objective (e.g. ``mask_ratio``, ``decoder_dim``).
        callbacks: Loop callbacks.
        resume: Training checkpoint to continue from (refused when its run's settings differ:
            see :func:`~cka_geo.train.loop.check_resume`).
        run_info: More settings to store and to compare on resume (e.g. the data's stride).
    """
    from cka_geo.checkpoints import save_checkpoint

    out = Path(out_dir)
    kwargs = dict(objective_kwargs or {})
    torch.manual_seed(cfg.seed)  # the objective's own initialisation
    model = build_objective(objective, encoder, **kwargs)
    run_config = {"kind": "pretrain", "objective": objective, "objective_kwargs": kwargs,
                  "encoder": encoder.cfg.to_dict(), **(run_info or {})}
    res = fit(model, train_data, cfg, out, callbacks=callbacks, resume=resume, run_config=run_config)
    path = None
    if res.finished:
        path = save_checkpoint(out / "pretrained.pt", encoder, encoder.cfg, extra={
            "kind": "pretrained", "objective": objective, "epochs": res.epochs_done, "step": res.step,
            "final_loss": res.history["epochs"][-1]["train_loss"] if res.history["epochs"] else math.nan,
        })
    return PretrainResult(path, res)


def load_encoder(path: str | Path, trust: bool = False, image_size: int | None = None,
                 what: str = "--image-size") -> VisionTransformer:
    """The timm-family encoder of a checkpoint file, in train mode with gradients on.

    Args:
        path: The checkpoint file.
        trust: Allow pickled code in it.
        image_size: Square tiles of another size than the checkpoint's: its position
            embedding is then resampled on the fly by its family's rule (as compare does; one
            RuntimeWarning says so). ``what`` names the setting in errors.
    """
    from cka_geo.checkpoints import build_model, load_checkpoint
    from cka_geo.compare.inputs import at_size

    loaded = load_checkpoint(path, trust=trust)
    if loaded.family != "timm":
        raise CheckpointError(f"{path}: fine-tuning needs a timm-style ViT, found {loaded.family}")
    if image_size is not None:
        at_size(loaded, loaded, (image_size, image_size), what)
    enc = cast(VisionTransformer, build_model(loaded))
    enc.requires_grad_(True)
    return enc.train()


@dataclass
class FinetuneResult:
    """Paths and metrics of a fine-tuning run."""

    pre_path: Path
    ft_path: Path | None
    train: TrainResult
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    train_indices: list[int] = field(default_factory=list)


def finetune(
    pre: str | Path | VisionTransformer,
    train_data: Any,
    out_dir: str | Path,
    cfg: TrainConfig,
    *,
    task: str,
    num_outputs: int,
    decoder: str = "linear",
    taps: list[int] | None = None,
    decoder_channels: int = 64,
    adaptation: str = "full",
    last_k: int = 0,
    label_fraction: float = 1.0,
    fraction_seed: int = 0,
    ignore_index: int = -1,
    val_data: Any = None,
    test_data: Any = None,
    callbacks: list[Any] | None = None,
    resume: str | Path | None = None,
    trust: bool = False,
    run_info: dict[str, Any] | None = None,
    source: str | None = None,
    ft_extra: dict[str, Any] | None = None,
) -> FinetuneResult:
    """Fine-tune an encoder for a task; writes ``pre.pt``, ``ft.pt`` and ``eval.json``.

    Args:
        pre: Checkpoint file of the starting encoder, or the encoder itself.
        train_data: ``(image, target)`` dataset.
        out_dir: Run directory.
        cfg: Loop settings.
        task: ``"classification"``, ``"regression"`` or ``"segmentation"``.
        num_outputs: Classes or regression targets.
        decoder: Segmentation decoder (``"linear"``, ``"upernet"``, ``"progressive"``).
        taps: Decoder taps (default: see :mod:`cka_geo.train.decoders`).
        decoder_channels: Decoder width.
        adaptation: ``"frozen"``, ``"full"`` or ``"last-k"``.
        last_k: Blocks trained under ``"last-k"``.
        label_fraction: Share of the training labels used (stratified, seeded).
        fraction_seed: Seed of the label-fraction draw.
        ignore_index: Mask value ignored by the segmentation loss and metrics.
        val_data: Evaluated after every epoch and at the end.
        test_data: Evaluated at the end.
        callbacks: Loop callbacks.
        resume: Training checkpoint to continue from (refused, before anything is written,
            when its run's settings or starting encoder differ: see
            :func:`~cka_geo.train.loop.check_resume`).
        trust: Allow pickle for reading ``pre`` (see :func:`~cka_geo.checkpoints.load_checkpoint`).
        run_info: More settings to store and to compare on resume (e.g. the data's stride).
        source: What ``pre.pt`` records as its origin (default: ``pre`` when it is a path).
        ft_extra: More entries for ``ft.pt`` (e.g. the data and input pipeline, for evaluate).
    """
    from cka_geo.checkpoints import save_checkpoint

    out = Path(out_dir)
    encoder = pre if isinstance(pre, VisionTransformer) else load_encoder(pre, trust=trust)
    if source is None:
        source = str(pre) if not isinstance(pre, VisionTransformer) else ""
    pre_sha256 = _state_digest(encoder)
    torch.manual_seed(cfg.seed)  # the head's initialisation
    model = TaskModel(encoder, task, num_outputs, decoder=decoder, taps=taps,
                      decoder_channels=decoder_channels, ignore_index=ignore_index)
    set_adaptation(model, adaptation, last_k)
    indices = list(range(len(train_data)))
    if label_fraction < 1:
        strata = label_strata(dataset_targets(train_data), task, ignore_index=ignore_index)
        indices = stratified_indices(strata, label_fraction, fraction_seed).tolist()
    data = train_data if len(indices) == len(train_data) else Subset(train_data, indices)
    # run_info (data, inputs) first: a resume with other --bands is refused naming --bands, not the encoder
    run_config = {"kind": "finetune", **(run_info or {}), "task": model.config(), "encoder": encoder.cfg.to_dict(),
                  "pre_sha256": pre_sha256, "label_fraction": label_fraction, "fraction_seed": fraction_seed,
                  "train_samples": len(indices)}
    if resume is not None:  # refuse a mismatch before pre.pt is written
        check_resume(load_train_checkpoint(resume), stored_config(cfg, run_config), resume)
    main = distributed.is_main()  # ddp: under torchrun rank 0 alone writes (every rank evaluates)
    pre_path = out / "pre.pt"
    if main:
        save_checkpoint(pre_path, encoder, encoder.cfg, extra={"kind": "pre", "source": source})
    val_fn = (lambda m: evaluate(m, val_data, cfg.batch_size)) if val_data is not None else None
    res = fit(model, data, cfg, out, val_fn=val_fn, callbacks=callbacks, resume=resume, run_config=run_config)
    result = FinetuneResult(pre_path, None, res, train_indices=indices)
    if not res.finished:
        return result
    for name, ds in (("val", val_data), ("test", test_data)):
        if ds is not None:
            result.metrics[name] = evaluate(model, ds, cfg.batch_size)
    result.ft_path = out / "ft.pt"
    if not main:
        return result
    tiles = getattr(train_data, "tile_size", None)  # the embedded tiles: evaluate needs their size
    save_checkpoint(result.ft_path, model.encoder, encoder.cfg, extra={
        "kind": "ft",
        **({"tiles": {"image_size": [int(tiles), int(tiles)]}} if isinstance(tiles, int) else {}),
        "task_head": {"config": model.config(), "state_dict": model.head_state()},
        "label_fraction": label_fraction,
        "train_samples": len(indices),
        "epochs": res.epochs_done,
        "metrics": result.metrics,
        **(ft_extra or {}),
    })
    write_text_atomic(out / "eval.json", json.dumps(
        {"task": model.config(), "label_fraction": label_fraction, "train_samples": len(indices),
         "metrics": result.metrics}, indent=1) + "\n")
    return result


def _state_digest(module: torch.nn.Module) -> str:
    """sha256 of a module's state (names, dtypes, shapes and bytes): which encoder a run started from."""
    import hashlib

    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def load_task_model(path: str | Path, trust: bool = False) -> TaskModel:
    """Rebuild the encoder and task head of an ``ft.pt`` written by :func:`finetune` (eval mode)."""
    from cka_geo.checkpoints import build_model, load_checkpoint

    loaded = load_checkpoint(path, trust=trust)
    head = loaded.extra.get("task_head")
    if not isinstance(head, dict) or "config" not in head or "state_dict" not in head:
        raise CheckpointError(f"{path}: no task head (not an ft.pt written by cka-geo finetune)")
    c = head["config"]
    model = TaskModel(cast(VisionTransformer, build_model(loaded)), c["task"], c["num_outputs"], decoder=c["decoder"] or "linear",
                      taps=c["taps"], decoder_channels=c["decoder_channels"], ignore_index=c["ignore_index"])
    model.run_extra = dict(loaded.extra)  # the data and inputs of the run, for evaluate --data
    sd = {k.removeprefix("head."): v for k, v in head["state_dict"].items()}
    try:
        model.head.load_state_dict(sd, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: task head does not fit its config ({' '.join(str(exc).split())[:160]})") from None
    return model.eval()


__all__ = ["FinetuneResult", "PretrainResult", "build_vit", "finetune", "load_encoder",
           "load_task_model", "pretrain"]
