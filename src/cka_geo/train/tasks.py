"""Downstream tasks: heads, losses, adaptation modes, label fractions, evaluation.

A :class:`TaskModel` is an encoder (``self.encoder``, timm keys) plus a head
(``self.head``): a linear layer on the pooled features for classification and regression,
a segmentation decoder (:mod:`cka_geo.train.decoders`) for segmentation. Keys of the head
start with ``head.`` in :meth:`TaskModel.state_dict`; :meth:`TaskModel.head_state` gives
them without the encoder.

Losses: cross-entropy (classification), mean squared error (regression), per-pixel
cross-entropy with ``ignore_index`` (segmentation), binary cross-entropy on one logit per
class (multilabel).

Adaptation (:func:`set_adaptation`): ``"frozen"`` (encoder untouched, only the head
trains; its weights stay bit-identical), ``"full"`` (everything trains), ``"last-k"`` (the
last k blocks train; patch embedding, position embedding, class token, earlier blocks and
the final norm stay frozen).

Label fractions (:func:`stratified_indices`): per stratum c with n_c samples, keep
max(1, ⌊f·n_c + ½⌋) drawn without replacement by ``numpy.random.default_rng(seed)``, so
each stratum keeps its share within rounding and the same seed gives the same subset.
Strata (:func:`label_strata`): the class (classification), the rarest class present in the
mask (segmentation: tiles with rare classes such as water are kept in proportion), or the
quantile bin of the target (regression).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cka_geo.errors import DataError, UsageError
from cka_geo.models.vit import VisionTransformer
from cka_geo.train.decoders import build_decoder
from cka_geo.train.metrics import ConfusionMeter, MultiLabelMeter, RegressionMeter

TASKS = ("classification", "regression", "segmentation", "multilabel")
ADAPTATIONS = ("frozen", "full", "last-k")


class TaskModel(nn.Module):
    """Encoder plus task head.

    Args:
        encoder: The ViT.
        task: ``"classification"``, ``"regression"`` or ``"segmentation"``.
        num_outputs: Classes (classification, segmentation) or targets (regression).
        decoder: Segmentation decoder name (``"linear"``, ``"upernet"``, ``"progressive"``).
        taps: Decoder taps (see :func:`~cka_geo.train.decoders.build_decoder`).
        decoder_channels: Decoder width.
        ignore_index: Mask value excluded from the segmentation loss and metrics.
    """

    def __init__(
        self, encoder: VisionTransformer, task: str, num_outputs: int, decoder: str = "linear",
        taps: Sequence[int] | None = None, decoder_channels: int = 64, ignore_index: int = -1,
    ) -> None:
        super().__init__()
        if task not in TASKS:
            raise UsageError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
        if num_outputs < 1:
            raise UsageError(f"num_outputs must be positive, got {num_outputs}")
        self.encoder, self.task, self.num_outputs, self.ignore_index = encoder, task, num_outputs, ignore_index
        self.decoder_name = decoder if task == "segmentation" else None
        self.taps = list(taps) if taps is not None else None
        self.decoder_channels = decoder_channels
        self.head: nn.Module
        if task == "segmentation":
            self.head = build_decoder(decoder, encoder.cfg, num_outputs, taps=taps, channels=decoder_channels)
        else:
            self.head = nn.Linear(encoder.cfg.embed_dim, num_outputs)
            nn.init.trunc_normal_(self.head.weight, std=0.02)
            nn.init.zeros_(self.head.bias)
        self.adaptation = "full"
        self.last_k = 0
        self.run_extra: dict[str, Any] = {}  # what the ft.pt it was read from stores beside it

    def config(self) -> dict[str, Any]:
        """What rebuilds this head (JSON-serialisable)."""
        return {
            "task": self.task,
            "num_outputs": self.num_outputs,
            "decoder": self.decoder_name,
            "taps": self.taps,
            "decoder_channels": self.decoder_channels,
            "ignore_index": self.ignore_index,
            "adaptation": self.adaptation,
            "last_k": self.last_k,
        }

    def head_state(self) -> dict[str, torch.Tensor]:
        """The head's weights, keys prefixed ``head.``."""
        return {f"head.{k}": v for k, v in self.head.state_dict().items()}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (B, classes), predictions (B, targets) or logits (B, classes, H, W)."""
        if self.task == "segmentation":
            return self.head(self.encoder, x)
        feats = self.encoder.forward_head(self.encoder.forward_features(x), pre_logits=True)
        return self.head(feats)

    def loss(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The task's loss for outputs ``out`` and targets ``y``."""
        if self.task == "regression":
            return F.mse_loss(out, y.to(out.dtype).reshape(out.shape))
        if self.task == "multilabel":
            return F.binary_cross_entropy_with_logits(out, y.to(out.dtype).reshape(out.shape))
        if self.task == "segmentation" and y.ndim == 4:
            y = y[:, 0]
        return F.cross_entropy(out, y.long(), ignore_index=self.ignore_index)

    def training_step(self, batch: Any, generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict[str, float]]:
        """Loss on one ``(images, targets)`` batch (``generator`` unused: no randomness)."""
        x, y = batch[0], batch[1]
        loss = self.loss(self(x), y)
        return loss, {"loss": float(loss.detach())}

    def train(self, mode: bool = True) -> TaskModel:
        """As ``nn.Module.train``, but a frozen encoder stays in eval mode."""
        super().train(mode)
        if self.adaptation == "frozen":
            self.encoder.eval()
        return self


