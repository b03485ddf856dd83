"""FID as in the reference study: the middle 7 slices as 2D images through Inception-v3.

No weights are downloaded. The user supplies a TorchScript feature extractor that maps a
float batch (B, 3, 299, 299) with RGB values in [0, 1] to pool features (B, 2048) and does
its own input normalisation (as pytorch-fid's `FIDInceptionA..E` network does). Make one
where torchvision or pytorch-fid is installed, e.g.::

    from pytorch_fid.inception import InceptionV3
    net = InceptionV3([3], normalize_input=True).eval()
    class Pool(torch.nn.Module):
        def __init__(self, net): super().__init__(); self.net = net
        def forward(self, x): return self.net(x)[0].flatten(1)
    torch.jit.trace(Pool(net), torch.rand(2, 3, 299, 299)).save("inception_fid.pt")

TorchScript holds the architecture and weights without pickled Python objects, so we need
no Inception-v3 definition of our own (torchvision cannot be installed beside our torch).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from dpsynth.errors import DpsynthError
from dpsynth.evaluation.frechet import feature_statistics, frechet_distance, real_vs_real_baseline
from dpsynth.evaluation.volumes import VolumeSet

N_MIDDLE_SLICES = 7
INPUT_SIZE = 299


@dataclass
class FIDResult:
    value: float
    baseline: float
    config: str
    n_real: int
    n_synthetic: int


def load_feature_extractor(path: str | Path) -> torch.jit.ScriptModule:
    """Load the user's TorchScript Inception-v3 feature extractor (see the module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise DpsynthError(f"{path}: inception weights file not found")
    try:
        module = torch.jit.load(str(path), map_location="cpu")
    except (RuntimeError, ValueError) as e:
        raise DpsynthError(
            f"{path}: not a TorchScript file (expected (B,3,299,299) -> (B,2048) features): "
            f"{str(e).splitlines()[0]}"
        ) from None
    return module.eval()


def middle_slices(volumes: np.ndarray, n: int = N_MIDDLE_SLICES) -> np.ndarray:
    """The `n` central slices of each volume as 2D images: (N, S, H, W) -> (N * n, H, W)."""
    slices = volumes.shape[1]
    if slices < n:
        raise DpsynthError(f"FID needs at least {n} slices per volume, got {slices}")
    start = (slices - n) // 2
    return volumes[:, start : start + n].reshape(-1, *volumes.shape[2:])


@torch.no_grad()
def inception_features(
    volumes: np.ndarray, extractor: torch.nn.Module, batch_size: int = 32
) -> np.ndarray:
    """Features (N * 7, D) of the middle slices, grey replicated to RGB, resized to 299²."""
    images = middle_slices(volumes)
    features = []
    for start in range(0, len(images), batch_size):
        batch = torch.from_numpy(np.ascontiguousarray(images[start : start + batch_size]))
        batch = batch.float().unsqueeze(1).clamp(0.0, 1.0)
        batch = F.interpolate(batch, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear")
        out = extractor(batch.expand(-1, 3, -1, -1))
        features.append(out.reshape(len(batch), -1).double().numpy())
    return np.concatenate(features)


def compute_fid(
    real: VolumeSet, synthetic: VolumeSet, weights: str | Path, seed: int = 0
) -> FIDResult:
    """FID of synthetic vs real middle slices, with the two-halves-of-real baseline."""
    extractor = load_feature_extractor(weights)
    real_f = inception_features(real.volumes, extractor)
    synthetic_f = inception_features(synthetic.volumes, extractor)
    value = frechet_distance(*feature_statistics(real_f), *feature_statistics(synthetic_f))
    return FIDResult(
        value=value,
        baseline=real_vs_real_baseline(real_f, np.random.default_rng(seed)),
        config=(
            f"middle {N_MIDDLE_SLICES} slices as 2D images, {INPUT_SIZE}x{INPUT_SIZE} "
            f"bilinear, TorchScript extractor {Path(weights).name} ({real_f.shape[1]}-d)"
        ),
        n_real=len(real_f),
        n_synthetic=len(synthetic_f),
    )
