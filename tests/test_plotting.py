"""Figures from a results dict: valid files of the expected size, the CLI, errors, lightness."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cka_geo import cli, plotting
from cka_geo.compare.verdict import summarize
from cka_geo.errors import DataError, UsageError

DPI = 40  # divisible by 4: quarter-inch figure sizes give whole pixels; small and fast
PLANT = "blocks.8.mlp.fc1"


def synthetic(
    depth: int = 12,
    subs: tuple[str, ...] = ("attn", "mlp.fc1", "mlp.fc2", ""),
    plant: str = PLANT,
    own: bool = True,
) -> dict:
    """A results dict like compare's: a change planted in ``plant`` that carries downstream."""
    layers = [f"blocks.{b}" + (f".{s}" if s else "") for b in range(depth) for s in subs]
    n = len(layers)
    pos = np.arange(n)
    matrix = np.exp(-np.abs(pos[:, None] - pos[None, :]) / 10.0)
    k = layers.index(plant)
    diag = np.ones(n)
    diag[k] = 1 - 1e-4  # the planted sublayer itself moves only slightly...
    diag[k + 1 :] = 0.97 - 0.2 * (pos[k + 1 :] - k) / n  # ...everything after it more
    np.fill_diagonal(matrix, diag)
    own_change = np.full(n, 1.0)
    own_change[k] = 0.96
    own_change[layers.index(plant.rsplit(".", 2)[0])] = 0.985  # its block contains it
    return {
        "schema": "cka-geo/compare/v1",
        "layers": layers,
        "matrix": matrix.tolist(),
        "diagonal": dict(zip(layers, diag.tolist(), strict=True)),
        "intervals": {
            name: [d, d] if d == 1 else [d - 0.01, min(1.0, d + 0.01)]
            for name, d in zip(layers, diag.tolist(), strict=True)
        },
        "own_change": dict(zip(layers, own_change.tolist(), strict=True)) if own else None,
        "own_change_intervals": (
            {
                name: [v - 0.003, min(1.0, v + 0.003)]
                for name, v in zip(layers, own_change.tolist(), strict=True)
            }
            if own
            else None
        ),
        "summary": summarize(
            layers,
            dict(zip(layers, diag.tolist(), strict=True)),
            dict(zip(layers, own_change.tolist(), strict=True)) if own else None,
            identical=False,
        ),
        "settings": {
            "kernel": "linear",
            "estimator": "unbiased",
            "pooling": "mean",
            "samples": 256,
            "batch_size": 64,
            "rbf_frac": None,
            "confidence": 0.95,
        },
        "checkpoints": {"pre": {"path": "pre.pt"}, "ft": {"path": "ft.pt"}},
    }


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk, after checking the signature."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    length, kind = struct.unpack(">I4s", data[8:16])
    assert kind == b"IHDR" and length == 13
    return struct.unpack(">II", data[16:24])


def texts(fig) -> list[str]:
    return [t.get_text() for ax in fig.axes for t in ax.texts]


@pytest.fixture(scope="module")
def results() -> dict:
    return synthetic()


@pytest.fixture(scope="module")
def drawn(tmp_path_factory, results) -> tuple[Path, list[Path]]:
    out = tmp_path_factory.mktemp("figs")
    return out, plotting.plot_all(results, out, formats=("png", "pdf"), dpi=DPI)


def test_plot_all_writes_pngs_of_the_expected_size(drawn, results):
    out, paths = drawn
    names = {p.name for p in paths}
    assert names == {f"{f}.{ext}" for f in plotting.FIGURES for ext in ("png", "pdf")}
    sizes = plotting.figure_sizes(results)
    for fig in plotting.FIGURES:
        w, h = sizes[fig]
        assert png_size(out / f"{fig}.png") == (w * DPI, h * DPI)
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary left


def test_pdf_files_are_complete_vector_files(drawn):
    out, _ = drawn
    for fig in plotting.FIGURES:
        data = (out / f"{fig}.pdf").read_bytes()
        assert data.startswith(b"%PDF-") and data.rstrip().endswith(b"%%EOF")
        assert b"/Subtype /Image" not in data or fig == "heatmap"  # lines and bars are vector


def test_figure_sizes_grow_with_depth(results):
    small = plotting.figure_sizes(synthetic(depth=4, plant="blocks.2.mlp.fc1"))
    large = plotting.figure_sizes(synthetic(depth=24))
    mid = plotting.figure_sizes(results)
    for fig in plotting.FIGURES:
        assert small[fig][0] <= mid[fig][0] <= large[fig][0]
    assert small["heatmap"][0] < large["heatmap"][0]
    assert small["change_bars"][0] < large["change_bars"][0]
    # one panel fewer without the own-change view
    no_own = plotting.figure_sizes(synthetic(own=False))
    assert no_own["depth_profile"][1] < mid["depth_profile"][1]


