"""Fidelity of the DP attribute model on a prepared cache, over several noise draws.

For each draw: fit at ε on the train split, sample as many patients, and compare with the
real table (std ratio, KS, invented missingness per attribute; largest correlation gap).
Prints the mean over draws. The demo's private cache is `runs/demo/data/ukbb_cache`.

    .venv/bin/python benchmarks/bench_attribute_model.py --data runs/demo/data/ukbb_cache \\
        --epsilon 2 --draws 5
"""

from __future__ import annotations

import argparse

import numpy as np

from dpsynth.attributes import ATTRIBUTES
from dpsynth.data.cache import Cache
from dpsynth.privacy.attribute_model import attribute_fidelity, fit_attribute_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--epsilon", type=float, default=2.0)
    parser.add_argument("--draws", type=int, default=5)
    args = parser.parse_args()

    cache = Cache(args.data)
    rows = cache.volume_indices("train")
    table, patients = cache.attributes[rows], cache.patients[rows]
    fids = []
    for seed in range(args.draws):
        rng = np.random.default_rng(seed)
        model, _ = fit_attribute_model(table, epsilon=args.epsilon, patients=patients, rng=rng)
        fids.append(attribute_fidelity(table, model.sample(len(rows) // 2, rng)))

    print(f"{args.data}: {len(rows) // 2} patients, ε = {args.epsilon:g}, {args.draws} draws")
    print(f"{'attribute':<12}{'std syn/real':>14}{'KS':>8}{'missing real→syn':>20}")
    for name in ATTRIBUTES:
        per = [f["attributes"][name] for f in fids]
        ratio = np.mean([a["std_synthetic"] / max(a["std_real"], 1e-12) for a in per])
        ks = np.mean([a["ks"] for a in per])
        miss = (
            np.mean([a["missing_real"] for a in per]),
            np.mean([a["missing_synthetic"] for a in per]),
        )
        print(f"{name:<12}{ratio:>14.2f}{ks:>8.3f}{miss[0]:>12.3f} → {miss[1]:.3f}")
    gap = np.mean([f["max_abs_correlation_difference"] for f in fids])
    print(f"largest |correlation difference| (mean over draws): {gap:.2f}")


if __name__ == "__main__":
    main()
