"""Evaluation: volume sets, FRD, FID path, MS-SSIM, controllability, utility, metrics.json."""

import csv
import hashlib
import importlib
import json

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter
from test_referee import SPACING, phantoms, write_cache

from dpsynth.attributes import INDEX
from dpsynth.data.intensity import normalise, normalise_each
from dpsynth.data.volumes import check_compatible, load_volume_set, normalise_intensity
from dpsynth.errors import DpsynthError
from dpsynth.evaluation.controllability import (
    agreement,
    evaluate_controllability,
    own_phase,
    with_ceiling,
    write_controllability_csv,
)
from dpsynth.evaluation.diversity import mean_pairwise_ms_ssim, pairwise_ms_ssim
from dpsynth.evaluation.evaluate import evaluate
from dpsynth.evaluation.fid import compute_fid
from dpsynth.evaluation.frd import FRDConfig, compute_frd
from dpsynth.evaluation.referee import Referee
from dpsynth.evaluation.utility import evaluate_utility, score_predictor
from dpsynth.io import write_nifti
from dpsynth.privacy.outputs import EVALUATION_ONLY_LABEL

# --- volume sets ---------------------------------------------------------------------------


def test_nifti_folder_with_attributes_csv(tmp_path):
    vols = phantoms(3)
    for name, v in zip(vols.names, vols.volumes, strict=True):
        write_nifti(tmp_path / f"{name}.nii.gz", v * 1000.0, SPACING)  # scanner-like units
    with open(tmp_path / "attributes.csv", "w") as f:
        f.write("file,LVEDV,ESED\n")
        f.write(f"{vols.names[0]}.nii.gz,123.5,1\n")
    s = load_volume_set(tmp_path)
    assert s.volumes.shape == (3, 5, 16, 16) and s.volumes.dtype == np.float32
    assert 0.0 <= s.volumes.min() and s.volumes.max() <= 1.0 and s.volumes.max() > 0.99
    assert s.spacing == pytest.approx(SPACING)
    assert s.attributes[0, INDEX["LVEDV"]] == 123.5 and s.attributes[0, INDEX["ESED"]] == 1
    assert np.isnan(s.attributes[0, INDEX["AGE"]]) and np.isnan(s.attributes[1]).all()


def test_nifti_folder_errors(tmp_path):
    with pytest.raises(DpsynthError, match="no .nii"):
        load_volume_set(tmp_path)
    write_nifti(tmp_path / "a.nii", np.zeros((5, 16, 16)), SPACING)
    write_nifti(tmp_path / "b.nii", np.zeros((5, 16, 12)), SPACING)
    with pytest.raises(DpsynthError, match="b.nii: shape"):
        load_volume_set(tmp_path)
    with pytest.raises(DpsynthError, match="differs"):
        check_compatible(phantoms(2), phantoms(2, shape=(5, 16, 20)))


def test_the_intensity_convention_keeps_its_bytes():
    """`prepare` writes these bytes into every cache, and patient digests (the selector's
    check) hash them: a change here must be deliberate. Pinned against the function as it
    was in `prepare` before it moved to `dpsynth.data.intensity`."""
    v = np.random.default_rng(7).gamma(2.0, 100.0, size=(3, 16, 20)).astype(np.float32)
    v[0, 0, 0] = 1e5
    digest = hashlib.sha256(normalise(v).tobytes()).hexdigest()
    assert digest == "5ba5e1b4185aa465ec22bd01e07cc91fa08f3a2beb8af60d3604759165fb0a90"
    assert normalise(np.full((2, 3, 3), 7.0)).tolist() == np.zeros((2, 3, 3)).tolist()
    assert normalise_each(np.empty((0, 2, 3, 3))).dtype == np.float32


def test_normalise_intensity_is_robust_to_outliers():
    v = np.linspace(0, 100, 5 * 16 * 16, dtype=np.float32).reshape(5, 16, 16)
    v[0, 0, 0] = 1e6  # one hot voxel must not squash everything else
    n = normalise_intensity(v)
    assert n.max() == 1.0 and n.min() == 0.0 and 0.45 < np.median(n) < 0.55


