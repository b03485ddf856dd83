"""Utility of a finished demo's synthetic volumes over several training seeds: TSTR vs TRTR.

`dpsynth evaluate` trains the utility net once (seed 0). How much of a TSTR/TRTR gap is
the seed, and how much is the data, needs several seeds side by side:

    .venv/bin/python benchmarks/bench_utility.py --demo runs/demo --seeds 0,1,2

Reads the demo's private cache (train split for TRTR, test split to score) and its
synthetic set; prints scores only and writes nothing (evaluation only).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from dpsynth.data.volumes import load_volume_set
from dpsynth.evaluation.utility import evaluate_utility


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo", type=Path, required=True, help="a finished `make demo` folder")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated training seeds")
    args = parser.parse_args()
    cache = args.demo / "data" / "ukbb_cache"
    train, test = load_volume_set(cache, "train"), load_volume_set(cache, "test")
    synthetic = load_volume_set(args.demo / "synthetic", None)
    scores: dict[str, list[dict]] = {"TSTR": [], "TRTR": []}
    for seed in (int(s) for s in args.seeds.split(",")):
        start = time.perf_counter()
        result = evaluate_utility(synthetic, test, train, seed=seed)
        print(f"seed {seed}: {time.perf_counter() - start:.1f} s")
        scores["TSTR"].append(result.tstr)
        scores["TRTR"].append(result.trtr)
    for name, runs in scores.items():
        print(f"{name} (n_train {runs[0]['n_train']}, n_test {runs[0]['n_test']}):")
        for key in runs[0]:
            if key not in ("n_train", "n_test"):
                values = np.array([r[key] for r in runs])
                print(f"  {key:>18}  {' '.join(f'{v:.2f}' for v in values)}"
                      f"   mean {values.mean():.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
