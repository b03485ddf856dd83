"""Latent denoiser: a UNet over (B, C, S, h, w) latents that predicts the added noise ε.

MONAI's ``DiffusionModelUNet`` down-samples every spatial axis, so 13-slice latents cannot
pass through it; this UNet re-samples H and W only and adds attention across slices. Its
residual blocks mirror MONAI's (plus dropout), and the time embedding is MONAI's.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.networks.nets.diffusion_model_unet import get_timestep_embedding
from torch import nn

from dpsynth.attributes import N_ATTRIBUTES
from dpsynth.errors import DpsynthError
from dpsynth.models.blocks import (
    Attention,
    Downsample,
    FeedForward,
    TimestepResBlock,
    Upsample,
    check_norm_groups,
    group_norm,
)
from dpsynth.models.conditioning import AttributeEncoder

__all__ = ["LatentDenoiser", "SliceTransformerBlock"]


class SlicePosition(nn.Module):
    """A learned embedding per slice, added to tokens (b, S, n, c).

    Its own module (not a bare parameter of the block) so that DP-SGD's layer taps
    (`privacy/grad_taps.py`) compute its per-patient gradient from this add alone instead
    of re-running the whole transformer block per patient.
    """

    def __init__(self, num_slices: int, channels: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(num_slices, channels) * 0.02)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens + self.weight[:, None, :]


def _rename_slice_position(module, state_dict, prefix, *_args) -> None:
    """Checkpoints written before `SlicePosition` (the shipped demo models) load unchanged."""
    old = prefix + "slice_position"
    if old in state_dict:
        state_dict[old + ".weight"] = state_dict.pop(old)


class SliceTransformerBlock(nn.Module):
    """In-plane self-attention, attention across slices, MLP, cross-attention to attributes.

    Each step is pre-norm and residual. The across-slice step sees a learned slice-position
    embedding so it knows base from apex.
    """

    def __init__(
        self, channels: int, num_heads: int, num_slices: int, context_dim: int, dropout: float
    ) -> None:
        super().__init__()
        self.num_slices = num_slices
        self.norm_plane = nn.LayerNorm(channels)
        self.plane_attention = Attention(channels, num_heads)
        self.slice_position = SlicePosition(num_slices, channels)
        self.register_load_state_dict_pre_hook(_rename_slice_position)
        self.norm_slices = nn.LayerNorm(channels)
        self.slice_attention = Attention(channels, num_heads)
        self.norm_mlp = nn.LayerNorm(channels)
        self.mlp = FeedForward(channels, dropout=dropout)
        self.norm_cross = nn.LayerNorm(channels)
        self.cross_attention = Attention(channels, num_heads, context_dim=context_dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, c, s, h, w = x.shape
        t = x.permute(0, 2, 3, 4, 1).reshape(b, s, h * w, c)
        plane = self.norm_plane(t).reshape(b * s, h * w, c)
        t = t + self.plane_attention(plane).reshape(b, s, h * w, c)
        across = self.slice_position(self.norm_slices(t)).transpose(1, 2)
        across = self.slice_attention(across.reshape(b * h * w, s, c))
        t = t + across.reshape(b, h * w, s, c).transpose(1, 2)
        t = t + self.mlp(self.norm_mlp(t))
        t = t.reshape(b, s * h * w, c)
        t = t + self.cross_attention(self.norm_cross(t), context)
        return t.reshape(b, s, h, w, c).permute(0, 4, 1, 2, 3)


class _Stage(nn.Module):
    """A residual block, optionally followed by a :class:`SliceTransformerBlock`."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        attention: bool,
        *,
        time_embed_dim: int,
        norm_groups: int,
        dropout: float,
        num_heads: int,
        num_slices: int,
        context_dim: int,
    ) -> None:
        super().__init__()
        self.res = TimestepResBlock(in_channels, out_channels, time_embed_dim, norm_groups, dropout)
        self.transformer = (
            SliceTransformerBlock(out_channels, num_heads, num_slices, context_dim, dropout)
            if attention
            else None
        )

    def forward(
        self, x: torch.Tensor, time_emb: torch.Tensor, context: torch.Tensor
    ) -> torch.Tensor:
        x = self.res(x, time_emb)
        return x if self.transformer is None else self.transformer(x, context)


