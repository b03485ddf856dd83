"""The canonical short-axis orientation in patient coordinates, which defines ANGLE.

The study conditions on ANGLE as a signed "rotation" of about -45..45 degrees
(compai-lab/2024-miccai-dgm-daum, projects/cardiac_diffusion/Trainer.py, its hand-made test
context); its data preparation is not public, so the reference orientation is defined here.

World coordinates are NIfTI's (RAS+, mm: +x towards the patient's right, +y anterior,
+z superior); a NIfTI affine maps voxel indices (i, j, k) = dpsynth's (column, row,
slice) to them. The frame of a short-axis stack:

- ``n``, the long axis: the normal of the image plane (column axis × row axis), signed to
  point from apex to base, i.e. with a positive superior component (ukbb_cardiac,
  common/cardiac_utils.py, ``determine_aha_coordinate_system``: "apex_to_base" is the
  slice normal flipped to +z; the base lies above the apex).
- ``u``, the canonical LV -> RV direction: the patient's horizontal right-anterior
  diagonal (1, 1, 0)/√2 projected into the image plane. That is the normal of a textbook
  interventricular septum, which lies at about 45° to the sagittal plane, so a typical
  heart measures ANGLE ≈ 0 and the wrap (±180°: the RV to the left-posterior of the LV)
  lies where no heart of normal situs lies.
- ``v = n × u``, towards the anterior wall (ukbb_cardiac's "inf_to_ant" is apex_to_base ×
  lv_to_septum, the same construction).

ANGLE = atan2(d·v, d·u) in degrees, d = RV centroid − LV centroid in world mm: signed,
in (−180, 180], positive when the RV sits rotated from the canonical direction towards
the anterior wall. Because it is computed in world coordinates, flipping or transposing
the stored array with a matching affine, or any oblique plane, gives the same value.

Arrays without an affine (the simulator, the cache, synthetic volumes) are assumed to be
stored in the canonical frame as a clinician views a short-axis image (from the apex):
columns run along −u (the RV to the left), rows along −v (the anterior wall at the top),
slices along −n (base -> apex). :func:`array_affine` is that assumption as an affine, and
the one dpsynth writes into its NIfTI outputs, so they read back to the same ANGLE.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

SUPERIOR = np.array([0.0, 0.0, 1.0])
CANONICAL_DIRECTION = np.array([1.0, 1.0, 0.0]) / math.sqrt(2.0)  # right-anterior, horizontal
# Below this in-plane length of the projected canonical direction the plane is (nearly)
# perpendicular to it, which no short-axis plane is: ANGLE is then undefined (NaN).
_MIN_PROJECTION = 1e-3


def frame(affine: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """Unit vectors (u, v, n) of the canonical frame for the plane of `affine` (4x4 or
    3x3, voxel -> world mm); None when the plane is degenerate or perpendicular to u."""
    a = np.asarray(affine, dtype=np.float64)[:3, :3]
    n = np.cross(a[:, 0], a[:, 1])
    norm = np.linalg.norm(n)
    if not np.isfinite(norm) or norm == 0:
        return None
    n = n / norm
    if n @ SUPERIOR < 0:
        n = -n
    u = CANONICAL_DIRECTION - (CANONICAL_DIRECTION @ n) * n
    length = np.linalg.norm(u)
    if length < _MIN_PROJECTION:
        return None
    u = u / length
    return u, np.cross(n, u), n


def angle_degrees(direction: np.ndarray, affine: np.ndarray) -> float:
    """Signed ANGLE (degrees, (−180, 180]) of a world direction in the plane of `affine`."""
    axes = frame(affine)
    if axes is None:
        return float("nan")
    u, v, _ = axes
    d = np.asarray(direction, dtype=np.float64)
    along, across = float(d @ u), float(d @ v)
    if along == 0 and across == 0:  # no in-plane offset: no direction
        return float("nan")
    return math.degrees(math.atan2(across, along))


def array_affine(spacing: Sequence[float]) -> np.ndarray:
    """The assumed affine of a (slices, H, W) array with spacing (dz, dy, dx) mm: the
    canonical frame with n = superior (columns −u, rows −v, slices −n)."""
    dz, dy, dx = (float(s) for s in spacing)
    n = SUPERIOR
    u = CANONICAL_DIRECTION
    v = np.cross(n, u)
    affine = np.eye(4)
    affine[:3, 0] = -u * dx
    affine[:3, 1] = -v * dy
    affine[:3, 2] = -n * dz
    return affine
