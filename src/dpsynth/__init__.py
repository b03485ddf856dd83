"""dpsynth: differentially private latent diffusion for 3D medical volumes."""

from dpsynth.attributes import ATTRIBUTES

__version__ = "0.1.0"
__all__ = ["ATTRIBUTES", "__version__"]
