"""Attribute encoder: one token per clinical attribute, contextualised by self-attention."""

from __future__ import annotations

import torch
from torch import nn

from dpsynth.attributes import N_ATTRIBUTES
from dpsynth.models.blocks import Attention, FeedForward

__all__ = ["AttributeEncoder"]


class _TokenLayer(nn.Module):
    """Pre-norm transformer layer: self-attention then MLP, both residual."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attention = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = FeedForward(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def _from_identity_form(module, state_dict, prefix, *_args) -> None:
    """Weights written before the known path (up to 2026-12-03) load with the same outputs.

    They built a known token as identity + value * weight and a missing one as identity +
    unknown. Attributes their training never gave keep their untrained weights: which those
    were is a fact about the data, not the weights.
    """
    identity = state_dict.pop(prefix + "identity", None)
    if identity is not None:
        unknown = state_dict[prefix + "unknown"]
        state_dict[prefix + "unknown"] = identity + unknown
        state_dict[prefix + "known_shift"] = -unknown


class AttributeEncoder(nn.Module):
    """Map normalised attributes (B, A) with NaN = unknown to tokens (B, A, embed_dim).

    Token a = unknown_a, plus known_shift_a + value_a * value_weight_a when the value is
    known. `unknown_a` is a learned embedding per attribute: its identity, and what a
    missing value (or one dropped for classifier-free guidance) reads as. The known path
    starts at zero, so an attribute that training never gave (the public `acdc` cohort has
    no AGE or SEX) reads as unknown until data teaches it, not as a random embedding (under
    DP-SGD, until the stage's noise moves it: see `untaught`).
    """

    def __init__(
        self,
        num_attributes: int = N_ATTRIBUTES,
        embed_dim: int = 16,
        num_heads: int = 2,
        num_layers: int = 1,
    ) -> None:
        super().__init__()
        self.num_attributes = num_attributes
        self.embed_dim = embed_dim
        self.unknown = nn.Parameter(torch.randn(num_attributes, embed_dim))
        self.known_shift = nn.Parameter(torch.zeros(num_attributes, embed_dim))
        self.value_weight = nn.Parameter(torch.zeros(num_attributes, embed_dim))
        self.register_load_state_dict_pre_hook(_from_identity_form)
        self.layers = nn.Sequential(*(_TokenLayer(embed_dim, num_heads) for _ in range(num_layers)))
        self.norm_out = nn.LayerNorm(embed_dim)

    def forward(self, values: torch.Tensor) -> torch.Tensor:
        values = values.unsqueeze(-1)
        missing = torch.isnan(values)
        # NaN must not reach the multiplication: 0 * NaN poisons the weight's gradient even
        # where the mask discards the product.
        known = self.known_shift + torch.nan_to_num(values, nan=0.0) * self.value_weight
        tokens = self.unknown + known.masked_fill(missing, 0.0)
        return self.norm_out(self.layers(tokens))

    def untaught(self) -> list[int]:
        """Attributes whose known path is still zero: a value given for them reads as unknown.

        Only training without DP leaves such a path at zero: DP-SGD's noise reaches every
        trainable parameter, so after a DP stage an attribute the private data never gave
        is not listed (its token is noise, not unknown), nor is one in weights converted
        by `_from_identity_form`.
        """
        idle = (self.known_shift == 0).all(dim=1) & (self.value_weight == 0).all(dim=1)
        return idle.nonzero().flatten().tolist()
