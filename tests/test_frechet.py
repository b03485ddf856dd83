"""Fréchet distance against independent computations."""

import numpy as np
import pytest
from scipy import linalg

from dpsynth.evaluation.frechet import feature_statistics, frechet_distance, real_vs_real_baseline


def random_psd(rng, d, rank=None):
    a = rng.normal(size=(d, rank or d))
    return a @ a.T + (0 if rank else 0.1 * np.eye(d))


def scipy_frechet(mu1, s1, mu2, s2):
    covmean = linalg.sqrtm(s1 @ s2).real
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * covmean))


def test_diagonal_gaussians_closed_form():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    a, b = rng.uniform(0.1, 4, 5), rng.uniform(0.1, 4, 5)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-10)


def test_one_dimensional_case():
    # W2² of N(0, 1) and N(3, 4): 9 + (1 - 2)² = 10.
    assert frechet_distance([0.0], [[1.0]], [3.0], [[4.0]]) == pytest.approx(10.0)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_matches_scipy_on_full_rank_psd(seed):
    rng = np.random.default_rng(seed)
    mu1, mu2 = rng.normal(size=8), rng.normal(size=8)
    s1, s2 = random_psd(rng, 8), random_psd(rng, 8)
    ours = frechet_distance(mu1, s1, mu2, s2)
    assert ours == pytest.approx(scipy_frechet(mu1, s1, mu2, s2), rel=1e-7)
    assert ours == pytest.approx(frechet_distance(mu2, s2, mu1, s1), rel=1e-10)  # symmetric


def test_zero_for_identical_sets_even_when_rank_deficient():
    rng = np.random.default_rng(4)
    features = rng.normal(size=(10, 30))  # N < D: covariance of rank 9
    mu, sigma = feature_statistics(features)
    assert np.linalg.matrix_rank(sigma) == 9
    assert frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=1e-8)


def test_rank_deficient_pair_is_finite_and_symmetric():
    rng = np.random.default_rng(5)
    s1, s2 = random_psd(rng, 20, rank=5), random_psd(rng, 20, rank=7)
    mu = np.zeros(20)
    d12, d21 = frechet_distance(mu, s1, mu, s2), frechet_distance(mu, s2, mu, s1)
    assert np.isfinite(d12) and d12 > 0
    assert d12 == pytest.approx(d21, rel=1e-8)


def test_feature_statistics():
    rng = np.random.default_rng(6)
    x = rng.normal(size=(50, 3))
    mu, sigma = feature_statistics(x)
    np.testing.assert_allclose(mu, x.mean(0))
    np.testing.assert_allclose(sigma, np.cov(x.T))
    with pytest.raises(ValueError):
        feature_statistics(x[:1])


def test_real_vs_real_baseline_scales_with_sample_noise():
    rng = np.random.default_rng(7)
    features = rng.normal(size=(400, 4))
    baseline = real_vs_real_baseline(features, np.random.default_rng(0))
    assert baseline == real_vs_real_baseline(features, np.random.default_rng(0))
    shifted = frechet_distance(*feature_statistics(features), *feature_statistics(features + 1.0))
    assert 0 < baseline < 0.2 and shifted == pytest.approx(4.0, rel=1e-9)
