"""Training, sampling and the DP stage end to end on tiny phantoms.

These tests protect the guarantee where the pieces meet: the DP engine runs at the patient
sample rate the ledger records, the ledger matches the checkpoint after an interruption, budgets are refused
before any private step, and nothing private shapes the saved model.
"""

from __future__ import annotations

import argparse
import json
import shutil
import warnings

import nibabel as nib
import numpy as np
import pytest
import torch

from dpsynth.app.cli import MULTI_PROCESS_COMMANDS, build_parser, main
from dpsynth.app.demo import pretrain_public, run_demo
from dpsynth.app.sample import sample_to_folder
from dpsynth.app.sweep import run_sweep
from dpsynth.app.workflow import pretrain_public_models, run_workflow
from dpsynth.attributes import ATTRIBUTES, CLINICAL_RANGES
from dpsynth.config import load_config
from dpsynth.data.cache import Cache
from dpsynth.data.prepare import prepare
from dpsynth.data.simulate import simulate_cohort
from dpsynth.errors import BudgetExceededError, DpsynthError
from dpsynth.io import atomic_write_json, read_json
from dpsynth.privacy.accounting import epsilon_for, format_bound
from dpsynth.privacy.attribute_model import load_attribute_model
from dpsynth.privacy.ledger import Ledger, LedgerEntry, format_ledger
from dpsynth.privacy.outputs import EVALUATION_ONLY_LABEL
from dpsynth.privacy.statistics import gaussian_noise_multiplier
from dpsynth.runs import SCALE_FROM_DP_ESTIMATE, SCALE_FROM_INIT, load
from dpsynth.training import checkpoint as ckpt
from dpsynth.training.attributes import fit_attributes
from dpsynth.training.autoencoder import train_autoencoder
from dpsynth.training.ldm import train_ldm
from dpsynth.training.monitor import Monitor

SHAPE = (5, 16, 16)
SPACING = (10.0, 7.0, 7.0)

TINY = {
    "data.shape": list(SHAPE),
    "data.spacing": list(SPACING),
    "autoencoder.channels": 8,
    "autoencoder.norm_groups": 4,
    "autoencoder.latent_channels": 2,
    "autoencoder.num_res_blocks": 1,
    "autoencoder_training.steps": 4,
    "autoencoder_training.batch_size": 2,
    "autoencoder_training.checkpoint_every": 2,
    "autoencoder_training.sample_every": 4,
    "denoiser.channels": 8,
    "denoiser.norm_groups": 4,
    "denoiser.num_heads": 2,
    "denoiser.time_embed_dim": 16,
    "denoiser.channel_multipliers": [1, 2],
    "denoiser.attention_levels": [False, True],
    "denoiser.num_res_blocks": 1,
    "ldm_training.steps": 4,
    "ldm_training.batch_size": 4,
    "ldm_training.checkpoint_every": 2,
    "ldm_training.sample_every": 4,
    "privacy.epochs": 1.0,
    "privacy.batch_size": 4,
    "privacy.physical_batch_size": 2,
    "privacy.accountant": "rdp",
    "privacy.lr": 1e-3,
    "sampling.steps": 5,
}


def tiny(**extra) -> object:
    return load_config("demo", overrides={**TINY, **extra})


def _cache(root, cohort, seed, n):
    raw = root / f"{cohort}_raw"
    simulate_cohort(raw, n, cohort=cohort, seed=seed, shape=SHAPE, spacing=SPACING, workers=1)
    out = root / f"{cohort}_cache"
    prepare("ukbb", raw, out, attributes_csv=raw / "attributes.csv", seed=seed, shape=SHAPE,
            spacing=SPACING, split=(0.6, 0.2, 0.2))  # fmt: skip
    return out


def public_world(root) -> dict:
    """Public and private caches, a public autoencoder and a public LDM, under `root`."""
    torch.manual_seed(0)
    public = _cache(root, "acdc", 1, 10)
    private = _cache(root, "ukbb", 2, 20)
    ae = train_autoencoder(public, root / "ae", tiny())
    ldm = train_ldm(public, ae, root / "ldm", tiny())
    return {"root": root, "public": public, "private": private, "ae": ae, "ldm": ldm}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return public_world(tmp_path_factory.mktemp("world"))


def test_autoencoder_run_has_public_latent_scale_and_quality(world):
    meta = read_json(world["ae"] / "model.json")
    assert meta["latent_scale"] > 0 and np.isfinite(meta["latent_scale"])
    assert meta["shape"] == list(SHAPE)
    quality = read_json(world["ae"] / "reconstruction.json")
    assert quality["n"] > 0 and np.isfinite(quality["psnr_db"]) and -1 <= quality["ssim"] <= 1
    assert any(p.suffix == ".png" for p in (world["ae"] / "samples").iterdir())


def test_autoencoder_resume_continues_exactly(world, tmp_path):
    config = tiny()
    straight = train_autoencoder(world["public"], tmp_path / "straight", config)
    first = train_autoencoder(
        world["public"], tmp_path / "resumed", tiny(**{"autoencoder_training.steps": 2})
    )
    assert read_json(first / "checkpoint" / "state.json")["step"] == 2
    (first / "model.json").unlink()
    # Resuming on other data is refused before a step: the weights would hold two datasets
    # while model.json names one (here a public stage continued on the private cache).
    with pytest.raises(DpsynthError, match=r"checkpoint: trained on cache \w+, not .*ukbb_cache"):
        train_autoencoder(world["private"], first, config, resume=True)
    state_file = first / "checkpoint" / "state.json"
    good = state_file.read_text()
    state_file.write_text(
        json.dumps({k: v for k, v in json.loads(good).items() if k != "cache_id"})
    )
    with pytest.raises(DpsynthError, match="checkpoint: trained on data it does not name"):
        train_autoencoder(world["public"], first, config, resume=True)  # fails closed
    state_file.write_text(good)
    assert read_json(state_file)["step"] == 2
    resumed = train_autoencoder(world["public"], first, config, resume=True)
    a = ckpt.load_weights(straight / "autoencoder.safetensors")
    b = ckpt.load_weights(resumed / "autoencoder.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)


def test_existing_run_is_not_overwritten(world):
    with pytest.raises(DpsynthError, match="a run already exists"):
        train_autoencoder(world["public"], world["ae"], tiny())


def test_a_complete_run_is_not_resumed(world):
    """Regression: --resume of a finished run trained nothing but wrote the model again (a
    DP autoencoder drew its DP latent scale a second time, charged once)."""
    before = (world["ae"] / "model.json").read_bytes()
    with pytest.raises(DpsynthError, match="this run is complete"):
        train_autoencoder(world["public"], world["ae"], tiny(), resume=True)
    with pytest.raises(DpsynthError, match="this run is complete"):
        train_ldm(world["public"], world["ae"], world["ldm"], tiny(), resume=True)
    assert (world["ae"] / "model.json").read_bytes() == before


def test_sample_api_and_cli_write_nifti_with_spacing(world, tmp_path):
    pipe = load(world["ldm"])
    table = np.full((3, len(ATTRIBUTES)), np.nan, np.float32)
    table[:, ATTRIBUTES.index("LVEDV")] = 150.0
    volumes = pipe.sample(3, attributes=table, steps=3, progress=False)
    assert volumes.shape == (3, *SHAPE) and volumes.min() >= 0 and volumes.max() <= 1

    out = tmp_path / "synth"
    code = main(["sample", str(world["ldm"]), "--n", "3", "--set", "LVEDV=150", "--set", "ESED=1",
                 "--steps", "3", "--out", str(out)])  # fmt: skip
    assert code == 0
    files = sorted(out.glob("*.nii.gz"))
    assert len(files) == 3
    img = nib.load(files[0])
    assert img.shape == (SHAPE[2], SHAPE[1], SHAPE[0])
    np.testing.assert_allclose(
        img.header.get_zooms(), (SPACING[2], SPACING[1], SPACING[0]), rtol=1e-5
    )
    rows = (out / "attributes.csv").read_text().splitlines()
    assert rows[0].split(",")[:2] == ["file", "LVEDV"] and len(rows) == 4
    assert rows[1].split(",")[1] == "150"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--set", "LVEDVX=150"], "unknown attribute 'LVEDVX'"),
        (["--set", "LVEDV=big"], "'big' is not a number"),
        (["--set", "LVEDV"], "expected NAME=VALUE"),
    ],
)
def test_sample_rejects_bad_attributes(world, tmp_path, capsys, args, message):
    out = tmp_path / "bad"
    code = main(["sample", str(world["ldm"]), "--n", "2", *args, "--out", str(out)])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not out.exists()


