"""Forward hooks on canonical sublayers: capture() and forward_batch()."""

from __future__ import annotations

import threading
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, NamedTuple

import torch
from torch import nn

from cka_geo.errors import DataError, FeatureError, UsageError
from cka_geo.features.pool import _as_tokens, pool_tokens, pooled_shape
from cka_geo.features.select import resolve_sublayers, sublayer_map
from cka_geo.sublayers import (
    POOLINGS,
    TIME_MODES,
    did_you_mean,
)

# While a Capture hook runs an ``apply`` callable, every Capture hook in this thread stands
# aside: the callable may be the model's own module (whose submodules are hooked too), or a
# module of another model captured at the same time.
_APPLYING = threading.local()


def _applying() -> bool:
    return getattr(_APPLYING, "depth", 0) > 0


class _Slots:
    """Per-width buffers of one forward pass, so that features need no stacking copy.

    The layers of one feature width are pooled straight into consecutive slices of one
    (count, rows, width) float32 buffer, in the capture's name order, which is the layout the
    CKA engine reads without a copy (:func:`cka_geo.functional.batched.as_stack`). The
    widths are learned from the previous pass (the first pass pools into separate tensors);
    a layer whose shape differs from what was learned gets a tensor of its own. Each pass
    gets new buffers, so features handed out are never overwritten.
    """

    def __init__(self, names: list[str]) -> None:
        self.names = names
        self.groups: dict[str, tuple[int, int, int]] = {}  # name -> (index, count, width)
        self.buffers: dict[tuple[Any, ...], torch.Tensor] = {}

    def slot(self, name: str, shape: tuple[int, int], device: torch.device) -> torch.Tensor | None:
        """The slice ``name`` pools into in this pass, or None (a tensor of its own)."""
        group = self.groups.get(name)
        if group is None or group[2] != shape[1] or shape[0] == 0:
            return None
        index, count, width = group
        key = (width, shape[0], device)
        buf = self.buffers.get(key)
        if buf is None:
            buf = self.buffers[key] = torch.empty((count, shape[0], width), dtype=torch.float32, device=device)
        return buf[index]

    def learn(self, feats: Mapping[str, torch.Tensor]) -> None:
        """Take the widths of this pass's features for the next pass; forget this pass's buffers."""
        self.buffers = {}
        members: dict[int, list[str]] = {}
        for name in self.names:
            f = feats.get(name)
            if f is not None and f.ndim == 2:
                members.setdefault(int(f.shape[1]), []).append(name)
        self.groups = {n: (i, len(group), w) for w, group in members.items() for i, n in enumerate(group)}


