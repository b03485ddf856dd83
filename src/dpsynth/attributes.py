"""The 14 conditioning attributes, in the study's order, with fixed public clinical ranges.

Normalisation uses these fixed ranges (never statistics of private data), so it shapes
the model without touching anyone's records (BRIEF section 3).
"""

from __future__ import annotations

import numpy as np

ATTRIBUTES: tuple[str, ...] = (
    "LVEDV",
    "LVESV",
    "LVEF",
    "RVEDV",
    "RVESV",
    "RVEF",
    "MYOESTHICK",
    "MYOEDTHICK",
    "AGE",
    "SEX",
    "BMI",
    "ESED",
    "ANGLE",
    "DEPTH",
)
N_ATTRIBUTES = len(ATTRIBUTES)
INDEX = {name: i for i, name in enumerate(ATTRIBUTES)}

UNITS = {
    "LVEDV": "mL",
    "LVESV": "mL",
    "LVEF": "%",
    "RVEDV": "mL",
    "RVESV": "mL",
    "RVEF": "%",
    "MYOESTHICK": "mm",
    "MYOEDTHICK": "mm",
    "AGE": "years",
    "SEX": "0 female, 1 male",
    "BMI": "kg/m2",
    "ESED": "0 ES, 1 ED",
    "ANGLE": "degrees, signed",
    "DEPTH": "slices",
}

# Categorical attributes and their allowed codes.
CATEGORICAL: dict[str, tuple[int, ...]] = {"SEX": (0, 1), "ESED": (0, 1)}

# Fixed clinical ranges (public knowledge, wide enough for pathology). Values are mapped
# linearly to [-1, 1] over these ranges; values outside are allowed but flagged at sampling.
CLINICAL_RANGES: dict[str, tuple[float, float]] = {
    "LVEDV": (40.0, 400.0),
    "LVESV": (10.0, 350.0),
    "LVEF": (5.0, 85.0),
    "RVEDV": (40.0, 400.0),
    "RVESV": (10.0, 350.0),
    "RVEF": (5.0, 85.0),
    "MYOESTHICK": (3.0, 25.0),
    "MYOEDTHICK": (2.0, 20.0),
    "AGE": (0.0, 100.0),
    "SEX": (0.0, 1.0),
    "BMI": (12.0, 50.0),
    "ESED": (0.0, 1.0),
    # ANGLE: the whole signed domain (dpsynth.orientation); real hearts lie within about
    # +-45 (the study's grid), so the wrap at +-180 is never reached.
    "ANGLE": (-180.0, 180.0),
    "DEPTH": (0.0, 20.0),
}

# Attributes that describe one phase; the rest are per patient.
PHASES = ("ED", "ES")
ESED_CODE = {"ED": 1.0, "ES": 0.0}


def normalize(values: np.ndarray) -> np.ndarray:
    """Map raw attribute values (..., 14) to [-1, 1] over the clinical ranges; NaN stays NaN."""
    values = np.asarray(values, dtype=np.float32)
    lo = np.array([CLINICAL_RANGES[a][0] for a in ATTRIBUTES], dtype=np.float32)
    hi = np.array([CLINICAL_RANGES[a][1] for a in ATTRIBUTES], dtype=np.float32)
    return 2.0 * (values - lo) / (hi - lo) - 1.0


def denormalize(values: np.ndarray) -> np.ndarray:
    """Inverse of :func:`normalize`."""
    values = np.asarray(values, dtype=np.float32)
    lo = np.array([CLINICAL_RANGES[a][0] for a in ATTRIBUTES], dtype=np.float32)
    hi = np.array([CLINICAL_RANGES[a][1] for a in ATTRIBUTES], dtype=np.float32)
    return (values + 1.0) / 2.0 * (hi - lo) + lo


def ejection_fraction(edv: float | np.ndarray, esv: float | np.ndarray) -> float | np.ndarray:
    """EF in percent, NaN where EDV is missing or zero."""
    edv = np.asarray(edv, dtype=np.float64)
    esv = np.asarray(esv, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        ef = np.where(edv > 0, 100.0 * (edv - esv) / edv, np.nan)
    return ef if ef.ndim else float(ef)


def bmi(height_cm: float, weight_kg: float) -> float:
    """Body-mass index from height (cm) and weight (kg); NaN when either is missing."""
    if not (np.isfinite(height_cm) and np.isfinite(weight_kg)) or height_cm <= 0:
        return float("nan")
    return float(weight_kg / (height_cm / 100.0) ** 2)


def pairwise_correlation(x: np.ndarray) -> np.ndarray:
    """Pearson r over rows where both columns are present; NaN if < 3 rows or constant."""
    d = x.shape[1]
    r = np.full((d, d), np.nan)
    for i in range(d):
        for j in range(i + 1, d):
            ok = np.isfinite(x[:, i]) & np.isfinite(x[:, j])
            a, b = x[ok, i], x[ok, j]
            if ok.sum() >= 3 and a.std() > 0 and b.std() > 0:
                r[i, j] = r[j, i] = np.corrcoef(a, b)[0, 1]
    return r
