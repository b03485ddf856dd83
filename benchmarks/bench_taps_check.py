"""What one check of the DP engine's layer taps costs, against one chunk's DP step.

A check compares the taps with per-patient autograd in eval mode and, for a model in train
mode, runs the taps again with each probe patient's record changed in turn (the
independence test). It runs once per run on the demo denoiser (more where rare parameters
need their own check). Reported: CPU seconds (process time, steadier than wall time on a
shared machine), medians of interleaved repeats, and the ratios to a chunk's step.

    python benchmarks/bench_taps_check.py --preset demo --batch 32 [--out results.json]
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time

import torch
from bench_dp_step import PRESETS, Setup, machine, patient_loss

from dpsynth.io import atomic_write_json


def cpu_seconds(fn) -> float:
    start = time.process_time()
    fn()
    return time.process_time() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=PRESETS, default="demo")
    parser.add_argument("--batch", type=int, default=32, help="volumes per chunk (2 per patient)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", help="also write the results as JSON here")
    args = parser.parse_args()
    setup = Setup(args.preset, args.batch, "cpu", None)
    engine, model = setup.engine, setup.model
    setup.dp_step()  # builds the taps and runs the first check
    taps, probe = engine._taps, torch.arange(3)

    def check(train: bool) -> None:
        model.train(train)
        engine._check(setup.batch, patient_loss, probe)
        model.train()
        engine._taps = taps  # a check that fails turns the taps off: keep measuring them

    rows = [
        (
            cpu_seconds(lambda: engine._set_grad_samples(setup.batch, patient_loss)),
            cpu_seconds(lambda: check(True)),
            cpu_seconds(lambda: check(False)),
        )
        for _ in range(args.repeats)
    ]
    step, train_check, eval_check = (statistics.median(r[i] for r in rows) for i in range(3))
    results = {
        "machine": machine("cpu"),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([sys.executable.rsplit("/", 1)[-1], *sys.argv]),
        "preset": args.preset,
        "patients_per_chunk": args.batch // 2,
        "chunk_step_cpu_s": step,
        "check_train_mode_cpu_s": train_check,
        "check_eval_only_cpu_s": eval_check,
        "check_over_step_train_mode": train_check / step,
        "check_over_step_eval_only": eval_check / step,
    }
    print(json.dumps(results, indent=2))
    if args.out:
        atomic_write_json(args.out, results)


if __name__ == "__main__":
    main()
