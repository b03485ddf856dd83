"""Noise schedulers, classifier-free-guided samplers and the latent diffusion pipeline."""

from dpsynth.diffusion.pipeline import LatentDiffusion, estimate_latent_scale
from dpsynth.diffusion.schedulers import add_noise, make_scheduler

__all__ = ["LatentDiffusion", "add_noise", "estimate_latent_scale", "make_scheduler"]
