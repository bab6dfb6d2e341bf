"""The study's figures, drawn from the aggregate tables and saved through :func:`cka_geo.plotting.save_figure`.

* ``metrics``: each setting's primary test metric per encoder (mean ± sd over seeds), a panel
  per task;
* ``localisation``: change 1 − CKA against block per sublayer kind, with the 95 % t-interval
  over seeds shaded, a row per encoder, the same-layer and own-change views side by side;
* ``probing``: the probe metric against block, pretrained encoder and the mean of its
  fine-tuned cells, the best layer circled;
* ``fc1_share``: the share of cells whose most changed kind is each kind, in both views.

Each is written as PNG (200 dpi) and PDF; matplotlib is imported here only.
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from typing import Any

FORMATS = ("png", "pdf")
STEMS = ("metrics", "localisation", "probing", "fc1_share")
_VIEW_TITLES = {"same": "same-layer change 1 − CKA(pre s, ft s)", "own": "own change 1 − CKA(pre s, ft s on pre's input)"}


def _save(fig: Any, folder: Path, stem: str) -> list[Path]:
    from cka_geo.plotting import save_figure

    return [save_figure(fig, folder / f"{stem}.{fmt}", dpi=200 if fmt == "png" else None) for fmt in FORMATS]


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def draw_all(out: str | Path, table: list[dict[str, Any]], ranks: list[dict[str, Any]], loc: list[dict[str, Any]],
             share: list[dict[str, Any]], profiles: list[dict[str, Any]]) -> list[Path]:
    """Draw the four figures into ``out/figures/``; the paths written."""
    from cka_geo.plotting import _RC
    from cka_geo.plotting.canvas import _import_matplotlib, _new_figure

    mpl = _import_matplotlib()

    folder = Path(out) / "figures"
    folder.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    with mpl.rc_context(_RC):
        for stem, draw in (("metrics", _metrics), ("localisation", _localisation), ("probing", _probing),
                           ("fc1_share", _share)):
            data = {"metrics": (table, ranks), "localisation": (loc,), "probing": (profiles,), "fc1_share": (share,)}[stem]
            fig = draw(_new_figure, *data)
            paths += _save(fig, folder, stem)
    return paths


def draw_tables(tables: str | Path | dict[str, Any], out: str | Path) -> list[Path]:
    """Draw the figures of a study from its ``aggregate/tables.json`` (a path or the loaded dict) into ``out/figures/``."""
    import json

    t = json.loads(Path(tables).read_text(encoding="utf-8")) if not isinstance(tables, dict) else tables
    return draw_all(out, t["cells"], t["rankings"], t["localisation"], t["fc1_share"], t["probing"])


def _encoders(rows: list[dict[str, Any]]) -> list[str]:
    return list(dict.fromkeys(r["encoder"] for r in rows))


def _metrics(new: Any, table: list[dict[str, Any]], ranks: list[dict[str, Any]]) -> Any:
    tasks = list(dict.fromkeys(r["task"] for r in table))
    settings = {t: list(dict.fromkeys(r["setting"] for r in table if r["task"] == t)) for t in tasks}
    encs = _encoders(table)
    width = max(4.0, 1.2 + 0.9 * max(len(s) for s in settings.values()))
    fig = new((width * len(tasks), 3.4), 100)
    axes = fig.subplots(1, len(tasks), squeeze=False)[0]
    for ax, task in zip(axes, tasks, strict=True):
        xs = settings[task]
        metric = next(r["primary_metric"] for r in table if r["task"] == task)
        for j, enc in enumerate(encs):
            pts = {r["setting"]: r for r in ranks if r["encoder"] == enc and r["task"] == task}
            off = (j - (len(encs) - 1) / 2) * 0.12
            x = [i + off for i, s in enumerate(xs) if s in pts]
            y = [pts[s]["mean"] for s in xs if s in pts]
            err = [pts[s]["sd"] if _finite(pts[s]["sd"]) else 0.0 for s in xs if s in pts]
            ax.errorbar(x, y, yerr=err, fmt="o", ms=4, capsize=2, label=enc)
        ax.set_xticks(range(len(xs)))
        ax.set_xticklabels([s.split("/", 1)[1] for s in xs], rotation=30, ha="right", fontsize=7)
        ax.set_ylabel(f"test {metric} (mean ± sd over seeds)")
        ax.set_title(f"task {task}")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, title="encoder", title_fontsize=7)
    return fig


def _localisation(new: Any, loc: list[dict[str, Any]]) -> Any:
    from matplotlib.ticker import MaxNLocator

    from cka_geo.plotting import TYPE_COLORS, TYPE_LABELS

    # a row per encoder and adaptation mode where the study has several modes, else per encoder
    level = "adaptation" if len({r.get("adaptation") for r in loc if r["level"] == "adaptation"}) > 1 else "encoder"
    rows = [r for r in loc if r["level"] == level]
    panels = list(dict.fromkeys((r["encoder"], r.get("adaptation", "all")) for r in rows))
    fig = new((9.0, 2.6 * len(panels)), 100)
    axes = fig.subplots(len(panels), 2, squeeze=False, sharex=True)
    for i, (enc, adapt) in enumerate(panels):
        for j, view in enumerate(("same", "own")):
            ax = axes[i][j]
            by: dict[str, list[dict[str, Any]]] = defaultdict(list)
            for r in rows:
                if r["encoder"] == enc and r.get("adaptation", "all") == adapt and r["view"] == view:
                    by[r["kind"]].append(r)
            for kind, pts in by.items():
                pts.sort(key=lambda r: r["block"])
                color = TYPE_COLORS.get(kind, "black")
                ax.plot([p["block"] for p in pts], [p["change"] for p in pts], marker="o", ms=3, color=color,
                        label=TYPE_LABELS.get(kind, kind))
                band = [p for p in pts if _finite(p["ci_lo"])]
                if band:
                    ax.fill_between([p["block"] for p in band], [max(p["ci_lo"], 0.0) for p in band],
                                    [p["ci_hi"] for p in band], color=color, alpha=0.15, lw=0)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_title(f"{enc}" + (f" ({adapt})" if adapt != "all" else "") + f": {_VIEW_TITLES[view]}", fontsize=8)
            ax.grid(alpha=0.3)
            if j == 0:
                ax.set_ylabel("1 − CKA (mean over seeds)")
            if i == len(panels) - 1:
                ax.set_xlabel("block")
    axes[0][0].legend(fontsize=7)
    fig.suptitle("where fine-tuning changed each encoder (95 % t-interval over seeds shaded)", fontsize=9)
    return fig


def _probing(new: Any, profiles: list[dict[str, Any]]) -> Any:
    from matplotlib.ticker import MaxNLocator

    encs = _encoders(profiles) or ["(no probes)"]
    fig = new((3.6 * len(encs), 3.0), 100)
    axes = fig.subplots(1, len(encs), squeeze=False, sharey=True)[0]
    for ax, enc in zip(axes, encs, strict=True):
        for source, style in (("pretrained", "-"), ("fine-tuned (mean over cells)", "--")):
            pts = sorted((r for r in profiles if r["encoder"] == enc and r["source"] == source and r["block"] is not None),
                         key=lambda r: r["block"])
            if not pts:
                continue
            ax.plot([p["block"] for p in pts], [p["value"] for p in pts], style, marker="o", ms=3, label=source)
            best = max(pts, key=lambda p: p["value"])
            ax.plot([best["block"]], [best["value"]], "o", ms=9, mfc="none", color="black")
            ax.set_ylabel(f"probe {pts[0]['metric']}")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(enc)
        ax.set_xlabel("block")
        ax.grid(alpha=0.3)
    if axes[0].get_legend_handles_labels()[0]:
        axes[0].legend(fontsize=7)
    return fig


def _share(new: Any, share: list[dict[str, Any]]) -> Any:
    from cka_geo.plotting import TYPE_COLORS, TYPE_LABELS
    from cka_geo.study.aggregate import CHANGE_KINDS

    # groups: every cell, then each encoder x adaptation mode; a panel per view
    groups = list(dict.fromkeys((r["encoder"], r.get("adaptation", "all")) for r in share
                                if (r["encoder"] == "all") == (r.get("adaptation", "all") == "all")))
    groups = [g for g in groups if g[0] == "all" or g[1] != "all"] or [("all", "all")]
    rows = {(r["view"], r["encoder"], r.get("adaptation", "all")): r for r in share}
    kinds = [k for k in CHANGE_KINDS if k == "fc1" or any(r.get(f"most_{k}") for r in rows.values())]  # fc1 always
    fig = new((max(5.0, 1.2 + 0.9 * len(groups)) * 2, 3.2), 100)
    axes = fig.subplots(1, 2, squeeze=False, sharey=True)[0]
    for ax, view in zip(axes, ("same", "own"), strict=True):
        labels = []
        for j, g in enumerate(groups):
            r = rows.get((view, *g))
            if r is None or not r["counted"]:
                labels.append(f"{g[0]}\n(no change)")
                continue
            n = r["counted"]
            for i, kind in enumerate(kinds):
                x = j + (i - (len(kinds) - 1) / 2) * 0.2
                ax.bar(x, r[f"most_{kind}"] / n, width=0.18, color=TYPE_COLORS.get(kind, "grey"),
                       label=TYPE_LABELS.get(kind, kind) if j == 0 else None)
                if kind == "fc1" and _finite(r.get("share_lo")):
                    ax.errorbar([x], [r["fc1_share"]], yerr=[[max(0.0, r["fc1_share"] - r["share_lo"])],
                                                              [max(0.0, r["share_hi"] - r["fc1_share"])]],
                                fmt="none", ecolor="black", capsize=2, lw=0.8)
            labels.append(("all cells" if g[0] == "all" else f"{g[0]}\n{g[1]}") + f"\n({n})")
        ax.set_xticks(range(len(groups)))
        ax.set_xticklabels(labels, fontsize=7)
        ax.set_title(_VIEW_TITLES[view], fontsize=8)
        ax.grid(alpha=0.3, axis="y")
    ax = axes[0]
    ax.set_ylabel("share of cells where the kind is most changed\n(fc1: 95 % Wilson interval)")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7)
    return fig


__all__ = ["FORMATS", "STEMS", "draw_all", "draw_tables"]
