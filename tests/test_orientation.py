"""ANGLE in patient coordinates: one heart, stored any way a scanner may store it.

The heart is defined once in world (patient) millimetres and rasterised onto voxel grids
given by NIfTI affines: the canonical grid, flipped, transposed, turned in-plane by an
oblique angle, and on a double-oblique plane. Its ANGLE must not depend on the grid.
"""

from __future__ import annotations

import math

import nibabel as nib
import numpy as np
import pytest

from dpsynth.attributes import INDEX
from dpsynth.data.cache import Cache
from dpsynth.data.measure import measure_volume
from dpsynth.data.prepare import prepare
from dpsynth.orientation import CANONICAL_DIRECTION, array_affine

SPACING = (10.0, 1.5, 1.5)  # (dz, dy, dx)
SHAPE = (5, 64, 64)
# A double-oblique long axis (apex -> base: right, posterior, superior), as in real hearts.
OBLIQUE_N = np.array([0.45, -0.7, 0.55]) / np.linalg.norm([0.45, -0.7, 0.55])


def _rotation(axis: np.ndarray, degrees: float) -> np.ndarray:
    """3x3 right-handed rotation about `axis` (Rodrigues)."""
    k = np.asarray(axis, float) / np.linalg.norm(axis)
    t = math.radians(degrees)
    kx = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    return np.eye(3) + math.sin(t) * kx + (1 - math.cos(t)) * kx @ kx


def _grid(n: np.ndarray, turn: float = 0.0) -> np.ndarray:
    """An affine whose slices are perpendicular to `n`, in-plane axes turned by `turn`
    degrees about n from the canonical ones; the grid is centred on the world origin."""
    axis = np.cross([0, 0, 1.0], n)
    to_n = np.eye(3) if not axis.any() else _rotation(axis, math.degrees(math.acos(n[2])))
    affine = np.eye(4)
    affine[:3, :3] = _rotation(n, turn) @ to_n @ array_affine(SPACING)[:3, :3]
    centre = (np.array(SHAPE[::-1]) - 1) / 2  # (i, j, k) = (column, row, slice)
    affine[:3, 3] = -affine[:3, :3] @ centre
    return affine


def _restored(affine: np.ndarray, shape: tuple[int, int, int], how: str):
    """The same grid stored flipped or transposed: (new affine, new (slices, H, W) shape)."""
    s, h, w = shape
    m = np.eye(4)  # new voxel index (i, j, k) -> old one
    if how == "flip_columns":
        m[0, 0], m[0, 3] = -1, w - 1
    elif how == "flip_rows":
        m[1, 1], m[1, 3] = -1, h - 1
    elif how == "flip_slices":
        m[2, 2], m[2, 3] = -1, s - 1
    elif how == "transpose":
        m[:2, :2] = [[0, 1], [1, 0]]
        shape = (s, w, h)
    return affine @ m, shape


def _heart(affine: np.ndarray, shape, n: np.ndarray, angle: float) -> np.ndarray:
    """Rasterise a heart with long axis `n` at the world origin, its RV at `angle` degrees
    in the canonical frame of the plane perpendicular to n: (slices, H, W) labels."""
    s, h, w = shape
    k, j, i = np.mgrid[:s, :h, :w].astype(float)
    world = np.einsum("ab,bxyz->axyz", affine[:3, :3], np.stack([i, j, k])) + affine[:3, 3].reshape(
        3, 1, 1, 1
    )
    # The canonical frame written out again from its definition (not dpsynth's code): u is
    # the right-anterior diagonal projected into the plane, v = n x u.
    u = CANONICAL_DIRECTION - (CANONICAL_DIRECTION @ n) * n
    u /= np.linalg.norm(u)
    v = np.cross(n, u)
    a, b, z = (np.tensordot(axis, world, axes=1) for axis in (u, v, n))
    rv = (math.cos(math.radians(angle)) * 30.0, math.sin(math.radians(angle)) * 30.0)
    r_lv = np.hypot(a, b)
    mask = np.zeros(shape, np.uint8)
    mask[np.hypot(a - rv[0], b - rv[1]) < 10.0] = 3
    mask[r_lv < 20.0] = 2
    mask[r_lv < 14.0] = 1
    mask[np.abs(z) > 22.0] = 0
    return mask


@pytest.mark.parametrize("angle", [-60.0, -30.0, 0.0, 30.0, 60.0, 135.0])
def test_a_heart_turned_in_patient_space_measures_its_turn(angle):
    affine = _grid(np.array([0, 0, 1.0]))
    mask = _heart(affine, SHAPE, np.array([0, 0, 1.0]), angle)
    assert measure_volume(mask, SPACING, affine)["ANGLE"] == pytest.approx(angle, abs=2.0)
    # The array convention (no affine) is the canonical grid: the same value.
    assert measure_volume(mask, SPACING)["ANGLE"] == pytest.approx(angle, abs=2.0)


def test_turning_the_grid_with_the_heart_adds_the_turn_exactly():
    # Same voxels, the affine turned by +30 about the long axis: the heart turned +30.
    n = OBLIQUE_N
    affine = _grid(n)
    mask = _heart(affine, SHAPE, n, 10.0)
    base = measure_volume(mask, SPACING, affine)["ANGLE"]
    turned = affine.copy()
    turned[:3, :4] = _rotation(n, 30.0) @ affine[:3, :4]
    assert measure_volume(mask, SPACING, turned)["ANGLE"] == pytest.approx(base + 30.0, abs=1e-6)
    assert base == pytest.approx(10.0, abs=2.0)


