"""The privacy ledger (budget checks, resume, lineage) and the DP statistics it charges."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest

from dpsynth.errors import BudgetExceededError, DpsynthError
from dpsynth.privacy.accounting import epsilon_for, format_bound, noise_for_epsilon
from dpsynth.privacy.ledger import LEDGER_FILE, Ledger, LedgerEntry, format_ledger
from dpsynth.privacy.outputs import EVALUATION_ONLY_LABEL, is_evaluation_only, labelled
from dpsynth.privacy.statistics import dp_latent_scale, dp_mean


def _sgd(stage: str = "ldm-dp", sigma: float = 1.0, q: float = 0.1, planned: int = 100, steps=0):
    return LedgerEntry(
        stage=stage,
        mechanism="dp-sgd",
        cache_id="c0ffee",
        records=1000,
        noise_multiplier=sigma,
        sample_rate=q,
        planned_steps=planned,
        steps=steps,
    )


def test_total_composes_dp_entries_only(tmp_path):
    ledger = Ledger()
    a = ledger.add(_sgd("ae-dp", sigma=1.2, q=0.05, planned=200, steps=200))
    b = ledger.add(LedgerEntry.gaussian("latent-scale", 5.0, records=1000))
    ledger.add(_sgd("not-started", planned=500))  # 0 steps: spends nothing yet
    ledger.add(LedgerEntry.non_private_use("ldm-validation", 100, "private validation loss"))
    expected = epsilon_for([(1.2, 0.05, 200), (5.0, 1.0, 1)], 1e-5)
    assert ledger.total_epsilon() == pytest.approx(expected, rel=1e-12)
    assert ledger.history() == [a.mechanism_spent(), b.mechanism_spent()]
    text = format_ledger(ledger)
    assert "Non-private uses" in text and "private validation loss" in text
    assert f"epsilon = {format_bound(expected)} at delta = 1e-05" in text
    assert "200/200" in text and "0/500" in text


def test_composed_epsilon_is_the_larger_bound_of_the_stages_accountants(tmp_path):
    """budget, the report and the release state `composed_epsilon`: with stages planned by
    different accountants it is the larger of their bounds, never the first stage's."""
    ledger = Ledger()
    ledger.add(dataclasses.replace(_sgd("ae-dp", sigma=0.9, steps=100), accountant="prv"))
    ledger.add(dataclasses.replace(_sgd("ldm-dp", sigma=1.1, steps=100), accountant="rdp"))
    by = {name: ledger.total_epsilon(1e-5, name) for name in ("prv", "rdp")}
    assert by["rdp"] != by["prv"]
    epsilon, delta, accountant = ledger.composed_epsilon()
    assert (epsilon, delta) == (max(by.values()), 1e-5)
    assert accountant == max(by, key=by.get)
    assert (
        f"epsilon = {format_bound(epsilon)} at delta = 1e-05 ({accountant} accountant"
        in format_ledger(ledger)
    )
    # one accountant: its own bound, whatever the default
    only_rdp = Ledger([dataclasses.replace(_sgd(steps=100), accountant="rdp")])
    assert only_rdp.composed_epsilon() == (only_rdp.total_epsilon(1e-5, "rdp"), 1e-5, "rdp")
    assert Ledger().composed_epsilon() == (0.0, 1e-5, "prv")