def test_cache_split_loading(tmp_path):
    vols = phantoms(4)
    write_cache(tmp_path, vols, ["train", "test"])
    test = load_volume_set(tmp_path, split="test")
    assert test.names == ["p1_ED", "p1_ES"] and list(test.patients) == ["p1", "p1"]
    np.testing.assert_allclose(test.volumes, vols.volumes[2:], atol=1e-3)
    np.testing.assert_array_equal(test.masks, vols.masks[2:])
    assert len(load_volume_set(tmp_path, split=None)) == 4


# --- FRD, FID, MS-SSIM ---------------------------------------------------------------------


def test_frd_identical_is_zero_and_blurred_exceeds_baseline(tmp_path):
    real = phantoms(12, seed=1)
    config = FRDConfig(num_workers=1)
    same = compute_frd(real, real, config, cache_dir=tmp_path)
    assert same.value == pytest.approx(0.0, abs=1e-9) and same.n_features > 20
    assert "Original" in same.config and "native grid" in same.config
    blurred = real.subset(np.arange(12))
    blurred.volumes = gaussian_filter(real.volumes, (0, 0, 1.5, 1.5))
    shifted = compute_frd(real, blurred, config, cache_dir=tmp_path)
    assert shifted.value > 3 * shifted.baseline > 0
    assert len(list(tmp_path.glob("frd-*.npy"))) == 1  # real features cached once, reused


def test_fid_with_torchscript_extractor(tmp_path):
    class Tiny(torch.nn.Module):
        def forward(self, x):
            return torch.nn.functional.adaptive_avg_pool2d(x, 4).flatten(1)  # (B, 48)

    torch.jit.script(Tiny()).save(str(tmp_path / "inc.pt"))
    real, other = phantoms(8, shape=(9, 16, 16), seed=2), phantoms(8, shape=(9, 16, 16), seed=3)
    same = compute_fid(real, real, tmp_path / "inc.pt")
    assert same.value == pytest.approx(0.0, abs=1e-9) and same.n_real == 8 * 7
    brighter = real.subset(np.arange(8))
    brighter.volumes = np.clip(real.volumes + 0.3, 0, 1)
    assert (
        compute_fid(real, brighter, tmp_path / "inc.pt").value
        > compute_fid(real, other, tmp_path / "inc.pt").value
    )
    (tmp_path / "bad.pt").write_bytes(b"not torchscript")
    with pytest.raises(DpsynthError, match="TorchScript"):
        compute_fid(real, real, tmp_path / "bad.pt")


def test_ms_ssim_identical_one_and_noise_low():
    rng = np.random.default_rng(0)
    a = gaussian_filter(rng.random((2, 5, 32, 32)), (0, 0, 1, 1)).astype(np.float32)
    np.testing.assert_allclose(pairwise_ms_ssim(a, a), 1.0, atol=1e-5)
    noise = rng.random((2, 5, 32, 32)).astype(np.float32)
    assert np.all(pairwise_ms_ssim(noise, rng.random((2, 5, 32, 32)).astype(np.float32)) < 0.1)
    copies = np.repeat(a[:1], 4, axis=0)
    assert mean_pairwise_ms_ssim(copies, n_pairs=6).value == pytest.approx(1.0, abs=1e-5)
    assert mean_pairwise_ms_ssim(noise, n_pairs=6).value < 0.1


# --- controllability, utility, evaluate ----------------------------------------------------


class TrueMaskReferee:
    """A referee that knows the answer: returns each volume's true mask and phase."""

    def __init__(self, *sets):
        self.truth = {s.volumes.tobytes(): s for s in sets}

    def _lookup(self, volumes):
        return self.truth[volumes.tobytes()]

    def segment(self, volumes):
        return self._lookup(volumes).masks

    def predict_phase(self, volumes):
        return self._lookup(volumes).attributes[:, INDEX["ESED"]]

    def features(self, volumes):
        return volumes.reshape(len(volumes), -1)[:, :16].astype(np.float64)