def set_adaptation(model: TaskModel, mode: str, last_k: int = 0) -> list[str]:
    """Choose which encoder parameters train; the head always trains.

    Args:
        model: The task model (changed in place).
        mode: ``"frozen"``, ``"full"`` or ``"last-k"``.
        last_k: Number of final blocks that train under ``"last-k"``.

    Returns:
        Names of the trainable encoder parameters.
    """
    if mode not in ADAPTATIONS:
        raise UsageError(f"unknown adaptation {mode!r}; choose one of {', '.join(ADAPTATIONS)}")
    enc = model.encoder
    depth = len(enc.blocks)
    if mode == "last-k" and not 1 <= last_k <= depth:
        raise UsageError(f"--last-k must be in [1, {depth}] for a {depth}-block encoder, got {last_k}")
    enc.requires_grad_(mode == "full")
    if mode == "last-k":
        for blk in enc.blocks[depth - last_k :]:
            blk.requires_grad_(True)
    model.head.requires_grad_(True)
    model.adaptation = mode
    model.last_k = last_k if mode == "last-k" else 0
    model.train(model.training)
    return [n for n, p in enc.named_parameters() if p.requires_grad]


def dataset_targets(dataset: Any) -> torch.Tensor:
    """All targets of a dataset: ``.targets``/``.labels`` if present, ``TensorDataset``'s second
    tensor, else item by item."""
    from torch.utils.data import Subset

    if isinstance(dataset, Subset):
        inner = getattr(dataset.dataset, "targets", None)
        if isinstance(inner, torch.Tensor):
            return inner[torch.as_tensor(list(dataset.indices), dtype=torch.long)]
    for attr in ("targets", "labels"):
        t = getattr(dataset, attr, None)
        if t is not None and not callable(t):
            return torch.as_tensor(np.asarray(t))
    tensors = getattr(dataset, "tensors", None)
    if tensors is not None and len(tensors) > 1:
        return tensors[1]
    if len(dataset) == 0:
        raise DataError("the dataset is empty")
    return torch.stack([torch.as_tensor(dataset[i][1]) for i in range(len(dataset))])