def test_save_load_round_trip_and_validation(tmp_path):
    ledger = Ledger([_sgd(steps=40), LedgerEntry.non_private_use("val", 10, "loss")])
    path = ledger.save(tmp_path / "run")
    assert path == tmp_path / "run" / LEDGER_FILE
    loaded = Ledger.load(tmp_path / "run")
    assert loaded.entries == ledger.entries
    assert Ledger.load(tmp_path / "other", missing_ok=True).entries == []
    with pytest.raises(DpsynthError, match="not found"):
        Ledger.load(tmp_path / "other")

    obj = json.loads(path.read_text())
    obj["entries"][0]["steps"] = 101  # more than planned: a corrupted/forged ledger
    (tmp_path / "bad.json").write_text(json.dumps(obj))
    with pytest.raises(DpsynthError, match="exceed the 100 planned"):
        Ledger.load(tmp_path / "bad.json")
    obj["entries"][0]["steps"] = 40
    obj["entries"][0]["noise"] = 1
    (tmp_path / "bad.json").write_text(json.dumps(obj))
    with pytest.raises(DpsynthError, match="unknown keys \\['noise'\\]"):
        Ledger.load(tmp_path / "bad.json")
    del obj["entries"][0]["noise"], obj["entries"][0]["steps"]  # a lost field never defaults
    (tmp_path / "bad.json").write_text(json.dumps(obj))
    with pytest.raises(DpsynthError, match="missing \\['steps'\\]"):
        Ledger.load(tmp_path / "bad.json")

    # numpy numbers (from a checkpoint or torch) are stored as plain JSON numbers
    entry = LedgerEntry(
        **{**_sgd().to_json(), "records": np.int64(7), "sample_rate": np.float32(0.5)}
    )
    assert type(entry.records) is int and type(entry.sample_rate) is float
    Ledger([entry]).save(tmp_path / "np.json")
    assert Ledger.load(tmp_path / "np.json").entries == [entry]


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"mechanism": "laplace"}, "mechanism"),
        ({"noise_multiplier": 0.0}, "noise_multiplier"),
        ({"sample_rate": 2.0}, "sample_rate"),
        ({"delta": 0.0}, "delta"),
        ({"steps": 101}, "planned"),
        ({"records": -1}, "records"),
    ],
)
def test_entry_validation(changes, match):
    with pytest.raises(DpsynthError, match=match):
        LedgerEntry(**{**_sgd().to_json(), **changes})


def test_check_budget_uses_the_rule_of_the_stated_epsilon():
    """Review finding: the check composed with the new stage's accountant only, so a stage
    passed it and `dpsynth budget` (largest bound over the lineage's accountants) then
    printed a total above --max-total-epsilon."""
    parent = LedgerEntry(**{**_sgd("ae-dp", q=0.05, planned=300, steps=300).to_json(),
                            "accountant": "rdp"})  # fmt: skip
    ledger = Ledger([parent])
    planned = LedgerEntry(**{**_sgd("ldm-dp", q=0.05, planned=300).to_json(),
                             "accountant": "prv"})  # fmt: skip
    history = [(1.0, 0.05, 300), (1.0, 0.05, 300)]
    by_prv, by_rdp = epsilon_for(history, 1e-5, "prv"), epsilon_for(history, 1e-5, "rdp")
    assert by_rdp > by_prv * 1.05
    with pytest.raises(BudgetExceededError):
        ledger.check_budget(planned, (by_prv + by_rdp) / 2)  # passed before the fix
    assert ledger.check_budget(planned, by_rdp + 0.01) == pytest.approx(by_rdp)
    ledger.add(LedgerEntry(**{**planned.to_json(), "steps": 300}))
    assert ledger.composed_epsilon()[0] == pytest.approx(by_rdp)


def test_check_budget_refuses_before_stage_with_numbers():
    ledger = Ledger([_sgd("autoencoder-dp", sigma=1.0, q=0.1, planned=100, steps=100)])
    spent = ledger.total_epsilon()
    planned = _sgd("ldm-dp", sigma=1.0, q=0.1, planned=100)  # not started: steps = 0
    projected = epsilon_for([(1.0, 0.1, 100), (1.0, 0.1, 100)], 1e-5)
    assert projected > spent * 1.2  # planned steps count, not the 0 completed ones

    assert ledger.check_budget(planned, projected + 0.01) == pytest.approx(projected)
    with pytest.raises(BudgetExceededError) as info:
        ledger.check_budget(planned, 2.0)
    assert info.value.exit_code == 2
    message = str(info.value)
    assert "\n" not in message
    assert message == (
        f"stage ldm-dp would bring total ε to {format_bound(projected)} at δ=1e-05, "
        "above --max-total-epsilon 2"
    )
    assert planned.id not in ledger  # checking records nothing