def test_controllability_perfect_referee_gives_r_one(tmp_path):
    synthetic, real = phantoms(10, seed=4), phantoms(6, seed=5)
    result = evaluate_controllability(TrueMaskReferee(synthetic, real), synthetic, real)
    lv = result.attributes["LV_VOLUME"]
    assert lv["r"] == pytest.approx(1.0) and lv["mae"] < 1e-4 and lv["n"] == 10
    assert lv["ceiling_r"] == pytest.approx(1.0) and lv["ceiling_n"] == 6
    assert result.attributes["LVEDV"]["n"] == 5 and result.attributes["LVESV"]["n"] == 5
    assert result.esed_accuracy == 1.0 and result.esed_ceiling == 1.0
    write_controllability_csv(result.rows, tmp_path / "c.csv")
    rows = list(csv.DictReader(open(tmp_path / "c.csv")))
    assert {r["set"] for r in rows} == {"synthetic", "real"}
    assert all(float(r["requested"]) == pytest.approx(float(r["measured"]), rel=1e-5) for r in rows)


def test_agreement_by_hand():
    # x = 1, 2, 3 and y = 2, 2, 4: cov = 2/3, var x = 2/3, var y = 8/9 -> r = sqrt(3) / 2
    got = agreement(np.array([1.0, 2.0, 3.0]), np.array([2.0, 2.0, 4.0]), relative=True)
    assert got["r"] == pytest.approx(np.sqrt(3) / 2) and got["n"] == 3
    assert got["mae"] == pytest.approx(2 / 3) and got["mae_pct"] == pytest.approx(100 / 3)
    assert got["slope"] == pytest.approx(1.0)  # cov / var x = (2/3) / (2/3)
    assert "mae_pct" not in agreement(np.array([1.0, 2.0]), np.array([1.0, 3.0]))
    nan_pair = agreement(np.array([1.0, np.nan, 3.0, 4.0]), np.array([1.0, 5.0, np.nan, 5.0]))
    assert nan_pair["n"] == 2 and nan_pair["mae"] == pytest.approx(0.5)
    assert np.isnan(agreement(np.array([1.0, 1.0]), np.array([1.0, 2.0]))["r"])  # constant
    # a generator that doubles every deviation from the mean request: r 1, slope 2, and the
    # MAE is the exaggeration itself (|2(x - 20) + 20 - x| = |x - 20|: 10, 0, 10)
    requested = np.array([10.0, 20.0, 30.0])
    doubled = agreement(requested, 2 * requested - 20, relative=True)
    assert doubled["r"] == pytest.approx(1.0) and doubled["slope"] == pytest.approx(2.0)
    assert doubled["mae"] == pytest.approx(20 / 3)
    flat = agreement(requested, np.full(3, 20.0))  # ignores the request: r undefined, slope 0
    assert np.isnan(flat["r"]) and flat["slope"] == pytest.approx(0.0)


def test_with_ceiling_per_phase_and_pooled_by_hand():
    rows = [
        ("a", "LVEDV", 100.0, 90.0, "synthetic"),
        ("b", "LVEDV", 200.0, 170.0, "synthetic"),
        ("c", "LVESV", 50.0, 60.0, "synthetic"),
        ("d", "LVESV", 70.0, 70.0, "synthetic"),
        ("e", "RVESV", 80.0, 40.0, "synthetic"),
        ("f", "MYOEDTHICK", 6.0, 7.0, "synthetic"),
        ("g", "LVEDV", 100.0, 101.0, "real"),
        ("h", "LVESV", 40.0, 37.0, "real"),
        ("i", "DEPTH", 8.0, 9.0, "synthetic"),
    ]
    table = with_ceiling(rows)
    lvedv = table["LVEDV"]
    # requested 100, 200; measured 90, 170: r = 1 (two points), MAE 20, 20/150 = 13.3 %
    assert lvedv["r"] == pytest.approx(1.0) and lvedv["mae"] == pytest.approx(20.0)
    assert lvedv["mae_pct"] == pytest.approx(100 * 20 / 150) and lvedv["n"] == 2
    assert lvedv["ceiling_mae"] == pytest.approx(1.0) and lvedv["ceiling_n"] == 1
    assert lvedv["ceiling_mae_pct"] == pytest.approx(1.0) and np.isnan(lvedv["ceiling_r"])
    assert lvedv["slope"] == pytest.approx(0.8) and np.isnan(lvedv["ceiling_slope"])  # 80 / 100
    # pooled LV: |10|, |30|, |10|, |0| over requested mean 105 -> MAE 12.5, 11.9 %
    lv = table["LV_VOLUME"]
    assert lv["n"] == 4 and lv["mae"] == pytest.approx(12.5)
    assert lv["mae_pct"] == pytest.approx(100 * 12.5 / 105)
    x, y = np.array([100, 200, 50, 70.0]), np.array([90, 170, 60, 70.0])
    assert lv["r"] == pytest.approx(np.corrcoef(x, y)[0, 1])
    assert lv["ceiling_n"] == 2 and lv["ceiling_mae"] == pytest.approx(2.0)
    assert lv["ceiling_r"] == pytest.approx(1.0)
    assert table["RV_VOLUME"]["mae_pct"] == pytest.approx(50.0)  # 40 of 80 requested
    assert table["MYO_THICK"]["mae"] == pytest.approx(1.0) and table["MYO_THICK"]["n"] == 1
    assert "mae_pct" not in table["DEPTH"] and "RVEDV" not in table


