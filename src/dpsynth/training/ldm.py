"""Train the attribute-conditioned latent denoiser, non-privately or with patient-level DP-SGD.

The frozen autoencoder encodes the training volumes once; the denoiser then learns
ε-prediction on scaled latents. Under `dp=True` the data are private: the unit is the
patient (ED + ES), sampled by Poisson and clipped as one record, noise is calibrated to
the planned steps, every step is charged to the run's ledger, and nothing the model is
shaped by (latent scale, attribute normalisation, sample-grid conditions) comes from the
private data.
"""

from __future__ import annotations

import contextlib
import copy
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dpsynth.attributes import ATTRIBUTES, CLINICAL_RANGES, INDEX
from dpsynth.config import Config
from dpsynth.data.cache import Cache
from dpsynth.data.figures import mid_slice_grid, slice_strips
from dpsynth.diffusion.pipeline import DenoisingObjective, encode_split
from dpsynth.diffusion.schedulers import make_scheduler
from dpsynth.errors import DpsynthError
from dpsynth.io import atomic_write_json, hold_run
from dpsynth.models.build import build_denoiser
from dpsynth.privacy.ledger import LedgerEntry
from dpsynth.runs import (
    load_autoencoder,
    load_weights,
    make_pipeline,
    read_model_meta,
    save_weights,
)
from dpsynth.training import checkpoint as ckpt
from dpsynth.training.common import (
    adopt_architecture,
    autocast,
    barrier,
    carry_lineage,
    decay_steps,
    init_distributed,
    is_distributed,
    is_main,
    lr_factor,
    pick_device,
    prepare_run_dir,
    public_steps_per_epoch,
    public_total_steps,
    refuse_mixed_lineage,
    save_config,
    seed_everything,
    trained_on,
)
from dpsynth.training.dp_stage import DPCheckpoints, DPStage, dp_steps_per_epoch
from dpsynth.training.ema import EMA
from dpsynth.training.monitor import Monitor

# Public conditions for the sample grids written during training (never private rows).
GRID_CONDITIONS: tuple[dict[str, float], ...] = (
    {"ESED": 1.0, "LVEDV": 110.0, "RVEDV": 120.0},
    {"ESED": 0.0, "LVESV": 45.0, "RVESV": 55.0},
    {"ESED": 1.0, "LVEDV": 220.0, "RVEDV": 200.0},
    {"ESED": 0.0, "LVESV": 140.0, "RVESV": 110.0},
)


def conditions_table(conditions: tuple[dict[str, float], ...]) -> np.ndarray:
    """Rows of raw attributes (NaN = unknown) from {name: value} dicts."""
    table = np.full((len(conditions), len(ATTRIBUTES)), np.nan, dtype=np.float32)
    for row, cond in enumerate(conditions):
        for name, value in cond.items():
            table[row, INDEX[name]] = value
    return table


