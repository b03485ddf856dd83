"""Networks: compression models, PatchGAN discriminator, attribute encoder, latent denoiser."""

from dpsynth.models.autoencoder import AutoencoderOutput, KLAutoencoder, VQAutoencoder
from dpsynth.models.conditioning import AttributeEncoder
from dpsynth.models.denoiser import LatentDenoiser

__all__ = [
    "AttributeEncoder",
    "AutoencoderOutput",
    "KLAutoencoder",
    "LatentDenoiser",
    "VQAutoencoder",
]
