"""Fréchet distance between Gaussians fitted to feature sets, with a real-vs-real baseline."""

from __future__ import annotations

import numpy as np


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and unbiased covariance (D, D) of features (N, D), in float64."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or len(features) < 2:
        raise ValueError(f"need features of shape (N >= 2, D), got {features.shape}")
    return features.mean(axis=0), np.atleast_2d(np.cov(features, rowvar=False))


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray
) -> float:
    """‖μ1 − μ2‖² + Tr(Σ1 + Σ2 − 2 (Σ1 Σ2)^½).

    Σ1 Σ2 is not symmetric, so `scipy.linalg.sqrtm` of it can return complex or non-finite
    values for rank-deficient covariances (N < D is common). Instead we use
    Tr((Σ1 Σ2)^½) = Tr((√Σ1 Σ2 √Σ1)^½): the inner matrix is symmetric PSD and similar to
    Σ1 Σ2, so its eigenvalues (via `eigh`, clipped at 0 against round-off) give the trace
    exactly without complex arithmetic or an ε·I offset.
    """
    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    sigma1 = np.atleast_2d(sigma1).astype(np.float64)
    sigma2 = np.atleast_2d(sigma2).astype(np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape[0] != mu1.shape[0]:
        raise ValueError(
            f"shape mismatch: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs {sigma2.shape}"
        )
    root1 = _psd_sqrt(sigma1)
    inner = root1 @ sigma2 @ root1
    eigenvalues = np.linalg.eigvalsh((inner + inner.T) / 2.0)
    trace_sqrt = np.sqrt(np.clip(eigenvalues, 0.0, None)).sum()
    diff = mu1 - mu2
    distance = diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt
    # Round-off can leave a tiny negative value for identical distributions.
    return float(max(distance, 0.0))


def real_vs_real_baseline(features: np.ndarray, rng: np.random.Generator) -> float:
    """Fréchet distance between two random halves of one feature set: the scale of 'no gap'.

    Fréchet estimates are biased upwards by roughly 1/n per set, so halves (n/2 each) sit
    above an n-vs-n comparison of identical distributions: a value somewhat below the
    baseline means "no measurable gap", not "better than real".
    """
    features = np.asarray(features)
    if len(features) < 4:
        raise ValueError(f"need at least 4 samples for a two-halves baseline, got {len(features)}")
    order = rng.permutation(len(features))
    half = len(features) // 2
    a, b = features[order[:half]], features[order[half : 2 * half]]
    return frechet_distance(*feature_statistics(a), *feature_statistics(b))


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric PSD matrix (negative round-off eigenvalues → 0)."""
    eigenvalues, vectors = np.linalg.eigh((matrix + matrix.T) / 2.0)
    return (vectors * np.sqrt(np.clip(eigenvalues, 0.0, None))) @ vectors.T
