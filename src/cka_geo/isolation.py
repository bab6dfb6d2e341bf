"""Reading a model without touching a run: no gradients, eval mode, RNG states restored.

The one isolation context of cka-geo: the training monitor, the probes and anything that
measures a model in the middle of a run use it.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator

import numpy as np
import torch
from torch import nn


@contextlib.contextmanager
def observing(*models: nn.Module) -> Iterator[None]:
    """Run code that reads ``models`` without any effect on a training run.

    Inside: no gradients, every module of ``models`` in eval mode. On exit: each module's
    train/eval flag as before, and the torch (CPU, initialised CUDA devices), numpy and
    python global RNG states as before.

    Example:
        >>> m = nn.Sequential(nn.Linear(2, 2), nn.Dropout()).train()
        >>> state = torch.get_rng_state()
        >>> with observing(m):
        ...     _ = torch.randn(3), m.training
        >>> m.training, bool(torch.equal(state, torch.get_rng_state()))
        (True, True)
    """
    modes = [[mod.training for mod in m.modules()] for m in models]
    cpu = torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    np_state = np.random.get_state()
    py_state = random.getstate()
    try:
        for m in models:
            m.eval()
        with torch.no_grad():
            yield
    finally:
        for m, flags in zip(models, modes, strict=True):
            for mod, flag in zip(m.modules(), flags, strict=True):
                mod.training = flag
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)
        np.random.set_state(np_state)
        random.setstate(py_state)


__all__ = ["observing"]
