"""Shared test helpers: a tiny analytic short-axis phantom with known labels, a tiny
denoiser, and a way to let an untrained one hear its attributes.

Import them with ``from conftest import make_phantom`` (pytest puts tests/ on sys.path).
"""

from __future__ import annotations

import numpy as np
import torch

from dpsynth.models import AttributeEncoder, LatentDenoiser


def make_phantom(
    slices: int = 6,
    size: int = 40,
    phase: str = "ED",
    centre: tuple[float, float] = (20.0, 22.0),
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """(image float32, mask uint8) of shape (slices, size, size), base -> apex.

    Labels 1 LV blood (a disc), 2 LV myocardium (a ring around it), 3 RV blood (a crescent
    to the left of the LV: ANGLE 0 in dpsynth's assumed array orientation). The LV narrows towards the apex; the last slice holds only
    myocardium (the apical cap). ES has a smaller cavity and a thicker wall.
    """
    rng = np.random.default_rng(seed)
    r, c = np.mgrid[:size, :size].astype(np.float64)
    d_lv = np.hypot(r - centre[0], c - centre[1])
    d_rv = np.hypot(r - centre[0], c - centre[1] + 6.0)
    outer0, wall = (9.0, 2.0) if phase == "ED" else (8.0, 3.0)
    mask = np.zeros((slices, size, size), np.uint8)
    for k in range(slices):
        outer = outer0 * (1.0 - 0.6 * k / max(slices - 1, 1))
        inner = outer - wall if k < slices - 1 else 0.0
        mask[k][(d_rv < outer + 4.0) & (d_lv >= outer + 1.0)] = 3 if k < slices - 2 else 0
        mask[k][d_lv < outer] = 2
        mask[k][d_lv < inner] = 1
    levels = np.array([40.0, 300.0, 80.0, 280.0])  # background, LV blood, myocardium, RV blood
    image = levels[mask] + rng.normal(0.0, 10.0, mask.shape)
    return (image * 7.3).astype(np.float32), mask  # arbitrary scanner scale


def give_attributes_a_say(model: torch.nn.Module) -> torch.nn.Module:
    """Draw the attribute encoders' known path at random, in place.

    An untrained AttributeEncoder reads every known value as unknown (its known path starts
    at zero); tests of tiny untrained models that need attributes to change the output call
    this first.
    """
    generator = torch.Generator().manual_seed(0)
    for module in model.modules():
        if isinstance(module, AttributeEncoder):
            with torch.no_grad():
                for p in (module.known_shift, module.value_weight):
                    p.copy_(torch.randn(p.shape, generator=generator))
    return model


def tiny_denoiser(num_slices: int = 13, dropout: float = 0.0) -> LatentDenoiser:
    """An 8-channel, 2-level denoiser with attention at the deeper level, attributes heard."""
    return give_attributes_a_say(
        LatentDenoiser(
            in_channels=1,
            channels=8,
            channel_multipliers=(1, 2),
            attention_levels=(False, True),
            num_res_blocks=1,
            num_heads=2,
            num_slices=num_slices,
            time_embed_dim=16,
            attribute_embed_dim=8,
            dropout=dropout,
            norm_groups=4,
        )
    )


def stored_channels_last(net: torch.nn.Module) -> list[bool]:
    """Per 3D convolution of `net` whose weight's layout shows (several input channels and a
    kernel wider than 1: other weights have both layouts at once), whether it is stored
    channels-last."""
    convs = [
        m
        for m in net.modules()
        if isinstance(m, torch.nn.Conv3d) and m.in_channels > 1 and max(m.kernel_size) > 1
    ]
    return [c.weight.is_contiguous(memory_format=torch.channels_last_3d) for c in convs]
