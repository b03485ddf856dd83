"""Phantom simulator throughput: patients/s writing the ukbb_cardiac layout.

    .venv/bin/python benchmarks/bench_simulate.py --patients 200 --workers 2

Target (BRIEF section 6): 1000 patients at 13x96x96 in <= 60 s on 2 cores.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import resource
import shlex
import sys
import tempfile
import time
from pathlib import Path

from dpsynth.data.simulate import simulate_cohort


def _cpu_seconds() -> float:
    """User + system CPU time of this process and its (finished) worker processes."""
    own, kids = (
        resource.getrusage(resource.RUSAGE_SELF),
        resource.getrusage(resource.RUSAGE_CHILDREN),
    )
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, default=200)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--cohort", choices=("ukbb", "acdc"), default="ukbb")
    parser.add_argument("--shape", default="13,96,96", help="slices,H,W")
    args = parser.parse_args()
    shape = tuple(int(s) for s in args.shape.split(","))

    with tempfile.TemporaryDirectory() as tmp:
        start, cpu_start = time.perf_counter(), _cpu_seconds()
        simulate_cohort(
            Path(tmp) / "sim", args.patients, args.cohort, 0, shape, workers=args.workers
        )
        elapsed, cpu = time.perf_counter() - start, _cpu_seconds() - cpu_start
    rate = args.patients / elapsed
    print(
        f"machine: {platform.node()} {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs visible, Python {platform.python_version()}"
    )
    print(f"date:    {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}")
    print(f"command: {shlex.join([sys.executable, *sys.argv])}")
    print(
        f"result:  {args.patients} {args.cohort} patients at {args.shape}, {args.workers} workers: "
        f"{elapsed:.1f} s, {rate:.1f} patients/s -> 1000 patients in ~{1000 / rate:.0f} s "
        f"(target <= 60 s)"
    )
    # On a shared machine wall time includes other users' load; CPU time does not.
    print(
        f"cpu:     {cpu:.1f} CPU-s = {1000 * cpu / args.patients:.1f} ms per patient -> "
        f"1000 patients ~{cpu / args.patients * 1000 / args.workers:.0f} s on {args.workers} idle cores"
    )
    print(f"load:    {os.getloadavg()[0]:.1f} (1-min load average at the end)")


if __name__ == "__main__":
    main()
