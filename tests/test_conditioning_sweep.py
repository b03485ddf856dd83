"""benchmarks/bench_conditioning_sweep.py: each sweep changes only what it names."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

from dpsynth.attributes import INDEX, N_ATTRIBUTES

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_conditioning_sweep.py"


def _module():
    spec = importlib.util.spec_from_file_location("bench_conditioning_sweep", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_sweeps_change_one_thing_and_hold_the_ejection_fraction():
    sweep = _module()
    base = np.arange(1.0, N_ATTRIBUTES + 1.0, dtype=np.float32)
    base[INDEX["LVEF"]] = 60.0
    grid = sweep.settings(base)
    assert len(grid) == 2 * len(sweep.LVEDV_LEVELS) + 4 + 2 + 2
    for name, attribute, level, row in grid:
        changed = {a for a, i in INDEX.items() if row[i] != base[i]}
        assert row[INDEX[attribute]] == level
        if name == "LVEDV, EF held":
            assert changed <= {"LVEDV", "LVESV"}
            assert np.isclose(row[INDEX["LVESV"]], 0.4 * level)  # EF 60 % kept
        else:
            assert changed <= {attribute}
