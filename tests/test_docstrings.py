"""Every docstring example in the package runs and prints what it says."""

from __future__ import annotations

import doctest
import importlib
import importlib.util
import pkgutil

import pytest

import cka_geo


def modules_with_examples() -> list[str]:
    names = []
    for info in pkgutil.walk_packages(cka_geo.__path__, "cka_geo."):
        if info.name.endswith("__main__"):
            continue
        spec = importlib.util.find_spec(info.name)
        if spec and spec.origin and spec.origin.endswith(".py"):
            with open(spec.origin, encoding="utf-8") as fh:
                if ">>> " in fh.read():
                    names.append(info.name)
    return names


MODULES = modules_with_examples()


def test_the_examples_were_found():
    assert {"cka_geo.functional.hsic", "cka_geo.accumulator", "cka_geo.features", "cka_geo.models.vit"} <= set(MODULES)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples failed in {name}"