class Capture:
    """Pooled sublayer features of the current forward pass; made by :func:`capture`.

    Attributes:
        names: Canonical names, in the caller's order (the order of every returned dict).
        module_paths: Canonical name -> hooked module path.
        pooling: Token pooling mode.
        num_prefix_tokens: Prefix tokens skipped by ``mean`` and ``tokens``.
        batch_first: Whether sublayer outputs are (B, T, D) (else (T, B, D)).
        applied_names: Names with an ``apply`` callable, in ``names`` order.
    """

    def __init__(
        self,
        names: list[str],
        module_paths: dict[str, str],
        pooling: str,
        num_prefix_tokens: int,
        batch_first: bool,
        apply: dict[str, Callable[..., Any]],
    ) -> None:
        self.names = list(names)
        self.module_paths = dict(module_paths)
        self.pooling = pooling
        self.num_prefix_tokens = num_prefix_tokens
        self.batch_first = batch_first
        self._apply = apply
        self.applied_names = [n for n in self.names if n in apply]
        self._out: dict[str, torch.Tensor] = {}
        self._out_count: dict[str, int] = {}
        self._app: dict[str, torch.Tensor] = {}
        self._app_count: dict[str, int] = {}
        self._slots = _Slots(self.names)
        self._app_slots = _Slots(self.applied_names)

    @property
    def settings(self) -> dict[str, Any]:
        """What a result must record about the capture (pooling, prefix tokens, layout)."""
        return {
            "pooling": self.pooling,
            "num_prefix_tokens": self.num_prefix_tokens,
            "batch_first": self.batch_first,
            "sublayers": list(self.names),
            "module_paths": [self.module_paths[n] for n in self.names],
        }

    def _pool(self, out: Any, name: str, slots: _Slots) -> torch.Tensor:
        x = _as_tokens(out, name, self.batch_first)
        slot = slots.slot(name, pooled_shape(tuple(x.shape), self.pooling, self.num_prefix_tokens), x.device)
        return pool_tokens(x, self.pooling, self.num_prefix_tokens, out=slot)

    def _hook(self, name: str) -> Callable[..., None]:
        fn = self._apply.get(name)

        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
            if _applying():
                return
            count = self._out_count.get(name, 0)
            self._out_count[name] = count + 1
            if count:
                return  # reported by pop(): fired twice in one forward
            self._out[name] = self._pool(output, name, self._slots)
            if fn is None:
                return
            _APPLYING.depth = getattr(_APPLYING, "depth", 0) + 1
            try:
                other = fn(*args, **kwargs)
            finally:
                _APPLYING.depth -= 1
            self._app_count[name] = self._app_count.get(name, 0) + 1
            self._app[name] = self._pool(other, name, self._app_slots)

        return hook

    def _take(
        self, names: list[str], store: dict[str, torch.Tensor], counts: dict[str, int], what: str, slots: _Slots
    ) -> dict[str, torch.Tensor]:
        try:
            if not counts:
                raise FeatureError(f"no {what} captured: run a forward pass inside the capture block before pop")
            for name in names:
                n = counts.get(name, 0)
                if n == 0:
                    raise FeatureError(
                        f"sublayer {name!r} ({self.module_paths[name]}) did not fire in the last forward pass"
                    )
                if n > 1:
                    raise FeatureError(
                        f"sublayer {name!r} ({self.module_paths[name]}) fired {n} times since the last "
                        "pop (one pop per forward pass; a module used twice cannot be captured)"
                    )
            return {name: store[name] for name in names}
        finally:
            slots.learn(store)
            store.clear()
            counts.clear()

    def pop(self) -> dict[str, torch.Tensor]:
        """Pooled outputs of the last forward pass, ordered as :attr:`names`; then clear them.

        Raises:
            FeatureError: A hooked module did not fire, or fired more than once, since the
                last pop (the message names it).
        """
        return self._take(self.names, self._out, self._out_count, "features", self._slots)

    def pop_applied(self) -> dict[str, torch.Tensor]:
        """Pooled outputs of the ``apply`` callables for the last forward pass; then clear.

        Ordered as :attr:`applied_names`. Pop these after every forward pass, as
        :meth:`pop`; :func:`forward_batch` does both.

        Raises:
            FeatureError: As :meth:`pop`; also when no ``apply`` was given.
        """
        if not self._apply:
            raise FeatureError("pop_applied: capture() was given no apply callables")
        return self._take(self.applied_names, self._app, self._app_count, "applied features", self._app_slots)


