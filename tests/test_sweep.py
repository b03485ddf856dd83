"""`dpsynth sweep` on any preset and caches: where the caches go, equal steps per arm."""

from __future__ import annotations

import dataclasses
import shutil

import pytest
from test_training import SHAPE, SPACING, _cache, tiny

from dpsynth.app import sweep
from dpsynth.app.cli import main
from dpsynth.data.cache import META_FILE, Cache
from dpsynth.data.prepare import prepare
from dpsynth.errors import DpsynthError
from dpsynth.io import atomic_write_json, read_json
from dpsynth.privacy.ledger import Ledger, LedgerEntry
from dpsynth.privacy.outputs import EVALUATION_ONLY_LABEL


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    return {
        "root": root,
        "public": _cache(root, "acdc", 1, 10),
        "private": _cache(root, "ukbb", 2, 20),
    }


def test_default_grid_includes_the_studys_0_1():
    assert 0.1 in sweep.parse_epsilons(sweep.DEFAULT_EPSILONS)
    assert sweep.parse_epsilons(sweep.DEFAULT_EPSILONS)[-1] == float("inf")


def test_cli_passes_preset_and_caches_and_keeps_the_default_grid(monkeypatch, tmp_path):
    seen = {}
    monkeypatch.setattr(sweep, "run_sweep", lambda out, **kw: seen.update(out=out, **kw))
    argv = ["sweep", "--preset", "paper", "--public", "pub", "--private", "priv",
            "--out", str(tmp_path / "s"), "--pretrain", "off"]  # fmt: skip
    assert main(argv) == 0
    assert seen["preset"] == "paper" and seen["pretrain"] == "off"
    assert (str(seen["public"]), str(seen["private"])) == ("pub", "priv")
    assert "epsilons" not in seen  # the sweep's default grid, 0.1,1,10,inf
    assert main([*argv, "--epsilons", "0.1,inf"]) == 0
    assert seen["epsilons"] == "0.1,inf"


def test_sweep_refuses_public_equal_to_private(caches, tmp_path):
    private = caches["private"]
    again = tmp_path / "again"  # the same data prepared again: a new id, the same digest
    raw = caches["root"] / "ukbb_raw"
    prepare("ukbb", raw, again, seed=2, shape=SHAPE, spacing=SPACING,
            attributes_csv=raw / "attributes.csv", split=(0.6, 0.2, 0.2))  # fmt: skip
    for public in (private, again):
        with pytest.raises(DpsynthError, match="hold the same data"):
            sweep.run_sweep(tmp_path / "s", public=public, private=private, config=tiny())
    assert not (tmp_path / "s" / "public").exists()  # refused before any training


def test_sweep_checks_the_caches_before_any_training(caches, tmp_path):
    """A public cache on another grid would fail at the first cell's sampling, after its
    training; refused up front with both grids named."""
    raw = caches["root"] / "acdc_raw"
    coarse = tmp_path / "coarse"
    prepare("ukbb", raw, coarse, seed=1, shape=SHAPE, spacing=(10.0, 8.0, 8.0),
            attributes_csv=raw / "attributes.csv", split=(0.6, 0.2, 0.2))  # fmt: skip
    with pytest.raises(
        DpsynthError, match=r"--public .*coarse: volumes .* the sweep needs one grid"
    ):
        sweep.run_sweep(tmp_path / "s", public=coarse, private=caches["private"], config=tiny())
    assert not (tmp_path / "s").exists()
    sweep.check_caches(caches["public"], caches["private"])  # one grid, digests: passes
    old = tmp_path / "old"  # a private cache prepared before patient digests existed
    shutil.copytree(caches["private"], old)
    meta = read_json(old / META_FILE)
    del meta["patient_digests"]
    atomic_write_json(old / META_FILE, meta)
    with pytest.raises(DpsynthError, match=r"--private .*old: lists no patient digests"):
        sweep.run_sweep(tmp_path / "s", private=old, config=tiny())
    assert not (tmp_path / "s").exists()


