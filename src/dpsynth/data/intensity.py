"""The intensity convention every prepared volume follows, and the one function that applies it.

`prepare` scales each volume so that its 0.5th and 99.5th intensity percentiles map to 0
and 1, then clips. A decoded volume does not follow it by itself: the autoencoder lifts
the darkest voxels (lungs, air) and rarely reaches full brightness, so the sampler puts
each decoded volume on the same convention before anyone reads it (BENCHMARKS.md,
"Fidelity metrics that rank", "Decoded volumes on the data's intensity convention").
"""

from __future__ import annotations

import numpy as np

NORMALISATION = {"method": "percentile", "low": 0.5, "high": 99.5, "clip": [0.0, 1.0]}


def normalise(volume: np.ndarray) -> np.ndarray:
    """One volume to [0, 1]: percentiles 0.5 and 99.5 to 0 and 1, then clipping.

    A few hot voxels do not squash the rest; a flat volume maps to zeros.
    """
    lo, hi = np.percentile(volume, (NORMALISATION["low"], NORMALISATION["high"]))
    if hi <= lo:
        return np.zeros_like(volume, dtype=np.float32)
    return np.clip((volume - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)


def normalise_each(volumes: np.ndarray) -> np.ndarray:
    """`normalise` applied to each volume of a batch (N, S, H, W)."""
    return np.stack([normalise(v) for v in volumes]) if len(volumes) else volumes
