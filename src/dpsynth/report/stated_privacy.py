"""The privacy that a run, or several runs released together, may state: their ledgers
checked against the lineage each model.json records, one owner for `budget`, the report,
`release`, the explorer, the demo and the sweep.

Why several: models trained on the same patients compose. Two bundles released from
sibling runs (say a DP fine-tune at two budgets) together reveal what the union of their
lineages spent, ancestors they share counted once (`Ledger.inherit`); each bundle on its
own states only its own lineage. `dpsynth budget RUN OTHER_RUN` states the joint ε.
The merge assumes one history per ledger entry: a DP stage resumed in two copies of its
folder spends twice under one entry id, and the larger count alone is kept.

It sits in `report`, beside most of its readers. Unlike `runs.run_ledger` (one run, for
a stage that builds on it), it also takes a ledger file named alone, notes a lineage it
cannot check instead of refusing it, and states NOT DP across runs.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from dpsynth.errors import DpsynthError
from dpsynth.privacy.ledger import Ledger, ledger_path
from dpsynth.privacy.lineage import may_lack_ledger
from dpsynth.runs import MODEL_FILE, check_ledger, model_meta_if_any


@dataclass(frozen=True)
class StatedPrivacy:
    """What may be stated of `runs`: `epsilon()`, or NOT DP (`is_not_dp`) where `not_dp`
    lists private caches some lineage learned without DP, or where the ledger records a
    non-private use that may have shaped the weights (`Ledger.shaping_uses`). `unchecked`
    says, per run whose lineage could not be checked against its ledger (no model.json,
    or one without ``trained_on``), why: its ε is then only as good as its ledger.json."""

    runs: list[Path]
    ledger: Ledger  # the union of the runs' ledgers, shared entries once
    delta: float  # the smallest δ any DP run states alone: none states more ε alone
    not_dp: list[str]
    unchecked: list[str]

    @property
    def dp(self) -> bool:
        """Whether any DP mechanism has spent (a stage with steps, a statistic)."""
        return _spent(self.ledger)

    @property
    def is_not_dp(self) -> bool:
        return bool(self.not_dp or self.ledger.shaping_uses())

    def epsilon(self) -> tuple[float, float, str]:
        """(ε, δ, accountant) as stated: `Ledger.composed_epsilon` at `delta`, ∞ if NOT DP
        (0 where nothing private was used: read `dp` first)."""
        epsilon, delta, accountant = self.ledger.composed_epsilon(self.delta)
        return (math.inf if self.is_not_dp else epsilon), delta, accountant


def stated_privacy(targets: Iterable[str | os.PathLike], missing_ok: bool = False) -> StatedPrivacy:
    """Load each target's ledger (a run folder's, or a ledger .json named), refuse one that
    misses the DP spending its lineage names (a DP run whose ledger was lost) or the fit of
    the attribute model its folder holds (`runs.check_ledger`), and merge them (a ledger named twice counts once). With
    `missing_ok`, a run folder without a ledger is a public stage if nothing else could have
    spent (`privacy.lineage.may_lack_ledger`); otherwise, and for a ledger file named, the
    ledger must exist. A one-line DpsynthError for a ledger or model.json that cannot be read."""
    runs, seen, ledgers, lineages, unchecked = [], set(), [], [], []
    for target in targets:
        path = ledger_path(target)
        run = path.parent
        if path.resolve() in seen:
            continue
        seen.add(path.resolve())
        meta = model_meta_if_any(run)
        public = missing_ok and Path(target) != path and may_lack_ledger(run, meta)
        ledger = Ledger.load(path, missing_ok=public)
        lineage = check_ledger(run, meta, ledger)
        runs.append(run)
        ledgers.append(ledger)
        lineages += lineage
        if why := _unchecked(meta):
            unchecked.append(f"{run}: {why}")
    if not runs:
        raise DpsynthError("stated privacy: no run given")
    joint = Ledger.inherit(*ledgers)
    deltas = [ledger.default_delta() for ledger in ledgers if _spent(ledger)]
    delta = min(deltas, default=joint.default_delta())
    return StatedPrivacy(runs, joint, delta, sorted(set(joint.not_dp(lineages))), unchecked)


def _spent(ledger: Ledger) -> bool:
    """Whether any DP mechanism of `ledger` has spent (a stage with steps, a statistic)."""
    return any(e.mechanism_spent() is not None for e in ledger)


def _unchecked(meta: dict | None) -> str:
    """Why a run with this model.json (None: none) cannot have its lineage checked against
    its ledger ("" when it can)."""
    if meta is None:
        return (
            f"no {MODEL_FILE} (a stage still training, a folder holding only a DP attribute "
            "model, or an incomplete copy): its lineage cannot be checked"
        )
    if "trained_on" not in meta:
        return (
            f"{MODEL_FILE} records no trained_on (made before it was recorded, or removed): "
            "its lineage cannot be checked"
        )
    return ""