def test_controllability_wrong_masks_lower_r():
    synthetic = phantoms(10, seed=4)
    shuffled = synthetic.subset(np.roll(np.arange(10), 2))  # same phases, other patients
    referee = TrueMaskReferee(synthetic)
    referee.truth[synthetic.volumes.tobytes()] = shuffled
    result = evaluate_controllability(referee, synthetic)
    assert result.attributes["LV_VOLUME"]["r"] < 0.99 and result.attributes["LV_VOLUME"]["mae"] > 0
    assert np.isnan(result.attributes["LV_VOLUME"]["ceiling_r"])


def _in_clinical_range(volume_set):
    """The tiny phantoms' volumes (a few mL) scaled into the clinical ranges the net regresses."""
    for name in ("LVEDV", "LVESV", "RVEDV", "RVESV"):
        volume_set.attributes[:, INDEX[name]] *= 50
    return volume_set


def test_utility_reads_volumes_within_each_phase():
    train = _in_clinical_range(phantoms(128, shape=(5, 16, 16), seed=6))
    test = _in_clinical_range(phantoms(64, shape=(5, 16, 16), seed=7))
    volumes = ("lvedv_r", "lvesv_r", "rvedv_r", "rvesv_r")
    u = evaluate_utility(train, test, steps=500)
    # within a phase: r says how well it reads size, not whether it told ED from ES
    assert np.mean([u.tstr[k] for k in volumes]) > 0.7 and u.tstr["esed_accuracy"] >= 0.95
    assert "lvef_r" not in u.tstr and u.trtr is None  # one volume does not show its LVEF
    # the same recipe on labels that do not belong to the volumes learns nothing
    shuffled = train.subset(np.arange(len(train)))
    shuffled.attributes[:] = train.attributes[np.random.default_rng(0).permutation(len(train))]
    blind = evaluate_utility(shuffled, test, steps=500)
    assert np.mean([blind.tstr[k] for k in volumes]) < 0.4 and blind.tstr["esed_accuracy"] < 0.8


class _Answers(torch.nn.Module):
    """A stand-in net that answers given rows in order (batches of the test set)."""

    def __init__(self, rows):
        super().__init__()
        self.rows, self.done = torch.as_tensor(rows, dtype=torch.float32), 0

    def forward(self, x):
        out = self.rows[self.done : self.done + len(x)]
        self.done += len(x)
        return out


