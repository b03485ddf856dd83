"""Noise schedules (MONAI) and reverse-diffusion samplers, configured in one place.

MONAI's ``linear_beta`` is ``torch.linspace(beta_start, beta_end, T)``: the study's linear
schedule (T = 150, β from 1e-4 to 7e-2) exactly.
"""

from __future__ import annotations

from typing import Literal

import torch
from monai.networks.schedulers import DDPMScheduler, Scheduler

from dpsynth.config import DEFAULT_BETA_END, DEFAULT_BETA_START, DEFAULT_TIMESTEPS
from dpsynth.errors import DpsynthError

__all__ = ["ODESolverScheduler", "add_noise", "keep_rows", "make_scheduler"]

SamplerName = Literal["ddpm", "ddim", "dpm++"]


class ODESolverScheduler(Scheduler):
    """Deterministic sampler of the probability-flow ODE: DDIM (order 1) or DPM-Solver++(2M).

    Data-prediction multistep updates of Lu et al. 2022 (arXiv 2211.01095, Algorithm 2) for
    ε-prediction on the discrete schedule; order 1 is exactly DDIM with η = 0. The timesteps
    run from T - 1 to 0 (MONAI's rounding) and every step lands on the next one in the
    list. MONAI's ``DDIMScheduler`` is not used because its ``step`` jumps back a fixed
    ``T // steps`` while its timesteps are rounded (gaps of 6 or 7 for T = 150 and 25 steps),
    so samples get mislabelled timesteps. The last step returns the predicted clean sample.
    Stateful along one trajectory: call ``set_timesteps`` before each new batch.
    """

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        schedule: str = "linear_beta",
        order: int = 2,
        **schedule_args,
    ) -> None:
        super().__init__(num_train_timesteps, schedule, **schedule_args)
        if order not in (1, 2):
            raise ValueError(f"order must be 1 or 2, got {order}")
        self.order = order
        self.set_timesteps(num_train_timesteps)

    def set_timesteps(
        self, num_inference_steps: int, device: str | torch.device | None = None
    ) -> None:
        self.num_inference_steps = num_inference_steps
        last = self.num_train_timesteps - 1
        self.timesteps = torch.linspace(last, 0, num_inference_steps, device=device).round().long()
        self._index = 0
        self._previous: tuple[torch.Tensor, torch.Tensor] | None = None  # (x0, h) of last step

    def keep_rows(self, rows: torch.Tensor) -> None:
        """Narrow the multistep state to batch rows ``rows`` (trajectories dropped mid-way)."""
        if self._previous is not None:
            x0_prev, h_prev = self._previous
            self._previous = (x0_prev[rows], h_prev)

    def _alpha_sigma_lambda(self, timestep: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        alpha_bar = self.alphas_cumprod[timestep].double()
        alpha, sigma = alpha_bar.sqrt(), (1 - alpha_bar).sqrt()
        return alpha, sigma, alpha.log() - sigma.log()

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int,
        sample: torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One step from ``timestep``: (next sample, predicted clean sample).

        ``generator`` is unused (the solver is deterministic); it keeps MONAI's signature.
        """
        alpha, sigma, lam = self._alpha_sigma_lambda(timestep)
        x0 = (sample - float(sigma) * model_output) / float(alpha)
        self._index += 1
        if self._index >= len(self.timesteps):
            return x0, x0
        next_t = int(self.timesteps[self._index])
        alpha_next, sigma_next, lam_next = self._alpha_sigma_lambda(next_t)
        h = lam_next - lam
        denoised = x0
        if self.order == 2 and self._previous is not None:  # extrapolate the data prediction
            x0_prev, h_prev = self._previous
            half_ratio = float(h / (2 * h_prev))
            denoised = (1 + half_ratio) * x0 - half_ratio * x0_prev
        self._previous = (x0, h)
        x_next = float(sigma_next / sigma) * sample - float(alpha_next * torch.expm1(-h)) * denoised
        return x_next, x0


def make_scheduler(
    name: SamplerName = "ddim",
    num_train_timesteps: int = DEFAULT_TIMESTEPS,
    beta_start: float = DEFAULT_BETA_START,
    beta_end: float = DEFAULT_BETA_END,
    schedule: str = "linear_beta",
    steps: int | None = None,
) -> Scheduler:
    """A scheduler ready to sample with ``steps`` model calls (default: all T).

    "ddpm" (MONAI, ancestral) always runs all T steps: its ``step`` assumes consecutive
    timesteps. "ddim" and "dpm++" (deterministic, :class:`ODESolverScheduler`) take 1 to T.
    ``clip_sample`` is off because latents are not confined to [-1, 1].
    """
    if name not in ("ddpm", "ddim", "dpm++"):
        raise DpsynthError(f"sampler: unknown sampler {name!r} (use 'ddpm', 'ddim' or 'dpm++')")
    steps = num_train_timesteps if steps is None else steps
    if name == "ddpm" and steps != num_train_timesteps:
        raise DpsynthError(
            f"steps: the ddpm sampler runs all {num_train_timesteps} steps, got {steps}; "
            "use 'ddim' or 'dpm++' for fewer"
        )
    if not 1 <= steps <= num_train_timesteps:
        raise DpsynthError(f"steps: must be between 1 and {num_train_timesteps}, got {steps}")
    schedule_args: dict = {"schedule": schedule}
    if schedule != "cosine":  # MONAI's cosine schedule takes no β range
        schedule_args.update(beta_start=beta_start, beta_end=beta_end)
    scheduler: Scheduler
    if name == "ddpm":
        scheduler = DDPMScheduler(num_train_timesteps, clip_sample=False, **schedule_args)
    else:
        order = 1 if name == "ddim" else 2
        scheduler = ODESolverScheduler(num_train_timesteps, order=order, **schedule_args)
    scheduler.set_timesteps(steps)
    return scheduler


def keep_rows(scheduler: Scheduler, rows: torch.Tensor) -> None:
    """Keep only batch rows ``rows`` of a scheduler's per-trajectory state: the ODE solvers'
    last data prediction; MONAI's DDPM keeps none (its noise comes from the generator)."""
    if isinstance(scheduler, ODESolverScheduler):
        scheduler.keep_rows(rows)


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
