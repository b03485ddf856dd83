"""Cardiac attributes measured from label masks (1 LV blood, 2 LV myocardium, 3 RV blood).

Shared by the simulator (its ground truth), ingestion (attributes of real data) and the
evaluation referee (attributes of synthetic volumes), so all three measure the same way.
Missing structures give NaN, never 0.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from dpsynth.attributes import ejection_fraction
from dpsynth.errors import DpsynthError

LV_BLOOD, LV_MYO, RV_BLOOD = 1, 2, 3


def _check(
    mask: np.ndarray, spacing: Sequence[float]
) -> tuple[np.ndarray, tuple[float, float, float]]:
    mask = np.asarray(mask)
    if mask.ndim != 3:
        raise DpsynthError(f"mask: expected a 3D (slices, H, W) array, got shape {mask.shape}")
    if not np.issubdtype(mask.dtype, np.integer):
        mask = np.rint(mask).astype(np.int16)  # masks read back from NIfTI come as float
    try:
        dz, dy, dx = (float(s) for s in spacing)
    except (TypeError, ValueError):
        raise DpsynthError(f"spacing: expected (dz, dy, dx) in mm, got {spacing!r}") from None
    if not all(math.isfinite(s) and s > 0 for s in (dz, dy, dx)):
        raise DpsynthError(f"spacing: voxel sizes must be positive, got {(dz, dy, dx)}")
    return mask, (dz, dy, dx)


def wall_thickness(mask: np.ndarray, spacing: Sequence[float]) -> float:
    """Mean LV myocardial wall thickness in mm (NaN when no slice has cavity and myocardium).

    Each slice holding both cavity and myocardium is read as the annulus with the same
    cavity and myocardium areas: thickness = R_epi - R_endo with R = sqrt(area / pi).
    Exact for concentric or eccentric circles, within ~2% for ellipses (Steiner's formula),
    and it only counts pixels: distance-transform estimates carry a lattice bias of up to
    a third of a pixel that grows with thickness. Slices are weighted by myocardium area,
    so small apical caps weigh little.
    """
    mask, (_, dy, dx) = _check(mask, spacing)
    pixel_mm2 = dy * dx
    cavity = (mask == LV_BLOOD).sum(axis=(1, 2)) * pixel_mm2
    myo = (mask == LV_MYO).sum(axis=(1, 2)) * pixel_mm2
    both = (cavity > 0) & (myo > 0)
    if not both.any():
        return float("nan")
    cavity, myo = cavity[both], myo[both]
    per_slice = np.sqrt((cavity + myo) / np.pi) - np.sqrt(cavity / np.pi)
    return float(per_slice @ myo / myo.sum())


def measure_volume(mask: np.ndarray, spacing: Sequence[float]) -> dict[str, float]:
    """Measure one (slices, H, W) mask with spacing (dz, dy, dx) mm.

    Returns LV_ML and RV_ML (blood-pool volumes, mL), MYO_THICK (mean LV wall thickness, mm),
    ANGLE (degrees in [0, 360): direction LV centre -> RV centre, atan2(d_row, d_col) in mm,
    LV centre = centroid of cavity and myocardium) and DEPTH (slices containing myocardium).
    """
    mask, (dz, dy, dx) = _check(mask, spacing)
    voxel_ml = dz * dy * dx / 1000.0
    counts = np.bincount(mask.ravel().clip(0, 4), minlength=5)
    lv_ml = counts[LV_BLOOD] * voxel_ml if counts[LV_BLOOD] else float("nan")
    rv_ml = counts[RV_BLOOD] * voxel_ml if counts[RV_BLOOD] else float("nan")

    angle = float("nan")
    lv = (mask == LV_BLOOD) | (mask == LV_MYO)
    rv = mask == RV_BLOOD
    if lv.any() and rv.any():
        # Centroids from row/column projections: no coordinate grids needed.
        (lv_r, lv_c), (rv_r, rv_c) = _centroid(lv), _centroid(rv)
        angle = math.degrees(math.atan2((rv_r - lv_r) * dy, (rv_c - lv_c) * dx)) % 360.0

    return {
        "LV_ML": float(lv_ml),
        "RV_ML": float(rv_ml),
        "MYO_THICK": wall_thickness(mask, (dz, dy, dx)),
        "ANGLE": angle,
        "DEPTH": int((mask == LV_MYO).any(axis=(1, 2)).sum()),
    }


def _centroid(region: np.ndarray) -> tuple[float, float]:
    rows = region.sum(axis=(0, 2))
    cols = region.sum(axis=(0, 1))
    n = rows.sum()
    return float(rows @ np.arange(rows.size)) / n, float(cols @ np.arange(cols.size)) / n


def measure_patient(
    mask_ed: np.ndarray, mask_es: np.ndarray, spacing: Sequence[float]
) -> dict[str, float]:
    """The ten cardiac attributes of one patient from its ED and ES masks.

    Keys: LVEDV LVESV LVEF RVEDV RVESV RVEF MYOESTHICK MYOEDTHICK ANGLE DEPTH; ANGLE and
    DEPTH are those of the ED mask.
    """
    ed = measure_volume(mask_ed, spacing)
    es = measure_volume(mask_es, spacing)
    return {
        "LVEDV": ed["LV_ML"],
        "LVESV": es["LV_ML"],
        "LVEF": ejection_fraction(ed["LV_ML"], es["LV_ML"]),
        "RVEDV": ed["RV_ML"],
        "RVESV": es["RV_ML"],
        "RVEF": ejection_fraction(ed["RV_ML"], es["RV_ML"]),
        "MYOESTHICK": es["MYO_THICK"],
        "MYOEDTHICK": ed["MYO_THICK"],
        "ANGLE": ed["ANGLE"],
        "DEPTH": ed["DEPTH"],
    }
