"""The autoencoders' losses beyond L2: PatchGAN adversarial terms and a perceptual loss."""

from __future__ import annotations

import os
from typing import Literal

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from dpsynth.errors import DpsynthError
from dpsynth.models.blocks import group_norm

__all__ = ["PatchDiscriminator3D", "PerceptualLoss", "discriminator_loss", "generator_loss"]

AdversarialKind = Literal["hinge", "lsgan", "bce"]


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
    if kind not in ("hinge", "lsgan", "bce"):
        raise DpsynthError(
            f"adversarial_loss: unknown kind {kind!r} (use 'hinge', 'lsgan' or 'bce')"
        )


def discriminator_loss(
    real_logits: torch.Tensor, fake_logits: torch.Tensor, kind: AdversarialKind = "hinge"
) -> torch.Tensor:
    """Discriminator loss (scalar); pass logits of detached reconstructions as ``fake_logits``."""
    _check_kind(kind)
    if kind == "hinge":
        return 0.5 * (F.relu(1.0 - real_logits).mean() + F.relu(1.0 + fake_logits).mean())
    if kind == "bce":  # the study's PatchGAN: BCE with logits, real 1 / fake 0
        return 0.5 * (F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean())
    return 0.5 * ((real_logits - 1.0).square().mean() + fake_logits.square().mean())


def generator_loss(fake_logits: torch.Tensor, kind: AdversarialKind = "hinge") -> torch.Tensor:
    """Adversarial term of the autoencoder's loss (scalar)."""
    _check_kind(kind)
    if kind == "hinge":
        return -fake_logits.mean()
    if kind == "bce":  # non-saturating: BCE of the fakes against the "real" label
        return F.softplus(-fake_logits).mean()
    return (fake_logits - 1.0).square().mean()


# torchvision's VGG16 ``features`` up to relu3_3: conv widths, "M" = 2x2 max-pool.
_VGG16_TO_RELU3_3 = (64, 64, "M", 128, 128, "M", 256, 256, 256)
_FEATURE_TAPS = (3, 8, 15)  # relu1_2, relu2_2, relu3_3: the layers LPIPS compares


class PerceptualLoss(nn.Module):
    """LPIPS-style distance between volumes, per slice, with frozen VGG16 features.

    MONAI's ``PerceptualLoss`` downloads its weights; dpsynth never does. The weights come
    from a local safetensors file holding torchvision's VGG16 ``features.<i>.weight/bias``
    keys (for example ``save_file({f"features.{k}": v for k, v in
    torchvision.models.vgg16(weights=VGG16_Weights.IMAGENET1K_V1).features.state_dict().items()}, path)``,
    run once by the user). Extra keys are ignored.
    """

    def __init__(self, weights_path: str | os.PathLike) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        in_channels = 3
        for width in _VGG16_TO_RELU3_3:
            if width == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [nn.Conv2d(in_channels, width, 3, padding=1), nn.ReLU()]
                in_channels = width
        self.features = nn.Sequential(*layers)
        self._load(weights_path)
        self.requires_grad_(False)  # frozen; it has no dropout or BatchNorm, so mode is moot
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))

    def _load(self, weights_path: str | os.PathLike) -> None:
        try:
            state = load_file(os.fspath(weights_path))
        except (FileNotFoundError, SafetensorError, OSError) as e:
            raise DpsynthError(f"{weights_path}: cannot read perceptual weights ({e})") from None
        wanted = {f"features.{k}": v for k, v in self.features.state_dict().items()}
        for key, ref in wanted.items():
            if key not in state:
                raise DpsynthError(f"{weights_path}: missing key {key!r} (VGG16 features)")
            if state[key].shape != ref.shape:
                raise DpsynthError(
                    f"{weights_path}: {key} has shape {tuple(state[key].shape)}, "
                    f"expected {tuple(ref.shape)}"
                )
        self.features.load_state_dict({k[len("features.") :]: state[k] for k in wanted})

    def _taps(self, slices: torch.Tensor) -> list[torch.Tensor]:
        h = (slices.expand(-1, 3, -1, -1) - self.mean) / self.std
        taps = []
        for i, layer in enumerate(self.features):
            h = layer(h)
            if i in _FEATURE_TAPS:
                taps.append(h / (h.square().sum(1, keepdim=True) + 1e-10).sqrt())
        return taps

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Distance per sample (B,) between volumes (B, 1, S, H, W) with values in [0, 1]."""
        b, _, s, h, w = x.shape
        both = torch.cat([x, y]).transpose(1, 2).reshape(2 * b * s, 1, h, w)
        total = 0.0
        for feat in self._taps(both):
            fx, fy = feat.chunk(2)
            total = total + (fx - fy).square().sum(1).mean((1, 2))
        return total.reshape(b, s).mean(1)
