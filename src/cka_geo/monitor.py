"""CKA as a metric inside training: how far has each sublayer moved from the reference?

:class:`CKAMonitor` follows the callback protocol of :mod:`cka_geo.train.callbacks` (the
project's own loop), and is what the Lightning callback
(:mod:`cka_geo.integrations.lightning`) and a Hugging Face ``TrainerCallback`` call too. Every
``period`` optimizer steps (and at train start) it runs a fixed probe set through the model
being trained, computes the minibatch CKA of each chosen sublayer against the same sublayer
of a reference model (the pretrained starting point), logs ``cka/<sublayer>`` through the
run's log sink and appends a row to its :class:`CKATrajectory`.

The reference never changes, so its grams are computed once (at construction) and kept: each
measurement costs one forward pass of the training model over the probes plus its grams.
Memory for the cache is ``batches × sublayers × batch_size²`` floats, independent of the
features' width.

Observing changes nothing: :meth:`CKAMonitor.measure` runs without gradients, puts the
model in eval mode and restores every module's train/eval flag afterwards (so BatchNorm
running statistics are not updated and dropout draws nothing), and saves and restores the
torch (CPU and initialised CUDA devices), numpy and python RNG states around its work. A
run with the monitor therefore ends with the same weights as one without it, also in loops
that do not isolate their callbacks themselves.

Example:
    >>> import copy, torch
    >>> from cka_geo.models.vit import ViTConfig, VisionTransformer
    >>> model = VisionTransformer(ViTConfig(img_size=16, patch_size=4, in_chans=3,
    ...                                     embed_dim=32, depth=2, num_heads=2))
    >>> mon = CKAMonitor(copy.deepcopy(model), torch.randn(16, 3, 16, 16),
    ...                  kinds=("fc1",), period=10, batch_size=8)
    >>> {k: round(v, 6) for k, v in mon.measure(model, step=0).items()}
    {'cka/blocks.0.mlp.fc1': 1.0, 'cka/blocks.1.mlp.fc1': 1.0}
    >>> mon.trajectory.steps, mon.trajectory.values.shape
    ([0], (1, 2))
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from cka_geo.accumulator import BatchGrams, MinibatchCKA
from cka_geo.errors import CkaGeoError, DataError, UsageError
from cka_geo.features import capture, forward_batch, resolve_sublayers
from cka_geo.functional import DEFAULT_RBF_FRAC, Estimator, Kernel, check_kernel, min_samples
from cka_geo.isolation import observing

if TYPE_CHECKING:
    from cka_geo.train.callbacks import TrainContext


@dataclass
class CKATrajectory:
    """Same-sublayer CKA against the reference over training.

    Attributes:
        names: Sublayer names (columns).
        steps: Optimizer step of each measurement (rows), in the order taken.
        values: (len(steps), len(names)) float64 CKA.
        epochs: Epoch of each measurement, or None where unknown.
    """

    names: list[str]
    steps: list[int] = field(default_factory=list)
    values: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))
    epochs: list[int | None] = field(default_factory=list)

    def append(self, step: int, row: Sequence[float], epoch: int | None = None) -> None:
        """Add one measurement (``row`` ordered as :attr:`names`)."""
        arr = np.asarray(row, dtype=np.float64).reshape(1, len(self.names))
        self.values = arr if self.values.size == 0 else np.concatenate([self.values, arr])
        self.steps.append(int(step))
        self.epochs.append(None if epoch is None else int(epoch))

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form: ``{"names", "steps", "epochs", "values"}``."""
        return {"names": list(self.names), "steps": list(self.steps), "epochs": list(self.epochs),
                "values": self.values.tolist()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CKATrajectory:
        """Inverse of :meth:`to_dict`."""
        values = np.asarray(d["values"], dtype=np.float64).reshape(len(d["steps"]), len(d["names"]))
        return cls(list(d["names"]), [int(s) for s in d["steps"]], values,
                   list(d.get("epochs") or [None] * len(d["steps"])))


def _module_of(model: nn.Module, target: str | Callable[[nn.Module], nn.Module] | None) -> nn.Module:
    """The module to compare: ``target`` (attribute path or callable) of ``model``.

    Default: ``model.encoder`` when the model has one (the project's task models, MAE,
    SimCLR), else ``model`` itself.
    """
    if target is None:
        enc = getattr(model, "encoder", None)
        return enc if isinstance(enc, nn.Module) else model
    if callable(target):
        return target(model)
    try:
        return model.get_submodule(target)
    except AttributeError:
        raise UsageError(f"{type(model).__name__} has no submodule {target!r} (CKAMonitor target)") from None


def _device_of(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


class CKAMonitor:
    """Logs same-sublayer CKA of the model being trained against a fixed reference.

    Implements the callback protocol of :mod:`cka_geo.train.callbacks`
    (``on_train_start``, ``on_step_end``, ``on_epoch_end``, ``on_train_end``); use
    :meth:`measure` from any other loop.

    Args:
        reference: The reference encoder, or a checkpoint file (loaded with
            :func:`cka_geo.checkpoints.load_checkpoint` and ``build_model``). Its grams
            over the probes are computed here, once, and the module is not kept: passing
            the very model about to be trained makes its current state the reference.
        probes: Fixed probe images (N, C, H, W) or series (N, T, C, H, W), e.g. from
            :func:`cka_geo.data.probe_images`. The same images, in the same batches, at
            every measurement.
        sublayers: Canonical sublayer names; None selects by ``kinds`` / ``blocks`` (see
            :func:`cka_geo.features.resolve_sublayers`; default attn, fc1, fc2, block of
            every block). Resolved on the reference.
        kinds: Sublayer kinds, when ``sublayers`` is None.
        blocks: Block indices, when ``sublayers`` is None.
        period: Measure every this many optimizer steps (also at train start and, with
            ``at_end``, after the last step). 0 disables the periodic measurement.
        batch_size: Probe images per minibatch. A last batch smaller than the estimator
            needs (4 unbiased, 2 biased) is dropped with a warning.
        kernel: ``"linear"`` or ``"rbf"``.
        estimator: ``"unbiased"`` or ``"biased"``.
        rbf_frac: RBF bandwidth fraction.
        pooling: Token pooling (``mean``, ``cls``, ``flatten``, ``tokens``).
        time_mode: For (N, T, C, H, W) probes: ``frames`` or ``mean``.
        target: Which module of the trained model to compare: an attribute path
            (``"encoder"``, ``"model.backbone"``) or a callable ``model -> module``. Default:
            ``model.encoder`` if it exists, else the model.
        every_epoch: Also measure at each epoch end.
        at_end: Measure after the last step, if that step was not measured yet.
        prefix: Prefix of the logged names.
        trust: Passed to ``load_checkpoint`` for a reference given as a path.

    Attributes:
        names: The sublayers compared.
        trajectory: Every measurement so far (:class:`CKATrajectory`).
        last_result: The :class:`~cka_geo.accumulator.CKAResult` of the last measurement
            (rows: reference, columns: trained model).
    """

    def __init__(
        self,
        reference: nn.Module | str | os.PathLike[str],
        probes: torch.Tensor,
        sublayers: Sequence[str] | None = None,
        *,
        kinds: Sequence[str] | None = None,
        blocks: Sequence[int] | None = None,
        period: int = 100,
        batch_size: int = 64,
        kernel: Kernel = "linear",
        estimator: Estimator = "unbiased",
        rbf_frac: float = DEFAULT_RBF_FRAC,
        pooling: str = "mean",
        time_mode: str = "frames",
        target: str | Callable[[nn.Module], nn.Module] | None = None,
        every_epoch: bool = False,
        at_end: bool = True,
        prefix: str = "cka/",
        trust: bool = False,
    ) -> None:
        check_kernel(kernel, estimator)
        if isinstance(period, bool) or not isinstance(period, int) or period < 0:
            raise UsageError(f"period must be a non-negative number of steps, got {period!r}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < min_samples(estimator):
            raise UsageError(
                f"batch_size must be an integer >= {min_samples(estimator)} for the {estimator} estimator, got {batch_size!r}"
            )
        if not isinstance(probes, torch.Tensor) or probes.ndim not in (4, 5) or not probes.is_floating_point():
            desc = f"shape {tuple(probes.shape)} {probes.dtype}" if isinstance(probes, torch.Tensor) else type(probes).__name__
            raise DataError(f"probes must be a float tensor (N, C, H, W) or (N, T, C, H, W), got {desc}")
        if probes.shape[0] < min_samples(estimator):
            raise DataError(f"{probes.shape[0]} probe images; the {estimator} estimator needs at least {min_samples(estimator)}")
        if isinstance(reference, (str, os.PathLike)):
            from cka_geo.checkpoints import build_model, load_checkpoint

            reference = build_model(load_checkpoint(Path(reference), trust=trust))
        if not isinstance(reference, nn.Module):
            raise UsageError(f"reference must be an nn.Module or a checkpoint path, got {type(reference).__name__}")
        self.names = resolve_sublayers(reference, sublayers, kinds=kinds, blocks=blocks)
        self.probes = probes.detach()
        self.period = period
        self.batch_size = batch_size
        self.pooling = pooling
        self.time_mode = time_mode
        self.target = target
        self.every_epoch = every_epoch
        self.at_end = at_end
        self.prefix = prefix
        self._engine = MinibatchCKA(kernel=kernel, estimator=estimator, rbf_frac=rbf_frac, keep_batches=False)
        self._probe_batches = self._split_probes()
        # The reference's grams, once: the reference is not used (nor kept) after this.
        with observing(reference):
            self._ref_grams: list[BatchGrams] = list(self._grams_of(reference, keep=True))
        self.trajectory = CKATrajectory(list(self.names))
        self.last_result: Any = None

    # -- measurement -----------------------------------------------------------------------

    def _split_probes(self) -> list[torch.Tensor]:
        n, b, m = self.probes.shape[0], self.batch_size, min_samples(self._engine.estimator)
        out = [self.probes[i : i + b] for i in range(0, n, b)]
        if out[-1].shape[0] < m:
            warnings.warn(
                f"CKAMonitor: dropping the last {out[-1].shape[0]} of {n} probe images (a batch needs "
                f"at least {m}); choose a batch_size that divides {n}",
                RuntimeWarning,
                stacklevel=3,
            )
            out = out[:-1]
        return out

    def _grams_of(self, model: nn.Module, keep: bool) -> Generator[BatchGrams, None, None]:
        with capture(model, self.names, pooling=self.pooling) as cap:
            for x in self._probe_batches:
                feats = forward_batch(model, x, cap, time_mode=self.time_mode).features
                yield self._engine.prepare(feats, "A" if keep else "B", keep=keep)

    def _reference_grams(self, device: torch.device) -> list[BatchGrams]:
        self._ref_grams = [g.to(device) for g in self._ref_grams]
        return self._ref_grams

    def compute(self, model: nn.Module) -> dict[str, float]:
        """Same-sublayer CKA of ``model`` (its ``target`` module) against the reference.

        Does not record anything; see :meth:`measure`. Runs isolated (see
        :func:`observing`).

        Returns:
            ``{sublayer: CKA}`` in :attr:`names` order.
        """
        module = _module_of(model, self.target)
        with observing(module):
            ref = self._reference_grams(_device_of(module))
            self._engine.reset()
            with contextlib.closing(self._grams_of(module, keep=False)) as grams:  # hooks go on error too
                for ga, gb in zip(ref, grams, strict=True):
                    self._engine.update_grams(ga, gb)
            res = self._engine.compute()
        self.last_result = res
        return {n: float(res.matrix[i, i]) for i, n in enumerate(self.names)}

    def measure(
        self,
        model: nn.Module,
        step: int,
        epoch: int | None = None,
        log: Callable[[dict[str, float]], Any] | None = None,
    ) -> dict[str, float]:
        """Compute, append to the trajectory and log ``{prefix + sublayer: CKA}``.

        Args:
            model: The model being trained (or the module to compare; see ``target``).
            step: Optimizer steps done.
            epoch: Epoch, if known.
            log: Where to send the values (e.g. ``ctx.log``, a Lightning ``log_dict``).

        Returns:
            The logged values.
        """
        values = self.compute(model)
        self.trajectory.append(step, [values[n] for n in self.names], epoch)
        logged = {f"{self.prefix}{n}": v for n, v in values.items()}
        if log is not None:
            log(logged)
        return logged

    # -- the training loop's callback protocol ---------------------------------------------

    def measured(self, step: int) -> bool:
        """Whether the last measurement was taken at ``step``."""
        return bool(self.trajectory.steps) and self.trajectory.steps[-1] == step

    def on_train_start(self, ctx: TrainContext) -> None:
        """Measure the starting point (step 0 of a fresh run)."""
        if not self.measured(ctx.step):
            self.measure(ctx.model, ctx.step, ctx.epoch, ctx.log)

    def on_step_end(self, ctx: TrainContext) -> None:
        """Measure every ``period`` steps."""
        if self.period and ctx.step % self.period == 0 and not self.measured(ctx.step):
            self.measure(ctx.model, ctx.step, ctx.epoch, ctx.log)

    def on_epoch_end(self, ctx: TrainContext) -> None:
        """Measure if ``every_epoch``."""
        if self.every_epoch and not self.measured(ctx.step):
            self.measure(ctx.model, ctx.step, ctx.epoch, ctx.log)

    def on_train_end(self, ctx: TrainContext) -> None:
        """Measure the final model if ``at_end`` and its step was not measured."""
        if self.at_end and not self.measured(ctx.step):
            self.measure(ctx.model, ctx.step, ctx.epoch, ctx.log)


def plot_trajectory(
    trajectory: CKATrajectory,
    path: str | os.PathLike[str],
    *,
    title: str | None = None,
    vmin: float | None = None,
    vmax: float = 1.0,
) -> Path:
    """Heatmap of a trajectory: sublayers (rows) × measurement steps (columns), colour = CKA.

    matplotlib is imported here only, and drawn with its Agg canvas without pyplot (no
    global backend state). NaN cells (a constant sublayer) are grey. The file is written
    atomically; its format follows the suffix (``.png``, ``.pdf``, ``.svg``).

    Args:
        trajectory: From :attr:`CKAMonitor.trajectory`.
        path: Output file.
        title: Figure title.
        vmin: Bottom of the colour scale (default: the smallest finite value, at most 0.9).
        vmax: Top of the colour scale.

    Returns:
        The path written.
    """
    if not trajectory.steps:
        raise UsageError("plot_trajectory: the trajectory has no measurements yet")
    try:
        import matplotlib
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:  # pragma: no cover - the plot extra is missing
        raise CkaGeoError("plot_trajectory needs matplotlib: pip install 'cka-geo[plot]'") from None

    values = trajectory.values.T  # (sublayers, steps)
    finite = values[np.isfinite(values)]
    lo = vmin if vmin is not None else min(0.9, float(finite.min()) if finite.size else 0.0)
    n_names, n_steps = values.shape
    # Agg figure without pyplot: no global backend state, nothing left open.
    fig = Figure(figsize=(min(16, 3.0 + 0.35 * n_steps), min(20, 1.4 + 0.28 * n_names)), dpi=120,
                 layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad=(0.85, 0.85, 0.85, 1.0))
    im = ax.imshow(np.ma.masked_invalid(values), aspect="auto", interpolation="nearest", cmap=cmap,
                   vmin=lo, vmax=vmax)
    ax.set_yticks(range(n_names), trajectory.names, fontsize=7)
    ticks = np.unique(np.linspace(0, n_steps - 1, min(n_steps, 12)).round().astype(int))
    ax.set_xticks(ticks, [str(trajectory.steps[i]) for i in ticks], fontsize=7)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("sublayer")
    ax.set_title(title or "CKA to the reference during training", fontsize=10)
    fig.colorbar(im, ax=ax, label="CKA")
    from cka_geo.plotting.save import save_figure

    return save_figure(fig, path)


__all__ = ["CKAMonitor", "CKATrajectory", "observing", "plot_trajectory"]
