"""The typed result: records agree with the dict, the dict round-trips, bad dicts are refused."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from cka_geo.checkpoints import save_checkpoint
from cka_geo.compare import compare_checkpoints
from cka_geo.errors import DataError, UsageError
from cka_geo.results import SCHEMA, CompareResult, LayerRecord, load_results
from cka_geo.vit import VisionTransformer, ViTConfig

CFG = ViTConfig(img_size=16, patch_size=4, in_chans=13, embed_dim=32, depth=2, num_heads=2)


@pytest.fixture(scope="module")
def result(tmp_path_factory) -> CompareResult:
    tmp = tmp_path_factory.mktemp("res")
    torch.manual_seed(0)
    model = VisionTransformer(CFG)
    save_checkpoint(tmp / "pre.pt", model, CFG)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    sd["blocks.1.mlp.fc1.weight"] += 0.5 * torch.randn_like(sd["blocks.1.mlp.fc1.weight"])
    save_checkpoint(tmp / "ft.pt", sd, CFG)
    return compare_checkpoints(tmp / "pre.pt", tmp / "ft.pt", samples=40, batch_size=4, bootstrap=100)


def test_the_records_are_the_dict(result):
    assert isinstance(result, dict) and result["schema"] == SCHEMA
    assert result.names == result["layers"]
    for i, rec in enumerate(result.layers):
        assert isinstance(rec, LayerRecord)
        assert rec.cka == result["diagonal"][rec.name] == result["matrix"][i][i]
        assert rec.own == result["own_change"][rec.name]
        assert list(rec.interval) == result["intervals"][rec.name]
        assert rec.kind == result["kinds"][i]
    assert result.layer("blocks.1.mlp.fc1").weight_change > 0
    with pytest.raises(UsageError, match="no layer named"):
        result.layer("blocks.9")


def test_the_json_round_trips_exactly(result, tmp_path):
    path = tmp_path / "results.json"
    path.write_text(json.dumps(result, allow_nan=False))
    back = load_results(path)
    assert back == result and back.to_dict() == result.to_dict()
    assert [r for r in back.layers] == [r for r in result.layers]
    np.testing.assert_array_equal(back.matrix, result.matrix)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d.update(schema="v0"), "schema is 'v0'"),
        (lambda d: d.update(layers=[]), "non-empty list"),
        (lambda d: d["matrix"].pop(), "must have 8 rows"),
        (lambda d: d["diagonal"].update({"blocks.0.attn": "high"}), r"diagonal\['blocks.0.attn'\] is 'high'"),
        (lambda d: d["intervals"].update({"blocks.0.attn": [0.1]}), "expected \\[lo, hi\\]"),
        (lambda d: d["own_change"].update({"blocks.7": 0.5}), "names 'blocks.7'"),
        (lambda d: d["settings"].update(kernel=3), r"settings\['kernel'\] is a int"),
        (lambda d: d.update(model=[1]), "'model' must be an object"),
    ],
)
def test_bad_dicts_are_refused_naming_the_source_and_field(result, mutate, message):
    d = json.loads(json.dumps(result))
    mutate(d)
    with pytest.raises(DataError, match=f"^mine.json: .*{message}"):
        CompareResult.from_dict(d, "mine.json")
