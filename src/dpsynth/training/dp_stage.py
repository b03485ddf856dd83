"""What every DP-SGD training stage shares, so the autoencoder and the LDM account alike.

A stage plans its noise for the private training patients, opens its ledger entry (after
inheriting the parents' ledgers and checking `--max-total-epsilon` before any step), draws
each step's Poisson batch of patients, and writes checkpoints that carry the ledger: the
entry's step count is SET from the checkpoint, so a crash or resume neither loses nor
double-counts steps.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from dpsynth.config import PrivacyConfig
from dpsynth.data.cache import Cache
from dpsynth.errors import DpsynthError
from dpsynth.privacy.ledger import Ledger, LedgerEntry
from dpsynth.privacy.outputs import labelled
from dpsynth.training import checkpoint as ckpt
from dpsynth.training.common import refuse_non_dp_parents
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
        from dpsynth.privacy.accounting import make_accountant, warn_delta
        from dpsynth.privacy.dpsgd import PatientDPSGD
        from dpsynth.privacy.planner import plan

        self.stage, self.cache, self.privacy, self.run = stage, cache, privacy, run
        self.parents, self.extra_entries, self.main = list(parents), list(extra_entries), main
        refuse_non_dp_parents(cache.cache_id, cache.path, self.parents)
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
            ledger.check_budget(entry, p.max_total_epsilon, accountant=p.accountant)
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
        the run recorded since (e.g. an attribute model), and check the budget again."""
        self.entry_id = state["ledger_entry"]
        self.ledger = Ledger.inherit(
            Ledger.load(self.run / "checkpoint" / "ledger.json"), Ledger.of_run(self.run)
        )
        p = self.privacy
        if p.max_total_epsilon is not None:
            self.ledger.check_budget(
                self.ledger[self.entry_id], p.max_total_epsilon, accountant=p.accountant
            )
        if self.main:
            self.ledger.save(self.run / "ledger.json")


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
