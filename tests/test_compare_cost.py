"""compare's cost: the own-change views chosen run only their modules; seconds per stage recorded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cka_geo.checkpoints import build_model, load_checkpoint, save_checkpoint
from cka_geo.cli import main
from cka_geo.compare import CompareOptions, compare_checkpoints, run_many
from cka_geo.compare.probes import probe_batches
from cka_geo.errors import UsageError
from cka_geo.features import resolve_sublayers
from cka_geo.vit import VisionTransformer, ViTConfig

CFG = ViTConfig(img_size=16, patch_size=4, in_chans=13, embed_dim=32, depth=3, num_heads=2)
FAST = {"samples": 48, "batch_size": 12, "bootstrap": 50, "progress": False}
pytestmark = pytest.mark.filterwarnings("ignore:only 4 batches feed the bootstrap:RuntimeWarning")


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("cost")
    torch.manual_seed(0)
    model = VisionTransformer(CFG)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    sd["blocks.1.mlp.fc1.weight"] += 3.0 * sd["blocks.1.mlp.fc1.weight"].std() * torch.randn_like(sd["blocks.1.mlp.fc1.weight"])
    save_checkpoint(root / "pre.pt", model, CFG)
    save_checkpoint(root / "ft.pt", sd, CFG)
    return root / "pre.pt", root / "ft.pt"


def test_chosen_own_change_views_equal_those_of_the_full_run_and_leave_the_rest_out(pair):
    full = compare_checkpoints(*pair, **FAST)
    part = compare_checkpoints(*pair, own_kinds=("fc1", "block"), **FAST)
    assert part["diagonal"] == full["diagonal"] and part["intervals"] == full["intervals"]
    for name, value in part["own_change"].items():
        if name.endswith(".mlp.fc1") or name.count(".") == 1:
            assert value == full["own_change"][name], name
            assert part["own_change_intervals"][name] == pytest.approx(full["own_change_intervals"][name], abs=1e-12)
        else:
            assert value is None and part["own_change_intervals"][name] is None, name
    assert part["settings"]["own_change_kinds"] == ["fc1", "block"]
    assert full["settings"]["own_change_kinds"] == ["attn", "fc1", "fc2", "block"]
    assert part["summary"]["largest_own_change"] == full["summary"]["largest_own_change"] == "blocks.1.mlp.fc1"


def test_only_the_chosen_views_modules_run_again(pair):
    pre, ft = (build_model(load_checkpoint(p)) for p in pair)
    calls: dict[str, int] = {}
    paths = ("blocks.0", "blocks.0.attn", "blocks.0.mlp.fc1", "blocks.0.mlp.fc2")
    for path in paths:
        ft.get_submodule(path).register_forward_hook(lambda *_, p=path: calls.__setitem__(p, calls.get(p, 0) + 1))
    names = resolve_sublayers(pre, kinds=CompareOptions().sublayers)

    def count(**kw: object) -> dict[str, int]:
        calls.clear()
        opts = CompareOptions(**FAST, **kw)  # type: ignore[arg-type]
        batches, n, _, _ = probe_batches(opts, 13, 16)
        run_many(pre, [ft], names, batches, opts, n)
        return dict(calls)

    batches = 4  # 48 images in batches of 12
    none = count(own_change=False)
    assert none == dict.fromkeys(paths, batches)  # the fine-tuned forward only
    assert count(own_kinds=("fc1",))["blocks.0.mlp.fc1"] == 2 * batches
    fc1 = count(own_kinds=("fc1",))
    assert fc1["blocks.0"] == fc1["blocks.0.attn"] == batches  # no block, no attn applied again
    block = count(own_kinds=("block",))
    # the block view runs the whole fine-tuned block (its attn and MLP) a second time
    assert block == dict.fromkeys(paths, 2 * batches)


def test_bad_own_change_choices_are_refused_in_one_line(pair, tmp_path, capsys):
    with pytest.raises(UsageError, match=r"--own-change: 'act' is not among the compared sublayers \(attn, fc1, fc2, block\)"):
        compare_checkpoints(*pair, own_kinds=("act",), **FAST)
    code = main(["compare", *map(str, pair), "--own-change", "fc1", "--no-own-change", "--out", str(tmp_path / "o")])
    assert code == 2
    assert capsys.readouterr().err.strip() == "cka-geo: error: --own-change and --no-own-change: choose one"


def test_seconds_per_stage_are_recorded_and_printed_last(pair, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["compare", *map(str, pair), "--samples", "48", "--batch-size", "12", "--bootstrap", "50",
                 "--out", str(out), "--format", "json", "--progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 0, err
    seconds = json.loads((out / "results.json").read_text())["settings"]["seconds"]
    stages = ("load", "forward", "own_change", "cka", "bootstrap", "figures")
    assert set(seconds) == {*stages, "total", "runs"} and seconds["runs"] == 1
    assert all(seconds[k] > 0 for k in stages)
    assert sum(seconds[k] for k in stages) <= seconds["total"] + 1e-3
    assert err[-2].startswith("cka-geo compare: done in ") and "own change" in err[-2] and "figures" in err[-2]
    no_own = compare_checkpoints(*pair, own_change=False, **FAST)["settings"]["seconds"]
    assert no_own["own_change"] == 0 and no_own["figures"] is None and no_own["forward"] > 0
