"""The callback protocol of the training loop.

The loop (:func:`cka_geo.train.loop.fit`) calls, in this order::

    on_train_start(ctx)
    for each epoch:
        for each step:  ... optimizer step ...;  on_step_end(ctx)
        ... validation ...;  on_epoch_end(ctx)
        ... metrics and checkpoint written ...
    on_train_end(ctx)

``ctx`` is a :class:`TrainContext`: ``ctx.step`` (optimizer steps done), ``ctx.epoch``
(0-based epoch in progress, or just finished at ``on_epoch_end``), ``ctx.model`` (the module
being trained), ``ctx.encoder`` (its ViT, when it has one), ``ctx.loss`` (the last step's
loss), ``ctx.logs`` (the last values the loop logged) and ``ctx.log(dict)``, a sink whose
values go into the run's metrics files (``metrics.csv`` / ``metrics.json``) stamped with the
step and epoch.

Observing is free: the loop calls every hook under ``torch.no_grad()``, restores the model's
train/eval mode afterwards, and saves and restores the torch, numpy and python RNG states
around the hooks; the loop's own randomness (masking, augmentation, data order) comes from
generators the hooks cannot reach. A callback that only reads the model therefore leaves the
run's weights bit-identical to a run without it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from torch import nn


@dataclass
class TrainContext:
    """What a callback sees.

    Attributes:
        model: The module being trained (objective or task model).
        encoder: Its :class:`~cka_geo.models.vit.VisionTransformer`, or None.
        step: Optimizer steps done so far (global, across resumes).
        epoch: Current epoch, 0-based.
        epochs: Total epochs of the run.
        loss: Loss of the last step (float), or None before the first.
        logs: The last values the loop logged for this step or epoch.
        out_dir: The run directory, or None.
        sink: Where :meth:`log` sends its records (set by the loop).
    """

    model: nn.Module
    encoder: nn.Module | None = None
    step: int = 0
    epoch: int = 0
    epochs: int = 0
    loss: float | None = None
    logs: dict[str, float] = field(default_factory=dict)
    out_dir: Any = None
    sink: Callable[[dict[str, Any]], None] | None = None

    def log(self, values: dict[str, Any]) -> None:
        """Record ``values`` (name -> number) in the run's metrics, at this step and epoch."""
        if self.sink is not None:
            self.sink(dict(values))


@runtime_checkable
class Callback(Protocol):
    """Anything with these four methods (each may do nothing)."""

    def on_train_start(self, ctx: TrainContext) -> None: ...

    def on_step_end(self, ctx: TrainContext) -> None: ...

    def on_epoch_end(self, ctx: TrainContext) -> None: ...

    def on_train_end(self, ctx: TrainContext) -> None: ...


class BaseCallback:
    """A :class:`Callback` whose hooks do nothing; subclass and override what you need."""

    def on_train_start(self, ctx: TrainContext) -> None:
        """Called once, before the first step (also on resume)."""

    def on_step_end(self, ctx: TrainContext) -> None:
        """Called after each optimizer step."""

    def on_epoch_end(self, ctx: TrainContext) -> None:
        """Called after each epoch's validation, before its checkpoint is written."""

    def on_train_end(self, ctx: TrainContext) -> None:
        """Called once, after the last epoch."""


def as_callbacks(callbacks: Iterable[Any] | None) -> list[Any]:
    """Check that each object has the four hooks; returns them as a list."""
    from cka_geo.errors import UsageError

    out = list(callbacks or [])
    for cb in out:
        for hook in ("on_train_start", "on_step_end", "on_epoch_end", "on_train_end"):
            if not callable(getattr(cb, hook, None)):
                raise UsageError(f"callback {type(cb).__name__} has no method {hook}")
    return out


__all__ = ["BaseCallback", "Callback", "TrainContext", "as_callbacks"]
