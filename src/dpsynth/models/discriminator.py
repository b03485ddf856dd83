"""PatchGAN discriminator for the autoencoders, and its adversarial losses."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from dpsynth.errors import DpsynthError
from dpsynth.models.blocks import group_norm

__all__ = ["PatchDiscriminator3D", "discriminator_loss", "generator_loss"]

AdversarialKind = Literal["hinge", "lsgan"]


class PatchDiscriminator3D(nn.Module):
    """Real/fake logits per patch, (B, 1, S, H / 2^L, W / 2^L) for ``num_layers`` = L.

    Down-samples in-plane only (stride 1 x 2 x 2) like the autoencoders, with GroupNorm
    (DP-compatible) instead of the usual BatchNorm. MONAI's ``PatchDiscriminator`` uses
    isotropic strides and BatchNorm by default, hence this one.
    """

    def __init__(
        self, in_channels: int = 1, channels: int = 32, num_layers: int = 3, norm_groups: int = 8
    ) -> None:
        super().__init__()
        down = dict(kernel_size=(3, 4, 4), stride=(1, 2, 2), padding=1)
        layers: list[nn.Module] = [nn.Conv3d(in_channels, channels, **down), nn.LeakyReLU(0.2)]
        width = channels
        for _ in range(1, num_layers):
            layers += [
                nn.Conv3d(width, width * 2, **down),
                group_norm(norm_groups, width * 2),
                nn.LeakyReLU(0.2),
            ]
            width *= 2
        layers += [
            nn.Conv3d(width, width * 2, 3, padding=1),
            group_norm(norm_groups, width * 2),
            nn.LeakyReLU(0.2),
            nn.Conv3d(width * 2, 1, 3, padding=1),
        ]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _check_kind(kind: str) -> None:
    if kind not in ("hinge", "lsgan"):
        raise DpsynthError(f"adversarial_loss: unknown kind {kind!r} (use 'hinge' or 'lsgan')")


def discriminator_loss(
    real_logits: torch.Tensor, fake_logits: torch.Tensor, kind: AdversarialKind = "hinge"
) -> torch.Tensor:
    """Discriminator loss (scalar); pass logits of detached reconstructions as ``fake_logits``."""
    _check_kind(kind)
    if kind == "hinge":
        return 0.5 * (F.relu(1.0 - real_logits).mean() + F.relu(1.0 + fake_logits).mean())
    return 0.5 * ((real_logits - 1.0).square().mean() + fake_logits.square().mean())


def generator_loss(fake_logits: torch.Tensor, kind: AdversarialKind = "hinge") -> torch.Tensor:
    """Adversarial term of the autoencoder's loss (scalar)."""
    _check_kind(kind)
    if kind == "hinge":
        return -fake_logits.mean()
    return (fake_logits - 1.0).square().mean()
