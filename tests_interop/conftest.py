"""Interop lane: real libraries (timm, transformers, open_clip, torchgeo, terratorch).

Not collected by the main lane (it lives outside tests/). Each test asks for its library
with ``need("timm")``; an absent library skips cleanly.
"""

from __future__ import annotations

import importlib

import pytest


def need(name: str):
    """The imported module, or a clean skip when the library is not installed."""
    try:
        return importlib.import_module(name)
    except Exception as exc:  # ImportError, or a broken optional dependency
        pytest.skip(f"{name} is not importable here ({type(exc).__name__}: {exc})")
