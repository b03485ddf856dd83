"""The privacy that a run, or several runs released together, may state: their ledgers
checked against the lineage each model.json records, one owner for `budget`, the report
and `release`.

Why several: models trained on the same patients compose. Two bundles released from
sibling runs (say a DP fine-tune at two budgets) together reveal what the union of their
lineages spent, ancestors they share counted once (`Ledger.inherit`); each bundle on its
own states only its own lineage. `dpsynth budget RUN OTHER_RUN` states the joint ε.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from dpsynth.privacy.ledger import Ledger
from dpsynth.runs import MODEL_FILE, read_model_meta, run_lineage


@dataclass(frozen=True)
class StatedPrivacy:
    """What may be stated of `runs`: ε is `ledger.composed_epsilon()` unless `not_dp` lists a
    private cache some lineage learned without DP (then ε = ∞). `unchecked` says, per run
    whose model.json records no lineage, why it could not be checked: its ε is then only
    as good as its ledger.json."""

    runs: list[Path]
    ledger: Ledger
    not_dp: list[str]
    unchecked: list[str]


def run_folder(target: str | os.PathLike) -> Path:
    """The run a `budget` or report target names: the folder itself, or the folder of a
    ``ledger.json`` given instead."""
    path = Path(target)
    return path.parent if path.suffix == ".json" else path


def stated_privacy(targets: Iterable[str | os.PathLike]) -> StatedPrivacy:
    """Load each target's ledger (it must exist), refuse one that misses the DP spending its
    lineage names (`Ledger.require_accounted`), and merge them. A one-line DpsynthError
    for a ledger or model.json that cannot be read."""
    runs, ledgers, lineages, unchecked = [], [], [], []
    for target in targets:
        run = run_folder(target)
        ledger, lineage = Ledger.load(target), run_lineage(run)
        ledger.require_accounted(lineage, run)
        runs.append(run)
        ledgers.append(ledger)
        lineages += lineage
        if why := _unchecked(run):
            unchecked.append(f"{run}: {why}")
    joint = Ledger.inherit(*ledgers)
    return StatedPrivacy(runs, joint, sorted(set(joint.not_dp(lineages))), unchecked)


def _unchecked(run: Path) -> str:
    """Why `run`'s lineage cannot be checked against its ledger ("" when it can)."""
    if not (run / MODEL_FILE).is_file():
        return (
            f"no {MODEL_FILE} (a stage still training, or an incomplete copy): its lineage "
            "is not checked"
        )
    if "trained_on" not in read_model_meta(run):
        return (
            f"{MODEL_FILE} records no trained_on (made before it was recorded): its lineage "
            "is not checked"
        )
    return ""
