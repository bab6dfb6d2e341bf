"""Hyperparameters the weights do not reveal: stored > known family > assumed (with a warning).

The weights of a ViT give its depth, width, bands, patch size, MLP width and which optional
parts it has, but not its number of attention heads, its LayerNorm epsilon, its activation,
or (for a position embedding whose token count is ambiguous) its image size. Each of these
is taken, first rule that applies:

1. given by the caller (``load_checkpoint(num_heads=…)``, CLI ``--num-heads``);
2. stored in the file (Hugging Face ``config.json``, Lightning ``hyper_parameters``,
   TerraTorch model args, open_clip configs, cka-geo's own metadata);
3. a fact of the recognised family, from :data:`KNOWN` (each with its source);
4. assumed: a ``RuntimeWarning`` says what was assumed and how to override it, and the
   assumption is recorded in ``LoadedCheckpoint.assumed``.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

#: Facts per family: field -> (value, source). ``num_heads`` may be a {width: heads} table.
KNOWN: dict[str, dict[str, tuple[Any, str]]] = {
    "timm": {
        "norm_eps": (1e-6, "timm vision_transformer.py: norm_layer = LayerNorm(eps=1e-6)"),
        "act": ("gelu", "timm vision_transformer.py: act_layer = nn.GELU"),
        "act_glu": ("silu", "timm SwiGLUPacked / SwiGLU: act_layer = nn.SiLU"),
    },
    "dinov2": {
        "norm_eps": (1e-6, "facebookresearch/dinov2 vision_transformer.py: LayerNorm(eps=1e-6)"),
        "num_heads": (
            {384: 6, 768: 12, 1024: 16, 1536: 24},
            "facebookresearch/dinov2 vit_small/base/large/giant2 (6/12/16/24 heads)",
        ),
    },
    "prithvi": {
        "norm_eps": (1e-5, "terratorch prithvi_mae.py: norm_layer = nn.LayerNorm (eps 1e-5)"),
        "num_heads": (
            {192: 3, 256: 4, 768: 12, 1024: 16, 1280: 16},
            "terratorch prithvi_vit.py prithvi_cfgs (v2_tiny 3, tiny 4, 100 12, 300 16, 600 16 heads)",
        ),
    },
    "terramind": {
        "norm_eps": (1e-6, "terratorch terramind.py: norm_layer = LayerNorm(eps=1e-6)"),
        "num_heads": ({384: 6, 768: 12, 1024: 16}, "terratorch terramind_register.py (tiny/small 6, base 12, large 16)"),
    },
    "open_clip": {
        "norm_eps": (1e-5, "open_clip transformer.py: LayerNorm (torch default eps 1e-5)"),
    },
}

#: How a user overrides each assumption.
OVERRIDE = {
    "num_heads": "--num-heads / load_checkpoint(num_heads=…)",
    "norm_eps": "--norm-eps / load_checkpoint(norm_eps=…)",
    "act": "--act / load_checkpoint(act=…)",
    "img_size": "load_checkpoint(img_size=(h, w))",
}


@dataclass
class Hparams:
    """What is known about the hyperparameters of one file.

    Attributes:
        given: Values the caller gave (field -> value).
        stored: Values the file stores (field -> (value, where)).
        family: The recognised family (a key of :data:`KNOWN`), for its facts.
        notes: Where the loader's notes go.
        assumed: ``"field=value"`` for every assumption made.
    """

    given: dict[str, Any] = field(default_factory=dict)
    stored: dict[str, tuple[Any, str]] = field(default_factory=dict)
    family: str = "timm"
    notes: list[str] = field(default_factory=list)
    assumed: list[str] = field(default_factory=list)
    _pending: list[str] = field(default_factory=list)

    def pick(self, name: str, default: Any, why: str, *, width: int | None = None, fact: str | None = None) -> Any:
        """The value of ``name`` by the rules of this module (a note for each); ``fact``
        names the entry of :data:`KNOWN` to use (default ``name``)."""
        if self.given.get(name) is not None:
            value = self.given[name]
            stored = self.stored.get(name)
            told = f" (file says {stored[0]})" if stored and stored[0] != value else ""
            self.notes.append(f"{name}={_show(value)} as given{told}")
            return value
        if name in self.stored:
            value, where = self.stored[name]
            self.notes.append(f"{name}={_show(value)} read from {where}")
            return value
        key = fact or name
        known = KNOWN.get(self.family, {}).get(key)
        if known is None and self.family != "open_clip":
            known = KNOWN["timm"].get(key)
        if known is not None:
            value, source = known
            if isinstance(value, dict):
                value = value.get(width) if width is not None else None
            if value is not None:
                self.notes.append(f"{name}={_show(value)} ({self.family} fact: {source})")
                return value
        self.notes.append(
            f"{name}={_show(default)} assumed ({why}; weights do not record it): "
            f"pass {OVERRIDE.get(name, name)} if the model used another"
        )
        self.assumed.append(f"{name}={_show(default)}")
        self._pending.append(f"{name}={_show(default)} ({why}; override: {OVERRIDE.get(name, name)})")
        return default

    def warn(self, path: Any) -> None:
        """One RuntimeWarning listing the assumptions made (none: nothing)."""
        if self._pending:
            warnings.warn(
                f"{path}: assumed {'; '.join(self._pending)}",
                RuntimeWarning,
                stacklevel=3,
            )
            self._pending.clear()


def _show(value: Any) -> str:
    return "x".join(str(v) for v in value) if isinstance(value, tuple) else str(value)


#: Names under which files store each field (Lightning hyper_parameters, TerraTorch, timm).
STORED_NAMES: dict[str, tuple[str, ...]] = {
    "num_heads": ("num_heads", "heads", "n_heads", "num_attention_heads"),
    "norm_eps": ("norm_eps", "layer_norm_eps", "ln_eps"),
    "act": ("act", "hidden_act", "act_layer"),
    "img_size": ("img_size", "image_size", "input_size"),
}
