"""`import cka_geo` (and the core modules) pull in no plotting or training framework."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

HEAVY = ("torchmetrics", "lightning", "pytorch_lightning", "lightning_fabric", "matplotlib", "seaborn",
         "tifffile", "PIL")
MODULES = ("cka_geo", "cka_geo.features", "cka_geo.accumulator", "cka_geo.checkpoints", "cka_geo.monitor",
           "cka_geo.integrations")

_SCRIPT = textwrap.dedent(
    """
    import importlib, json, sys
    heavy, modules = json.loads(sys.argv[1])
    report = {}
    for mod in modules:  # one after the other, so a leak is charged to the first importer
        importlib.import_module(mod)
        report[mod] = sorted(m for m in sys.modules if m.split(".")[0] in heavy)
    print(json.dumps(report))
    """
)


def test_core_modules_import_no_heavy_framework_in_a_fresh_interpreter():
    out = subprocess.run(
        [sys.executable, "-c", _SCRIPT, json.dumps([HEAVY, MODULES])],
        capture_output=True, text=True, timeout=120, check=True,
    )
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert list(report) == list(MODULES)
    assert report == {m: [] for m in MODULES}, report


def test_the_check_can_see_a_heavy_import():
    out = subprocess.run(
        [sys.executable, "-c", _SCRIPT, json.dumps([HEAVY, ["cka_geo.integrations.torchmetrics"]])],
        capture_output=True, text=True, timeout=120, check=True,
    )
    assert "torchmetrics" in json.loads(out.stdout.strip().splitlines()[-1])["cka_geo.integrations.torchmetrics"]