def train_ldm(
    data: str | os.PathLike,
    autoencoder: str | os.PathLike,
    out: str | os.PathLike,
    config: Config,
    init: str | os.PathLike | None = None,
    resume: bool = False,
    dp: bool = False,
    validation_data: str | os.PathLike | None = None,
    private_validation: bool = False,
) -> Path:
    """Train a latent diffusion run in `out` and return it.

    `init` fine-tunes from a pre-trained LDM run (its architecture wins over `config`).
    With `dp`, `data` is private and `validation_data` should be public: validating on
    private data (`private_validation`, or the training cache itself) is recorded in the
    ledger as a non-private use and flagged in the report.
    """
    cache = Cache(data)
    rank = init_distributed(dp)
    device = pick_device()
    ae, ae_meta = load_autoencoder(autoencoder, device)
    if list(ae_meta["shape"]) != list(cache.shape):
        raise DpsynthError(
            f"{data}: volumes are {list(cache.shape)} but the autoencoder was trained on "
            f"{ae_meta['shape']} ({autoencoder})"
        )
    init_meta = read_model_meta(init) if init else None
    if init_meta is not None:
        config = adopt_architecture(config, init_meta, ("denoiser", "diffusion"))
    parents = [p for p in (Path(autoencoder), init and Path(init)) if p]
    refuse_mixed_lineage(cache.cache_id, cache.path, dp, parents)
    # Held until the model is written: a second process on this run is refused.
    with hold_run(out) if rank == 0 else contextlib.nullcontext():
        run = prepare_run_dir(out, resume) if rank == 0 else Path(out)
        barrier()
        tcfg = config.ldm_training
        rng = seed_everything(tcfg.seed)
        latent_scale = float(ae_meta["latent_scale"])

        denoiser = build_denoiser(config.denoiser, cache.shape[0], ae.latent_channels)
        if init is not None:
            denoiser.load_state_dict(load_weights(Path(init) / "denoiser.safetensors"))
        _select_trainable(denoiser, tcfg.finetune)
        denoiser.to(device).train()

        scheduler = make_scheduler(
            "ddpm",
            num_train_timesteps=config.diffusion.timesteps,
            beta_start=config.diffusion.beta_start,
            beta_end=config.diffusion.beta_end,
            schedule=config.diffusion.schedule,
        )
        objective = DenoisingObjective(scheduler, config.diffusion.condition_dropout)
        # Each rank draws its own diffusion noise for its share of the patients.
        gen = torch.Generator().manual_seed(int(rng.integers(2**62)) + rank)
        trainer_cls = _DPTrainer if dp else _Trainer
        trainer = trainer_cls(
            run=run, cache=cache, autoencoder=ae, latent_scale=latent_scale, denoiser=denoiser,
            objective=objective, config=config, device=device, rng=rng, generator=gen,
            parents=parents,
        )  # fmt: skip
        validation = Cache(validation_data) if validation_data else None
        if dp and validation is not None:
            trainer.dp.extra_entries += _private_validation(validation, cache, private_validation)
        trainer.start(resume)
        save_config(run, config)
        trainer.fit(validation=validation)

        denoiser.load_state_dict(trainer.ema.state_dict(denoiser))
        if rank == 0:
            _save_model(run, ae, ae_meta, denoiser, config, init_meta, dp, cache, trainer.parents)
            if not dp:  # a public stage still carries what its parents spent
                carry_lineage(run, trainer.parents)
        barrier()
    return Path(out)


def _private_validation(validation: Cache, data: Cache, declared: bool) -> list:
    """The ledger's non-private-use entry when a DP run validates on private data."""

    if not (declared or validation.same_data(data)):
        return []
    return [
        LedgerEntry.non_private_use(
            "ldm-validation",
            records=len(np.unique(validation.patients)),
            cache_id=validation.cache_id,
            note="validation loss on private data without DP: evaluation only, never release",
        )
    ]


def _select_trainable(denoiser, finetune: str) -> None:
    """'attention' trains attention and conditioning only (the DP-LDM recipe)."""
    if finetune == "all":
        return
    keep = set(denoiser.attention_and_conditioning_parameters())
    for name, p in denoiser.named_parameters():
        p.requires_grad_(name in keep)


