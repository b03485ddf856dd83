import math

import numpy as np
import pytest
from scipy import ndimage

from dpsynth.data.measure import heart_depth, measure_patient, measure_volume, wall_thickness
from dpsynth.errors import DpsynthError

SPACING = (10.0, 1.5, 1.5)


def _grid(n=64, spacing=1.5):
    yy, xx = np.mgrid[:n, :n].astype(float)
    return (yy - n / 2 + 0.3) * spacing, (xx - n / 2 + 0.2) * spacing


def _heart(r_cav, thick, n_slices=5, rv_offset=(0.0, -30.0), rv_radius=10.0):
    """Stack of identical slices: LV annulus (cavity radius r_cav, wall thick mm) + RV disc."""
    y, x = _grid()
    r = np.hypot(y, x)
    sl = np.zeros(r.shape, np.uint8)
    sl[r < r_cav + thick] = 2
    sl[r < r_cav] = 1
    sl[np.hypot(y - rv_offset[0], x - rv_offset[1]) < rv_radius] = 3
    return np.repeat(sl[None], n_slices, axis=0)


@pytest.mark.parametrize("thick", [2.0, 3.0, 6.0, 9.0, 14.0, 20.0])
@pytest.mark.parametrize("r_cav", [6.0, 18.0])
def test_wall_thickness_of_an_annulus(thick, r_cav):
    mask = _heart(r_cav=r_cav, thick=thick, rv_radius=0.0)
    assert abs(wall_thickness(mask, SPACING) - thick) < 0.25


def test_wall_thickness_of_an_eccentric_ring():
    # cavity shifted by 3 mm inside the epicardium: thickness varies 3..9 mm, mean 6 mm
    y, x = _grid()
    sl = np.zeros(y.shape, np.uint8)
    sl[np.hypot(y, x) < 24.0] = 2
    sl[np.hypot(y, x - 3.0) < 18.0] = 1
    assert abs(wall_thickness(sl[None], SPACING) - 6.0) < 0.25


@pytest.mark.parametrize("thick", [4.0, 8.0, 12.0])
def test_wall_thickness_of_an_offset_ellipse(thick):
    # the wall is the true normal offset of an elliptic cavity (semi-axes 24 x 14 mm),
    # computed on a 5x finer grid whose every 5th point is a pixel centre
    fine = 5
    n = 64 * fine
    px = 1.5 / fine
    yy, xx = (np.mgrid[:n, :n] - n / 2 + 0.5) * px
    cavity = (yy / 14.0) ** 2 + (xx / 24.0) ** 2 < 1
    dist = ndimage.distance_transform_edt(~cavity, sampling=px)
    sl = np.where(cavity, 1, np.where(dist <= thick, 2, 0)).astype(np.uint8)
    sl = sl[fine // 2 :: fine, fine // 2 :: fine]
    assert abs(wall_thickness(sl[None], SPACING) - thick) < 0.5


def test_volumes_are_voxel_counts_times_voxel_volume():
    mask = _heart(18.0, 6.0)
    m = measure_volume(mask, SPACING)
    voxel_ml = 10 * 1.5 * 1.5 / 1000
    assert m["LV_ML"] == pytest.approx((mask == 1).sum() * voxel_ml)
    assert m["RV_ML"] == pytest.approx((mask == 3).sum() * voxel_ml)
    # analytic disc areas: pi r^2 * 5 slices * 10 mm, to pixelisation accuracy
    assert m["LV_ML"] == pytest.approx(math.pi * 18**2 * 50 / 1000, rel=0.03)
    assert m["DEPTH"] == 5


@pytest.mark.parametrize(
    "offset,expected",
    [((0.0, -30.0), 0.0), ((-30.0, 0.0), 90.0), ((20.0, 20.0), -135.0), ((-20.0, 20.0), 135.0)],
)
def test_angle_points_from_lv_to_rv(offset, expected):
    # (row, column) offsets of RV discs that do not overlap the LV (radius 24), so the
    # centroids are exact. Arrays without an affine are in the assumed orientation: ANGLE 0
    # with the RV to the left (-columns), +90 towards the top (-rows, the anterior wall).
    mask = _heart(18.0, 6.0, rv_offset=(offset[0] * 1.5, offset[1] * 1.5), rv_radius=8.0)
    assert measure_volume(mask, SPACING)["ANGLE"] == pytest.approx(expected, abs=1.0)


def test_angle_uses_millimetres_with_anisotropic_pixels():
    mask = np.zeros((1, 20, 20), np.uint8)
    mask[0, 5, 5] = 1
    mask[0, 6, 6] = 3  # one row and one column away; rows are 2x larger in mm
    got = measure_volume(mask, (10.0, 2.0, 1.0))["ANGLE"]
    assert got == pytest.approx(math.degrees(math.atan2(-2.0, -1.0)))


def test_depth_counts_the_slices_the_heart_spans():
    mask = np.zeros((8, 6, 6), np.uint8)
    mask[1, 2, 2] = 3  # the RV reaches one slice above the LV
    mask[2:5, 3, 3] = 2
    mask[2:4, 3, 4] = 1
    mask[6, 3, 3] = 1  # a slice without labels inside the span still counts
    assert heart_depth(mask) == 6 and measure_volume(mask, SPACING)["DEPTH"] == 6


def test_missing_structures_are_nan():
    mask = _heart(18.0, 6.0, rv_radius=0.0)
    m = measure_volume(mask, SPACING)
    assert math.isnan(m["RV_ML"]) and math.isnan(m["ANGLE"])
    assert not math.isnan(m["LV_ML"])
    empty = measure_volume(np.zeros((4, 8, 8), np.uint8), SPACING)
    assert all(math.isnan(empty[k]) for k in ("LV_ML", "RV_ML", "MYO_THICK", "ANGLE"))
    assert empty["DEPTH"] == 0


def test_measure_patient_ejection_fractions_and_phases():
    ed = _heart(20.0, 5.0, rv_offset=(0.0, -36.0), rv_radius=10.0)
    es = _heart(14.0, 8.0, rv_offset=(0.0, -36.0), rv_radius=7.0)
    es[-1] = 0  # ES is one slice shorter; DEPTH must come from ED
    p = measure_patient(ed, es, SPACING)
    ved, ves = measure_volume(ed, SPACING), measure_volume(es, SPACING)
    assert p["LVEDV"] == ved["LV_ML"] and p["LVESV"] == ves["LV_ML"]
    assert p["LVEF"] == pytest.approx(100 * (ved["LV_ML"] - ves["LV_ML"]) / ved["LV_ML"])
    assert p["RVEF"] == pytest.approx(100 * (ved["RV_ML"] - ves["RV_ML"]) / ved["RV_ML"])
    assert p["MYOESTHICK"] > p["MYOEDTHICK"] + 2.0
    assert p["DEPTH"] == 5
    assert p["ANGLE"] == pytest.approx(0.0, abs=1.0)
    missing_rv = measure_patient(ed, np.where(es == 3, 0, es), SPACING)
    assert math.isnan(missing_rv["RVESV"]) and math.isnan(missing_rv["RVEF"])


def test_float_masks_from_nifti_are_accepted():
    mask = _heart(18.0, 6.0)
    assert measure_volume(mask.astype(np.float32), SPACING) == measure_volume(mask, SPACING)


def test_bad_input_raises_dpsynth_error():
    with pytest.raises(DpsynthError, match="mask"):
        measure_volume(np.zeros((8, 8), np.uint8), SPACING)
    with pytest.raises(DpsynthError, match="spacing"):
        measure_volume(np.zeros((2, 8, 8), np.uint8), (10.0, 0.0, 1.0))