def test_resume_sets_steps_from_checkpoint_without_double_counting(tmp_path):
    ledger = Ledger()
    entry = ledger.add(_sgd(planned=100))
    ledger.check_budget(entry, 100.0)
    ledger.update_steps(entry.id, 40)  # checkpoint written at step 40, then the ledger
    ledger.save(tmp_path)

    # crash; the resumed run reloads the ledger and sets the checkpoint's count again
    resumed = Ledger.load(tmp_path)
    resumed.check_budget(resumed[entry.id], 100.0)  # same id: replaced, not added twice
    resumed.update_steps(entry.id, np.int64(40))
    assert resumed[entry.id].steps == 40
    assert resumed.total_epsilon() == epsilon_for([(1.0, 0.1, 40)], 1e-5)  # not 80 steps

    # crash after the checkpoint at 60 but before the ledger save: resume catches up
    resumed.update_steps(entry.id, 60)
    assert resumed.total_epsilon() == epsilon_for([(1.0, 0.1, 60)], 1e-5)
    resumed.update_steps(entry.id, 100)
    with pytest.raises(DpsynthError, match="100 planned"):
        resumed.update_steps(entry.id, 101)  # never past the budget-checked plan
    with pytest.raises(DpsynthError, match="already records 100 steps"):
        resumed.update_steps(entry.id, 60)  # an older checkpoint must not hide spending
    with pytest.raises(DpsynthError, match="integer"):
        resumed.update_steps(entry.id, 99.5)


def test_lineage_inherits_without_duplicates():
    autoencoder = Ledger([_sgd("autoencoder-dp", sigma=1.1, q=0.05, planned=100, steps=100)])
    attributes = Ledger.inherit(autoencoder)
    attributes.add(LedgerEntry.gaussian("attribute-model", 3.0, records=1000))
    # the LDM run builds on both: the autoencoder's entry arrives through two parents
    ldm = Ledger.inherit(autoencoder, attributes)
    assert len(ldm) == 2
    assert ldm.total_epsilon() == epsilon_for([(1.1, 0.05, 100), (3.0, 1.0, 1)], 1e-5)

    ae_entry = autoencoder.entries[0]
    later = Ledger.inherit(autoencoder)
    later.update_steps(ae_entry.id, 100)
    partial = Ledger([LedgerEntry(**{**ae_entry.to_json(), "steps": 50})])
    assert Ledger.inherit(partial, later)[ae_entry.id].steps == 100  # max, never fewer

    forged = Ledger([LedgerEntry(**{**ae_entry.to_json(), "noise_multiplier": 5.0})])
    with pytest.raises(DpsynthError, match="differs between two copies"):
        Ledger.inherit(autoencoder, forged)
    with pytest.raises(DpsynthError, match="already recorded"):
        ldm.add(ae_entry)


def test_every_writer_merges_with_the_run_and_nothing_is_dropped(tmp_path):
    """Regression: a writer used to overwrite RUN/ledger.json with what it held."""
    run = tmp_path / "run"
    attributes = LedgerEntry.gaussian("attribute-model", 3.0, records=1000)
    Ledger([attributes]).save(run)  # fit-attributes first
    stage = Ledger([_sgd(planned=100)])  # a DP stage that knows only its own lineage
    (sgd,) = stage.entries
    stage.save(run)
    assert {e.id for e in Ledger.load(run)} == {attributes.id, sgd.id}
    assert attributes.id in stage  # the writer now holds the union too
    both = epsilon_for([(3.0, 1.0, 1)], 1e-5)
    assert stage.total_epsilon() == pytest.approx(both)  # the stage has no steps yet

    # A writer holding an older copy (fewer steps) never lowers the count on disk.
    stage.update_steps(sgd.id, 60)
    stage.save(run)
    Ledger([dataclasses.replace(sgd, steps=20)]).save(run)
    assert Ledger.load(run)[sgd.id].steps == 60
    # A conflicting copy of an entry is refused and the file is left as it was.
    before = (run / LEDGER_FILE).read_text()
    with pytest.raises(DpsynthError, match="differs between two copies"):
        Ledger([dataclasses.replace(sgd, noise_multiplier=5.0)]).save(run)
    assert (run / LEDGER_FILE).read_text() == before