def _fake_evaluation(monkeypatch) -> dict:
    """Sampling, the referee, the selector and evaluation are the demo's, tested elsewhere;
    stub them where the sweep looks them up (its module; the recorded runs are not
    loadable). Returns what they were called with."""
    calls: dict = {"referee": [], "selector": [], "sample": {}}

    def fake(kind):
        def train(data, out, **kw):
            calls[kind].append((data, out))
            out.mkdir(parents=True, exist_ok=True)

        return train

    monkeypatch.setattr(sweep, "train_demo_referee", fake("referee"))
    monkeypatch.setattr(sweep, "train_selector", fake("selector"))

    def sample(run, out, **kw):
        calls["sample"][run.name] = kw
        out.mkdir()

    monkeypatch.setattr(sweep, "sample_to_folder", sample)
    monkeypatch.setattr(sweep, "load", lambda run: None)

    def evaluate(real, synthetic, out, **kw):
        out.mkdir()
        atomic_write_json(out / "metrics.json", {"metrics": {"frd": {"value": 1.0}}})

    monkeypatch.setattr(sweep, "evaluate", evaluate)
    return calls


def _fake_stage(run, data, dp):
    """What a finished `train_ldm` leaves that the sweep reads: model.json's lineage and,
    for a DP stage, its DP-SGD ledger entry."""
    run.mkdir(exist_ok=True)
    cache_id = Cache(data).cache_id
    if dp:
        Ledger([LedgerEntry(stage="ldm-dp", mechanism="dp-sgd", cache_id=cache_id, records=20,
                            noise_multiplier=1.0, sample_rate=0.1, planned_steps=5, steps=5)]
               ).save(run)  # fmt: skip
    lineage = [{"cache_id": cache_id, "dp": dp}]
    ledger = (run / "ledger.json").is_file()
    atomic_write_json(run / "model.json", {"kind": "ldm", "trained_on": lineage, "ledger": ledger})


