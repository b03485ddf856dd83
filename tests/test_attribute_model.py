"""The DP attribute model: noise is really added, relations hold, fidelity is measured."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from dpsynth.attributes import ATTRIBUTES, CLINICAL_RANGES, INDEX, ejection_fraction
from dpsynth.errors import DpsynthError
from dpsynth.privacy.attribute_model import (
    BASE,
    BLOCK_SHARES,
    AttributeModel,
    attribute_fidelity,
    fit_attribute_model,
)
from dpsynth.privacy.ledger import Ledger


def _cohort(n_patients: int = 400, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Per-volume rows (ED then ES per patient) with NaN in AGE and SEX, and patient ids."""
    rng = np.random.default_rng(seed)
    t = np.full((n_patients, len(ATTRIBUTES)), np.nan)
    edv = rng.normal(150, 30, n_patients)
    esv = edv * rng.uniform(0.3, 0.5, n_patients)
    t[:, INDEX["LVEDV"]], t[:, INDEX["LVESV"]] = edv, esv
    t[:, INDEX["RVEDV"]] = 1.1 * edv + rng.normal(0, 10, n_patients)
    t[:, INDEX["RVESV"]] = 0.5 * t[:, INDEX["RVEDV"]]
    t[:, INDEX["LVEF"]] = ejection_fraction(edv, esv)
    t[:, INDEX["RVEF"]] = 50.0
    t[:, INDEX["MYOEDTHICK"]] = rng.normal(8, 1, n_patients)
    t[:, INDEX["MYOESTHICK"]] = rng.normal(12, 1.5, n_patients)
    t[:, INDEX["AGE"]] = np.where(
        rng.random(n_patients) < 0.2, np.nan, rng.normal(60, 8, n_patients)
    )
    sex = (rng.random(n_patients) < 0.4).astype(float)
    t[:, INDEX["SEX"]] = np.where(rng.random(n_patients) < 0.1, np.nan, sex)
    t[:, INDEX["BMI"]] = rng.normal(27, 4, n_patients)
    t[:, INDEX["ANGLE"]] = rng.normal(200, 10, n_patients)
    t[:, INDEX["DEPTH"]] = rng.integers(8, 12, n_patients)
    rows = np.repeat(t, 2, axis=0)
    rows[:, INDEX["ESED"]] = np.tile([1.0, 0.0], n_patients)
    return rows, np.repeat(np.arange(n_patients), 2)


def _normalised_means(rows: np.ndarray, sex: float) -> np.ndarray:
    patient = rows[::2]
    member = patient[:, INDEX["SEX"]] == sex
    lo = np.array([CLINICAL_RANGES[a][0] for a in BASE])
    hi = np.array([CLINICAL_RANGES[a][1] for a in BASE])
    x = 2 * (patient[member][:, [INDEX[a] for a in BASE]] - lo) / (hi - lo) - 1
    return np.nanmean(x, axis=0)


def test_tiny_noise_recovers_the_real_statistics():
    rows, patients = _cohort()
    model, _ = fit_attribute_model(
        rows, noise_multiplier=1e-6, patients=patients, rng=np.random.default_rng(0)
    )
    sex = rows[::2, INDEX["SEX"]]
    female, male, unknown = model.strata
    for stratum, code in ((female, 0.0), (male, 1.0)):
        assert stratum.weight == pytest.approx(np.sum(sex == code), abs=1e-3)
        np.testing.assert_allclose(stratum.mean, _normalised_means(rows, code), atol=1e-4)
    assert unknown.weight == pytest.approx(np.isnan(sex).sum(), abs=1e-3)
    age_missing = np.isnan(rows[::2, INDEX["AGE"]][sex == 1.0]).mean()
    assert male.missing[BASE.index("AGE")] == pytest.approx(age_missing, abs=1e-4)
    # LVEDV and RVEDV are built strongly correlated: the covariance keeps it
    i, j = BASE.index("LVEDV"), BASE.index("RVEDV")
    r = male.cov[i, j] / math.sqrt(male.cov[i, i] * male.cov[j, j])
    assert r > 0.9


def test_noise_is_added_at_the_stated_scale():
    rows, patients = _cohort(200)
    sigma = 0.5
    fits = [
        fit_attribute_model(
            rows, noise_multiplier=sigma, patients=patients, rng=np.random.default_rng(s)
        )[0]
        for s in range(40)
    ]
    assert not np.allclose(fits[0].strata[0].mean, fits[1].strata[0].mean)
    # the count block is scaled to L2 sensitivity sqrt(share): its noise std is σ / sqrt(share)
    weights = np.array([f.strata[0].weight for f in fits])
    true_count = np.sum(rows[::2, INDEX["SEX"]] == 0.0)
    assert np.std(weights) == pytest.approx(sigma / math.sqrt(BLOCK_SHARES["count"]), rel=0.3)
    assert np.mean(weights) == pytest.approx(true_count, abs=1.5)


def test_epsilon_is_charged_as_one_gaussian_entry():
    rows, patients = _cohort(300)
    model, entry = fit_attribute_model(
        rows, epsilon=2.0, patients=patients, fingerprint="sha256:x", rng=np.random.default_rng(3)
    )
    assert (entry.mechanism, entry.sample_rate, entry.steps, entry.records) == (
        "gaussian",
        1,
        1,
        300,
    )
    assert entry.fingerprint == "sha256:x" and entry.noise_multiplier == model.noise_multiplier
    ledger = Ledger([entry])
    assert 1.99 <= ledger.total_epsilon() <= 2.0


