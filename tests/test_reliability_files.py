"""Hostile and broken files fail fast, in one line naming the file, and never as an internal error.

Each hostile file is built here in tmp_path (pickle opcodes, torch.save, safetensors headers
written by hand). For every one: ``load_checkpoint`` raises the right error class with a
one-line message naming the file, within a time and memory budget, before any model is
built; and ``cka-geo compare BAD GOOD`` exits 1 with exactly one ``cka-geo: error:`` line.
"""

from __future__ import annotations

import contextlib
import functools
import json
import pickle
import struct
import time
import tracemalloc
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from cka_geo import walk
from cka_geo.checkpoints import load_checkpoint, save_checkpoint
from cka_geo.checkpoints.limits import MAX_IMG_SIZE
from cka_geo.checkpoints.pickle_scan import max_nesting
from cka_geo.cli import main
from cka_geo.data.folders import load_array_probes
from cka_geo.errors import CheckpointError, DataError
from cka_geo.plotting.results import SCHEMA, validate_results
from cka_geo.vit import VisionTransformer, ViTConfig

CFG = ViTConfig(img_size=16, patch_size=8, in_chans=3, embed_dim=32, depth=2, num_heads=1)
SECONDS = 5.0
PEAK_BYTES = 200 * 2**20


@functools.cache
def _tiny(depth: int) -> dict[str, torch.Tensor]:
    return VisionTransformer(ViTConfig(**{**CFG.to_dict(), "depth": depth})).state_dict()


def tiny_state_dict(depth: int = 2) -> dict[str, torch.Tensor]:
    """The tiny ViT's state dict (a fresh dict; the tensors are shared, never modified)."""
    return dict(_tiny(depth))


@contextlib.contextmanager
def no_model_built():
    """Fail if a real (not 'meta') VisionTransformer is built inside the block."""
    real = VisionTransformer.__init__

    def guarded(self, cfg):
        if torch.empty(0).device.type != "meta":
            raise AssertionError("a model was built for a hostile file")
        real(self, cfg)

    VisionTransformer.__init__ = guarded
    try:
        yield
    finally:
        VisionTransformer.__init__ = real


# ---------------------------------------------------------------- crafting hostile files


def deep_dicts_pickle(n: int) -> bytes:
    """{'a': {'a': … None}} nested n deep, as raw opcodes (pickle.dumps would recurse)."""
    return b"\x80\x02" + b"}X\x01\x00\x00\x00a" * n + b"N" + b"s" * n + b"."


def deep_lists_pickle(n: int) -> bytes:
    """{'w': [[[…]]]} with the list nested n deep."""
    return b"\x80\x02}X\x01\x00\x00\x00w" + b"]" * n + b"a" * (n - 1) + b"s."


def deep_tuple_key_pickle(n: int) -> bytes:
    """{((…(None,)…),): 1}: hashing this key recurses in C; unchecked, it segfaults."""
    return b"\x80\x02}N" + b"\x85" * n + b"K\x01s."


def torch_zip(path: Path, data_pkl: bytes) -> Path:
    """A torch.save zip whose data.pkl is replaced by ``data_pkl``."""
    torch.save({"x": 0}, path)
    with zipfile.ZipFile(path) as zin:
        items = [(info, zin.read(info.filename)) for info in zin.infolist()]
    with zipfile.ZipFile(path, "w") as zout:
        for info, data in items:
            zout.writestr(info, data_pkl if info.filename.endswith("data.pkl") else data)
    return path


def exponential(levels: int, leaf: object) -> dict:
    """d_k = {'a': d_{k-1}, 'b': d_{k-1}}: 2**levels paths, levels + 1 distinct dicts."""
    d = {"a": leaf, "b": leaf}
    for _ in range(levels):
        d = {"a": d, "b": d}
    return d


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def tsave(path: Path, obj: object) -> Path:
    torch.save(obj, path)
    return path


def raw_safetensors(path: Path, header: bytes, data: bytes = b"") -> Path:
    path.write_bytes(struct.pack("<Q", len(header)) + header + data)
    return path


