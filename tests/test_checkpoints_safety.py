"""Loading never runs pickled code without trust; bad files give one-line errors naming them."""

from __future__ import annotations

import os
import pickle
import random
import shlex
import zipfile

import pytest
import torch

from cka_geo.checkpoints import build_model, load_checkpoint, save_checkpoint
from cka_geo.errors import CheckpointError
from cka_geo.vit import VisionTransformer, ViTConfig

CFG = ViTConfig(img_size=16, patch_size=8, in_chans=6, embed_dim=32, depth=2, num_heads=1)


class TouchOnUnpickle:
    """Unpickling this runs ``os.system('touch <path>')``."""

    def __init__(self, target: str) -> None:
        self.target = target

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(self.target)}",))


class TouchViaPathlib:
    """Unpickling this calls ``pathlib.Path(target).touch()`` through a nested reduce."""

    def __init__(self, target: str) -> None:
        self.target = target

    def __reduce__(self):
        import builtins

        return (builtins.exec, (f"import pathlib; pathlib.Path({self.target!r}).touch()",))


def one_line(exc: pytest.ExceptionInfo, path) -> str:
    msg = str(exc.value)
    assert "\n" not in msg
    assert str(path) in msg
    return msg


@pytest.mark.parametrize("evil", [TouchOnUnpickle, TouchViaPathlib])
def test_malicious_pickle_is_refused_and_runs_nothing(tmp_path, evil):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save(evil(str(marker)), path)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    msg = one_line(info, path)
    assert "refused" in msg and "trust" in msg
    assert ("posix.system" in msg) or ("builtin__.exec" in msg)  # names what blocked the load
    assert not marker.exists()


def test_plain_pickle_file_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    path.write_bytes(pickle.dumps(TouchOnUnpickle(str(marker))))
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    one_line(info, path)
    assert not marker.exists()


def test_weights_beside_malicious_entry_load_without_running_it(tmp_path):
    """Like a Lightning .ckpt whose extras need pickle: tensors are read, the rest is not run."""
    marker = tmp_path / "pwned"
    model = VisionTransformer(CFG).eval()
    path = tmp_path / "mixed.ckpt"
    torch.save({"state_dict": model.state_dict(), "callbacks": TouchOnUnpickle(str(marker))}, path)
    loaded = load_checkpoint(path)
    assert not marker.exists()
    assert any("posix.system" in n and "restricted unpickler" in n for n in loaded.notes)
    assert any("ckpt['callbacks']" in n for n in loaded.notes)
    x = torch.randn(1, 6, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(build_model(loaded)(x), model(x))


def test_trust_loads_the_pickle(tmp_path):
    marker = tmp_path / "pwned"
    model = VisionTransformer(CFG).eval()
    path = tmp_path / "trusted.pt"
    torch.save({"state_dict": model.state_dict(), "cb": TouchOnUnpickle(str(marker))}, path)
    loaded = load_checkpoint(path, trust=True)
    assert marker.exists()  # trust=True did run it: that is what trust means
    assert any("loaded with trust" in n for n in loaded.notes)


def _valid(tmp_path, name="ok.pt"):
    path = tmp_path / name
    save_checkpoint(path, VisionTransformer(CFG), CFG)
    return path


def test_missing_file_directory_empty_and_suffix(tmp_path):
    cases = {
        tmp_path / "missing.pt": "no such checkpoint file",
        tmp_path: "is a directory",
        tmp_path / "weights.npz": "unknown checkpoint suffix",
    }
    (tmp_path / "weights.npz").write_bytes(b"x")
    (tmp_path / "empty.safetensors").write_bytes(b"")
    (tmp_path / "empty.pt").write_bytes(b"")
    cases[tmp_path / "empty.safetensors"] = "empty"
    cases[tmp_path / "empty.pt"] = "empty"
    for path, text in cases.items():
        with pytest.raises(CheckpointError, match=text) as info:
            load_checkpoint(path)
        one_line(info, path)


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_truncated_files(tmp_path, suffix):
    good = _valid(tmp_path, f"good{suffix}")
    data = good.read_bytes()
    for cut in (len(data) // 2, 40, 7):
        bad = tmp_path / f"cut{cut}{suffix}"
        bad.write_bytes(data[:cut])
        with pytest.raises(CheckpointError) as info:
            load_checkpoint(bad)
        one_line(info, bad)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("suffix", [".pth", ".ckpt", ".bin", ".safetensors"])
def test_garbage_files(tmp_path, suffix, seed):
    bad = tmp_path / f"garbage{suffix}"
    bad.write_bytes(random.Random(seed).randbytes(2048))
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(bad)
    one_line(info, bad)


def test_corrupt_zip_member(tmp_path):
    good = _valid(tmp_path)
    bad = tmp_path / "corrupt.pt"
    with zipfile.ZipFile(good) as zin, zipfile.ZipFile(bad, "w") as zout:
        for item in zin.infolist():
            data = zin.read(item.filename)
            if item.filename.endswith("data.pkl"):
                data = data[: len(data) // 3]
            zout.writestr(item, data)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(bad)
    one_line(info, bad)


def test_non_dict_content(tmp_path):
    path = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), path)
    with pytest.raises(CheckpointError, match="not a dict of tensors") as info:
        load_checkpoint(path)
    one_line(info, path)


def test_tar_suffix_other_than_pth_tar_is_unknown(tmp_path):
    path = tmp_path / "weights.tar"
    path.write_bytes(b"x")
    with pytest.raises(CheckpointError, match=r"unknown checkpoint suffix '\.tar'"):
        load_checkpoint(path)


def test_whole_pickled_module_is_read_without_running_it(tmp_path):
    """torch.save(model): the weights are read from the module's state; no class is imported."""
    model = VisionTransformer(CFG).eval()
    path = tmp_path / "whole_model.pt"
    torch.save({"model": model, "hook": TouchOnUnpickle(str(tmp_path / "pwned"))}, path)
    loaded = load_checkpoint(path)
    assert not (tmp_path / "pwned").exists()
    assert loaded.prefix == "model."
    assert any("cka_geo.models.vit.VisionTransformer" in n for n in loaded.notes)
    x = torch.randn(2, 6, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(build_model(loaded)(x), model(x))
