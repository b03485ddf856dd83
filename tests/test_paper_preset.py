"""The `paper` preset follows the study; each study knob changes behaviour, with numbers.

The preset itself is never trained here (a GPU job): it is loaded and validated, and each
knob it sets is exercised on a tiny config.
"""

from __future__ import annotations

import math
import re

import pytest
import torch
from test_models import vgg_weights_file
from test_training import _cache, tiny

from dpsynth.config import load_config
from dpsynth.errors import DpsynthError
from dpsynth.models.autoencoder import AutoencoderOutput
from dpsynth.models.build import build_autoencoder
from dpsynth.models.discriminator import PerceptualLoss, discriminator_loss, generator_loss
from dpsynth.training.autoencoder import _VolumeLosses, kl_capacity_at
from dpsynth.training.common import lr_factor, public_total_steps


def test_paper_preset_is_the_studys_configuration():
    c = load_config("paper")
    ae, at = c.autoencoder, c.autoencoder_training
    assert (at.batch_size, at.lr, at.epochs, at.warmup_steps) == (32, 1e-4, 50, 0)
    assert (ae.reconstruction_loss, ae.reconstruction_weight) == ("l2", 1000.0)
    assert (ae.kl_weight, ae.kl_capacity, ae.kl_capacity_steps) == (0.1, 3.0, 100_000)
    assert ae.perceptual_weights is None and ae.perceptual_weight == 100.0  # user's weights only
    assert (ae.adversarial_weight, ae.adversarial_start, ae.adversarial_loss) == (50.0, 0, "bce")
    assert ae.discriminator_lr == 5e-6
    lt = c.ldm_training
    assert (lt.batch_size, lt.lr, lt.epochs, lt.warmup_steps) == (64, 2e-5, 150, 0)
    assert (lt.lr_decay_epochs, lt.lr_decay_factor) == (25, 0.9)
    p = c.privacy
    assert (p.lr, p.max_grad_norm, p.delta, p.epochs, p.batch_size) == (1e-5, 1.0, 1e-5, 150, 256)
    assert (p.lr_decay_epochs, p.lr_decay_factor) == (25, 0.9)


def test_paper_vq_variant_diffuses_the_studys_latent():
    c = load_config("paper", overrides={"autoencoder.kind": "vq", "privacy.lr": 2e-5})
    vq = build_autoencoder(c.autoencoder)
    assert vq.latent_channels == 1  # 1 x 13 x 24 x 24 latents, as the study's VQ-VAE
    assert tuple(vq.codebook.shape) == (4000, 4)
    z = vq.encode_latent(torch.zeros(1, 1, 13, 16, 16))  # 4x in-plane: 96x96 -> 24x24
    assert tuple(z.shape) == (1, 1, 13, 4, 4)
    with pytest.raises(DpsynthError, match="autoencoder.latent_channels"):
        load_config("paper", overrides={"autoencoder.kind": "vq", "autoencoder.latent_channels": 8})


@pytest.mark.parametrize(
    ("key", "value", "problem"),
    [
        ("autoencoder.reconstruction_weight", 0, "> 0"),
        ("autoencoder.kl_capacity", -1, ">= 0"),
        ("autoencoder.discriminator_lr", 0, "> 0"),
        ("ldm_training.lr_decay_epochs", 0, "> 0"),
        ("privacy.lr_decay_factor", 1.5, "(0, 1]"),
        ("ldm_training.epochs", -2, "> 0"),
    ],
)
def test_new_knobs_are_validated(key, value, problem):
    with pytest.raises(
        DpsynthError, match=re.escape(f"config: {key}: ") + ".*" + re.escape(problem)
    ):
        load_config("paper", overrides={key: value})


def _losses(**overrides):
    cfg = load_config("demo", overrides={f"autoencoder.{k}": v for k, v in overrides.items()})
    return _VolumeLosses(cfg.autoencoder, torch.device("cpu"))