@contextmanager
def capture(
    model: nn.Module,
    names: str | Sequence[str] | None = None,
    *,
    pooling: str = "mean",
    num_prefix_tokens: int | None = None,
    batch_first: bool | None = None,
    apply: Mapping[str, Callable[..., Any]] | None = None,
) -> Iterator[Capture]:
    """Hook canonical sublayers of ``model`` for the duration of a ``with`` block.

    Inside the block gradients are off (``torch.no_grad``), each forward pass fills the
    :class:`Capture`, and :meth:`Capture.pop` returns ``{name: features}`` for that pass.
    The hooks are removed on exit, also when the block raises. The model's train/eval mode
    is left alone: put it in eval mode for CKA.

    Args:
        model: The model; see :func:`sublayer_map` for how sublayers are found.
        names: Canonical names (order kept), as for :func:`resolve_sublayers`; None selects
            :data:`DEFAULT_KINDS` for every block.
        pooling: ``"mean"`` (patch tokens), ``"cls"``, ``"flatten"`` or ``"tokens"``.
        num_prefix_tokens: Tokens before the patch tokens. Default: the model's
            ``num_prefix_tokens`` attribute; without one, 1 (a class token) with a warning.
        batch_first: Whether the hooked outputs are (B, T, D); False for (T, B, D)
            (sequence-first, e.g. open_clip with ``nn.MultiheadAttention``). Default: the
            model's ``batch_first`` attribute, else True.
        apply: ``{name: callable}``. When the sublayer ``name`` runs, the callable is also
            called on the very same positional and keyword arguments, and its output
            (tuple -> first element, layout, pooling as above) is kept for
            :meth:`Capture.pop_applied`. With the fine-tuned model's module this gives the
            fine-tuned sublayer on the pretrained model's input, in the same pass. While
            it runs, capture hooks (of any capture in this thread) are not triggered.

    Yields:
        The :class:`Capture`.

    Raises:
        UsageError: Bad names, pooling, ``apply`` keys or values, or ``cls`` pooling for a
            model without a class token — all checked before any hook is registered.

    Example:
        >>> import copy
        >>> from cka_geo.models.vit import ViTConfig, VisionTransformer
        >>> pre = VisionTransformer(ViTConfig(img_size=16, patch_size=4, in_chans=3,
        ...                                   embed_dim=32, depth=2, num_heads=2)).eval()
        >>> ft = copy.deepcopy(pre)
        >>> names = ["blocks.1.mlp.fc1", "blocks.1.mlp.fc2"]
        >>> with capture(pre, names, pooling="tokens",
        ...              apply={n: ft.get_submodule(n) for n in names}) as cap:
        ...     _ = pre(torch.randn(2, 3, 16, 16))
        ...     out, own = cap.pop(), cap.pop_applied()
        >>> out["blocks.1.mlp.fc1"].shape
        torch.Size([32, 128])
        >>> bool(torch.equal(out["blocks.1.mlp.fc2"], own["blocks.1.mlp.fc2"]))
        True
    """
    selected = resolve_sublayers(model, names)
    mapping = sublayer_map(model)
    if pooling not in POOLINGS:
        raise UsageError(f"unknown pooling {pooling!r} (choose from {', '.join(POOLINGS)}){did_you_mean(pooling, POOLINGS)}")
    if num_prefix_tokens is None:
        attr = getattr(model, "num_prefix_tokens", None)
        if attr is None:
            if pooling != "flatten":
                warnings.warn(
                    f"{type(model).__name__} has no num_prefix_tokens attribute; assuming 1 "
                    "(a class token); pass num_prefix_tokens= to say otherwise",
                    stacklevel=3,
                )
            attr = 1
        num_prefix_tokens = attr
    if isinstance(num_prefix_tokens, bool) or not isinstance(num_prefix_tokens, int) or num_prefix_tokens < 0:
        raise UsageError(f"num_prefix_tokens must be a non-negative integer, got {num_prefix_tokens!r}")
    if pooling == "cls" and (num_prefix_tokens == 0 or (hasattr(model, "cls_token") and model.cls_token is None)):
        raise UsageError(f"pooling 'cls': {type(model).__name__} has no class token")
    if batch_first is None:
        batch_first = getattr(model, "batch_first", True)
    if not isinstance(batch_first, bool):
        raise UsageError(f"batch_first must be True or False, got {batch_first!r}")
    fns: dict[str, Callable[..., Any]] = {}
    for key, fn in (apply or {}).items():
        canonical = key if key in mapping else {p: n for n, p in mapping.items()}.get(key)
        if canonical not in selected:
            raise UsageError(
                f"apply: {key!r} is not one of the captured sublayers{did_you_mean(key, selected)}"
            )
        if not callable(fn):
            raise UsageError(f"apply[{key!r}] is not callable: {type(fn).__name__}")
        fns[canonical] = fn

    cap = Capture(selected, {n: mapping[n] for n in selected}, pooling, num_prefix_tokens, batch_first, fns)
    handles: list[torch.utils.hooks.RemovableHandle] = []
    try:
        with torch.no_grad():
            for name in selected:
                module = model.get_submodule(mapping[name])
                handles.append(module.register_forward_hook(cap._hook(name), with_kwargs=True))
            yield cap
    finally:
        for handle in handles:
            handle.remove()


class CapturedBatch(NamedTuple):
    """What :func:`forward_batch` returns.

    Attributes:
        features: ``{name: (rows, features)}`` as :meth:`Capture.pop`.
        applied: ``{name: (rows, features)}`` as :meth:`Capture.pop_applied`; empty when
            the capture has no ``apply``.
    """

    features: dict[str, torch.Tensor]
    applied: dict[str, torch.Tensor]