def with_marker(path: Path, marker: str) -> Path:
    """A safetensors file of the tiny ViT whose cka_geo metadata is ``marker``."""
    save_file(tiny_state_dict(), str(path), metadata={"cka_geo": marker})
    return path


def marker_json(**changes: object) -> str:
    """Our own metadata record with config fields changed."""
    return json.dumps({"version": "x", "format": 1, "family": "timm", "config": {**CFG.to_dict(), **changes}})


def pt_project(path: Path, **changes: object) -> Path:
    """A .pt file as save_checkpoint writes it, with config fields changed."""
    obj = {
        "state_dict": tiny_state_dict(),
        "config": {**CFG.to_dict(), **changes},
        "cka_geo": {"version": "x", "format": 1, "family": "timm"},
    }
    torch.save(obj, path)
    return path


def replaced(path: Path, **tensors: torch.Tensor) -> Path:
    """The tiny ViT's raw state dict with some tensors replaced (``__`` in names: ``.``)."""
    sd = tiny_state_dict()
    sd.update({k.replace("__", "."): v for k, v in tensors.items()})
    torch.save(sd, path)
    return path


def pt_config_with_int_key(path: Path) -> Path:
    pt_project(path)
    return tsave(path, {**torch.load(path), "config": {1: 2}})


def self_dict(path: Path) -> Path:
    d: dict = {"state_dict": tiny_state_dict()}
    d["self"] = d
    torch.save(d, path)
    return path


def self_list(path: Path) -> Path:
    items: list = []
    items.append(items)
    torch.save({"state_dict": tiny_state_dict(), "log": items}, path)
    return path


def self_dict_plain_pickle(path: Path) -> Path:
    d: dict = {}
    d["self"] = d
    path.write_bytes(pickle.dumps(d, protocol=2))
    return path


