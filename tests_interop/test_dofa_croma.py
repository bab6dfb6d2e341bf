"""torchgeo's DOFA and CROMA (random weights, tiny sizes) saved as torchgeo / TerraTorch /
CROMA's release save them, loaded by cka-geo: every canonical sublayer output equals the
output of torchgeo's own module (forward hooks on torchgeo's model), same input and
wavelengths."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("torchgeo")

from torchgeo.models.croma import CROMA
from torchgeo.models.dofa import DOFA

from cka_geo.checkpoints import build_model, load_checkpoint
from cka_geo.features import capture, sublayer_map
from cka_geo.models.vit import resample_pos_embed

RTOL = 1e-5
KINDS = {"attn": "attn", "mlp.fc1": "fc1", "mlp.act": "act", "mlp.fc2": "fc2"}


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().reshape(b.shape[0], -1), b.double().reshape(b.shape[0], -1)
    return float((a - b).abs().max() / b.abs().max())


def _ours(model, x):
    """Canonical outputs of cka-geo's model, through cka_geo.features.capture (all tokens)."""
    with capture(model, list(sublayer_map(model)), pooling="flatten") as cap:
        model(x)
        return cap.pop()


def _hooked(modules: dict[str, torch.nn.Module], run, pre: dict[str, torch.nn.Module] | None = None):
    """Outputs (or, for ``pre``, first inputs) of torchgeo's modules during ``run()``."""
    got: dict[str, torch.Tensor] = {}
    handles = [m.register_forward_hook(lambda _m, _a, o, n=n: got.__setitem__(n, o)) for n, m in modules.items()]
    handles += [
        m.register_forward_pre_hook(lambda _m, a, n=n: got.__setitem__(n, a[0]))
        for n, m in (pre or {}).items()
    ]
    try:
        with torch.no_grad():
            run()
    finally:
        for h in handles:
            h.remove()
    return got


def _compare(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor], depth: int) -> None:
    assert len(ours) == len(theirs) == 5 * depth
    for name, t in theirs.items():
        err = _relative(ours[name], t)
        assert err < RTOL, f"{name}: relative difference {err:.2e} to torchgeo"


# ------------------------------------------------------------------------------ DOFA

WAVELENGTHS = [0.665, 0.56, 0.49, 0.864]  # B4 B3 B2 B8A, as cka-geo maps those names


def _dofa(img_size=32, state=None):
    torch.manual_seed(0)
    model = DOFA(img_size=img_size, patch_size=8, embed_dim=128, depth=2, num_heads=2, num_classes=5)
    if state is None:
        with torch.no_grad():  # torchgeo leaves the (fixed) pos_embed at zeros: give it content
            model.pos_embed.normal_(std=0.5)
    else:
        model.load_state_dict(state)
    return model.eval()


def _dofa_modules(model):
    mods = {}
    for i, blk in enumerate(model.blocks):
        mods[f"blocks.{i}"] = blk
        for path in KINDS:
            mods[f"blocks.{i}.{path}"] = blk.get_submodule(path)
    return mods


@pytest.mark.parametrize("layout", ["torchgeo", "terratorch"])
def test_dofa_sublayers_equal_torchgeo(tmp_path, layout):
    tg = _dofa()
    sd = tg.state_dict()
    if layout == "torchgeo":  # released weights: the raw state dict
        path = tmp_path / "dofa_base_patch16_224.pth"
        torch.save(sd, path)
    else:  # TerraTorch Lightning fine-tune of DOFAEncoderWrapper
        path = tmp_path / "epoch=3.ckpt"
        torch.save({"state_dict": {f"model.encoder.dofa_model.{k}": v for k, v in sd.items()},
                    "hyper_parameters": {"model_args": {"backbone_model_bands":
                                                        ["RED", "GREEN", "BLUE", "NIR_NARROW"]}}},
                   path)
    loaded = load_checkpoint(path, wavelengths=None if layout == "terratorch" else ["B4", "B3", "B2", "B8A"])
    assert loaded.family == "dofa" and loaded.config.wavelengths == WAVELENGTHS
    assert any(f"used: {WAVELENGTHS}" in n for n in loaded.notes)
    assert set(loaded.state_dict) | {f"head.{k}" for k in ("weight", "bias")} == set(sd)
    ours = build_model(loaded)
    x = torch.randn(2, 4, 32, 32)
    theirs = _hooked(_dofa_modules(tg), lambda: tg.forward_features(x, WAVELENGTHS))
    _compare(_ours(ours, x), theirs, depth=2)


