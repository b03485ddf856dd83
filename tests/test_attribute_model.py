"""The DP attribute model: noise is really added, relations hold, fidelity is measured."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from dpsynth.attributes import ATTRIBUTES, CLINICAL_RANGES, INDEX, ejection_fraction
from dpsynth.errors import DpsynthError
from dpsynth.privacy.attribute_model import (
    EDGES,
    PER_PHASE,
    SENSITIVITY,
    SHARES,
    VARIABLES,
    AttributeModel,
    attribute_fidelity,
    column,
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
    t[:, INDEX["ANGLE"]] = rng.normal(20, 10, n_patients)
    t[:, INDEX["DEPTH"]] = rng.integers(8, 12, n_patients)
    rows = np.repeat(t, 2, axis=0)
    rows[:, INDEX["ESED"]] = np.tile([1.0, 0.0], n_patients)
    rows[1::2, INDEX["DEPTH"]] -= rng.integers(1, 3, n_patients)  # the heart shortens at ES
    return rows, np.repeat(np.arange(n_patients), 2)


def _real(rows: np.ndarray, name: str) -> np.ndarray:
    """A modelled variable's values in per-volume rows: its phase's rows, or one per patient."""
    col, code = PER_PHASE.get(name, (name, 1.0))
    return rows[rows[:, INDEX["ESED"]] == code, INDEX[col]]


def _marginal(model: AttributeModel, name: str):
    return model.marginals[VARIABLES.index(name)]


def test_tiny_noise_recovers_the_real_statistics():
    rows, patients = _cohort()
    model, _ = fit_attribute_model(
        rows, noise_multiplier=1e-6, patients=patients, rng=np.random.default_rng(0)
    )
    patient = rows[::2]
    for name, edges in zip(VARIABLES, EDGES, strict=True):
        x = _real(rows, name)
        x = np.clip(x[np.isfinite(x)], edges[0], edges[-1])  # out of range: the end bins
        expected = np.histogram(x, edges)[0] / x.size
        np.testing.assert_allclose(_marginal(model, name).probs, expected, atol=1e-6)
    assert _marginal(model, "AGE").missing == pytest.approx(
        np.isnan(patient[:, INDEX["AGE"]]).mean(), abs=1e-6
    )
    assert _marginal(model, "SEX").probs[1] == pytest.approx(
        np.nanmean(patient[:, INDEX["SEX"]]), abs=1e-6
    )
    r = model.correlation
    lv, rv, myo = (VARIABLES.index(a) for a in ("LVEDV", "RVEDV", "MYOEDTHICK"))
    assert r[lv, rv] > 0.9  # built strongly correlated
    assert abs(r[lv, myo]) < 0.15  # built independent
    drawn = model.sample(4000, np.random.default_rng(1))[::2]
    pair = [INDEX["LVEDV"], INDEX["RVEDV"]]
    real_r = np.corrcoef(patient[:, pair].T)[0, 1]
    assert np.corrcoef(drawn[:, pair].T)[0, 1] == pytest.approx(real_r, abs=0.03)


@pytest.mark.parametrize("release", ["histograms", "signs"])
def test_noise_is_added_at_the_stated_scale(release):
    from dpsynth.privacy.attribute_model import _release

    contrib = np.random.default_rng(0).integers(0, 2, (200, 30)).astype(float)
    sigma = 0.5
    draws = np.array(
        [_release(contrib, release, sigma, np.random.default_rng(s))[0] for s in range(400)]
    )
    # the block is scaled to L2 sensitivity sqrt(share): its noise std is σ · sens / sqrt(share)
    expected = sigma * SENSITIVITY[release] / math.sqrt(SHARES[release])
    assert draws.std(axis=0).mean() == pytest.approx(expected, rel=0.05)
    np.testing.assert_allclose(draws.mean(axis=0), contrib.sum(axis=0), atol=4 * expected / 20)


def test_fit_releases_both_blocks_with_the_model_sigma(monkeypatch):
    """Both releases go through the noisy mechanism at the ledger's σ, in order."""
    import dpsynth.privacy.attribute_model as am

    calls = []
    real_release = am._release

    def spy(contrib, name, sigma, rng):
        calls.append((name, sigma, contrib.shape[1]))
        return real_release(contrib, name, sigma, rng)

    monkeypatch.setattr(am, "_release", spy)
    rows, patients = _cohort(100)
    model, entry = fit_attribute_model(
        rows, epsilon=2.0, patients=patients, rng=np.random.default_rng(0)
    )
    n_pairs = len(VARIABLES) * (len(VARIABLES) - 1) // 2
    assert [(c[0], c[2]) for c in calls] == [
        ("histograms", sum(len(e) for e in EDGES)),
        ("signs", 2 * n_pairs),
    ]
    assert {c[1] for c in calls} == {entry.noise_multiplier} and entry.noise_multiplier > 1


