import csv
import dataclasses
import math

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from dpsynth.data import simulate
from dpsynth.data.measure import measure_patient
from dpsynth.data.prepare import to_canonical
from dpsynth.data.simulate import (
    CARDIAC,
    draw_targets,
    render_patient,
    simulate_cohort,
    simulate_patient,
    stored_array,
)
from dpsynth.errors import DpsynthError
from dpsynth.orientation import array_affine

SHAPE = (13, 96, 96)
VOLUMES = ("LVEDV", "LVESV", "RVEDV", "RVESV")


@pytest.mark.parametrize("cohort,seeds", [("ukbb", range(4)), ("acdc", range(6))])
def test_masks_follow_the_requested_attributes(cohort, seeds):
    for seed in seeds:
        p = simulate_patient(seed, cohort, SHAPE)
        t, m = p.targets, p.attributes
        for key in VOLUMES:
            assert abs(m[key] / t[key] - 1) < 0.03, (seed, key, t[key], m[key])
        assert abs(m["MYOEDTHICK"] - t["MYOEDTHICK"]) < 0.3
        assert abs(m["MYOESTHICK"] - t["MYOESTHICK"]) < 0.3
        assert m["MYOESTHICK"] > m["MYOEDTHICK"]
        assert abs(m["DEPTH"] - t["DEPTH"]) <= 1
        assert abs(m["ANGLE"] - t["ANGLE"]) < 10.0  # signed, never near the wrap
        assert -45.0 < m["ANGLE"] < 70.0  # where the study's grid (-45..45) puts real hearts
        assert 3 <= m["DEPTH"] <= 13
        # ground truth = what the masks show
        assert m == {**m, **measure_patient(p.masks["ED"], p.masks["ES"], p.spacing)}


def test_render_follows_explicit_extreme_targets():
    rng = np.random.default_rng(7)
    targets = {
        "GROUP": "HCM",
        "LVEDV": 90.0,
        "LVESV": 25.0,
        "RVEDV": 250.0,
        "RVESV": 200.0,
        "MYOEDTHICK": 16.0,
        "MYOESTHICK": 21.0,
        "LVEF": 72.0,
        "ANGLE": -40.0,
        "DEPTH": 7.0,
    }
    spacing = (10.0, 1.8269, 1.8269)
    images, masks = render_patient(targets, rng, SHAPE, spacing, "ukbb")
    m = measure_patient(masks["ED"], masks["ES"], spacing)
    for key in VOLUMES:
        assert abs(m[key] / targets[key] - 1) < 0.03
    assert abs(m["MYOEDTHICK"] - 16.0) < 0.5 and abs(m["MYOESTHICK"] - 21.0) < 0.5
    assert m["DEPTH"] == 7 and abs(m["ANGLE"] + 40.0) < 10.0
    assert images["ED"].dtype == np.int16 and masks["ED"].dtype == np.uint8


def test_images_show_ssfp_contrast():
    p = simulate_patient(3, "ukbb", SHAPE)
    img, mask = p.images["ED"].astype(float), p.masks["ED"]
    blood, myo = np.median(img[mask == 1]), np.median(img[mask == 2])
    assert blood > 2.5 * myo  # bright blood, dark myocardium
    assert img.std() > 0.2 * blood  # not a flat image: anatomy around the heart
    assert p.images["ED"].min() >= 0


@pytest.mark.parametrize("cohort,least", [("ukbb", 0.045), ("acdc", 0.025)])
def test_lv_cavity_border_shows_trabeculation_counted_as_blood(cohort, least):
    # Dark strands along the endocardium inside the blood-pool label: the share of dark
    # pixels in the cavity's 3-pixel border ring (old smooth phantoms: 0.4-2.7 %).
    dark = []
    for seed in range(4):
        p = simulate_patient(seed, cohort, SHAPE)
        img, mask = p.images["ED"].astype(float), p.masks["ED"]
        myo = mask == 2
        ring = (mask == 1) & ndimage.binary_dilation(myo, np.ones((1, 3, 3)), iterations=3)
        inner = (mask == 1) & ~ndimage.binary_dilation(myo, np.ones((1, 3, 3)), iterations=5)
        dark.append(np.mean(img[ring] < 0.6 * np.median(img[inner])))
    assert np.mean(dark) > least, dark


@pytest.mark.parametrize("storage", range(8))
def test_stored_orientations_prepare_back_to_the_same_arrays_and_angle(storage):
    p = simulate_patient(2, "acdc", SHAPE)
    image, spacing, affine = stored_array(p.images["ED"], p.spacing, storage)
    mask, _, _ = stored_array(p.masks["ED"], p.spacing, storage)
    es, _, _ = stored_array(p.masks["ES"], p.spacing, storage)
    assert (storage == 0) == (
        image.shape == p.images["ED"].shape and (image == p.images["ED"]).all()
    )
    back_image, back_mask = to_canonical(image, mask, affine, p.spacing)
    assert np.array_equal(back_image, p.images["ED"]) and np.array_equal(back_mask, p.masks["ED"])
    measured = measure_patient(mask, es, spacing, affine)
    assert measured == pytest.approx({k: p.attributes[k] for k in measured}, rel=1e-9)


