"""The config schema refuses bad input up front with one line naming the key."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import yaml

import dpsynth
from dpsynth.config import (
    PRESETS,
    check_sampling,
    check_seed,
    config_from_dict,
    load_config,
    read_run_config,
)
from dpsynth.errors import DpsynthError


@pytest.mark.parametrize("preset", PRESETS)
def test_presets_validate(preset):
    config = load_config(preset)
    assert config_from_dict(config.to_dict()) == config


def test_paper_preset_has_the_studys_sizes():
    c = load_config("paper")
    assert c.data.shape == (13, 96, 96)
    assert c.denoiser.channels == 128 and c.denoiser.channel_multipliers == (1, 2, 3)
    assert c.denoiser.attention_levels == (False, True, True)
    assert (c.diffusion.timesteps, c.diffusion.beta_start, c.diffusion.beta_end) == (
        150,
        1e-4,
        7e-2,
    )
    assert (c.privacy.delta, c.privacy.max_grad_norm, c.privacy.batch_size) == (1e-5, 1.0, 256)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"ldm_training.lrr": 1.0}, "unknown key 'ldm_training.lrr'"),
        ({"nonsense.x": 1}, "unknown key 'nonsense'"),
        ({"ldm_training.lr": "fast"}, "ldm_training.lr: expected a number"),
        ({"ldm_training.steps": 1.5}, "ldm_training.steps: expected an integer"),
        ({"autoencoder.kind": "gan"}, "autoencoder.kind"),
        ({"data.shape": [13, 90, 96]}, "data.shape: in-plane size 90x96 is not divisible"),
        ({"data.shape": [13, 96]}, "data.shape: expected 3 values"),
        ({"privacy.delta": 1.5}, "privacy.delta: must be in (0, 1)"),
        ({"privacy.epsilon": -1}, "privacy.epsilon: must be > 0"),
        ({"privacy.max_grad_norm": 0}, "privacy.max_grad_norm: must be > 0"),
        ({"denoiser.attention_levels": [True]}, "denoiser.attention_levels"),
        ({"sampling.steps": 500}, "sampling.steps: must be <= diffusion.timesteps"),
        ({"sampling.temperature": 0}, "sampling.temperature: must be in (0, 1]"),
        ({"sampling.temperature": 1.5}, "sampling.temperature: must be in (0, 1]"),
        ({"training.bf16": "yes"}, "unknown key 'training'"),
        ({"ldm_training.bf16": "yes"}, "ldm_training.bf16: expected true or false"),
    ],
)
def test_bad_values_name_the_key(overrides, message):
    with pytest.raises(DpsynthError) as err:
        load_config("paper", overrides=overrides)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_a_retired_key_is_read_as_absent():
    """Older runs' configs carry `sampling.batch_size`, which nothing ever read."""
    c = config_from_dict({"sampling": {"batch_size": 16, "steps": 20}})
    assert c.sampling.steps == 20 and "batch_size" not in c.to_dict()["sampling"]
    with pytest.raises(DpsynthError, match="unknown key 'sampling.batch'"):
        config_from_dict({"sampling": {"batch": 16}})


def test_a_run_saved_before_the_key_was_retired_still_loads(tmp_path):
    assets = Path(dpsynth.__file__).parent / "assets" / "demo"
    for run in (assets / "autoencoder", assets / "ldm"):  # whatever they carry today
        assert read_run_config(run).sampling.steps >= 1
    old = load_config("demo").to_dict()
    old["sampling"]["batch_size"] = 16  # as every run saved before it was retired
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(old))
    assert read_run_config(tmp_path).sampling == load_config("demo").sampling


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"guidance": True}, "guidance: must be finite and >= 0, got True"),
        ({"guidance": "3"}, "guidance: must be finite and >= 0, got '3'"),
        ({"temperature": True}, r"temperature: must be in \(0, 1\], got True"),
        ({"temperature": float("nan")}, r"temperature: must be in \(0, 1\], got nan"),
    ],
)
def test_sampling_bounds_refuse_what_is_not_a_number(kwargs, message):
    with pytest.raises(DpsynthError, match=message):
        check_sampling(**kwargs)
    check_sampling(guidance=3, temperature=np.float32(0.8))  # numpy numbers are numbers
    check_seed(np.uint64(2**64 - 1))
    with pytest.raises(DpsynthError, match="seed: expected an integer"):
        check_seed(True)


def test_yaml_file_overrides_preset_and_accepts_yaml11_floats(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("ldm_training:\n  lr: 1e-4\nprivacy:\n  epsilon: inf\n")
    c = load_config("demo", path=path)
    assert c.ldm_training.lr == pytest.approx(1e-4)
    assert math.isinf(c.privacy.epsilon)
    assert c.data.shape == load_config("demo").data.shape


def test_unreadable_yaml_is_one_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("a: [1, 2\n")
    with pytest.raises(DpsynthError, match="bad.yaml: not valid YAML"):
        load_config(path=path)
    with pytest.raises(DpsynthError, match="config file not found"):
        load_config(path=tmp_path / "missing.yaml")
