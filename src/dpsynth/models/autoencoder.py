"""Compression models: a β-VAE (KL) and a VQ-VAE over one anisotropic encoder/decoder.

Each extra resolution level halves H and W; the slice axis is never down-sampled, so a
13 x 96 x 96 volume with three levels becomes a 13 x 24 x 24 latent (BRIEF section 2).
Reconstructions are unbounded (no sigmoid, which would slow learning near 0 and 1); they are
trained towards the [0, 1] intensities and the sampler clips.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from monai.networks.nets.autoencoderkl import AEKLResBlock
from torch import nn

from dpsynth.errors import DpsynthError
from dpsynth.models.blocks import (
    Downsample,
    PlaneSelfAttention,
    Upsample,
    check_norm_groups,
    group_norm,
)

__all__ = [
    "AutoencoderOutput",
    "Decoder",
    "Encoder",
    "KLAutoencoder",
    "Quantization",
    "VQAutoencoder",
]


class AutoencoderOutput(NamedTuple):
    reconstruction: torch.Tensor  # (B, C, S, H, W)
    regularization_loss: torch.Tensor  # (B,) KL divergence, or codebook + commitment loss


class Quantization(NamedTuple):
    quantized: torch.Tensor  # straight-through: forward value = code, gradient flows to input
    indices: torch.Tensor  # (B, S, h, w) code index per latent position
    loss: torch.Tensor  # (B,) codebook + commitment loss


def _res_block(in_channels: int, out_channels: int, norm_groups: int) -> AEKLResBlock:
    # MONAI's residual block (GroupNorm-SiLU-Conv3d x2) fits as is: 3x3x3 convs keep the shape.
    return AEKLResBlock(3, in_channels, norm_groups, 1e-6, out_channels)


def _widths(channels: int, channel_multipliers: Sequence[int], norm_groups: int) -> list[int]:
    widths = [channels * m for m in channel_multipliers]
    if not widths:
        raise DpsynthError("channel_multipliers: needs at least one level")
    check_norm_groups(norm_groups, *widths)
    return widths


def _middle(width: int, norm_groups: int, attention: bool) -> list[nn.Module]:
    attn = [PlaneSelfAttention(width, num_heads=1, norm_groups=norm_groups)] if attention else []
    return [_res_block(width, width, norm_groups), *attn, _res_block(width, width, norm_groups)]


class Encoder(nn.Module):
    """Residual levels with in-plane down-sampling between them, then a middle block."""

    def __init__(
        self,
        in_channels: int,
        channels: int,
        channel_multipliers: Sequence[int],
        num_res_blocks: int,
        out_channels: int,
        norm_groups: int,
        attention: bool = False,
    ) -> None:
        super().__init__()
        widths = _widths(channels, channel_multipliers, norm_groups)
        self.conv_in = nn.Conv3d(in_channels, widths[0], 3, padding=1)
        layers: list[nn.Module] = []
        prev = widths[0]
        for level, width in enumerate(widths):
            for _ in range(num_res_blocks):
                layers.append(_res_block(prev, width, norm_groups))
                prev = width
            if level < len(widths) - 1:
                layers.append(Downsample(width))
        layers += _middle(prev, norm_groups, attention)
        self.layers = nn.Sequential(*layers)
        self.norm_out = group_norm(norm_groups, prev)
        self.conv_out = nn.Conv3d(prev, out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_out(F.silu(self.norm_out(self.layers(self.conv_in(x)))))


class Decoder(nn.Module):
    """Mirror of :class:`Encoder` with in-plane up-sampling; ``in_channels`` = latent channels."""

    def __init__(
        self,
        in_channels: int,
        channels: int,
        channel_multipliers: Sequence[int],
        num_res_blocks: int,
        out_channels: int,
        norm_groups: int,
        attention: bool = False,
    ) -> None:
        super().__init__()
        widths = _widths(channels, channel_multipliers, norm_groups)
        prev = widths[-1]
        self.conv_in = nn.Conv3d(in_channels, prev, 3, padding=1)
        layers = _middle(prev, norm_groups, attention)
        for level in reversed(range(len(widths))):
            for _ in range(num_res_blocks):
                layers.append(_res_block(prev, widths[level], norm_groups))
                prev = widths[level]
            if level > 0:
                layers.append(Upsample(prev))
        self.layers = nn.Sequential(*layers)
        self.norm_out = group_norm(norm_groups, prev)
        self.conv_out = nn.Conv3d(prev, out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.conv_out(F.silu(self.norm_out(self.layers(self.conv_in(z)))))


class _Autoencoder(nn.Module):
    """Shared construction and the common interface of both compression models."""

    def __init__(
        self,
        in_channels: int,
        channels: int,
        channel_multipliers: Sequence[int],
        num_res_blocks: int,
        latent_channels: int,
        encoder_out_channels: int,
        norm_groups: int,
        attention: bool,
        decoder_in_channels: int | None = None,
    ) -> None:
        super().__init__()
        self.latent_channels = latent_channels
        self.num_levels = len(channel_multipliers)
        shared = dict(
            channels=channels,
            channel_multipliers=channel_multipliers,
            num_res_blocks=num_res_blocks,
            norm_groups=norm_groups,
            attention=attention,
        )
        self.encoder = Encoder(in_channels, out_channels=encoder_out_channels, **shared)
        self.decoder = Decoder(
            decoder_in_channels or latent_channels, out_channels=in_channels, **shared
        )

    @property
    def downsample_factor(self) -> int:
        """In-plane size ratio between a volume and its latent (depth ratio is always 1)."""
        return 2 ** (self.num_levels - 1)

    def encode_latent(self, x: torch.Tensor) -> torch.Tensor:
        """Deterministic latent (B, latent_channels, S, H/f, W/f) used by the diffusion model."""
        raise NotImplementedError

    def decode_latent(self, z: torch.Tensor) -> torch.Tensor:
        """Volume (B, in_channels, S, H, W) from a latent."""
        raise NotImplementedError


class KLAutoencoder(_Autoencoder):
    """β-VAE: Gaussian posterior, reparameterised sample in training (the mean in eval), KL
    to N(0, I) as regulariser.

    ``regularization_loss`` is the KL divergence summed over latent elements, per sample;
    the training loop weights it (β).
    """

    def __init__(
        self,
        in_channels: int = 1,
        channels: int = 64,
        channel_multipliers: Sequence[int] = (1, 2, 2),
        num_res_blocks: int = 2,
        latent_channels: int = 1,
        norm_groups: int = 16,
        attention: bool = False,
    ) -> None:
        super().__init__(
            in_channels,
            channels,
            channel_multipliers,
            num_res_blocks,
            latent_channels,
            encoder_out_channels=2 * latent_channels,
            norm_groups=norm_groups,
            attention=attention,
        )

    def _posterior(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean, logvar = self.encoder(x).chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def forward(self, x: torch.Tensor) -> AutoencoderOutput:
        mean, logvar = self._posterior(x)
        # Eval mode decodes the posterior mean: deterministic, so that DP-SGD's taps check
        # (two eval-mode passes compared) does not see the draw as patients mixing.
        z = mean + torch.exp(0.5 * logvar) * torch.randn_like(mean) if self.training else mean
        kl = 0.5 * (mean.square() + logvar.exp() - 1.0 - logvar).flatten(1).sum(1)
        return AutoencoderOutput(self.decoder(z), kl)

    def encode_latent(self, x: torch.Tensor) -> torch.Tensor:
        return self._posterior(x)[0]

    def decode_latent(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z)


class VQAutoencoder(_Autoencoder):
    """VQ-VAE: each latent position (a ``code_dim`` vector) snaps to its nearest codebook entry.

    The codebook is learned by gradient (codebook + commitment loss, straight-through
    estimator), not by MONAI's EMA quantiser: an EMA update reads the batch outside the
    gradient, which DP-SGD cannot clip or noise, and it mutates buffers inside forward.
    The diffused latent is the encoder's output before quantisation, ``latent_channels``
    channels (None: ``code_dim``). With fewer channels than ``code_dim`` a 1x1x1 convolution
    maps it to the codes, as the study's VQ-VAE does: it diffuses a 1-channel latent and
    quantises 4-dim codes (model_zoo/autoencoder.py, ``quant_conv``, in
    compai-lab/2024-miccai-dgm-daum).
    """

    def __init__(
        self,
        in_channels: int = 1,
        channels: int = 64,
        channel_multipliers: Sequence[int] = (1, 2, 2),
        num_res_blocks: int = 2,
        latent_channels: int | None = None,
        norm_groups: int = 16,
        attention: bool = False,
        codebook_size: int = 4000,
        code_dim: int = 4,
        commitment_weight: float = 0.25,
    ) -> None:
        latent_channels = latent_channels or code_dim
        if latent_channels > code_dim:
            raise DpsynthError(
                f"latent_channels: a VQ latent has at most code_dim={code_dim} channels, "
                f"got {latent_channels}"
            )
        super().__init__(
            in_channels,
            channels,
            channel_multipliers,
            num_res_blocks,
            latent_channels,
            encoder_out_channels=latent_channels,
            norm_groups=norm_groups,
            attention=attention,
            decoder_in_channels=code_dim,
        )
        self.to_code = (
            nn.Identity()
            if latent_channels == code_dim
            else nn.Conv3d(latent_channels, code_dim, 1)
        )
        self.commitment_weight = commitment_weight
        self.codebook = nn.Parameter(
            torch.empty(codebook_size, code_dim).uniform_(-1.0 / codebook_size, 1.0 / codebook_size)
        )

    def quantize(self, latent: torch.Tensor) -> Quantization:
        """Nearest-code quantisation of a latent (B, latent_channels, S, h, w)."""
        z = self.to_code(latent)
        flat = z.movedim(1, -1)
        codebook = self.codebook.detach()  # the code choice (argmin) carries no gradient
        distances = (
            flat.detach().square().sum(-1, keepdim=True)
            - 2.0 * flat.detach() @ codebook.T
            + codebook.square().sum(-1)
        )
        indices = distances.argmin(-1)
        codes = F.embedding(indices, self.codebook).movedim(-1, 1)
        codebook_loss = (codes - z.detach()).square().flatten(1).mean(1)
        commitment_loss = (z - codes.detach()).square().flatten(1).mean(1)
        # Straight-through: the value is exactly the code, the gradient goes to z unchanged.
        quantized = codes.detach() + (z - z.detach())
        return Quantization(
            quantized, indices, codebook_loss + self.commitment_weight * commitment_loss
        )

    def forward(self, x: torch.Tensor) -> AutoencoderOutput:
        q = self.quantize(self.encoder(x))
        return AutoencoderOutput(self.decoder(q.quantized), q.loss)

    def encode_latent(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)

    def decode_latent(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.quantize(z).quantized)