def test_sweep_routes_the_caches_and_gives_every_arm_the_same_steps(caches, tmp_path, monkeypatch):
    """Training is recorded, not run (the stages are tested in test_training): what each
    cell trains on, from what, and how many steps its trainer will take."""
    from dpsynth.privacy.planner import plan
    from dpsynth.training.common import public_total_steps

    calls = _fake_evaluation(monkeypatch)
    public_runs, cells = [], {}
    monkeypatch.setattr(sweep, "pretrain_public_models",
                        lambda data, out, config: public_runs.append((data, out)))  # fmt: skip

    def train_ldm(data, autoencoder, run, config, init=None, dp=False, resume=False):
        cells[run.name] = dict(data=data, autoencoder=autoencoder, init=init, dp=dp, cfg=config,
                               resume=resume, ledger=Ledger.load(run, missing_ok=True))  # fmt: skip
        _fake_stage(run, data, dp)

    monkeypatch.setattr(sweep, "train_ldm", train_ldm)
    # The paper preset's schedule (epochs + decay) must not leak into the ε = ∞ arms.
    config = tiny(**{"ldm_training.epochs": 150.0, "ldm_training.lr_decay_epochs": 25.0,
                     "privacy.lr_decay_epochs": 0.5})  # fmt: skip
    out, public, private = tmp_path / "s", caches["public"], caches["private"]
    # An interrupted cell (a checkpoint, no model.json) resumes instead of being refused.
    (out / "eps0.1_scratch" / "checkpoint").mkdir(parents=True)
    atomic_write_json(out / "eps0.1_scratch" / "checkpoint" / "state.json", {})
    atomic_write_json(out / sweep.SOURCE_FILE, {"preset": "demo",
                                                "public_cache_id": Cache(public).cache_id,
                                                "private_cache_id": Cache(private).cache_id})  # fmt: skip
    rows = sweep.run_sweep(out, public=public, private=private, epsilons="0.1,inf", config=config)
    assert [name for name, cell in cells.items() if cell["resume"]] == ["eps0.1_scratch"]
    assert public_runs == [(public, out / "public")]
    # Every cell samples as the demo does: best of CANDIDATES by a selector of the public
    # cache, checked against the private one; one referee of the private cache.
    assert calls["selector"] == [(public, out / "public" / "selector")]
    assert calls["referee"] == [(private, out / "referee")]
    assert len(calls["sample"]) == 4
    for kw in calls["sample"].values():
        assert (kw["candidates"], kw["selector"], kw["private"]) == (
            sweep.CANDIDATES,
            out / "public" / "selector",
            [private],
        )
        assert kw["conditions_source"] == "private" and sweep.CANDIDATES > 1
    assert list(cells) == [r["cell"] for r in rows] == [
        "eps0.1_pretrain", "eps0.1_scratch", "epsinf_pretrain", "epsinf_scratch",
    ]  # fmt: skip
    cache = Cache(private)
    p = config.privacy
    expected = plan(records=len(cache.patient_rows("train")), batch_size=p.batch_size,
                    epochs=p.epochs, noise_multiplier=1.0).steps  # fmt: skip
    for row in rows:
        cell = cells[row["cell"]]
        assert cell["data"] == private and cell["autoencoder"] == out / "public" / "autoencoder"
        assert cell["init"] == (out / "public" / "ldm" if row["pretrain"] else None)
        if cell["dp"]:  # DP arms: the planner's steps, from the privacy section alone
            assert cell["cfg"].privacy == dataclasses.replace(p, epsilon=row["epsilon_target"])
        else:  # ε = ∞: the same steps, batch (both phases) and lr schedule, set explicitly
            t = cell["cfg"].ldm_training
            volumes = len(cache.volume_indices("train"))
            assert public_total_steps(t, volumes) == expected
            assert (t.batch_size, t.lr, t.warmup_steps) == (2 * p.batch_size, p.lr, p.warmup_steps)
            assert (t.lr_decay_epochs, t.lr_decay_factor) == (0.5, p.lr_decay_factor)
        assert row["steps"] == expected
    # A second pass keeps what exists: the referee is trained once, no cell is sampled
    # again (train_selector keeps a finished selector itself: the test below).
    sweep.run_sweep(out, public=public, private=private, epsilons="0.1,inf", config=config)
    assert len(calls["referee"]) == 1
    assert len(calls["sample"]) == 4
    assert not (out / "data").exists()  # no phantoms simulated when --private is given
    assert "| steps |" in sweep.format_table(rows)
    # ε = ∞ cells learned the private cache without DP: recorded, so no descendant (an
    # --init of one) can be released with a DP statement; their ε reads ∞, not 0.
    for row in rows:
        entries = list(Ledger.load(out / row["cell"], missing_ok=True))
        baseline = [e for e in entries if e.stage == "sweep-nonprivate-baseline"]
        if row["epsilon_target"] == float("inf"):
            assert [(e.non_private, e.cache_id) for e in baseline] == [(True, cache.cache_id)]
            assert row["epsilon_spent"] == float("inf")
            assert list(cells[row["cell"]]["ledger"]) == baseline  # recorded before training
        else:
            assert baseline == []
    assert EVALUATION_ONLY_LABEL in (out / "EVALUATION_ONLY.txt").read_text()
    # A crash between an ε = ∞ cell's model.json and its ledger entry is repaired on the next
    # pass (the cell is kept, not retrained), and an entry is never recorded twice.
    (out / "epsinf_scratch" / "ledger.json").unlink()
    cells.clear()
    sweep.run_sweep(out, public=public, private=private, epsilons="0.1,inf", config=config)
    assert cells == {}
    for name in ("epsinf_scratch", "epsinf_pretrain"):
        stages = [e.stage for e in Ledger.load(out / name)]
        assert stages.count("sweep-nonprivate-baseline") == 1, name


def test_sweep_refuses_bench_md_with_a_private_cache(caches, tmp_path):
    with pytest.raises(DpsynthError, match="--bench-md would publish evaluation-only"):
        sweep.run_sweep(tmp_path / "s", private=caches["private"], bench_md=tmp_path / "B.md",
                        config=tiny())  # fmt: skip
    assert not (tmp_path / "s").exists() and not (tmp_path / "B.md").exists()