def aliased(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every tensor a view of one 16 KiB buffer (37x its size in all for depth 12)."""
    buffer = torch.zeros(max(v.numel() for v in sd.values()))
    return {k: buffer[: v.numel()].view_as(v) for k, v in sd.items()}


# (name, builder, error class, text the message must contain)
Build = Callable[[Path], Path]
CASES: list[tuple[str, Build, type, str]] = [
    # 1. self-referencing and deeply nested containers
    ("self_dict.pt", self_dict, CheckpointError, "refers to itself"),
    ("self_list.pt", self_list, CheckpointError, "refers to itself"),
    ("self_dict_plain.pth", self_dict_plain_pickle, CheckpointError, "corrupt"),
    ("deep_dicts.pt", lambda p: torch_zip(p, deep_dicts_pickle(100_000)), CheckpointError, "nested deeper than 100 levels"),
    ("deep_lists.pt", lambda p: torch_zip(p, deep_lists_pickle(100_000)), CheckpointError, "nested deeper than 100 levels"),
    ("deep_dicts_raw.pth", lambda p: write(p, deep_dicts_pickle(100_000)), CheckpointError, "nested deeper than 100 levels"),
    ("deep_tuple_key.pt", lambda p: torch_zip(p, deep_tuple_key_pickle(1_000_000)), CheckpointError, "nested deeper than 100 levels"),
    ("deep_tuple_key.bin", lambda p: write(p, deep_tuple_key_pickle(1_000_000)), CheckpointError, "nested deeper than 100 levels"),
    # 2. exponential expansion through shared sub-dicts (60 levels: 2**60 paths)
    ("exponential.pt", lambda p: tsave(p, exponential(60, torch.zeros(2))), CheckpointError, "no ViT blocks found"),
    # 3. safetensors with hostile metadata or headers
    ("meta_deep.safetensors", lambda p: with_marker(p, "[" * 100_000 + "]" * 100_000), CheckpointError, "nested deeper than 100 levels"),
    ("meta_deep_200.safetensors", lambda p: with_marker(p, json.dumps({"config": CFG.to_dict(), "x": json.loads("[" * 200 + "]" * 200)})), CheckpointError, "nested deeper than 100 levels"),
    ("meta_number.safetensors", lambda p: with_marker(p, "5"), CheckpointError, "not a cka-geo record"),
    ("meta_list.safetensors", lambda p: with_marker(p, "[1, 2]"), CheckpointError, "not a cka-geo record"),
    ("meta_invalid.safetensors", lambda p: with_marker(p, '{"config": '), CheckpointError, "not valid JSON"),
    ("meta_long_int.safetensors", lambda p: with_marker(p, '{"config": {"depth": ' + "9" * 5000 + "}}"), CheckpointError, "a number with too many digits"),
    ("config_list.safetensors", lambda p: with_marker(p, json.dumps({"config": [1, 2]})), CheckpointError, "stored config is a list"),
    ("config_depth_str.safetensors", lambda p: with_marker(p, marker_json(depth="abc")), CheckpointError, "stored config depth is 'abc'"),
    ("config_depth_neg.safetensors", lambda p: with_marker(p, marker_json(depth=-3)), CheckpointError, "depth must be a positive integer"),
    ("config_ratio_list.safetensors", lambda p: with_marker(p, marker_json(mlp_ratio=[4])), CheckpointError, "stored config mlp_ratio is a list"),
    ("config_family.safetensors", lambda p: with_marker(p, json.dumps({"family": [1], "config": {}})), CheckpointError, "unknown family"),
    ("config_extra.safetensors", lambda p: with_marker(p, json.dumps({"config": CFG.to_dict(), "extra": [1]})), CheckpointError, "stored extra is a list"),
    ("config_unknown_key.safetensors", lambda p: with_marker(p, marker_json(evil=1)), CheckpointError, "unknown keys"),
    ("header_deep.safetensors", lambda p: raw_safetensors(p, b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"), CheckpointError, "not a readable safetensors file"),
    ("header_invalid.safetensors", lambda p: raw_safetensors(p, b'{"__metadata__": '), CheckpointError, "not a readable safetensors file"),
    ("header_meta_number.safetensors", lambda p: raw_safetensors(p, b'{"__metadata__": {"cka_geo": 5}}'), CheckpointError, "not a readable safetensors file"),
    ("header_huge.safetensors", lambda p: write(p, struct.pack("<Q", 10**12) + b"{}"), CheckpointError, "not a readable safetensors file"),
    ("header_past_end.safetensors", lambda p: write(p, struct.pack("<Q", 50_000_000) + b"{" + b" " * 100), CheckpointError, "not a readable safetensors file"),
    ("tensor_past_end.safetensors", lambda p: raw_safetensors(p, b'{"w": {"dtype": "F32", "shape": [1000000000], "data_offsets": [0, 4000000000]}}', b"\0" * 8), CheckpointError, "not a readable safetensors file"),
    # 4. weights implying absurd shapes (refused naming the key, before any model is built)
    ("pos_non_square.pt", lambda p: replaced(p, pos_embed=torch.zeros(1, 7, 32)), CheckpointError, "pos_embed has 7 patch positions"),
    ("pos_too_big.pt", lambda p: replaced(p, pos_embed=torch.zeros(1, 1 + 1300**2, 1)), CheckpointError, f"more than {MAX_IMG_SIZE} px"),
    ("pos_zero_tokens.pt", lambda p: replaced(p, pos_embed=torch.zeros(1, 0, 32)), CheckpointError, "pos_embed has shape (1, 0, 32)"),
    ("pos_1d.pt", lambda p: replaced(p, pos_embed=torch.zeros(32)), CheckpointError, "pos_embed has shape (32,)"),
    ("pos_expanded.pt", lambda p: replaced(p, pos_embed=torch.zeros(1, 1, 1).expand(1, 1 + 600**2, 32)), CheckpointError, "'pos_embed' (1, 360001, 32) claims"),
    ("patch_zero.pt", lambda p: replaced(p, patch_embed__proj__weight=torch.zeros(32, 3, 0, 0)), CheckpointError, "the patch size (patch_embed.proj.weight dims 2-3) is 0"),
    ("patch_huge.pt", lambda p: replaced(p, patch_embed__proj__weight=torch.zeros(1, 1, 1, 1).expand(32, 3, 4096, 4096)), CheckpointError, "'patch_embed.proj.weight' (32, 3, 4096, 4096) claims"),
    ("patch_2000.pt", lambda p: replaced(p, patch_embed__proj__weight=torch.zeros(1, 3, 2000, 2000)), CheckpointError, "the patch size (patch_embed.proj.weight dims 2-3) is 2000"),
    ("width_zero.pt", lambda p: replaced(p, patch_embed__proj__weight=torch.zeros(0, 3, 8, 8)), CheckpointError, "the width (patch_embed.proj.weight dim 0) is 0"),
    ("fc1_scalar.pt", lambda p: replaced(p, blocks__0__mlp__fc1__weight=torch.zeros(())), CheckpointError, "blocks.0.mlp.fc1.weight has unexpected shape ()"),
    ("depth_zero.pt", lambda p: tsave(p, {k: v for k, v in tiny_state_dict().items() if not k.startswith("blocks.")}), CheckpointError, "no ViT blocks found"),
    ("block_index_huge.pt", lambda p: replaced(p, blocks__999999999__mlp__fc1__weight=torch.zeros(2, 2)), CheckpointError, "block index 999999999"),
    ("block_index_digits.pt", lambda p: replaced(p, **{"blocks__" + "9" * 5000 + "__mlp__fc1__weight": torch.zeros(2, 2)}), CheckpointError, "does not know"),
    ("aliased.pt", lambda p: tsave(p, aliased(tiny_state_dict(depth=12))), CheckpointError, "aliasing one another"),
    # 5. our own saved config with absurd or wrong-typed values
    ("pt_img_huge.pt", lambda p: pt_project(p, img_size=10**9), CheckpointError, "stored config img_size is 1000000000"),
    ("pt_heads.pt", lambda p: pt_project(p, num_heads=5), CheckpointError, "not divisible by num_heads 5"),
    ("pt_depth_neg.pt", lambda p: pt_project(p, depth=-3), CheckpointError, "depth must be a positive integer"),
    ("pt_eps_str.pt", lambda p: pt_project(p, norm_eps="tiny"), CheckpointError, "stored config norm_eps is 'tiny'"),
    ("pt_int_key.pt", pt_config_with_int_key, CheckpointError, "unknown keys"),
    ("safetensors_img_huge.safetensors", lambda p: with_marker(p, marker_json(img_size=10**9)), CheckpointError, "stored config img_size is 1000000000"),
    ("safetensors_heads.safetensors", lambda p: with_marker(p, marker_json(num_heads=7)), CheckpointError, "not divisible by num_heads 7"),
]


@pytest.fixture(scope="module", autouse=True)
def warm(tmp_path_factory):
    """Pay the one-time costs (imports, the first 'meta' model) outside the timed calls."""
    good = save_checkpoint(tmp_path_factory.mktemp("warm") / "good.pt", tiny_state_dict(), CFG)
    load_checkpoint(good)


def one_line(message: str, path: Path) -> None:
    assert "\n" not in message, message
    assert str(path) in message, message
    assert len(message) < 600, message


@pytest.mark.parametrize(("name", "build", "error", "text"), CASES, ids=[c[0] for c in CASES])
def test_hostile_checkpoint_is_refused_fast_in_one_line(tmp_path, monkeypatch, capsys, name, build, error, text):
    path = build(tmp_path / name)
    tracemalloc.start()
    start = time.perf_counter()
    try:
        with pytest.raises(error) as info, no_model_built():
            load_checkpoint(path)
        elapsed = time.perf_counter() - start
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    message = str(info.value)
    one_line(message, path)
    assert text in message
    assert elapsed < SECONDS, f"{elapsed:.1f} s"
    assert peak < PEAK_BYTES, f"{peak / 2**20:.0f} MiB"

    good = save_checkpoint(tmp_path / "good.safetensors", tiny_state_dict(), CFG)
    monkeypatch.chdir(tmp_path)
    with no_model_built():
        code = main(["compare", str(path), str(good), "--no-figures", "-q"])
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 1
    assert len(lines) == 1 and lines[0].startswith("cka-geo: error:"), err
    assert "internal error" not in err and str(path) in err


def test_shared_sub_dicts_are_read_once_beside_a_real_encoder(tmp_path):
    """2**60 paths through memo-shared dicts beside a state dict: loads, fast and small."""
    path = tmp_path / "ckpt.pt"
    torch.save({"state_dict": tiny_state_dict(), "log": exponential(60, torch.zeros(2))}, path)
    tracemalloc.start()
    start = time.perf_counter()
    try:
        loaded = load_checkpoint(path)
        elapsed = time.perf_counter() - start
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert loaded.prefix == "state_dict."
    assert elapsed < SECONDS and peak < PEAK_BYTES
    assert len(loaded.ignored) == 2  # the two leaf tensors, once each


def test_node_budget_is_a_one_line_refusal(tmp_path, monkeypatch):
    monkeypatch.setattr(walk, "MAX_NODES", 1_000)
    path = tmp_path / "wide.pt"
    torch.save({"state_dict": tiny_state_dict(), "log": {str(i): i for i in range(2_000)}}, path)
    with pytest.raises(CheckpointError, match="more than 1000 nested entries") as info:
        load_checkpoint(path)
    one_line(str(info.value), path)


def test_sequences_of_scalars_do_not_count_against_the_budget(tmp_path, monkeypatch):
    monkeypatch.setattr(walk, "MAX_NODES", 1_000)
    path = tmp_path / "losses.pt"
    torch.save({"state_dict": tiny_state_dict(), "losses": [0.5] * 5_000}, path)
    assert load_checkpoint(path).prefix == "state_dict."


def test_tied_weights_are_still_loaded(tmp_path):
    sd = tiny_state_dict()
    sd["blocks.1.mlp.fc2.weight"] = sd["blocks.0.mlp.fc2.weight"]
    path = tmp_path / "tied.pt"
    torch.save(sd, path)
    assert load_checkpoint(path).config.depth == 2


def test_walker_bounds():
    d: dict = {}
    d["me"] = d
    with pytest.raises(DataError, match=r"refers to itself: ckpt\['me'\] contains itself"):
        walk.check_nesting(d)
    deep: object = None
    for _ in range(101):
        deep = [deep]
    with pytest.raises(DataError, match="nested deeper than 100 levels"):
        walk.check_nesting(deep)
    walk.check_nesting(deep[0])  # exactly 100 levels: fine
    shared = exponential(60, 0)
    assert sum(1 for _ in walk.walk(shared)) == 2 * 61  # each dict entered once


def reference_depth(x: object) -> int:
    """Nesting depth by recursion: 0 for scalars and empty containers."""
    if isinstance(x, dict):
        items = [*x.keys(), *x.values()]
    elif isinstance(x, (list, tuple)):
        items = list(x)
    else:
        return 0
    return 1 + max(map(reference_depth, items)) if items else 0


TREES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=3),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.lists(inner, max_size=5).map(tuple)
        | st.dictionaries(st.text(max_size=3), inner, max_size=4)
    ),
    max_leaves=30,
)


@settings(max_examples=150, deadline=None)
@given(tree=TREES, protocol=st.integers(0, pickle.HIGHEST_PROTOCOL))
def test_pickle_scan_depth_matches_the_object(tree, protocol):
    data = pickle.dumps(tree, protocol=protocol)
    assert max_nesting(data, 0, 10**6) == (reference_depth(tree), len(data))


def test_nesting_within_the_limit_still_loads(tmp_path):
    nested: object = 1
    for _ in range(90):
        nested = {"k": nested}
    path = tsave(tmp_path / "ok.pt", {"state_dict": tiny_state_dict(), "cfg": nested})
    assert load_checkpoint(path).prefix == "state_dict."
    for _ in range(60):
        nested = [nested]
    path = tsave(tmp_path / "deep.pt", {"state_dict": tiny_state_dict(), "cfg": nested})
    with pytest.raises(CheckpointError, match="nested deeper than 100 levels"):
        load_checkpoint(path)


@pytest.mark.parametrize(
    ("name", "build", "text"),
    [
        ("tuple_key.pt", lambda p: torch_zip(p, deep_tuple_key_pickle(1_000_000)), "nested deeper than 100 levels"),
        ("expanded.pt", lambda p: tsave(p, torch.zeros(1, 1, 1, 1).expand(10**5, 3, 512, 512)), "claims more data than it holds"),
    ],
)
def test_hostile_probe_array_through_compare(tmp_path, monkeypatch, capsys, name, build, text):
    bad = build(tmp_path / name)
    with pytest.raises(DataError, match=text) as info:
        load_array_probes(bad)
    one_line(str(info.value), bad)
    good = save_checkpoint(tmp_path / "good.safetensors", tiny_state_dict(), CFG)
    monkeypatch.chdir(tmp_path)
    code = main(["compare", str(good), str(good), "--data", str(bad), "--no-figures", "-q"])
    err = capsys.readouterr().err
    assert code == 1 and err.startswith("cka-geo: error:") and err.count("\n") == 1, err
    assert "internal error" not in err and str(bad) in err


# ---------------------------------------------------------------- results.json for `plot`


def results(**changes: object) -> dict:
    base = {
        "schema": SCHEMA,
        "layers": ["blocks.0.attn", "blocks.0"],
        "matrix": [[1.0, 0.5], [0.5, 1.0]],
        "settings": {"kernel": "rbf", "rbf_frac": 1.0, "confidence": 0.95, "samples": 8},
        "summary": {"identical": False},
    }
    base.update(changes)
    return base


RESULTS_CASES: list[tuple[str, str | bytes, str]] = [
    ("deep", "[" * 100_000 + "]" * 100_000, "nested deeper than 100 levels"),
    ("deep_200", json.dumps(results(extra=json.loads("[" * 200 + "]" * 200))), "nested deeper than 100 levels"),
    ("not_object", "[1, 2, 3]", "expected a JSON object"),
    ("invalid", '{"schema": ', "invalid JSON"),
    ("not_utf8", b"\xff\xfe{}", "not a UTF-8 JSON file"),
    ("no_layers", json.dumps({k: v for k, v in results().items() if k != "layers"}), "'layers' must be a non-empty list"),
    ("no_matrix", json.dumps({k: v for k, v in results().items() if k != "matrix"}), "'matrix' must have 2 rows"),
    ("matrix_str", json.dumps(results(matrix=[[1.0, "x"], [0.5, 1.0]])), "matrix[0][1] is 'x'"),
    ("matrix_long_int", json.dumps(results()).replace("0.5", "1" + "0" * 400, 1), "too large for a float"),
    ("number_digits", json.dumps(results()).replace("0.5", "9" * 5000, 1), "unreadable JSON"),
    ("rbf_frac_str", json.dumps(results(settings={"kernel": "rbf", "rbf_frac": "wide"})), "settings['rbf_frac'] is a str"),
    ("kernel_list", json.dumps(results(settings={"kernel": ["rbf"]})), "settings['kernel'] is a list"),
    ("samples_float", json.dumps(results(settings={"samples": 1.5})), "settings['samples'] is a float"),
    ("settings_list", json.dumps(results(settings=[1])), "'settings' must be an object"),
    ("summary_str", json.dumps(results(summary="ok")), "'summary' must be an object"),
    ("identical_str", json.dumps(results(summary={"identical": "yes"})), "summary['identical'] is a str"),
    ("duplicate_layers", json.dumps(results(layers=["blocks.0", "blocks.0"])), "appears twice"),
]


def test_the_base_results_are_valid():
    validate_results(results())


@pytest.mark.parametrize(("name", "text", "expected"), RESULTS_CASES, ids=[c[0] for c in RESULTS_CASES])
def test_hostile_results_json_through_plot(tmp_path, capsys, name, text, expected):
    path = tmp_path / f"{name}.json"
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    start = time.perf_counter()
    code = main(["plot", str(path), "--out", str(tmp_path / "figs")])
    assert time.perf_counter() - start < SECONDS
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 1
    assert len(lines) == 1 and lines[0].startswith("cka-geo: error:"), err
    assert "internal error" not in err and str(path) in err and expected in err
    assert not (tmp_path / "figs").exists()


def test_results_json_larger_than_the_cap(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(walk, "MAX_JSON_CHARS", 1_000)
    path = tmp_path / "big.json"
    path.write_text(json.dumps(results(padding="x" * 2_000)), encoding="utf-8")
    assert main(["plot", str(path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("cka-geo: error:") and "more than 1000" in err