def test_acdc_files_vary_in_orientation_and_field_of_view(tmp_path):
    out = simulate_cohort(tmp_path / "acdc", 8, "acdc", seed=3, workers=1)
    rows = _read_csv(out / "attributes.csv")
    affines, shapes = set(), set()
    for row in rows:
        seg = {ph: nib.load(out / row["id"] / f"seg_sa_{ph}.nii.gz") for ph in ("ED", "ES")}
        masks = {ph: np.asarray(s.dataobj).transpose(2, 1, 0) for ph, s in seg.items()}
        zooms = seg["ED"].header.get_zooms()
        m = measure_patient(masks["ED"], masks["ES"], zooms[::-1], seg["ED"].affine)
        for key in CARDIAC:  # the CSV is what the files show, however they are stored
            assert float(row[key]) == pytest.approx(m[key], rel=1e-5)
        affines.add(tuple(np.sign(seg["ED"].affine[:3, :2]).ravel()))
        shapes.add(seg["ED"].shape[:2])
    assert len(affines) >= 3 and len(shapes) >= 4


def test_stacks_that_miss_the_base_or_apex_still_measure_what_they_show(monkeypatch):
    ukbb = simulate.SCANNERS["ukbb"]
    monkeypatch.setitem(simulate.SCANNERS, "ukbb", dataclasses.replace(ukbb, cut=1.0))
    missed = set()
    for seed in range(8):
        rng = np.random.default_rng(seed)
        targets = draw_targets(rng, "ukbb", SHAPE[0], 10.0)
        frame = simulate._frame(
            targets, SHAPE, (10.0, 1.8269, 1.8269), rng, simulate.SCANNERS["ukbb"]
        )
        base, apex = frame.z_base < 0.0, frame.z_apex > frame.z[-1] + 5.0
        assert base != apex  # one end lies outside the stack
        missed.add("base" if base else "apex")
        p = simulate_patient(seed, "ukbb", SHAPE)
        heart = np.flatnonzero(p.masks["ED"].any(axis=(1, 2)))
        assert heart[0] == 0 or heart[-1] == SHAPE[0] - 1
        for key in VOLUMES:
            assert abs(p.attributes[key] / p.targets[key] - 1) < 0.03
        assert p.attributes["DEPTH"] == p.targets["DEPTH"]
        assert p.attributes == {
            **p.attributes,
            **measure_patient(p.masks["ED"], p.masks["ES"], p.spacing),
        }
    assert missed == {"base", "apex"}


def test_population_follows_reference_ranges():
    rng = np.random.default_rng(0)
    rows = [draw_targets(rng, "ukbb", 13, 10.0) for _ in range(3000)]
    get = lambda key, sex: np.array([r[key] for r in rows if r["SEX"] == sex])  # noqa: E731
    assert 155 < get("LVEDV", 1).mean() < 177 and 115 < get("LVEDV", 0).mean() < 133
    assert 25 < get("LVEDV", 1).std() < 40
    lvef = np.array([r["LVEF"] for r in rows])
    assert 58 < lvef.mean() < 64 and 4 < lvef.std() < 8
    rv_over_lv = np.array([r["RVEDV"] / r["LVEDV"] for r in rows])
    assert 1.0 < rv_over_lv.mean() < 1.15
    ages = np.array([r["AGE"] for r in rows])
    assert ages.min() >= 45 and ages.max() <= 80
    assert np.corrcoef(ages, lvef)[0, 1] > 0.05  # EF rises with age
    assert all(r["MYOESTHICK"] > r["MYOEDTHICK"] for r in rows)
    bmi = np.array([r["BMI"] for r in rows])
    lvedv = np.array([r["LVEDV"] for r in rows])
    assert 26 < bmi.mean() < 28 and 3.5 < bmi.std() < 5.5
    assert np.corrcoef(bmi, lvedv)[0, 1] > 0.1  # tied through the latent body size

    acdc = [draw_targets(rng, "acdc", 13, 10.0) for _ in range(1000)]
    by = lambda g, key: np.mean([r[key] for r in acdc if r["GROUP"] == g])  # noqa: E731
    assert by("DCM", "LVEF") < 30 < by("NOR", "LVEF")
    assert by("DCM", "LVEDV") > 1.5 * by("NOR", "LVEDV")
    assert by("HCM", "MYOEDTHICK") > 1.5 * by("NOR", "MYOEDTHICK")
    assert by("ARV", "RVEDV") > 1.4 * by("NOR", "RVEDV")
    assert all(math.isnan(r["AGE"]) and math.isnan(r["SEX"]) for r in acdc)


