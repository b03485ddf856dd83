"""Ingestion of every layout in its real on-disk form, attributes, preprocessing, bad input."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import make_phantom

from dpsynth.attributes import INDEX
from dpsynth.data.cache import Cache
from dpsynth.data.prepare import assign_splits, prepare
from dpsynth.errors import DpsynthError
from dpsynth.io import write_nifti

NATIVE = (8.0, 2.5, 2.5)  # (dz, dy, dx) of the fixtures: not the target spacing
TARGET = (10.0, 2.0, 2.0)
SHAPE = (8, 32, 32)
VOXEL_ML = NATIVE[0] * NATIVE[1] * NATIVE[2] / 1000.0
ACDC_FROM_DPSYNTH = np.array([0, 3, 2, 1], np.uint8)  # ACDC: 1 RV, 2 myocardium, 3 LV


def _prepare(layout, src, out, **kwargs):
    return prepare(layout, src, out, shape=SHAPE, spacing=TARGET, **kwargs)


def _write_csv(path: Path, rows: list[list]) -> Path:
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows(rows)
    return path


def _write_ukbb(root: Path, patients: dict[str, int], reverse: tuple[str, ...] = ()) -> Path:
    """ukbb_cardiac layout; `patients` maps id -> phantom seed."""
    for pid, seed in patients.items():
        for phase in ("ED", "ES"):
            image, mask = make_phantom(phase=phase, seed=seed)
            if pid in reverse:
                image, mask = image[::-1], mask[::-1]
            write_nifti(root / pid / f"sa_{phase}.nii.gz", image, NATIVE)
            write_nifti(root / pid / f"seg_sa_{phase}.nii.gz", mask, NATIVE, dtype=np.uint8)
    return root


def _write_4d(path: Path, frames: list[np.ndarray], dtype) -> None:
    data = np.stack(frames, axis=-1).transpose(2, 1, 0, 3).astype(dtype)
    img = nib.Nifti1Image(data, np.diag([NATIVE[2], NATIVE[1], NATIVE[0], 1.0]))
    img.header.set_zooms((NATIVE[2], NATIVE[1], NATIVE[0], 1.0))
    nib.save(img, path)


def _expected(phase: str) -> dict[str, float]:
    """Volumes counted here, independently of dpsynth.data.measure."""
    _, mask = make_phantom(phase=phase)
    return {"LV": (mask == 1).sum() * VOXEL_ML, "RV": (mask == 3).sum() * VOXEL_ML}


@pytest.fixture
def ukbb(tmp_path):
    src = _write_ukbb(tmp_path / "ukbb", {"1000001": 0, "1000002": 1, "1000003": 2})
    csv_path = _write_csv(
        tmp_path / "attrs.csv",
        [
            ["id", "AGE", "SEX", "HEIGHT", "WEIGHT", "LVEDV"],
            ["1000001", "63", "M", "180", "81", "999"],
            ["1000002", "", "0", "160", "64", ""],
            ["1000003", "71", "female", "", "70", ""],
        ],
    )
    return src, csv_path


def test_ukbb_attributes_measured_and_from_csv(ukbb, tmp_path):
    src, csv_path = ukbb
    report = _prepare("ukbb", src, tmp_path / "cache", attributes_csv=csv_path)
    cache = Cache(tmp_path / "cache")
    assert report.counts["patients"] == 3 and report.counts["volumes"] == 6 and report.has_masks
    assert cache.patients.tolist() == ["1000001"] * 2 + ["1000002"] * 2 + ["1000003"] * 2
    assert cache.phases.tolist() == ["ED", "ES"] * 3
    a = cache.attributes
    ed, es = _expected("ED"), _expected("ES")
    # Masks win over the CSV's LVEDV=999 by default.
    assert a[0, INDEX["LVEDV"]] == pytest.approx(ed["LV"], rel=1e-5)
    assert a[1, INDEX["LVESV"]] == pytest.approx(es["LV"], rel=1e-5)
    assert a[0, INDEX["RVEDV"]] == pytest.approx(ed["RV"], rel=1e-5)
    assert a[0, INDEX["LVEF"]] == pytest.approx(100 * (ed["LV"] - es["LV"]) / ed["LV"], rel=1e-5)
    assert a[:, INDEX["ESED"]].tolist() == [1, 0] * 3
    assert a[:, INDEX["SEX"]].tolist() == [1, 1, 0, 0, 0, 0]
    assert a[0, INDEX["AGE"]] == 63 and np.isnan(a[2:4, INDEX["AGE"]]).all()
    assert a[0, INDEX["BMI"]] == pytest.approx(81 / 1.8**2, rel=1e-5)
    assert np.isnan(a[4:, INDEX["BMI"]]).all()  # no height: BMI unknown, never 0
    assert a[0, INDEX["DEPTH"]] == 6 and a[0, INDEX["ANGLE"]] == pytest.approx(0.0, abs=1.0)
    assert a[0, INDEX["MYOESTHICK"]] > a[0, INDEX["MYOEDTHICK"]]

    assert isinstance(cache.images, np.memmap) and cache.images.dtype == np.float16
    assert cache.images.shape == (6, *SHAPE) and cache.masks.dtype == np.uint8
    assert cache.images.min() == 0.0 and cache.images.max() == 1.0
    meta = json.loads((tmp_path / "cache" / "meta.json").read_text())
    assert meta["shape"] == list(SHAPE) and meta["spacing"] == list(TARGET)
    assert meta["layout"] == "ukbb" and meta["normalisation"]["method"] == "percentile"
    assert meta["cache_id"] == report.cache_id and meta["skipped"] == []
    assert report.cache_id in report.summary() and meta["content_digest"] not in report.summary()

    # A random id names the data; the digest (kept inside the private cache) tells equal data.
    again = _prepare("ukbb", src, tmp_path / "again", attributes_csv=csv_path)
    assert again.cache_id != report.cache_id and len(again.cache_id) == 32
    assert Cache(tmp_path / "again").same_data(cache)
    # Regression: the digest covered the split column, so another split seed made the same
    # data look new and bypassed the same-data refusal.
    _prepare("ukbb", src, tmp_path / "reseeded", attributes_csv=csv_path, seed=7,
             split=(0.0, 0.0, 1.0))  # fmt: skip
    assert Cache(tmp_path / "reseeded").same_data(cache)
    assert list(Cache(tmp_path / "reseeded").splits) != list(cache.splits)
    _prepare("ukbb", src, tmp_path / "pref", attributes_csv=csv_path, prefer_csv_attributes=True)
    b = Cache(tmp_path / "pref").attributes
    assert b[0, INDEX["LVEDV"]] == 999 and b[2, INDEX["LVEDV"]] == a[2, INDEX["LVEDV"]]
    assert b[0, INDEX["LVEF"]] == pytest.approx(100 * (999 - es["LV"]) / 999, rel=1e-5)
    assert not Cache(tmp_path / "pref").same_data(cache)


def test_preprocessing_resamples_centres_and_orients(tmp_path):
    src = _write_ukbb(tmp_path / "ukbb", {"a": 0, "b": 0}, reverse=("b",))
    _prepare("ukbb", src, tmp_path / "cache")
    cache = Cache(tmp_path / "cache")
    # The reversed stack comes out base -> apex, identical to the normal one.
    np.testing.assert_array_equal(cache.images[0], cache.images[2])
    np.testing.assert_array_equal(cache.masks[0], cache.masks[2])
    cavity = (cache.masks[0] == 1).sum(axis=(1, 2))
    nonzero = cavity[cavity > 0]
    assert (np.diff(nonzero) < 0).all()
    # Same rows, re-counted on the target grid: in-plane resampling keeps the LV volume.
    lv_ml = (cache.masks[0] == 1).sum() * NATIVE[0] * TARGET[1] * TARGET[2] / 1000.0
    assert lv_ml == pytest.approx(_expected("ED")["LV"], rel=0.05)
    # 6 slices padded to 8 around the heart; LV centroid at the crop centre.
    lv = np.isin(cache.masks[0], (1, 2))
    assert lv.any(axis=(1, 2)).tolist() == [False] + [True] * 6 + [False]
    rows, cols = np.nonzero(lv.any(axis=0))
    assert abs(rows.mean() - 15.5) <= 1.0 and abs(cols.mean() - 15.5) <= 1.0


def test_acdc_layout_converts_labels_and_reads_info_cfg(tmp_path):
    root = tmp_path / "acdc" / "training"
    for n, (ed_frame, es_frame) in enumerate([(1, 12), (1, 9)], start=1):
        folder = root / f"patient{n:03d}"
        folder.mkdir(parents=True)
        (folder / "Info.cfg").write_text(
            f"ED: {ed_frame}\nES: {es_frame}\nGroup: DCM\nHeight: 184.0\nNbFrame: 30\nWeight: 95.0\n"
        )
        for phase, frame in (("ED", ed_frame), ("ES", es_frame)):
            image, mask = make_phantom(phase=phase, seed=n)
            stem = folder / f"patient{n:03d}_frame{frame:02d}"
            write_nifti(f"{stem}.nii.gz", image, NATIVE)
            write_nifti(f"{stem}_gt.nii.gz", ACDC_FROM_DPSYNTH[mask], NATIVE, dtype=np.uint8)
        (folder / f"patient{n:03d}_4d.nii.gz").write_bytes(b"ignored")
    _prepare("acdc", tmp_path / "acdc", tmp_path / "cache")
    cache = Cache(tmp_path / "cache")
    assert cache.patients.tolist() == ["patient001"] * 2 + ["patient002"] * 2
    a = cache.attributes
    assert a[0, INDEX["LVEDV"]] == pytest.approx(_expected("ED")["LV"], rel=1e-5)
    assert a[1, INDEX["RVESV"]] == pytest.approx(_expected("ES")["RV"], rel=1e-5)
    assert a[0, INDEX["BMI"]] == pytest.approx(95 / 1.84**2, rel=1e-5)
    assert np.isnan(a[:, INDEX["AGE"]]).all() and np.isnan(a[:, INDEX["SEX"]]).all()
    # dpsynth labels in the cache: LV blood (1) inside the ring, RV (3) to its left.
    base = cache.masks[0][1]
    assert base[16, 16] == 1 and np.nonzero(base == 3)[1].mean() < 16


def test_mnms_layout_reads_4d_frames(tmp_path):
    src = tmp_path / "mnms"
    codes = {"A1B2C3": (0, 3), "D4E5F6": (4, 2)}  # 0-based ED, ES frames
    for seed, (code, (ed, es)) in enumerate(codes.items()):
        (src / "Training" / "Labeled" / code).mkdir(parents=True)
        images, masks = [], []
        for t in range(5):
            phase = "ED" if t == ed else "ES"
            image, mask = make_phantom(phase=phase, seed=seed)
            images.append(image)
            masks.append(mask if t in (ed, es) else np.zeros_like(mask))
        folder = src / "Training" / "Labeled" / code
        _write_4d(folder / f"{code}_sa.nii.gz", images, np.int16)
        _write_4d(folder / f"{code}_sa_gt.nii.gz", masks, np.uint8)
    _write_csv(
        src / "info.csv",
        [
            [
                "External code",
                "VendorName",
                "Vendor",
                "Centre",
                "ED",
                "ES",
                "Age",
                "Sex (M/F)",
                "Height",
                "Weight",
                "Pathology",
            ],  # fmt: skip
            ["A1B2C3", "Siemens", "A", "1", "0", "3", "58", "F", "165", "60", "NOR"],
            ["D4E5F6", "Philips", "B", "2", "4", "2", "", "M", "", "", "HCM"],
        ],
    )
    _prepare("mnms", src, tmp_path / "cache")
    a = Cache(tmp_path / "cache").attributes
    assert a[0, INDEX["LVEDV"]] == pytest.approx(_expected("ED")["LV"], rel=1e-5)
    assert a[3, INDEX["LVESV"]] == pytest.approx(_expected("ES")["LV"], rel=1e-5)
    assert a[:, INDEX["SEX"]].tolist() == [0, 0, 1, 1] and a[0, INDEX["AGE"]] == 58
    assert a[0, INDEX["BMI"]] == pytest.approx(60 / 1.65**2, rel=1e-5)
    assert np.isnan(a[2, INDEX["BMI"]])


def test_manifest_layout_relative_paths_optional_masks(tmp_path):
    root = tmp_path / "data"
    rows = [["patient", "phase", "image", "mask", "AGE", "SEX"]]
    for pid, with_mask in (("p1", True), ("p2", False)):
        for phase in ("ED", "ES"):
            image, mask = make_phantom(phase=phase)
            write_nifti(root / "img" / f"{pid}_{phase}.nii.gz", image, NATIVE)
            write_nifti(root / "seg" / f"{pid}_{phase}.nii.gz", mask, NATIVE, dtype=np.uint8)
            seg = f"seg/{pid}_{phase}.nii.gz" if with_mask else ""
            rows.append([pid, phase, f"img/{pid}_{phase}.nii.gz", seg, "50", "1"])
    manifest = _write_csv(root / "manifest.csv", rows)
    report = _prepare("manifest", manifest, tmp_path / "cache")
    cache = Cache(tmp_path / "cache")
    assert not report.has_masks and cache.masks is None
    assert not (tmp_path / "cache" / "masks.npy").exists()
    a = cache.attributes
    assert a[0, INDEX["LVEDV"]] == pytest.approx(_expected("ED")["LV"], rel=1e-5)
    assert np.isnan(a[2:, INDEX["LVEDV"]]).all() and (a[:, INDEX["AGE"]] == 50).all()


def test_splits_by_patient_deterministic_with_ratios(tmp_path):
    ids = [f"{i:04d}" for i in range(1000)]
    splits = assign_splits(ids, (0.8, 0.1, 0.1), seed=3)
    counts = [list(splits.values()).count(s) for s in ("train", "val", "test")]
    # Binomial counts: 3 standard deviations are 38 (train) and 28 (val, test).
    assert abs(counts[0] - 800) < 38 and abs(counts[1] - 100) < 28 and abs(counts[2] - 100) < 28
    assert splits == assign_splits(ids[::-1], (0.8, 0.1, 0.1), seed=3)  # order-independent
    assert splits != assign_splits(ids, (0.8, 0.1, 0.1), seed=4)
    assert set(assign_splits(ids, (1.0, 0.0, 0.0), seed=3).values()) == {"train"}

    src = _write_ukbb(tmp_path / "ukbb", {f"{i}": i for i in range(10)})
    report = _prepare("ukbb", src, tmp_path / "cache", split=(0.6, 0.2, 0.2), seed=1)
    cache = Cache(tmp_path / "cache")
    assert (cache.splits[0::2] == cache.splits[1::2]).all()
    expected = assign_splits([str(i) for i in range(10)], (0.6, 0.2, 0.2), seed=1)
    assert dict(zip(cache.patients[0::2], cache.splits[0::2], strict=True)) == expected
    assert report.counts["train"] == list(expected.values()).count("train")
    assert len(cache.volume_indices("train")) == 2 * report.counts["train"]


def test_a_patients_split_depends_on_that_patient_alone():
    """Regression: a seeded permutation of the cohort moved about a third of the patients
    between splits when one patient was added or removed."""
    ids = [f"{1000001 + i}" for i in range(300)]
    base = assign_splits(ids, (0.8, 0.1, 0.1), seed=0)
    added = assign_splits([*ids, "2000000"], (0.8, 0.1, 0.1), seed=0)
    removed = assign_splits(ids[1:], (0.8, 0.1, 0.1), seed=0)
    assert all(added[p] == base[p] for p in ids)
    assert all(removed[p] == base[p] for p in ids[1:])


def _corrupt(src: Path) -> str:
    (src / "1000002" / "sa_ED.nii.gz").write_bytes(b"\x1f\x8bnot a nifti")
    return "1000002/sa_ED.nii.gz"


def _missing_es(src: Path) -> str:
    (src / "1000002" / "sa_ES.nii.gz").unlink()
    return "1000002/sa_ES.nii.gz"


def _empty_mask(src: Path) -> str:
    write_nifti(src / "1000002" / "seg_sa_ES.nii.gz", np.zeros((6, 40, 40)), NATIVE, np.uint8)
    return "seg_sa_ES.nii.gz"


def _shape_mismatch(src: Path) -> str:
    write_nifti(src / "1000002" / "seg_sa_ED.nii.gz", np.ones((6, 40, 36)), NATIVE, np.uint8)
    return "seg_sa_ED.nii.gz"


def _spacing_mismatch(src: Path) -> str:
    _, mask = make_phantom()
    write_nifti(src / "1000002" / "seg_sa_ED.nii.gz", mask, (8.0, 2.0, 2.0), np.uint8)
    return "seg_sa_ED.nii.gz"


def _non_finite(src: Path) -> str:
    image, _ = make_phantom()
    image[2, 5, 5] = np.nan
    write_nifti(src / "1000002" / "sa_ED.nii.gz", image, NATIVE)
    return "1000002/sa_ED.nii.gz"


def _non_numeric(src: Path) -> str:
    _write_csv(src.parent / "attrs.csv", [["id", "AGE"], ["1000002", "sixty"]])
    return "AGE"


@pytest.mark.parametrize(
    "damage",
    [
        _corrupt,
        _missing_es,
        _empty_mask,
        _shape_mismatch,
        _spacing_mismatch,
        _non_finite,
        _non_numeric,
    ],
)
def test_bad_patient_fails_cleanly_or_is_skipped(tmp_path, damage):
    src = _write_ukbb(tmp_path / "ukbb", {"1000001": 0, "1000002": 1, "1000003": 2})
    _write_csv(tmp_path / "attrs.csv", [["id", "AGE"], ["1000001", "60"]])
    named = damage(src)
    out = tmp_path / "cache"
    with pytest.raises(DpsynthError, match=named):
        _prepare("ukbb", src, out, attributes_csv=tmp_path / "attrs.csv")
    assert not out.exists() and list(tmp_path.glob(".cache*")) == []

    report = _prepare("ukbb", src, out, attributes_csv=tmp_path / "attrs.csv", skip_bad=True)
    assert [s["patient"] for s in report.skipped] == ["1000002"]
    assert named in report.skipped[0]["reason"]
    meta = json.loads((out / "meta.json").read_text())
    assert meta["skipped"] == report.skipped and meta["counts"]["patients"] == 2
    cache = Cache(out)  # arrays trimmed to the patients kept
    assert cache.images.shape[0] == 4 and cache.masks.shape[0] == 4
    assert cache.patients.tolist() == ["1000001", "1000001", "1000003", "1000003"]


@pytest.mark.parametrize(
    ("layout", "header", "message"),
    [
        ("nifti-folder", ["id", "AGE"], "unknown layout 'nifti-folder'"),
        ("ukbb", ["id", "AGE", "CHOLESTEROL"], "attrs.csv: unknown column 'CHOLESTEROL'"),
        ("ukbb", ["id", "ESED"], "attrs.csv: unknown column 'ESED'"),
        ("ukbb", ["AGE", "SEX"], "attrs.csv: needs exactly one patient id column"),
    ],
)
def test_bad_layout_or_columns_fail_cleanly(tmp_path, layout, header, message):
    src = _write_ukbb(tmp_path / "ukbb", {"1000001": 0})
    _write_csv(tmp_path / "attrs.csv", [header, ["1000001"] + ["1"] * (len(header) - 1)])
    with pytest.raises(DpsynthError, match=message):
        _prepare(layout, src, tmp_path / "cache", attributes_csv=tmp_path / "attrs.csv")
    assert not (tmp_path / "cache").exists()


def test_mnms_missing_frame_column_and_manifest_missing_phase(tmp_path):
    src = tmp_path / "mnms"
    src.mkdir()
    _write_csv(src / "info.csv", [["External code", "ED", "Age"], ["X", "0", "50"]])
    with pytest.raises(DpsynthError, match="info.csv: missing column 'es'"):
        _prepare("mnms", src, tmp_path / "cache")
    image, mask = make_phantom()
    write_nifti(tmp_path / "ed.nii.gz", image, NATIVE)
    manifest = _write_csv(
        tmp_path / "m.csv", [["patient", "phase", "image", "mask"], ["p", "ED", "ed.nii.gz", ""]]
    )
    with pytest.raises(DpsynthError, match="m.csv: patient p: no ES row"):
        _prepare("manifest", manifest, tmp_path / "cache")
    assert not (tmp_path / "cache").exists()


def test_simulated_cohort_round_trips_through_prepare(tmp_path):
    from dpsynth.data.simulate import simulate_cohort

    src = simulate_cohort(tmp_path / "sim", 2, cohort="acdc", seed=0, workers=1)
    _prepare("ukbb", src, tmp_path / "cache", attributes_csv=src / "attributes.csv")
    cache = Cache(tmp_path / "cache")
    with open(src / "attributes.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    for i, row in enumerate(rows):  # the simulator measures its masks with the same code
        for name in ("LVEDV", "LVESV", "RVEF", "MYOEDTHICK", "ANGLE", "BMI"):
            assert cache.attributes[2 * i, INDEX[name]] == pytest.approx(float(row[name]), rel=1e-4)
        # DEPTH is counted in the prepared volume: the 13-slice phantoms are cropped to 8.
        assert cache.attributes[2 * i, INDEX["DEPTH"]] == min(float(row["DEPTH"]), SHAPE[0])
    assert max(float(row["DEPTH"]) for row in rows) > SHAPE[0]  # the crop was exercised
    assert np.isnan(cache.attributes[:, INDEX["AGE"]]).all()  # acdc cohort: AGE missing