def test_change_bars_mark_the_planted_sublayer_in_the_own_view(results):
    r = plotting._parse(results)
    fig = plotting._draw_bars(r, DPI)
    notes = texts(fig)
    same, own = fig.axes[0], fig.axes[1]
    own_notes = [t.get_text() for t in own.texts]
    assert any(f"largest own change: {PLANT}" in t for t in own_notes), own_notes
    # same-layer change is largest at the end of the network, not at the plant, where it starts
    assert any("most changed: blocks.11" in t.get_text() for t in same.texts), notes
    assert any(f"first to move: {PLANT}" in t.get_text() for t in same.texts), notes
    # same-layer changes: 1e-4 at the plant, ~0.1 downstream: a log axis; own: linear
    assert same.get_yscale() == "log"
    assert own.get_yscale() == "linear"


def test_depth_profile_has_a_line_per_type_and_circles_the_extremes(results):
    r = plotting._parse(results)
    fig = plotting._draw_depth(r, DPI)
    assert len(fig.axes) == 2
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert labels == ["attn", "mlp.fc1", "mlp.fc2", "block out"]
    assert any(f"largest own change: {PLANT}" in t for t in texts(fig))
    assert any("most changed: blocks.11" in t for t in texts(fig))
    # both panels show change, 1 − CKA: the fc1 line of (a) passes through the planted 1e-4
    assert [ax.get_ylabel().split()[:3] for ax in fig.axes] == [["1", "−", "CKA"]] * 2
    fc1 = next(ln for ln in fig.axes[0].lines if ln.get_label() == "mlp.fc1")
    x, y = fc1.get_data()
    assert y[list(x).index(8)] == pytest.approx(1e-4)
    fig_one = plotting._draw_depth(plotting._parse(synthetic(own=False)), DPI)
    assert len(fig_one.axes) == 1


def test_identical_encoders_point_at_no_layer(results):
    """Estimator noise (|1 − CKA| ≤ 1e-6) is not a change: no 'largest', a 'no change' note."""
    res = json.loads(json.dumps(results))
    rng = np.random.default_rng(0)
    for key in ("diagonal", "own_change"):
        res[key] = {n: 1.0 + float(rng.normal(0, 2e-8)) for n in res["layers"]}
    res["intervals"] = {n: [1 - 3e-8, 1 + 3e-8] for n in res["layers"]}
    res["summary"] = summarize(res["layers"], res["diagonal"], res["own_change"], identical=True)
    r = plotting._parse(res)
    for fig in (plotting._draw_bars(r, DPI), plotting._draw_depth(r, DPI)):
        notes = texts(fig)
        assert not any("changed" in t or "first" in t or "largest" in t for t in notes), notes
        assert sum("no change" in t for t in notes) == 2
        assert any("identical" in t for t in notes)


def test_heatmap_masks_nan_and_labels_blocks(results):
    res = json.loads(json.dumps(results))
    res["matrix"][3][5] = None
    res["matrix"][7] = [None] * len(res["layers"])
    r = plotting._parse(res)
    fig = plotting._draw_matrix(r, DPI)
    ax = fig.axes[0]
    mesh = ax.collections[0]
    mask = np.ma.getmaskarray(mesh.get_array()).reshape(r.n, r.n)
    assert mask.sum() == 1 + r.n and mask[3, 5] and mask[7].all()
    assert ax.patch.get_hatch()  # NaN cells show a hatched background
    assert [t.get_text() for t in ax.get_xticklabels()] == [str(b) for b in range(12)]
    assert len(ax.xaxis.get_minorticklocs()) == r.n
    assert fig.axes[1].get_ylabel().startswith("1 − CKA")


def test_single_figures_infer_format_and_reject_unknown(tmp_path, results):
    p = plotting.plot_matrix(results, tmp_path / "m.png", dpi=DPI)
    assert png_size(p) == tuple(int(v * DPI) for v in plotting.figure_sizes(results)["heatmap"])
    svg = plotting.plot_depth_profile(results, tmp_path / "d.svg")
    assert b"<svg" in svg.read_bytes()[:500]
    pdf = plotting.plot_change_bars(results, tmp_path / "b.out", format="pdf")
    assert pdf.read_bytes().startswith(b"%PDF-")
    with pytest.raises(UsageError, match="format"):
        plotting.plot_matrix(results, tmp_path / "m.jpg")
    assert not (tmp_path / "m.jpg").exists()


def test_plot_all_leaves_nothing_when_a_figure_fails(tmp_path, monkeypatch):
    results = synthetic(depth=3, plant="blocks.1.mlp.fc1")

    def broken(*args):
        raise RuntimeError("boom")

    monkeypatch.setitem(plotting._DRAW, "change_bars", broken)
    out = tmp_path / "figs"
    with pytest.raises(RuntimeError):
        plotting.plot_all(results, out, formats=("png",), dpi=DPI)
    assert not out.exists()
    existing = tmp_path / "existing"
    existing.mkdir()
    with pytest.raises(RuntimeError):
        plotting.plot_all(results, existing, formats=("png",), dpi=DPI)
    assert list(existing.iterdir()) == []


