"""Training and evaluation loops that make the checkpoints cka-geo compares.

Modules: :mod:`~cka_geo.train.loop` (the one loop: checkpoints, resume, metrics files),
:mod:`~cka_geo.train.callbacks` (the hook protocol), :mod:`~cka_geo.train.objectives`
(MAE, SimCLR), :mod:`~cka_geo.train.decoders` (linear, UPerNet-style, progressive),
:mod:`~cka_geo.train.tasks` (heads, losses, adaptation, label fractions, evaluation),
:mod:`~cka_geo.train.metrics` (accuracy, macro-F1, mIoU, RMSE, R²) and
:mod:`~cka_geo.train.runs` (pretrain / fine-tune end to end, as the CLI runs them).
Nothing here is imported by ``import cka_geo``.
"""

from __future__ import annotations

from cka_geo.train.callbacks import BaseCallback, Callback, TrainContext
from cka_geo.train.loop import TrainConfig, TrainResult, fit, seed_everything

__all__ = ["BaseCallback", "Callback", "TrainConfig", "TrainContext", "TrainResult", "fit", "seed_everything"]
