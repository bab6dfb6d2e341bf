"""Deprecated alias of :mod:`cka_geo.features` (the sublayer feature capture).

``from cka_geo.capture import capture, forward_batch`` keeps working with a
DeprecationWarning; import from :mod:`cka_geo.features` or from :mod:`cka_geo` instead. The
module itself is callable like :func:`cka_geo.features.capture`, so that ``cka_geo.capture``
works whether Python binds it to this module or to the function.
"""

from __future__ import annotations

import sys
import types
import warnings
from typing import Any

from cka_geo.features import *  # noqa: F403
from cka_geo.features import __all__  # noqa: F401
from cka_geo.features import capture as _capture

warnings.warn(
    "cka_geo.capture (the module) is deprecated; import capture, forward_batch and resolve_sublayers "
    "from cka_geo or cka_geo.features",
    DeprecationWarning,
    stacklevel=2,
)


class _CallableModule(types.ModuleType):
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return _capture(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
