"""The intensity convention every prepared volume follows, and the one function that applies it.

`prepare` scales each volume so that its 0.5th and 99.5th intensity percentiles map to 0
and 1, then clips. It does so on the whole field of view, before the crop around the
heart, so a cached volume's own percentiles are near 0 and 1, not exactly (on the demo's
test split they are exactly 0 and 1). A decoded volume does not follow the convention by
itself: the autoencoder lifts the darkest voxels (lungs, air) and rarely reaches full
brightness, so the sampler puts each volume it decodes on the convention before anyone
reads it (BENCHMARKS.md, "Decoded volumes on the data's intensity convention").
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
    if len(volumes) == 0:
        return np.asarray(volumes, dtype=np.float32)
    return np.stack([normalise(v) for v in volumes])
