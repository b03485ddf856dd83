"""Gaussian-mechanism statistics of private data (DP hygiene), each charged to the ledger.

A record is a patient: rows of one patient are averaged before clipping, so one patient
moves a statistic by at most its stated L2 sensitivity. Neighbouring datasets differ by
adding or removing one patient, as in DP-SGD's accounting, so each release is a Gaussian
mechanism with sample rate 1 and one step: ``(σ, 1.0, 1)`` in the accountant's history,
composed with everything else in the ledger. The dataset size in the ledger entry is
treated as public, as DP-SGD's sample rate does.
"""

from __future__ import annotations

import math

import numpy as np

from dpsynth.config import DEFAULT_DELTA
from dpsynth.errors import DpsynthError
from dpsynth.privacy.accounting import (
    DEFAULT_ACCOUNTANT,
    check_delta,
    check_mechanism,
    noise_for_epsilon,
    warn_delta,
)
from dpsynth.privacy.ledger import LedgerEntry


def group_mean(values: np.ndarray, groups: np.ndarray | None) -> np.ndarray:
    """Per-group mean of the rows of `values` ignoring NaN (NaN where a group has none).

    Groups come out in sorted order of their ids; `groups=None` returns the rows unchanged.
    """
    values = np.asarray(values, dtype=np.float64)
    if groups is None:
        return values
    groups = np.asarray(groups)
    if groups.shape != values.shape[:1]:
        raise DpsynthError(
            f"patients: expected one id per row ({values.shape[0]}), got shape {groups.shape}"
        )
    _, inverse = np.unique(groups, return_inverse=True)
    n_groups = int(inverse.max()) + 1 if inverse.size else 0
    present = np.isfinite(values)
    sums = np.zeros((n_groups, *values.shape[1:]))
    counts = np.zeros_like(sums)
    np.add.at(sums, inverse, np.where(present, values, 0.0))
    np.add.at(counts, inverse, present)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, sums / counts, np.nan)


def gaussian_noise_multiplier(
    epsilon: float | None,
    noise_multiplier: float | None,
    delta: float = DEFAULT_DELTA,
    accountant: str = DEFAULT_ACCOUNTANT,
) -> float:
    """σ of a one-shot Gaussian mechanism: given, or calibrated so that it spends `epsilon`."""
    if (epsilon is None) == (noise_multiplier is None):
        raise DpsynthError("epsilon / noise_multiplier: give exactly one of them")
    if epsilon is not None:
        return noise_for_epsilon(epsilon, delta, 1.0, 1, accountant)
    return check_mechanism((noise_multiplier, 1.0, 1), key="noise_multiplier").noise_multiplier


def dp_mean(
    values: np.ndarray,
    lower: float,
    upper: float,
    *,
    rng: np.random.Generator,
    epsilon: float | None = None,
    noise_multiplier: float | None = None,
    delta: float = DEFAULT_DELTA,
    patients: np.ndarray | None = None,
    accountant: str = DEFAULT_ACCOUNTANT,
    stage: str = "dp-mean",
    cache_id: str = "",
) -> tuple[float, LedgerEntry]:
    """DP mean of a per-patient scalar clipped to [lower, upper], and its ledger entry.

    With centre c and half-width h of the bounds, each patient contributes
    ``((clip(x) - c) / h, 1)``: L2 sensitivity √2. Both coordinates of the summed vector get
    N(0, 2σ²) noise (noise multiplier σ), and the release is ``c + h · sum / max(count, 1)``
    clipped to the bounds. Patients whose values are all NaN are left out.
    """
    if not (math.isfinite(lower) and math.isfinite(upper) and lower < upper):
        raise DpsynthError(f"bounds: need finite lower < upper, got [{lower}, {upper}]")
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 1:
        raise DpsynthError(f"values: expected one scalar per row, got shape {values.shape}")
    delta = check_delta(delta)
    sigma = gaussian_noise_multiplier(epsilon, noise_multiplier, delta, accountant)

    per_patient = group_mean(values, patients)
    x = np.clip(per_patient[np.isfinite(per_patient)], lower, upper)
    warn_delta(delta, len(per_patient))
    centre, half = (lower + upper) / 2, (upper - lower) / 2
    noise_std = sigma * math.sqrt(2.0)
    noisy_sum = np.sum((x - centre) / half) + rng.normal(0.0, noise_std)
    noisy_count = len(x) + rng.normal(0.0, noise_std)
    mean = float(np.clip(centre + half * noisy_sum / max(noisy_count, 1.0), lower, upper))
    entry = LedgerEntry.gaussian(
        stage,
        sigma,
        records=len(per_patient),
        delta=delta,
        accountant=accountant,
        cache_id=cache_id,
        note=(
            f"clipped mean over [{lower:g}, {upper:g}]: (sum of (x-c)/h, count) per patient, "
            f"L2 sensitivity sqrt(2), noise std {noise_std:.4g}"
        ),
    )
    return mean, entry


def dp_latent_scale(
    latents: np.ndarray,
    *,
    rng: np.random.Generator,
    max_second_moment: float = 16.0,
    epsilon: float | None = None,
    noise_multiplier: float | None = None,
    delta: float = DEFAULT_DELTA,
    patients: np.ndarray | None = None,
    accountant: str = DEFAULT_ACCOUNTANT,
    cache_id: str = "",
) -> tuple[float, LedgerEntry]:
    """Latent scale factor ``1 / sqrt(E[z²])`` with E[z²] a DP mean per patient.

    `latents` is (N, ...) unscaled latents, or (N,) per-volume means of z² (computed batch
    by batch for cohorts larger than memory). Each patient's second moment is clipped to
    [0, max_second_moment]; the estimate is floored at 1e-4 · max_second_moment so that
    noise can never produce an infinite scale.
    """
    z = np.asarray(latents)
    if z.ndim > 1:
        z = np.mean(np.square(z.reshape(len(z), -1), dtype=np.float64), axis=1)
    second_moment, entry = dp_mean(
        z,
        0.0,
        max_second_moment,
        rng=rng,
        epsilon=epsilon,
        noise_multiplier=noise_multiplier,
        delta=delta,
        patients=patients,
        accountant=accountant,
        stage="latent-scale",
        cache_id=cache_id,
    )
    return 1.0 / math.sqrt(max(second_moment, 1e-4 * max_second_moment)), entry