def test_sample_rejects_csv_with_wrong_columns(world, tmp_path, capsys):
    csv = tmp_path / "c.csv"
    csv.write_text("LVEDV,HEART\n150,1\n")
    code = main(
        [
            "sample",
            str(world["ldm"]),
            "--n",
            "2",
            "--attributes",
            str(csv),
            "--out",
            str(tmp_path / "o"),
        ]
    )
    assert code == 2
    assert "unknown column 'HEART'" in capsys.readouterr().err


def test_sample_warns_outside_training_range(world, tmp_path):
    with pytest.warns(UserWarning, match="outside the training range"):
        sample_to_folder(world["ldm"], tmp_path / "o", n=1, settings=["LVEDV=5000"], steps=2)


def test_sample_warns_when_given_an_attribute_the_model_never_learned(world, tmp_path):
    """The public `acdc` cohort gives no SEX: a SEX the user sets changes nothing, so say so."""
    with pytest.warns(UserWarning, match="SEX is set .* but the model never learned it"):
        sample_to_folder(world["ldm"], tmp_path / "sex", n=1, settings=["SEX=1"], steps=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sample_to_folder(world["ldm"], tmp_path / "lv", n=1, settings=["LVEDV=150"], steps=2)
    assert not [w for w in caught if "never learned" in str(w.message)]  # LVEDV was trained


def _crash_at(monkeypatch, step: int) -> None:
    """Make training die (as from Ctrl-C) right after completing `step`, before logging it."""
    original = Monitor.step

    def crash(self, done, *args, **kwargs):
        if done == step:
            raise KeyboardInterrupt
        return original(self, done, *args, **kwargs)

    monkeypatch.setattr(Monitor, "step", crash)


def _n_train(world) -> int:
    return len(Cache(world["private"]).patient_rows("train"))


def _dp(world, out, **extra):
    config = tiny(**{"privacy.epsilon": 8.0, **extra})
    return train_ldm(world["private"], world["ae"], out, config, init=world["ldm"], dp=True)


def test_dp_sgd_trains_a_default_layout_denoiser_from_a_finished_run(world, tmp_path, monkeypatch):
    """`runs.load` stores a run's denoiser channels-last for inference; a DP fine-tune from
    that run (`init`) must build its own default-layout copy for the engine's taps."""
    from conftest import stored_channels_last

    from dpsynth.training import trainer

    layouts = []
    original = trainer.PatientDPSGD

    def recording(model, *args, **kwargs):
        layouts.append(stored_channels_last(model))
        return original(model, *args, **kwargs)

    monkeypatch.setattr(trainer, "PatientDPSGD", recording)
    _dp(world, tmp_path / "dp")
    assert len(layouts) == 1 and layouts[0] and not any(layouts[0])


def test_dp_stage_ledger_matches_patient_sample_rate(world, tmp_path):
    run = _dp(world, tmp_path / "dp")
    ledger = Ledger.load(run)
    (entry,) = [e for e in ledger if e.mechanism == "dp-sgd"]
    n_patients = _n_train(world)  # the private training split (about 60% of 20 patients)
    assert entry.records == n_patients
    assert entry.sample_rate == pytest.approx(4 / n_patients)  # patients, not volumes
    assert entry.steps == entry.planned_steps == int(np.ceil(1.0 / entry.sample_rate))
    assert 7.0 < ledger.total_epsilon(1e-5, accountant="rdp") <= 8.0 + 1e-9
    # The engine ran with the ledger's σ and q and took the steps the ledger records, and
    # the checkpoint's ledger (the one resumed from) says the same.
    engine = read_json(run / "checkpoint" / "state.json")["opt"]
    noisy = [engine["noise_multiplier"], engine["sample_rate"], engine["steps_taken"]]
    assert noisy == [entry.noise_multiplier, entry.sample_rate, entry.steps]
    assert Ledger.load(run / "checkpoint" / "ledger.json")[entry.id] == entry


def test_dp_resume_after_crash_neither_loses_nor_double_counts(world, tmp_path, monkeypatch):
    _crash_at(monkeypatch, 3)
    with pytest.raises(KeyboardInterrupt):
        _dp(world, tmp_path / "dp")
    monkeypatch.undo()
    crashed = Ledger.load(tmp_path / "dp")
    (entry,) = [e for e in crashed if e.mechanism == "dp-sgd"]
    assert entry.steps == 2  # the last checkpoint: what a released model could have seen
    # A checkpoint whose loop step disagrees with its ledger and engine is refused.
    state_file = tmp_path / "dp" / "checkpoint" / "state.json"
    good = state_file.read_text()
    state_file.write_text(json.dumps({**json.loads(good), "step": 1}))
    with pytest.raises(
        DpsynthError, match="ledger records 2 steps, the DP engine 2 and the loop 1"
    ):
        train_ldm(world["private"], world["ae"], tmp_path / "dp",
                  tiny(**{"privacy.epsilon": 8.0}), init=world["ldm"], dp=True, resume=True)  # fmt: skip
    state_file.write_text(good)
    # The same patients prepared again (a new cache id, the same plan): a resume there would
    # run the entry's remaining steps on a cohort the ledger does not name.
    raw = world["private"].parent / "ukbb_raw"
    again = tmp_path / "again"
    prepare("ukbb", raw, again, attributes_csv=raw / "attributes.csv", seed=2, shape=SHAPE,
            spacing=SPACING, split=(0.6, 0.2, 0.2))  # fmt: skip
    with pytest.raises(DpsynthError, match=r"checkpoint: trained on cache \w+, not .*again"):
        train_ldm(again, world["ae"], tmp_path / "dp", tiny(**{"privacy.epsilon": 8.0}),
                  init=world["ldm"], dp=True, resume=True)  # fmt: skip
    # A DP checkpoint from before checkpoints named their cache: its ledger entry does.
    state_file.write_text(
        json.dumps({k: v for k, v in json.loads(good).items() if k != "cache_id"})
    )
    with pytest.raises(DpsynthError, match=r"ledger entry's steps ran on cache \w+, not .*again"):
        train_ldm(again, world["ae"], tmp_path / "dp", tiny(**{"privacy.epsilon": 8.0}),
                  init=world["ldm"], dp=True, resume=True)  # fmt: skip
    assert list(Ledger.load(tmp_path / "dp")) == list(crashed)
    run = train_ldm(world["private"], world["ae"], tmp_path / "dp",
                    tiny(**{"privacy.epsilon": 8.0}), init=world["ldm"], dp=True, resume=True)  # fmt: skip
    (after,) = [e for e in Ledger.load(run) if e.mechanism == "dp-sgd"]
    assert after.id == entry.id and after.steps == after.planned_steps
    state = read_json(run / "checkpoint" / "state.json")
    assert state["opt"]["steps_taken"] == state["step"] == after.planned_steps


def test_dp_stage_refused_before_spending(world, tmp_path):
    with pytest.raises(BudgetExceededError, match="above --max-total-epsilon 1"):
        _dp(world, tmp_path / "dp", **{"privacy.max_total_epsilon": 1.0})
    assert not (tmp_path / "dp" / "checkpoint").exists()


def test_no_private_statistic_shapes_the_dp_model(world, tmp_path):
    run = _dp(world, tmp_path / "dp")
    meta = read_json(run / "model.json")
    public_meta = read_json(world["ae"] / "model.json")
    assert meta["latent_scale"] == public_meta["latent_scale"]  # from public data
    assert meta["attribute_ranges"] == read_json(world["ldm"] / "model.json")["attribute_ranges"]
    assert meta["private"] is True
    config = json.dumps(read_json(run / "model.json"))
    assert world["private"].name not in config


def test_dp_without_public_init_uses_clinical_ranges(world, tmp_path):
    config = tiny(**{"privacy.epsilon": 8.0})
    run = train_ldm(world["private"], world["ae"], tmp_path / "scratch", config, dp=True)
    ranges = read_json(run / "model.json")["attribute_ranges"]
    assert ranges == {a: list(CLINICAL_RANGES[a]) for a in ATTRIBUTES}


def test_torchrun_two_processes_dp_run(world, tmp_path):
    """`torchrun --nproc-per-node 2 -m dpsynth train-ldm --dp` trains and accounts like one process."""
    import os
    import subprocess
    import sys

    config = tmp_path / "tiny.yaml"
    config.write_text(tiny(**{"privacy.epsilon": 8.0}).to_yaml())
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "--master-port", "29517", "-m", "dpsynth", "train-ldm", "--data", str(world["private"]),
           "--autoencoder", str(world["ae"]), "--init", str(world["ldm"]), "--out", str(out),
           "--config", str(config), "--dp"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    (entry,) = [e for e in Ledger.load(out) if e.mechanism == "dp-sgd"]
    assert entry.sample_rate == pytest.approx(4 / _n_train(world))
    assert entry.steps == entry.planned_steps
    assert (out / "model.json").exists()
    single = _dp(world, tmp_path / "single")
    (one,) = [e for e in Ledger.load(single) if e.mechanism == "dp-sgd"]
    assert one.noise_multiplier == entry.noise_multiplier and one.steps == entry.steps
    # Resumed under torchrun on the same patients prepared again: every rank refuses (no rank
    # left waiting at a barrier), before a step, and the ledger is unchanged.
    (out / "model.json").unlink()
    raw = world["private"].parent / "ukbb_raw"
    again = tmp_path / "again"
    prepare("ukbb", raw, again, attributes_csv=raw / "attributes.csv", seed=2, shape=SHAPE,
            spacing=SPACING, split=(0.6, 0.2, 0.2))  # fmt: skip
    before = list(Ledger.load(out))
    cmd[cmd.index(str(world["private"]))] = str(again)
    done = subprocess.run([*cmd, "--resume"], capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode != 0
    assert done.stderr.count("checkpoint: trained on cache") == 2, done.stderr[-2000:]
    assert list(Ledger.load(out)) == before


# ---------------------------------------------------------------- DP autoencoder


def _dp_ae(world, out, init=True, **extra):
    config = tiny(**{"privacy.epsilon": 4.0, **extra})
    return train_autoencoder(world["private"], out, config, init=world["ae"] if init else None,
                             dp=True)  # fmt: skip


def test_dp_autoencoder_fine_tune_is_patient_level_and_keeps_public_scale(world, tmp_path):
    run = _dp_ae(world, tmp_path / "ae_dp")
    (entry,) = list(Ledger.load(run))
    assert entry.stage == "autoencoder-dp-sgd" and entry.records == _n_train(world)
    assert entry.sample_rate == pytest.approx(4 / _n_train(world))  # patients, not volumes
    assert entry.steps == entry.planned_steps > 0
    assert 3.0 < Ledger.load(run).total_epsilon(1e-5, accountant="rdp") <= 4.0 + 1e-9
    meta, public = read_json(run / "model.json"), read_json(world["ae"] / "model.json")
    assert meta["private"] is True and meta["latent_scale"] == public["latent_scale"]
    assert meta["latent_scale_source"] == SCALE_FROM_INIT
    # The weights moved away from the public init: the stage really trained.
    before = ckpt.load_weights(world["ae"] / "autoencoder.safetensors")
    after = ckpt.load_weights(run / "autoencoder.safetensors")
    assert max(float((after[k] - before[k]).abs().max()) for k in before) > 1e-4
    # No private images in the run folder; the private PSNR is flagged as evaluation only.
    assert not (run / "samples").exists()
    assert read_json(run / "reconstruction.json")["label"] == EVALUATION_ONLY_LABEL
    first = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    assert first["label"] == EVALUATION_ONLY_LABEL
    assert "label" not in read_json(world["ae"] / "reconstruction.json")  # public test split


def test_a_public_autoencoder_on_a_dp_one_writes_its_ledger_before_model_json(
    world, tmp_path, monkeypatch
):
    """model.json marks the run complete, so the DP parent's ledger it carries is on disk
    first: a crash between the two cannot leave a complete run with an empty ledger."""
    from dpsynth.training import autoencoder as ae_module

    parent = _dp_ae(world, tmp_path / "ae_dp")
    ledger_on_disk = []
    finish = ae_module._finish

    def spy(run, *args, **kwargs):
        ledger_on_disk.append((run / "ledger.json").is_file())
        finish(run, *args, **kwargs)

    monkeypatch.setattr(ae_module, "_finish", spy)
    public = train_autoencoder(world["public"], tmp_path / "ae_pub", tiny(), init=parent)
    assert ledger_on_disk == [True]
    assert [e.stage for e in Ledger.load(public)] == ["autoencoder-dp-sgd"]


def test_dp_autoencoder_from_scratch_charges_a_dp_latent_scale(world, tmp_path):
    run = _dp_ae(world, tmp_path / "ae_scratch", init=False)
    stages = {e.stage: e for e in Ledger.load(run)}
    assert set(stages) == {"latent-scale", "autoencoder-dp-sgd"}
    assert stages["latent-scale"].sample_rate == 1.0 and stages["latent-scale"].steps == 1
    meta = read_json(run / "model.json")
    assert np.isfinite(meta["latent_scale"]) and meta["latent_scale"] > 0
    assert meta["latent_scale_source"] == SCALE_FROM_DP_ESTIMATE
    # Both mechanisms compose: more than the DP-SGD stage alone.
    alone = Ledger([stages["autoencoder-dp-sgd"]]).total_epsilon(1e-5, accountant="rdp")
    assert Ledger.load(run).total_epsilon(1e-5, accountant="rdp") > alone
    # A DP autoencoder fine-tuned from this one keeps the scale, and its DP label: the
    # scale is still the private estimate, not a public one.
    child = train_autoencoder(world["private"], tmp_path / "ae_child",
                              tiny(**{"privacy.epsilon": 4.0}), init=run, dp=True)  # fmt: skip
    child_meta = read_json(child / "model.json")
    assert child_meta["latent_scale"] == meta["latent_scale"]
    assert child_meta["latent_scale_source"] == SCALE_FROM_DP_ESTIMATE
    assert "latent-scale" in {e.stage for e in Ledger.load(child)}


def test_dp_autoencoder_refuses_an_init_whose_scale_label_it_cannot_read(world, tmp_path):
    parent = shutil.copytree(world["ae"], tmp_path / "ae_odd")
    meta = read_json(parent / "model.json")
    meta["latent_scale_source"] = "hand-edited"
    (parent / "model.json").write_text(json.dumps(meta))
    with pytest.raises(DpsynthError, match="ae_odd/model.json: latent_scale_source: not one"):
        train_autoencoder(world["private"], tmp_path / "ae_dp", tiny(), init=parent, dp=True)
    assert not (tmp_path / "ae_dp" / "ledger.json").exists()  # refused before any DP step
    del meta["latent_scale_source"]  # a DP parent without one: DP estimate or public?
    meta["private"] = True
    (parent / "model.json").write_text(json.dumps(meta))
    with pytest.raises(DpsynthError, match="a DP run without latent_scale_source"):
        train_autoencoder(world["private"], tmp_path / "ae_dp", tiny(), init=parent, dp=True)
    with pytest.raises(DpsynthError, match="latent_scale_source: not one"):  # nor an LDM on it
        meta["latent_scale_source"] = "hand-edited"
        (parent / "model.json").write_text(json.dumps(meta))
        train_ldm(world["private"], parent, tmp_path / "ldm", tiny(), init=world["ldm"], dp=True)
    assert not (tmp_path / "ldm" / "ledger.json").exists()


def test_a_parent_lineage_that_cannot_be_read_is_refused(world, tmp_path):
    """dp: "false" is truthy: read loosely, it let a DP stage build on a non-DP one."""
    parent = shutil.copytree(world["ae"], tmp_path / "ae_odd")
    meta = read_json(parent / "model.json")
    meta["trained_on"] = [{"cache_id": Cache(world["private"]).cache_id, "dp": "false"}]
    (parent / "model.json").write_text(json.dumps(meta))
    with pytest.raises(DpsynthError, match="trained_on: expected a list of"):
        train_autoencoder(world["private"], tmp_path / "ae_dp", tiny(), init=parent, dp=True)


def test_ldm_on_dp_autoencoder_composes_both_stages(world, tmp_path):
    ae = _dp_ae(world, tmp_path / "ae_dp")
    ldm = train_ldm(world["private"], ae, tmp_path / "ldm_dp", tiny(**{"privacy.epsilon": 4.0}),
                    init=world["ldm"], dp=True)  # fmt: skip
    ledger = Ledger.load(ldm)
    assert {e.stage for e in ledger} == {"autoencoder-dp-sgd", "ldm-dp-sgd"}
    assert ledger.total_epsilon(1e-5, accountant="rdp") > 4.0 + 1e-6
    # A public stage built on the DP autoencoder still shows what its parent spent.
    public_ldm = train_ldm(world["public"], ae, tmp_path / "ldm_public", tiny())
    assert [e.stage for e in Ledger.load(public_ldm)] == ["autoencoder-dp-sgd"]


def test_dp_autoencoder_refused_before_spending(world, tmp_path):
    with pytest.raises(BudgetExceededError, match="above --max-total-epsilon 0.5"):
        _dp_ae(world, tmp_path / "ae_dp", **{"privacy.max_total_epsilon": 0.5})
    assert not (tmp_path / "ae_dp" / "checkpoint").exists()


def test_dp_autoencoder_resume_neither_loses_nor_double_counts(world, tmp_path, monkeypatch):
    extra = {
        "privacy.epsilon": 4.0,
        "privacy.epochs": 2.0,
        "autoencoder_training.checkpoint_every": 2,
    }
    _crash_at(monkeypatch, 3)
    with pytest.raises(KeyboardInterrupt):
        train_autoencoder(
            world["private"], tmp_path / "ae", tiny(**extra), init=world["ae"], dp=True
        )
    monkeypatch.undo()
    (crashed,) = list(Ledger.load(tmp_path / "ae"))
    assert crashed.steps == 2
    # No discriminator under DP: none is built, trained or checkpointed (it would see
    # private data without a guarantee).
    tensors, state = ckpt.load_checkpoint(tmp_path / "ae" / "checkpoint")
    assert not any(k.startswith(("disc.", "optd.")) for k in tensors) and "optd" not in state
    run = train_autoencoder(world["private"], tmp_path / "ae", tiny(**extra), init=world["ae"],
                            dp=True, resume=True)  # fmt: skip
    (after,) = list(Ledger.load(run))
    assert after.id == crashed.id and after.steps == after.planned_steps == crashed.planned_steps
    state = read_json(run / "checkpoint" / "state.json")
    assert state["opt"]["steps_taken"] == state["step"] == after.planned_steps


def test_cli_train_autoencoder_dp(world, tmp_path):
    config = tmp_path / "tiny.yaml"
    config.write_text(tiny().to_yaml())
    out = tmp_path / "ae_cli"
    code = main(["train-autoencoder", "--data", str(world["private"]), "--out", str(out),
                 "--init", str(world["ae"]), "--config", str(config), "--dp", "--epsilon", "3"])  # fmt: skip
    assert code == 0
    (entry,) = list(Ledger.load(out))
    assert entry.stage == "autoencoder-dp-sgd" and entry.steps == entry.planned_steps


def test_dp_validation_on_private_data_is_recorded_not_charged(world, tmp_path):
    config = tiny(**{"privacy.epsilon": 8.0})
    run = train_ldm(world["private"], world["ae"], tmp_path / "dp", config, init=world["ldm"],
                    dp=True, validation_data=world["private"])  # fmt: skip
    ledger = Ledger.load(run)
    (use,) = [e for e in ledger if e.non_private]
    assert use.stage == "ldm-validation" and use.records == 20
    (sgd,) = [e for e in ledger if e.mechanism == "dp-sgd"]
    assert ledger.total_epsilon(1e-5, "rdp") == Ledger([sgd]).total_epsilon(1e-5, "rdp")
    metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert any("validation_loss" in m for m in metrics)
    # Public validation data adds nothing to the ledger.
    public = train_ldm(world["private"], world["ae"], tmp_path / "dp_pub", config,
                       init=world["ldm"], dp=True, validation_data=world["public"])  # fmt: skip
    assert not [e for e in Ledger.load(public) if e.non_private]
    # Without DP nothing would record it, and the run's losses are public files: refused.
    with pytest.raises(DpsynthError, match="--private-validation: only with --dp"):
        train_ldm(world["public"], world["ae"], tmp_path / "pub", tiny(),
                  validation_data=world["private"], private_validation=True)  # fmt: skip
    assert not (tmp_path / "pub").exists()


def test_workflow_chains_public_pretraining_and_dp_and_its_ablation(world, tmp_path):
    config = tmp_path / "tiny.yaml"
    config.write_text(tiny().to_yaml())
    common = ["workflow", "--public", str(world["public"]), "--private", str(world["private"]),
              "--config", str(config), "--epsilon", "6"]  # fmt: skip
    assert main([*common, "--out", str(tmp_path / "on")]) == 0
    on = tmp_path / "on"
    assert all((on / s / "model.json").exists() for s in ("autoencoder", "ldm", "ldm_dp"))
    assert [e.stage for e in Ledger.load(on / "ldm_dp")] == ["ldm-dp-sgd"]
    assert not (on / "ldm" / "ledger.json").exists()  # the public stages touch no private data
    # Rerunning keeps every complete stage (nothing is retrained or re-charged).
    before = read_json(on / "ldm_dp" / "ledger.json")
    assert main([*common, "--out", str(on)]) == 0
    assert read_json(on / "ldm_dp" / "ledger.json") == before

    assert main([*common, "--out", str(tmp_path / "off"), "--no-pretrain"]) == 0
    off = tmp_path / "off"
    assert not (off / "ldm").exists() and (off / "ldm_dp" / "model.json").exists()
    (a,), (b,) = Ledger.load(on / "ldm_dp"), Ledger.load(off / "ldm_dp")
    assert (a.noise_multiplier, a.sample_rate, a.steps) == (
        b.noise_multiplier,
        b.sample_rate,
        b.steps,
    )


# ---------------------------------------------------------------- one ledger per run


def _budget_total(run, capsys) -> str:
    capsys.readouterr()
    assert main(["budget", str(run)]) == 0
    return capsys.readouterr().out


def test_fit_attributes_then_dp_stage_keep_both_and_budget_both(world, tmp_path, capsys):
    """Regression: the DP stage's ledger came from its parents only and overwrote the run's,
    so the attribute model's ε vanished from the ledger and from --max-total-epsilon."""
    run = tmp_path / "run"
    fit_attributes(world["private"], run, epsilon=2.0, seed=0)
    # The LDM stage alone (ε 5) fits under 5.5; with the attribute model (ε 2) it cannot.
    with pytest.raises(BudgetExceededError, match="above --max-total-epsilon 5.5"):
        _dp(world, run, **{"privacy.epsilon": 5.0, "privacy.max_total_epsilon": 5.5})
    assert not (run / "checkpoint").exists()
    _dp(world, run, **{"privacy.epsilon": 5.0})
    ledger = Ledger.load(run)
    stages = {e.stage: e for e in ledger}
    assert set(stages) == {"attribute-model", "ldm-dp-sgd"}
    alone = {k: Ledger([e]).total_epsilon() for k, e in stages.items()}
    assert ledger.total_epsilon() > max(alone.values()) + 0.25  # composed: 4.96 vs 4.47, 2.0
    # budget states the larger bound of the stages' accountants (prv for the attribute
    # model, the DP stage's own for DP-SGD), as the report and the release do
    total, _, accountant = ledger.composed_epsilon()
    assert total >= max(ledger.total_epsilon(1e-5, a) for a in ("prv", "rdp")) - 1e-12
    assert f"epsilon = {format_bound(total)} at delta = 1e-05 ({accountant}" in _budget_total(
        run, capsys
    )
    assert (run / "attribute_model.json").exists()


def test_train_then_fit_attributes_then_resume_keep_both(world, tmp_path, monkeypatch, capsys):
    """Regression: --resume rewrote the run's ledger from the checkpoint's copy, dropping
    an attribute model fitted in between; the budget check in between ignored the steps
    the interrupted stage would still take."""
    run = tmp_path / "run"
    _crash_at(monkeypatch, 3)
    with pytest.raises(KeyboardInterrupt):
        _dp(world, run, **{"privacy.epsilon": 5.0})
    monkeypatch.undo()
    (sgd,) = Ledger.load(run)
    assert 0 < sgd.steps < sgd.planned_steps
    sigma = gaussian_noise_multiplier(2.0, None, 1e-5, "prv")
    at = {
        n: epsilon_for([(sgd.noise_multiplier, sgd.sample_rate, n), (sigma, 1.0, 1)], 1e-5)
        for n in (sgd.steps, sgd.planned_steps)
    }
    cap = (at[sgd.steps] + at[sgd.planned_steps]) / 2  # passes only if the plan is ignored
    with pytest.raises(BudgetExceededError):
        fit_attributes(world["private"], run, epsilon=2.0, seed=0, max_total_epsilon=cap)
    kept = (run / "ledger.json").read_bytes()
    (run / "ledger.json").unlink()  # the run's copy lost: the checkpoint's still counts
    with pytest.raises(BudgetExceededError):
        fit_attributes(world["private"], run, epsilon=2.0, seed=0, max_total_epsilon=cap)
    (run / "ledger.json").write_bytes(kept)
    assert not (run / "attribute_model.json").exists()
    fit_attributes(world["private"], run, epsilon=2.0, seed=0)

    config = tiny(**{"privacy.epsilon": 5.0})
    resume = dict(init=world["ldm"], dp=True, resume=True)
    capped = tiny(**{"privacy.epsilon": 5.0, "privacy.max_total_epsilon": cap})
    with pytest.raises(BudgetExceededError):  # the resumed stage sees the attribute model
        train_ldm(world["private"], world["ae"], run, capped, **resume)
    train_ldm(world["private"], world["ae"], run, config, **resume)
    ledger = Ledger.load(run)
    assert {e.stage for e in ledger} == {"attribute-model", "ldm-dp-sgd"}
    assert ledger[sgd.id].steps == sgd.planned_steps
    assert ledger.total_epsilon() > Ledger([ledger[sgd.id]]).total_epsilon() + 0.25
    total = ledger.composed_epsilon()[0]  # what budget, the report and the release state
    assert total >= ledger.total_epsilon()
    assert (
        f"epsilon = {format_bound(total)}"
        in _budget_total(run, capsys)
        == format_ledger(ledger) + "\n"
    )


def test_fit_attributes_checks_then_records_then_draws(world, tmp_path, monkeypatch):
    """Regression: fit-attributes drew its noisy releases before the budget check and wrote
    the model before the ledger recorded it."""
    import dpsynth.training.attributes as release

    run, seen = tmp_path / "run", []
    fit = release.fit_attribute_model

    def spy(*args, **kwargs):
        seen.append([e.stage for e in Ledger.load(run, missing_ok=True)])
        return fit(*args, **kwargs)

    monkeypatch.setattr(release, "fit_attribute_model", spy)
    with pytest.raises(BudgetExceededError):
        fit_attributes(world["private"], run, epsilon=2.0, max_total_epsilon=1.0)
    assert seen == [] and not (run / "attribute_model.json").exists()
    fit_attributes(world["private"], run, epsilon=2.0, seed=0)
    assert seen == [["attribute-model"]]  # recorded before any noise was drawn
    assert read_json(run / "attribute_fidelity.json")["label"] == EVALUATION_ONLY_LABEL


def test_fit_attributes_refuses_a_run_whose_ledger_is_lost_or_partial(world, tmp_path):
    """Regression: into a DP run whose ledger.json was lost, fit-attributes checked the
    budget against an empty ledger and wrote a new one holding its own entry alone, so that
    restoring the lost ledger then dropped the attribute model's ε."""
    private = Cache(world["private"]).cache_id
    run = tmp_path / "run"
    run.mkdir()
    lineage = [{"cache_id": private, "dp": True}]
    atomic_write_json(run / "model.json", {"kind": "ldm", "trained_on": lineage, "ledger": True})
    with pytest.raises(DpsynthError, match="no ledger.json, and its model.json does not say"):
        fit_attributes(world["private"], run, epsilon=2.0, seed=0)
    assert not (run / "ledger.json").exists()
    # A ledger that misses the run's DP training (replaced by another run's) is refused too.
    Ledger([LedgerEntry.gaussian("latent-scale", 3.0, records=10, cache_id=private)]).save(run)
    with pytest.raises(DpsynthError, match="records no DP-SGD on it"):
        fit_attributes(world["private"], run, epsilon=2.0, seed=0)
    assert [e.stage for e in Ledger.load(run)] == ["latent-scale"]
    assert not (run / "attribute_model.json").exists()
    # A public run that never held a ledger takes its first.
    public = tmp_path / "public"
    public.mkdir()
    lineage = [{"cache_id": Cache(world["public"]).cache_id, "dp": False}]
    atomic_write_json(
        public / "model.json", {"kind": "ldm", "trained_on": lineage, "ledger": False}
    )
    fit_attributes(world["private"], public, epsilon=2.0, seed=0)
    assert [e.stage for e in Ledger.load(public)] == ["attribute-model"]
    # It holds a ledger now: lost, with the attribute model removed too, it reads as lost,
    # not as the public run it was (a refit would start its budget from nothing).
    assert read_json(public / "model.json")["ledger"] is True
    (public / "ledger.json").unlink()
    (public / "attribute_model.json").unlink()
    with pytest.raises(DpsynthError, match="no ledger.json, and its model.json does not say"):
        fit_attributes(world["private"], public, epsilon=2.0, seed=0)


def test_an_attribute_model_the_runs_ledger_does_not_record_is_refused(world, tmp_path, capsys):
    """Regression: `sample --attributes dp` and the explorer read any attribute_model.json
    in the run folder, so one copied in from another run was released under an ε that
    does not count it."""
    fitted, other = tmp_path / "fitted", tmp_path / "other"
    fit_attributes(world["private"], fitted, epsilon=2.0, seed=0)
    fit_attributes(world["private"], other, epsilon=2.0, seed=1)  # the same σ, another fit
    assert load_attribute_model(fitted).epsilon == 2.0
    model = read_json(fitted / "attribute_model.json")
    (fit,) = Ledger.load(fitted)
    assert model["ledger_entry"] == fit.id
    shutil.copy(fitted / "attribute_model.json", other / "attribute_model.json")
    with pytest.raises(DpsynthError, match=f"does not record its fit \\(ledger entry {fit.id}"):
        load_attribute_model(other)
    capsys.readouterr()
    assert main(["budget", str(other)]) == 2  # nor is an ε stated for it
    assert "does not record its fit" in capsys.readouterr().err
    del model["ledger_entry"]  # a model of an older dpsynth: matched by σ and δ
    atomic_write_json(other / "attribute_model.json", model)
    assert load_attribute_model(other).epsilon == 2.0
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(fitted / "attribute_model.json", bare / "attribute_model.json")
    with pytest.raises(DpsynthError, match="no ε covers it"):
        load_attribute_model(bare)
    # A DP stage trained into a folder whose ledger lost the fit refuses before a step.
    (fitted / "ledger.json").unlink()
    with pytest.raises(DpsynthError, match="does not record its fit"):
        _dp(world, fitted)
    assert not (fitted / "checkpoint").exists()


def test_fit_attributes_refuses_an_unfinished_public_stage(world, tmp_path, monkeypatch):
    """A public stage writes its ledger (its parents' lineage) only when it ends, so a fit
    into it between a crash and --resume would check its budget against nothing, or
    against an earlier fit alone."""
    for crash, fitted_first in ((1, False), (3, False), (1, True)):  # checkpoint at step 2
        run = tmp_path / f"public{crash}{fitted_first}"
        if fitted_first:  # the folder's ledger then holds that fit, not the stage's lineage
            fit_attributes(world["private"], run, epsilon=1.0, seed=0)
        before = Ledger.load(run, missing_ok=True).to_json()
        _crash_at(monkeypatch, crash)
        with pytest.raises(KeyboardInterrupt):
            train_ldm(world["public"], world["ae"], run, tiny(), init=world["ldm"])
        monkeypatch.undo()
        assert (run / "checkpoint" / "state.json").is_file() == (crash == 3)
        with pytest.raises(DpsynthError, match="has not recorded its lineage in the ledger"):
            fit_attributes(world["private"], run, epsilon=2.0, seed=0)
        assert Ledger.load(run, missing_ok=True).to_json() == before


# ---------------------------------------------------------------- provenance


def test_no_run_file_holds_a_digest_of_the_private_data(world, tmp_path):
    """Regression: the cache's SHA-256 went into every ledger entry and into a DP
    autoencoder's model.json: a deterministic function of the private data."""
    private = Cache(world["private"])
    run = _dp_ae(world, tmp_path / "ae_scratch", init=False)
    fit_attributes(world["private"], run, epsilon=2.0, seed=0)
    digest = private.meta["content_digest"].removeprefix("sha256:")
    written = [p for p in run.rglob("*") if p.is_file() and "checkpoint" not in p.parts]
    assert len(written) >= 4
    for path in written:
        assert digest.encode() not in path.read_bytes(), path
    assert {e.cache_id for e in Ledger.load(run)} == {private.cache_id}
    meta = read_json(run / "model.json")
    sgd = [e.id for e in Ledger.load(run) if e.mechanism == "dp-sgd"]
    assert meta["trained_on"] == [
        {"cache_id": private.cache_id, "dp": True, "ledger_entry": sgd[0]}  # random, not a digest
    ]
    assert "data_fingerprint" not in meta


def test_dp_stage_refuses_a_parent_trained_without_dp_on_its_data(world, tmp_path):
    """Regression: a "public" autoencoder trained on the private cache ran silently."""
    leaky = train_autoencoder(world["private"], tmp_path / "leaky", tiny())
    with pytest.raises(DpsynthError, match=f"{leaky}: trained without DP on the private cache"):
        train_ldm(world["private"], leaky, tmp_path / "dp", tiny(**{"privacy.epsilon": 8.0}),
                  dp=True)  # fmt: skip
    with pytest.raises(DpsynthError, match=f"{leaky}: trained without DP"):
        train_autoencoder(world["private"], tmp_path / "ae_dp2", tiny(), init=leaky, dp=True)
    assert not (tmp_path / "dp" / "ledger.json").exists()
    assert not (tmp_path / "ae_dp2" / "ledger.json").exists()
    # A parent trained on public data, or with DP on this cache, is accepted (tests above).


def test_non_dp_stage_refuses_data_a_parent_trained_on_with_dp(world, tmp_path, capsys):
    """Regression: a non-DP LDM on the private cache of its DP autoencoder ran silently,
    recorded "private": false and a finite ε that covered only the autoencoder."""
    import shutil

    private = Cache(world["private"])
    ae = _dp_ae(world, tmp_path / "ae_dp")
    with pytest.raises(DpsynthError, match=f"{ae}: trained with DP on the private cache"):
        train_ldm(world["private"], ae, tmp_path / "ldm", tiny())
    with pytest.raises(DpsynthError, match=f"{ae}: trained with DP on the private cache"):
        train_autoencoder(world["private"], tmp_path / "ae2", tiny(), init=ae)
    assert not (tmp_path / "ldm").exists() and not (tmp_path / "ae2").exists()
    # A run made so before this check (or by hand): `budget` says it is not DP.
    old = tmp_path / "old"
    shutil.copytree(ae, old)
    meta = read_json(old / "model.json")
    meta["trained_on"].insert(0, {"cache_id": private.cache_id, "dp": False})
    (old / "model.json").write_text(json.dumps(meta))
    out = _budget_total(old, capsys)
    assert f"epsilon = inf: NOT DP\n  trained without DP on cache {private.cache_id}" in out
    assert "Total: epsilon = inf" in out and out.count("Total:") == 1  # no finite total
    assert main(["budget", str(old), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["epsilon"] is None and summary["not_dp"] == [private.cache_id]
    assert "NOT DP" not in _budget_total(ae, capsys)


def test_workflow_refuses_public_equal_to_private(world, tmp_path, capsys):
    """Regression: `workflow --public P --private P` pre-trained on private data silently."""
    private = world["private"]
    again = tmp_path / "again"  # the same data prepared again: a new id, the same digest
    prepare("ukbb", world["root"] / "ukbb_raw", again, seed=2, shape=SHAPE, spacing=SPACING,
            attributes_csv=world["root"] / "ukbb_raw" / "attributes.csv",
            split=(0.6, 0.2, 0.2))  # fmt: skip
    for public in (private, again):
        argv = ["workflow", "--public", str(public), "--private", str(private),
                "--out", str(tmp_path / "wf"), "--epsilon", "6"]  # fmt: skip
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert f"--public {public} and --private {private} hold the same data" in err
        assert err.count("\n") == 1
    assert not (tmp_path / "wf").exists()


def test_workflow_keeps_a_public_stage_only_if_it_learned_this_public_cache(
    world, tmp_path, capsys
):
    """A complete public stage left by an earlier --public was never checked against this
    run's private data: refused (one line, nothing trained), not kept."""
    out = tmp_path / "wf"
    shutil.copytree(world["ae"], out / "autoencoder")  # learned world["public"]
    other = tmp_path / "other"  # the public patients prepared again: another cache id
    raw = world["root"] / "acdc_raw"
    prepare("ukbb", raw, other, seed=1, shape=SHAPE, spacing=SPACING,
            attributes_csv=raw / "attributes.csv", split=(0.6, 0.2, 0.2))  # fmt: skip
    argv = ["workflow", "--public", str(other), "--private", str(world["private"]),
            "--out", str(out), "--epsilon", "6"]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"autoencoder: a complete stage trained on {Cache(world['public']).cache_id}" in err
    assert f"not --public {other}" in err and err.count("\n") == 1
    assert sorted(p.name for p in out.iterdir()) == ["autoencoder"]
    kept, _ = pretrain_public_models(world["public"], out, tiny(), ldm=False)  # its own cache
    assert kept == out / "autoencoder"
    meta = read_json(out / "autoencoder" / "model.json")  # a stage from before the field
    del meta["trained_on"]
    atomic_write_json(out / "autoencoder" / "model.json", meta)
    with pytest.raises(DpsynthError, match="a complete stage trained on data it does not name"):
        pretrain_public_models(world["public"], out, tiny(), ldm=False)
    shutil.rmtree(out / "autoencoder")
    shutil.copytree(world["ae"], out / "autoencoder")
    shutil.copytree(world["ldm"], out / "ldm")  # an LDM of another public cache
    meta = read_json(out / "ldm" / "model.json")
    meta["trained_on"] = [{"cache_id": "f00", "dp": False}]
    atomic_write_json(out / "ldm" / "model.json", meta)
    pretrain_public_models(world["public"], out, tiny(), ldm=False)  # not used: not checked
    with pytest.raises(DpsynthError, match="ldm: a complete stage trained on f00"):
        pretrain_public_models(world["public"], out, tiny())


def test_a_real_sweep_cell_samples_through_the_selector_check(world, tmp_path, monkeypatch):
    """The sweep's cell training and best-of-k sampling not stubbed (the world's public
    models kept, 8 volumes; referee and evaluation, tested elsewhere, stubbed): one ε = ∞
    cell's volumes went through `load_selector` against the private cache (the provenance
    records it), and its ledger names the private cache as a non-private use."""
    from dpsynth.app import demo, sweep

    out, public, private = tmp_path / "s", world["public"], world["private"]
    for stage in ("ae", "ldm"):  # they learned world["public"] alone: kept
        shutil.copytree(world[stage], out / "public" / {"ae": "autoencoder"}.get(stage, stage))
    monkeypatch.setattr(demo, "SELECTOR_EPOCHS", 2)
    monkeypatch.setattr(sweep, "N_SAMPLES", 8)
    monkeypatch.setattr(sweep, "train_demo_referee", lambda data, out: out.mkdir())
    monkeypatch.setattr(sweep, "evaluate", lambda real, synthetic, out, **kw: (
        out.mkdir(), atomic_write_json(out / "metrics.json", {"metrics": {}})))  # fmt: skip
    (row,) = sweep.run_sweep(out, public=public, private=private, epsilons="inf",
                             pretrain="on", config=tiny())  # fmt: skip
    provenance = read_json(out / "epsinf_pretrain_synthetic" / "provenance.json")
    selector = provenance["selector"]
    assert provenance["candidates"] == sweep.CANDIDATES > 1
    assert selector["cache_id"] == Cache(public).cache_id and selector["public"] is True
    assert selector["patients_checked_against"] == [Cache(private).cache_id]
    (entry,) = Ledger.load(out / "epsinf_pretrain")
    assert (entry.stage, entry.cache_id) == (sweep.NONPRIVATE_BASELINE, Cache(private).cache_id)
    assert row["epsilon_spent"] == float("inf") and row["steps"] > 0


# ---------------------------------------------------------------- outputs behind the ledger


def _grid_steps(run) -> list[int]:
    return sorted(int(p.stem.split("_")[1]) for p in (run / "samples").glob("*.png"))


def _files(run) -> dict[str, bytes]:
    files = [*(run / "checkpoint").iterdir(), run / "ledger.json", run / "config.yaml"]
    return {p.name: p.read_bytes() for p in files}


def test_dp_crash_leaves_no_grid_ahead_of_the_ledger_and_resume_refuses_a_new_plan(
    world, tmp_path, monkeypatch
):
    # A fixed σ (no ε target): more epochs keep σ, so only the plan's step count differs.
    grids = {"ldm_training.sample_every": 3, "ldm_training.checkpoint_every": 2}
    fixed = {"privacy.epsilon": None, "privacy.noise_multiplier": 1.0, **grids}

    def dp(epochs, resume=False):
        config = tiny(**{**fixed, "privacy.epochs": epochs})
        return train_ldm(world["private"], world["ae"], tmp_path / "dp", config,
                         init=world["ldm"], dp=True, resume=resume)  # fmt: skip

    _crash_at(monkeypatch, 4)  # a grid is due at 3, checkpoints at 2, 4, ...
    with pytest.raises(KeyboardInterrupt):
        dp(2.0)
    monkeypatch.undo()
    run = tmp_path / "dp"
    (entry,) = [e for e in Ledger.load(run) if e.mechanism == "dp-sgd"]
    planned = int(np.ceil(2.0 * _n_train(world) / 4))  # ceil(epochs / q)
    assert entry.steps == 2 and entry.planned_steps == planned
    assert all(step <= entry.steps for step in _grid_steps(run))

    before = _files(run)
    more = int(np.ceil(3.0 * _n_train(world) / 4))
    with pytest.raises(DpsynthError, match=f"planned_steps is {more} .* but {planned}"):
        dp(3.0, resume=True)
    # No step ran: weights, checkpoint ledger, ledger unchanged, and the config the run was
    # trained with kept (a refused config was written over it before).
    assert _files(run) == before

    dp(2.0, resume=True)
    (entry,) = [e for e in Ledger.load(run) if e.mechanism == "dp-sgd"]
    assert entry.steps == entry.planned_steps == planned
    assert _grid_steps(run)[-1] == planned


def test_resume_refuses_an_older_checkpoint_and_a_second_process(world, tmp_path, monkeypatch):
    """Regression: a resume from an older checkpoint (or two resumes at once) retrained the
    steps after it with fresh noise and landed on the ledger's count again, so the repeat
    was never charged; fit-attributes beside a running stage checked the budget without the
    steps the stage was still taking, and ignored the run's recorded budget."""
    import shutil

    from dpsynth.io import hold_run

    fixed = {"privacy.epsilon": None, "privacy.noise_multiplier": 1.0, "privacy.epochs": 2.0}
    run = tmp_path / "dp"
    q = 4 / _n_train(world)
    planned = int(np.ceil(2.0 / q))  # 5 or more: checkpoints at 2, 4, ...
    alone = epsilon_for([(1.0, q, planned)], 1e-5, "rdp")
    config = tiny(**{**fixed, "privacy.max_total_epsilon": alone + 0.1})

    def dp(resume=False):
        return train_ldm(world["private"], world["ae"], run, config, init=world["ldm"],
                         dp=True, resume=resume)  # fmt: skip

    _crash_at(monkeypatch, 3)
    with pytest.raises(KeyboardInterrupt):
        dp()
    monkeypatch.undo()
    shutil.copytree(run / "checkpoint", tmp_path / "old")
    # The run's recorded budget (σ fixed: ε alone + 0.1) has no room for an attribute model.
    with pytest.raises(BudgetExceededError, match="above --max-total-epsilon"):
        fit_attributes(world["private"], run, epsilon=2.0, seed=0)
    with hold_run(run):  # as another process training in this run
        for attempt in (
            lambda: dp(resume=True),
            lambda: fit_attributes(world["private"], run, 2.0),
        ):
            with pytest.raises(DpsynthError, match="another dpsynth process"):
                attempt()
    assert not (run / "attribute_model.json").exists()

    _crash_at(monkeypatch, 5)
    with pytest.raises(KeyboardInterrupt):
        dp(resume=True)
    monkeypatch.undo()
    (entry,) = Ledger.load(run)
    assert entry.steps == 4
    shutil.rmtree(run / "checkpoint")
    shutil.copytree(tmp_path / "old", run / "checkpoint")  # the checkpoint at step 2
    with pytest.raises(DpsynthError, match="holds 2 steps .* ledger records 4; resume from"):
        dp(resume=True)
    assert Ledger.load(run)[entry.id].steps == 4


def test_public_autoencoder_crash_leaves_no_grid_ahead_of_the_checkpoint(
    world, tmp_path, monkeypatch
):
    config = tiny(**{"autoencoder_training.steps": 6, "autoencoder_training.sample_every": 3})
    _crash_at(monkeypatch, 4)
    with pytest.raises(KeyboardInterrupt):
        train_autoencoder(world["public"], tmp_path / "ae", config)
    checkpoint_step = read_json(tmp_path / "ae" / "checkpoint" / "state.json")["step"]
    assert checkpoint_step == 2
    grids = _grid_steps(tmp_path / "ae") if (tmp_path / "ae" / "samples").exists() else []
    assert all(step <= checkpoint_step for step in grids)


def test_dp_non_finite_patient_gradients_are_zeroed_and_counted_in_metrics(
    world, tmp_path, monkeypatch
):
    """Every private latent is NaN: each sampled patient is dropped, updates stay finite."""
    from dpsynth.training.ldm import _DenoiserTask
    from dpsynth.training.trainer import PrivateStrategy

    original_records, original_patients = _DenoiserTask.patient_records, PrivateStrategy.patients
    sampled = []

    def nan_records(self, rows):
        record = original_records(self, rows)
        return {**record, "noisy": torch.full_like(record["noisy"], float("nan"))}

    def patients(self, step):
        idx = original_patients(self, step)
        sampled.append(len(idx))
        return idx

    monkeypatch.setattr(_DenoiserTask, "patient_records", nan_records)
    monkeypatch.setattr(PrivateStrategy, "patients", patients)
    run = _dp(world, tmp_path / "dp")
    weights = ckpt.load_weights(run / "denoiser.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())
    last = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert sum(sampled) > 0 and last["nonfinite_gradients"] == sum(sampled)


# ---------------------------------------------------------------- torchrun


def test_fit_attributes_refuses_torchrun(world, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    out = tmp_path / "attrs"
    code = main(["fit-attributes", "--data", str(world["private"]), "--dp", "--epsilon", "1",
                 "--out", str(out)])  # fmt: skip
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert "not under torchrun" in err and len(err.splitlines()) == 1
    assert not out.exists()


@pytest.mark.parametrize(
    "command",
    [
        lambda out: run_demo(out, fresh=False),
        lambda out: run_demo(out),
        pretrain_public,
        lambda out: run_sweep(out, epsilons="1"),
    ],
    ids=["demo --keep", "demo", "pretrain-demo", "sweep"],
)
def test_commands_that_chain_stages_refuse_torchrun_before_writing(command, tmp_path, monkeypatch):
    """Every rank would run the whole chain: simulate into the same folder, empty it (a
    fresh demo), fit its own DP attribute model. Refused by the Python API itself, before
    anything is written (the CLI refuses them too, below)."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "left.txt").write_text("an earlier run's file")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(DpsynthError, match="runs as one process, not under torchrun"):
        command(out)
    assert [p.name for p in out.iterdir()] == ["left.txt"]


@pytest.mark.parametrize(
    "meta",
    [{"downsample": 1}, {"downsample": 2}, {"downsample": 2, "trained": False}],
    ids=["full resolution", "constant lr", "untrained"],
)
def test_demo_keep_refuses_a_referee_of_an_earlier_recipe_before_any_work(meta, tmp_path):
    """A kept referee of an earlier recipe would read the new synthetic set on another
    FD-referee scale than the report's other runs: `demo --keep` refuses it first."""
    out = tmp_path / "demo"
    (out / "referee").mkdir(parents=True)
    (out / "referee" / "referee.json").write_text(json.dumps(meta))
    with pytest.raises(DpsynthError, match="an earlier recipe .*; run without --keep"):
        run_demo(out, fresh=False)
    assert [p.name for p in out.iterdir()] == ["referee"]


@pytest.mark.parametrize("command", ["simulate", "prepare", "evaluate", "release", "explore"])
def test_cli_refuses_torchrun_for_single_process_commands(command, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    argv = {"simulate": ["--out", str(tmp_path / "raw"), "--patients", "2"],
            "evaluate": ["--real", str(tmp_path), "--synthetic", str(tmp_path),
                         "--out", str(tmp_path / "eval")],
            "release": [str(tmp_path), "--synthetic", str(tmp_path), "--out", str(tmp_path / "b")],
            "prepare": ["--layout", "ukbb", "--src", str(tmp_path), "--out", str(tmp_path / "c")],
            "explore": [str(tmp_path)]}[command]  # fmt: skip
    assert main([command, *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {command}: runs as one process, not under torchrun")
    assert len(err.splitlines()) == 1 and list(tmp_path.iterdir()) == []


def test_cli_refuses_torchrun_for_every_command_off_the_allow_list(monkeypatch, capsys):
    """The refusal comes before any command runs, for every command but the allow-list's:
    each one's function is swapped for one that fails the test if it is ever called."""
    parser = build_parser()
    (subparsers,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    single = sorted(set(subparsers.choices) - set(MULTI_PROCESS_COMMANDS))
    assert {"demo", "sweep", "fit-attributes", "release"} <= set(single)  # never vacuous
    # Pinned: each allowed command has a multi-process test of its own (DP training,
    # sampling, the workflow); adding one to the list should fail here until it has one.
    assert set(MULTI_PROCESS_COMMANDS) == {"train-ldm", "train-autoencoder", "sample", "workflow"}
    monkeypatch.setenv("WORLD_SIZE", "2")

    def must_not_run(args: argparse.Namespace) -> None:
        pytest.fail(f"{args.command} ran under torchrun")

    for command in single:
        parsed = argparse.Namespace(command=command, func=must_not_run)
        monkeypatch.setattr(argparse.ArgumentParser, "parse_args", lambda *_, p=parsed: p)
        assert main([command]) == 2, command
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"error: {command}: runs as one process, not under torchrun"), err


def test_the_torchrun_allow_list_names_real_commands():
    parser = build_parser()
    (commands,) = [a.choices for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    assert set(MULTI_PROCESS_COMMANDS) < set(commands)


def test_workflow_under_torchrun_asks_for_the_public_stages_first(world, tmp_path, monkeypatch):
    """Its public stages are not DP, so they cannot run on several ranks; said plainly,
    before anything is written, rather than by the autoencoder's trainer."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(DpsynthError, match="run it once without torchrun"):
        run_workflow(world["public"], world["private"], tmp_path / "wf", tiny())
    assert not (tmp_path / "wf").exists()


def test_public_autoencoder_refuses_torchrun(world, tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(DpsynthError, match="supported for --dp runs only"):
        train_autoencoder(world["public"], tmp_path / "ae", tiny())
    assert not (tmp_path / "ae").exists()


def test_torchrun_two_processes_dp_autoencoder(world, tmp_path):
    """One DP job over two ranks: one ledger entry, the single-process plan, rank 0 writes."""
    import os
    import subprocess
    import sys

    config = tmp_path / "tiny.yaml"
    config.write_text(tiny(**{"privacy.epsilon": 4.0}).to_yaml())
    out = tmp_path / "ae_ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "--master-port", "29518", "-m", "dpsynth", "train-autoencoder",
           "--data", str(world["private"]), "--init", str(world["ae"]), "--out", str(out),
           "--config", str(config), "--dp"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    (entry,) = list(Ledger.load(out))
    assert entry.stage == "autoencoder-dp-sgd" and entry.records == _n_train(world)
    assert entry.sample_rate == pytest.approx(4 / entry.records)
    assert entry.steps == entry.planned_steps
    assert (out / "model.json").exists() and (out / "reconstruction.json").exists()
    notes = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert sum("label" in m for m in notes) == 1  # one job, not one per rank


def test_dp_autoencoder_resume_refuses_a_changed_latent_scale_mechanism(
    world, tmp_path, monkeypatch
):
    """The DP latent scale is charged when the stage opens and drawn at the end: a resume
    must draw it with the noise the ledger recorded, not with a new config's."""
    _crash_at(monkeypatch, 3)
    with pytest.raises(KeyboardInterrupt):
        _dp_ae(world, tmp_path / "ae", init=False)
    monkeypatch.undo()
    before = _files(tmp_path / "ae")
    with pytest.raises(DpsynthError, match="changed privacy plan: latent-scale is not recorded"):
        train_autoencoder(world["private"], tmp_path / "ae",
                          tiny(**{"privacy.epsilon": 4.0, "privacy.latent_scale_epsilon": 3.0}),
                          dp=True, resume=True)  # fmt: skip
    assert _files(tmp_path / "ae") == before
