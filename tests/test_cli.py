"""The command line: one-line errors with exit 2, JSON outputs with the documented keys."""

from __future__ import annotations

import json
import math

import pytest

from dpsynth.app.cli import main
from dpsynth.app.sweep import format_table, parse_epsilons, pretrain_ratio, write_table


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
         "fd_referee": 1.0, "ms_ssim": 0.3, "lv_volume_r": 0.9, "esed_accuracy": 0.9, "mia_auc": 0.5},
        {"cell": "b", "epsilon_target": 10.0, "epsilon_spent": 9.9, "pretrain": False, "frd": 7.0,
         "fd_referee": 3.0, "ms_ssim": 0.2, "lv_volume_r": None, "esed_accuracy": 0.6, "mia_auc": 0.51},
    ]  # fmt: skip
    assert pretrain_ratio(rows, 10.0) == pytest.approx(3.5)
    assert pretrain_ratio(rows, 10.0, "fd_referee") == pytest.approx(3.0)
    table = format_table(rows)
    assert "FRD 3.50×" in table and "FD-referee 3.00×" in table and table.count("\n|") == 3
    md = tmp_path / "B.md"
    md.write_text("# B\n")
    write_table(md, table)
    write_table(md, table)  # replaces its own section instead of appending again
    assert md.read_text().count("sweep-table:start") == 1
    assert parse_epsilons("1, 10,inf") == [1.0, 10.0, math.inf]
