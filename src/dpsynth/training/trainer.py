"""One training loop for every stage: a task says what is trained and how a batch's loss is
built; a strategy says how losses become updates.

`Trainer` owns the loop, the optimiser and its LR schedule, the EMA, the progress monitor,
the sample grids and the checkpoints (atomic safetensors + JSON). A `Task` (the
autoencoder's, the denoiser's) builds losses and says what else it saves. The strategy is
the only difference between the public and the private variant of a stage:

- `PublicStrategy`: random batches of volumes and a plain optimiser step;
- `PrivateStrategy`: patient-level DP-SGD. It owns what the guarantee needs: the plan,
  the DP engine, the ledger entry (opened after the parents' ledgers are inherited and
  `--max-total-epsilon` is checked, before any private step) and checkpoints that carry
  the ledger. The entry's step count is SET from the engine's count of noisy steps at
  every checkpoint, so a crash or resume neither loses nor double-counts steps.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from dpsynth.config import PrivacyConfig, TrainingConfig
from dpsynth.data.cache import Cache
from dpsynth.errors import DpsynthError
from dpsynth.privacy.accounting import warn_delta
from dpsynth.privacy.attribute_model import require_attribute_fit
from dpsynth.privacy.dpsgd import LossFn, PatientDPSGD
from dpsynth.privacy.ledger import Ledger, LedgerEntry
from dpsynth.privacy.outputs import labelled
from dpsynth.privacy.planner import plan
from dpsynth.training import checkpoint as ckpt
from dpsynth.training.common import (
    decay_steps,
    is_distributed,
    is_main,
    lr_factor,
    public_steps_per_epoch,
    public_total_steps,
)
from dpsynth.training.ema import EMA
from dpsynth.training.monitor import Monitor, append_metrics


class Task:
    """What a stage trains. The strategy calls `batch_loss` (public) or `patient_records`
    and `patient_loss` (private); the other hooks default to nothing."""

    model: nn.Module
    cache: Cache  # the data it learns from; its checkpoints name it, so a resume cannot switch
    section: TrainingConfig  # loop settings: batch, EMA, log/sample/checkpoint intervals
    # Whether the sample grid shows the training data (then it is not drawn when private).
    grid_shows_data = False

    def batch_loss(self, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        """Mean loss over one random batch of training volumes, and extra logs."""
        raise NotImplementedError

    def auxiliary_step(self) -> dict[str, float]:
        """Train what the task trains beside the model on the batch just used (public only:
        called after the model's backward)."""
        return {}

    def patient_records(self, rows: np.ndarray) -> dict[str, torch.Tensor]:
        """DP records for cache rows (patients, volumes): tensors (patients, volumes, ...)."""
        raise NotImplementedError

    def patient_loss(self, step: int) -> LossFn:
        """One patient's loss (the SUM over its volumes) after `step` optimiser steps."""
        raise NotImplementedError

    def validation_logs(self) -> dict[str, float]:
        return {}

    def save_grid(self, run: Path, step: int, ema: EMA) -> None:
        pass

    def extra_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Checkpoint tensors and state.json entries beyond model, EMA, optimiser and RNG."""
        return {}, {}

    def load_extra_state(self, tensors: dict[str, torch.Tensor], state: dict[str, Any]) -> None:
        pass


class PublicStrategy:
    """Non-private: `grad_accumulation` random batches of volumes, one optimiser step."""

    private = False

    def __init__(self, section: TrainingConfig, train_volumes: int) -> None:
        self.section = section
        self.lr, self.warmup_steps = section.lr, section.warmup_steps
        self.total_steps = public_total_steps(section, train_volumes)
        per_epoch = public_steps_per_epoch(section, train_volumes)
        self.decay = decay_steps(section, per_epoch), section.lr_decay_factor
        self.volumes_per_step = section.batch_size * section.grad_accumulation

    def attach(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer

    def open(self) -> None:
        pass

    def step(self, task: Task, step: int) -> dict[str, float]:
        accumulation = self.section.grad_accumulation
        self.optimizer.zero_grad(set_to_none=True)
        logs: dict[str, float] = {}
        for _ in range(accumulation):
            loss, extra = task.batch_loss(step)
            (loss / accumulation).backward()
            extra = {"loss": float(loss.detach()), **extra, **task.auxiliary_step()}
            for key, value in extra.items():
                logs[key] = logs.get(key, 0.0) + value / accumulation
        self.optimizer.step()
        return logs

    def optimizer_state(self) -> tuple[dict, dict]:
        return ckpt.optimizer_state(self.optimizer, "opt")

    def load_optimizer(self, tensors: dict, meta: dict) -> None:
        ckpt.load_optimizer_state(self.optimizer, tensors, meta, "opt")

    def save_checkpoint(self, run: Path, tensors: dict, state: dict[str, Any]) -> None:
        ckpt.save_checkpoint(run / "checkpoint", tensors, state)

    def resume(self, state: dict[str, Any], step: int) -> None:
        pass


class PrivateStrategy:
    """Patient-level DP-SGD on a private cache, accounted in the run's ledger.

    Args:
        stage: the ledger's name for it (``"ldm-dp-sgd"``, ``"autoencoder-dp-sgd"``).
        cache: the private data; its training split's patients are the DP records.
        privacy: the validated `privacy` config section (it also holds the stage's lr,
            warm-up and decay: a few noisy steps must not inherit a schedule sized for
            long non-private training).
        run: the run folder (``ledger.json`` and ``checkpoint/`` live there).
        parents: runs whose ledgers this model inherits (its lineage).
        extra_entries: recorded when the stage opens: one-shot mechanisms run after
            training (a DP latent scale: charged up front so the budget check covers it)
            and non-private uses (a validation loss on private data).
    """

    private = True

    def __init__(
        self,
        *,
        stage: str,
        cache: Cache,
        privacy: PrivacyConfig,
        run: Path,
        parents: Sequence[Path] = (),
        extra_entries: Sequence[LedgerEntry] = (),
    ) -> None:
        self.stage, self.cache, self.privacy, self.run = stage, cache, privacy, run
        self.parents, self.extra_entries = list(parents), list(extra_entries)
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
        self.lr, self.warmup_steps = privacy.lr, privacy.warmup_steps
        self.total_steps = self.plan.steps
        self.decay = (
            decay_steps(privacy, dp_steps_per_epoch(cache, privacy)),
            privacy.lr_decay_factor,
        )
        self.ledger: Ledger | None = None
        self.entry_id = ""

    def attach(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Turn the plain optimiser over `model` into the DP engine."""
        self.engine = PatientDPSGD(
            model, optimizer, noise_multiplier=self.plan.noise_multiplier,
            max_grad_norm=self.privacy.max_grad_norm, sample_rate=self.plan.sample_rate,
            num_records=len(self.patient_rows),
            physical_batch_size=self.privacy.physical_batch_size, distributed=is_distributed(),
        )  # fmt: skip

    @property
    def volumes_per_step(self) -> int:
        return int(round(self.patient_rows.shape[1] * self.engine.expected_batch_size))

    def open(self) -> None:
        """Start the stage: inherit the run's and its lineage's entries, check the budget,
        record the entry."""
        ledger = Ledger.of_run(self.run, self.parents)
        require_attribute_fit(self.run, ledger)  # one fitted first: its ε must count
        p = self.privacy
        for entry in self.extra_entries:
            ledger.add(entry)
        entry = LedgerEntry(
            stage=self.stage,
            mechanism="dp-sgd",
            cache_id=self.cache.cache_id,
            records=len(self.patient_rows),
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
        if is_main():
            ledger.save(self.run / "ledger.json")
            append_metrics(self.run, labelled({}))  # losses on private data without DP

    def step(self, task: Task, step: int) -> dict[str, float]:
        rows = self.patient_rows[self.patients(step)]
        loss = self.engine.step(task.patient_records(rows), task.patient_loss(step))
        # Patient gradients zeroed as non-finite so far.
        return {"loss": loss, "nonfinite_gradients": self.engine.nonfinite_records}

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

    def optimizer_state(self) -> tuple[dict, dict]:
        """The engine's state (optimizer, sampler seed, step count)."""
        tensors, meta = self.engine.state_dict()
        return {f"engine.{k}": v for k, v in tensors.items()}, meta

    def load_optimizer(self, tensors: dict, meta: dict) -> None:
        self.engine.load_state_dict(ckpt.strip_prefix(tensors, "engine."), meta)

    def save_checkpoint(self, run: Path, tensors: dict, state: dict[str, Any]) -> None:
        """Checkpoint and ledger move together, written as one unit."""
        self.ledger.update_steps(self.entry_id, self.engine.steps_taken)
        ckpt.save_checkpoint(
            run / "checkpoint",
            tensors,
            {**state, "ledger_entry": self.entry_id},
            extra_json={"ledger.json": self.ledger.to_json()},
        )
        self.ledger.save(run / "ledger.json")

    def resume(self, state: dict[str, Any], step: int) -> None:
        """Take the ledger back from the checkpoint `state` was read from, merged with what
        the run recorded since (e.g. an attribute model), and check the budget again.

        Refuses, before any step, a config whose plan differs from the one the ledger entry
        was budget-checked with: more epochs at a fixed σ would otherwise run steps past
        the plan and be caught only when the next checkpoint is recorded.
        """
        checkpointed = Ledger.load(self.run / "checkpoint" / "ledger.json")
        self._check_plan(checkpointed, state["ledger_entry"], state["opt"])
        self.entry_id = state["ledger_entry"]
        entry = checkpointed[self.entry_id]
        if not entry.steps == self.engine.steps_taken == step:  # written as one unit
            raise DpsynthError(
                f"{self.run}/checkpoint: the ledger records {entry.steps} steps, the DP engine "
                f"{self.engine.steps_taken} and the loop {step}; the checkpoint is damaged"
            )
        recorded = Ledger.of_run(self.run)
        self._check_latest(entry, recorded)
        self.ledger = Ledger.inherit(checkpointed, recorded)
        require_attribute_fit(self.run, self.ledger)  # one fitted since, its entry lost
        p = self.privacy
        if p.max_total_epsilon is not None:
            self.ledger.check_budget(self.ledger[self.entry_id], p.max_total_epsilon)
        if is_main():
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
        if entry.cache_id != self.cache.cache_id:  # the checkpoint's own record may predate it
            raise DpsynthError(
                f"{self.run}: its ledger entry's steps ran on cache {entry.cache_id or '(unnamed)'},"
                f" not {self.cache.path} ({self.cache.cache_id}); resume on the data the run "
                "started with (or start a new run)"
            )
        recorded = {
            "records": entry.records, "noise_multiplier": entry.noise_multiplier,
            "sample_rate": entry.sample_rate, "planned_steps": entry.planned_steps,
            "delta": entry.delta, "accountant": entry.accountant,
            "max_grad_norm": engine_meta["max_grad_norm"],
        }  # fmt: skip
        now = {
            "records": len(self.patient_rows), "noise_multiplier": self.plan.noise_multiplier,
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


Strategy = PublicStrategy | PrivateStrategy


class Trainer:
    """The loop, optimiser, LR schedule, EMA, monitor, sample grids and checkpoints of a
    `task`, optimised by `strategy`; `rng` draws the public batches (checkpointed)."""

    def __init__(self, run: Path, task: Task, strategy: Strategy, rng: np.random.Generator):
        self.run, self.task, self.strategy, self.rng = run, task, strategy, rng
        model, section = task.model, task.section
        params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(
            params, lr=strategy.lr, weight_decay=section.weight_decay
        )
        strategy.attach(model, self.optimizer)  # under torchrun: every rank gets rank 0's model
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_factor(strategy.warmup_steps, *strategy.decay)
        )
        self.ema = EMA(model, section.ema_decay)
        self.step = 0

    def start(self, resume: bool) -> None:
        """Restore the checkpoint, or open a new stage (under DP: the budget check)."""
        if not resume:
            self.strategy.open()
            return
        tensors, state = ckpt.load_checkpoint(self.run / "checkpoint")
        self._check_data(state)
        self.task.model.load_state_dict(ckpt.strip_prefix(tensors, "model."))
        self.ema.load_shadow(ckpt.strip_prefix(tensors, "ema."))
        self.strategy.load_optimizer(tensors, state["opt"])
        self.task.load_extra_state(tensors, state)
        ckpt.restore_rng(tensors, state["rng"], self.rng)
        self.step = int(state["step"])
        self.scheduler.last_epoch = self.step
        self.strategy.resume(state, self.step)

    def fit(self) -> None:
        main = is_main()  # under torchrun (DP only) rank 0 writes
        section, total = self.task.section, self.strategy.total_steps
        monitor = Monitor(self.run, total, self.step, self.run.name) if main else None
        self.task.model.train()
        grid_due = False
        while self.step < total:
            logs = self.strategy.step(self.task, self.step)
            self.scheduler.step()
            self.ema.update(self.task.model, self.step)
            self.step += 1
            done, last = self.step, self.step == total
            sample_due = done % section.sample_every == 0 or last
            if sample_due:
                logs.update(self.task.validation_logs())
            if not main:
                continue
            log = done % section.log_every == 0 or last
            monitor.step(done, self.strategy.volumes_per_step, logs, log)
            grid_due |= sample_due
            if done % section.checkpoint_every == 0 or last:
                self.checkpoint()
                # Only now: a grid shows the steps it comes from, which the checkpoint (and
                # under DP its ledger) must record first, or a crash would leave outputs of
                # steps that were never counted (BRIEF 3).
                if grid_due and not (self.strategy.private and self.task.grid_shows_data):
                    self.task.save_grid(self.run, done, self.ema)
                grid_due = False
        if main:
            monitor.close()

    def checkpoint(self) -> None:
        model = self.task.model
        tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
        tensors.update({f"ema.{k}": v for k, v in self.ema.shadow.items()})
        t_opt, m_opt = self.strategy.optimizer_state()
        t_rng, m_rng = ckpt.rng_state(self.rng)
        t_task, m_task = self.task.extra_state()
        state = {"step": self.step, "opt": m_opt, "rng": m_rng, **m_task,
                 "cache_id": self.task.cache.cache_id}  # fmt: skip
        self.strategy.save_checkpoint(self.run, tensors | t_opt | t_rng | t_task, state)

    def _check_data(self, state: dict[str, Any]) -> None:
        """Refuse to resume on other data than the checkpoint's: the weights would hold two
        datasets while model.json and the ledger name one (a public stage continued on a
        private cache, or a DP entry whose steps ran on two cohorts)."""
        here, named = self.task.cache, state.get("cache_id")
        if named is None and self.strategy.private and "ledger_entry" in state:
            return  # a DP checkpoint from before the field: its ledger entry names the cache
        if named != here.cache_id:
            was = f"cache {named}" if named else "data it does not name (an earlier version)"
            raise DpsynthError(
                f"{self.run}/checkpoint: trained on {was}, not {here.path} (cache id "
                f"{here.cache_id}); resume on the data the run started with (or start a new run)"
            )

    def averaged_weights(self) -> dict[str, torch.Tensor]:
        """The model's state with the EMA parameters: what the stage saves."""
        return self.ema.state_dict(self.task.model)
