"""Build the networks a config describes; the one place config sections become modules."""

from __future__ import annotations

from torch import nn

from dpsynth.config import AutoencoderConfig, DenoiserConfig
from dpsynth.models.autoencoder import KLAutoencoder, VQAutoencoder
from dpsynth.models.denoiser import LatentDenoiser


def build_autoencoder(cfg: AutoencoderConfig) -> nn.Module:
    common = dict(
        in_channels=1,
        channels=cfg.channels,
        channel_multipliers=tuple(cfg.channel_multipliers),
        num_res_blocks=cfg.num_res_blocks,
        norm_groups=cfg.norm_groups,
    )
    if cfg.kind == "vq":  # diffuses latent_channels, quantises code_dim (the study: 1 and 4)
        return VQAutoencoder(
            **common,
            latent_channels=cfg.latent_channels,
            codebook_size=cfg.codebook_size,
            code_dim=cfg.code_dim,
            commitment_weight=cfg.commitment_weight,
        )
    return KLAutoencoder(**common, latent_channels=cfg.latent_channels)


def build_denoiser(cfg: DenoiserConfig, num_slices: int, latent_channels: int) -> nn.Module:
    return LatentDenoiser(
        in_channels=latent_channels,
        channels=cfg.channels,
        channel_multipliers=tuple(cfg.channel_multipliers),
        attention_levels=tuple(cfg.attention_levels),
        num_res_blocks=cfg.num_res_blocks,
        num_heads=cfg.num_heads,
        num_slices=num_slices,
        time_embed_dim=cfg.time_embed_dim,
        attribute_embed_dim=cfg.attribute_embed_dim,
        dropout=cfg.dropout,
        norm_groups=cfg.norm_groups,
    )
