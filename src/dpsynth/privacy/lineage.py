"""Whether a run folder may hold no ledger: the one rule `report.stated_privacy` (what ε a
run may state) and `training.common.refuse_unsafe_parents` (what a stage may build on) share.

Why a rule: a ledger can be the only record that a run touched private data (an ε = ∞
sweep cell's non-private training, a DP autoencoder of an older dpsynth whose model.json
has no ``trained_on``, a DP attribute model fitted later). A folder without one is taken
for a public run only when its model.json says it was written without one.
"""

from __future__ import annotations

from pathlib import Path

from dpsynth.privacy.attribute_fit import MODEL_FILE as ATTRIBUTE_MODEL


def may_lack_ledger(run: Path, meta: dict | None) -> bool:
    """True where `run`, whose model.json is `meta` (None: none), may hold no ledger.json:
    its model.json records its lineage (``trained_on``) and that the run held no ledger
    when it was written (``ledger: false``), and no DP attribute model was fitted into it
    since. Runs of an older dpsynth do not say, so they must show their ledger."""
    return (
        meta is not None
        and "trained_on" in meta
        and meta.get("ledger") is False
        and not (Path(run) / ATTRIBUTE_MODEL).is_file()
    )
