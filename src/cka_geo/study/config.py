"""The study's TOML config: parsed with :mod:`tomllib`, validated, one-line errors naming the key.

A config names the grid's axes (encoders, tasks, label fractions, decoders, adaptation
modes, seeds) and the settings every cell shares (``[train]``, ``[compare]``, ``[probe]``);
docs/study.md documents each key. Paths (encoder checkpoints, task data) are taken relative
to the config file's folder.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cka_geo.errors import UsageError

BUILTINS = ("mae", "simclr", "random")
"""``builtin:NAME`` encoders the study makes itself on the embedded tiles (random: no training)."""

TASKS = ("segmentation", "classification", "regression", "multilabel")  # multilabel: user data only
DECODERS = ("linear", "upernet", "progressive")
PROBE_TASKS = ("classification", "regression")
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_ADAPT_RE = re.compile(r"full|frozen|last-([1-9][0-9]*)")

_TOP = {"study", "train", "compare", "probe", "encoders", "tasks"}
_STUDY = {"name": "", "seeds": [0], "label_fractions": [1.0], "decoders": ["linear"], "adaptations": ["full"]}
_TRAIN = {"epochs": 10, "batch_size": 32, "lr": 1e-3, "weight_decay": 0.05, "warmup_steps": 20,
          "decoder_channels": 32, "stride": 0}
_COMPARE = {"samples": 512, "batch_size": 32, "bootstrap": 200, "sublayers": ["attn", "fc1", "fc2", "block"]}
_PROBE = {"enabled": True, "task": "classification", "sublayers": ["block"], "cv_folds": 5, "batch_size": 64}
_BUILTIN = {"img_size": 32, "patch_size": 4, "bands": 13, "embed_dim": 64, "depth": 12, "heads": 2,
            "epochs": 30, "batch_size": 64, "lr": 1.5e-3, "stride": 0, "seed": 0}
_ENCODER = {"checkpoint", "trust", "image_size", "finetune_lr", *_BUILTIN}
_TASK = {"task", "data", "layout"}


@dataclass(frozen=True)
class EncoderSpec:
    """One encoder of the grid.

    Attributes:
        name: Its name in cell ids and tables.
        checkpoint: A file path (any format compare reads) or ``builtin:mae|simclr|random``.
        builtin: The builtin's settings (architecture, pretraining epochs, seed), else None.
        trust: Allow pickled code in the checkpoint file.
        image_size: A checkpoint file's image size on the embedded tiles (its position
            embedding resampled by its family's rule), else None: its own size.
        finetune_lr: This encoder's cells' fine-tune learning rate, else None: ``train.lr``.
    """

    name: str
    checkpoint: str
    builtin: dict[str, Any] | None = None
    trust: bool = False
    image_size: int | None = None
    finetune_lr: float | None = None

    @property
    def kind(self) -> str | None:
        """The builtin's name (``mae``...), or None for a checkpoint file."""
        return self.checkpoint.removeprefix("builtin:") if self.builtin is not None else None


@dataclass(frozen=True)
class TaskSpec:
    """One task: the embedded tiles' labels, or (``data``) a user dataset with its ``layout``."""

    name: str
    task: str
    data: str | None = None
    layout: str | None = None


@dataclass
class StudyConfig:
    """A parsed, validated study config (see docs/study.md)."""

    path: Path
    name: str
    encoders: list[EncoderSpec]
    tasks: list[TaskSpec]
    label_fractions: list[float]
    decoders: list[str]
    adaptations: list[str]
    seeds: list[int]
    train: dict[str, Any] = field(default_factory=dict)
    compare: dict[str, Any] = field(default_factory=dict)
    probe: dict[str, Any] = field(default_factory=dict)