def test_budget_sees_the_run_and_counts_unfinished_stages_at_their_plan(tmp_path):
    """Regression: an interrupted stage will spend its plan on resume; a check made in
    between (fit-attributes) must count it, and a stage opening in a run must see the run."""
    run = tmp_path / "run"
    interrupted = _sgd(sigma=1.0, q=0.1, planned=100, steps=10)
    Ledger([interrupted]).save(run)
    attributes = LedgerEntry.gaussian("attribute-model", 3.0, records=1000)
    full = epsilon_for([(1.0, 0.1, 100), (3.0, 1.0, 1)], 1e-5)
    done_so_far = epsilon_for([(1.0, 0.1, 10), (3.0, 1.0, 1)], 1e-5)
    assert Ledger.load(run).check_budget(attributes, 100.0) == pytest.approx(full)
    with pytest.raises(BudgetExceededError):
        Ledger.load(run).check_budget(attributes, (full + done_so_far) / 2)
    # A stage that died before its first checkpoint (0 steps) cannot resume: it counts 0.
    Ledger([_sgd("abandoned", sigma=1.0, q=0.1, planned=100, steps=0)]).save(run)
    assert Ledger.load(run).check_budget(attributes, 100.0) == pytest.approx(full)
    # What a stage opening in `run` starts from: the run's entries and its parents'.
    parent = Ledger([_sgd("autoencoder-dp", planned=10, steps=10)])
    parent.save(tmp_path / "parent")
    assert len(Ledger.of_run(run, [tmp_path / "parent"])) == 3
    assert Ledger.of_run(tmp_path / "empty").entries == []


def test_format_1_ledger_loads_without_its_digest(tmp_path):
    """Format 1 held a SHA-256 of the private cache: it loads, the digest is dropped."""
    entry = _sgd(steps=5).to_json()
    entry.pop("cache_id")
    entry["fingerprint"] = "sha256:" + "ab" * 32
    (tmp_path / LEDGER_FILE).write_text(json.dumps({"format_version": 1, "entries": [entry]}))
    ledger = Ledger.load(tmp_path)
    assert ledger.entries[0].cache_id == "" and ledger.entries[0].steps == 5
    ledger.save(tmp_path)
    text = (tmp_path / LEDGER_FILE).read_text()
    assert "sha256" not in text and json.loads(text)["format_version"] == 2


def test_evaluation_only_names_cover_the_files_written_with_private_statistics():
    for path in ("attribute_fidelity.json", "reconstruction.json", "metrics.jsonl",
                 "eval", "eval/metrics.json", "eval/controllability.csv"):  # fmt: skip
        assert is_evaluation_only(path), path
    for path in ("model.json", "ledger.json", "attribute_model.json", "samples/mid.png", ""):
        assert not is_evaluation_only(path), path
    assert labelled({"n": 3}) == {"label": EVALUATION_ONLY_LABEL, "n": 3}


def test_dp_mean_adds_calibrated_noise():
    rng = np.random.default_rng(0)
    values = rng.uniform(-1.0, 1.0, size=1000)  # centred: sum ≈ 0, so count noise is negligible
    sigma = 2.0
    means = [
        dp_mean(values, -2.0, 2.0, noise_multiplier=sigma, rng=np.random.default_rng(s))[0]
        for s in range(300)
    ]
    expected_std = 2.0 * sigma * math.sqrt(2.0) / 1000  # h · σ · √2 / n
    assert np.std(means) == pytest.approx(expected_std, rel=0.15)
    assert np.mean(means) == pytest.approx(values.mean(), abs=3 * expected_std / math.sqrt(300))
    assert means[0] != means[1]


