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

``variant="study"`` reproduces the reference study's pipeline instead, as read in its public
code (compai-lab/2024-miccai-dgm-daum: `optim/metrics/fid.py` for the pre-processing and
formula, `projects/cardiac_diffusion/DownstreamEvaluator.py` for slices 3..9 and the two
halves; learnt from, not copied). Its extractor is torchvision's ImageNet Inception-v3 with
``fc = Identity`` and ``transform_input=False``, which expects ImageNet-normalised input, so
that variant normalises for it. It reports the true Fréchet distance of those features and,
labelled separately, the study's own formula (comparable with its FID 26.77 / 92.52)::

    net = torchvision.models.inception_v3(weights="IMAGENET1K_V1", transform_input=False)
    net.fc = torch.nn.Identity()
    torch.jit.trace(net.eval(), torch.rand(2, 3, 299, 299)).save("inception_study.pt")
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from dpsynth.data.volumes import VolumeSet
from dpsynth.errors import DpsynthError
from dpsynth.evaluation.frechet import feature_statistics, frechet_distance, real_vs_real_baseline

N_MIDDLE_SLICES = 7
INPUT_SIZE = 299
FID_VARIANTS = ("standard", "study")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class FIDResult:
    value: float
    baseline: float
    config: str
    n_real: int
    n_synthetic: int
    # variant "study" only: the study's formula (not a Fréchet distance) on its two halves,
    # and the same on two halves of the real set, its "FID Real"
    study_value: float | None = None
    study_baseline: float | None = None


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


def _standard_input(batch: torch.Tensor) -> torch.Tensor:
    """(B, 1, H, W) -> (B, 3, 299, 299) in [0, 1]: the extractor normalises itself."""
    batch = F.interpolate(batch.clamp(0.0, 1.0), size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear")
    return batch.expand(-1, 3, -1, -1)


def resize_shorter_side(batch: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear resize of (B, C, H, W) so the shorter side is `size`, keeping the aspect
    ratio (torchvision's ``Resize(size)`` rule for the longer side: truncated)."""
    h, w = batch.shape[-2:]
    if h <= w:
        out = (size, int(size * w / h))
    else:
        out = (int(size * h / w), size)
    return F.interpolate(batch, size=out, mode="bilinear")


def _study_input(batch: torch.Tensor) -> torch.Tensor:
    """(B, 1, H, W) -> (B, 3, 299, 299) as the study fed torchvision's Inception-v3: resize
    (shorter side), centre crop, grey to RGB, ImageNet normalisation; no clamping."""
    batch = resize_shorter_side(batch, INPUT_SIZE)
    h, w = batch.shape[-2:]
    top, left = round((h - INPUT_SIZE) / 2), round((w - INPUT_SIZE) / 2)
    batch = batch[..., top : top + INPUT_SIZE, left : left + INPUT_SIZE].expand(-1, 3, -1, -1)
    mean = batch.new_tensor(IMAGENET_MEAN)[:, None, None]
    std = batch.new_tensor(IMAGENET_STD)[:, None, None]
    return (batch - mean) / std


def study_fid_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray
) -> float:
    """The study's "FID": mean |μ1 − μ2| + Tr(Σ1 + Σ2 − 2 U √S Vᵀ), U S Vᵀ = svd(Σ1 Σ2).

    Not the Fréchet distance (BRIEF §2, flaw 1): the mean term is the mean absolute
    difference of the feature means (``l1_loss``, reduction "mean"), not ‖μ1 − μ2‖², and
    U √S Vᵀ is not a square root of Σ1 Σ2 unless that product is symmetric PSD. Kept only
    so figures can be compared with the study's; computed here in float64.
    """
    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    sigma1 = np.atleast_2d(sigma1).astype(np.float64)
    sigma2 = np.atleast_2d(sigma2).astype(np.float64)
    u, s, vh = np.linalg.svd(sigma1 @ sigma2)
    root = (u * np.sqrt(s)) @ vh
    return float(np.mean(np.abs(mu1 - mu2)) + np.trace(sigma1 + sigma2 - 2.0 * root))


def study_fid_halves(real_f: np.ndarray, synthetic_f: np.ndarray) -> tuple[float, float]:
    """The study's figure and its real-vs-real counterpart from middle-slice features.

    As the study: each set is cut, in order and by volume, into a first and a second half;
    "FID Generated" is the mean of real half i vs synthetic half i (i = 1, 2), "FID Real" is
    real half 1 vs real half 2. (The study cut each test batch; we cut the whole set. With
    an odd count the last volume is left out, as two equal halves are needed.)
    """
    halves = []
    for f in (real_f, synthetic_f):
        n = len(f) // N_MIDDLE_SLICES // 2 * N_MIDDLE_SLICES  # rows of whole volumes
        if n < 2:
            raise DpsynthError("the study's FID needs at least 2 volumes per set")
        halves.append((feature_statistics(f[:n]), feature_statistics(f[n : 2 * n])))
    (r1, r2), (s1, s2) = halves
    generated = (study_fid_distance(*r1, *s1) + study_fid_distance(*r2, *s2)) / 2.0
    return generated, study_fid_distance(*r1, *r2)


@torch.no_grad()
def inception_features(
    volumes: np.ndarray,
    extractor: torch.nn.Module,
    batch_size: int = 32,
    variant: str = "standard",
) -> np.ndarray:
    """Features (N * 7, D) of the middle slices (volume-major), grey replicated to RGB."""
    prepare = _study_input if variant == "study" else _standard_input
    images = middle_slices(volumes)
    features = []
    for start in range(0, len(images), batch_size):
        batch = torch.from_numpy(np.ascontiguousarray(images[start : start + batch_size]))
        out = extractor(prepare(batch.float().unsqueeze(1)))
        features.append(out.reshape(len(batch), -1).double().numpy())
    return np.concatenate(features)


def compute_fid(
    real: VolumeSet,
    synthetic: VolumeSet,
    weights: str | Path,
    seed: int = 0,
    variant: str = "standard",
) -> FIDResult:
    """FID of synthetic vs real middle slices, with the two-halves-of-real baseline.

    ``variant="study"`` feeds the extractor as the reference study did and adds its own
    figure (`study_value`, `study_baseline`); `value` stays the Fréchet distance.
    """
    if variant not in FID_VARIANTS:
        raise DpsynthError(f"fid variant: unknown {variant!r}; choose from {list(FID_VARIANTS)}")
    extractor = load_feature_extractor(weights)
    real_f = inception_features(real.volumes, extractor, variant=variant)
    synthetic_f = inception_features(synthetic.volumes, extractor, variant=variant)
    value = frechet_distance(*feature_statistics(real_f), *feature_statistics(synthetic_f))
    if variant == "study":
        prepared = (
            f"resized (shorter side) and centre-cropped to {INPUT_SIZE}, ImageNet-normalised "
            "(the study's pre-processing)"
        )
    else:
        prepared = f"{INPUT_SIZE}x{INPUT_SIZE} bilinear"
    result = FIDResult(
        value=value,
        baseline=real_vs_real_baseline(real_f, np.random.default_rng(seed)),
        config=(
            f"Fréchet distance; middle {N_MIDDLE_SLICES} slices as 2D images, {prepared}, "
            f"TorchScript extractor {Path(weights).name} ({real_f.shape[1]}-d)"
        ),
        n_real=len(real_f),
        n_synthetic=len(synthetic_f),
    )
    if variant == "study":
        result.study_value, result.study_baseline = study_fid_halves(real_f, synthetic_f)
    return result
