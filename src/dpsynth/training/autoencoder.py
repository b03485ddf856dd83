"""Train the compression model (KL or VQ) on prepared volumes.

Non-private training treats `--data` as public; this run's latent scale is then a public
quantity that later (private) stages may use. Under DP the adversarial term is off (the
discriminator would see private data without a guarantee) and the latent scale comes from
a Gaussian-mechanism estimate charged to the ledger.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F

from dpsynth.config import Config
from dpsynth.data.cache import Cache
from dpsynth.errors import DpsynthError
from dpsynth.io import atomic_write_json
from dpsynth.models.build import build_autoencoder
from dpsynth.training import checkpoint as ckpt
from dpsynth.training.common import (
    autocast,
    load_volumes,
    pick_device,
    prepare_run_dir,
    seed_everything,
    warmup_factor,
)
from dpsynth.training.ema import EMA
from dpsynth.training.monitor import Monitor


def train_autoencoder(
    data: str | os.PathLike,
    out: str | os.PathLike,
    config: Config,
    resume: bool = False,
    dp: bool = False,
) -> Path:
    """Train an autoencoder run in `out`; returns the run folder."""
    if dp:
        # Not built yet: a DP autoencoder also needs a DP latent scale (dpsynth.privacy.
        # statistics.dp_latent_scale) and no adversarial term. Refuse rather than train
        # non-privately on data the user called private.
        raise DpsynthError(
            "train-autoencoder --dp: not supported yet; pre-train the autoencoder on public "
            "data and DP fine-tune the LDM (train-ldm --dp)"
        )
    from dpsynth.models.discriminator import (
        PatchDiscriminator3D,
        PerceptualLoss,
        discriminator_loss,
        generator_loss,
    )

    cache = Cache(data)
    run = prepare_run_dir(out, config, resume)
    cfg, tcfg = config.autoencoder, config.autoencoder_training
    device = pick_device()
    rng = seed_everything(tcfg.seed)

    model = build_autoencoder(cfg).to(device)
    disc = PatchDiscriminator3D(in_channels=1, channels=cfg.discriminator_channels).to(device)
    use_adv = cfg.adversarial_weight > 0
    perceptual = (
        PerceptualLoss(cfg.perceptual_weights).to(device) if cfg.perceptual_weights else None
    )
    opt = torch.optim.AdamW(model.parameters(), lr=tcfg.lr, weight_decay=tcfg.weight_decay)
    opt_d = torch.optim.AdamW(disc.parameters(), lr=tcfg.lr, weight_decay=tcfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_factor(tcfg.warmup_steps))
    ema = EMA(model, tcfg.ema_decay)
    start = 0
    if resume:
        start = _restore(run, model, disc, opt, opt_d, sched, ema, rng)

    train_rows = cache.volume_indices("train")
    recon_loss = F.l1_loss if cfg.reconstruction_loss == "l1" else F.mse_loss
    monitor = Monitor(run, tcfg.steps, start, "autoencoder")
    model.train()
    for step in range(start, tcfg.steps):
        opt.zero_grad(set_to_none=True)
        adv_on = use_adv and step >= cfg.adversarial_start
        logs: dict[str, float] = {}
        for _ in range(tcfg.grad_accumulation):
            x = load_volumes(cache.images, rng.choice(train_rows, tcfg.batch_size)).to(device)
            with autocast(device, tcfg.bf16):
                output = model(x)
                rec = recon_loss(output.reconstruction.float(), x)
                loss = rec + _regularization_weight(cfg) * output.regularization_loss.mean()
                if perceptual is not None:
                    p_loss = perceptual(output.reconstruction.float(), x).mean()
                    loss = loss + cfg.perceptual_weight * p_loss
                if adv_on:
                    g_loss = generator_loss(disc(output.reconstruction))
                    loss = loss + cfg.adversarial_weight * g_loss
            (loss / tcfg.grad_accumulation).backward()
            logs = {"loss": float(loss.detach()), "reconstruction": float(rec.detach())}
            if adv_on:
                opt_d.zero_grad(set_to_none=True)
                with autocast(device, tcfg.bf16):
                    d_loss = discriminator_loss(disc(x), disc(output.reconstruction.detach()))
                d_loss.backward()
                opt_d.step()
                logs["discriminator"] = float(d_loss)
        opt.step()
        sched.step()
        ema.update(model, step)
        done = step + 1
        monitor.step(
            done, tcfg.batch_size * tcfg.grad_accumulation, logs, done % tcfg.log_every == 0
        )
        if done % tcfg.sample_every == 0 or done == tcfg.steps:
            _save_reconstruction_grid(run, model, cache, done)
        if done % tcfg.checkpoint_every == 0 or done == tcfg.steps:
            _checkpoint(run, model, disc, opt, opt_d, ema, rng, done)
    monitor.close()

    model.load_state_dict(ema.state_dict(model))
    model.eval()
    _finish(run, model, cache, config)
    return run


def _regularization_weight(cfg) -> float:
    # The VQ term (codebook + commitment) is already weighted inside the model.
    return cfg.kl_weight if cfg.kind == "kl" else 1.0


def _checkpoint(run, model, disc, opt, opt_d, ema, rng, step) -> None:
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    tensors.update({f"disc.{k}": v for k, v in disc.state_dict().items()})
    tensors.update({f"ema.{k}": v for k, v in ema.shadow.items()})
    t_opt, m_opt = ckpt.optimizer_state(opt, "opt")
    t_optd, m_optd = ckpt.optimizer_state(opt_d, "optd")
    t_rng, m_rng = ckpt.rng_state(rng)
    tensors.update(t_opt | t_optd | t_rng)
    state = {"step": step, "opt": m_opt, "optd": m_optd, "rng": m_rng}
    ckpt.save_checkpoint(run / "checkpoint", tensors, state)


def _restore(run, model, disc, opt, opt_d, sched, ema, rng) -> int:
    tensors, state = ckpt.load_checkpoint(run / "checkpoint")
    model.load_state_dict(ckpt.strip_prefix(tensors, "model."))
    disc.load_state_dict(ckpt.strip_prefix(tensors, "disc."))
    ema.load_shadow(ckpt.strip_prefix(tensors, "ema."))
    ckpt.load_optimizer_state(opt, tensors, state["opt"], "opt")
    ckpt.load_optimizer_state(opt_d, tensors, state["optd"], "optd")
    ckpt.restore_rng(tensors, state["rng"], rng)
    sched.last_epoch = state["step"]
    return int(state["step"])


@torch.no_grad()
def _save_reconstruction_grid(run: Path, model, cache: Cache, step: int) -> None:
    from dpsynth.report.figures import mid_slice_grid, slice_strips

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
def _finish(run: Path, model, cache: Cache, config: Config) -> None:
    """Save EMA weights, the latent scale (public: this run's own training data) and test PSNR/SSIM."""
    from dpsynth.sampling.pipeline import estimate_latent_scale

    device = next(model.parameters()).device
    train_rows = cache.volume_indices("train")[:256]
    batches = (
        load_volumes(cache.images, train_rows[i : i + 8]).to(device)
        for i in range(0, len(train_rows), 8)
    )
    latent_scale = float(estimate_latent_scale(model, batches))
    quality = reconstruction_quality(model, cache)
    ckpt.save_weights(run / "autoencoder.safetensors", model.state_dict())
    atomic_write_json(
        run / "model.json",
        {
            "kind": "autoencoder",
            "autoencoder": config.to_dict()["autoencoder"],
            "shape": list(cache.shape),
            "spacing": list(cache.spacing),
            "latent_scale": latent_scale,
            "latent_scale_source": "public training data of this run",
            "data_fingerprint": cache.meta["fingerprint"],
        },
    )
    atomic_write_json(run / "reconstruction.json", quality)


def reconstruct(model, x: torch.Tensor) -> torch.Tensor:
    """Deterministic reconstruction (posterior mean): draws nothing from the RNG."""
    return model.decode_latent(model.encode_latent(x)).float().clamp(0, 1)


@torch.no_grad()
def reconstruction_quality(model, cache: Cache, split: str = "test", batch: int = 8) -> dict:
    """PSNR (dB) and SSIM of reconstructions on a split, with MONAI's metrics (data range 1)."""
    from monai.metrics import PSNRMetric, SSIMMetric

    rows = cache.volume_indices(split)
    if len(rows) == 0:
        return {"split": split, "n": 0}
    device = next(model.parameters()).device
    # SSIM slice-wise in 2D: 10 mm slices make a 3D window meaningless across depth.
    psnr, ssim = PSNRMetric(max_val=1.0), SSIMMetric(spatial_dims=2, data_range=1.0, win_size=7)
    for i in range(0, len(rows), batch):
        x = load_volumes(cache.images, rows[i : i + batch]).to(device)
        y = reconstruct(model, x)
        psnr(y, x)
        ssim(y.flatten(0, 2).unsqueeze(1), x.flatten(0, 2).unsqueeze(1))
    return {
        "split": split,
        "n": int(len(rows)),
        "psnr_db": float(psnr.aggregate().item()),
        "ssim": float(ssim.aggregate().item()),
    }
