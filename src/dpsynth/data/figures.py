"""Pictures of volume sets as PNG bytes: mid-slice grids, slice strips, montages.

Below training and the report alike: training writes sample grids with these, the report
shows them. matplotlib's Agg canvas only, no pyplot state.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from dpsynth.attributes import INDEX
from dpsynth.io import atomic_write_bytes

# A named set of volumes (N, S, H, W) with raw attributes (N, 14) or None.
VolumeSets = Mapping[str, tuple[np.ndarray, np.ndarray | None]]

SYNTHETIC_COLOUR, REAL_COLOUR = "tab:blue", "tab:orange"
DPI = 80


def png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight")
    return buf.getvalue()


def fmt(value: float, digits: int = 0) -> str:
    return "?" if not np.isfinite(value) else f"{value:.{digits}f}"


def attribute_caption(attributes: np.ndarray | None) -> str:
    """Two short lines with the attributes a volume was conditioned on (NaN shows as ?)."""
    if attributes is None:
        return ""
    a = {name: float(attributes[i]) for name, i in INDEX.items()}
    phase = {1.0: "ED", 0.0: "ES"}.get(a["ESED"], "?")
    sex = {1.0: "M", 0.0: "F"}.get(a["SEX"], "?")
    return (
        f"{phase} {sex} {fmt(a['AGE'])}y BMI {fmt(a['BMI'])}\n"
        f"LV {fmt(a['LVEDV'])}/{fmt(a['LVESV'])} RV {fmt(a['RVEDV'])}/{fmt(a['RVESV'])} mL"
    )


def image(ax, image: np.ndarray, title: str = "") -> None:
    ax.imshow(image, cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=7)


def mid_slice_grid(sets: VolumeSets, n: int = 6) -> bytes:
    """One row per set: the middle slice of its first `n` volumes, attributes in the titles."""
    n = max(1, min(n, max(len(v) for v, _ in sets.values())))
    fig = Figure(figsize=(1.7 * n, 2.1 * len(sets)))
    axes = fig.subplots(len(sets), n, squeeze=False)
    for row, (name, (volumes, attributes)) in enumerate(sets.items()):
        for col in range(n):
            ax = axes[row, col]
            if col >= len(volumes):
                ax.axis("off")
                continue
            caption = attribute_caption(None if attributes is None else attributes[col])
            image(ax, volumes[col][len(volumes[col]) // 2], caption)
        axes[row, 0].set_ylabel(name, fontsize=9)
    return png(fig)


def slice_strips(sets: VolumeSets, n: int = 2) -> bytes:
    """All slices (base to apex) of the first `n` volumes of each set, one volume per row."""
    rows = [
        (name, v[i], None if a is None else a[i])
        for name, (v, a) in sets.items()
        for i in range(min(n, len(v)))
    ]
    n_slices = max(len(v) for _, v, _ in rows)
    fig = Figure(figsize=(1.1 * n_slices, 1.4 * len(rows)))
    axes = fig.subplots(len(rows), n_slices, squeeze=False)
    for r, (name, volume, attributes) in enumerate(rows):
        for s in range(n_slices):
            if s < len(volume):
                image(axes[r, s], volume[s])
            else:
                axes[r, s].axis("off")
        label = f"{name}\n{attribute_caption(attributes)}"
        axes[r, 0].set_ylabel(label, fontsize=6, rotation=0, ha="right", va="center")
    return png(fig)


def montage(
    volumes: np.ndarray, attributes: np.ndarray | None, path: str | os.PathLike, n: int = 8
) -> Path:
    """Write a PNG of the middle slices of up to `n` volumes with their attributes."""
    cols = min(n, len(volumes), 4)
    rows = math.ceil(min(n, len(volumes)) / cols)
    fig = Figure(figsize=(2.2 * cols, 2.5 * rows))
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for k, ax in enumerate(axes):
        if k < min(n, len(volumes)):
            v = volumes[k]
            image(
                ax, v[len(v) // 2], attribute_caption(None if attributes is None else attributes[k])
            )
        else:
            ax.axis("off")
    atomic_write_bytes(path, png(fig))
    return Path(path)
