"""Train the compression model (KL or VQ) on prepared volumes.

Non-private training treats `--data` as public; this run's latent scale is then a public
quantity that later (private) stages may use. Under DP the adversarial term is off (the
discriminator would see private data without a guarantee) and the latent scale comes from
a Gaussian-mechanism estimate charged to the ledger.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import warnings
from pathlib import Path

import numpy as np
import torch
from monai.metrics import PSNRMetric, SSIMMetric
from monai.metrics.utils import do_metric_reduction

from dpsynth.config import Config
from dpsynth.data.cache import Cache, load_volumes
from dpsynth.data.figures import mid_slice_grid, slice_strips
from dpsynth.diffusion.pipeline import encode_split, estimate_latent_scale
from dpsynth.io import atomic_write_json, hold_run
from dpsynth.models.build import build_autoencoder
from dpsynth.models.discriminator import (
    PatchDiscriminator3D,
    PerceptualLoss,
    discriminator_loss,
    generator_loss,
)
from dpsynth.privacy.ledger import LedgerEntry, has_ledger
from dpsynth.privacy.outputs import RECONSTRUCTION_FILE, labelled
from dpsynth.privacy.statistics import dp_latent_scale, gaussian_noise_multiplier
from dpsynth.runs import (
    MODEL_FILE,
    SCALE_FROM_DP_ESTIMATE,
    SCALE_FROM_INIT,
    SCALE_FROM_OWN_DATA,
    load_weights,
    read_model_meta,
    read_scale_source,
    save_weights,
)
from dpsynth.training import checkpoint as ckpt
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


def train_autoencoder(
    data: str | os.PathLike,
    out: str | os.PathLike,
    config: Config,
    init: str | os.PathLike | None = None,
    resume: bool = False,
    dp: bool = False,
) -> Path:
    """Train an autoencoder run in `out`; returns the run folder.

    `init` fine-tunes a pre-trained autoencoder run (its architecture wins over `config`).
    With `dp`, `data` is private: patient-level DP-SGD, no adversarial term, and the `init`
    run's latent scale (with its label: public, or a DP estimate its ledger charged), else
    a DP estimate charged to this run's ledger.
    """
    cache = Cache(data)
    rank = init_distributed(dp)
    init_meta = read_model_meta(init) if init else None
    if init_meta is not None:
        config = adopt_architecture(config, init_meta, ("autoencoder",))
    # Under DP the --init run's scale is kept; its label is read before any DP step.
    init_scale = _init_scale(init, init_meta) if dp and init_meta is not None else None
    parents = [Path(init)] if init else []
    refuse_unsafe_parents(cache.cache_id, cache.path, dp, parents)
    # Held until the model is written: a second process on this run is refused.
    with hold_run(out) if rank == 0 else contextlib.nullcontext():
        run = prepare_run_dir(out, resume) if rank == 0 else Path(out)
        barrier()
        device = pick_device()
        rng = seed_everything(config.autoencoder_training.seed)
        model = build_autoencoder(config.autoencoder).to(device)
        if init is not None:
            model.load_state_dict(load_weights(Path(init) / "autoencoder.safetensors"))
        # Under DP no discriminator: it would see private data without a guarantee.
        task = _AutoencoderTask(model, cache, config, rng, adversarial=not dp)
        scale_entry = None
        if dp:
            if config.autoencoder.adversarial_weight > 0:
                warnings.warn(
                    "autoencoder.adversarial_weight: the adversarial term is off under DP "
                    "(the discriminator would see private data without a guarantee)",
                    stacklevel=2,
                )
            # Without an --init run to inherit it from, the latent scale is a DP statistic.
            scale_entry = None if init_meta else _reserve_latent_scale(cache, config.privacy)
            strategy = PrivateStrategy(
                stage="autoencoder-dp-sgd", cache=cache, privacy=config.privacy, run=run,
                parents=parents, extra_entries=[scale_entry] if scale_entry else [],
            )  # fmt: skip
        else:
            strategy = PublicStrategy(task.section, len(task.rows))
        trainer = Trainer(run, task, strategy, rng)
        trainer.start(resume)
        save_config(run, config)
        trainer.fit()
        model.load_state_dict(trainer.averaged_weights())
        model.eval()
        if rank == 0:  # under torchrun every rank holds the same weights; one writes them
            scale = _latent_scale(model, cache, dp, init_scale, scale_entry)
            if not dp and init is not None:  # a public stage still carries what its parents
                carry_lineage(run, parents)  # spent; before model.json, which marks it complete
            entry = strategy.entry_id if dp else ""  # the stage's own DP-SGD ledger entry
            _finish(run, model, cache, config, scale, private=dp, parents=parents, entry=entry)
        barrier()
    return Path(out)


class _VolumeLosses:
    """w·reconstruction + regulariser (+ perceptual) per volume: shape (B,).

    The study's weighting (projects/cardiac_autoencoder/TrainerKL.py and TrainerVQ.py in
    compai-lab/2024-miccai-dgm-daum): L2 x 1000, perceptual x 100, capacity-annealed KL.
    """

    def __init__(self, cfg, device: torch.device) -> None:
        self.cfg = cfg
        self.perceptual = (
            PerceptualLoss(cfg.perceptual_weights).to(device) if cfg.perceptual_weights else None
        )

    def __call__(self, output, x: torch.Tensor, step: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """(total, reconstruction) losses per volume after `step` optimiser steps."""
        cfg = self.cfg
        recon = output.reconstruction.float()
        diff = recon - x
        per_voxel = diff.abs() if cfg.reconstruction_loss == "l1" else diff.square()
        rec = per_voxel.flatten(1).mean(1)
        loss = cfg.reconstruction_weight * rec + self.regularizer(output, x, step)
        if self.perceptual is not None:
            loss = loss + cfg.perceptual_weight * self.perceptual(recon, x)
        return loss, rec

    def regularizer(self, output, x: torch.Tensor, step: int) -> torch.Tensor:
        cfg, reg = self.cfg, output.regularization_loss
        if cfg.kind == "vq":  # codebook + commitment: already weighted inside the model
            return reg
        if cfg.kl_capacity is None:
            return cfg.kl_weight * reg
        # The study's KL is per latent position (summed over channels): divide the summed
        # KL by the number of positions, S x H/f x W/f.
        factor = 2 ** (len(cfg.channel_multipliers) - 1)
        positions = x.shape[-3] * (x.shape[-2] // factor) * (x.shape[-1] // factor)
        return cfg.kl_weight * (reg / positions - kl_capacity_at(cfg, step)).abs()


def kl_capacity_at(cfg, step: int) -> float:
    """The KL capacity C after `step` optimiser steps: C_max x min(1, step / ramp)."""
    if cfg.kl_capacity is None:
        return 0.0
    return cfg.kl_capacity * min(1.0, step / cfg.kl_capacity_steps)


class _AutoencoderTask(Task):
    """Reconstruction of training volumes, with the PatchGAN term when `adversarial`."""

    grid_shows_data = True  # reconstructions of the cache's own volumes

    def __init__(self, model, cache: Cache, config: Config, rng, adversarial: bool) -> None:
        self.model, self.cache, self.rng = model, cache, rng
        self.cfg, self.section = config.autoencoder, config.autoencoder_training
        self.device = next(model.parameters()).device
        self.losses = _VolumeLosses(self.cfg, self.device)
        self.rows = cache.volume_indices("train")
        self.disc = self.opt_d = None
        self._fake = None  # (real, reconstruction) of the last batch, for the discriminator
        if adversarial:  # built even at weight 0: a public run's seeded draws stay the same
            self.disc = PatchDiscriminator3D(1, channels=self.cfg.discriminator_channels)
            self.disc.to(self.device)
            self.opt_d = torch.optim.AdamW(
                self.disc.parameters(),
                lr=self.cfg.discriminator_lr or self.section.lr,  # the study: 5e-6, 20x below
                weight_decay=self.section.weight_decay,
            )

    def batch_loss(self, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        cfg = self.cfg
        adv_on = self.disc is not None and cfg.adversarial_weight > 0
        adv_on = adv_on and step >= cfg.adversarial_start
        x = load_volumes(self.cache.images, self.rng.choice(self.rows, self.section.batch_size))
        x = x.to(self.device)
        with autocast(self.device, self.section.bf16):
            output = self.model(x)
            loss, rec = (v.mean() for v in self.losses(output, x, step))
            if adv_on:
                loss = loss + cfg.adversarial_weight * generator_loss(
                    self.disc(output.reconstruction), cfg.adversarial_loss
                )
        self._fake = (x, output.reconstruction.detach()) if adv_on else None
        return loss, {"reconstruction": float(rec.detach())}

    def auxiliary_step(self) -> dict[str, float]:
        if self._fake is None:
            return {}
        (x, fake), self._fake = self._fake, None
        self.opt_d.zero_grad(set_to_none=True)
        with autocast(self.device, self.section.bf16):
            d_loss = discriminator_loss(self.disc(x), self.disc(fake), self.cfg.adversarial_loss)
        d_loss.backward()
        self.opt_d.step()
        return {"discriminator": float(d_loss.detach())}

    def patient_records(self, rows: np.ndarray) -> dict[str, torch.Tensor]:
        x = load_volumes(self.cache.images, rows.reshape(-1))
        return {"volumes": x.reshape(*rows.shape, *x.shape[1:]).to(self.device)}

    def patient_loss(self, step: int):
        def loss(model_fn, record: dict) -> torch.Tensor:
            x = record["volumes"]
            with autocast(self.device, self.section.bf16):
                output = model_fn(x)
            return self.losses(output, x, step)[0].sum()

        return loss

    def save_grid(self, run: Path, step: int, ema: EMA) -> None:
        _save_reconstruction_grid(run, self.model, self.cache, step)

    def extra_state(self) -> tuple[dict, dict]:
        if self.disc is None:
            return {}, {}
        tensors = {f"disc.{k}": v for k, v in self.disc.state_dict().items()}
        t_optd, m_optd = ckpt.optimizer_state(self.opt_d, "optd")
        return tensors | t_optd, {"optd": m_optd}

    def load_extra_state(self, tensors: dict, state: dict) -> None:
        if self.disc is not None:
            self.disc.load_state_dict(ckpt.strip_prefix(tensors, "disc."))
            ckpt.load_optimizer_state(self.opt_d, tensors, state["optd"], "optd")


def _reserve_latent_scale(cache: Cache, privacy) -> LedgerEntry:
    """The ledger entry of the DP latent scale, charged when the stage opens."""
    sigma = gaussian_noise_multiplier(
        privacy.latent_scale_epsilon, None, privacy.delta, privacy.accountant
    )
    return LedgerEntry.gaussian(
        "latent-scale", sigma, records=len(cache.patient_rows("train")),
        delta=privacy.delta, accountant=privacy.accountant, cache_id=cache.cache_id,
        note="DP latent scale of the DP autoencoder (clipped per-patient second moment)",
    )  # fmt: skip


def _latent_scale(model, cache: Cache, dp: bool, init_scale, scale_entry) -> tuple[float, str]:
    """(scale, source): on this run's own training data when it is public; under DP, the
    pre-trained --init run's, else the DP estimate that `scale_entry` charged.

    An --init scale keeps its parent's label when the parent estimated it with DP: it is
    still a DP statistic (charged in the parent's ledger, which this run inherits), and
    the label reaches the released model card."""
    if not dp:
        rows = cache.volume_indices("train")[:256]
        device = next(model.parameters()).device
        batches = (
            load_volumes(cache.images, rows[i : i + 8]).to(device) for i in range(0, len(rows), 8)
        )
        return float(estimate_latent_scale(model, batches)), SCALE_FROM_OWN_DATA
    if init_scale is not None:
        return init_scale
    rows = cache.patient_rows("train")
    latents = encode_split(model, cache, rows.reshape(-1), scale=1.0, batch=8)
    scale, _ = dp_latent_scale(
        latents.float().numpy(), rng=np.random.default_rng(secrets.randbits(63)),
        noise_multiplier=scale_entry.noise_multiplier, delta=scale_entry.delta,
        patients=np.repeat(np.arange(len(rows)), rows.shape[1]),
        accountant=scale_entry.accountant,
    )  # fmt: skip
    return scale, SCALE_FROM_DP_ESTIMATE


def _init_scale(init: str | os.PathLike, init_meta: dict) -> tuple[float, str]:
    """(scale, source) a DP run keeps from its --init run: a DP estimate stays labelled one."""
    source = read_scale_source(init_meta, Path(init) / MODEL_FILE)
    return float(init_meta["latent_scale"]), (
        SCALE_FROM_DP_ESTIMATE if source == SCALE_FROM_DP_ESTIMATE else SCALE_FROM_INIT
    )


@torch.no_grad()
def _save_reconstruction_grid(run: Path, model, cache: Cache, step: int) -> None:
    rows = cache.volume_indices("val")[:4]
    if len(rows) == 0:
        rows = cache.volume_indices("train")[:4]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    x = load_volumes(cache.images, rows).to(device)
    recon = reconstruct(model, x)
    model.train(was_training)
    (run / "samples").mkdir(exist_ok=True)
    sets = {
        "input": (x[:, 0].cpu().numpy(), cache.attributes[rows]),
        "reconstruction": (recon[:, 0].cpu().numpy(), None),
    }
    (run / "samples" / f"mid_{step:07d}.png").write_bytes(mid_slice_grid(sets, n=len(rows)))
    (run / "samples" / f"stacks_{step:07d}.png").write_bytes(slice_strips(sets, n=1))


@torch.no_grad()
def _finish(
    run: Path,
    model,
    cache: Cache,
    config: Config,
    latent_scale: tuple[float, str],
    private: bool,
    parents: list[Path],
    entry: str,
) -> None:
    """Save the EMA weights, the latent scale with its source, and test PSNR/SSIM; `entry`
    is a private stage's DP-SGD ledger entry id."""
    quality = reconstruction_quality(model, cache)
    if private:  # measured on the private test split without DP
        quality = labelled(quality)
    save_weights(run / "autoencoder.safetensors", model.state_dict())
    scale, source = latent_scale
    atomic_write_json(
        run / "model.json",
        {
            "kind": "autoencoder",
            "autoencoder": config.to_dict()["autoencoder"],
            "shape": list(cache.shape),
            "spacing": list(cache.spacing),
            "latent_scale": scale,
            "latent_scale_source": source,
            "private": private,
            "trained_on": trained_on(cache.cache_id, private, parents, ledger_entry=entry),
            "ledger": has_ledger(run),
        },
    )
    atomic_write_json(run / RECONSTRUCTION_FILE, quality)


def reconstruct(model, x: torch.Tensor) -> torch.Tensor:
    """Deterministic reconstruction (posterior mean): draws nothing from the RNG.

    The decoder's own output, clipped, as the study scores it: the sampler's intensity
    convention (`dpsynth.data.intensity`) is not applied, so PSNR and SSIM measure the
    autoencoder alone (BENCHMARKS.md, "Decoded volumes on the data's intensity convention").
    """
    return model.decode_latent(model.encode_latent(x)).float().clamp(0, 1)


@torch.no_grad()
def reconstruction_quality(model, cache: Cache, split: str = "test", batch: int = 8) -> dict:
    """PSNR (dB) and SSIM of reconstructions on a split, with MONAI's metrics (data range 1).

    Values are reduced here, not by the metrics' ``aggregate()``: that all-gathers across
    ranks whenever a process group exists, and under torchrun only rank 0 evaluates.
    """

    rows = cache.volume_indices(split)
    if len(rows) == 0:
        return {"split": split, "n": 0}
    device = next(model.parameters()).device
    # SSIM slice-wise in 2D: 10 mm slices make a 3D window meaningless across depth.
    psnr, ssim = PSNRMetric(max_val=1.0), SSIMMetric(spatial_dims=2, data_range=1.0, win_size=7)
    values: dict[str, list[torch.Tensor]] = {"psnr_db": [], "ssim": []}
    for i in range(0, len(rows), batch):
        x = load_volumes(cache.images, rows[i : i + batch]).to(device)
        y = reconstruct(model, x)
        values["psnr_db"].append(psnr(y, x))
        values["ssim"].append(ssim(y.flatten(0, 2).unsqueeze(1), x.flatten(0, 2).unsqueeze(1)))
    means = {k: float(do_metric_reduction(torch.cat(v), "mean")[0]) for k, v in values.items()}
    return {"split": split, "n": int(len(rows)), **means}
