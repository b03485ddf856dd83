"""A DP generative model of the private attribute table, for releasable conditioning.

Model. Patients fall into three SEX strata (female, male, unknown); each has a weight,
and over the ten base variables (:data:`BASE`: EDV and EF of both ventricles, wall
thicknesses, AGE, BMI, ANGLE, DEPTH) a multivariate Gaussian plus a per-variable
missingness rate. Each variable is mapped to [-1, 1] over its FIXED clinical range
(:mod:`dpsynth.attributes`, public) and clipped there. Sampling draws a stratum, then the
Gaussian, clips to [-1, 1], maps back, blanks values at the missingness rates (missing
completely at random), and derives the rest deterministically: ESV = EDV (1 - EF / 100)
(EF lies in its clinical range 5-85 %, so ESV < EDV), then EF = ejection_fraction(EDV,
ESV) exactly (NaN where EDV is missing, as in real tables), DEPTH is rounded, and each
patient gives an ED row (ESED 1) and an identical ES row (ESED 0). EF rather than ESV is
modelled because it is nearly independent of EDV: the noise that loosens the modelled
correlations then barely distorts ESV and EF.

Privacy. One record = one patient (rows of a patient are averaged first). Per stratum we
release, in one Gaussian mechanism, the count, the missing counts, the sums of the
(missing -> 0) values and the sums of their outer products (upper triangle). With d = 10
variables in [-1, 1] one patient changes these blocks by at most 1, √d, √d and
√(d(d+1)/2) in L2, and only inside its own stratum. Each block is scaled so its L2
sensitivity is √share (the fixed shares in :data:`BLOCK_SHARES` sum to 1), so the whole
vector has sensitivity 1 and gets N(0, σ²) noise per coordinate: one ledger entry
``(σ, 1.0, 1)`` whose ε is the requested one. Everything after is post-processing:
means and second moments from the noisy sums (pairwise counts assume independent
missingness), the covariance projected to positive definite, and strata whose noisy count
is below :data:`MIN_STRATUM` use the statistics pooled over all strata.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import stats

from dpsynth.attributes import ATTRIBUTES, CLINICAL_RANGES, INDEX, N_ATTRIBUTES, ejection_fraction
from dpsynth.errors import DpsynthError
from dpsynth.io import atomic_write_json, read_json
from dpsynth.privacy.accounting import (
    DEFAULT_ACCOUNTANT,
    DEFAULT_DELTA,
    check_delta,
    warn_delta,
)
from dpsynth.privacy.ledger import LedgerEntry
from dpsynth.privacy.statistics import gaussian_noise_multiplier, group_mean

BASE = (
    "LVEDV",
    "LVEF",
    "RVEDV",
    "RVEF",
    "MYOEDTHICK",
    "MYOESTHICK",
    "AGE",
    "BMI",
    "ANGLE",
    "DEPTH",
)
STRATA = (0.0, 1.0, math.nan)  # SEX codes; NaN = unknown
# Fixed (data-independent) split of the noise budget between the released blocks.
BLOCK_SHARES = {"count": 0.05, "missing": 0.10, "sum": 0.25, "outer": 0.60}
MIN_STRATUM = 20.0
VARIANCE_FLOOR = 1e-4  # in normalised units: keeps every covariance positive definite
FORMAT_VERSION = 1

_D = len(BASE)
_BASE_IDX = np.array([INDEX[a] for a in BASE])
_LO = np.array([CLINICAL_RANGES[a][0] for a in BASE])
_HI = np.array([CLINICAL_RANGES[a][1] for a in BASE])
_TRIU = np.triu_indices(_D)
# (block name, size, L2 sensitivity of one patient's unscaled contribution)
_BLOCKS = (
    ("count", 1, 1.0),
    ("missing", _D, math.sqrt(_D)),
    ("sum", _D, math.sqrt(_D)),
    ("outer", len(_TRIU[0]), math.sqrt(_D * (_D + 1) / 2)),
)


@dataclass(frozen=True)
class Stratum:
    """One SEX stratum: `weight` (noisy patient count), Gaussian `mean` / `cov` over BASE in
    normalised units, and the `missing` rate of each BASE variable."""

    sex: float
    weight: float
    mean: np.ndarray
    cov: np.ndarray
    missing: np.ndarray


@dataclass(frozen=True)
class AttributeModel:
    """A fitted DP attribute model; see the module docstring for the design."""

    strata: tuple[Stratum, ...]
    noise_multiplier: float
    delta: float
    epsilon: float | None = None

    def sample(self, n_patients: int, rng: np.random.Generator) -> np.ndarray:
        """(2 n, 14) raw attributes: rows 2i (ED, ESED 1) and 2i+1 (ES, ESED 0) of patient i."""
        if isinstance(n_patients, bool) or not isinstance(n_patients, numbers.Integral):
            raise DpsynthError(f"n_patients: must be an integer >= 0, got {n_patients!r}")
        if n_patients < 0:
            raise DpsynthError(f"n_patients: must be an integer >= 0, got {n_patients}")
        weights = np.array([max(s.weight, 0.0) for s in self.strata])
        if weights.sum() <= 0:  # noise wiped out every count: fall back to equal strata
            weights = np.ones(len(weights))
        which = rng.choice(len(self.strata), size=n_patients, p=weights / weights.sum())
        rows = np.full((n_patients, N_ATTRIBUTES), np.nan)
        for k, s in enumerate(self.strata):
            idx = np.flatnonzero(which == k)
            z = s.mean + rng.standard_normal((len(idx), _D)) @ np.linalg.cholesky(s.cov).T
            x = _LO + (np.clip(z, -1.0, 1.0) + 1.0) / 2.0 * (_HI - _LO)
            x[rng.random(x.shape) < s.missing] = np.nan
            rows[np.ix_(idx, _BASE_IDX)] = x
            rows[idx, INDEX["SEX"]] = s.sex
        rows[:, INDEX["DEPTH"]] = np.round(rows[:, INDEX["DEPTH"]])
        for side in ("LV", "RV"):
            edv, ef = rows[:, INDEX[f"{side}EDV"]], rows[:, INDEX[f"{side}EF"]]
            esv = edv * (1.0 - ef / 100.0)  # EF in its clinical range [5, 85] %: ESV < EDV
            rows[:, INDEX[f"{side}ESV"]] = esv
            rows[:, INDEX[f"{side}EF"]] = ejection_fraction(edv, esv)  # NaN if EDV missing
        out = np.repeat(rows, 2, axis=0)
        out[:, INDEX["ESED"]] = np.tile([1.0, 0.0], n_patients)
        return out

    def to_json(self) -> dict:
        return {
            "format_version": FORMAT_VERSION,
            "variables": list(BASE),
            "privacy": {
                "epsilon": self.epsilon,
                "delta": self.delta,
                "noise_multiplier": self.noise_multiplier,
            },
            "strata": [
                {
                    "sex": None if math.isnan(s.sex) else s.sex,
                    "weight": s.weight,
                    "mean": s.mean.tolist(),
                    "cov": s.cov.tolist(),
                    "missing": s.missing.tolist(),
                }
                for s in self.strata
            ],
        }

    @classmethod
    def from_json(cls, obj: dict, source: str = "attribute model") -> AttributeModel:
        try:
            if obj["format_version"] != FORMAT_VERSION or obj["variables"] != list(BASE):
                raise DpsynthError(f"{source}: unsupported format_version or variables")
            strata = tuple(
                Stratum(
                    sex=math.nan if s["sex"] is None else float(s["sex"]),
                    weight=float(s["weight"]),
                    mean=np.asarray(s["mean"], dtype=np.float64),
                    cov=np.asarray(s["cov"], dtype=np.float64),
                    missing=np.asarray(s["missing"], dtype=np.float64),
                )
                for s in obj["strata"]
            )
            privacy = obj["privacy"]
            model = cls(
                strata,
                float(privacy["noise_multiplier"]),
                float(privacy["delta"]),
                None if privacy["epsilon"] is None else float(privacy["epsilon"]),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise DpsynthError(
                f"{source}: malformed attribute model ({type(e).__name__}: {e})"
            ) from None
        if not model.strata:
            raise DpsynthError(f"{source}: no strata")
        for s in model.strata:
            ok = (
                (math.isnan(s.sex) or s.sex in (0.0, 1.0))
                and s.mean.shape == (_D,)
                and np.all(np.isfinite(s.mean))
                and s.cov.shape == (_D, _D)
                and s.missing.shape == (_D,)
                and np.all(np.isfinite(s.cov))
                and np.all((s.missing >= 0) & (s.missing <= 1))
                and np.all(np.linalg.eigvalsh(s.cov) > 0)
            )
            if not ok:
                raise DpsynthError(f"{source}: stratum sex={s.sex}: invalid mean/cov/missing")
        return model

    def save(self, path: str | Path) -> None:
        atomic_write_json(path, self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> AttributeModel:
        return cls.from_json(read_json(path), source=str(path))


def _patient_table(table: np.ndarray, patients: np.ndarray | None) -> np.ndarray:
    """(P, 14) one row per patient; ANGLE is averaged on the circle."""
    table = np.asarray(table, dtype=np.float64)
    if table.ndim != 2 or table.shape[1] != N_ATTRIBUTES:
        raise DpsynthError(f"table: expected shape (rows, {N_ATTRIBUTES}), got {table.shape}")
    phases = table[:, INDEX["ESED"]]
    if patients is None and np.unique(phases[np.isfinite(phases)]).size > 1:
        # two rows of one patient counted as two records would double the true sensitivity
        raise DpsynthError(
            "table: rows hold both phases (ESED 0 and 1): pass patients=<id per row>"
        )
    angle = np.deg2rad(table[:, INDEX["ANGLE"]])
    per_patient = group_mean(np.column_stack([table, np.cos(angle), np.sin(angle)]), patients)
    cos, sin = per_patient[:, -2], per_patient[:, -1]
    per_patient[:, INDEX["ANGLE"]] = np.rad2deg(np.arctan2(sin, cos)) % 360.0
    return per_patient[:, :N_ATTRIBUTES]


def _contributions(records: np.ndarray) -> np.ndarray:
    """(P, blocks) unscaled per-patient contribution: [1, missing, x, triu(x xᵀ)]."""
    x = 2.0 * (records[:, _BASE_IDX] - _LO) / (_HI - _LO) - 1.0
    missing = np.isnan(x)
    x = np.where(missing, 0.0, np.clip(x, -1.0, 1.0))
    outer = (x[:, :, None] * x[:, None, :])[:, _TRIU[0], _TRIU[1]]
    return np.column_stack([np.ones(len(x)), missing, x, outer])


def _block_scale() -> np.ndarray:
    """Per-coordinate factor that gives each block L2 sensitivity √share (total 1)."""
    return np.concatenate(
        [np.full(size, math.sqrt(BLOCK_SHARES[name]) / sens) for name, size, sens in _BLOCKS]
    )


def _moments(stat: np.ndarray) -> tuple[float, np.ndarray, np.ndarray, np.ndarray]:
    """Post-processing of one stratum's noisy sums -> (count, mean, PD covariance, missing)."""
    count, missing, sums, outer_triu = np.split(stat, np.cumsum([1, _D, _D]))
    n = max(float(count[0]), 1.0)
    rate = np.clip(missing / n, 0.0, 1.0)
    present = np.maximum(n * (1.0 - rate), 1.0)
    mean = np.clip(sums / present, -1.0, 1.0)
    outer = np.zeros((_D, _D))
    outer[_TRIU] = outer_triu
    outer = outer + np.triu(outer, 1).T
    pairs = np.maximum(n * np.outer(1.0 - rate, 1.0 - rate), 1.0)
    np.fill_diagonal(pairs, present)
    cov = outer / pairs - np.outer(mean, mean)
    vals, vecs = np.linalg.eigh((cov + cov.T) / 2)
    cov = (vecs * np.clip(vals, VARIANCE_FLOOR, None)) @ vecs.T
    return float(count[0]), mean, (cov + cov.T) / 2, rate


