"""Every notebook in notebooks/ runs top to bottom without an error, and is stored clean."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))
KERNEL = "cka-geo-test"
CELL_TIMEOUT = 120  # seconds per cell
SLOW_CELLS = {"study.ipynb": 300}  # CKA_GEO_STUDY_DIR=tiny runs the tiny example study (16 cells)
IMAGES = {  # inline figures each notebook must show
    "heatmaps.ipynb": 6,  # three figures from the dict, three from results.json
    "study.ipynb": 4,  # metrics, localisation, probing, fc1 share
    "training_dynamics.ipynb": 2,  # the trajectory's lines and its heatmap
}


def test_there_are_notebooks_to_run():
    assert NOTEBOOKS, "no notebooks found in notebooks/"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_saved_without_outputs(path):
    nb = json.loads(path.read_text(encoding="utf-8"))
    dirty = [
        i for i, cell in enumerate(nb["cells"])
        if cell["cell_type"] == "code" and (cell.get("outputs") or cell.get("execution_count") is not None)
    ]
    assert not dirty, f"{path.name}: code cells {dirty} hold outputs; clear them before committing"


@pytest.fixture
def kernel_name(tmp_path, monkeypatch):
    """A kernelspec, found first on JUPYTER_PATH, that runs this interpreter (the venv's).

    Nothing is installed into the user's or the venv's Jupyter directories, and a python3
    kernel registered elsewhere on the machine is never picked up by mistake.
    """
    spec_dir = tmp_path / "jupyter" / "kernels" / KERNEL
    spec_dir.mkdir(parents=True)
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": f"cka-geo tests ({sys.executable})",
        "language": "python",
    }
    (spec_dir / "kernel.json").write_text(json.dumps(spec), encoding="utf-8")
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path / "runtime"))
    monkeypatch.setenv("IPYTHONDIR", str(tmp_path / "ipython"))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    return KERNEL


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs_without_error(path, kernel_name, tmp_path):
    try:
        import ipykernel  # noqa: F401  (the kernel process needs it)
        import nbformat
        from nbclient import NotebookClient
    except ImportError as exc:
        pytest.skip(f"running notebooks needs nbclient, nbformat and ipykernel (pip install -e '.[dev]'): {exc}")

    nb = nbformat.read(path, as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell("import sys; print(sys.executable)"))  # which kernel ran
    client = NotebookClient(
        nb,
        kernel_name=kernel_name,
        timeout=SLOW_CELLS.get(path.name, CELL_TIMEOUT),
        resources={"metadata": {"path": str(tmp_path)}},  # the notebook's working directory
    )
    client.execute()  # raises CellExecutionError with the failing cell and its traceback
    errors = [
        (i, out.get("ename"), out.get("evalue"))
        for i, cell in enumerate(nb.cells) if cell.cell_type == "code"
        for out in cell.get("outputs", []) if out.get("output_type") == "error"
    ]
    assert not errors, errors
    ran_by = "".join(out.get("text", "") for out in nb.cells[-1].outputs).strip()
    assert Path(ran_by).resolve() == Path(sys.executable).resolve(), f"kernel ran {ran_by}, not {sys.executable}"
    images = sum(
        "image/png" in out.get("data", {})
        for cell in nb.cells if cell.cell_type == "code"
        for out in cell.get("outputs", [])
    )
    if path.name in IMAGES:
        assert images == IMAGES[path.name], f"{path.name}: expected {IMAGES[path.name]} inline figures, got {images}"