def test_kl_capacity_schedule_and_loss_with_numbers():
    cfg = load_config("paper").autoencoder
    assert kl_capacity_at(cfg, 0) == 0.0
    assert kl_capacity_at(cfg, 50_000) == pytest.approx(1.5)
    assert kl_capacity_at(cfg, 250_000) == 3.0  # capped at C_max
    losses = _losses(reconstruction_weight=1.0, kl_weight=0.1, kl_capacity=3.0,
                     kl_capacity_steps=100_000, channel_multipliers=[1, 2, 2])  # fmt: skip
    x = torch.zeros(1, 1, 5, 16, 16)
    # 5 x 4 x 4 = 80 latent positions; a summed KL of 160 is 2 nats per position
    out = AutoencoderOutput(x.clone(), torch.tensor([160.0]))
    assert losses(out, x, step=0)[0].item() == pytest.approx(0.1 * 2.0)
    assert losses(out, x, step=50_000)[0].item() == pytest.approx(0.1 * 0.5)
    assert losses(out, x, step=100_000)[0].item() == pytest.approx(0.1 * 1.0)  # |2 - 3|
    plain = _losses(kl_weight=0.1)  # no capacity: weight x summed KL, whatever the step
    assert plain(out, x, step=50_000)[0].item() == pytest.approx(16.0)


def test_reconstruction_weight_scales_the_l2_term():
    x = torch.zeros(2, 1, 5, 16, 16)
    out = AutoencoderOutput(x + 0.1, torch.zeros(2))  # MSE 0.01 per volume
    loss, rec = _losses(reconstruction_loss="l2", reconstruction_weight=1000.0)(out, x)
    assert rec.tolist() == pytest.approx([0.01, 0.01])
    assert loss.tolist() == pytest.approx([10.0, 10.0])


def test_perceptual_term_uses_the_users_weights(tmp_path):
    weights = vgg_weights_file(tmp_path / "vgg.safetensors")
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(2, 1, 5, 16, 16, generator=gen)
    out = AutoencoderOutput(torch.rand(2, 1, 5, 16, 16, generator=gen), torch.zeros(2))
    without = _losses(reconstruction_weight=1000.0)(out, x)[0]
    with_pl = _losses(reconstruction_weight=1000.0, perceptual_weights=weights,
                      perceptual_weight=100.0)(out, x)[0]  # fmt: skip
    expected = 100.0 * PerceptualLoss(weights)(out.reconstruction, x)
    assert (with_pl - without).tolist() == pytest.approx(expected.tolist(), rel=1e-5)
    assert (expected > 0).all()


def test_bce_adversarial_losses_with_numbers():
    zero, big = torch.zeros(4), torch.full((4,), 20.0)
    assert discriminator_loss(zero, zero, "bce").item() == pytest.approx(math.log(2))
    assert discriminator_loss(big, -big, "bce").item() == pytest.approx(0.0, abs=1e-8)
    assert generator_loss(zero, "bce").item() == pytest.approx(math.log(2))
    assert generator_loss(-big, "bce").item() == pytest.approx(20.0, rel=1e-6)


def test_step_decay_and_epochs_with_numbers():
    f = lr_factor(warmup_steps=0, decay_every=10.0, decay_factor=0.9)
    assert [f(s) for s in (0, 9, 10, 19, 20, 35)] == pytest.approx([1, 1, 0.9, 0.9, 0.81, 0.729])
    warm = lr_factor(warmup_steps=4)  # no decay: the old warm-up schedule
    assert [warm(s) for s in (0, 3, 100)] == pytest.approx([0.25, 1.0, 1.0])
    t = load_config("demo", overrides={"ldm_training.epochs": 2.0,
                                       "ldm_training.batch_size": 4}).ldm_training  # fmt: skip
    assert public_total_steps(t, volumes=10) == 5  # ceil(2 x 10 / 4)
    assert public_total_steps(load_config("demo").ldm_training, volumes=10) == 2000


@pytest.fixture(scope="module")
def public_cache(tmp_path_factory):
    return _cache(tmp_path_factory.mktemp("paper"), "acdc", 1, 10)


def _lr_after(optimizer, scheduler, steps: int) -> float:
    for _ in range(steps):
        optimizer.step()
        scheduler.step()
    return optimizer.param_groups[0]["lr"]


