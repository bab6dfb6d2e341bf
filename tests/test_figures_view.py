"""What the figures show at a glance: a planted change, the verdict's marks, provenance, options."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from cka_geo import cli, plotting
from cka_geo.errors import UsageError

DPI = 72
PLANT = "blocks.1.mlp.fc1"


def planted(summary: dict | None = None) -> dict:
    """Three blocks; one sublayer at CKA 0.999, everything else (matrix included) at 1 − 1e-8."""
    layers = [f"blocks.{b}" + s for b in range(3) for s in (".attn", ".mlp.fc1", ".mlp.fc2", "")]
    n = len(layers)
    k = layers.index(PLANT)
    matrix = np.full((n, n), 1 - 1e-8)
    matrix[k, k] = 0.999
    diag = {name: float(matrix[i, i]) for i, name in enumerate(layers)}
    own = {name: (0.9995 if name == PLANT else 1 - 1e-8) for name in layers}
    if summary is None:
        summary = {"most_changed": PLANT, "first_changed": PLANT, "largest_own_change": PLANT}
    return {
        "schema": plotting.SCHEMA,
        "layers": layers,
        "matrix": matrix.tolist(),
        "diagonal": diag,
        "own_change": own,
        "summary": {"identical": False, **summary},
        "settings": {
            "kernel": "linear",
            "estimator": "unbiased",
            "pooling": "mean",
            "samples": 256,
            "batches": 4,
            "batch_size": 64,
        },
        "checkpoints": {
            "pre": {"path": "/runs/pretrain/mae_pre.safetensors"},
            "ft": {"path": "/runs/finetune/water_ft.ckpt"},
        },
    }


def all_text(fig) -> str:
    """Every text of a figure (titles, labels, notes, footer), newlines as spaces."""
    from matplotlib.text import Text

    return " ".join(t.get_text().replace("\n", " ") for t in fig.findobj(Text))


def cell_pixels(fig, cells: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """(row, column) in the PNG of the centre of each heatmap cell (matrix row i, column j)."""
    fig.canvas.draw()
    ax = fig.axes[0]
    height = fig.canvas.get_width_height()[1]
    out = []
    for i, j in cells:
        x, y = ax.transData.transform((j + 0.5, i + 0.5))
        out.append((round(float(height - y)), round(float(x))))
    return out


def colours_at(png: Path, fig, cells: list[tuple[int, int]]) -> np.ndarray:
    import matplotlib.image

    image = matplotlib.image.imread(png)[..., :3]
    return np.array([image[r, c] for r, c in cell_pixels(fig, cells)])


@pytest.mark.parametrize("view", ["data", "full"])
def test_a_planted_change_stands_out_in_the_heatmap_by_default(tmp_path, view):
    res = planted()
    k = res["layers"].index(PLANT)
    cells = [(k, k), (0, 0), (k + 1, k + 1), (2, 7)]  # the plant, then a diagonal and an off-diagonal cell
    png = plotting.plot_matrix(res, tmp_path / "heatmap.png", dpi=DPI, range=view)
    fig = plotting.figures(res, dpi=DPI, names=["heatmap"], range=view)["heatmap"]
    colours = colours_at(png, fig, cells)
    distance = np.abs(colours[1:] - colours[0]).sum(axis=1)  # RGB in [0, 1]
    if view == "data":
        assert (distance > 0.8).all(), colours  # e.g. yellow against dark purple
        assert np.abs(colours[1:] - colours[1]).max() < 0.02  # the background is one colour
        label = fig.axes[1].get_ylabel()
        assert label.startswith("1 − CKA") and "log" in label and "data" in label
    else:  # the absolute 0–1 view: a change of 1e-3 is invisible, which is why it is not the default
        assert (distance < 0.05).all(), colours
        assert "absolute" in fig.axes[1].get_ylabel()


def test_the_heatmap_png_is_deterministic(tmp_path):
    a = plotting.plot_matrix(planted(), tmp_path / "a.png", dpi=40)
    b = plotting.plot_matrix(planted(), tmp_path / "b.png", dpi=40)
    assert a.read_bytes() == b.read_bytes()


def test_the_marks_are_the_summary_names_not_a_recomputed_extreme():
    # a summary that disagrees with the argmin on purpose: the figures must follow the summary
    summary = {
        "most_changed": "blocks.2.mlp.fc2",
        "first_changed": "blocks.0.attn",
        "largest_own_change": "blocks.2.attn",
    }
    res = planted(summary)
    figs = plotting.figures(res, dpi=40)
    heat = figs["heatmap"].axes[0]
    boxes = sorted((int(p.get_x()), p.get_linestyle()) for p in heat.patches if p is not heat.patch)
    layers = res["layers"]
    assert boxes == sorted([(layers.index("blocks.2.mlp.fc2"), "-"), (layers.index("blocks.0.attn"), "--")])
    assert "most changed: blocks.2.mlp.fc2" in heat.get_title()
    assert "first to move: blocks.0.attn" in heat.get_title()
    for name in ("depth_profile", "change_bars"):
        same, own = (" ".join(t.get_text() for t in ax.texts) for ax in figs[name].axes[:2])
        assert "most changed: blocks.2.mlp.fc2" in same and "first to move: blocks.0.attn" in same
        assert "largest own change: blocks.2.attn" in own
        assert PLANT not in same + own  # the argmin is not marked


def test_one_sublayer_both_most_changed_and_first_to_move_gets_one_mark():
    figs = plotting.figures(planted(), dpi=40)
    heat = figs["heatmap"].axes[0]
    assert heat.get_title() == f"most changed, first to move: {PLANT} (solid box)"
    bars = " ".join(t.get_text() for t in figs["change_bars"].axes[0].texts)
    assert bars.count(PLANT) == 1


def test_no_change_beyond_the_noise_is_said_when_the_summary_names_none():
    res = planted({"most_changed": None, "first_changed": None, "largest_own_change": None})
    for name, fig in plotting.figures(res, dpi=40).items():
        text = all_text(fig)
        assert "no change beyond the numerical noise" in text, name
        assert "most changed" not in text and "first to move" not in text and "largest own" not in text


def test_every_figure_names_the_checkpoints_and_the_settings():
    for name, fig in plotting.figures(planted(), dpi=40).items():
        text = all_text(fig)
        assert "mae_pre.safetensors" in text and "water_ft.ckpt" in text, name
        assert "/runs/" not in text  # file names, not the folders
        for part in ("linear kernel", "unbiased estimator", "mean pooling", "n = 256", "4 batches"):
            assert part in text, (name, part)
    res = planted()
    del res["checkpoints"]
    assert "not recorded" in all_text(plotting.figures(res, dpi=40, names=["heatmap"])["heatmap"])


def test_vmin_and_vmax_set_the_colour_range():
    from matplotlib.colors import LogNorm

    fig = plotting.figures(planted(), dpi=40, names=["heatmap"], vmin=1e-5, vmax=1e-2)["heatmap"]
    norm = fig.axes[0].collections[0].norm
    assert isinstance(norm, LogNorm) and (norm.vmin, norm.vmax) == (1e-5, 1e-2)
    fig = plotting.figures(planted(), dpi=40, names=["heatmap"], vmin=0, vmax=0.5, cmap="magma")["heatmap"]
    mesh = fig.axes[0].collections[0]
    assert not isinstance(mesh.norm, LogNorm) and mesh.get_cmap().name.startswith("magma")


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"cmap": "no-such-map"}, "--cmap"),
        ({"range": "half"}, "--range"),
        ({"vmin": 0.5, "vmax": 0.5}, "--vmin"),
        ({"vmin": float("nan")}, "--vmin"),
        ({"vmax": float("inf")}, "--vmax"),
        ({"vmin": 2.0}, "--vmin"),  # above the data's largest change, with no --vmax
    ],
)
def test_the_options_are_validated(tmp_path, kwargs, pattern):
    with pytest.raises(UsageError, match=pattern) as info:
        plotting.figures(planted(), dpi=40, names=["heatmap"], **kwargs)
    assert "\n" not in str(info.value)
    with pytest.raises(UsageError, match=pattern):
        plotting.plot_all(planted(), tmp_path / "figs", dpi=40, **kwargs)
    assert not (tmp_path / "figs").exists()


@pytest.mark.parametrize(
    ("flags", "pattern"),
    [(["--cmap", "nope"], "--cmap"), (["--vmin", "1", "--vmax", "0.1"], "--vmin"), (["--vmax", "nan"], "--vmax")],
)
def test_cli_plot_refuses_bad_colour_options_in_one_line(tmp_path, capsys, flags, pattern):
    path = tmp_path / "results.json"
    path.write_text(json.dumps(planted()))
    out = tmp_path / "figs"
    assert cli.main(["plot", str(path), "--out", str(out), *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("cka-geo: error:") and pattern in err[0]
    assert not out.exists()


def test_cli_plot_takes_the_colour_options(tmp_path, capsys):
    path = tmp_path / "results.json"
    path.write_text(json.dumps(planted()))
    argv = ["plot", str(path), "--dpi", "40", "--cmap", "cividis", "--range", "full"]
    assert cli.main(argv) == 0
    assert (tmp_path / "heatmap.png").stat().st_size > 0