class _Checker:
    def __init__(self, path: Path) -> None:
        self.path = path

    def fail(self, key: str, what: str) -> UsageError:
        return UsageError(f"{self.path}: {key}: {what}")

    def table(self, value: Any, key: str, known: set[str] | None) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.fail(key, f"expected a table, got {type(value).__name__}")
        if known is not None:
            for k in value:
                if k not in known:
                    raise self.fail(f"{key}.{k}" if key else k, f"unknown key (known: {', '.join(sorted(known))})")
        return value

    def integer(self, v: Any, key: str, lo: int = 1, hi: int = 2**32 - 1) -> int:
        if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
            raise self.fail(key, f"expected an integer in [{lo}, {hi}], got {v!r}")
        return v

    def number(self, v: Any, key: str, lo: float = 0.0, strict: bool = True, hi: float = math.inf) -> float:
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        if not ok or not ((v > lo) if strict else (v >= lo)) or v > hi:
            rng = f"{'(' if strict else '['}{lo:g}, {hi:g}]"
            raise self.fail(key, f"expected a number in {rng}, got {v!r}")
        return float(v)

    def string(self, v: Any, key: str, choices: tuple[str, ...] | None = None) -> str:
        if not isinstance(v, str) or not v:
            raise self.fail(key, f"expected a non-empty string, got {v!r}")
        if choices is not None and v not in choices:
            raise self.fail(key, f"{v!r} is not one of {', '.join(choices)}")
        return v

    def name(self, v: str, key: str) -> str:
        if not _NAME_RE.fullmatch(v):
            raise self.fail(key, f"name {v!r} must be letters, digits, '_', '.' or '-' (at most 64)")
        return v

    def items(self, v: Any, key: str) -> list[Any]:
        if not isinstance(v, list) or not v:
            raise self.fail(key, f"expected a non-empty list, got {v!r}")
        if len(set(map(repr, v))) != len(v):
            raise self.fail(key, f"holds a value twice: {v!r}")
        return v


def _merged(c: _Checker, raw: Any, key: str, defaults: dict[str, Any]) -> dict[str, Any]:
    return {**defaults, **c.table(raw if raw is not None else {}, key, set(defaults))}


def parse_config(text: str, path: str | Path = "study.toml") -> StudyConfig:
    """Parse and validate a study config given as TOML text.

    Raises:
        UsageError: Invalid TOML, an unknown key, a value of the wrong type or range, or an
            empty axis; the message is one line naming the file and the key.
    """
    import tomllib

    p = Path(path)
    c = _Checker(p)
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"{p}: not valid TOML ({exc})") from None
    c.table(raw, "", _TOP)
    for key in ("encoders", "tasks"):
        if key not in raw:
            raise c.fail(key, "missing: the study needs at least one")
    study = _merged(c, raw.get("study"), "study", _STUDY)
    name = c.name(study["name"], "study.name") if study["name"] else p.stem
    seeds = [c.integer(s, f"study.seeds[{i}]", 0) for i, s in enumerate(c.items(study["seeds"], "study.seeds"))]
    fracs = [c.number(f, f"study.label_fractions[{i}]", 0.0, True, 1.0)
             for i, f in enumerate(c.items(study["label_fractions"], "study.label_fractions"))]
    decoders = [c.string(d, f"study.decoders[{i}]", DECODERS) for i, d in enumerate(c.items(study["decoders"], "study.decoders"))]
    adapts = []
    for i, a in enumerate(c.items(study["adaptations"], "study.adaptations")):
        if not isinstance(a, str) or not _ADAPT_RE.fullmatch(a):
            raise c.fail(f"study.adaptations[{i}]", f"{a!r} is not full, frozen or last-K (K >= 1 blocks)")
        adapts.append(a)
    train = _merged(c, raw.get("train"), "train", _TRAIN)
    for k in ("epochs", "batch_size", "decoder_channels"):
        c.integer(train[k], f"train.{k}")
    c.integer(train["warmup_steps"], "train.warmup_steps", 0)
    c.integer(train["stride"], "train.stride", 0)
    c.number(train["lr"], "train.lr")
    c.number(train["weight_decay"], "train.weight_decay", strict=False)
    compare = _merged(c, raw.get("compare"), "compare", _COMPARE)
    c.integer(compare["samples"], "compare.samples", 8)
    c.integer(compare["batch_size"], "compare.batch_size", 4)
    c.integer(compare["bootstrap"], "compare.bootstrap", 0)
    _kinds(c, compare["sublayers"], "compare.sublayers")
    probe = _merged(c, raw.get("probe"), "probe", _PROBE)
    if not isinstance(probe["enabled"], bool):
        raise c.fail("probe.enabled", f"expected true or false, got {probe['enabled']!r}")
    c.string(probe["task"], "probe.task", PROBE_TASKS)
    _kinds(c, probe["sublayers"], "probe.sublayers")
    c.integer(probe["cv_folds"], "probe.cv_folds", 2)
    c.integer(probe["batch_size"], "probe.batch_size")
    encoders = [_encoder(c, n, e, p.parent) for n, e in c.table(raw["encoders"], "encoders", None).items()]
    tasks = [_task(c, n, t, p.parent) for n, t in c.table(raw["tasks"], "tasks", None).items()]
    if not encoders or not tasks:
        raise c.fail("encoders" if not encoders else "tasks", "empty: the study needs at least one")
    return StudyConfig(p, name, encoders, tasks, fracs, decoders, adapts, seeds, train, compare, probe)


