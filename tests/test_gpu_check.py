"""benchmarks/gpu_check.py: its --smoke run exercises every section on CPU and writes one JSON."""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"
SECTIONS = ("autoencoder_throughput", "denoiser_throughput", "dp_step", "dp_finetune", "sampling")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check") / "check.json"
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke", "--device", "cpu", "--out", str(out)],
        capture_output=True, text=True, timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.slow
def test_smoke_json_names_the_machine_and_the_command(smoke):
    assert smoke["card"] == "cpu" and smoke["cuda"] == torch.version.cuda
    assert smoke["torch"] == torch.__version__
    assert datetime.datetime.fromisoformat(smoke["date"]).tzinfo is not None
    assert "gpu_check.py --smoke --device cpu --out " in smoke["command"]
    assert smoke["smoke"] is True and smoke["total_s"] > 0
    for name in SECTIONS:
        assert "error" not in smoke[name], smoke[name]
        assert smoke[name]["wall_s"] > 0


@pytest.mark.slow
def test_smoke_figures_are_positive_and_bf16_is_skipped_on_cpu(smoke):
    for name in ("autoencoder_throughput", "denoiser_throughput"):
        section = smoke[name]
        assert section["parameters"] > 0 and section["fp32"]["volumes_per_s"] > 0
        assert section["fp32"]["steps"] == 2
        assert "CUDA only" in section["bf16"]["skipped"]
    (row,) = smoke["dp_step"]["batches"]
    assert row["volumes_per_step"] == 4
    for key in ("plain_step_s_median", "dp_step_s_median", "time_ratio",
                "plain_step_peak_mib", "dp_step_peak_mib", "memory_ratio"):  # fmt: skip
        assert row[key] > 0, key
    assert row["time_ratio"] == pytest.approx(row["dp_step_s_median"] / row["plain_step_s_median"])
    assert "VmHWM" in smoke["dp_step"]["memory_method"]
    tune = smoke["dp_finetune"]
    assert tune["steps"] == 3 and not tune["capped"] and tune["epsilon_spent"] > 0
    sampling = smoke["sampling"]
    assert sampling["volumes"] == 2 and sampling["seconds_per_volume"] > 0


def test_a_failing_section_is_recorded_and_the_check_goes_on(monkeypatch):
    monkeypatch.syspath_prepend(str(SCRIPT.parent))
    import gpu_check

    result = gpu_check.run_section(lambda: 1 / 0, torch.device("cpu"))
    assert result["error"] == "ZeroDivisionError: division by zero" and result["wall_s"] >= 0