def test_utility_scores_each_attribute_on_its_phase_and_mae_in_percent():
    test = _in_clinical_range(phantoms(20, seed=9))
    test.attributes[1, INDEX["ESED"]] = np.nan  # a volume of unknown phase counts nowhere
    groups = ("LV_VOLUME", "RV_VOLUME", "MYO_THICK")
    truth = np.stack([own_phase(test.attributes, g) for g in groups], 1)
    esed = test.attributes[:, INDEX["ESED"]]
    ed, es = esed == 1.0, esed == 0.0
    answer = truth.copy()
    answer[:, 0] += 10.0  # every LV volume read 10 mL too large
    for phase in (ed, es):  # RV volumes: the right phase means, the order within reversed
        answer[phase, 1] = 2 * truth[phase, 1].mean() - truth[phase, 1]
    answer = np.nan_to_num(answer, nan=100.0)
    lo, hi = np.array([[10.0, 10.0, 2.0]]), np.array([[400.0, 400.0, 25.0]])  # fixed ranges
    logits = np.where(ed, 1.0, -1.0)[:, None]
    logits[0] *= -1  # one phase call wrong
    rows = np.hstack([2.0 * (answer - lo) / (hi - lo) - 1.0, logits])
    scores = score_predictor(_Answers(rows), test, batch_size=6)
    lv = test.attributes[:, INDEX["LVEDV"]], test.attributes[:, INDEX["LVESV"]]
    assert scores["lvedv_mae_pct"] == pytest.approx(1000 / lv[0][ed].mean(), rel=1e-4)
    assert scores["lvesv_mae_pct"] == pytest.approx(1000 / lv[1][es].mean(), rel=1e-4)
    assert scores["lvedv_r"] == pytest.approx(1) and scores["myoedthick_mae_pct"] < 1e-3
    # pooled over ED and ES these RV answers would correlate well; per phase they are reversed
    assert scores["rvedv_r"] == pytest.approx(-1) and scores["rvesv_r"] == pytest.approx(-1)
    assert scores["esed_accuracy"] == 18 / 19


def test_own_phase_reads_the_attribute_of_the_volumes_phase_and_nan_when_unknown():
    attributes = np.full((3, len(INDEX)), np.nan, np.float32)
    attributes[:, INDEX["LVEDV"]], attributes[:, INDEX["LVESV"]] = 150.0, 60.0
    attributes[:2, INDEX["ESED"]] = (1.0, 0.0)
    np.testing.assert_array_equal(own_phase(attributes, "LV_VOLUME"), [150.0, 60.0, np.nan])


def test_utility_trains_past_unknown_labels_and_phases():
    train, test = phantoms(16, seed=6), phantoms(6, seed=7)
    train.attributes[::3, INDEX["LVEDV"]] = np.nan
    train.attributes[1::5, INDEX["ESED"]] = np.nan  # unknown phase: no own-phase target either
    u = evaluate_utility(train, test, steps=8)
    assert all(np.isfinite(v) for k, v in u.tstr.items() if k.endswith(("_mae_pct", "accuracy")))


def test_utility_trtr_trains_on_as_many_real_volumes_as_tstr():
    synthetic, real_test, real_train = (phantoms(n, seed=s) for n, s in ((8, 6), (6, 7), (20, 8)))
    u = evaluate_utility(synthetic, real_test, real_train, steps=2)
    assert u.tstr["n_train"] == u.trtr["n_train"] == 8
    for scores in (u.tstr, u.trtr):
        assert scores["n_test"] == 6 and 0 <= scores["esed_accuracy"] <= 1
        assert set(scores) >= {"lvedv_r", "lvesv_r", "rvesv_mae_pct", "myoesthick_r"}
    # a real train split smaller than the synthetic set is used whole
    assert evaluate_utility(real_train, real_test, synthetic, steps=2).trtr["n_train"] == 8
    # TSTR and TRTR are one recipe: trained on the same volumes they score the same numbers
    same = evaluate_utility(synthetic, real_test, synthetic, steps=2)
    np.testing.assert_equal(same.tstr, same.trtr)  # NaN where r is undefined counts as equal
    np.testing.assert_equal(same.tstr, u.tstr)