class LatentDenoiser(nn.Module):
    """ε-prediction UNet conditioned on the timestep and on 14 normalised attributes.

    ``forward(x (B,C,S,h,w), timesteps (B,), attributes (B,A) normalised, NaN = unknown)``
    returns ε of the shape of ``x``. The :class:`AttributeEncoder` is a sub-module so it is
    trained (and DP-wrapped) together with the UNet.
    """

    def __init__(
        self,
        in_channels: int = 1,
        channels: int = 128,
        channel_multipliers: Sequence[int] = (1, 2, 3),
        attention_levels: Sequence[bool] = (False, True, True),
        num_res_blocks: int = 2,
        num_heads: int = 4,
        num_slices: int = 13,
        time_embed_dim: int = 128,
        attribute_embed_dim: int = 16,
        dropout: float = 0.1,
        norm_groups: int = 16,
        num_attributes: int = N_ATTRIBUTES,
        attribute_heads: int = 2,
    ) -> None:
        super().__init__()
        if len(attention_levels) != len(channel_multipliers):
            raise DpsynthError(
                f"attention_levels: {len(attention_levels)} entries for "
                f"{len(channel_multipliers)} channel_multipliers"
            )
        if not any(attention_levels):
            raise DpsynthError(
                "attention_levels: attributes enter by cross-attention; enable a level"
            )
        widths = [channels * m for m in channel_multipliers]
        check_norm_groups(norm_groups, *widths)
        self.channels = channels
        self.num_slices = num_slices
        self.num_levels = len(widths)
        cfg = dict(
            time_embed_dim=time_embed_dim,
            norm_groups=norm_groups,
            dropout=dropout,
            num_heads=num_heads,
            num_slices=num_slices,
            context_dim=attribute_embed_dim,
        )

        self.time_embed = nn.Sequential(
            nn.Linear(channels, time_embed_dim),
            nn.SiLU(),
            nn.Linear(time_embed_dim, time_embed_dim),
        )
        self.attribute_encoder = AttributeEncoder(
            num_attributes, attribute_embed_dim, num_heads=attribute_heads
        )
        self.conv_in = nn.Conv3d(in_channels, widths[0], 3, padding=1)

        self.down = nn.ModuleList()
        skip_widths = [widths[0]]
        prev = widths[0]
        for level, width in enumerate(widths):
            for _ in range(num_res_blocks):
                self.down.append(_Stage(prev, width, attention_levels[level], **cfg))
                prev = width
                skip_widths.append(prev)
            if level < len(widths) - 1:
                self.down.append(Downsample(prev))
                skip_widths.append(prev)

        self.middle = _Stage(prev, prev, attention_levels[-1], **cfg)
        self.middle_res = TimestepResBlock(prev, prev, time_embed_dim, norm_groups, dropout)

        self.up = nn.ModuleList()
        for level in reversed(range(len(widths))):
            for _ in range(num_res_blocks + 1):
                self.up.append(
                    _Stage(prev + skip_widths.pop(), widths[level], attention_levels[level], **cfg)
                )
                prev = widths[level]
            if level > 0:
                self.up.append(Upsample(prev))

        self.norm_out = group_norm(norm_groups, prev)
        self.conv_out = nn.Conv3d(prev, in_channels, 3, padding=1)

    def _check_shape(self, x: torch.Tensor) -> None:
        # Shapes are static (also under vmap), so this check is not data-dependent control flow.
        factor = 2 ** (self.num_levels - 1)
        if (
            x.ndim != 5
            or x.shape[2] != self.num_slices
            or x.shape[3] % factor
            or x.shape[4] % factor
        ):
            raise DpsynthError(
                f"latents: expected (B, C, {self.num_slices}, h, w) with h, w divisible by "
                f"{factor}, got {tuple(x.shape)}"
            )

    def forward(
        self, x: torch.Tensor, timesteps: torch.Tensor, attributes: torch.Tensor
    ) -> torch.Tensor:
        self._check_shape(x)
        time_emb = self.time_embed(get_timestep_embedding(timesteps, self.channels).to(x.dtype))
        context = self.attribute_encoder(attributes.to(x.dtype))

        h = self.conv_in(x)
        skips = [h]
        for module in self.down:
            h = module(h) if isinstance(module, Downsample) else module(h, time_emb, context)
            skips.append(h)
        h = self.middle_res(self.middle(h, time_emb, context), time_emb)
        for module in self.up:
            if isinstance(module, Upsample):
                h = module(h)
            else:
                h = module(torch.cat([h, skips.pop()], dim=1), time_emb, context)
        # Default layout out, also when `convolve_channels_last` stored the weights.
        return self.conv_out(F.silu(self.norm_out(h))).contiguous()

    def attention_and_conditioning_parameters(self) -> list[str]:
        """Names of the attention blocks' and attribute encoder's parameters.

        Fine-tuning only these (the DP-LDM recipe) leaves fewer parameters to noise.
        """
        names = []
        for prefix, module in self.named_modules():
            if isinstance(module, (SliceTransformerBlock, AttributeEncoder)):
                names += [f"{prefix}.{name}" for name, _ in module.named_parameters()]
        return names
