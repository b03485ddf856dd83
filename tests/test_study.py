"""The reference study's evaluation variants, each against values worked out by hand."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_referee import SPACING, phantoms

from dpsynth.attributes import INDEX, N_ATTRIBUTES
from dpsynth.data.volumes import VolumeSet
from dpsynth.evaluation.evaluate import evaluate
from dpsynth.evaluation.fid import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    _study_input,
    compute_fid,
    study_fid_distance,
)
from dpsynth.evaluation.frechet import frechet_distance
from dpsynth.evaluation.study import (
    clean_padding_slices,
    ms_ssim_side,
    neighbour_ms_ssim,
    study_controllability,
    zero_padding_masks,
)

C1 = 0.01**2  # SSIM luminance constant at data range 1


def test_study_fid_formula_by_hand():
    # Commuting covariances: U√S Vᵀ is the true root; only the mean term differs.
    mu1, mu2 = np.zeros(2), np.array([1.0, 3.0])
    s1, s2 = np.diag([1.0, 4.0]), np.diag([4.0, 1.0])
    # mean |Δμ| = 2; Tr(Σ1 + Σ2) = 10; Σ1Σ2 = 4 I, root 2 I, trace 4
    assert study_fid_distance(mu1, s1, mu2, s2) == pytest.approx(2 + 10 - 8)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(10 + 10 - 8)
    # Non-commuting: Σ1Σ2 = [[2, 0], [1, 0]] has singular values √5, 0 with u = (2, 1)/√5,
    # v = (1, 0), so Tr(U√S Vᵀ) = 5^¼ · 2/√5; its true root has trace √2 (eigenvalues 2, 0).
    s1, s2 = np.array([[2.0, 1.0], [1.0, 2.0]]), np.diag([1.0, 0.0])
    assert study_fid_distance(mu1, s1, mu1, s2) == pytest.approx(5 - 4 * 5**-0.25)
    assert frechet_distance(mu1, s1, mu1, s2) == pytest.approx(5 - 2 * math.sqrt(2))


def test_study_fid_formula_matches_the_torch_primitives_it_was_read_from():
    # the study: l1_loss (reduction "mean") of the means, torch.svd of Σ1Σ2 in its trace
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(30, 5)), rng.normal(1.0, 2.0, size=(20, 5)) @ rng.normal(size=(5, 5))
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    t = [torch.from_numpy(x) for x in (mu1, s1, mu2, s2)]
    u, sv, v = torch.svd(t[1] @ t[3])
    expected = F.l1_loss(t[0], t[2]) + torch.trace(
        t[1] + t[3] - 2 * u @ torch.diag(sv.sqrt()) @ v.T
    )
    assert study_fid_distance(mu1, s1, mu2, s2) == pytest.approx(float(expected), rel=1e-9)


def test_study_inception_input_normalises_and_centre_crops():
    x = torch.full((1, 1, 2, 4), 0.7)  # non-square: shorter side to 299, then crop
    out = _study_input(x)
    assert out.shape == (1, 3, 299, 299)
    expected = [(0.7 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD, strict=True)]
    np.testing.assert_allclose(out[0, :, 150, 150], expected, rtol=1e-6)
    assert out[0, 0].std() < 1e-6  # no clamping or padding crept in


def _constant_sets(values: list[float], slices: int = 13) -> VolumeSet:
    """Volumes whose middle 7 slices are constant `value`; the other slices are 1.0."""
    n = len(values)
    volumes = np.ones((n, slices, 8, 8), np.float32)
    start = (slices - 7) // 2
    for i, v in enumerate(values):
        volumes[i, start : start + 7] = v
    attributes = np.full((n, N_ATTRIBUTES), np.nan, np.float32)
    return VolumeSet(volumes, attributes, SPACING, [f"v{i}" for i in range(n)])


def test_study_fid_pipeline_by_hand(tmp_path):
    class ChannelMean(torch.nn.Module):  # stand-in extractor: 1 feature = red-channel mean
        def forward(self, x):
            return x[:, :1].mean(dim=(2, 3))

    torch.jit.script(ChannelMean()).save(str(tmp_path / "stand_in.pt"))
    real_values, synthetic_values = [0.2, 0.4, 0.6, 0.8], [0.3, 0.3, 0.9, 0.5]
    r = compute_fid(
        _constant_sets(real_values),
        _constant_sets(synthetic_values),
        tmp_path / "stand_in.pt",
        variant="study",
    )

    def feature(v):  # a constant slice stays constant; ImageNet normalisation of red
        return (v - IMAGENET_MEAN[0]) / IMAGENET_STD[0]

    def half_stats(a, b):  # 7 rows of each of two volumes: mean, unbiased variance
        return (feature(a) + feature(b)) / 2, 7 * (feature(a) - feature(b)) ** 2 / 26

    def study_1d(p, q):  # |Δμ| + σ1² + σ2² − 2 σ1 σ2
        return abs(p[0] - q[0]) + (math.sqrt(p[1]) - math.sqrt(q[1])) ** 2

    r1, r2 = half_stats(0.2, 0.4), half_stats(0.6, 0.8)
    s1, s2 = half_stats(0.3, 0.3), half_stats(0.9, 0.5)
    assert r.study_value == pytest.approx((study_1d(r1, s1) + study_1d(r2, s2)) / 2, rel=1e-5)
    assert r.study_baseline == pytest.approx(study_1d(r1, r2), rel=1e-5)
    # `value` stays the Fréchet distance of all 28 rows per set: Δμ² + (σ1 − σ2)²
    f_real = [feature(v) for v in real_values for _ in range(7)]
    f_synthetic = [feature(v) for v in synthetic_values for _ in range(7)]
    expected = (np.mean(f_real) - np.mean(f_synthetic)) ** 2 + (
        np.std(f_real, ddof=1) - np.std(f_synthetic, ddof=1)
    ) ** 2
    assert r.value == pytest.approx(expected, rel=1e-5)
    assert "ImageNet" in r.config and r.n_real == 28


def test_ms_ssim_side_follows_the_study():
    assert ms_ssim_side(96) == 192  # the study: 2^ceil(log2(160/96)) * 96
    assert ms_ssim_side(64) == 256 and ms_ssim_side(48) == 192
    assert ms_ssim_side(200) == 200
    assert ms_ssim_side(80) == 320  # the study's rule gives 160, which 5 scales refuse


def test_neighbour_ms_ssim_by_hand():
    # Constant images: every contrast term is (0 + C2) / (0 + C2) = 1, so MS-SSIM is the
    # coarsest-scale luminance (2ab + C1) / (a² + b² + C1) to the power 0.1333.
    values = [0.2, 0.5, 0.8, 0.35]
    volumes = np.stack([np.full((9, 48, 48), v, np.float32) for v in values])
    volumes[:, 0] = 0.0  # outside the middle 7: must not count

    def pair(a, b):
        return ((2 * a * b + C1) / (a * a + b * b + C1)) ** 0.1333

    # neighbours: each volume with its predecessor, wrapping (the study's roll by 1)
    expected = np.mean([pair(0.2, 0.35), pair(0.5, 0.2), pair(0.8, 0.5), pair(0.35, 0.8)])
    result = neighbour_ms_ssim(volumes)
    # float32 leaves mu_xx - mu_x² ~ 1e-7 instead of 0, which against C2 = 9e-4 moves each
    # contrast term by < 1e-4 (the study's library computes in float32 too)
    assert result.value == pytest.approx(expected, abs=2e-4)
    assert result.n_pairs == 4 and "192" in result.config


def test_padding_clean_up_by_hand():
    checker = (np.indices((4, 4)).sum(0) % 2).astype(np.float32)  # eight 1s, std 0.52
    volumes = np.stack(
        [
            np.stack([np.full((4, 4), 0.5), checker, np.full((4, 4), 0.9)]),
            np.stack([checker, 0.7 + 0.05 * checker, checker]),  # std 0.026: padding
        ]
    ).astype(np.float32)
    cleaned = clean_padding_slices(volumes)
    # padding slices are zeroed first; the set's mean is then 3 checkers * 8 / 96 voxels
    for i, s in [(0, 0), (0, 2), (1, 1)]:
        np.testing.assert_allclose(cleaned[i, s], 0.25)
    np.testing.assert_array_equal(cleaned[0, 1], checker)
    # the study decides on images with the unbiased std (<= 0.1) and on masks with the
    # population std (< 0.1): half 0, half 0.197 has 0.1017 and 0.0985
    edge = np.where(checker > 0, 0.197, 0.0).astype(np.float32)[None, None]
    np.testing.assert_array_equal(clean_padding_slices(edge), edge)
    masks = np.ones((1, 1, 4, 4), np.uint8)
    assert zero_padding_masks(edge, masks).sum() == 0
    masks = np.ones((2, 3, 4, 4), np.uint8)
    kept = zero_padding_masks(cleaned, masks)
    assert kept.sum(axis=(2, 3)).tolist() == [[0, 16, 0], [16, 0, 16]]


class _FixedMasks:
    """A stand-in referee that returns given masks (and records what it was shown)."""

    def __init__(self, masks):
        self.masks, self.seen = masks, None

    def segment(self, volumes):
        self.seen = volumes
        return self.masks

    def predict_phase(self, volumes):
        return np.zeros(len(volumes))


def test_study_controllability_by_hand():
    # Four volumes ED, ES, ED, ES of 3 slices; slice 0 is padding (constant).
    checker = (np.indices((6, 6)).sum(0) % 2).astype(np.float32)
    volumes = np.stack([np.stack([np.full((6, 6), 0.3), checker, checker])] * 4)
    masks = np.zeros((4, 3, 6, 6), np.uint8)
    lv_pixels, rv_pixels, padding_lv = [1, 2, 3, 4], [1, 2, 3, 4], [4, 0, 0, 0]
    for i in range(4):
        flat = masks[i].reshape(3, -1)
        flat[1:, : lv_pixels[i]] = 1
        flat[1:, 10 : 10 + rv_pixels[i]] = 3
        flat[1:, 20 : 20 + 4 + i] = 2  # myocardium
        flat[0, : padding_lv[i]] = 1  # the segmenter's output on padding: must be dropped
        flat[0, 30:36] = 2
    spacing = (10.0, 1.0, 1.0)  # 0.01 mL per voxel
    attributes = np.full((4, N_ATTRIBUTES), np.nan, np.float32)
    phases = ["ED", "ES", "ED", "ES"]
    # measured LV = 2 slices * (1, 2, 3, 4) * 0.01 mL; requested ∝ (1, 3, 2, 4): r = 4/5
    requested_lv, requested_rv = [1, 3, 2, 4], [4, 3, 2, 1]
    for i, phase in enumerate(phases):
        attributes[i, INDEX["ESED"]] = 1.0 if phase == "ED" else 0.0
        attributes[i, INDEX[f"LV{phase}V"]] = 0.02 * requested_lv[i]
        attributes[i, INDEX[f"RV{phase}V"]] = 0.02 * requested_rv[i]
        # annulus of cavity A and myocardium M pixels (1 mm²): √((A + M)/π) − √(A/π)
        a, m = lv_pixels[i], 4 + i
        attributes[i, INDEX[f"MYO{phase}THICK"]] = math.sqrt((a + m) / math.pi) - math.sqrt(
            a / math.pi
        )
    synthetic = VolumeSet(volumes, attributes, spacing, [f"v{i}" for i in range(4)])
    referee = _FixedMasks(masks)
    summary = study_controllability(referee, synthetic)
    np.testing.assert_allclose(referee.seen[:, 0], 1 / 3, rtol=1e-6)  # padding cleaned
    assert summary["LV_VOLUME"]["r"] == pytest.approx(0.8)
    assert summary["LV_VOLUME"]["n"] == 4  # ED and ES pooled
    assert summary["RV_VOLUME"]["r"] == pytest.approx(-1.0)
    assert summary["MYO_THICK"]["r"] == pytest.approx(1.0, abs=1e-6)
    assert summary["LV_VOLUME"]["mae"] == pytest.approx(np.mean([0, 0.02, 0.02, 0]), abs=1e-7)


def test_evaluate_study_variants_are_labelled_and_optional(tmp_path):
    class Tiny(torch.nn.Module):
        def forward(self, x):
            return torch.nn.functional.adaptive_avg_pool2d(x, 2).flatten(1)

    torch.jit.script(Tiny()).save(str(tmp_path / "inc.pt"))
    real, synthetic = phantoms(8, shape=(9, 16, 16), seed=1), phantoms(6, (9, 16, 16), seed=2)
    referee = _FixedMasks(None)
    referee.segment = lambda volumes: np.zeros(volumes.shape, np.uint8)
    kwargs = dict(metrics=("fid", "ms_ssim", "controllability"), referee=referee)
    kwargs |= dict(inception_weights=tmp_path / "inc.pt", ms_ssim_pairs=4)
    default = evaluate(real, synthetic, tmp_path / "a", **kwargs)["metrics"]
    assert not [k for k in default if k.endswith("_study") or "_study_" in k]
    study = evaluate(real, synthetic, tmp_path / "b", study=True, **kwargs)["metrics"]
    for name in ("fid_study", "ms_ssim_study", "controllability_study_lv_r"):
        assert "reference study" in study[name]["note"], name
    assert "not a Fréchet distance" in study["fid_study"]["config"]
    assert study["fid"]["value"] >= 0 and "ImageNet" in study["fid"]["config"]
    assert study["fid_study"]["value"] != pytest.approx(study["fid"]["value"])
