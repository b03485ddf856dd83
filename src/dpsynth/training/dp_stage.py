"""What every DP-SGD training stage shares, so the autoencoder and the LDM account alike.

A stage plans its noise for the private training patients, opens its ledger entry (after
inheriting the parents' ledgers and checking `--max-total-epsilon` before any step), draws
each step's Poisson batch of patients, and writes checkpoints that carry the ledger: the
entry's step count is SET from the checkpoint, so a crash or resume neither loses nor
double-counts steps.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from dpsynth.config import PrivacyConfig
from dpsynth.data.cache import Cache
from dpsynth.errors import DpsynthError
from dpsynth.privacy.accounting import make_accountant, warn_delta
from dpsynth.privacy.dpsgd import PatientDPSGD
from dpsynth.privacy.ledger import Ledger, LedgerEntry
from dpsynth.privacy.outputs import labelled
from dpsynth.privacy.planner import plan
from dpsynth.training import checkpoint as ckpt
from dpsynth.training.monitor import append_metrics


class DPStage:
    """Plan, patient-level DP-SGD engine and ledger entry of one training stage.

    Args:
        stage: the ledger's name for it (``"ldm-dp-sgd"``, ``"autoencoder-dp-sgd"``).
        cache: the private data; its training split's patients are the DP records.
        model: the trained network (every trainable parameter is in `optimizer`).
        optimizer: a plain torch optimizer; the engine turns it into a DP one.
        privacy: the validated `privacy` config section.
        run: the run folder (``ledger.json`` and ``checkpoint/`` live there).
        parents: runs whose ledgers this model inherits (its lineage).
        extra_entries: recorded when the stage opens: one-shot mechanisms run after
            training (a DP latent scale: charged up front so the budget check covers it)
            and non-private uses (a validation loss on private data).
        distributed: torchrun mode; rank 0 writes the ledger.
    """

    def __init__(
        self,
        *,
        stage: str,
        cache: Cache,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        privacy: PrivacyConfig,
        run: Path,
        parents: Sequence[Path] = (),
        extra_entries: Sequence[LedgerEntry] = (),
        distributed: bool = False,
        main: bool = True,
    ) -> None:
        self.stage, self.cache, self.privacy, self.run = stage, cache, privacy, run
        self.parents, self.extra_entries, self.main = list(parents), list(extra_entries), main
        self.patient_rows = cache.patient_rows("train")
        n = len(self.patient_rows)
        if privacy.batch_size > n:
            raise DpsynthError(
                f"privacy.batch_size: {privacy.batch_size} patients per batch but the private "
                f"training split has only {n}"
            )
        warn_delta(privacy.delta, n)
        self.plan = plan(
            records=n, batch_size=privacy.batch_size, epochs=privacy.epochs,
            epsilon=privacy.epsilon, noise_multiplier=privacy.noise_multiplier,
            delta=privacy.delta, accountant=privacy.accountant,
        )  # fmt: skip
        self.engine = PatientDPSGD(
            model, optimizer, noise_multiplier=self.plan.noise_multiplier,
            max_grad_norm=privacy.max_grad_norm, sample_rate=self.plan.sample_rate,
            num_records=n, accountant=make_accountant(privacy.accountant),
            physical_batch_size=privacy.physical_batch_size, distributed=distributed,
        )  # fmt: skip
        self.ledger: Ledger | None = None
        self.entry_id = ""

    @property
    def num_patients(self) -> int:
        return len(self.patient_rows)

    @property
    def total_steps(self) -> int:
        return self.plan.steps

    def open(self) -> None:
        """Start a new stage: inherit the run's and its lineage's entries, check the budget,
        record the entry."""
        ledger = Ledger.of_run(self.run, self.parents)
        p = self.privacy
        for entry in self.extra_entries:
            ledger.add(entry)
        entry = LedgerEntry(
            stage=self.stage,
            mechanism="dp-sgd",
            cache_id=self.cache.cache_id,
            records=self.num_patients,
            delta=p.delta,
            accountant=p.accountant,
            noise_multiplier=self.plan.noise_multiplier,
            sample_rate=self.plan.sample_rate,
            planned_steps=self.plan.steps,
            note=f"patient-level DP-SGD, clipping norm {p.max_grad_norm}",
        )
        if p.max_total_epsilon is not None:
            ledger.check_budget(entry, p.max_total_epsilon)
        ledger.add(entry)
        self.ledger, self.entry_id = ledger, entry.id
        if self.main:
            ledger.save(self.run / "ledger.json")
            append_metrics(self.run, labelled({}))  # losses on private data without DP

    def patients(self, step: int) -> np.ndarray:
        """Indices into the training patients of global step `step`'s Poisson batch.

        Re-drawn from (secret seed, epoch) so a resumed run takes the same batches.
        """
        epoch, within = divmod(step, self.engine.steps_per_epoch)
        batches = self.engine.logical_batches(epoch)
        idx = None
        for _ in range(within + 1):
            idx = next(batches, None)
        return np.zeros(0, dtype=np.int64) if idx is None else idx

    def metrics(self) -> dict[str, int]:
        """Engine counters for metrics.jsonl: patient gradients zeroed as non-finite so far."""
        return {"nonfinite_gradients": self.engine.nonfinite_records}

    def engine_state(self) -> tuple[dict, dict]:
        """The engine's state (optimizer, noise generator, sampler seed, accountant)."""
        tensors, meta = self.engine.state_dict()
        return {f"engine.{k}": v for k, v in tensors.items()}, meta

    def load_engine_state(self, tensors: dict, meta: dict) -> None:
        self.engine.load_state_dict(ckpt.strip_prefix(tensors, "engine."), meta)

    def save_checkpoint(self, tensors: dict, state: dict[str, Any]) -> None:
        """Checkpoint and ledger move together, written as one unit."""
        self.ledger.update_steps(self.entry_id, self.engine.steps_taken)
        ckpt.save_checkpoint(
            self.run / "checkpoint",
            tensors,
            {**state, "ledger_entry": self.entry_id},
            extra_json={"ledger.json": self.ledger.to_json()},
        )
        self.ledger.save(self.run / "ledger.json")

    def resume(self, state: dict[str, Any]) -> None:
        """Take the ledger back from the checkpoint `state` was read from, merged with what
        the run recorded since (e.g. an attribute model), and check the budget again.

        Refuses, before any step, a config whose plan differs from the one the ledger entry
        was budget-checked with: more epochs at a fixed σ would otherwise run steps past
        the plan and be caught only when the next checkpoint is recorded.
        """
        checkpointed = Ledger.load(self.run / "checkpoint" / "ledger.json")
        self._check_plan(checkpointed, state["ledger_entry"], state["opt"])
        self.entry_id = state["ledger_entry"]
        recorded = Ledger.of_run(self.run)
        self._check_latest(checkpointed[self.entry_id], recorded)
        self.ledger = Ledger.inherit(checkpointed, recorded)
        p = self.privacy
        if p.max_total_epsilon is not None:
            self.ledger.check_budget(self.ledger[self.entry_id], p.max_total_epsilon)
        if self.main:
            self.ledger.save(self.run / "ledger.json")

    def _check_latest(self, checkpointed: LedgerEntry, recorded: Ledger) -> None:
        """Refuse a checkpoint older than the steps the run's ledger records.

        Training would restart at its k steps and, with fresh noise, retrain k+1..K that the
        ledger already counts, ending on K again: the repeat would never be charged. (A
        ledger behind the checkpoint is fine: a crash between the two writes; see
        `save_checkpoint`.)
        """
        if checkpointed.id in recorded and recorded[checkpointed.id].steps > checkpointed.steps:
            raise DpsynthError(
                f"{self.run}: the checkpoint holds {checkpointed.steps} steps of stage "
                f"{checkpointed.stage!r} but the run's ledger records "
                f"{recorded[checkpointed.id].steps}; resume from the latest checkpoint, "
                "not an older one"
            )

    def _check_plan(self, ledger: Ledger, entry_id: str, engine_meta: dict[str, Any]) -> None:
        entry, p = ledger[entry_id], self.privacy
        recorded = {
            "records": entry.records, "noise_multiplier": entry.noise_multiplier,
            "sample_rate": entry.sample_rate, "planned_steps": entry.planned_steps,
            "delta": entry.delta, "accountant": entry.accountant,
            "max_grad_norm": engine_meta["max_grad_norm"],
        }  # fmt: skip
        now = {
            "records": self.num_patients, "noise_multiplier": self.plan.noise_multiplier,
            "sample_rate": self.plan.sample_rate, "planned_steps": self.plan.steps,
            "delta": p.delta, "accountant": p.accountant, "max_grad_norm": p.max_grad_norm,
        }  # fmt: skip
        changed = [f"{k} is {v} under this config but {recorded[k]} in the run's ledger"
                   for k, v in now.items() if v != recorded[k]]  # fmt: skip
        # The entries recorded when the stage opened (a DP latent scale still to be drawn, a
        # private validation) must be the ones this config would run, up to id and time.
        changed += [
            f"{extra.stage} is not recorded as this config would run it"
            for extra in self.extra_entries
            if not any(_same_mechanism(extra, e) for e in ledger if e.id != entry_id)
        ]
        if changed:
            raise DpsynthError(
                f"{self.run}: --resume with a changed privacy plan: {changed[0]}; resume with "
                "the settings the run started with (or start a new run)"
            )


def dp_steps_per_epoch(cache: Cache, privacy: PrivacyConfig) -> float:
    """Expected steps per epoch of patient-level Poisson sampling: records / batch_size
    (the planner's epochs = steps x sample_rate)."""
    return len(cache.patient_rows("train")) / privacy.batch_size


def _same_mechanism(a: LedgerEntry, b: LedgerEntry) -> bool:
    return dataclasses.replace(a, id=b.id, created=b.created, note=b.note) == b


class DPCheckpoints:
    """Trainer mix-in: optimizer state and checkpoints go through ``self.dp`` (a DPStage).

    The host trainer provides ``checkpoint_state()``, which calls ``optimizer_state()``.
    """

    dp: DPStage

    def optimizer_state(self) -> tuple[dict, dict]:
        return self.dp.engine_state()

    def load_optimizer(self, tensors: dict, meta: dict) -> None:
        self.dp.load_engine_state(tensors, meta)

    def checkpoint(self) -> None:
        self.dp.save_checkpoint(*self.checkpoint_state())
