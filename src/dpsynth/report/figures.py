"""Report figures, each returned as PNG bytes (matplotlib's Agg canvas, no pyplot state)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from dpsynth.attributes import ATTRIBUTES, INDEX, UNITS, pairwise_correlation
from dpsynth.data.figures import (
    REAL_COLOUR,
    SYNTHETIC_COLOUR,
    attribute_caption,
    mid_slice_grid,
    montage,
    slice_strips,
)
from dpsynth.data.figures import fmt as _fmt
from dpsynth.data.figures import image as _image
from dpsynth.data.figures import png as _png
from dpsynth.evaluation.controllability import MEASURED_ATTRIBUTES, POOLED, agreement

__all__ = ["attribute_caption", "mid_slice_grid", "montage", "slice_strips"]


def controllability_figure(rows: Sequence[Mapping[str, Any]], reader: str = "referee") -> Figure:
    """Requested vs measured, one panel per quantity, synthetic in blue, real in orange.

    `rows` are controllability.csv records (attribute, requested, measured, set); a set
    other than "synthetic" is the reader's measurement of real volumes, i.e. the ceiling.
    Panels: each attribute in the rows (per-phase volumes and thickness first), then the
    study's pooled groups (ED and ES together) whose members are present. Titles give r
    and MAE (as `dpsynth.evaluation.controllability.agreement` computes them) for both sets.
    """
    order = list(MEASURED_ATTRIBUTES)  # LV, RV, thickness per phase first, then the rest
    present = sorted(
        dict.fromkeys(r["attribute"] for r in rows),
        key=lambda a: order.index(a) if a in order else len(order),
    )
    panels = {a: (a,) for a in present} | {
        group: members for group, members in POOLED.items() if any(m in present for m in members)
    }
    cols = min(3, len(panels))
    n_rows = math.ceil(len(panels) / cols)
    fig = Figure(figsize=(3.4 * cols, 3.3 * n_rows))
    axes = fig.subplots(n_rows, cols, squeeze=False).ravel()
    for ax, (name, members) in zip(axes, panels.items(), strict=False):
        title = name if len(members) == 1 else f"{name} (ED + ES)"
        for kind, colour in (("synthetic", SYNTHETIC_COLOUR), ("real", REAL_COLOUR)):
            sel = [
                r
                for r in rows
                if r["attribute"] in members and (r["set"] == "synthetic") == (kind == "synthetic")
            ]
            if not sel:
                continue
            x = np.array([float(r["requested"]) for r in sel])
            y = np.array([float(r["measured"]) for r in sel])
            stats = agreement(x, y)
            ax.scatter(x, y, s=8, alpha=0.6, color=colour, label=kind)
            title += (
                f"\n{kind}: r = {_fmt(stats['r'], 2)}, MAE = {_fmt(stats['mae'], 2)}, "
                f"slope = {_fmt(stats['slope'], 2)}"
            )
        lo, hi = ax.get_xlim()
        ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)
        ax.set_title(title, fontsize=8)
        unit = f" ({UNITS[members[0]]})" if members[0] in UNITS else ""
        ax.set_xlabel(f"requested{unit}", fontsize=7)
        ax.set_ylabel(f"measured by the {reader}{unit}", fontsize=7)
        ax.tick_params(labelsize=6)
    axes[0].legend(fontsize=6)
    for ax in axes[len(panels) :]:
        ax.axis("off")
    fig.tight_layout()
    return fig


def controllability_scatter(rows: Sequence[Mapping[str, Any]], reader: str = "referee") -> bytes:
    """`controllability_figure` as PNG bytes."""
    return _png(controllability_figure(rows, reader))


def loss_curves(records: Sequence[Mapping[str, Any]]) -> bytes:
    """Every `*loss*` series from metrics.jsonl against step, and ε spent if it was logged."""
    keys = sorted({k for r in records for k in r if "loss" in k})
    has_eps = any("epsilon" in r for r in records)
    fig = Figure(figsize=(9 if has_eps else 5, 3.2))
    axes = fig.subplots(1, 2 if has_eps else 1, squeeze=False)[0]
    for key in keys:
        pts = [(r.get("step", i), r[key]) for i, r in enumerate(records) if _number(r.get(key))]
        if pts:
            axes[0].plot(*zip(*pts, strict=True), label=key, lw=1)
    axes[0].set_xlabel("step")
    axes[0].set_ylabel("loss")
    axes[0].set_yscale("log")
    axes[0].legend(fontsize=7)
    if has_eps:
        pts = [
            (r.get("step", i), r["epsilon"])
            for i, r in enumerate(records)
            if _number(r.get("epsilon"))
        ]
        axes[1].plot(*zip(*pts, strict=True), color="tab:red", lw=1)
        axes[1].set_xlabel("step")
        axes[1].set_ylabel("ε spent")
    fig.tight_layout()
    return _png(fig)


def _number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def attribute_marginals(real: np.ndarray, synthetic: np.ndarray) -> bytes:
    """Histogram of each attribute: real cohort vs the synthetic set's conditioning values."""
    fig = Figure(figsize=(12, 6))
    axes = fig.subplots(3, 5).ravel()
    for ax, name in zip(axes, ATTRIBUTES, strict=False):
        j = INDEX[name]
        r, s = real[:, j], synthetic[:, j]
        r, s = r[np.isfinite(r)], s[np.isfinite(s)]
        both = np.r_[r, s]
        if both.size:
            bins = np.histogram_bin_edges(both, bins=15)
            for x, colour, label in ((r, REAL_COLOUR, "real"), (s, SYNTHETIC_COLOUR, "synthetic")):
                if x.size:
                    ax.hist(x, bins=bins, density=True, alpha=0.5, color=colour, label=label)
        ax.set_title(f"{name} ({UNITS[name]})", fontsize=8)
        ax.tick_params(labelsize=6)
    axes[0].legend(fontsize=6)
    axes[-1].axis("off")
    fig.tight_layout()
    return _png(fig)


