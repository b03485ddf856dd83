"""Releasable conditioning: fit the DP attribute model on a private cache and attach it to a run.

The model's Gaussian mechanism joins the run's ledger, so an images + attributes release
carries one end-to-end guarantee. Its fidelity against the real table is an evaluation on
private data: written to the run for the report, labelled evaluation-only.

It sits with the training stages because, like them, it writes into a run folder whose
lineage (model.json, `dpsynth.runs`) and ledger (`dpsynth.privacy`) it must check first.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

import numpy as np

from dpsynth.config import DEFAULT_DELTA, PrivacyConfig, load_config
from dpsynth.data.cache import Cache
from dpsynth.errors import DpsynthError
from dpsynth.io import atomic_write_json, hold_run
from dpsynth.launch import refuse_torchrun
from dpsynth.privacy.attribute_model import (
    ATTRIBUTE_MODEL_FILE,
    attribute_fidelity,
    attribute_model_entry,
    fit_attribute_model,
    patient_records,
)
from dpsynth.privacy.ledger import Ledger
from dpsynth.privacy.outputs import FIDELITY_FILE, labelled
from dpsynth.runs import MODEL_FILE, model_meta_if_any, run_ledger


def fit_attributes(
    data: str | os.PathLike,
    out: str | os.PathLike,
    epsilon: float,
    delta: float = DEFAULT_DELTA,
    seed: int | None = None,
    max_total_epsilon: float | None = None,
    split: str = "train",
) -> Path:
    """Fit the DP attribute model on `data`'s `split` and attach it to run `out`.

    Refused where `out` is a trained run whose ledger is lost or misses what its model.json
    names (`runs.run_ledger`), and where a training stage started in `out` and has not
    recorded its lineage yet. Order: the budget is checked against everything `out`
    already records, then the entry is recorded (merged into the run's ledger), and only
    then is the noise drawn and the model written. A crash in between over-reports spending, never under-reports it.

    Without `max_total_epsilon`, the run's recorded ``privacy.max_total_epsilon`` applies;
    the budget is composed by the rule `dpsynth budget` states ε with.

    `seed` makes the noise reproducible and is for tests only: whoever knows it can remove
    the noise. By default the noise comes from OS entropy.
    """
    refuse_torchrun("fit-attributes", "every rank would spend epsilon on its own model")
    cache = Cache(data)
    out = Path(out)
    rows = cache.volume_indices(split)
    if len(rows) == 0:
        raise DpsynthError(f"{data}: no volumes in the {split} split")
    table, patients = cache.attributes[rows], cache.patients[rows]
    entry = attribute_model_entry(
        len(patient_records(table, patients)), epsilon=epsilon, delta=delta,
        cache_id=cache.cache_id,
    )  # fmt: skip
    # Held throughout: a training stage still running in `out` would take steps this
    # budget check cannot see, so fit-attributes waits for it (one-line refusal).
    with hold_run(out):
        recorded = _recorded_privacy(out)
        if max_total_epsilon is None:  # the budget the user set when training this run
            max_total_epsilon = recorded.max_total_epsilon
        # A trained run's budget starts from its whole lineage, checked: a ledger lost, or
        # one that misses the run's own DP training, would make this check (and the ledger
        # written below, which a restored copy would then overwrite) start from too little.
        # An unfinished stage's checkpoint holds a copy of its ledger, which counts too.
        meta = model_meta_if_any(out)
        if meta is not None:
            ledger = run_ledger(out)
        elif _unfinished_stage_unrecorded(out):
            raise DpsynthError(
                f"{out}: a training stage started here and has not recorded its lineage in "
                "the ledger (a public stage does so when it ends): finish it (run it again, "
                "with --resume if it checkpointed) before fitting attributes into it"
            )
        else:
            ledger = Ledger.of_lineage([out, out / "checkpoint"])
        if max_total_epsilon is not None:
            ledger.check_budget(entry, max_total_epsilon)
        ledger.add(entry)
        ledger.save(out)  # recorded before anything is drawn or written
        if meta is not None and meta.get("ledger") is not True:
            # The run holds a ledger now: lost later, it must read as lost, not as the
            # public run model.json said it was (`privacy.lineage.may_lack_ledger`).
            atomic_write_json(out / MODEL_FILE, meta | {"ledger": True})

        rng = np.random.default_rng(secrets.randbits(128) if seed is None else seed)
        model, _ = fit_attribute_model(  # its entry is `entry`: both from attribute_model_entry
            table, rng=rng, epsilon=epsilon, delta=delta, patients=patients,
            cache_id=cache.cache_id,
        )  # fmt: skip
        model.save(out / ATTRIBUTE_MODEL_FILE, ledger_entry=entry.id)
        synthetic = model.sample(len(rows) // 2, np.random.default_rng(0))
        atomic_write_json(out / FIDELITY_FILE, labelled(attribute_fidelity(table, synthetic)))
    return out


def _unfinished_stage_unrecorded(run: Path) -> bool:
    """Whether a training stage started in `run` (its config.yaml or a checkpoint) and its
    lineage is not in a ledger there: a public stage carries its parents' only when it
    ends, and a DP stage records its own entry (with its parents') when it opens, then
    with each checkpoint. A ledger holding only an earlier attribute fit is not enough:
    a budget check would leave out the parents' spending."""
    started = (run / "config.yaml").is_file() or (run / "checkpoint" / "state.json").is_file()
    if not started or (run / "checkpoint" / "ledger.json").is_file():
        return False
    return not any(e.mechanism == "dp-sgd" for e in Ledger.load(run, missing_ok=True))


def _recorded_privacy(run: Path) -> PrivacyConfig:
    """The `privacy` settings `run` was trained with (its config.yaml), else the defaults."""
    saved = run / "config.yaml"
    return load_config(path=saved).privacy if saved.exists() else PrivacyConfig()
