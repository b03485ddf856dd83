"""The reference study's evaluation protocol, so figures can be set beside its published ones.

Read in the study's public code (compai-lab/2024-miccai-dgm-daum,
`projects/cardiac_diffusion/DownstreamEvaluator.py`) and rewritten here, not copied:

- padding clean-up: synthetic slices that are nearly constant (in-plane std <= 0.1) are
  set to the mean of the set and, after segmentation, their masks are zeroed;
- MS-SSIM between neighbouring samples (sample i vs i - 1, wrapping), middle 7 slices,
  up-sampled so that 5 scales with an 11-pixel window fit;
- controllability as Pearson r of LV volume, RV volume and myocardial thickness with ED and
  ES pooled (the requested value is the attribute of the volume's own phase).

The study's FID variant lives in `dpsynth.evaluation.fid` (``variant="study"``). All of it is
a non-default option (`evaluate(study=True)`, `dpsynth evaluate --study`), reported under
names ending in ``_study`` next to dpsynth's own figures.
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import torch
from monai.metrics.regression import compute_ms_ssim

from dpsynth.data.volumes import VolumeSet
from dpsynth.evaluation.controllability import POOLED, Measurer, rows_from_masks, summarise
from dpsynth.evaluation.diversity import MSSSIMResult
from dpsynth.evaluation.fid import N_MIDDLE_SLICES, middle_slices, resize_shorter_side

PADDING_STD = 0.1
# pytorch_msssim (the study's library) needs the shorter side > (11 - 1) * 2**4 for 5 scales
MS_SSIM_MIN_SIDE = 160


def clean_padding_slices(volumes: np.ndarray, threshold: float = PADDING_STD) -> np.ndarray:
    """Volumes (N, S, H, W) with near-constant slices replaced by one mean value.

    As the study: a slice is "padding" when its in-plane standard deviation (unbiased, as
    ``torch.std``) is <= `threshold`; those slices are zeroed, and then set to the mean of
    the whole set so zeroed (the study took the mean of its generated batch this way).
    """
    volumes = np.asarray(volumes, dtype=np.float32)
    empty = volumes.std(axis=(2, 3), ddof=1, keepdims=True) <= threshold
    kept = np.where(empty, np.float32(0.0), volumes)
    return np.where(empty, np.float32(kept.mean(dtype=np.float64)), kept)


def zero_padding_masks(
    volumes: np.ndarray, masks: np.ndarray, threshold: float = PADDING_STD
) -> np.ndarray:
    """Masks with every label removed on slices whose image std (population, as numpy's
    default; the study's segmentation fix-up) is < `threshold`."""
    flat = np.asarray(volumes).std(axis=(2, 3)) < threshold
    return np.where(flat[:, :, None, None], 0, masks).astype(masks.dtype)


def ms_ssim_side(side: int) -> int:
    """The study's up-sampling for MS-SSIM: the smallest power-of-two multiple of the
    shorter side that exceeds 160 (unchanged if it already does). The study computed
    2^ceil(log2(160 / side)) * side, which equals this except where it lands on 160
    exactly and the library then refuses (e.g. 80 px); we double once more there."""
    if side > MS_SSIM_MIN_SIDE:
        return side
    factor = 2 ** math.ceil(math.log2(MS_SSIM_MIN_SIDE / side))
    return side * factor * (2 if side * factor <= MS_SSIM_MIN_SIDE else 1)


@torch.no_grad()
def neighbour_ms_ssim(volumes: np.ndarray, batch_volumes: int = 16) -> MSSSIMResult:
    """Mean MS-SSIM of each volume with its predecessor (circular), as the study measured it.

    Each of the middle 7 slices is one 2D image (the study passed the slices as channels,
    which its library scores per channel and averages); 5 scales, Gaussian window 11,
    sigma 1.5, the standard weights (MONAI's defaults equal pytorch_msssim's).
    """
    n = len(volumes)
    if n < 2:
        raise ValueError("MS-SSIM diversity needs at least 2 volumes")
    side = ms_ssim_side(min(volumes.shape[-2:]))
    images = middle_slices(volumes).reshape(n, N_MIDDLE_SLICES, *volumes.shape[-2:])
    previous = np.roll(np.arange(n), 1)
    scores = []
    for start in range(0, n, batch_volumes):
        index = np.arange(start, min(start + batch_volumes, n))
        a, b = (_upsampled(images[i], side) for i in (index, previous[index]))
        scores.append(compute_ms_ssim(a, b, spatial_dims=2, data_range=1.0).flatten())
    value = float(torch.cat(scores).double().mean())
    return MSSSIMResult(
        value=value,
        config=(
            f"the study's MS-SSIM: each volume vs its neighbour, middle {N_MIDDLE_SLICES} "
            f"slices up-sampled to a {side}-pixel shorter side, 5 scales, Gaussian window 11"
        ),
        n_pairs=n,
    )


def _upsampled(images: np.ndarray, side: int) -> torch.Tensor:
    """(V, 7, H, W) -> (V * 7, 1, h, w), shorter side `side`, bilinear (the study's Resize)."""
    x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))
    x = resize_shorter_side(x, side)
    return x.reshape(-1, 1, *x.shape[-2:])


def clean_volume_set(volume_set: VolumeSet) -> VolumeSet:
    """A copy of `volume_set` with the study's padding clean-up applied to its volumes."""
    return replace(volume_set, volumes=clean_padding_slices(volume_set.volumes))


def study_controllability(
    referee: Measurer, synthetic: VolumeSet, real_rows: list[tuple] | None = None
) -> dict[str, dict[str, float | int]]:
    """Pooled (ED + ES) requested-vs-measured agreement, as the study computed it.

    The synthetic volumes get the padding clean-up before segmentation and their masks are
    zeroed on padding slices after it. `real_rows` (dpsynth's controllability rows with
    set "real") give the referee's own agreement on real volumes as ceiling; the study had
    none, and cleaned only generated volumes.
    """
    cleaned = clean_volume_set(synthetic)
    masks = zero_padding_masks(cleaned.volumes, referee.segment(cleaned.volumes))
    rows = rows_from_masks(cleaned, masks, "synthetic")
    summary = summarise(rows, "synthetic", POOLED)
    ceiling = summarise(real_rows or [], "real", POOLED)
    return {
        group: stats
        | {
            "ceiling_r": ceiling.get(group, {}).get("r", float("nan")),
            "ceiling_n": ceiling.get(group, {}).get("n", 0),
        }
        for group, stats in summary.items()
    }
