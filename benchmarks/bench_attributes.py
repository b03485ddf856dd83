"""ANGLE and DEPTH of simulated cohorts under the signed definitions, and the in-plane turn's cost.

    .venv/bin/python benchmarks/bench_attributes.py --patients 200

Per cohort: the measured ANGLE and DEPTH ranges (they must sit inside the study's grid,
ANGLE about -45..45, DEPTH about 7..13, far from the wrap at +-180), and requested vs
measured agreement (the simulator must still draw the heart it was asked for). Then the
time `prepare` spends turning one oblique UK-Biobank-sized volume (13 x 208 x 180) into
the canonical orientation.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import shlex
import sys
import time

import numpy as np

from dpsynth.data.prepare import to_canonical
from dpsynth.data.simulate import simulate_patient
from dpsynth.orientation import array_affine


def _turned_affine(degrees: float, spacing) -> np.ndarray:
    """The canonical affine with its in-plane axes turned about the slice normal."""
    t = np.radians(degrees)
    turn = np.eye(4)
    turn[:2, :2] = [[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]]
    return array_affine(spacing) @ turn


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, default=200)
    args = parser.parse_args()
    print(f"machine: {platform.node()}, Python {platform.python_version()}")
    print(f"date:    {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}")
    print(f"command: {shlex.join([sys.executable, *sys.argv])}")
    for cohort in ("ukbb", "acdc"):
        wanted, got, depth_wanted, depth_got = [], [], [], []
        for seed in range(args.patients):
            p = simulate_patient(seed, cohort, (13, 96, 96))
            wanted.append(p.targets["ANGLE"])
            got.append(p.attributes["ANGLE"])
            depth_wanted.append(p.targets["DEPTH"])
            depth_got.append(p.attributes["DEPTH"])
        wanted, got = np.array(wanted), np.array(got)
        depth_wanted, depth_got = np.array(depth_wanted), np.array(depth_got)
        r = np.corrcoef(wanted, got)[0, 1]
        print(
            f"{cohort}: ANGLE measured {got.min():.1f} .. {got.max():.1f} "
            f"(mean {got.mean():.1f}, sd {got.std():.1f}); requested vs measured r {r:.3f}, "
            f"MAE {np.abs(wanted - got).mean():.2f} deg | DEPTH (ED) {depth_got.min():.0f} .. "
            f"{depth_got.max():.0f}, equal to the requested in "
            f"{np.mean(depth_wanted == depth_got):.0%}"
        )
    spacing = (10.0, 1.8269, 1.8269)
    rng = np.random.default_rng(0)
    image = rng.random((13, 208, 180), dtype=np.float32)
    mask = (image > 0.9).astype(np.uint8)
    for label, degrees in (("transposed/flipped (exact)", 90.0), ("oblique 33 deg", 33.0)):
        affine = _turned_affine(degrees, spacing)
        times = []
        for _ in range(5):
            start = time.perf_counter()
            to_canonical(image, mask, affine, spacing)
            times.append(time.perf_counter() - start)
        print(f"in-plane turn, {label}: median {1000 * np.median(times):.0f} ms per volume")


if __name__ == "__main__":
    main()
