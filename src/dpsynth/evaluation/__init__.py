"""Evaluation: fidelity (FRD, Fréchet distances, FID), diversity, controllability, utility."""

from dpsynth.data.volumes import VolumeSet, load_volume_set
from dpsynth.evaluation.evaluate import ALL_METRICS, evaluate
from dpsynth.evaluation.frechet import feature_statistics, frechet_distance, real_vs_real_baseline
from dpsynth.evaluation.referee import Referee, train_referee

__all__ = [
    "ALL_METRICS",
    "Referee",
    "VolumeSet",
    "evaluate",
    "feature_statistics",
    "frechet_distance",
    "load_volume_set",
    "real_vs_real_baseline",
    "train_referee",
]