def test_autoencoder_loop_takes_the_study_knobs(public_cache, tmp_path):
    """Epochs, discriminator lr, BCE PatchGAN from step 0 and the decay, in the real loop."""
    import numpy as np

    from dpsynth.data.cache import Cache
    from dpsynth.training.autoencoder import _AutoencoderTask
    from dpsynth.training.trainer import PublicStrategy, Trainer

    cfg = tiny(**{"autoencoder.adversarial_weight": 50.0, "autoencoder.adversarial_start": 0,
                  "autoencoder.adversarial_loss": "bce", "autoencoder.discriminator_lr": 5e-6,
                  "autoencoder.kl_capacity": 3.0, "autoencoder.reconstruction_weight": 1000.0,
                  "autoencoder_training.epochs": 2.0, "autoencoder_training.warmup_steps": 0,
                  "autoencoder_training.lr_decay_epochs": 1.0,
                  "autoencoder_training.lr_decay_factor": 0.5})  # fmt: skip
    cache = Cache(public_cache)
    model = build_autoencoder(cfg.autoencoder)
    rng = np.random.default_rng(0)
    task = _AutoencoderTask(model, cache, cfg, rng, adversarial=True)
    volumes = len(cache.volume_indices("train"))
    strategy = PublicStrategy(cfg.autoencoder_training, volumes)
    fit = Trainer(tmp_path, task, strategy, rng)
    per_epoch = volumes / 2  # batch 2
    assert strategy.total_steps == math.ceil(2 * per_epoch)  # epochs win over `steps` (4)
    assert task.opt_d.param_groups[0]["lr"] == 5e-6
    logs = strategy.step(task, 0)  # the adversarial term is on from step 0
    assert "discriminator" in logs and math.isfinite(logs["discriminator"])
    lr = cfg.autoencoder_training.lr
    assert _lr_after(fit.optimizer, fit.scheduler, math.ceil(per_epoch)) == pytest.approx(lr * 0.5)


def test_ldm_loop_decays_by_epoch_and_runs_its_epochs(public_cache, tmp_path):
    import numpy as np

    from dpsynth.data.cache import Cache
    from dpsynth.diffusion.schedulers import make_scheduler
    from dpsynth.models.build import build_denoiser
    from dpsynth.training.ldm import DenoisingObjective, _DenoiserTask
    from dpsynth.training.trainer import PublicStrategy, Trainer, dp_steps_per_epoch

    cfg = tiny(**{"ldm_training.epochs": 3.0, "ldm_training.batch_size": 3,
                  "ldm_training.lr": 1e-3, "ldm_training.warmup_steps": 0,
                  "ldm_training.lr_decay_epochs": 1.0, "ldm_training.lr_decay_factor": 0.5})  # fmt: skip
    cache = Cache(public_cache)
    ae = build_autoencoder(cfg.autoencoder).eval()
    rng = np.random.default_rng(0)
    task = _DenoiserTask(
        cache=cache, autoencoder=ae, latent_scale=1.0,
        denoiser=build_denoiser(cfg.denoiser, cache.shape[0], ae.latent_channels),
        objective=DenoisingObjective(make_scheduler("ddpm"), 0.1), config=cfg, rng=rng,
        generator=torch.Generator().manual_seed(0), validation=None,
    )  # fmt: skip
    volumes = len(cache.volume_indices("train"))
    strategy = PublicStrategy(cfg.ldm_training, volumes)
    trainer = Trainer(tmp_path, task, strategy, rng)
    assert strategy.total_steps == math.ceil(3 * volumes / 3)
    per_epoch = volumes / 3
    opt, sched = trainer.optimizer, trainer.scheduler
    assert _lr_after(opt, sched, math.ceil(per_epoch) - 1) == pytest.approx(1e-3)
    assert _lr_after(opt, sched, 1) == pytest.approx(5e-4)  # one epoch: one decay
    assert _lr_after(opt, sched, math.ceil(per_epoch)) == pytest.approx(2.5e-4)
    # Under DP an epoch is patients / logical batch (the planner's sampling rate)
    patients = len(cache.patient_rows("train"))
    assert dp_steps_per_epoch(cache, cfg.privacy) == patients / cfg.privacy.batch_size