def fit_attribute_model(
    table: np.ndarray,
    *,
    rng: np.random.Generator,
    epsilon: float | None = None,
    noise_multiplier: float | None = None,
    delta: float = DEFAULT_DELTA,
    patients: np.ndarray | None = None,
    accountant: str = DEFAULT_ACCOUNTANT,
    fingerprint: str = "",
) -> tuple[AttributeModel, LedgerEntry]:
    """Fit the model on a private table with (`epsilon`, `delta`)-DP (or a given σ).

    `table` is (P, 14) with one row per patient, or per-volume rows with `patients` giving
    each row's patient id. Returns the model and the ledger entry that charges it.
    """
    delta = check_delta(delta)
    sigma = gaussian_noise_multiplier(epsilon, noise_multiplier, delta, accountant)
    records = _patient_table(table, patients)
    sex = records[:, INDEX["SEX"]]
    if not np.all(np.isnan(sex) | (sex == 0) | (sex == 1)):
        raise DpsynthError("table: SEX must be 0, 1 or NaN")
    warn_delta(delta, len(records))

    scale = _block_scale()
    contrib = _contributions(records)
    released = []
    for code in STRATA:
        member = np.isnan(sex) if math.isnan(code) else sex == code
        noisy = contrib[member].sum(axis=0) * scale + rng.normal(0.0, sigma, scale.shape)
        released.append(noisy / scale)
    pooled = _moments(np.sum(released, axis=0))
    strata = []
    for code, stat in zip(STRATA, released, strict=True):
        count, mean, cov, rate = _moments(stat)
        if count < MIN_STRATUM:
            _, mean, cov, rate = pooled
        strata.append(Stratum(code, max(count, 0.0), mean, cov, rate))

    model = AttributeModel(tuple(strata), sigma, delta, epsilon)
    entry = LedgerEntry.gaussian(
        "attribute-model",
        sigma,
        records=len(records),
        delta=delta,
        accountant=accountant,
        fingerprint=fingerprint,
        note=(
            "per-SEX-stratum counts, missing counts, sums and outer products of the "
            "clinically-normalised base attributes, L2 sensitivity 1 after block scaling"
        ),
    )
    return model, entry