def _model_device_dtype(model: nn.Module) -> tuple[torch.device | None, torch.dtype | None]:
    for p in model.parameters():
        return p.device, p.dtype
    return None, None


def forward_batch(
    model: nn.Module,
    x: torch.Tensor,
    cap: Capture,
    *,
    time_mode: str = "frames",
    forward: Callable[[torch.Tensor], Any] | None = None,
) -> CapturedBatch:
    """Run one batch of images or image time series through ``model`` and pop the features.

    Images (B, C, H, W) go through as they are. A time series (B, T, C, H, W) runs as B·T
    frames in one pass; then ``time_mode="frames"`` makes each frame an example (rows in
    sample-major order: row ``b·T + t`` is frame ``t`` of sample ``b``; with ``tokens``
    pooling, ``(b·T + t)·T_p + token``), and ``time_mode="mean"`` averages each sample's
    pooled features over its T frames (B rows; with ``tokens`` pooling, B·T_p rows, each
    token position averaged over time).

    The input is moved to the model's device (and floating dtype) first; features stay on
    that device.

    Args:
        model: The model hooked by ``cap`` (inside its ``with`` block).
        x: (B, C, H, W) or (B, T, C, H, W).
        cap: The active :class:`Capture`.
        time_mode: ``"frames"`` or ``"mean"``; ignored for 4-D input.
        forward: What to call on the (B·T, C, H, W) frames. Default:
            ``model.forward_features`` where it exists (no head), else ``model``.

    Returns:
        A :class:`CapturedBatch` of features (and applied features, when ``cap`` has them).

    Raises:
        DataError: ``x`` is neither 4-D nor 5-D.
        FeatureError: A sublayer's row count does not match the batch (a wrong
            ``batch_first`` shows up here), or a sublayer did not fire.

    Example:
        >>> from cka_geo.models.vit import ViTConfig, VisionTransformer
        >>> m = VisionTransformer(ViTConfig(img_size=8, patch_size=4, in_chans=2,
        ...                                 embed_dim=8, depth=1, num_heads=1)).eval()
        >>> series = torch.randn(3, 5, 2, 8, 8)  # 3 samples, 5 dates
        >>> with capture(m, ["blocks.0"]) as cap:
        ...     frames = forward_batch(m, series, cap).features["blocks.0"]
        ...     mean = forward_batch(m, series, cap, time_mode="mean").features["blocks.0"]
        >>> tuple(frames.shape), tuple(mean.shape)
        ((15, 8), (3, 8))
    """
    if time_mode not in TIME_MODES:
        raise UsageError(f"unknown time_mode {time_mode!r} (choose from {', '.join(TIME_MODES)})")
    if not isinstance(x, torch.Tensor) or x.ndim not in (4, 5):
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise DataError(
            f"expected images (batch, bands, H, W) or a time series (batch, time, bands, H, W), got {shape}"
        )
    b = x.shape[0]
    t = x.shape[1] if x.ndim == 5 else 1
    frames = x.reshape(b * t, *x.shape[2:]) if x.ndim == 5 else x
    device, dtype = _model_device_dtype(model)
    if device is not None and frames.device != device:
        frames = frames.to(device, non_blocking=True)
    if dtype is not None and dtype.is_floating_point and frames.is_floating_point() and frames.dtype != dtype:
        frames = frames.to(dtype)
    if forward is None:
        forward = getattr(model, "forward_features", None) or model
    forward(frames)
    features = cap.pop()
    applied = cap.pop_applied() if cap.applied_names else {}

    def finish(feats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = {}
        for name, f in feats.items():
            rows = f.shape[0]
            per = rows // (b * t) if rows % (b * t) == 0 else 0
            if per == 0 or (cap.pooling != "tokens" and per != 1):
                raise FeatureError(
                    f"sublayer {name!r} gave {rows} rows for {b * t} frames; "
                    f"is batch_first={cap.batch_first} right for this model?"
                )
            if x.ndim == 5 and time_mode == "mean":
                f = f.reshape(b, t, per, f.shape[1]).mean(dim=1).reshape(b * per, f.shape[1])
            out[name] = f
        return out

    return CapturedBatch(finish(features), finish(applied))
