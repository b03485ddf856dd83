"""Utility: train on synthetic, test on real (TSTR) against train on real (TRTR).

A small MONAI Regressor predicts LVEF (regression on the fixed-range normalised value)
and ED/ES (a logit) from a volume. Labels are each set's attributes: the conditioning
attributes for synthetic volumes, the true ones for real volumes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from monai.networks.nets import Regressor

from dpsynth.attributes import INDEX, denormalize, normalize
from dpsynth.data.volumes import VolumeSet
from dpsynth.errors import DpsynthError
from dpsynth.evaluation.controllability import agreement


@dataclass
class UtilityResult:
    tstr: dict[str, float]
    trtr: dict[str, float] | None
    config: str


def _labels(volume_set: VolumeSet) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised LVEF and ESED, NaN where unknown."""
    normalised = normalize(volume_set.attributes)
    return (
        torch.from_numpy(normalised[:, INDEX["LVEF"]].copy()),
        torch.from_numpy(volume_set.attributes[:, INDEX["ESED"]].astype(np.float32)),
    )


def train_predictor(
    train: VolumeSet, epochs: int = 10, batch_size: int = 8, lr: float = 1e-3, seed: int = 0
) -> torch.nn.Module:
    """Fit the LVEF + ED/ES network; unknown labels are left out of the loss."""
    lvef, esed = _labels(train)
    if torch.isnan(lvef).all() and torch.isnan(esed).all():
        raise DpsynthError(f"{train.source}: no LVEF or ESED labels to train the utility model")
    torch.manual_seed(seed)
    net = Regressor(
        in_shape=(1, *train.shape),
        out_shape=(2,),
        channels=(8, 16, 32),
        strides=[(1, 2, 2)] * 3,
        num_res_units=1,
        norm="instance",
    )
    optimizer = torch.optim.AdamW(net.parameters(), lr=lr)
    rng = np.random.default_rng(seed)
    net.train()
    for _ in range(epochs):
        for batch in np.array_split(rng.permutation(len(train)), max(1, len(train) // batch_size)):
            x = torch.from_numpy(np.ascontiguousarray(train.volumes[batch], dtype=np.float32))
            out = net(x.unsqueeze(1))
            loss = out.sum() * 0.0  # keeps the graph when a batch has no labels
            known = ~torch.isnan(lvef[batch])
            if known.any():
                loss = loss + F.mse_loss(out[known, 0], lvef[batch][known])
            known = ~torch.isnan(esed[batch])
            if known.any():
                loss = loss + F.binary_cross_entropy_with_logits(out[known, 1], esed[batch][known])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return net.eval()


@torch.no_grad()
def score_predictor(
    net: torch.nn.Module, test: VolumeSet, batch_size: int = 16
) -> dict[str, float]:
    """LVEF MAE (%) and Pearson r, ED/ES accuracy on a labelled test set."""
    outputs = torch.cat(
        [
            net(
                torch.from_numpy(
                    np.ascontiguousarray(test.volumes[s : s + batch_size], dtype=np.float32)
                ).unsqueeze(1)
            )
            for s in range(0, len(test), batch_size)
        ]
    ).numpy()
    predicted = np.full((len(test), len(INDEX)), np.nan, dtype=np.float32)
    predicted[:, INDEX["LVEF"]] = outputs[:, 0]
    lvef = agreement(
        test.attributes[:, INDEX["LVEF"]].astype(np.float64),
        denormalize(predicted)[:, INDEX["LVEF"]].astype(np.float64),
    )
    esed = test.attributes[:, INDEX["ESED"]]
    known = ~np.isnan(esed)
    accuracy = (
        float(np.mean((outputs[known, 1] > 0) == (esed[known] == 1.0)))
        if known.any()
        else float("nan")
    )
    return {
        "lvef_mae": lvef["mae"],
        "lvef_r": lvef["r"],
        "esed_accuracy": accuracy,
        "n_test": len(test),
    }


def evaluate_utility(
    synthetic: VolumeSet,
    real_test: VolumeSet,
    real_train: VolumeSet | None = None,
    epochs: int = 10,
    seed: int = 0,
) -> UtilityResult:
    """TSTR scores, and TRTR scores of the same network when a real train split is given."""
    tstr = score_predictor(train_predictor(synthetic, epochs=epochs, seed=seed), real_test)
    tstr["n_train"] = len(synthetic)
    trtr = None
    if real_train is not None:
        trtr = score_predictor(train_predictor(real_train, epochs=epochs, seed=seed), real_test)
        trtr["n_train"] = len(real_train)
    return UtilityResult(
        tstr,
        trtr,
        f"MONAI Regressor (8,16,32 ch, in-plane strides), {epochs} epochs, AdamW 1e-3, seed {seed}; "
        "LVEF MSE on fixed-range normalised values + ED/ES BCE; tested on real test split",
    )
