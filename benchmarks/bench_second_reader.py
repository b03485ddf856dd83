"""Controllability of a finished demo under the referee and under the independent second reader.

Issue 12 section 3: per-phase r >= 0.7 and MAE <= 20 % of the mean requested value under a
2D U-Net that never saw synthetic or blurred data. The second reader costs more than the
demo's time budget leaves, so it runs here, on an existing demo folder (read only):

    .venv/bin/python benchmarks/bench_second_reader.py --demo runs/demo --out runs/reader
    .venv/bin/python benchmarks/bench_second_reader.py --demo runs/demo --out runs/reader \\
        --reader runs/reader/second_reader                # reuse a trained reader

It trains the second reader on the demo's private cache (train split) unless `--reader` is
given, then runs `evaluate(metrics=("controllability",))` with the demo's referee and the
second reader on the demo's synthetic set against the cache's test split. OUT/eval holds
metrics.json and both readers' CSV files: evaluation only, never release.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from dpsynth.evaluation.controllability import PER_PHASE, POOLED
from dpsynth.evaluation.evaluate import evaluate
from dpsynth.evaluation.second_reader import SecondReader, train_second_reader

R_TARGET, MAE_PCT_TARGET = 0.7, 20.0


def _line(name: str, s: dict) -> str:
    def f(x, spec=".3f"):
        return "—" if x is None else format(x, spec)

    return (
        f"{name:>11}  r {f(s.get('r'))}  MAE {f(s.get('mae'), '.2f')} ({f(s.get('mae_pct'), '.1f')} %)"
        f"  slope {f(s.get('slope'), '.2f')}"
        f"   real: r {f(s.get('ceiling_r'))}  MAE {f(s.get('ceiling_mae'), '.2f')} "
        f"({f(s.get('ceiling_mae_pct'), '.1f')} %)  n {s.get('n')}/{s.get('ceiling_n')}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo", type=Path, required=True, help="a finished `make demo` folder")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--reader", type=Path, help="a trained second reader (skip training)")
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args()
    cache = args.demo / "data" / "ukbb_cache"
    timings = {}
    reader = args.reader
    if reader is None:
        start = time.perf_counter()
        reader = train_second_reader(cache, args.out / "second_reader", epochs=args.epochs)
        timings["train second reader"] = time.perf_counter() - start
    start = time.perf_counter()
    result = evaluate(
        cache,
        args.demo / "synthetic",
        args.out / "eval",
        metrics=("controllability",),
        referee=args.demo / "referee",
        second_reader=SecondReader.load(reader),
    )
    timings["evaluate (both readers)"] = time.perf_counter() - start
    tables = {
        "referee": result["controllability"],
        "second reader": result["controllability_second_reader"]["attributes"],
    }
    for label, table in tables.items():
        print(f"\n{label}: synthetic (requested vs measured) and real test volumes (ceiling)")
        for name in (*PER_PHASE, *POOLED):
            if name in table:
                print(_line(name, table[name]))
    second = tables["second reader"]
    met = [
        n
        for n in PER_PHASE[:4]
        if n in second
        and (second[n]["r"] or 0) >= R_TARGET
        and (second[n]["mae_pct"] or 1e9) <= MAE_PCT_TARGET
    ]
    print(
        f"\nper-phase volumes meeting r >= {R_TARGET} and MAE <= {MAE_PCT_TARGET:g} % under "
        f"the second reader: {len(met)} of 4 {met}"
    )
    for name, seconds in timings.items():
        print(f"{name}: {seconds:.1f} s")
    print(f"results: {args.out / 'eval' / 'metrics.json'} (evaluation only, never release)")


if __name__ == "__main__":
    main()