@pytest.mark.parametrize("n", [np.array([0, 0, 1.0]), OBLIQUE_N], ids=["axial", "oblique"])
@pytest.mark.parametrize(
    "turn,how",
    [
        (0.0, None),
        (0.0, "flip_columns"),
        (0.0, "flip_rows"),
        (0.0, "flip_slices"),
        (0.0, "transpose"),
        (37.0, None),  # an oblique in-plane grid
        (37.0, "transpose"),
        (200.0, "flip_columns"),
    ],
)
def test_the_same_heart_stored_any_way_has_the_same_angle(n, turn, how):
    affine, shape = _restored(_grid(n, turn), SHAPE, how)
    mask = _heart(affine, shape, n, 25.0)
    assert measure_volume(mask, SPACING, affine)["ANGLE"] == pytest.approx(25.0, abs=2.0)


def test_stored_flips_and_transposes_give_exactly_the_same_angle():
    affine = _grid(OBLIQUE_N, 20.0)
    mask = _heart(affine, SHAPE, OBLIQUE_N, -15.0)
    reference = measure_volume(mask, SPACING, affine)["ANGLE"]
    for how, stored in (
        ("flip_columns", mask[:, :, ::-1]),
        ("flip_rows", mask[:, ::-1]),
        ("flip_slices", mask[::-1]),
        ("transpose", mask.swapaxes(1, 2)),
    ):
        moved, _ = _restored(affine, SHAPE, how)
        got = measure_volume(np.ascontiguousarray(stored), SPACING, moved)["ANGLE"]
        assert got == pytest.approx(reference, abs=1e-9), how


def test_the_wrap_lies_opposite_the_canonical_direction():
    affine = _grid(np.array([0, 0, 1.0]))
    for angle, expected in ((179.0, 179.0), (181.0, -179.0)):
        mask = _heart(affine, SHAPE, np.array([0, 0, 1.0]), angle)
        assert measure_volume(mask, SPACING, affine)["ANGLE"] == pytest.approx(expected, abs=2.0)


def test_a_plane_perpendicular_to_the_canonical_direction_has_no_angle():
    affine = np.eye(4)
    affine[:3, 0] = [1.0, -1.0, 0.0]  # the plane spans (1,-1,0) and z: its normal is (1,1,0)
    affine[:3, 1] = [0.0, 0.0, 1.0]
    mask = np.zeros((1, 8, 8), np.uint8)
    mask[0, 2, 2], mask[0, 5, 5] = 1, 3
    assert math.isnan(measure_volume(mask, (1.0, 1.0, 1.0), affine)["ANGLE"])


# --- through prepare -----------------------------------------------------------------------


def _write(path, mask: np.ndarray, affine: np.ndarray, image: bool) -> None:
    data = mask.astype(np.float32) * 100.0 + 20.0 if image else mask
    img = nib.Nifti1Image(np.ascontiguousarray(data.transpose(2, 1, 0)), affine)
    nib.save(img, path)


STORAGES = {
    "canonical": (0.0, None),
    "flipped": (0.0, "flip_columns"),
    "transposed": (0.0, "transpose"),
    "flipped_rows": (0.0, "flip_rows"),
    "oblique": (33.0, None),
}


def test_prepare_shows_and_measures_the_same_heart_however_stored(tmp_path):
    n = OBLIQUE_N
    src = tmp_path / "ukbb"
    for pid, (turn, how) in STORAGES.items():
        affine, shape = _restored(_grid(n, turn), SHAPE, how)
        (src / pid).mkdir(parents=True)
        for phase in ("ED", "ES"):
            mask = _heart(affine, shape, n, 25.0)
            _write(src / pid / f"sa_{phase}.nii.gz", mask, affine, image=True)
            _write(src / pid / f"seg_sa_{phase}.nii.gz", mask, affine, image=False)
    prepare("ukbb", src, tmp_path / "cache", shape=(5, 48, 48), spacing=SPACING)
    cache = Cache(tmp_path / "cache")
    rows = {p: 2 * i for i, p in enumerate(cache.patients[::2])}
    angles = {p: float(cache.attributes[r, INDEX["ANGLE"]]) for p, r in rows.items()}
    assert all(a == pytest.approx(25.0, abs=2.0) for a in angles.values()), angles
    # Flips and transposes are undone exactly: the cached arrays are identical.
    reference = np.asarray(cache.masks[rows["canonical"]])
    for pid in ("flipped", "transposed", "flipped_rows"):
        assert np.array_equal(cache.masks[rows[pid]], reference), pid
        assert np.array_equal(cache.images[rows[pid]], cache.images[rows["canonical"]]), pid
    # An oblique grid is turned by interpolation: nearly the same voxels.
    oblique = np.asarray(cache.masks[rows["oblique"]])
    heart, other = reference > 0, oblique > 0
    assert 2 * (heart & other).sum() / (heart.sum() + other.sum()) > 0.95
    # The cached arrays are in the assumed orientation: measured without an affine, the
    # same ANGLE as the one measured in patient coordinates.
    for pid, r in rows.items():
        got = measure_volume(np.asarray(cache.masks[r]), SPACING)["ANGLE"]
        assert got == pytest.approx(angles[pid], abs=2.0), pid


def test_the_shipped_demo_model_uses_the_signed_angle():
    import json

    from dpsynth.app.demo import demo_assets

    meta = json.loads((demo_assets() / "ldm" / "model.json").read_text())
    lo, hi = meta["attribute_ranges"]["ANGLE"]
    # the public (acdc-like) phantoms: ANGLE 10 +- 18 about the canonical direction
    assert -90.0 < lo < 10.0 < hi < 90.0