def test_sweep_refuses_folders_of_an_earlier_recipe(caches, tmp_path):
    """Plain draws or a full-resolution referee left in --out would enter the table beside
    best-of-k cells read at the demo's grid: refused before any work."""
    out = tmp_path / "s"
    synthetic = out / "eps10_pretrain_synthetic"
    synthetic.mkdir(parents=True)
    atomic_write_json(synthetic / "provenance.json", {"candidates": sweep.CANDIDATES})
    source = {"preset": "demo", "public_cache_id": None,  # what run_sweep below records
              "private_cache_id": Cache(caches["private"]).cache_id}  # fmt: skip
    atomic_write_json(out / sweep.SOURCE_FILE, source)
    sweep.refuse_stale(out, source)  # the current recipe passes
    atomic_write_json(synthetic / "provenance.json", {"seed": 0})  # before candidates existed
    with pytest.raises(DpsynthError, match="eps10_pretrain_synthetic: sampled by an earlier"):
        sweep.run_sweep(out, private=caches["private"], config=tiny())
    synthetic.joinpath("provenance.json").unlink()
    (out / "referee").mkdir()
    atomic_write_json(out / "referee" / "referee.json", {"channels": [8, 16, 32]})  # downsample 1
    with pytest.raises(DpsynthError, match="referee: a referee of an earlier recipe"):
        sweep.run_sweep(out, private=caches["private"], config=tiny())
    assert sorted(p.name for p in out.iterdir()) == [
        "eps10_pretrain_synthetic", sweep.SOURCE_FILE, "referee",
    ]  # fmt: skip
    with pytest.raises(DpsynthError, match="referee: a referee of an earlier recipe"):
        sweep.run_sweep(out, config=tiny())  # no --private: refused before simulating one
    assert not (out / "data").exists()
    # At the demo's grid but trained at a constant learning rate: another FD-referee scale.
    atomic_write_json(out / "referee" / "referee.json", {"downsample": 2})
    with pytest.raises(DpsynthError, match=r"learning rate constant: another FD-referee scale"):
        sweep.refuse_stale(out, source)
    atomic_write_json(out / "referee" / "referee.json", {"downsample": 2, "lr": {"peak": 3e-3}})
    sweep.refuse_stale(out, source)


def test_a_finished_selector_is_kept_only_if_it_learned_the_public_cache(
    caches, tmp_path, monkeypatch
):
    """A resumed pre-training (or sweep) must not swap the selector under volumes already
    sampled with it; but one left by another --public (or an evaluation referee) was never
    checked against this run's private data, and is refused."""
    from dpsynth.app import demo
    from dpsynth.evaluation.referee import META_FILE as SEGMENTER_META

    public, trained = caches["public"], []

    def train_referee(cache, out, **kw):
        trained.append((cache, kw["public"]))
        out.mkdir()
        atomic_write_json(out / SEGMENTER_META, {"public": True, "cache_id": Cache(cache).cache_id})
        return out

    monkeypatch.setattr(demo, "train_referee", train_referee)
    selector = tmp_path / "selector"
    assert demo.train_selector(public, selector) == selector
    assert demo.train_selector(public, selector) == selector
    assert trained == [(public, True)]
    shutil.rmtree(selector)
    selector.mkdir()  # a folder without the segmenter's meta
    with pytest.raises(DpsynthError, match="selector: an incomplete selector folder"):
        demo.train_selector(public, selector)
    selector.rmdir()
    demo.train_selector(public, selector)
    for meta in ({"public": True, "cache_id": Cache(caches["private"]).cache_id},
                 {"cache_id": Cache(public).cache_id}):  # fmt: skip
        atomic_write_json(selector / SEGMENTER_META, meta)
        with pytest.raises(DpsynthError, match=r"selector: a selector not trained on --public"):
            demo.train_selector(public, selector)
    assert len(trained) == 2


def test_a_sweep_folder_keeps_one_set_of_public_models(caches, tmp_path, monkeypatch):
    """Cells, samples and public models kept from another --public (or none) would mix two
    sets of public models in one table, and those models were never checked against this
    run's private data: refused before any work, naming both."""
    calls = _fake_evaluation(monkeypatch)
    monkeypatch.setattr(sweep, "pretrain_public_models", lambda data, out, config: None)

    def train_ldm(data, autoencoder, run, config, init=None, dp=False, resume=False):
        _fake_stage(run, data, dp)

    monkeypatch.setattr(sweep, "train_ldm", train_ldm)
    out, public, private = tmp_path / "s", caches["public"], caches["private"]
    sweep.run_sweep(out, public=public, private=private, epsilons="1", config=tiny())
    recorded = read_json(out / sweep.SOURCE_FILE)
    assert recorded == {"preset": "demo", "public_cache_id": Cache(public).cache_id,
                        "private_cache_id": Cache(private).cache_id}  # fmt: skip
    again = tmp_path / "again"  # the same public patients prepared again: another cache
    raw = caches["root"] / "acdc_raw"
    prepare("ukbb", raw, again, seed=1, shape=SHAPE, spacing=SPACING,
            attributes_csv=raw / "attributes.csv", split=(0.6, 0.2, 0.2))  # fmt: skip
    for other in (None, again):
        with pytest.raises(DpsynthError, match=r"s: begun with .*use a new --out"):
            sweep.run_sweep(out, public=other, private=private, epsilons="1", config=tiny())
    # Another --private: a cell's ledger would name one cohort while it trained on another.
    for other in (None, again):  # simulated, or another cache
        with pytest.raises(DpsynthError, match=r"s: begun with .*'private_cache_id'"):
            sweep.run_sweep(out, public=public, private=other, epsilons="1", config=tiny())
    with pytest.raises(DpsynthError, match=r"s: begun with .*'paper'"):
        sweep.run_sweep(out, preset="paper", public=public, private=private, epsilons="1",
                        config=tiny())  # fmt: skip
    assert len(calls["sample"]) == 2  # two cells; nothing sampled by the refused runs
    (out / sweep.SOURCE_FILE).unlink()  # cells of a sweep from before the record
    with pytest.raises(DpsynthError, match="did not record its inputs"):
        sweep.run_sweep(out, public=public, private=private, epsilons="1", config=tiny())


