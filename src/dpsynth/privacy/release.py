"""Releasable conditioning: fit the DP attribute model on a private cache and attach it to a run.

The model's Gaussian mechanism joins the run's ledger, so an images + attributes release
carries one end-to-end guarantee. Its fidelity against the real table is an evaluation on
private data: written to the run for the report, labelled not-for-release.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

import numpy as np

from dpsynth.data.cache import Cache
from dpsynth.errors import DpsynthError
from dpsynth.io import atomic_write_json
from dpsynth.privacy.attribute_model import AttributeModel, attribute_fidelity, fit_attribute_model
from dpsynth.privacy.ledger import Ledger

MODEL_FILE = "attribute_model.json"
FIDELITY_FILE = "attribute_fidelity.json"


def fit_attributes(
    data: str | os.PathLike,
    out: str | os.PathLike,
    epsilon: float,
    delta: float = 1e-5,
    seed: int | None = None,
    max_total_epsilon: float | None = None,
    split: str = "train",
) -> Path:
    """Fit the DP attribute model on `data`'s `split` and attach it to run `out`.

    `seed` makes the noise reproducible and is for tests only: whoever knows it can remove
    the noise. By default the noise comes from OS entropy.
    """
    cache = Cache(data)
    out = Path(out)
    rows = cache.volume_indices(split)
    if len(rows) == 0:
        raise DpsynthError(f"{data}: no volumes in the {split} split")
    rng = np.random.default_rng(secrets.randbits(128) if seed is None else seed)
    ledger = Ledger.load(out, missing_ok=True)
    model, entry = fit_attribute_model(
        cache.attributes[rows],
        rng=rng,
        epsilon=epsilon,
        delta=delta,
        patients=cache.patients[rows],
        fingerprint=cache.meta["fingerprint"],
    )
    if max_total_epsilon is not None:
        ledger.check_budget(entry, max_total_epsilon)
    ledger.add(entry)
    out.mkdir(parents=True, exist_ok=True)
    model.save(out / MODEL_FILE)
    synthetic = model.sample(len(rows) // 2, np.random.default_rng(0))
    fidelity = attribute_fidelity(cache.attributes[rows], synthetic)
    fidelity["label"] = "evaluation on private data: for the report, not for release"
    atomic_write_json(out / FIDELITY_FILE, fidelity)
    ledger.save(out)  # last: the ledger records the mechanism once the model exists
    return out


def load_attribute_model(run: str | os.PathLike) -> AttributeModel:
    path = Path(run) / MODEL_FILE
    if not path.exists():
        raise DpsynthError(
            f"{run}: no DP attribute model ({MODEL_FILE}); run `dpsynth fit-attributes` first"
        )
    return AttributeModel.load(path)