def test_samples_respect_the_deterministic_relations():
    rows, patients = _cohort(300)
    model, _ = fit_attribute_model(
        rows, epsilon=1.0, patients=patients, rng=np.random.default_rng(0)
    )
    out = model.sample(500, np.random.default_rng(1))
    assert out.shape == (1000, 14)
    ed, es = out[0::2], out[1::2]
    assert np.all(ed[:, INDEX["ESED"]] == 1.0) and np.all(es[:, INDEX["ESED"]] == 0.0)
    others = [INDEX[a] for a in ATTRIBUTES if a != "ESED"]
    np.testing.assert_array_equal(ed[:, others], es[:, others])  # NaN positions included
    for side in ("LV", "RV"):
        edv, esv, ef = (ed[:, INDEX[f"{side}{k}"]] for k in ("EDV", "ESV", "EF"))
        ok = np.isfinite(edv) & np.isfinite(esv)
        assert ok.sum() > 250  # missingness is noisy too at ε = 1
        assert np.all(esv[ok] < edv[ok])
        np.testing.assert_array_equal(ef[ok], ejection_fraction(edv[ok], esv[ok]))
        assert np.all(np.isnan(ef[~ok]))
        assert np.all((ef[ok] >= 5.0 - 1e-9) & (ef[ok] <= 85.0 + 1e-9))
    sex = ed[:, INDEX["SEX"]]
    assert set(np.unique(sex[np.isfinite(sex)])) <= {0.0, 1.0}
    depth = ed[:, INDEX["DEPTH"]]
    np.testing.assert_array_equal(depth[np.isfinite(depth)], np.round(depth[np.isfinite(depth)]))
    for a in BASE:
        v = ed[:, INDEX[a]]
        v = v[np.isfinite(v)]
        lo, hi = CLINICAL_RANGES[a]
        assert np.all((v >= lo - 1e-9) & (v <= hi + 1e-9)), a


def test_save_load_round_trip(tmp_path):
    rows, patients = _cohort(100)
    model, _ = fit_attribute_model(
        rows, noise_multiplier=1.0, patients=patients, rng=np.random.default_rng(0)
    )
    model.save(tmp_path / "attributes.json")
    loaded = AttributeModel.load(tmp_path / "attributes.json")
    np.testing.assert_array_equal(
        model.sample(50, np.random.default_rng(7)), loaded.sample(50, np.random.default_rng(7))
    )
    obj = json.loads((tmp_path / "attributes.json").read_text())
    assert obj["strata"][2]["sex"] is None  # unknown SEX stratum, no NaN in the JSON
    obj["strata"][0]["cov"][0][0] = -1.0
    (tmp_path / "bad.json").write_text(json.dumps(obj))
    with pytest.raises(DpsynthError, match="bad.json: stratum sex=0.0"):
        AttributeModel.load(tmp_path / "bad.json")
    del obj["privacy"]
    (tmp_path / "bad.json").write_text(json.dumps(obj))
    with pytest.raises(DpsynthError, match="malformed"):
        AttributeModel.load(tmp_path / "bad.json")


@pytest.mark.parametrize(
    ("table", "match"),
    [
        (np.zeros((5, 13)), "table: expected shape"),
        (np.full((5, 14), 2.0), "SEX must be"),
        (_cohort(5)[0], "pass patients"),  # per-volume rows without patient ids
    ],
)
def test_fit_refuses_bad_tables(table, match):
    with pytest.raises(DpsynthError, match=match):
        fit_attribute_model(table, noise_multiplier=1.0, rng=np.random.default_rng(0))


def test_attribute_fidelity_measures_differences():
    rows, _ = _cohort(200)
    same = attribute_fidelity(rows, rows)
    assert same["max_abs_correlation_difference"] == 0.0
    assert same["attributes"]["LVEDV"]["wasserstein"] == 0.0
    assert same["attributes"]["AGE"]["missing_real"] == pytest.approx(
        np.isnan(rows[:, INDEX["AGE"]]).mean()
    )

    shifted = rows.copy()
    shifted[:, INDEX["LVEDV"]] += 10.0
    shifted[:, INDEX["RVEDV"]] = rows[::-1, INDEX["RVEDV"]]  # same marginal, r(LVEDV) lost
    fid = attribute_fidelity(rows, shifted)
    assert fid["attributes"]["LVEDV"]["wasserstein"] == pytest.approx(10.0)
    assert fid["attributes"]["LVEDV"]["mean_synthetic"] - fid["attributes"]["LVEDV"][
        "mean_real"
    ] == pytest.approx(10.0)
    assert fid["attributes"]["RVEDV"]["ks"] == 0.0
    assert fid["max_abs_correlation_difference"] > 0.8
    assert fid["n_real"] == fid["n_synthetic"] == 400


def test_one_patient_moves_the_released_vector_by_at_most_one():
    """The privacy claim: scaled per-patient contributions have L2 norm <= 1 (σ is then the
    noise multiplier of the whole release), including extreme, missing and out-of-range rows."""
    from dpsynth.privacy.attribute_model import _block_scale, _contributions

    rng = np.random.default_rng(0)
    rows = _cohort(200)[0][::2]
    extremes = np.full((4, len(ATTRIBUTES)), np.nan)  # row 0: everything missing
    for a in BASE:
        lo, hi = CLINICAL_RANGES[a]
        extremes[1, INDEX[a]], extremes[2, INDEX[a]] = lo - 100, hi + 100
        extremes[3, INDEX[a]] = rng.choice([lo, hi])
    norms = np.linalg.norm(_contributions(np.vstack([rows, extremes])) * _block_scale(), axis=1)
    assert norms.max() <= 1.0 + 1e-12
    assert norms[-3:].min() == pytest.approx(math.sqrt(1 - BLOCK_SHARES["missing"]))