class _Trainer:
    """Non-private loop: random batches of volumes, AdamW, warm-up, EMA, checkpoints."""

    def __init__(self, *, run, cache, autoencoder, latent_scale, denoiser, objective, config,
                 device, rng, generator, parents) -> None:  # fmt: skip
        self.run, self.cache, self.denoiser, self.objective = run, cache, denoiser, objective
        self.autoencoder, self.latent_scale = autoencoder, latent_scale
        self.config, self.device, self.rng, self.generator = config, device, rng, generator
        self.parents = parents
        self.tcfg = config.ldm_training
        self.step = 0
        rows = cache.volume_indices("train")
        self.rows = rows
        self.latents = encode_split(autoencoder, cache, rows, latent_scale)
        self.attributes = cache.attributes[rows]
        params = [p for p in denoiser.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=self.lr, weight_decay=self.tcfg.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_factor(self.warmup_steps, *self.decay)
        )
        self.ema = EMA(denoiser, self.tcfg.ema_decay)

    @property
    def lr(self) -> float:
        return self.tcfg.lr

    @property
    def warmup_steps(self) -> int:
        return self.tcfg.warmup_steps

    @property
    def total_steps(self) -> int:
        return public_total_steps(self.tcfg, len(self.rows))

    @property
    def decay(self) -> tuple[float | None, float]:
        """(steps between lr decays, factor) for :func:`lr_factor`."""
        per_epoch = public_steps_per_epoch(self.tcfg, len(self.rows))
        return decay_steps(self.tcfg, per_epoch), self.tcfg.lr_decay_factor

    def model_fn(self, *args):
        with autocast(self.device, self.tcfg.bf16):
            return self.denoiser(*(a.to(self.device) for a in args))

    def train_step(self) -> dict[str, float]:
        self.optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for _ in range(self.tcfg.grad_accumulation):
            idx = self.rng.choice(len(self.rows), self.tcfg.batch_size)
            batch = self.objective.draw(self.latents[idx], self.attributes[idx], self.generator)
            loss = self.objective.per_volume_loss(self.model_fn, batch).mean()
            (loss / self.tcfg.grad_accumulation).backward()
            total += float(loss.detach()) / self.tcfg.grad_accumulation
        self.optimizer.step()
        return {"loss": total}

    def volumes_per_step(self) -> int:
        return self.tcfg.batch_size * self.tcfg.grad_accumulation

    def fit(self, validation: Cache | None) -> None:
        main = is_main()  # under torchrun only rank 0 writes
        monitor = Monitor(self.run, self.total_steps, self.step, self.run.name) if main else None
        val = self._validation_batch(validation) if validation is not None else None
        grid_due = False
        while self.step < self.total_steps:
            logs = self.train_step()
            self.scheduler.step()
            self.ema.update(self.denoiser, self.step)
            self.step += 1
            done = self.step
            last = done == self.total_steps
            if val is not None and (done % self.tcfg.sample_every == 0 or last):
                logs["validation_loss"] = self._validation_loss(val)
            if not main:
                continue
            log = done % self.tcfg.log_every == 0 or last
            monitor.step(done, self.volumes_per_step(), logs, log)
            grid_due |= done % self.tcfg.sample_every == 0 or last
            if done % self.tcfg.checkpoint_every == 0 or last:
                self.checkpoint()
                # Only now: a grid shows the steps it comes from, which the checkpoint (and
                # under DP its ledger) must record first, or a crash would leave outputs of
                # steps that were never counted (BRIEF 3).
                if grid_due:
                    self._sample_grid(done)
                    grid_due = False
        if main:
            monitor.close()

    # -- validation and grids use public data or fixed public conditions only
    def _validation_batch(self, cache: Cache) -> dict:
        rows = cache.volume_indices("val")[:32]
        if len(rows) == 0:
            rows = cache.volume_indices("train")[:32]
        latents = encode_split(self.autoencoder, cache, rows, self.latent_scale)
        gen = torch.Generator().manual_seed(1234)
        return self.objective.draw(latents, cache.attributes[rows], gen)

    @torch.no_grad()
    def _validation_loss(self, batch: dict) -> float:
        self.denoiser.eval()
        loss = float(self.objective.per_volume_loss(self.model_fn, batch).mean())
        self.denoiser.train()
        return loss

    @torch.no_grad()
    def _sample_grid(self, step: int) -> None:
        table = conditions_table(GRID_CONDITIONS)
        volumes = self.pipeline().sample(len(table), attributes=table, steps=10, progress=False)
        sets = {"samples": (volumes, table)}
        (self.run / "samples").mkdir(exist_ok=True)
        (self.run / "samples" / f"mid_{step:07d}.png").write_bytes(
            mid_slice_grid(sets, n=len(table))
        )
        (self.run / "samples" / f"stacks_{step:07d}.png").write_bytes(
            slice_strips(sets, n=len(table))
        )

    def pipeline(self):
        """A sampling pipeline over the EMA weights (a copy; training weights untouched)."""
        ema_model = copy.deepcopy(self.denoiser)
        ema_model.load_state_dict(self.ema.state_dict(self.denoiser))
        ema_model.eval()
        return make_pipeline(
            self.autoencoder,
            ema_model,
            self.config.diffusion,
            self.latent_scale,
            self.cache.shape,
            self.cache.spacing,
        )

    # -- checkpoints
    def start(self, resume: bool) -> None:
        if resume:
            self.restore()

    def checkpoint_state(self) -> tuple[dict, dict]:
        tensors = {f"model.{k}": v for k, v in self.denoiser.state_dict().items()}
        tensors.update({f"ema.{k}": v for k, v in self.ema.shadow.items()})
        t_opt, m_opt = self.optimizer_state()
        t_rng, m_rng = ckpt.rng_state(self.rng)
        tensors.update(t_opt | t_rng)
        tensors["rng.generator"] = self.generator.get_state()
        return tensors, {"step": self.step, "opt": m_opt, "rng": m_rng}

    def optimizer_state(self) -> tuple[dict, dict]:
        return ckpt.optimizer_state(self.optimizer, "opt")

    def load_optimizer(self, tensors: dict, meta: dict) -> None:
        ckpt.load_optimizer_state(self.optimizer, tensors, meta, "opt")

    def checkpoint(self) -> None:
        tensors, state = self.checkpoint_state()
        ckpt.save_checkpoint(self.run / "checkpoint", tensors, state)

    def restore(self) -> dict[str, Any]:
        tensors, state = ckpt.load_checkpoint(self.run / "checkpoint")
        self.denoiser.load_state_dict(ckpt.strip_prefix(tensors, "model."))
        self.ema.load_shadow(ckpt.strip_prefix(tensors, "ema."))
        self.load_optimizer(tensors, state["opt"])
        ckpt.restore_rng(tensors, state["rng"], self.rng)
        self.generator.set_state(tensors["rng.generator"])
        self.step = int(state["step"])
        self.scheduler.last_epoch = self.step
        return {"tensors": tensors, "state": state}