def test_variables_missing_together_keep_their_correlation():
    """Co-presence counts, not independence, normalise the sign agreements: AGE and BMI
    missing together for 40 % of patients must not inflate their correlation."""
    rows, patients = _cohort(2000, seed=3)
    rng = np.random.default_rng(3)
    age = rng.normal(60, 8, len(rows) // 2)
    bmi = 27 + 0.3 * (age - 60) + rng.normal(0, 3, len(age))  # r ≈ 0.6 with AGE
    gone = rng.random(len(age)) < 0.4
    for name, values in (("AGE", age), ("BMI", bmi)):
        rows[:, INDEX[name]] = np.repeat(np.where(gone, np.nan, values), 2)
    model, _ = fit_attribute_model(
        rows, noise_multiplier=1e-6, patients=patients, rng=np.random.default_rng(0)
    )
    drawn = model.sample(6000, np.random.default_rng(1))[::2]
    pair = [INDEX["AGE"], INDEX["BMI"]]
    ok = np.isfinite(drawn[:, pair]).all(axis=1)
    real_r = np.corrcoef(age[~gone], bmi[~gone])[0, 1]
    assert 0.4 < real_r < 0.8
    assert np.corrcoef(drawn[ok][:, pair].T)[0, 1] == pytest.approx(real_r, abs=0.08)


def test_marginals_keep_their_spread_at_the_demo_budget():
    """The reason for the histogram design: at n = 350 and ε = 2 the marginals are neither
    smeared over the clinical range nor given missing values the data do not have."""
    for seed in range(3):
        rows, patients = _cohort(350, seed)
        model, _ = fit_attribute_model(
            rows, epsilon=2.0, patients=patients, rng=np.random.default_rng(seed)
        )
        fid = attribute_fidelity(rows, model.sample(350, np.random.default_rng(seed)))
        for name in ("LVEDV", "RVEDV", "MYOEDTHICK", "BMI", "ANGLE", "DEPTH"):
            a = fid["attributes"][name]
            assert 0.6 <= a["std_synthetic"] / a["std_real"] <= 1.5, (seed, name, a)
            assert a["ks"] < 0.2, (seed, name, a)
            assert a["missing_synthetic"] == 0.0, (seed, name, a)
        age = fid["attributes"]["AGE"]
        assert age["missing_synthetic"] == pytest.approx(age["missing_real"], abs=0.08)


def test_epsilon_is_charged_as_one_gaussian_entry():
    rows, patients = _cohort(300)
    model, entry = fit_attribute_model(
        rows, epsilon=2.0, patients=patients, cache_id="c0ffee", rng=np.random.default_rng(3)
    )
    assert (entry.mechanism, entry.sample_rate, entry.steps, entry.records) == (
        "gaussian",
        1,
        1,
        300,
    )
    assert entry.cache_id == "c0ffee" and entry.noise_multiplier == model.noise_multiplier
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
    others = [INDEX[a] for a in ATTRIBUTES if a not in ("ESED", "DEPTH")]
    np.testing.assert_array_equal(ed[:, others], es[:, others])  # NaN positions included
    shortening = np.nanmean(ed[:, INDEX["DEPTH"]] - es[:, INDEX["DEPTH"]])
    real = np.mean(_real(rows, "DEPTH_ED") - _real(rows, "DEPTH_ES"))
    assert shortening == pytest.approx(real, abs=0.4)  # DEPTH is modelled per phase
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
    depth = out[:, INDEX["DEPTH"]]
    np.testing.assert_array_equal(depth[np.isfinite(depth)], np.round(depth[np.isfinite(depth)]))
    for a in VARIABLES:
        v = out[:, INDEX[column(a)]]
        v = v[np.isfinite(v)]
        lo, hi = CLINICAL_RANGES[column(a)]
        assert np.all((v >= lo - 1e-9) & (v <= hi + 1e-9)), a


def test_save_load_round_trip(tmp_path):
    rows, patients = _cohort(100)
    model, _ = fit_attribute_model(
        rows, noise_multiplier=1.0, patients=patients, rng=np.random.default_rng(0)
    )
    model.save(tmp_path / "attributes.json", ledger_entry="")
    loaded = AttributeModel.load(tmp_path / "attributes.json")
    np.testing.assert_array_equal(
        model.sample(50, np.random.default_rng(7)), loaded.sample(50, np.random.default_rng(7))
    )
    obj = json.loads((tmp_path / "attributes.json").read_text())
    bad = tmp_path / "bad.json"
    for tamper, match in [
        (lambda o: o["marginals"]["BMI"]["probs"].__setitem__(0, -1.0), "marginal BMI"),
        (lambda o: o["marginals"]["AGE"]["bin_edges"].__setitem__(1, 3.0), "marginal AGE"),
        (lambda o: o["correlation"][0].__setitem__(1, 5.0), "positive definite"),
        (lambda o: o.__setitem__("format_version", 1), "unsupported format_version"),
        (lambda o: o.pop("privacy"), "malformed"),
        (lambda o: o["privacy"].__setitem__("noise_multiplier", -1.0), "privacy: invalid"),
        (lambda o: o["privacy"].__setitem__("delta", 1.5), "privacy: invalid"),
    ]:
        changed = json.loads(json.dumps(obj))
        tamper(changed)
        bad.write_text(json.dumps(changed))
        with pytest.raises(DpsynthError, match=f"bad.json: .*{match}"):
            AttributeModel.load(bad)


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


def test_nan_patient_ids_are_refused():
    # np.unique would merge NaN ids into one record, whose change can exceed the sensitivity
    rows, patients = _cohort(5)
    ids = patients.astype(float)
    ids[:4] = np.nan
    with pytest.raises(DpsynthError, match="patients: ids must be finite"):
        fit_attribute_model(rows, noise_multiplier=1.0, patients=ids, rng=np.random.default_rng(0))


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
    """The privacy claim: the two releases' scaled per-patient contributions have joint L2
    norm <= 1 (σ is then the noise multiplier of the whole mechanism), for extreme, missing
    and out-of-range rows, whatever thresholds release 1 chose."""
    from dpsynth.privacy.attribute_model import (
        _bins,
        histogram_contributions,
        patient_records,
        sign_contributions,
    )

    rng = np.random.default_rng(0)
    rows = _cohort(200)[0][::2]
    extremes = np.full((4, len(ATTRIBUTES)), np.nan)  # row 0: everything missing
    for a in VARIABLES:
        lo, hi = CLINICAL_RANGES[column(a)]
        pad = 0 if a == "SEX" else 100  # SEX outside {0, 1} is refused
        extremes[1, INDEX[column(a)]], extremes[2, INDEX[column(a)]] = lo - pad, hi + pad
        extremes[3, INDEX[column(a)]] = rng.choice([lo, hi])
    bins = _bins(patient_records(np.vstack([rows, extremes]), None))  # extremes: both phases
    scale = {k: math.sqrt(SHARES[k]) / SENSITIVITY[k] for k in SHARES}
    hist = histogram_contributions(bins) * scale["histograms"]
    for _ in range(20):
        thresholds = np.array([rng.integers(-1, len(e)) for e in EDGES])
        signs = sign_contributions(bins, thresholds) * scale["signs"]
        norms = np.linalg.norm(np.hstack([hist, signs]), axis=1)
        assert norms.max() <= 1.0 + 1e-12
    thresholds = np.ones(len(EDGES), dtype=int)
    full = np.hstack([hist, sign_contributions(bins, thresholds) * scale["signs"]])
    assert np.linalg.norm(full[-2]) == pytest.approx(1.0)  # all present: the bound is tight
