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
from dpsynth.privacy.ledger import LedgerEntry, has_ledger
from dpsynth.runs import (
    MODEL_FILE,
    load_autoencoder,
    load_weights,
    make_pipeline,
    read_model_meta,
    read_scale_source,
    save_weights,
)
from dpsynth.training.common import (
    adopt_architecture,
    autocast,
    barrier,
    carry_lineage,
    init_distributed,
    pick_device,
    prepare_run_dir,
    refuse_unsafe_parents,
    save_config,
    seed_everything,
    trained_on,
)
from dpsynth.training.ema import EMA
from dpsynth.training.trainer import PrivateStrategy, PublicStrategy, Task, Trainer

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
    if private_validation and not dp:  # nothing would record it: the run's files are public
        raise DpsynthError("--private-validation: only with --dp; a run without DP is public, "
                           "so validate it on public data")  # fmt: skip
    cache = Cache(data)
    rank = init_distributed(dp)
    device = pick_device()
    ae, ae_meta = load_autoencoder(autoencoder, device)
    # The scale's label travels into this run's model.json: read it before any training.
    ae_meta["latent_scale_source"] = read_scale_source(ae_meta, Path(autoencoder) / MODEL_FILE)
    if list(ae_meta["shape"]) != list(cache.shape):
        raise DpsynthError(
            f"{data}: volumes are {list(cache.shape)} but the autoencoder was trained on "
            f"{ae_meta['shape']} ({autoencoder})"
        )
    init_meta = read_model_meta(init) if init else None
    if init_meta is not None:
        config = adopt_architecture(config, init_meta, ("denoiser", "diffusion"))
    parents = [p for p in (Path(autoencoder), init and Path(init)) if p]
    refuse_unsafe_parents(cache.cache_id, cache.path, dp, parents)
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
        validation = Cache(validation_data) if validation_data else None
        task = _DenoiserTask(
            cache=cache, autoencoder=ae, latent_scale=latent_scale, denoiser=denoiser,
            objective=objective, config=config, rng=rng, generator=gen, validation=validation,
        )  # fmt: skip
        if dp:
            strategy = PrivateStrategy(
                stage="ldm-dp-sgd", cache=cache, privacy=config.privacy, run=run, parents=parents,
                extra_entries=_private_validation(validation, cache, private_validation),
            )  # fmt: skip
        else:
            strategy = PublicStrategy(task.section, len(task.rows))
        trainer = Trainer(run, task, strategy, rng)
        trainer.start(resume)
        save_config(run, config)
        trainer.fit()

        denoiser.load_state_dict(trainer.averaged_weights())
        if rank == 0:
            if not dp:  # a public stage still carries what its parents spent; before
                carry_lineage(run, parents)  # model.json, which marks the run complete
            entry = strategy.entry_id if dp else ""  # the stage's own DP-SGD ledger entry
            _save_model(run, ae, ae_meta, denoiser, config, init_meta, dp, cache, parents, entry)
        barrier()
    return Path(out)


def _private_validation(validation: Cache | None, data: Cache, declared: bool) -> list:
    """The ledger's non-private-use entry when a DP run validates on private data."""

    if validation is None or not (declared or validation.same_data(data)):
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


class _DenoiserTask(Task):
    """ε-prediction on the frozen autoencoder's scaled latents, encoded once."""

    def __init__(self, *, cache, autoencoder, latent_scale, denoiser, objective, config,
                 rng, generator, validation: Cache | None) -> None:  # fmt: skip
        self.cache, self.model, self.objective, self.rng = cache, denoiser, objective, rng
        self.autoencoder, self.latent_scale = autoencoder, latent_scale
        self.config, self.section, self.generator = config, config.ldm_training, generator
        self.device = next(denoiser.parameters()).device
        self.rows = cache.volume_indices("train")
        self.latents = encode_split(autoencoder, cache, self.rows, latent_scale)
        self.attributes = cache.attributes[self.rows]
        self.position = np.zeros(int(self.rows.max()) + 1 if len(self.rows) else 0, np.int64)
        self.position[self.rows] = np.arange(len(self.rows))  # cache row -> latent index
        self.validation = self._validation_batch(validation) if validation else None

    def model_fn(self, *args):
        with autocast(self.device, self.section.bf16):
            return self.model(*(a.to(self.device) for a in args))

    def batch_loss(self, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        idx = self.rng.choice(len(self.rows), self.section.batch_size)
        batch = self.objective.draw(self.latents[idx], self.attributes[idx], self.generator)
        return self.objective.per_volume_loss(self.model_fn, batch).mean(), {}

    def patient_records(self, rows: np.ndarray) -> dict[str, torch.Tensor]:
        """Noisy latents of (patients, [ED, ES]) rows, drawn as the public batches are."""
        idx = self.position[rows]
        record = self.objective.draw(
            self.latents[torch.from_numpy(idx)], self.attributes[idx], self.generator
        )
        return {k: v.to(self.device) for k, v in record.items()}

    def patient_loss(self, step: int):
        return self.objective.patient_loss

    # -- validation and grids use public data or fixed public conditions only
    def _validation_batch(self, cache: Cache) -> dict:
        rows = cache.volume_indices("val")[:32]
        if len(rows) == 0:
            rows = cache.volume_indices("train")[:32]
        latents = encode_split(self.autoencoder, cache, rows, self.latent_scale)
        gen = torch.Generator().manual_seed(1234)
        return self.objective.draw(latents, cache.attributes[rows], gen)

    @torch.no_grad()
    def validation_logs(self) -> dict[str, float]:
        if self.validation is None:
            return {}
        self.model.eval()
        loss = float(self.objective.per_volume_loss(self.model_fn, self.validation).mean())
        self.model.train()
        return {"validation_loss": loss}

    @torch.no_grad()
    def save_grid(self, run: Path, step: int, ema: EMA) -> None:
        table = conditions_table(GRID_CONDITIONS)
        volumes = self.pipeline(ema).sample(len(table), attributes=table, steps=10, progress=False)
        sets = {"samples": (volumes, table)}
        (run / "samples").mkdir(exist_ok=True)
        (run / "samples" / f"mid_{step:07d}.png").write_bytes(mid_slice_grid(sets, n=len(table)))
        (run / "samples" / f"stacks_{step:07d}.png").write_bytes(slice_strips(sets, n=len(table)))

    def pipeline(self, ema: EMA):
        """A sampling pipeline over the EMA weights (a copy; training weights untouched)."""
        ema_model = copy.deepcopy(self.model)
        ema_model.load_state_dict(ema.state_dict(self.model))
        ema_model.eval()
        return make_pipeline(
            self.autoencoder, ema_model, self.config.diffusion, self.latent_scale,
            self.cache.shape, self.cache.spacing,
        )  # fmt: skip

    def extra_state(self) -> tuple[dict, dict]:
        return {"rng.generator": self.generator.get_state()}, {}

    def load_extra_state(self, tensors: dict, state: dict) -> None:
        self.generator.set_state(tensors["rng.generator"])


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


def _save_model(run, ae, ae_meta, denoiser, config, init_meta, dp, cache, parents, entry) -> None:
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
            "latent_scale_source": ae_meta["latent_scale_source"],
            "shape": list(cache.shape),
            "spacing": list(cache.spacing),
            "attribute_ranges": _attribute_ranges(cache, dp, init_meta),
            "private": bool(dp),
            "trained_on": trained_on(cache.cache_id, dp, parents, ledger_entry=entry),
            "ledger": has_ledger(run),
        },
    )
