"""dpsynth: differentially private latent diffusion for 3D medical volumes."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from dpsynth.attributes import ATTRIBUTES

if TYPE_CHECKING:
    from dpsynth.diffusion.pipeline import LatentDiffusion

__version__ = "0.1.0"
__all__ = ["ATTRIBUTES", "__version__", "load"]


def load(run: str | os.PathLike, device: str | None = None) -> LatentDiffusion:
    """The sampling pipeline of a trained LDM run: ``dpsynth.load(RUN).sample(n=8)``."""
    from dpsynth.runs import load as load_run  # start-up time: torch loads only when needed

    return load_run(run, device)