class _DPTrainer(DPCheckpoints, _Trainer):
    """Patient-level DP-SGD: Poisson over patients, per-patient clipping, ledger per step."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.dp = DPStage(
            stage="ldm-dp-sgd", cache=self.cache, model=self.denoiser, optimizer=self.optimizer,
            privacy=self.config.privacy, run=self.run, parents=self.parents,
            distributed=is_distributed(), main=is_main(),
        )  # fmt: skip

    # The DP stage's optimisation settings live in the `privacy` section: its few noisy
    # steps must not inherit a warm-up sized for long non-private training.
    @property
    def lr(self) -> float:
        return self.config.privacy.lr

    @property
    def warmup_steps(self) -> int:
        return self.config.privacy.warmup_steps

    @property
    def total_steps(self) -> int:
        return self.dp.total_steps

    @property
    def decay(self) -> tuple[float | None, float]:
        p = self.config.privacy
        return decay_steps(p, dp_steps_per_epoch(self.cache, p)), p.lr_decay_factor

    def _patient_latents(self):
        """(P, 2, C, S, h, w) latents and (P, 2, 14) attributes, rows [ED, ES]."""
        position = {int(row): i for i, row in enumerate(self.rows)}
        order = np.vectorize(position.__getitem__)(self.dp.patient_rows)
        return self.latents[torch.from_numpy(order)], self.attributes[order]

    def fit(self, validation: Cache | None) -> None:
        self.patient_latents, self.patient_attributes = self._patient_latents()
        super().fit(validation)

    def train_step(self) -> dict[str, float]:
        idx = self.dp.patients(self.step)
        record = self.objective.draw(
            self.patient_latents[idx], self.patient_attributes[idx], self.generator
        )
        loss = self.dp.engine.step({k: v.to(self.device) for k, v in record.items()},
                                   self.objective.patient_loss)  # fmt: skip
        return {"loss": loss, **self.dp.metrics()}

    def volumes_per_step(self) -> int:
        return int(round(2 * self.dp.engine.expected_batch_size))

    def start(self, resume: bool) -> None:
        if resume:
            self.restore()
        else:
            self.dp.open()

    def restore(self) -> dict[str, Any]:
        restored = super().restore()
        self.dp.resume(restored["state"])
        return restored


def _attribute_ranges(cache: Cache, private: bool, init_meta: dict | None) -> dict:
    """Ranges shown as warnings at sampling: public training data, else clinical ranges."""
    if init_meta is not None and private:
        return init_meta["attribute_ranges"]
    if private:
        return {a: list(CLINICAL_RANGES[a]) for a in ATTRIBUTES}
    table = cache.attributes[cache.volume_indices("train")]
    ranges = {}
    for i, name in enumerate(ATTRIBUTES):
        col = table[:, i][np.isfinite(table[:, i])]
        ranges[name] = (
            [float(col.min()), float(col.max())] if len(col) else list(CLINICAL_RANGES[name])
        )
    return ranges


def _save_model(run, ae, ae_meta, denoiser, config, init_meta, dp, cache, parents) -> None:
    save_weights(run / "denoiser.safetensors", denoiser.state_dict())
    save_weights(run / "autoencoder.safetensors", ae.state_dict())
    plain = config.to_dict()
    atomic_write_json(
        run / "model.json",
        {
            "kind": "ldm",
            "autoencoder": ae_meta["autoencoder"],
            "denoiser": plain["denoiser"],
            "diffusion": plain["diffusion"],
            "sampling": plain["sampling"],
            "latent_scale": ae_meta["latent_scale"],
            "latent_scale_source": ae_meta.get("latent_scale_source", "autoencoder run"),
            "shape": list(cache.shape),
            "spacing": list(cache.spacing),
            "attribute_ranges": _attribute_ranges(cache, dp, init_meta),
            "private": bool(dp),
            "trained_on": trained_on(cache.cache_id, dp, parents),
        },
    )