def _read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _files(root):
    return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_cohort_layout_csv_and_nifti(tmp_path):
    out = simulate_cohort(tmp_path / "sim", 3, "ukbb", seed=1, workers=1)
    rows = _read_csv(out / "attributes.csv")
    assert list(rows[0]) == ["id", "AGE", "SEX", "BMI", *CARDIAC]
    assert [r["id"] for r in rows] == ["1000001", "1000002", "1000003"]
    targets = _read_csv(out / "simulation_targets.csv")
    assert list(targets[0]) == ["id", "GROUP", "AGE", "SEX", "BMI", *CARDIAC]
    for row in rows:
        folder = out / row["id"]
        for name in ("sa_ED", "sa_ES", "seg_sa_ED", "seg_sa_ES"):
            img = nib.load(folder / f"{name}.nii.gz")
            assert img.shape == (96, 96, 13)  # NIfTI (x, y, z)
            assert img.header.get_zooms() == pytest.approx((1.8269, 1.8269, 10.0))
            # the assumed array orientation, so the files are prepared back to the same ANGLE
            assert img.affine == pytest.approx(array_affine((10.0, 1.8269, 1.8269)))
            assert img.get_data_dtype() == (np.uint8 if name.startswith("seg") else np.int16)
        ed = np.asarray(nib.load(folder / "seg_sa_ED.nii.gz").dataobj).transpose(2, 1, 0)
        es = np.asarray(nib.load(folder / "seg_sa_ES.nii.gz").dataobj).transpose(2, 1, 0)
        m = measure_patient(ed, es, (10.0, 1.8269, 1.8269))
        for key in CARDIAC:
            assert float(row[key]) == pytest.approx(m[key], rel=1e-5)
    assert not list(tmp_path.glob(".sim*"))  # no temporary left behind


def test_acdc_cohort_has_missing_age_and_sex_and_its_own_scanner(tmp_path):
    out = simulate_cohort(tmp_path / "acdc", 2, "acdc", seed=0, workers=1)
    rows = _read_csv(out / "attributes.csv")
    assert [r["id"] for r in rows] == ["patient001", "patient002"]
    assert all(math.isnan(float(r["AGE"])) and math.isnan(float(r["SEX"])) for r in rows)
    assert all(math.isfinite(float(r["BMI"])) for r in rows)
    groups = {r["GROUP"] for r in _read_csv(out / "simulation_targets.csv")}
    assert groups <= {"NOR", "DCM", "HCM", "MINF", "ARV"}
    image = nib.load(out / "patient001" / "sa_ED.nii.gz")
    zooms = image.header.get_zooms()
    assert 1.37 <= zooms[0] <= 1.69 and zooms[0] == zooms[1] and zooms[2] == 10.0
    # Finer pixels, larger matrix: the field of view is at least the requested 96 x 1.83 mm.
    assert image.shape[0] > 96 and image.shape[0] * zooms[0] >= 96 * 1.8269 - 1e-3


def test_deterministic_by_seed_and_independent_of_workers(tmp_path):
    a = _files(simulate_cohort(tmp_path / "a", 3, "ukbb", seed=5, workers=1))
    b = _files(simulate_cohort(tmp_path / "b", 3, "ukbb", seed=5, workers=1))
    c = _files(simulate_cohort(tmp_path / "c", 3, "ukbb", seed=5, workers=2))
    assert a == b == c
    d = _files(simulate_cohort(tmp_path / "d", 3, "ukbb", seed=6, workers=1))
    assert a.keys() == d.keys()
    assert all(a[k] != d[k] for k in a if k.suffix == ".gz")


def test_small_shapes_run():
    p = simulate_patient(0, "ukbb", (5, 16, 16), (10.0, 1.8269, 1.8269))
    assert p.images["ES"].shape == p.masks["ED"].shape == (5, 16, 16)


@pytest.mark.parametrize(
    "kwargs,field",
    [
        ({"cohort": "mnms"}, "cohort"),
        ({"n_patients": 0}, "n_patients"),
        ({"shape": (2, 96, 96)}, "shape"),
        ({"spacing": (10.0, -1.0, 1.0)}, "spacing"),
        ({"seed": -1}, "seed"),
        ({"workers": 0}, "workers"),
    ],
)
def test_bad_arguments_raise_dpsynth_error(tmp_path, kwargs, field):
    args = {"n_patients": 1, **kwargs}
    with pytest.raises(DpsynthError, match=field):
        simulate_cohort(tmp_path / "x", **args)
    assert not (tmp_path / "x").exists()
