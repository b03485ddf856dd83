"""One-run privacy audit: ε_lb against the accounted ε, shipped engine and broken engines.

For each accounted ε (σ recalibrated on the demo's q and steps; "demo" is the demo's own
recipe, ε ≈ 8) runs `--seeds` audits of the shipped engine and one audit of each
deliberately broken engine, and prints ε_lb (Gaussian and Steinke et al.) per run, the
largest ε_lb / ε over seeds and how many seeds exceeded ε (a 95 % bound may, rarely).

    .venv/bin/python benchmarks/bench_one_run_audit.py --epsilons demo 2 1 --seeds 5
"""

from __future__ import annotations

import argparse
import time

from dpsynth.app.demo import demo_dp_recipe
from dpsynth.privacy import one_run_audit as ora


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epsilons", nargs="+", default=["demo", "2", "1"])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--canaries", type=int, default=ora.DEFAULT_CANARIES)
    parser.add_argument("--public-patients", type=int, default=None)
    parser.add_argument("--no-broken", action="store_true")
    args = parser.parse_args()

    demo = demo_dp_recipe()
    for name in args.epsilons:
        recipe = demo if name == "demo" else ora.recalibrate(demo, float(name))
        engines = [None] * args.seeds + ([] if args.no_broken else list(ora.BROKEN_ENGINES))
        seeds = list(range(args.seeds)) + [0] * (len(engines) - args.seeds)
        ratios, exceed = [], 0
        print(
            f"\naccounted ε {recipe.epsilon:.3f} (σ {recipe.noise_multiplier:.4g}, "
            f"q {recipe.sample_rate:.4g}, {recipe.steps} steps), {args.canaries} canaries"
        )
        for broken, seed in zip(engines, seeds, strict=True):
            t = time.perf_counter()
            r = ora.run_canary_audit(
                recipe,
                canaries=args.canaries,
                seed=seed,
                broken=broken,
                public_patients=args.public_patients,
            )
            g = r["gaussian"]
            print(
                f"  {r['engine']:<28} seed {seed}: ε_lb {r['epsilon_lb']:.3f} "
                f"(ratio {r['ratio']:.2f}; μ̂ {g['mu_hat']:.3f}, correct engine "
                f"{g['mu_expected_correct_engine']:.3f}), Steinke {r['epsilon_lb_steinke']:.3f}"
                f"  [{time.perf_counter() - t:.1f} s]"
            )
            if broken is None:
                ratios.append(r["ratio"])
                exceed += r["exceeds_accounted"]
        if ratios:
            print(
                f"  shipped engine: ε_lb/ε median {sorted(ratios)[len(ratios) // 2]:.2f}, "
                f"max {max(ratios):.2f}; {exceed} of {len(ratios)} seeds exceeded ε"
            )


if __name__ == "__main__":
    main()
