"""CKA to a reference model, logged by Lightning (optional extra: ``pip install cka-geo[lightning]``).

:class:`CKACallback` runs a :class:`cka_geo.monitor.CKAMonitor` at the end of every
validation epoch (not during the sanity check) and logs ``cka/<sublayer>`` with the
LightningModule's ``log_dict``, so the values reach whatever logger the Trainer has. The
starting point is measured at ``on_train_start`` into the trajectory (Lightning logs
epoch-level values only from the hooks of an epoch, so it is logged with the first
validation epoch's values as ``cka_start/<sublayer>`` when ``log_start`` is set).

The measurement is isolated (no gradients, eval mode restored per module, RNG states
restored), so adding the callback does not change the training run.

Example:
    >>> import copy, torch
    >>> from cka_geo.models import VisionTransformer, ViTConfig
    >>> cfg = ViTConfig(img_size=16, patch_size=4, in_chans=3, embed_dim=32, depth=2, num_heads=2)
    >>> vit = VisionTransformer(cfg)
    >>> cb = CKACallback(copy.deepcopy(vit), torch.randn(16, 3, 16, 16),
    ...                  kinds=("fc1", "block"), batch_size=8, target="encoder")
    >>> cb.monitor.names
    ['blocks.0.mlp.fc1', 'blocks.0', 'blocks.1.mlp.fc1', 'blocks.1']
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn

from cka_geo.monitor import CKAMonitor, CKATrajectory


class CKACallback(pl.Callback):
    """Logs same-sublayer CKA against a reference at each validation epoch end.

    Args:
        reference: Reference encoder or checkpoint path (see :class:`CKAMonitor`).
        probes: Fixed probe images (N, C, H, W) or (N, T, C, H, W).
        sublayers: Canonical sublayer names (None: by ``kinds``/``blocks``, see
            :class:`CKAMonitor`).
        target: Attribute path or callable selecting the compared module of the
            LightningModule (default: its ``encoder`` attribute, else the module itself).
        log_start: Log the starting point's values (``cka_start/...``) with the first
            validation epoch.
        **monitor_kwargs: More :class:`CKAMonitor` arguments (``kinds``, ``blocks``,
            ``batch_size``, ``kernel``, ``estimator``, ``pooling``, ``prefix`` ...).

    Attributes:
        monitor: The :class:`CKAMonitor` (its ``trajectory`` holds every measurement).
    """

    def __init__(
        self,
        reference: nn.Module | str | os.PathLike[str],
        probes: torch.Tensor,
        sublayers: Sequence[str] | None = None,
        *,
        target: str | Callable[[nn.Module], nn.Module] | None = None,
        log_start: bool = False,
        **monitor_kwargs: Any,
    ) -> None:
        super().__init__()
        monitor_kwargs.setdefault("period", 0)
        monitor_kwargs.setdefault("at_end", False)
        self.monitor = CKAMonitor(reference, probes, sublayers, target=target, **monitor_kwargs)
        self.log_start = log_start
        self._start: dict[str, float] | None = None

    @property
    def trajectory(self) -> CKATrajectory:
        """Every measurement so far."""
        return self.monitor.trajectory

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Measure the starting point (kept in the trajectory)."""
        if not self.monitor.measured(trainer.global_step):
            values = self.monitor.measure(pl_module, trainer.global_step, trainer.current_epoch)
            self._start = values if self.log_start else None

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Measure and log with ``pl_module.log_dict``."""
        if trainer.sanity_checking:
            return
        values = self.monitor.measure(pl_module, trainer.global_step, trainer.current_epoch)
        if self._start is not None:
            start_prefix = "cka_start/"
            values = {**values, **{start_prefix + k[len(self.monitor.prefix):]: v for k, v in self._start.items()}}
            self._start = None
        pl_module.log_dict(values, on_step=False, on_epoch=True, prog_bar=False, logger=True)


__all__ = ["CKACallback"]
