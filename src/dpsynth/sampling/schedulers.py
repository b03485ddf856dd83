"""Noise schedules and reverse-diffusion steppers, from MONAI, configured in one place.

MONAI's ``linear_beta`` is ``torch.linspace(beta_start, beta_end, T)``: the study's linear
schedule (T = 150, β from 1e-4 to 7e-2) exactly.
"""

from __future__ import annotations

from typing import Literal

import torch
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler, Scheduler

from dpsynth.errors import DpsynthError

__all__ = ["AlignedDDIMScheduler", "add_noise", "make_scheduler"]

SamplerName = Literal["ddpm", "ddim"]


class AlignedDDIMScheduler(DDIMScheduler):
    """DDIM whose timesteps are exactly ``T // steps`` apart, counted down from T - 1.

    MONAI's ``set_timesteps`` rounds a linspace (gaps of 6 or 7 for T=150, 25 steps) while its
    ``step`` always jumps back by ``T // steps``: the sample would then be labelled with the
    wrong timestep at the next model call. Equal gaps keep the two consistent.
    """

    def set_timesteps(
        self, num_inference_steps: int, device: str | torch.device | None = None
    ) -> None:
        super().set_timesteps(num_inference_steps, device)
        gap = self.num_train_timesteps // num_inference_steps
        self.timesteps = (
            self.num_train_timesteps - 1 - gap * torch.arange(num_inference_steps, device=device)
        )


def make_scheduler(
    name: SamplerName = "ddim",
    num_train_timesteps: int = 150,
    beta_start: float = 1e-4,
    beta_end: float = 7e-2,
    schedule: str = "linear_beta",
    steps: int | None = None,
) -> Scheduler:
    """A MONAI scheduler for sampling with ``steps`` model calls (default: all T).

    DDPM always runs all T steps: MONAI's DDPM ``step`` assumes consecutive timesteps.
    ``clip_sample`` is off because latents are not confined to [-1, 1].
    """
    schedule_args: dict = {"schedule": schedule}
    if schedule != "cosine":
        schedule_args.update(beta_start=beta_start, beta_end=beta_end)
    steps = num_train_timesteps if steps is None else steps
    if name == "ddpm":
        if steps != num_train_timesteps:
            raise DpsynthError(
                f"steps: the ddpm sampler runs all {num_train_timesteps} steps, got {steps}; "
                "use sampler 'ddim' for fewer"
            )
        scheduler: Scheduler = DDPMScheduler(
            num_train_timesteps, clip_sample=False, **schedule_args
        )
    elif name == "ddim":
        if not 1 <= steps <= num_train_timesteps:
            raise DpsynthError(f"steps: must be between 1 and {num_train_timesteps}, got {steps}")
        scheduler = AlignedDDIMScheduler(num_train_timesteps, clip_sample=False, **schedule_args)
    else:
        raise DpsynthError(f"sampler: unknown sampler {name!r} (use 'ddpm' or 'ddim')")
    scheduler.set_timesteps(steps)
    return scheduler


def add_noise(
    scheduler: Scheduler, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
) -> torch.Tensor:
    """Forward diffusion q(x_t | x_0) = sqrt(ᾱ_t) x_0 + sqrt(1 - ᾱ_t) ε, per sample.

    Same formula as MONAI's ``Scheduler.add_noise``, which however moves the scheduler's
    tensors onto the input's device as a side effect; this pure version is safe inside
    ``torch.func`` transforms and concurrent use.
    """
    alpha_bar = scheduler.alphas_cumprod.to(device=x0.device, dtype=x0.dtype)[timesteps]
    alpha_bar = alpha_bar.reshape(-1, *([1] * (x0.ndim - 1)))
    return alpha_bar.sqrt() * x0 + (1.0 - alpha_bar).sqrt() * noise
