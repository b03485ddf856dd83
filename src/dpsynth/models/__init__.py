"""Networks: compression models, PatchGAN discriminator, attribute encoder, latent denoiser."""

from dpsynth.models.autoencoder import AutoencoderOutput, KLAutoencoder, VQAutoencoder
from dpsynth.models.conditioning import AttributeEncoder
from dpsynth.models.denoiser import LatentDenoiser
from dpsynth.models.discriminator import (
    PatchDiscriminator3D,
    PerceptualLoss,
    discriminator_loss,
    generator_loss,
)

__all__ = [
    "AttributeEncoder",
    "AutoencoderOutput",
    "KLAutoencoder",
    "LatentDenoiser",
    "PatchDiscriminator3D",
    "PerceptualLoss",
    "VQAutoencoder",
    "discriminator_loss",
    "generator_loss",
]