def load_config(path: str | Path) -> StudyConfig:
    """Read and validate the study config file at ``path`` (see :func:`parse_config`)."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UsageError(f"{p}: no such config file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"{p}: cannot read the config ({exc})") from None
    return parse_config(text, p)


def _kinds(c: _Checker, v: Any, key: str) -> list[str]:
    from cka_geo.sublayers import KINDS

    return [c.string(k, f"{key}[{i}]", KINDS) for i, k in enumerate(c.items(v, key))]


def _encoder(c: _Checker, name: str, raw: Any, base: Path) -> EncoderSpec:
    key = f"encoders.{c.name(name, 'encoders')}"
    e = c.table(raw, key, _ENCODER)
    if "checkpoint" not in e:
        raise c.fail(f"{key}.checkpoint", "missing: a checkpoint path or builtin:" + "|".join(BUILTINS))
    ckpt = c.string(e["checkpoint"], f"{key}.checkpoint")
    trust = e.get("trust", False)
    if not isinstance(trust, bool):
        raise c.fail(f"{key}.trust", f"expected true or false, got {trust!r}")
    ft_lr = c.number(e["finetune_lr"], f"{key}.finetune_lr") if "finetune_lr" in e else None
    if ckpt.startswith("builtin:"):
        if "image_size" in e:
            raise c.fail(f"{key}.image_size", "a builtin encoder's size is img_size")
        c.string(ckpt.removeprefix("builtin:"), f"{key}.checkpoint", tuple(f"{b}" for b in BUILTINS))
        settings = {**_BUILTIN, **{k: v for k, v in e.items() if k in _BUILTIN}}
        for k, v in settings.items():
            if k == "lr":
                c.number(v, f"{key}.lr")
            else:
                c.integer(v, f"{key}.{k}", 0 if k in ("seed", "stride") else 1)
        return EncoderSpec(name, ckpt, settings, trust, finetune_lr=ft_lr)
    extra = sorted(set(e) & set(_BUILTIN))
    if extra:
        raise c.fail(f"{key}.{extra[0]}", "only builtin: encoders take architecture or pretraining keys")
    size = c.integer(e["image_size"], f"{key}.image_size", 1, 128) if "image_size" in e else None
    path = Path(ckpt).expanduser()
    return EncoderSpec(name, str(path if path.is_absolute() else base / path), None, trust, size, ft_lr)


def _task(c: _Checker, name: str, raw: Any, base: Path) -> TaskSpec:
    key = f"tasks.{c.name(name, 'tasks')}"
    t = c.table(raw, key, _TASK)
    if "task" not in t:
        raise c.fail(f"{key}.task", f"missing: one of {', '.join(TASKS)}")
    task = c.string(t["task"], f"{key}.task", TASKS)
    data = t.get("data")
    layout = c.string(t["layout"], f"{key}.layout") if "layout" in t else None
    if data is not None:
        d = Path(c.string(data, f"{key}.data")).expanduser()
        data = str(d if d.is_absolute() else base / d)
    elif layout is not None:
        raise c.fail(f"{key}.layout", "given without data")
    elif task == "multilabel":
        raise c.fail(f"{key}.task", "multilabel needs data (the embedded tiles have no multi-label targets)")
    return TaskSpec(name, task, data, layout)


__all__ = ["BUILTINS", "DECODERS", "TASKS", "EncoderSpec", "StudyConfig", "TaskSpec", "load_config", "parse_config"]