def test_metrics_json_schema(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    real, synthetic = phantoms(12, seed=9), phantoms(12, seed=10)
    result = evaluate(
        real,
        synthetic,
        tmp_path / "out",
        metrics=("frd", "fd_referee", "fid", "ms_ssim", "controllability", "audit"),
        referee=TrueMaskReferee(real, synthetic),
        frd_config=FRDConfig(num_workers=1),
        ms_ssim_pairs=4,
    )
    # The real set's radiomics features (exact features of private volumes) stay inside the
    # labelled evaluation folder, not in a shared user cache.
    assert len(list((tmp_path / "out" / "features").glob("frd-*.npy"))) == 1
    assert (tmp_path / "out" / "features" / "EVALUATION_ONLY.txt").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]

    def no_nan(token):
        raise AssertionError(f"non-standard JSON constant {token}")

    on_disk = json.loads((tmp_path / "out" / "metrics.json").read_text(), parse_constant=no_nan)
    assert on_disk["label"] == EVALUATION_ONLY_LABEL  # exact statistics of real data
    assert on_disk == result
    assert on_disk["n_real"] == 12 and on_disk["n_synthetic"] == 12
    # one wall time per metric group asked for, and only those
    assert set(on_disk["seconds"]) == {
        "frd",
        "fd_referee",
        "fid",
        "ms_ssim",
        "controllability",
        "audit",
    }
    assert all(s >= 0 for s in on_disk["seconds"].values())
    keys = {
        "value",
        "baseline",
        "baseline_label",
        "lower_is_better",
        "config",
        "n_real",
        "n_synthetic",
    }
    for name in ("frd", "fd_referee", "ms_ssim", "controllability_lv_r", "esed_accuracy"):
        entry = on_disk["metrics"][name]
        assert keys <= entry.keys() and isinstance(entry["value"], float), name
    assert on_disk["metrics"]["frd"]["lower_is_better"] is True
    # demoted by benchmarks/bench_fidelity_ranking.py (issue 12 §4): said next to the number
    frd = on_disk["metrics"]["frd"]
    assert frd["trusted"] is False and frd["note"].startswith("not trusted: misranks noise")
    assert (
        on_disk["metrics"]["fid"]["value"] is None
        and "skipped" in on_disk["metrics"]["fid"]["note"]
    )
    assert on_disk["controllability"]["LV_VOLUME"]["r"] == pytest.approx(1.0)
    metric = {name: entry["value"] for name, entry in on_disk["metrics"].items()}
    # the referee knows every mask and phase: controllability and ES/ED accuracy are exact
    assert metric["controllability_lv_r"] == pytest.approx(1.0)
    assert metric["esed_accuracy"] == on_disk["metrics"]["esed_accuracy"]["baseline"] == 1.0
    assert 0 < metric["ms_ssim"] <= 1 and metric["frd"] > 0 and metric["fd_referee"] > 0
    assert "skipped" in on_disk["privacy_audit"]
    with open(tmp_path / "out" / "controllability.csv") as f:
        rows = [r for r in csv.DictReader(f) if r["set"] == "synthetic"]
    lv = [r for r in rows if r["attribute"] in ("LVEDV", "LVESV")]
    assert len(lv) == 12  # one LV row per synthetic volume (its phase's), as requested
    assert all(float(r["requested"]) == pytest.approx(float(r["measured"]), rel=1e-5) for r in lv)
    with pytest.raises(DpsynthError, match="unknown"):
        evaluate(real, synthetic, tmp_path / "o2", metrics=("nope",))


