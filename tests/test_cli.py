"""The command line: one-line errors with exit 2, JSON outputs with the documented keys."""

from __future__ import annotations

import json
import math
import warnings

import pytest

from dpsynth.app import cli
from dpsynth.app.cli import PRIVACY_FLAGS, build_parser, config_from_args, main
from dpsynth.app.sweep import format_table, parse_epsilons, pretrain_ratio, write_table
from dpsynth.config import DEFAULT_SHAPE, DEFAULT_SPACING, load_config
from dpsynth.privacy.accounting import format_bound


def test_budget_plan_json_keys_and_consistency(capsys):
    assert main(["budget", "plan", "--records", "1000", "--batch-size", "100", "--epochs", "2",
                 "--noise-multiplier", "1.0", "--accountant", "rdp", "--json"]) == 0  # fmt: skip
    out = json.loads(capsys.readouterr().out)
    assert set(out) == {
        "epsilon",
        "delta",
        "noise_multiplier",
        "sample_rate",
        "steps",
        "accountant",
    }
    assert out["sample_rate"] == pytest.approx(0.1) and out["steps"] == 20
    assert out["noise_multiplier"] == 1.0 and out["delta"] == 1e-5 and out["epsilon"] > 0


PLAN = ["budget", "plan", "--records", "10", "--batch-size", "2", "--epochs", "1"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (PLAN, "exactly one of"),
        ([*PLAN, "--epsilon", "-1"], "epsilon"),
        ([*PLAN, "--epsilon", "1", "--delta", "2"], "delta"),
        (["budget", "/nonexistent/run"], "not found"),
        (
            ["train-ldm", "--data", "/nonexistent", "--autoencoder", "x", "--out", "y"],
            "/nonexistent",
        ),
        (["train-autoencoder", "--data", "/nonexistent", "--out", "y", "--steps", "0"], "steps"),
    ],
)
def test_bad_input_is_one_line_exit_2(capsys, argv, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and len(err.splitlines()) == 1


def test_sweep_table_reports_the_pretraining_ratio(tmp_path):
    rows = [
        {"cell": "a", "epsilon_target": 10.0, "epsilon_spent": 9.9, "pretrain": True, "frd": 2.0,
         "fd_referee": 1.0, "ms_ssim": 0.3, "lv_volume_r": 0.9, "esed_accuracy": 0.9, "mia_auc": 0.5,
         "per_phase_r": [0.912, 0.81, None, 0.7, 0.66, 0.0002]},
        {"cell": "b", "epsilon_target": 10.0, "epsilon_spent": 9.9, "pretrain": False, "frd": 7.0,
         "fd_referee": 3.0, "ms_ssim": 0.2, "lv_volume_r": None, "esed_accuracy": 0.6, "mia_auc": 0.51},
    ]  # fmt: skip
    assert pretrain_ratio(rows, 10.0) == pytest.approx(3.5)
    assert pretrain_ratio(rows, 10.0, "fd_referee") == pytest.approx(3.0)
    table = format_table(rows)
    assert "FRD 3.50×" in table and "FD-referee 3.00×" in table and table.count("\n|") == 3
    # Per-phase r of the six structures, in PER_PHASE's order; "–" where not measured.
    assert "LVEDV, LVESV, RVEDV, RVESV, MYOEDTHICK, MYOESTHICK" in table
    assert "| 0.91, 0.81, –, 0.70, 0.66, 0.00 |" in table and "| –, –, –, –, –, – |" in table
    md = tmp_path / "B.md"
    md.write_text("# B\n")
    write_table(md, table)
    write_table(md, table)  # replaces its own section instead of appending again
    assert md.read_text().count("sweep-table:start") == 1
    assert parse_epsilons("1, 10,inf") == [1.0, 10.0, math.inf]


DP_FLAGS = {  # flag -> (value on the command line, value expected in config.privacy)
    "--delta": ("1e-6", 1e-6),
    "--max-grad-norm": ("0.7", 0.7),
    "--epochs": ("3.5", 3.5),
    "--batch-size": ("5", 5),
    "--physical-batch-size": ("2", 2),
    "--accountant": ("rdp", "rdp"),
    "--max-total-epsilon": ("9", 9.0),
}


def _subparser(name, parser=None):
    sub = next(a for a in (parser or build_parser())._actions if a.dest == "command")
    return sub.choices[name]


@pytest.mark.parametrize(
    ("command", "section", "extra"),
    [
        ("train-ldm", "ldm_training", ["--autoencoder", "ae"]),
        ("train-autoencoder", "autoencoder_training", []),
    ],
)
@pytest.mark.parametrize("budget", [("--epsilon", "2.5"), ("--noise-multiplier", "1.3")])
def test_every_training_flag_lands_in_the_config(tmp_path, command, section, extra, budget):
    argv = [command, "--data", "d", "--out", str(tmp_path / "run"), *extra, "--dp",
            "--preset", "demo", "--steps", "7", "--seed", "3", *budget]  # fmt: skip
    for flag, (text, _) in DP_FLAGS.items():
        argv += [flag, text]
    config = config_from_args(build_parser().parse_args(argv), section)
    training = getattr(config, section)
    assert (training.steps, training.seed) == (7, 3)
    key = budget[0].lstrip("-").replace("-", "_")
    assert getattr(config.privacy, key) == float(budget[1])
    other = "noise_multiplier" if key == "epsilon" else "epsilon"
    assert getattr(config.privacy, other) == getattr(load_config("demo").privacy, other)
    for flag, (_, expected) in DP_FLAGS.items():
        assert getattr(config.privacy, flag.lstrip("-").replace("-", "_")) == expected, flag
    # every flag of the DP group is one of the flags above (a new flag must land too)
    dests = {a.dest for g in _subparser(command)._action_groups for a in g._group_actions}
    dp_dests = {a.dest for a in _subparser(command)._actions if a.dest in PRIVACY_FLAGS}
    assert dp_dests == set(PRIVACY_FLAGS) <= dests
    tested = {f.lstrip("-").replace("-", "_") for f in DP_FLAGS} | {"epsilon", "noise_multiplier"}
    assert tested == set(PRIVACY_FLAGS)


def test_resume_continues_with_the_saved_config_and_its_flags_still_apply(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    saved = load_config("demo", overrides={"ldm_training.steps": 11, "privacy.lr": 3e-6})
    (run / "config.yaml").write_text(saved.to_yaml())
    argv = ["train-ldm", "--data", "d", "--autoencoder", "ae", "--out", str(run), "--resume"]
    config = config_from_args(build_parser().parse_args([*argv, "--seed", "5"]), "ldm_training")
    assert (config.ldm_training.steps, config.ldm_training.seed, config.privacy.lr) == (11, 5, 3e-6)
    fresh = config_from_args(build_parser().parse_args(argv[:-1]), "ldm_training")
    assert fresh.ldm_training.steps == load_config("demo").ldm_training.steps


@pytest.mark.parametrize("command", ["simulate", "prepare"])
def test_shape_and_xyz_spacing_land_as_slices_first(tmp_path, monkeypatch, command):
    seen = {}

    def spy(*args, **kwargs):
        seen.update(kwargs)
        if command == "prepare":
            return type("Report", (), {"summary": lambda self: "ok"})()
        return tmp_path

    module = "dpsynth.data.simulate" if command == "simulate" else "dpsynth.data.prepare"
    name = "simulate_cohort" if command == "simulate" else "prepare"
    monkeypatch.setattr(f"{module}.{name}", spy)
    argv = [command, "--out", str(tmp_path / "x"), "--shape", "11,64,80",
            "--spacing", "1.5,1.25,8"]  # fmt: skip
    argv += ["--patients", "3"] if command == "simulate" else ["--layout", "ukbb", "--src", "s"]
    assert main(argv) == 0
    assert seen["shape"] == (11, 64, 80) and seen["spacing"] == (8.0, 1.25, 1.5)
    i = argv.index("--shape")
    assert main(argv[:i] + argv[i + 4 :]) == 0  # without --shape/--spacing: the study's grid
    assert (seen["shape"], seen["spacing"]) == (DEFAULT_SHAPE, DEFAULT_SPACING)


def test_budget_plan_flags_land_and_a_zero_delta_is_refused(capsys):
    base = ["budget", "plan", "--records", "1000", "--batch-size", "100", "--epochs", "1",
            "--noise-multiplier", "1.0", "--json"]  # fmt: skip
    assert main([*base, "--delta", "1e-7", "--accountant", "rdp"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["delta"], out["accountant"], out["steps"]) == (1e-7, "rdp", 10)
    assert main(base) == 0  # defaults from dpsynth.config
    out = json.loads(capsys.readouterr().out)
    assert (out["delta"], out["accountant"]) == (1e-5, "prv")
    assert main([*base, "--delta", "0"]) == 2  # not silently replaced by the default
    assert "delta" in capsys.readouterr().err


def test_warnings_print_as_one_line_without_patching_the_process(capsys, monkeypatch):
    before = (warnings.showwarning, warnings.formatwarning)

    def warn(args):
        warnings.warn("something to know", stacklevel=1)

    parser = build_parser()
    monkeypatch.setattr(cli, "build_parser", lambda: parser)
    _subparser("verify", parser).set_defaults(func=warn)
    assert main(["verify", "x"]) == 0
    assert capsys.readouterr().err == "warning: something to know\n"
    assert (warnings.showwarning, warnings.formatwarning) == before


@pytest.mark.parametrize("meta", [[], {"kind": "weights"}])
def test_budget_reads_model_json_through_the_validated_reader(tmp_path, capsys, meta):
    """Regression: `budget` read model.json raw, so a list crashed with a traceback and an
    unknown kind was taken for a model."""
    from dpsynth.privacy.ledger import Ledger, LedgerEntry

    ledger = Ledger([LedgerEntry.gaussian("statistic", 2.0, records=50, cache_id="c1")])
    ledger.save(tmp_path / "ledger.json")
    (tmp_path / "model.json").write_text(json.dumps(meta))
    assert main(["budget", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "model.json: not a dpsynth model" in err and len(err.splitlines()) == 1


@pytest.mark.parametrize(
    ("trained_on", "message"),
    [
        (
            [{"cache_id": "c1", "dp": False}],
            "epsilon = inf: NOT DP\n  trained without DP on cache c1",
        ),
        ([{"cache_id": "c1", "dp": "false"}], "trained_on: expected a list of"),
        ({"cache_id": "c1", "dp": False}, "trained_on: expected a list of"),
    ],
)
def test_budget_reads_the_lineage_as_release_does(tmp_path, capsys, trained_on, message):
    """A lineage `budget` cannot read is an error, not a DP epsilon (dp: "false" was DP)."""
    from dpsynth.privacy.ledger import Ledger, LedgerEntry

    ledger = Ledger([LedgerEntry.gaussian("statistic", 2.0, records=50, cache_id="c1")])
    ledger.save(tmp_path / "ledger.json")
    (tmp_path / "model.json").write_text(json.dumps({"kind": "ldm", "trained_on": trained_on}))
    code = main(["budget", str(tmp_path)])
    out, err = capsys.readouterr()
    if "NOT DP" in message:
        assert code == 0 and message in out and "epsilon = 1" not in out
    else:
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1


def _dp_run(folder, entries, trained_on):
    """A run folder holding `entries` in its ledger and `trained_on` in its model.json."""
    from dpsynth.privacy.ledger import Ledger

    folder.mkdir()
    Ledger(entries).save(folder)
    (folder / "model.json").write_text(json.dumps({"kind": "ldm", "trained_on": trained_on}))
    return folder


def test_budget_of_sibling_runs_composes_them_counting_shared_entries_once(tmp_path, capsys):
    """Two fine-tunes of one DP parent, released together, reveal the parent's spending
    once and both children's: the joint ε is that composition, above either run's own."""
    from dpsynth.privacy.ledger import Ledger, LedgerEntry

    def stage(name):
        return LedgerEntry(stage=name, mechanism="dp-sgd", cache_id="c1", records=100,
                           noise_multiplier=1.0, sample_rate=0.1, planned_steps=40, steps=40)  # fmt: skip

    parent, a, b = stage("ae-dp"), stage("ldm-dp"), stage("ldm-dp")
    lineage = [{"cache_id": "c1", "dp": True}]
    runs = [_dp_run(tmp_path / n, [parent, e], lineage) for n, e in (("a", a), ("b", b))]
    alone = [Ledger.load(run).composed_epsilon()[0] for run in runs]
    joint = Ledger([parent, a, b]).composed_epsilon()[0]
    twice = Ledger([parent, a, b, stage("ae-dp")]).composed_epsilon()[0]  # a second parent
    assert alone[0] == alone[1] < joint < twice  # the shared parent is not counted twice

    assert main(["budget", *map(str, runs), "--json"]) == 0
    stated = json.loads(capsys.readouterr().out)
    assert stated["epsilon"] == joint and len(stated["entries"]) == 3
    assert stated["runs"] == [str(r) for r in runs] and stated["lineage_unchecked"] == []
    assert main(["budget", *map(str, runs)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("Joint ledger of 2 runs") and f"epsilon = {format_bound(joint)} at" in out
    assert f"epsilon = {format_bound(alone[0])} at" not in out


def test_budget_of_sibling_runs_is_not_dp_when_one_learned_the_others_cohort(tmp_path, capsys):
    """Run B trained WITHOUT DP on cache c1, which only run A's ledger names as private:
    alone B states a finite ε (its own ledger knows nothing of c1); together, none."""
    from dpsynth.privacy.ledger import LedgerEntry

    a = _dp_run(tmp_path / "a", [LedgerEntry(
        stage="ldm-dp", mechanism="dp-sgd", cache_id="c1", records=100, noise_multiplier=1.0,
        sample_rate=0.1, planned_steps=40, steps=40,
    )], [{"cache_id": "c1", "dp": True}])  # fmt: skip
    b = _dp_run(tmp_path / "b", [LedgerEntry.gaussian("attributes", 2.0, records=50,
                                                      cache_id="c2")],
                [{"cache_id": "c1", "dp": False}])  # fmt: skip
    assert main(["budget", str(b), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["epsilon"] is not None
    assert main(["budget", str(a), str(b), "--json"]) == 0
    stated = json.loads(capsys.readouterr().out)
    assert stated["epsilon"] is None and stated["not_dp"] == ["c1"]
    assert main(["budget", str(a), str(b)]) == 0
    assert "epsilon = inf: NOT DP\n  trained without DP on cache c1" in capsys.readouterr().out
    # The plain case: B a public stage, no ledger at all (its model.json says it was written
    # without one). Alone it has nothing to state.
    (b / "ledger.json").unlink()
    meta = json.loads((b / "model.json").read_text())
    (b / "model.json").write_text(json.dumps({**meta, "ledger": False}))
    assert main(["budget", str(b)]) == 2 and "not found" in capsys.readouterr().err
    assert main(["budget", str(a), str(b), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["not_dp"] == ["c1"]
    assert main(["budget", str(b), str(tmp_path / "typo")]) == 2  # no model.json, no ledger
    assert "not found" in capsys.readouterr().err
    # A missing ledger is public only where nothing else could have spent: not a ledger file
    # named, not a folder with a DP attribute model, not a model.json written with a ledger
    # (the ledger of an ε = ∞ sweep cell is the only record that its cohort is private),
    # nor one that does not say (older runs), nor one without its lineage.
    assert main(["budget", str(a), str(b / "ledger.json")]) == 2
    (b / "attribute_model.json").write_text("{}")
    assert main(["budget", str(a), str(b)]) == 2
    (b / "attribute_model.json").unlink()
    for written in ({**meta, "ledger": True}, meta, {"kind": "ldm", "ledger": False}):
        (b / "model.json").write_text(json.dumps(written))
        assert main(["budget", str(a), str(b)]) == 2
    assert capsys.readouterr().err.count("not found") == 5


def test_budget_says_when_a_runs_lineage_was_not_checked(tmp_path, capsys):
    """A ledger without its model.json (a stage still training, a bare copy) or a model.json
    without trained_on cannot be checked for spending its ledger lost: `budget` says so."""
    from dpsynth.privacy.ledger import Ledger, LedgerEntry

    bare, old = tmp_path / "bare", tmp_path / "old"
    bare.mkdir()
    Ledger([LedgerEntry.gaussian("statistic", 2.0, records=50, cache_id="c1")]).save(bare)
    _dp_run(old, Ledger.load(bare).entries, [])
    meta = json.loads((old / "model.json").read_text())
    del meta["trained_on"]
    (old / "model.json").write_text(json.dumps(meta))
    for run, why in ((bare, "no model.json (a stage still training"),
                     (old, "model.json records no trained_on")):  # fmt: skip
        assert main(["budget", str(run)]) == 0
        assert f"  note: {run}: {why}" in capsys.readouterr().out
        assert main(["budget", str(run / "ledger.json"), "--json"]) == 0
        assert why in json.loads(capsys.readouterr().out)["lineage_unchecked"][0]
    assert main(["budget", "plan", str(bare)]) == 2
    assert "budget plan: takes no run folders" in capsys.readouterr().err


def test_joint_budget_is_never_below_a_runs_own_epsilon(tmp_path, capsys):
    """Stated at the largest δ of any entry, run B (δ 1e-7) beside run A (δ 1e-5) read
    2.6 where B alone states 3.3; the joint ε is stated at the smallest run's δ. A run
    named twice counts once."""
    from dpsynth.privacy.ledger import Ledger, LedgerEntry

    a = _dp_run(tmp_path / "a", [LedgerEntry.gaussian("attributes", 20.0, records=1000,
                                                      cache_id="c1", delta=1e-5)], [])  # fmt: skip
    b = _dp_run(tmp_path / "b", [LedgerEntry(
        stage="ldm-dp", mechanism="dp-sgd", cache_id="c1", records=1000, noise_multiplier=1.0,
        sample_rate=0.01, planned_steps=2000, steps=2000, delta=1e-7,
    )], [{"cache_id": "c1", "dp": True}])  # fmt: skip
    own = {run: Ledger.load(run).composed_epsilon()[:2] for run in (a, b)}
    assert main(["budget", str(a), str(b), "--json"]) == 0
    joint = json.loads(capsys.readouterr().out)
    assert joint["delta"] == 1e-7
    assert all(joint["epsilon"] >= eps for eps, _ in own.values())
    assert joint["epsilon"] > own[b][0] > Ledger.load(a).composed_epsilon()[0]
    assert main(["budget", str(b), str(b / "ledger.json"), "--json"]) == 0
    twice = json.loads(capsys.readouterr().out)
    assert (twice["epsilon"], twice["delta"], len(twice["runs"])) == (*own[b], 1)


def test_a_non_private_use_that_shaped_the_weights_is_not_dp(tmp_path, capsys):
    """An ε = ∞ sweep cell from before trained_on, copied out of its folder: its ledger holds
    only the non-private training entry. ε = 0 would be stated for weights that learned
    private data un-noised; it is NOT DP. An evaluation use (ldm-validation) is not."""
    from dpsynth.privacy.ledger import LedgerEntry

    def use(stage):
        return LedgerEntry.non_private_use(stage, 50, note="", cache_id="c1")

    cell = _dp_run(tmp_path / "cell", [use("sweep-nonprivate-baseline")], [])
    assert main(["budget", str(cell), "--json"]) == 0
    stated = json.loads(capsys.readouterr().out)
    assert stated["epsilon"] is None and stated["shaping_uses"] == ["sweep-nonprivate-baseline"]
    assert main(["budget", str(cell)]) == 0
    out = capsys.readouterr().out
    assert "epsilon = inf: NOT DP\n  non-private use 'sweep-nonprivate-baseline' may" in out
    dp = LedgerEntry.gaussian("attributes", 2.0, records=50, cache_id="c1", delta=1e-4)
    validated = _dp_run(tmp_path / "validated", [dp, use("ldm-validation")], [])
    assert main(["budget", str(validated), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["epsilon"] > 0
    # Beside a ledger with no DP mechanism, a DP run keeps its own δ.
    from dpsynth.privacy.ledger import Ledger

    own = Ledger.load(validated).composed_epsilon()
    assert main(["budget", str(validated), str(cell), "--json"]) == 0
    joint = json.loads(capsys.readouterr().out)
    assert joint["epsilon"] is None and joint["delta"] == own[1] == 1e-4