def attribute_correlations(real: np.ndarray, synthetic: np.ndarray) -> bytes:
    """Pairwise Pearson correlations of the attributes: real, synthetic, and their difference."""
    matrices = {
        "real": pairwise_correlation(real),
        "synthetic conditioning": pairwise_correlation(synthetic),
    }
    matrices["synthetic − real"] = matrices["synthetic conditioning"] - matrices["real"]
    fig = Figure(figsize=(13, 4.4))
    axes = fig.subplots(1, 3)
    ticks = np.arange(len(ATTRIBUTES))
    for ax, (title, r) in zip(axes, matrices.items(), strict=True):
        shown = ax.imshow(r, cmap="RdBu_r", vmin=-1.0, vmax=1.0, interpolation="nearest")
        ax.set_title(title, fontsize=9)
        ax.set_xticks(ticks, ATTRIBUTES, rotation=90, fontsize=6)
        ax.set_yticks(ticks, ATTRIBUTES, fontsize=6)
    fig.colorbar(shown, ax=axes, shrink=0.8, label="Pearson r (blank: constant or too few)")
    return _png(fig)


def roc_figure(curves: Mapping[str, Mapping[str, Any]]) -> bytes:
    """Membership-inference ROC curves (dicts with fpr, tpr, auc), linear and log-log."""
    fig = Figure(figsize=(8, 3.6))
    axes = fig.subplots(1, 2)
    for name, c in curves.items():
        label = f"{name} (AUC {c['auc']:.3f})"
        for ax in axes:
            ax.step(c["fpr"], c["tpr"], where="post", label=label, lw=1.2)
    floor = min(min((f for f in c["fpr"] if f > 0), default=1.0) for c in curves.values()) / 2
    axes[0].plot([0, 1], [0, 1], "k--", lw=0.8, label="chance")
    axes[1].plot([floor, 1], [floor, 1], "k--", lw=0.8)
    for ax in axes:
        ax.set_xlabel("false-positive rate")
        ax.set_ylabel("true-positive rate")
    axes[1].set_xscale("log")
    axes[1].set_yscale("log")
    axes[1].minorticks_off()
    for axis in (axes[1].xaxis, axes[1].yaxis):
        ticks = [t for t in (1e-3, 1e-2, 1e-1, 1.0) if t >= floor]
        axis.set_ticks(ticks, [f"{t:g}" for t in ticks])
    axes[1].set_xlim(floor, 1)
    axes[1].set_ylim(floor, 1.05)
    axes[1].set_title("low-FPR region (log-log)", fontsize=9)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    return _png(fig)


def closest_pairs_figure(
    synthetic: np.ndarray, train: np.ndarray, pairs: Sequence[Mapping[str, Any]]
) -> bytes:
    """Synthetic volumes (top) above their most similar training volume (bottom), mid-slices."""
    fig = Figure(figsize=(1.7 * len(pairs), 3.8))
    axes = fig.subplots(2, len(pairs), squeeze=False)
    for k, p in enumerate(pairs):
        s, t = synthetic[p["synthetic_index"]], train[p["train_index"]]
        _image(axes[0, k], s[len(s) // 2], f"synthetic #{p['synthetic_index']}")
        _image(axes[1, k], t[len(t) // 2], f"train #{p['train_index']}\nr = {p['train_score']:.3f}")
    return _png(fig)


def privacy_utility(
    runs: Sequence[tuple[str, float, Mapping[str, float]]], metrics: Sequence[str]
) -> bytes:
    """Each metric against ε across runs (label, ε, {metric: value}); log ε axis.

    ε = ∞ (non-private) has no place on a log axis: it is drawn one decade right of the
    largest finite ε, behind a dotted separator, with the tick labelled "∞".
    """
    finite = [e for _, e, _ in runs if math.isfinite(e) and e > 0]
    inf_x = 10 * max(finite) if finite else 10.0
    fig = Figure(figsize=(3.4 * len(metrics), 3.2))
    axes = fig.subplots(1, len(metrics), squeeze=False)[0]
    for ax, metric in zip(axes, metrics, strict=True):
        pts = sorted(
            (e if math.isfinite(e) else inf_x, m[metric], label)
            for label, e, m in runs
            if _number(m.get(metric)) and e > 0
        )
        private = [p for p in pts if p[0] != inf_x]
        non_private = [p for p in pts if p[0] == inf_x]
        # Line through the DP runs only: nothing joins them across the break to ∞.
        ax.plot([p[0] for p in private], [p[1] for p in private], "o-", lw=1)
        ax.plot([p[0] for p in non_private], [p[1] for p in non_private], "s", color="tab:gray")
        for x, y, label in pts:
            ax.annotate(label, (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
        ax.set_xscale("log")
        ticks = sorted({*finite, inf_x})
        ax.minorticks_off()
        ax.set_xticks(ticks, [("∞" if t == inf_x else f"{t:.3g}") for t in ticks])
        ax.axvline(inf_x / 10**0.5, color="gray", ls=":", lw=0.8)
        ax.set_xlabel("ε (δ fixed)")
        ax.set_title(metric, fontsize=9)
    fig.tight_layout()
    return _png(fig)