def test_dp_mean_is_per_patient_clipped_and_charged():
    # patient 0 has four rows at 0, patient 1 one row at 10 (clipped to 1): per patient 0.5
    values = np.array([0.0, 0.0, 0.0, 0.0, 10.0, np.nan])
    patients = np.array([0, 0, 0, 0, 1, 2])  # patient 2 has no value and is left out
    with pytest.warns(UserWarning, match="delta"):  # 3 patients: δ = 0.5 is not below 1/N
        mean, entry = dp_mean(
            values, 0.0, 1.0, noise_multiplier=1e-9, delta=0.5, rng=np.random.default_rng(0),
            patients=patients,
        )  # fmt: skip
    assert mean == pytest.approx(0.5, abs=1e-6)
    assert (entry.records, entry.sample_rate, entry.steps, entry.noise_multiplier) == (
        3,
        1,
        1,
        1e-9,
    )
    assert "sensitivity sqrt(2)" in entry.note

    rng = np.random.default_rng(1)
    _, entry = dp_mean(rng.uniform(0, 1, 500), 0.0, 1.0, epsilon=0.5, rng=rng, stage="age")
    ledger = Ledger([_sgd(steps=100)])
    ledger.add(entry)
    alone = epsilon_for([entry.mechanism_spent()], 1e-5)
    assert 0.495 <= alone <= 0.5
    assert ledger.total_epsilon() == epsilon_for(
        [(1.0, 0.1, 100), (entry.noise_multiplier, 1, 1)], 1e-5
    )
    assert ledger.total_epsilon() > epsilon_for([(1.0, 0.1, 100)], 1e-5)


def test_dp_latent_scale():
    rng = np.random.default_rng(0)
    latents = rng.normal(0.0, 2.0, size=(400, 1, 5, 4, 4))  # E[z²] = 4 -> scale 0.5
    patients = np.repeat(np.arange(200), 2)
    scale, entry = dp_latent_scale(latents, epsilon=1.0, rng=rng, patients=patients)
    assert scale == pytest.approx(0.5, rel=0.05)
    assert entry.stage == "latent-scale" and entry.records == 200
    assert entry.noise_multiplier == noise_for_epsilon(1.0, 1e-5, 1.0, 1)
    # the noise floor keeps the scale finite whatever the noise does
    tiny, _ = dp_latent_scale(np.zeros(10), noise_multiplier=1e-9, rng=rng, max_second_moment=1.0)
    assert tiny == pytest.approx(100.0)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"lower": 1.0, "upper": 0.0}, "bounds"),
        ({"epsilon": 1.0, "noise_multiplier": 1.0}, "exactly one"),
        ({"noise_multiplier": -1.0}, "noise_multiplier"),
        ({"values": np.zeros((3, 2))}, "one scalar per row"),
        ({"patients": np.arange(2)}, "patients"),
    ],
)
def test_dp_mean_refuses_bad_input(kwargs, match):
    args = {"values": np.zeros(3), "lower": 0.0, "upper": 1.0, "noise_multiplier": 1.0} | kwargs
    with pytest.raises(DpsynthError, match=match):
        dp_mean(rng=np.random.default_rng(0), **args)


def test_a_public_stage_carries_its_parents_ledger_and_keeps_its_own(tmp_path):
    """A run trained without DP on a DP parent inherits the parent's entries, merged with
    what it recorded itself before training (e.g. the sweep's non-private use)."""
    from dpsynth.training.common import carry_lineage

    parent, run = tmp_path / "parent", tmp_path / "run"
    parent.mkdir()
    run.mkdir()
    Ledger([_sgd(steps=100)]).save(parent / LEDGER_FILE)
    own = LedgerEntry.non_private_use("sweep-nonprivate-baseline", 20, "test", cache_id="beef")
    Ledger([own]).save(run / LEDGER_FILE)
    carry_lineage(run, [parent])
    assert sorted(e.stage for e in Ledger.load(run)) == ["ldm-dp", "sweep-nonprivate-baseline"]