def test_dofa_at_another_size_equals_torchgeo_with_resampled_positions(tmp_path):
    """At 48 px, torchgeo's DOFA (built for 48) gets the position grid cka-geo resamples
    (bicubic, timm's); the generated embedding, padding and blocks are torchgeo's own."""
    tg = _dofa()
    torch.save(tg.state_dict(), tmp_path / "dofa.pth")
    ours = build_model(load_checkpoint(tmp_path / "dofa.pth", wavelengths=WAVELENGTHS))
    state = dict(tg.state_dict())
    state["pos_embed"] = resample_pos_embed(state["pos_embed"], (6, 6), 1)
    big = _dofa(48, state)
    x = torch.randn(2, 4, 48, 48)
    theirs = _hooked(_dofa_modules(big), lambda: big.forward_features(x, WAVELENGTHS))
    _compare(_ours(ours, x), theirs, depth=2)


# ----------------------------------------------------------------------------- CROMA


def _croma(image_size=24):
    torch.manual_seed(1)
    return CROMA(modalities=["sar", "optical"], encoder_dim=32, encoder_depth=2, num_heads=16,
                 image_size=image_size).eval()


def _croma_run(tg, encoder: str, x):
    enc = getattr(tg, encoder)
    layers = enc.transformer.layers
    mods, pre = {}, {}
    for i, (attn, ffn) in enumerate(layers):
        mods[f"blocks.{i}.attn"] = attn
        mods[f"blocks.{i}.mlp.fc1"], mods[f"blocks.{i}.mlp.act"] = ffn.net[0], ffn.net[1]
        mods[f"blocks.{i}.mlp.fc2"] = ffn.net[3]
        # the pair has no forward: block i's output is what enters the next attention
        pre[f"blocks.{i}"] = layers[i + 1][0] if i + 1 < len(layers) else enc.transformer.norm_out
    out = {}
    hooked = _hooked(mods, lambda: out.setdefault("enc", enc(imgs=x, attn_bias=tg.attn_bias)), pre)
    return hooked, out["enc"]


@pytest.mark.parametrize("layout", ["release", "torchgeo"])
def test_croma_optical_sublayers_equal_torchgeo(tmp_path, layout):
    tg = _croma()
    if layout == "release":  # CROMA_base.pt as torchgeo's load_weights reads it: dict of dicts
        obj = {k: getattr(tg, k).state_dict()
               for k in ("s1_encoder", "s1_GAP_FFN", "s2_encoder", "s2_GAP_FFN", "joint_encoder")}
    else:  # a torchgeo CROMA's own state dict (attn_bias beside the encoders)
        obj = tg.state_dict()
    torch.save(obj, tmp_path / "CROMA_base.pt")
    loaded = load_checkpoint(tmp_path / "CROMA_base.pt")
    assert loaded.family == "croma" and loaded.prefix == "s2_encoder."
    assert set(loaded.state_dict) == set(tg.s2_encoder.state_dict())
    if layout == "torchgeo":
        assert loaded.config.img_size == 24 and any("read from attn_bias" in n for n in loaded.notes)
    ours = build_model(loaded)
    x = torch.randn(2, 12, 24, 24)
    theirs, encodings = _croma_run(tg, "s2_encoder", x)
    _compare(_ours(ours, x), theirs, depth=2)
    with torch.no_grad():
        assert _relative(ours(x), encodings) < RTOL


def test_croma_sar_and_another_size_equal_torchgeo(tmp_path):
    tg = _croma()
    torch.save(tg.state_dict(), tmp_path / "croma.pt")
    sar = build_model(load_checkpoint(tmp_path / "croma.pt", prefix="s1_encoder."))
    x = torch.randn(2, 2, 24, 24)
    theirs, _ = _croma_run(tg, "s1_encoder", x)
    _compare(_ours(sar, x), theirs, depth=1)
    # 40 px: torchgeo's CROMA built for 40 px (its ALiBi bias for a 5 x 5 grid), same weights
    big = _croma(40)
    big.load_state_dict({k: v for k, v in tg.state_dict().items() if k != "attn_bias"}, strict=False)
    optical = build_model(load_checkpoint(tmp_path / "croma.pt"))
    x = torch.randn(2, 12, 40, 40)
    theirs, _ = _croma_run(big, "s2_encoder", x)
    _compare(_ours(optical, x), theirs, depth=2)