def test_the_simulated_private_cohort_is_labelled_before_it_is_written(tmp_path, monkeypatch):
    """Without --private the sweep simulates one: its folder is evaluation-only from the
    first file, so an interrupted run leaves nothing unlabelled."""

    def simulate(out, spec, config, split):
        assert EVALUATION_ONLY_LABEL in (tmp_path / "s" / "EVALUATION_ONLY.txt").read_text()
        raise KeyboardInterrupt  # stop there

    monkeypatch.setattr(sweep, "simulate_and_prepare", simulate)
    with pytest.raises(KeyboardInterrupt):
        sweep.run_sweep(tmp_path / "s", config=tiny())


def test_a_simulated_cohort_prepared_again_is_refused_beside_its_cells(caches, tmp_path):
    """Without --private the folder records the simulated cache's id; simulated again (a
    new id), the kept cells would be measured against another cohort: refused before it
    is simulated."""
    out = tmp_path / "s"
    shutil.copytree(caches["private"], out / "data" / "ukbb_cache")  # as simulated
    private_id = sweep._private_id(out, None)
    assert private_id == f"simulated {Cache(caches['private']).cache_id}"
    source = {"preset": "demo", "public_cache_id": None, "private_cache_id": private_id}
    atomic_write_json(out / sweep.SOURCE_FILE, source)
    (out / "eps1_pretrain").mkdir()
    sweep.refuse_stale(out, source)
    shutil.rmtree(out / "data" / "ukbb_cache")
    with pytest.raises(DpsynthError, match=r"s: begun with .*'simulated \w+'"):
        sweep.run_sweep(out, config=tiny())
    assert not (out / "data" / "ukbb_cache").exists()


def test_an_infinite_epsilon_entry_is_kept_per_cache(caches, tmp_path):
    """The ε = ∞ entry is recorded once per private cache: one naming another cohort does
    not stand in for this one."""
    run, cache = tmp_path / "epsinf_pretrain", Cache(caches["private"])
    run.mkdir()
    Ledger([LedgerEntry.non_private_use(sweep.NONPRIVATE_BASELINE, 5, "old", cache_id="f00")]
           ).save(run / "ledger.json")  # fmt: skip
    for _ in range(2):
        sweep._record_nonprivate_use(run, cache)
    assert sorted(e.cache_id for e in Ledger.load(run)) == sorted(["f00", cache.cache_id])


def test_a_cells_epsilon_is_what_budget_states(caches, tmp_path):
    """A DP cell states its ledger's ε; the same cell with its ledger lost is an error,
    not ∞ (which hid it); a cell without a DP mechanism reads ∞."""
    dp_cell, public_cell = tmp_path / "eps1_pretrain", tmp_path / "epsinf_pretrain"
    _fake_stage(dp_cell, caches["private"], dp=True)
    _fake_stage(public_cell, caches["private"], dp=False)
    assert sweep._epsilon_spent(dp_cell) == Ledger.load(dp_cell).composed_epsilon()[0] > 0
    assert sweep._epsilon_spent(public_cell) == float("inf")
    (dp_cell / "ledger.json").unlink()
    with pytest.raises(DpsynthError, match="ledger.json: file not found"):
        sweep._epsilon_spent(dp_cell)  # its model.json says it was written with one
