"""Whether a run folder may hold no ledger: the one rule shared by `report.stated_privacy`
(what ε a run may state) and `runs.run_ledger`, which reads a run's ledger for
`training.common.refuse_unsafe_parents` (what a stage may build on),
`training.attributes.fit_attributes` (what budget a fit starts from) and
`evaluation.selection.load_selector` (which data a best-of-k selector must not have seen).

Why a rule: a ledger can be the only record that a run touched private data (an ε = ∞
sweep cell's non-private training, a DP autoencoder of an older dpsynth whose model.json
has no ``trained_on``, a DP attribute model fitted later). A folder without one is taken
for a public run only when its model.json says it was written without one.
"""

from __future__ import annotations

from pathlib import Path

from dpsynth.errors import DpsynthError
from dpsynth.privacy.attribute_model import ATTRIBUTE_MODEL_FILE
from dpsynth.privacy.ledger import has_ledger


def may_lack_ledger(run: Path, meta: dict | None) -> bool:
    """True where `run`, whose model.json is `meta` (None: none), may hold no ledger.json:
    its model.json records its lineage (``trained_on``) and that the run held no ledger
    when it was written (``ledger: false``), and no DP attribute model was fitted into it
    since. Runs of an older dpsynth do not say, so they must show their ledger."""
    return (
        meta is not None
        and "trained_on" in meta
        and meta.get("ledger") is False
        and not (Path(run) / ATTRIBUTE_MODEL_FILE).is_file()
    )


def require_ledger(run: Path, meta: dict | None) -> None:
    """Refuse run folder `run` (model.json `meta`) where its ledger.json is missing though
    it may not be (`may_lack_ledger`): whatever builds on it, or states its ε, would start
    from nothing."""
    if not has_ledger(run) and not may_lack_ledger(run, meta):
        said = "its model.json does not say" if meta is not None else "no model.json says"
        raise DpsynthError(
            f"{run}: no ledger.json, and {said} it was written without one (lost, or a run "
            "of an older dpsynth): restore its ledger.json, or retrain it into a new folder"
        )
