"""Checking that two encoders can be compared, and how much their weights differ."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import torch

from cka_geo.checkpoints.families import instantiate
from cka_geo.checkpoints.load import LoadedCheckpoint
from cka_geo.errors import ArchitectureMismatchError


@dataclass
class PairReport:
    """Weight-level facts about two encoders of one architecture.

    Attributes:
        identical: Every tensor equal (a frozen-backbone fine-tune): CKA is trivially 1.
        changed: Keys whose tensors differ, in state-dict order.
        max_abs_diff: Largest absolute element difference over all tensors.
        tensor_change: Key -> relative Frobenius change ``‖b − a‖ / ‖a‖`` (``inf`` when
            ``a`` is zero and ``b`` is not).
        sublayer_change: Canonical sublayer (``blocks.{i}.attn``, ``blocks.{i}.mlp.fc1``,
            ``blocks.{i}.mlp.fc2``, ``blocks.{i}``) -> relative Frobenius change of all the
            parameters of the module behind it (``mlp.act`` has none and is left out).
        notes: Human-readable lines (also in :meth:`summary`).
    """

    identical: bool
    changed: list[str] = field(default_factory=list)
    max_abs_diff: float = 0.0
    tensor_change: dict[str, float] = field(default_factory=dict)
    sublayer_change: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """A few lines for a terminal."""
        return "\n".join(self.notes)


def _name(x: Any) -> str:
    return str(x.path) if isinstance(x, LoadedCheckpoint) else "state dict"


def _rel(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """(‖b−a‖², ‖a‖²) in float64."""
    a64, b64 = a.detach().double(), b.detach().double()
    return float((b64 - a64).pow(2).sum()), float(a64.pow(2).sum())


def _ratio(num: float, den: float) -> float:
    if num == 0.0:
        return 0.0
    return math.sqrt(num / den) if den > 0 else math.inf


#: Keys one side may lack (MAE fine-tunes swap ``norm`` for ``fc_norm``): outside the blocks.
_FINAL_NORMS = ("norm.", "fc_norm.")


def _shape_check(
    sa: dict[str, torch.Tensor], sb: dict[str, torch.Tensor], na: str, nb: str
) -> list[str]:
    """Refuse differing keys or shapes; return the final-norm keys only one side has."""
    tolerated = [k for k in [*sa, *sb] if k.startswith(_FINAL_NORMS) and (k in sa) != (k in sb)]
    for key, ta in sa.items():
        if key in tolerated:
            continue
        if key not in sb:
            missing = [k for k in sa if k not in sb and k not in tolerated]
            raise ArchitectureMismatchError(
                f"encoders differ: {key!r} {tuple(ta.shape)} is in {na} but missing from {nb} "
                f"({len(missing)} key(s) missing there)"
            )
        if ta.shape != sb[key].shape:
            hint = ""
            if (
                key.endswith(("pos_embed", "positional_embedding"))
                and ta.shape[-1] == sb[key].shape[-1]
            ):
                hint = " (trained at different image sizes: position grids differ)"
            raise ArchitectureMismatchError(
                f"encoders differ: first differing key {key!r} has shape {tuple(ta.shape)} in {na} "
                f"and {tuple(sb[key].shape)} in {nb}{hint}"
            )
    extra = [k for k in sb if k not in sa and k not in tolerated]
    if extra:
        raise ArchitectureMismatchError(
            f"encoders differ: {extra[0]!r} {tuple(sb[extra[0]].shape)} is in {nb} but missing "
            f"from {na} ({len(extra)} key(s) missing there)"
        )
    return tolerated


def check_pair(
    a: LoadedCheckpoint | dict[str, torch.Tensor], b: LoadedCheckpoint | dict[str, torch.Tensor]
) -> PairReport:
    """Refuse two encoders of different architecture; report how their weights differ.

    Args:
        a: The reference (pretrained) encoder: a :class:`LoadedCheckpoint` or a state dict.
        b: The other (fine-tuned) one.

    Returns:
        A :class:`PairReport`; ``identical`` is True when every tensor is equal.

    Raises:
        ArchitectureMismatchError: Different families, configs, keys or shapes; the message
            names the first differing key (or config field) and both shapes (or values).
    """
    na, nb = _name(a), _name(b)
    if na == nb:
        na, nb = f"{na} (a)", f"{nb} (b)"
    sa = a.state_dict if isinstance(a, LoadedCheckpoint) else dict(a)
    sb = b.state_dict if isinstance(b, LoadedCheckpoint) else dict(b)
    if isinstance(a, LoadedCheckpoint) and isinstance(b, LoadedCheckpoint):
        if a.family != b.family:
            raise ArchitectureMismatchError(
                f"encoders differ: {na} is {a.family}, {nb} is {b.family}"
            )
        tolerated = _shape_check(sa, sb, na, nb)
        ca, cb = a.config.to_dict(), b.config.to_dict()
        for key in ("num_heads", "heads", "norm_eps", "act", "class_token", "no_embed_class", "wavelengths"):
            if key in ca and ca[key] != cb.get(key):
                raise ArchitectureMismatchError(
                    f"encoders differ: config {key} is {ca[key]!r} in {na} and {cb.get(key)!r} in {nb}"
                )
    else:
        tolerated = _shape_check(sa, sb, na, nb)
    report = PairReport(identical=True)
    if tolerated:
        report.notes.append(
            "the final norms differ ("
            + ", ".join(sorted({k.split(".")[0] for k in tolerated}))
            + " in one encoder only, e.g. an MAE fine-tune with fc_norm): outside the compared "
            "sublayers, not compared"
        )
    sq: dict[str, tuple[float, float]] = {}
    for key, ta in sa.items():
        if key in tolerated:
            continue
        tb = sb[key]
        if torch.equal(ta, tb):
            sq[key] = (0.0, float(ta.detach().double().pow(2).sum()))
            report.tensor_change[key] = 0.0
            continue
        report.identical = False
        report.changed.append(key)
        if ta.is_floating_point() or tb.is_floating_point():
            diff = float((tb.detach().double() - ta.detach().double()).abs().max())
            report.max_abs_diff = max(report.max_abs_diff, diff)
            sq[key] = _rel(ta, tb)
            report.tensor_change[key] = _ratio(*sq[key])
    if isinstance(a, LoadedCheckpoint):
        report.sublayer_change = _sublayer_change(a, sq)
    _describe(report, na, nb, len(sa) - len([k for k in tolerated if k in sa]))
    return report


def _sublayer_change(a: LoadedCheckpoint, sq: dict[str, tuple[float, float]]) -> dict[str, float]:
    config = a.config
    if a.family == "timm":
        config = dataclasses.replace(config, num_classes=0)
    paths = getattr(instantiate(a.family, config, "meta"), "canonical_sublayers")()  # noqa: B009
    out: dict[str, float] = {}
    for name, path in paths.items():
        keys = [k for k in sq if k.startswith(path + ".")]
        if not keys:
            continue
        out[name] = _ratio(sum(sq[k][0] for k in keys), sum(sq[k][1] for k in keys))
    return out


def _describe(report: PairReport, na: str, nb: str, total: int) -> None:
    if report.identical:
        report.notes.append(
            f"the encoders of {na} and {nb} are identical ({total} tensors equal): a frozen-backbone "
            "fine-tune? CKA will be 1 everywhere"
        )
        return
    report.notes.append(
        f"{len(report.changed)} of {total} encoder tensors differ (max |Δ| {report.max_abs_diff:.3g})"
    )
    subs = {k: v for k, v in report.sublayer_change.items() if k.count(".") >= 2}
    if subs:
        top = max(subs, key=lambda k: subs[k])
        report.notes.append(f"largest relative weight change: {top} ({subs[top]:.3g})")