def attribute_fidelity(real: np.ndarray, synthetic: np.ndarray) -> dict:
    """Marginal and pairwise fidelity of synthetic attribute rows (N, 14) against real ones.

    Per attribute (raw units, NaN excluded): Wasserstein-1, Kolmogorov–Smirnov statistic,
    mean, std and missing rate of both; plus the largest absolute difference between the
    pairwise-complete Pearson correlation matrices (pairs constant in either set skipped).
    """
    real = np.asarray(real, dtype=np.float64)
    synthetic = np.asarray(synthetic, dtype=np.float64)
    for name, arr in (("real", real), ("synthetic", synthetic)):
        if arr.ndim != 2 or arr.shape[1] != N_ATTRIBUTES or len(arr) == 0:
            raise DpsynthError(
                f"{name}: expected shape (rows >= 1, {N_ATTRIBUTES}), got {arr.shape}"
            )
    per_attribute = {}
    for j, name in enumerate(ATTRIBUTES):
        a, b = real[np.isfinite(real[:, j]), j], synthetic[np.isfinite(synthetic[:, j]), j]
        both = a.size > 0 and b.size > 0
        per_attribute[name] = {
            "wasserstein": float(stats.wasserstein_distance(a, b)) if both else math.nan,
            "ks": float(stats.ks_2samp(a, b).statistic) if both else math.nan,
            "mean_real": float(a.mean()) if a.size else math.nan,
            "mean_synthetic": float(b.mean()) if b.size else math.nan,
            "std_real": float(a.std()) if a.size else math.nan,
            "std_synthetic": float(b.std()) if b.size else math.nan,
            "missing_real": 1.0 - a.size / len(real),
            "missing_synthetic": 1.0 - b.size / len(synthetic),
        }
    diff = np.abs(_pairwise_correlation(real) - _pairwise_correlation(synthetic))
    max_diff = float(np.nanmax(diff)) if np.isfinite(diff).any() else math.nan
    return {
        "n_real": len(real),
        "n_synthetic": len(synthetic),
        "attributes": per_attribute,
        "max_abs_correlation_difference": max_diff,
    }


def _pairwise_correlation(x: np.ndarray) -> np.ndarray:
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
