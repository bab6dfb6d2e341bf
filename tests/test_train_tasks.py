"""Task heads, adaptation modes and stratified label fractions."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from _train_helpers import cls_tiles, seg_tiles, tiny_vit
from cka_geo.errors import UsageError
from cka_geo.train import TrainConfig, fit
from cka_geo.train.tasks import TaskModel, label_strata, set_adaptation, stratified_indices


def _enc_state(model):
    return {k: v.clone() for k, v in model.encoder.state_dict().items()}


@pytest.mark.parametrize("decoder", ["linear", "upernet"])
def test_frozen_encoder_is_bit_identical(decoder):
    model = TaskModel(tiny_vit(depth=4), "segmentation", 2, decoder=decoder, decoder_channels=16)
    before = _enc_state(model)
    head_before = {k: v.clone() for k, v in model.head_state().items()}
    set_adaptation(model, "frozen")
    fit(model, seg_tiles(16, seed=1), TrainConfig(epochs=2, batch_size=8, lr=1e-2))
    for k, v in model.encoder.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert any(not torch.equal(v, head_before[k]) for k, v in model.head_state().items())


def test_last_k_changes_only_the_last_k_blocks():
    model = TaskModel(tiny_vit(depth=4), "classification", 3)
    before = _enc_state(model)
    names = set_adaptation(model, "last-k", last_k=2)
    assert names and all(n.startswith(("blocks.2.", "blocks.3.")) for n in names)
    fit(model, cls_tiles(24, seed=2), TrainConfig(epochs=2, batch_size=8, lr=1e-2))
    for k, v in model.encoder.state_dict().items():
        same = torch.equal(v, before[k])
        if k.startswith(("blocks.2.", "blocks.3.")):
            if k.endswith("weight") and "norm" not in k:
                assert not same, k
        else:
            assert same, k


def test_full_changes_everything_and_bad_modes():
    model = TaskModel(tiny_vit(depth=2), "regression", 1)
    set_adaptation(model, "full")
    before = _enc_state(model)
    data = cls_tiles(16, seed=3)
    data = torch.utils.data.TensorDataset(data.tensors[0], data.tensors[1].float())
    fit(model, data, TrainConfig(epochs=1, batch_size=8, lr=1e-2))
    assert not torch.equal(model.encoder.patch_embed.proj.weight, before["patch_embed.proj.weight"])
    assert not torch.equal(model.encoder.blocks[0].mlp.fc1.weight, before["blocks.0.mlp.fc1.weight"])
    with pytest.raises(UsageError, match="last-k"):
        set_adaptation(model, "last-k", last_k=5)
    with pytest.raises(UsageError, match="adaptation"):
        set_adaptation(model, "lora")


def test_head_keys_are_prefixed_and_encoder_keys_timm():
    model = TaskModel(tiny_vit(depth=2), "segmentation", 2, decoder="upernet", decoder_channels=16)
    assert all(k.startswith("head.") for k in model.head_state())
    assert set(model.encoder.state_dict()) == set(tiny_vit(depth=2).state_dict())


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.integers(0, 4), min_size=1, max_size=200),
    st.floats(0.01, 1.0),
    st.integers(0, 2**31 - 1),
)
def test_stratified_fraction_keeps_proportions_within_rounding(labels, fraction, seed):
    labels = np.array(labels)
    idx = stratified_indices(labels, fraction, seed)
    assert len(np.unique(idx)) == len(idx) and np.all(np.diff(idx) > 0)
    for c in np.unique(labels):
        n_c = int(np.sum(labels == c))
        k_c = int(np.sum(labels[idx] == c))
        assert k_c == max(1, int(np.floor(fraction * n_c + 0.5)))
        assert abs(k_c - fraction * n_c) <= 0.5 or k_c == 1
    assert np.array_equal(idx, stratified_indices(labels, fraction, seed))


def test_stratified_seeds_differ_and_bad_fraction():
    labels = np.repeat(np.arange(4), 50)
    a = stratified_indices(labels, 0.1, 0)
    b = stratified_indices(labels, 0.1, 1)
    assert len(a) == len(b) == 20 and not np.array_equal(a, b)
    for c in range(4):
        assert np.sum(labels[a] == c) == 5
    for bad in (0.0, 1.5, float("nan")):
        with pytest.raises(UsageError, match="label-fraction"):
            stratified_indices(labels, bad, 0)


def test_label_strata_per_task():
    masks = np.zeros((4, 2, 2), dtype=np.int64)
    masks[1, 0, 0] = 1  # rare class present
    masks[2] = -1
    masks[3, 0, 0] = 1
    assert label_strata(masks, "segmentation").tolist() == [0, 1, -1, 1]
    reg = label_strata(np.arange(10.0), "regression", bins=5)
    assert np.bincount(reg).tolist() == [2, 2, 2, 2, 2]
    assert label_strata(np.array([2, 0, 1]), "classification").tolist() == [2, 0, 1]