def test_second_reader_table_and_csv_in_metrics_json(tmp_path):
    real, synthetic = phantoms(8, seed=21), phantoms(8, seed=22)
    wrong = synthetic.subset(np.roll(np.arange(8), 2))  # same phases, other patients' masks
    second = TrueMaskReferee(real, synthetic)
    second.truth[synthetic.volumes.tobytes()] = wrong
    second.meta = {"description": "a test reader", "epochs": 1, "private": "not copied"}
    result = evaluate(real, synthetic, tmp_path / "out", metrics=("controllability",),
                      referee=TrueMaskReferee(real, synthetic), second_reader=second)  # fmt: skip
    table = result["controllability_second_reader"]
    assert table["reader"]["description"] == "a test reader" and "private" not in table["reader"]
    lv = table["attributes"]["LV_VOLUME"]
    requested = synthetic.attributes[:, INDEX["LVEDV"]]
    requested = np.where(np.isnan(requested), synthetic.attributes[:, INDEX["LVESV"]], requested)
    measured = np.where(np.isnan(wrong.attributes[:, INDEX["LVEDV"]]),
                        wrong.attributes[:, INDEX["LVESV"]], wrong.attributes[:, INDEX["LVEDV"]])  # fmt: skip
    assert lv["mae"] == pytest.approx(np.mean(np.abs(requested - measured)), rel=1e-5)
    assert lv["mae_pct"] == pytest.approx(100 * lv["mae"] / requested.mean(), rel=1e-5)
    assert lv["ceiling_r"] == pytest.approx(1.0) and lv["ceiling_mae"] < 1e-4
    assert result["controllability"]["LV_VOLUME"]["r"] == pytest.approx(1.0)  # the referee's
    with open(tmp_path / "out" / "controllability_second_reader.csv") as f:
        rows = list(csv.DictReader(f))
    assert {r["set"] for r in rows} == {"synthetic", "real"}
    assert sum(r["attribute"] in ("LVEDV", "LVESV") and r["set"] == "synthetic" for r in rows) == 8
    # without a referee the second reader still measures
    alone = evaluate(real, synthetic, tmp_path / "o2", metrics=("controllability",),
                     second_reader=second)  # fmt: skip
    assert alone["controllability_second_reader"]["attributes"]["LV_VOLUME"] == lv
    assert "skipped" in alone["metrics"]["controllability_lv_r"]["note"]


def test_untrained_referee_plugs_into_evaluate(tmp_path):
    real, synthetic = phantoms(8, seed=11), phantoms(8, seed=12)
    referee = Referee.create((8, 16))
    out = evaluate(real, synthetic, tmp_path / "a", metrics=("fd_referee",), referee=referee)
    same = evaluate(real, real, tmp_path / "b", metrics=("fd_referee",), referee=referee)
    assert out["metrics"]["fd_referee"]["value"] > 0
    # The entry names the referee's recipe: it sets the ratio's scale.
    assert out["metrics"]["fd_referee"]["config"].endswith("; referee lr none (untrained)")
    assert (
        abs(same["metrics"]["fd_referee"]["value"]) < 1e-6 * out["metrics"]["fd_referee"]["value"]
    )


def test_evaluate_from_cache_uses_its_train_split_for_trtr(tmp_path):
    write_cache(tmp_path / "cache", phantoms(16, seed=13), ["train"] * 4 + ["test"] * 4)
    synthetic = phantoms(8, seed=14)
    out = evaluate(
        tmp_path / "cache",
        synthetic,
        tmp_path / "out",
        metrics=("utility", "audit"),
        utility_steps=2,
    )
    assert out["n_real"] == 8
    assert out["utility"]["trtr"]["n_train"] == 8 and out["utility"]["tstr"]["n_train"] == 8
    utility = {k: v for k, v in out["metrics"].items() if k.startswith("utility_")}
    assert len(utility) == 7 and all(e["baseline"] is not None for e in utility.values())
    assert not any(e["lower_is_better"] for e in utility.values())  # r per phase, ED/ES
    assert "model run" in out["privacy_audit"]["skipped"]
    synthetic.attributes[:] = np.nan  # an unconditioned synthetic set cannot train TSTR
    out = evaluate(tmp_path / "cache", synthetic, tmp_path / "out2", metrics=("utility",))
    assert "skipped" in out["metrics"]["utility_esed_accuracy"]["note"]


def test_evaluate_audits_as_many_member_patients_as_held_out_ones(tmp_path, monkeypatch):
    # `dpsynth.evaluation.evaluate` is also the function's name in the package.
    ev = importlib.import_module("dpsynth.evaluation.evaluate")
    calls = []
    monkeypatch.setattr(ev, "privacy_audit", lambda *a, **k: calls.append(k) or {})
    write_cache(tmp_path / "cache", phantoms(16, seed=13), ["train"] * 6 + ["test"] * 2)
    evaluate(tmp_path / "cache", phantoms(4, seed=14), tmp_path / "out", metrics=("audit",),
             pipeline=object())  # fmt: skip
    assert calls[0]["member_patients"] == 2
