"""Wall time of `evaluate` (FRD + FD-referee + MS-SSIM) on N synthetic vs N real volumes.

Target (BRIEF section 6 / issue 5): 200 vs 200 volumes at 13x96x96 in <= 5 min on 2 CPU
cores, everything but referee training included (an untrained referee is used; its
forward cost is the same). The FRD feature cache starts cold, so real-set radiomics count.

    .venv/bin/python benchmarks/bench_evaluate.py --n 40     # quick, extrapolated
    .venv/bin/python benchmarks/bench_evaluate.py --n 200    # the target
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np
from scipy.ndimage import gaussian_filter

from dpsynth.data.volumes import VolumeSet
from dpsynth.evaluation.evaluate import evaluate
from dpsynth.evaluation.frd import FRDConfig
from dpsynth.evaluation.referee import Referee

SHAPE = (13, 96, 96)
SPACING = (10.0, 1.8269, 1.8269)
TARGET_N, TARGET_S = 200, 300.0


def phantom_set(n: int, seed: int) -> VolumeSet:
    """Smoothed noise with a bright disk of random radius per slice: texture + structure."""
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[: SHAPE[1], : SHAPE[2]]
    volumes = gaussian_filter(rng.random((n, *SHAPE), dtype=np.float32), (0, 0, 2, 2))
    radius = rng.uniform(8, 20, (n, SHAPE[0], 1, 1))
    disk = np.hypot(rows - 48, cols - 44) < radius
    volumes = np.clip(0.6 * disk + (volumes - 0.5) * 3 + 0.3, 0, 1).astype(np.float32)
    return VolumeSet(
        volumes=volumes,
        attributes=np.full((n, 14), np.nan, np.float32),
        spacing=SPACING,
        names=[f"v{i:04d}" for i in range(n)],
        source=f"phantoms(seed={seed})",
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=TARGET_N, help="volumes per set")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    real, synthetic = phantom_set(args.n, 0), phantom_set(args.n, 1)
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        result = evaluate(
            real,
            synthetic,
            f"{tmp}/out",
            metrics=("frd", "fd_referee", "ms_ssim"),
            referee=Referee.create(),
            frd_config=FRDConfig(num_workers=args.workers),
            cache_dir=f"{tmp}/cache",
        )
        elapsed = time.perf_counter() - start
    per_volume = elapsed / (2 * args.n)
    print(f"{args.n} vs {args.n} volumes at {SHAPE}: {elapsed:.1f} s ({per_volume:.3f} s/volume)")
    for name, entry in result["metrics"].items():
        print(f"  {name}: {entry['value']:.4g} (baseline {entry['baseline']:.4g})")
    projected = per_volume * 2 * TARGET_N
    verdict = "meets" if projected <= TARGET_S else "MISSES"
    print(
        f"projected {TARGET_N} vs {TARGET_N}: {projected:.0f} s; {verdict} the {TARGET_S:.0f} s target"
    )


if __name__ == "__main__":
    main()
