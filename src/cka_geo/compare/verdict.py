"""The verdict: which sublayer changed most, the first that moved, drawn only beyond the noise."""

from __future__ import annotations

from typing import Any

from cka_geo.compare.options import UNCHANGED_TOL
from cka_geo.sublayers import kind_of


def summarize(
    layers: list[str], diagonal: dict[str, float | None], own: dict[str, float | None] | None, identical: bool
) -> dict[str, Any]:
    """Which sublayer changed most, the first that moved, and a one-line verdict.

    A verdict is drawn only from defined values (NaN, stored as None, is never ranked) and
    only from changes beyond the numerical noise (``1 - CKA > UNCHANGED_TOL``); the verdict
    says which sublayers were undefined.
    """

    def changed(values: dict[str, float | None]) -> dict[str, float]:
        return {k: v for k, v in values.items() if v is not None and 1 - v > UNCHANGED_TOL}

    def lowest(values: dict[str, float]) -> tuple[str | None, float | None]:
        if not values:
            return None, None
        k = min(values, key=lambda n: values[n])
        return k, values[k]

    moved = changed(diagonal)
    most, most_v = lowest(moved)
    first = next((n for n in layers if n in moved), None)
    undefined = [n for n in layers if diagonal.get(n) is None]
    out: dict[str, Any] = {
        "identical": identical,
        "changed": first is not None,
        "most_changed": most,
        "most_changed_cka": most_v,
        "first_changed": first,
        "undefined": undefined,
        "noise_level": UNCHANGED_TOL,
    }
    own_name = own_value = None
    if own is not None:
        # the block output's own change contains its sublayers'; rank sublayers proper
        own_name, own_value = lowest(changed({k: v for k, v in own.items() if kind_of(k) != "block"}))
        out["largest_own_change"] = own_name
        out["largest_own_change_cka"] = own_value
    if identical:
        text = "the two encoders are identical (a frozen-backbone fine-tune?): CKA is trivially 1, nothing changed"
    elif len(undefined) == len(layers):
        text = (
            "CKA is undefined (NaN) at every sublayer: the probe images give a constant representation "
            "(identical or blank images?); nothing can be said"
        )
    elif first is None:
        text = f"no sublayer's representation changed beyond the numerical noise (1 - CKA <= {UNCHANGED_TOL:g} everywhere)"
    else:
        text = f"most changed: {most} (CKA {most_v:.4f}); first to move: {first}"
        if own is not None:
            text += (
                f"; largest own change: {own_name} (CKA {own_value:.4f})" if own_name
                else "; no sublayer's own change exceeds the numerical noise"
            )
    if undefined and len(undefined) < len(layers) and not identical:
        shown = ", ".join(undefined[:3]) + (f" and {len(undefined) - 3} more" if len(undefined) > 3 else "")
        text += f"; undefined (constant representation, left out): {shown}"
    out["verdict"] = text
    return out
