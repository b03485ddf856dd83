"""Building blocks shared by the autoencoders and the denoiser.

Everything here keeps the slice axis intact: volumes are (B, C, S, H, W) and only H, W are
re-sampled. All blocks are written for DP-SGD with ``torch.func``: GroupNorm/LayerNorm only,
no in-place ops on activations, no data-dependent control flow.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch._C._functorch import TransformType
from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters

from dpsynth.errors import DpsynthError

__all__ = [
    "Attention",
    "Downsample",
    "FeedForward",
    "PlaneSelfAttention",
    "TimestepResBlock",
    "Upsample",
    "attention",
    "check_norm_groups",
    "group_norm",
    "single_as_pair",
]


def single_as_pair(fn, *tensors: torch.Tensor):
    """``fn(*tensors)``, but a CPU batch of one runs as two copies and the first is returned.

    PyTorch takes its oneDNN 3D convolution for one input only when N*C*D*H > 20480 (a
    heuristic written for 2D, `use_mkldnn` in aten/src/ATen/native/Convolution.cpp); a single
    13 x 48 x 48 volume falls on the im2col path, which runs a batch of one slower than
    oneDNN runs two (BENCHMARKS.md, Explorer). Per-sample modules only (GroupNorm, no
    batch statistics), so the copy cannot change the result beyond rounding.
    """
    if tensors[0].shape[0] != 1 or tensors[0].device.type != "cpu":
        return fn(*tensors)
    out = fn(*(torch.cat([t, t]) for t in tensors))
    return tuple(o[:1] for o in out) if isinstance(out, tuple) else out[:1]


def convolve_channels_last(module: nn.Module) -> nn.Module:
    """`module`, its weights stored channels-last when they are on the CPU.

    oneDNN's 3D convolutions run faster in that layout, and PyTorch takes it for any
    convolution whose weight has it: the demo autoencoder decodes 1.4x and encodes 1.3x
    faster, the referee trains 1.3x faster, the inference denoiser runs 1.1x faster
    (BENCHMARKS.md, "Channels-last convolutions", "Label maps");
    values change by float rounding only. Outputs with several channels then come out
    channels-last too, so callers hand back `.contiguous()` tensors. Not applied to a model
    DP-SGD trains: unmeasured there (its gradient taps check themselves against torch.func
    either way). Other devices are left as they are (not measured).
    """
    if next(module.parameters()).device.type == "cpu":
        module.to(memory_format=torch.channels_last_3d)
    return module


def check_norm_groups(num_groups: int, *widths: int) -> None:
    """Raise a user-facing error if a channel count does not split into ``num_groups``."""
    for channels in widths:
        if channels % num_groups:
            raise DpsynthError(
                f"norm_groups: {channels} channels do not divide into {num_groups} groups"
            )


def group_norm(num_groups: int, channels: int) -> nn.GroupNorm:
    """GroupNorm (per-sample statistics, so DP-compatible) over validated groups."""
    check_norm_groups(num_groups, channels)
    return nn.GroupNorm(num_groups, channels, eps=1e-6)


class Downsample(nn.Module):
    """Halve H and W with a strided (1, 3, 3) convolution; the slice axis is untouched."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv3d(channels, channels, (1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Double H and W (nearest neighbour) then smooth with a (1, 3, 3) convolution."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv3d(channels, channels, (1, 3, 3), padding=(0, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=(1.0, 2.0, 2.0), mode="nearest"))


class TimestepResBlock(nn.Module):
    """GroupNorm-SiLU-Conv residual block with an additive time embedding and dropout.

    MONAI's ``DiffusionUNetResnetBlock`` has no dropout (the study uses 0.1), hence this one.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        time_embed_dim: int,
        norm_groups: int,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.norm1 = group_norm(norm_groups, in_channels)
        self.conv1 = nn.Conv3d(in_channels, out_channels, 3, padding=1)
        self.time_proj = nn.Linear(time_embed_dim, out_channels)
        self.norm2 = group_norm(norm_groups, out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv3d(out_channels, out_channels, 3, padding=1)
        self.skip = (
            nn.Identity()
            if in_channels == out_channels
            else nn.Conv3d(in_channels, out_channels, 1)
        )

    def forward(self, x: torch.Tensor, time_emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.time_proj(F.silu(time_emb))[:, :, None, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


def _inside_vmap() -> bool:
    """True while `torch.func.vmap` runs the caller (DP-SGD's per-patient gradients).

    torch.func has no public query for this; the functorch interpreter stack is what vmap
    itself consults, and `tests/test_models.py` checks this still detects vmap.
    """
    return any(i.key() == TransformType.Vmap for i in retrieve_all_functorch_interpreters())


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q kᵀ / √d) v over (..., L, d): `F.scaled_dot_product_attention`'s function.

    The fused CPU kernels have no vmap batching rule, so under vmap PyTorch runs them one
    sample at a time ("performance drop" warning) and the per-patient DP step paid for it.
    Plain matmul and softmax batch natively, so they run under vmap; outside it the fused
    kernel stays (1.5-2x faster than the matmuls on the demo's attention shapes, 2 cores).
    """
    if not _inside_vmap():
        return F.scaled_dot_product_attention(q, k, v)
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
    return torch.softmax(scores, dim=-1) @ v


class Attention(nn.Module):
    """Multi-head (cross-)attention over token sequences (N, L, dim), see :func:`attention`.

    MONAI's ``SABlock``/``CrossAttentionBlock`` would fit, but they need ``einops``, which
    dpsynth does not depend on.
    """

    def __init__(self, dim: int, num_heads: int, context_dim: int | None = None) -> None:
        super().__init__()
        if dim % num_heads:
            raise DpsynthError(f"num_heads: {dim} channels do not divide into {num_heads} heads")
        self.num_heads = num_heads
        context_dim = context_dim or dim
        self.to_q = nn.Linear(dim, dim)
        self.to_k = nn.Linear(context_dim, dim)
        self.to_v = nn.Linear(context_dim, dim)
        self.to_out = nn.Linear(dim, dim)

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        n, length, dim = t.shape
        return t.reshape(n, length, self.num_heads, dim // self.num_heads).transpose(1, 2)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context
        q, k, v = (
            self._heads(self.to_q(x)),
            self._heads(self.to_k(context)),
            self._heads(self.to_v(context)),
        )
        out = attention(q, k, v)
        return self.to_out(out.transpose(1, 2).reshape(x.shape))


class FeedForward(nn.Module):
    """Transformer MLP: Linear - GELU - Dropout - Linear."""

    def __init__(self, dim: int, expansion: int = 4, dropout: float = 0.0) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(dim, dim * expansion),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(dim * expansion, dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class PlaneSelfAttention(nn.Module):
    """Residual self-attention among the H*W positions of each slice (slices do not mix)."""

    def __init__(self, channels: int, num_heads: int, norm_groups: int) -> None:
        super().__init__()
        self.norm = group_norm(norm_groups, channels)
        self.attention = Attention(channels, num_heads)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, s, h, w = x.shape
        tokens = self.norm(x).permute(0, 2, 3, 4, 1).reshape(b * s, h * w, c)
        out = self.attention(tokens).reshape(b, s, h, w, c).permute(0, 4, 1, 2, 3)
        return x + out