def label_strata(targets: torch.Tensor | np.ndarray, task: str, ignore_index: int = -1, bins: int = 5) -> np.ndarray:
    """One stratum (int) per sample for :func:`stratified_indices` (see the module docstring)."""
    t = np.asarray(targets)
    if task == "classification":
        return t.reshape(len(t)).astype(np.int64)
    if task == "multilabel":  # the rarest label a sample has (-1: none), as segmentation's rarest class
        pos = t.reshape(len(t), -1) > 0.5
        by_count = np.argsort(pos.sum(axis=0), kind="stable")  # rarest first
        ml = np.full(len(t), -1, dtype=np.int64)
        for c in by_count[::-1]:  # rarer labels overwrite
            ml[pos[:, c]] = c
        return ml
    if task == "regression":
        v = t.reshape(len(t), -1).mean(axis=1).astype(np.float64)
        edges = np.quantile(v, np.linspace(0, 1, bins + 1)[1:-1])
        return np.searchsorted(edges, v, side="right").astype(np.int64)
    if task == "segmentation":
        flat = t.reshape(len(t), -1).astype(np.int64)
        valid = flat != ignore_index
        classes = np.unique(flat[valid])
        if not classes.size:
            return np.zeros(len(t), dtype=np.int64)
        counts = {int(c): int((flat == c).sum()) for c in classes}
        order = sorted(counts, key=lambda c: (counts[c], c))  # rarest first
        strata = np.full(len(t), -1, dtype=np.int64)
        for c in reversed(order):  # rarer classes overwrite
            strata[(flat == c).any(axis=1)] = c
        return strata
    raise UsageError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")


def stratified_indices(strata: np.ndarray | Sequence[int], fraction: float, seed: int) -> np.ndarray:
    """A seeded, stratified subset of sample indices.

    Args:
        strata: One stratum label per sample.
        fraction: Share of each stratum to keep, in (0, 1].
        seed: Seed of the draw.

    Returns:
        Sorted int64 indices; stratum c contributes max(1, ⌊fraction · n_c + ½⌋) of them.
    """
    if not 0 < fraction <= 1 or math.isnan(fraction):
        raise UsageError(f"--label-fraction must be in (0, 1], got {fraction}")
    s = np.asarray(strata).reshape(-1)
    if fraction == 1:
        return np.arange(len(s), dtype=np.int64)
    rng = np.random.default_rng(seed)
    keep = []
    for c in np.unique(s):
        idx = np.flatnonzero(s == c)
        k = max(1, math.floor(fraction * len(idx) + 0.5))
        keep.append(rng.permutation(idx)[:k])
    return np.sort(np.concatenate(keep)).astype(np.int64)


@torch.no_grad()
def evaluate(model: TaskModel, dataset: Any, batch_size: int = 32) -> dict[str, float]:
    """Metrics of ``model`` on ``dataset`` (in eval mode; the mode is restored).

    Returns:
        ``loss`` plus accuracy/macro_f1 (classification), accuracy/macro_f1/miou
        (segmentation, ``ignore_index`` dropped), rmse/r2 (regression) or
        f1_micro/f1_macro/map (multilabel).
    """
    from torch.utils.data import DataLoader

    was_training = model.training
    model.eval()
    meter: ConfusionMeter | RegressionMeter | MultiLabelMeter
    if model.task in ("regression", "multilabel"):
        meter = RegressionMeter() if model.task == "regression" else MultiLabelMeter()
    else:
        meter = ConfusionMeter(model.num_outputs, model.ignore_index if model.task == "segmentation" else None)
    total, n = 0.0, 0
    try:
        device = next(model.parameters()).device
        for x, y, *_ in DataLoader(dataset, batch_size=batch_size, shuffle=False):
            x, y = x.to(device), y.to(device)
            out = model(x)
            total += float(model.loss(out, y)) * x.shape[0]
            n += x.shape[0]
            if model.task in ("regression", "multilabel"):
                meter.update(out, y)
            else:
                yy = y[:, 0] if (model.task == "segmentation" and y.ndim == 4) else y
                meter.update(out.argmax(dim=1), yy)
    finally:
        model.train(was_training)
    if n == 0:
        raise DataError("the evaluation dataset is empty")
    return {"loss": total / n, **meter.compute()}


__all__ = [
    "ADAPTATIONS",
    "TASKS",
    "TaskModel",
    "dataset_targets",
    "evaluate",
    "label_strata",
    "set_adaptation",
    "stratified_indices",
]