def test_load_results_roundtrip_and_validation(tmp_path, results):
    res = json.loads(json.dumps(results))
    res["matrix"][0][1] = None
    path = tmp_path / "results.json"
    path.write_text(json.dumps(res))
    loaded = plotting.load_results(path)
    assert {k: loaded[k] for k in res} == res  # every field read back as written
    again = type(loaded).from_dict(json.loads(json.dumps(loaded.to_dict())))
    assert again.to_dict() == loaded.to_dict()  # and the typed result round-trips exactly
    assert np.isnan(plotting._parse(loaded).matrix[0, 1])

    with pytest.raises(UsageError, match="no such results file"):
        plotting.load_results(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text('{"schema": ')
    with pytest.raises(DataError, match=r"bad\.json: invalid JSON"):
        plotting.load_results(bad)
    for mutate, pattern in [
        (lambda d: d.update(schema="cka-geo/other/v9"), "schema"),
        (lambda d: d["matrix"].pop(), "rows"),
        (lambda d: d["matrix"][2].append(0.5), "row 2"),
        (lambda d: d["layers"].__setitem__(1, d["layers"][0]), "twice"),
        (lambda d: d["matrix"][1].__setitem__(1, "x"), r"matrix\[1\]\[1\]"),
        (lambda d: d["intervals"].update({"blocks.99": [0, 1]}), "blocks.99"),
        (lambda d: d["intervals"].update({"blocks.0": [0.9]}), "lo, hi"),
    ]:
        d = json.loads(json.dumps(results))
        mutate(d)
        wrong = tmp_path / "wrong.json"
        wrong.write_text(json.dumps(d))
        with pytest.raises(DataError, match=pattern) as info:
            plotting.load_results(wrong)
        assert "wrong.json" in str(info.value) and "\n" not in str(info.value)


def test_cli_plot_writes_figures_next_to_the_json(tmp_path, capsys):
    results = synthetic(depth=3, plant="blocks.1.mlp.fc1")  # small: the CLI, not the drawing
    path = tmp_path / "run" / "results.json"
    path.parent.mkdir()
    path.write_text(json.dumps(results))
    assert cli.main(["plot", str(path), "--format", "png", "pdf", "--dpi", str(DPI)]) == 0
    printed = capsys.readouterr().out.split()
    assert len(printed) == 6
    for line in printed:
        assert Path(line).parent == path.parent and Path(line).stat().st_size > 0
    other = tmp_path / "elsewhere"
    assert cli.main(["plot", str(path), "--out", str(other), "--dpi", str(DPI)]) == 0
    assert sorted(p.name for p in other.iterdir()) == sorted(f"{f}.png" for f in plotting.FIGURES)


@pytest.mark.parametrize(
    ("content", "code", "pattern"),
    [
        (None, 2, "no such results file"),
        ("{not json", 1, "invalid JSON"),
        (json.dumps({"schema": "nope"}), 1, "schema"),
        (json.dumps({"schema": plotting.SCHEMA, "layers": ["a"], "matrix": [[1, 2]]}), 1, "row 0"),
    ],
)
def test_cli_plot_errors_are_one_line_and_write_nothing(tmp_path, capsys, content, code, pattern):
    path = tmp_path / "results.json"
    if content is not None:
        path.write_text(content)
    out = tmp_path / "figs"
    assert cli.main(["plot", str(path), "--out", str(out)]) == code
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cka-geo: error:") and pattern in lines[0]
    assert "results.json" in lines[0]
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == (["results.json"] if content else [])


def test_cli_plot_rejects_unknown_format_as_usage_error(tmp_path, results, capsys):
    path = tmp_path / "results.json"
    path.write_text(json.dumps(results))
    try:
        code = cli.main(["plot", str(path), "--format", "jpg"])
    except SystemExit as exc:  # argparse may exit instead of returning
        code = exc.code
    assert code == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_import_stays_light():
    code = (
        "import sys, cka_geo, cka_geo.plotting, cka_geo.commands.plot; "
        "bad = [m for m in ('matplotlib', 'seaborn') if m in sys.modules]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_figures_returns_the_drawings_as_figure_objects(results):
    from matplotlib.figure import Figure

    figs = plotting.figures(results, dpi=80)
    assert list(figs) == list(plotting.FIGURES)
    sizes = plotting.figure_sizes(results)
    for name, fig in figs.items():
        assert isinstance(fig, Figure)
        assert tuple(fig.get_size_inches()) == pytest.approx(sizes[name])
        assert fig.dpi == 80
    assert list(plotting.figures(results, names=["change_bars"])) == ["change_bars"]
    with pytest.raises(UsageError, match="unknown figure 'pie'"):
        plotting.figures(results, names=["pie"])
