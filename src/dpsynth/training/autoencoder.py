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
from dpsynth.privacy.ledger import LedgerEntry
from dpsynth.privacy.outputs import RECONSTRUCTION_FILE, labelled
from dpsynth.privacy.statistics import dp_latent_scale, gaussian_noise_multiplier
from dpsynth.runs import load_weights, read_model_meta, save_weights
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
    With `dp`, `data` is private: patient-level DP-SGD, no adversarial term, and a latent
    scale that is public (the `init` run's) or a DP estimate charged to the ledger.
    """
    cache = Cache(data)
    rank = init_distributed(dp)
    init_meta = read_model_meta(init) if init else None
    if init_meta is not None:
        config = adopt_architecture(config, init_meta, ("autoencoder",))
    refuse_mixed_lineage(cache.cache_id, cache.path, dp, [Path(init)] if init else [])
    # Held until the model is written: a second process on this run is refused.
    with hold_run(out) if rank == 0 else contextlib.nullcontext():
        run = prepare_run_dir(out, resume) if rank == 0 else Path(out)
        barrier()
        device = pick_device()
        rng = seed_everything(config.autoencoder_training.seed)
        model = build_autoencoder(config.autoencoder).to(device)
        if init is not None:
            model.load_state_dict(load_weights(Path(init) / "autoencoder.safetensors"))
        losses = _VolumeLosses(config.autoencoder, device)
        if dp:
            fit = _PrivateFit(run, model, cache, config, rng, losses, init, init_meta)
        else:
            fit = _PublicFit(run, model, cache, config, rng, losses)
        fit.start(resume)
        save_config(run, config)
        fit.fit()
        model.load_state_dict(fit.ema.state_dict(model))
        model.eval()
        if rank == 0:  # under torchrun every rank holds the same weights; one writes them
            parents = [Path(init)] if init else []
            _finish(run, model, cache, config, fit.latent_scale(model), private=dp, parents=parents)
            if not dp and init is not None:  # a public stage still carries what its parents spent
                carry_lineage(run, [Path(init)])
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


class _PublicFit:
    """Non-private loop: random volumes, AdamW, warm-up, EMA, optional PatchGAN term."""

    adversarial = True  # builds, trains and checkpoints the PatchGAN discriminator

    def __init__(self, run, model, cache, config, rng, losses) -> None:
        self.run, self.model, self.cache, self.rng, self.losses = run, model, cache, rng, losses
        self.config, self.cfg, self.tcfg = config, config.autoencoder, config.autoencoder_training
        device = next(model.parameters()).device
        self.device = device
        tcfg = self.tcfg
        self.opt = torch.optim.AdamW(model.parameters(), lr=self.lr, weight_decay=tcfg.weight_decay)
        self.disc = self.opt_d = None
        if self.adversarial:
            self.disc = PatchDiscriminator3D(1, channels=self.cfg.discriminator_channels)
            self.disc.to(device)
            self.opt_d = torch.optim.AdamW(
                self.disc.parameters(),
                lr=self.cfg.discriminator_lr or tcfg.lr,  # the study: 5e-6, 20x below the AE's
                weight_decay=tcfg.weight_decay,
            )
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, lr_factor(self.warmup_steps, *self.decay)
        )
        self.ema = EMA(model, tcfg.ema_decay)
        self.step = 0

    lr = property(lambda self: self.tcfg.lr)
    warmup_steps = property(lambda self: self.tcfg.warmup_steps)
    total_steps = property(
        lambda self: public_total_steps(self.tcfg, len(self.cache.volume_indices("train")))
    )

    @property
    def decay(self) -> tuple[float | None, float]:
        """(steps between lr decays, factor) for :func:`lr_factor`."""
        volumes = len(self.cache.volume_indices("train"))
        per_epoch = public_steps_per_epoch(self.tcfg, volumes)
        return decay_steps(self.tcfg, per_epoch), self.tcfg.lr_decay_factor

    def start(self, resume: bool) -> None:
        """Restore the checkpoint, or open a new stage (under DP: the budget check)."""
        if resume:
            self.restore(*ckpt.load_checkpoint(self.run / "checkpoint"))
        else:
            self.open()

    def fit(self) -> None:
        main = is_main()  # under torchrun (DP only) rank 0 writes
        monitor = Monitor(self.run, self.total_steps, self.step, "autoencoder") if main else None
        self.model.train()
        grid_due = False
        while self.step < self.total_steps:
            volumes, logs = self.train_step()
            self.sched.step()
            self.ema.update(self.model, self.step)
            self.step += 1
            done, last = self.step, self.step == self.total_steps
            if not main:
                continue
            monitor.step(done, volumes, logs, done % self.tcfg.log_every == 0)
            grid_due |= done % self.tcfg.sample_every == 0 or last
            if done % self.tcfg.checkpoint_every == 0 or last:
                self.checkpoint()
                if grid_due:  # after the checkpoint that records its steps (see ldm.py)
                    self.save_grid(done)
                    grid_due = False
        if main:
            monitor.close()

    def open(self) -> None:
        pass

    def train_step(self) -> tuple[int, dict[str, float]]:
        cfg, tcfg = self.cfg, self.tcfg
        self.opt.zero_grad(set_to_none=True)
        adv_on = cfg.adversarial_weight > 0 and self.step >= cfg.adversarial_start
        rows = self.cache.volume_indices("train")
        logs: dict[str, float] = {}
        for _ in range(tcfg.grad_accumulation):
            x = load_volumes(self.cache.images, self.rng.choice(rows, tcfg.batch_size))
            x = x.to(self.device)
            with autocast(self.device, tcfg.bf16):
                output = self.model(x)
                loss, rec = (v.mean() for v in self.losses(output, x, self.step))
                if adv_on:
                    loss = loss + cfg.adversarial_weight * generator_loss(
                        self.disc(output.reconstruction), cfg.adversarial_loss
                    )
            (loss / tcfg.grad_accumulation).backward()
            logs = {"loss": float(loss.detach()), "reconstruction": float(rec.detach())}
            if adv_on:
                self.opt_d.zero_grad(set_to_none=True)
                with autocast(self.device, tcfg.bf16):
                    fake = self.disc(output.reconstruction.detach())
                    d_loss = discriminator_loss(self.disc(x), fake, cfg.adversarial_loss)
                d_loss.backward()
                self.opt_d.step()
                logs["discriminator"] = float(d_loss.detach())
        self.opt.step()
        return tcfg.batch_size * tcfg.grad_accumulation, logs

    def save_grid(self, step: int) -> None:
        _save_reconstruction_grid(self.run, self.model, self.cache, step)

    def checkpoint_state(self) -> tuple[dict, dict]:
        tensors = {f"model.{k}": v for k, v in self.model.state_dict().items()}
        tensors.update({f"ema.{k}": v for k, v in self.ema.shadow.items()})
        t_opt, m_opt = self.optimizer_state()
        t_rng, m_rng = ckpt.rng_state(self.rng)
        tensors.update(t_opt | t_rng)
        state = {"step": self.step, "opt": m_opt, "rng": m_rng}
        if self.disc is not None:
            tensors.update({f"disc.{k}": v for k, v in self.disc.state_dict().items()})
            t_optd, state["optd"] = ckpt.optimizer_state(self.opt_d, "optd")
            tensors.update(t_optd)
        return tensors, state

    def optimizer_state(self) -> tuple[dict, dict]:
        return ckpt.optimizer_state(self.opt, "opt")

    def load_optimizer(self, tensors: dict, meta: dict) -> None:
        ckpt.load_optimizer_state(self.opt, tensors, meta, "opt")

    def checkpoint(self) -> None:
        ckpt.save_checkpoint(self.run / "checkpoint", *self.checkpoint_state())

    def restore(self, tensors: dict, state: dict) -> None:
        self.model.load_state_dict(ckpt.strip_prefix(tensors, "model."))
        self.ema.load_shadow(ckpt.strip_prefix(tensors, "ema."))
        self.load_optimizer(tensors, state["opt"])
        if self.disc is not None:
            self.disc.load_state_dict(ckpt.strip_prefix(tensors, "disc."))
            ckpt.load_optimizer_state(self.opt_d, tensors, state["optd"], "optd")
        ckpt.restore_rng(tensors, state["rng"], self.rng)
        self.step = int(state["step"])
        self.sched.last_epoch = self.step

    def latent_scale(self, model) -> tuple[float, str]:
        """Estimated on this run's own training data, which is public here."""

        rows = self.cache.volume_indices("train")[:256]
        batches = (
            load_volumes(self.cache.images, rows[i : i + 8]).to(self.device)
            for i in range(0, len(rows), 8)
        )
        return float(estimate_latent_scale(model, batches)), "public training data of this run"


class _PrivateFit(DPCheckpoints, _PublicFit):
    """Patient-level DP-SGD fine-tuning; no discriminator (it would see private data).

    Reconstruction grids are not drawn: they would put private images in the run folder.
    """

    adversarial = False

    def __init__(self, run, model, cache, config, rng, losses, init, init_meta) -> None:

        super().__init__(run, model, cache, config, rng, losses)
        if self.cfg.adversarial_weight > 0:
            warnings.warn(
                "autoencoder.adversarial_weight: the adversarial term is off under DP "
                "(the discriminator would see private data without a guarantee)",
                stacklevel=3,
            )
        self.init_meta = init_meta
        self.scale_entry = None if init_meta else self._reserve_latent_scale(config.privacy)
        self.dp = DPStage(
            stage="autoencoder-dp-sgd", cache=cache, model=model, optimizer=self.opt,
            privacy=config.privacy, run=run, parents=[Path(init)] if init else [],
            extra_entries=[self.scale_entry] if self.scale_entry else [],
            distributed=is_distributed(), main=is_main(),
        )  # fmt: skip

    # The DP stage's optimisation settings live in the `privacy` section.
    lr = property(lambda self: self.config.privacy.lr)
    warmup_steps = property(lambda self: self.config.privacy.warmup_steps)
    total_steps = property(lambda self: self.dp.total_steps)

    @property
    def decay(self) -> tuple[float | None, float]:
        p = self.config.privacy
        return decay_steps(p, dp_steps_per_epoch(self.cache, p)), p.lr_decay_factor

    def _reserve_latent_scale(self, privacy) -> LedgerEntry:
        """Without a public run to inherit it from, the latent scale is a DP statistic."""

        sigma = gaussian_noise_multiplier(
            privacy.latent_scale_epsilon, None, privacy.delta, privacy.accountant
        )
        return LedgerEntry.gaussian(
            "latent-scale", sigma, records=len(self.cache.patient_rows("train")),
            delta=privacy.delta, accountant=privacy.accountant,
            cache_id=self.cache.cache_id,
            note="DP latent scale of the DP autoencoder (clipped per-patient second moment)",
        )  # fmt: skip

    def open(self) -> None:
        self.dp.open()

    def train_step(self) -> tuple[int, dict[str, float]]:
        rows = self.dp.patient_rows[self.dp.patients(self.step)]
        x = load_volumes(self.cache.images, rows.reshape(-1))
        x = x.reshape(len(rows), rows.shape[1], *x.shape[1:]).to(self.device)
        loss = self.dp.engine.step({"volumes": x}, self.patient_loss)
        return int(round(2 * self.dp.engine.expected_batch_size)), {
            "loss": loss,
            **self.dp.metrics(),
        }

    def patient_loss(self, model_fn, record: dict) -> torch.Tensor:
        """One DP record's loss: the SUM over that patient's volumes (clipped as one)."""
        x = record["volumes"]
        with autocast(self.device, self.tcfg.bf16):
            output = model_fn(x)
        return self.losses(output, x, self.step)[0].sum()

    def save_grid(self, step: int) -> None:
        pass

    def restore(self, tensors: dict, state: dict) -> None:
        super().restore(tensors, state)
        self.dp.resume(state)

    def latent_scale(self, model) -> tuple[float, str]:
        if self.init_meta is not None:
            return float(self.init_meta["latent_scale"]), "public: the pre-trained --init run"

        rows = self.dp.patient_rows
        latents = encode_split(model, self.cache, rows.reshape(-1), scale=1.0, batch=8)
        scale, _ = dp_latent_scale(
            latents.float().numpy(), rng=np.random.default_rng(secrets.randbits(63)),
            noise_multiplier=self.scale_entry.noise_multiplier, delta=self.scale_entry.delta,
            patients=np.repeat(np.arange(len(rows)), rows.shape[1]),
            accountant=self.scale_entry.accountant,
        )  # fmt: skip
        return scale, "DP estimate on the private training data (ledger: latent-scale)"


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
) -> None:
    """Save the EMA weights, the latent scale with its source, and test PSNR/SSIM."""
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
            "trained_on": trained_on(cache.cache_id, private, parents),
        },
    )
    atomic_write_json(run / RECONSTRUCTION_FILE, quality)


def reconstruct(model, x: torch.Tensor) -> torch.Tensor:
    """Deterministic reconstruction (posterior mean): draws nothing from the RNG."""
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
