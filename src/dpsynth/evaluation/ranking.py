"""Does a fidelity distance rank sets of known quality in the right order? (issue 12 §4)

Control sets are built from real volumes of patients the reference set does not hold, so
their place in the order is known without any model: an independent real set, the same
volumes blurred in-plane at increasing strength, and noise images. A trustworthy distance
to the real reference grows along

    independent real < blur σ1 < blur σ2 < blur σ3 < every noise set.

Noise here keeps each volume's exact intensity histogram (a voxel permutation) or its
histogram and a smooth spatial texture (a Gaussian random field rank-matched to it), so a
metric that looks only at intensity statistics cannot tell it from real data. Noise decoded
by an untrained generator is made where a model is at hand (`benchmarks/bench_fidelity_ranking.py`).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

# In-plane Gaussian blur (mm): about 0.5, 1 and 2 pixels at the demo's 3.65 mm grid.
BLUR_SIGMAS_MM = (2.0, 4.0, 8.0)
# Correlation length of the smooth noise (mm in-plane; slices are independent-ish).
NOISE_SIGMA_MM = 6.0
INDEPENDENT = "independent real"


def blur_name(sigma_mm: float) -> str:
    return f"blur {sigma_mm:g} mm"


def blurred(
    volumes: np.ndarray, spacing: tuple[float, float, float], sigma_mm: float
) -> np.ndarray:
    """Volumes (N, S, H, W) blurred in-plane only (slices are 8-10 mm apart in cine MRI)."""
    sigma = (0.0, 0.0, sigma_mm / spacing[1], sigma_mm / spacing[2])
    return ndimage.gaussian_filter(np.asarray(volumes, dtype=np.float32), sigma).astype(np.float32)


def histogram_noise(volumes: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Each volume's voxels in random places: its exact histogram, no structure."""
    return np.stack([rng.permutation(v.ravel()).reshape(v.shape) for v in volumes])


def smooth_histogram_noise(
    volumes: np.ndarray, spacing: tuple[float, float, float], rng: np.random.Generator
) -> np.ndarray:
    """A smooth Gaussian random field per volume, rank-matched to that volume's histogram:
    real intensities and blob-like texture, no anatomy (what an untrained decoder draws)."""
    sigma = (0.5, NOISE_SIGMA_MM / spacing[1], NOISE_SIGMA_MM / spacing[2])
    out = np.empty_like(volumes, dtype=np.float32)
    for i, volume in enumerate(volumes):
        field = ndimage.gaussian_filter(rng.standard_normal(volume.shape), sigma)
        ranks = np.argsort(field, axis=None)
        flat = np.empty(volume.size, dtype=np.float32)
        flat[ranks] = np.sort(volume, axis=None)
        out[i] = flat.reshape(volume.shape)
    return out


def control_sets(
    independent: np.ndarray,
    spacing: tuple[float, float, float],
    seed: int = 0,
    sigmas_mm: tuple[float, ...] = BLUR_SIGMAS_MM,
) -> dict[str, np.ndarray]:
    """The model-free control sets, in their expected order (best first, noise last)."""
    rng = np.random.default_rng(seed)
    sets = {INDEPENDENT: np.asarray(independent, dtype=np.float32)}
    for sigma in sigmas_mm:
        sets[blur_name(sigma)] = blurred(independent, spacing, sigma)
    sets["noise: voxel permutation"] = histogram_noise(independent, rng)
    sets["noise: smooth, real histogram"] = smooth_histogram_noise(independent, spacing, rng)
    return sets


def ranking_errors(
    distances: dict[str, float], sigmas_mm: tuple[float, ...] = BLUR_SIGMAS_MM
) -> list[str]:
    """What breaks the expected order in `distances` (set name -> distance to the reference);
    empty when the metric ranks correctly. Sets named "noise..." must all come after the
    blurred ones; other names (e.g. a synthetic set) are not checked."""
    ordered = [INDEPENDENT, *(blur_name(s) for s in sorted(sigmas_mm))]
    ordered = [name for name in ordered if name in distances]
    errors = [
        f"{a} ({distances[a]:.4g}) >= {b} ({distances[b]:.4g})"
        for a, b in zip(ordered, ordered[1:], strict=False)
        if not distances[a] < distances[b]
    ]
    worst_real = ordered[-1] if ordered else None
    for name, value in distances.items():
        if name.startswith("noise") and worst_real and not distances[worst_real] < value:
            errors.append(f"{name} ({value:.4g}) <= {worst_real} ({distances[worst_real]:.4g})")
    return errors


def place_of(value: float, distances: dict[str, float]) -> str:
    """Where a distance falls among the control sets, e.g. 'between blur 4 mm and blur 8 mm'."""
    ranked = sorted(distances.items(), key=lambda kv: kv[1])
    below = [name for name, v in ranked if v <= value]
    above = [name for name, v in ranked if v > value]
    if not below:
        return f"below {above[0]}"
    if not above:
        return f"above {below[-1]}"
    return f"between {below[-1]} and {above[0]}"
