"""`cka-geo compare A B --cross`: two architectures, the full L_A x L_B matrix."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from cka_geo.checkpoints import build_model, load_checkpoint, save_checkpoint
from cka_geo.cli import main
from cka_geo.compare import CompareOptions
from cka_geo.compare.cross import compare_cross
from cka_geo.compare.probes import probe_batches
from cka_geo.errors import DataError, UsageError
from cka_geo.features import capture, forward_batch, resolve_sublayers
from cka_geo.results import CompareResult
from cka_geo.results_cross import CSV_COLUMNS, CrossResult, load_any_results
from cka_geo.vit import VisionTransformer, ViTConfig
from reference import minibatch_cka_matrix

A = ViTConfig(img_size=16, patch_size=4, in_chans=13, embed_dim=32, depth=3, num_heads=2)
B = ViTConfig(img_size=32, patch_size=8, in_chans=13, embed_dim=48, depth=2, num_heads=3)  # wider, shallower, patch 8
pytestmark = pytest.mark.filterwarnings("ignore:image size 16x16 differs:RuntimeWarning")
FAST = {"samples": 48, "batch_size": 12, "progress": False}


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cross")
    out = {}
    for seed, (name, cfg) in enumerate({
        "a": A, "b": B,
        "rgb": ViTConfig(img_size=16, patch_size=4, in_chans=3, embed_dim=32, depth=2, num_heads=2),
        "p6": ViTConfig(img_size=18, patch_size=6, in_chans=13, embed_dim=24, depth=2, num_heads=2),
    }.items()):
        torch.manual_seed(seed)
        out[name] = root / f"{name}.pt"
        save_checkpoint(out[name], VisionTransformer(cfg), cfg)
    return out


def test_the_cross_matrix_equals_a_float64_reference_of_the_captured_features(files):
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        res = compare_cross(files["a"], files["b"], **FAST)
    assert any("pos_embed resampled from a 4x4 to a 2x2 patch grid" in str(w.message) for w in said)
    ma = build_model(load_checkpoint(files["a"]))
    loaded_b = load_checkpoint(files["b"])
    from cka_geo.compare.inputs import at_size

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        at_size(loaded_b, loaded_b, (16, 16), "test")  # B at A's 16 px, as the comparison did it
    mb = build_model(loaded_b)
    names_a = resolve_sublayers(ma, kinds=CompareOptions().sublayers)
    names_b = resolve_sublayers(mb, kinds=CompareOptions().sublayers)
    assert res.layers_pre == names_a and res.layers_ft == names_b
    assert res.matrix.shape == (12, 8)
    batches, _, _, _ = probe_batches(CompareOptions(**FAST), 13, 16)
    fa, fb = [], []
    with capture(ma, names_a) as ca, capture(mb, names_b) as cb:
        for x in batches:
            fa.append([forward_batch(ma, x, ca).features[n].double().numpy() for n in names_a])
            fb.append([forward_batch(mb, x, cb).features[n].double().numpy() for n in names_b])
    ref = minibatch_cka_matrix(fa, fb)
    np.testing.assert_allclose(res.matrix, ref, atol=2e-6, rtol=0)
    assert res["mode"] == "cross" and res["settings"]["pos_embed_resample"]["pre"] is None
    assert res["settings"]["pos_embed_resample"]["ft"].startswith("bicubic")
    assert res["settings"]["native_image_size"] == {"pre": [16, 16], "ft": [32, 32]}
    assert "diagonal" not in res and "own_change" not in res  # no same-layer view
    best = res.summary["best_match"]
    i = names_a.index("blocks.2")
    assert best["blocks.2"] == names_b[int(np.argmax(ref[i]))]


def test_the_cli_writes_mode_csv_and_heatmap_and_plot_redraws_it(files, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["compare", str(files["a"]), str(files["b"]), "--cross", "--samples", "48", "--batch-size",
                 "12", "--out", str(out), "-q"])
    stdout, err = capsys.readouterr()
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["heatmap.png", "results.csv", "results.json"]
    saved = json.loads((out / "results.json").read_text())
    assert saved["mode"] == "cross" and saved["schema"] == "cka-geo/compare/v1"
    assert np.array(saved["matrix"]).shape == (len(saved["layers_pre"]), len(saved["layers_ft"])) == (12, 8)
    rows = (out / "results.csv").read_text().splitlines()
    assert rows[0].split(",") == list(CSV_COLUMNS) and len(rows) == 1 + 12 * 8
    assert stdout.strip().splitlines()[-1] == saved["summary"]["verdict"]
    loaded = load_any_results(out / "results.json")
    assert isinstance(loaded, CrossResult) and np.array_equal(loaded.matrix, np.array(saved["matrix"], dtype=float))
    with pytest.raises(DataError, match=r"a --cross result .* no same-layer view"):
        CompareResult.from_dict(saved, "results.json")
    assert main(["plot", str(out / "results.json"), "--out", str(tmp_path / "figs"), "--format", "png", "svg"]) == 0
    assert sorted(p.name for p in (tmp_path / "figs").iterdir()) == ["heatmap.png", "heatmap.svg"]


def test_the_cross_heatmap_shows_the_full_matrix_and_each_rows_best_match(files):
    from cka_geo.plotting.cross import draw_cross

    res = compare_cross(files["a"], files["b"], **FAST, sublayers=("block",))
    fig = draw_cross(res)
    ax = fig.axes[0]
    mesh = ax.collections[0]
    assert mesh.get_array().shape == (3, 2)  # rows: A's 3 blocks, columns: B's 2
    dots = next(line for line in ax.get_lines() if line.get_label() == "best match of each row")
    cols = [res.layers_ft.index(res.summary["best_match"][n]) + 0.5 for n in res.layers_pre]
    assert list(dots.get_xdata()) == cols
    footer = fig._supxlabel.get_text().replace("\n", " ")
    assert "A: a.pt × B: b.pt" in footer and "n = 48 samples" in footer
    assert "width 48, patch 8" in ax.get_xlabel()


def test_refusals_name_the_reason(files, tmp_path, capsys):
    with pytest.raises(DataError, match=r"cannot feed both: .*a.pt takes 13 bands, .*rgb.pt takes 3"):
        compare_cross(files["a"], files["rgb"], **FAST)
    with pytest.raises(DataError, match=r"16x16 px \(.*a.pt's native size\) is not a multiple of .*p6.pt's patch 6; "
                                        r"give --image-size N with N a multiple of 12"):
        compare_cross(files["a"], files["p6"], **FAST)
    with pytest.raises(DataError, match=r"20x20 px \(--image-size\) is not a multiple of .*b.pt's patch 8"):
        compare_cross(files["a"], files["b"], image_size=20, **FAST)
    with pytest.raises(UsageError, match="--cross compares sublayer kinds"):
        compare_cross(files["a"], files["b"], names=("blocks.0",), **FAST)
    out = tmp_path / "out"
    code = main(["compare", str(files["a"]), str(files["b"]), "--samples", "48", "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and not out.exists()
    assert "encoders differ" in err[0] and err[0].endswith("use --cross (compare_cross)")
