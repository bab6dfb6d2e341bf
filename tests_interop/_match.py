"""Compare cka-geo's canonical sublayer outputs with a library model's own module outputs."""

from __future__ import annotations

import torch

from cka_geo.checkpoints import build_model
from cka_geo.features import capture, forward_batch


def library_outputs(model, spec, run):
    """{canonical: tensor} from hooks on ``model``; spec: canonical -> (path, "out"|"in"|"cat:a,b")."""
    got, handles = {}, []
    modules = dict(model.named_modules())

    def out_hook(name):
        def hook(m, args, out):
            got[name] = (out[0] if isinstance(out, tuple) else out).detach()
        return hook

    def in_hook(name):
        def hook(m, args):
            got[name] = args[0].detach()
        return hook

    parts = {}
    for name, (path, how) in spec.items():
        if how == "out":
            handles.append(modules[path].register_forward_hook(out_hook(name)))
        elif how == "in":
            handles.append(modules[path].register_forward_pre_hook(in_hook(name)))
        else:  # "cat": outputs of several modules concatenated on the last dim
            for j, p in enumerate(path):
                handles.append(modules[p].register_forward_hook(out_hook(f"{name}#{j}")))
            parts[name] = len(path)
    try:
        with torch.no_grad():
            run()
    finally:
        for h in handles:
            h.remove()
    for name, n in parts.items():
        got[name] = torch.cat([got.pop(f"{name}#{j}") for j in range(n)], -1)
    return got


def assert_same(loaded, lib_model, spec, x, run, rtol=1e-5, atol=1e-5, seq_first=False):
    """Every canonical sublayer of cka-geo's model equals the library module's output."""
    ours = build_model(loaded)
    names = list(spec)
    with capture(ours, names, pooling="flatten") as cap:
        mine = forward_batch(ours, x, cap).features
    theirs = library_outputs(lib_model, spec, run)
    assert set(names) == set(ours.canonical_sublayers()), "every canonical sublayer is checked"
    for n in names:
        t = theirs[n].transpose(0, 1) if seq_first and theirs[n].shape[0] != x.shape[0] else theirs[n]
        t = t.reshape(x.shape[0], -1).float()
        scale = t.abs().max().item() or 1.0
        torch.testing.assert_close(mine[n], t, rtol=rtol, atol=atol * scale, msg=n)


def canonical_spec(depth, base="blocks.{i}", attn="attn", fc1="mlp.fc1", act=("mlp.act", "out"),
                   fc2="mlp.fc2"):
    spec = {}
    for i in range(depth):
        b = base.format(i=i)
        spec[f"blocks.{i}.attn"] = (f"{b}.{attn}", "out")
        spec[f"blocks.{i}.mlp.fc1"] = ((f"{b}.{fc1}", "out") if isinstance(fc1, str)
                                       else ([f"{b}.{p}" for p in fc1], "cat"))
        spec[f"blocks.{i}.mlp.act"] = (f"{b}.{act[0]}", act[1])
        spec[f"blocks.{i}.mlp.fc2"] = (f"{b}.{fc2}", "out")
        spec[f"blocks.{i}"] = (b, "out")
    return spec
