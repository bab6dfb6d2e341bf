"""open_clip visual towers (a CLIP state dict, .pt / .safetensors) run as open_clip runs them."""

from __future__ import annotations

import pytest
import torch
from _match import assert_same, canonical_spec
from conftest import need

from cka_geo.checkpoints import load_checkpoint
from cka_geo.checkpoints.memory import load_model


def tower(quick_gelu=False, ls=None):
    oc = need("open_clip")
    from open_clip.transformer import QuickGELU

    kw = {"act_layer": QuickGELU} if quick_gelu else {}
    model = oc.model.VisionTransformer(image_size=32, patch_size=8, width=48, layers=2, heads=3, mlp_ratio=2.0,
                                       output_dim=16, ls_init_value=ls, **kw).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


SPEC = canonical_spec(2, base="transformer.resblocks.{i}", attn="attn", fc1="mlp.c_fc",
                      act=("mlp.gelu", "out"), fc2="mlp.c_proj")


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
@pytest.mark.parametrize(("quick", "ls"), [(False, None), (True, 0.5)])
def test_clip_state_dict(tmp_path, suffix, quick, ls):
    model = tower(quick, ls)
    sd = {f"visual.{k}": v.contiguous() for k, v in model.state_dict().items()}
    sd["logit_scale"] = torch.tensor(4.6)
    path = tmp_path / f"clip{suffix}"
    if suffix == ".pt":
        torch.save(sd, path)
    else:
        from safetensors.torch import save_file

        save_file(sd, str(path))
    loaded = load_checkpoint(path, num_heads=3, act="quick_gelu" if quick else "gelu")
    assert loaded.source == "open_clip" and "visual.proj" in loaded.ignored
    x = torch.randn(2, 3, 32, 32)
    assert_same(loaded, model, SPEC, x, lambda: model(x), seq_first=not model.transformer.batch_first)


def test_in_memory_tower_states_its_heads_and_activation():
    model = tower(quick_gelu=True)
    loaded = load_model(model)  # heads, eps and QuickGELU read from the live modules
    assert (loaded.config.num_heads, loaded.config.act, loaded.assumed) == (3, "quick_gelu", [])
    x = torch.randn(2, 3, 32, 32)
    assert_same(loaded, model, SPEC, x, lambda: model(x), seq_first=not model.transformer.batch_first)


def test_full_file_without_config_warns_about_the_activation(tmp_path):
    model = tower()
    torch.save({f"visual.{k}": v for k, v in model.state_dict().items()}, tmp_path / "c.pt")
    with pytest.warns(RuntimeWarning, match=r"act=gelu .*load_checkpoint\(act="):
        loaded = load_checkpoint(tmp_path / "c.pt", num_heads=3)
    assert loaded.assumed == ["act=gelu"]
