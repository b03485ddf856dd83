"""Data loading throughput from a prepared cache (target, BRIEF section 6: >= 2000 volumes/s).

Builds a synthetic cache of random volumes with the real writer, then reads one shuffled
epoch per configuration: per-item loading (the default DataLoader collate) and the
batched fast path (``VolumeDataset.loader``: one sorted memmap read per batch), each with
0 and 2 workers. Reported: volumes/s, median of the repeats. The cache is read through
the page cache (warm): this measures the loader, not the disk.

    python benchmarks/bench_loading.py [--volumes 4000] [--batch 64] [--repeats 3] [--out results.json]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from dpsynth.data.cache import Cache, CacheWriter, VolumeDataset
from dpsynth.data.prepare import assign_splits
from dpsynth.io import atomic_write_json

SHAPE = (13, 96, 96)


def build_cache(path: Path, n_volumes: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    path.mkdir()
    n_patients = n_volumes // 2
    writer = CacheWriter(path, capacity=2 * n_patients, shape=SHAPE)
    attributes = np.full((2, 14), np.nan, dtype=np.float32)
    for p in range(n_patients):
        writer.add_patient(f"{p:06d}", rng.random((2, *SHAPE), dtype=np.float32), None, attributes)
    ids = writer.patients
    writer.finish(assign_splits(ids, (1.0, 0.0, 0.0), seed), spacing=(10.0, 1.8269, 1.8269))


def epoch_rate(loader, n_volumes: int) -> float:
    start = time.perf_counter()
    seen = 0
    for batch in loader:
        seen += batch["image"].shape[0]
    assert seen == n_volumes
    return seen / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--volumes", type=int, default=4000)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, help="also write the results as JSON")
    args = parser.parse_args()

    torch.set_num_threads(1)
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench-loading-") as tmp:
        path = Path(tmp) / "cache"
        start = time.perf_counter()
        build_cache(path, args.volumes)
        build_s = time.perf_counter() - start
        dataset = VolumeDataset(Cache(path), "train")
        for workers in (0, 2):
            loaders = {
                "per-item": torch.utils.data.DataLoader(
                    dataset, batch_size=args.batch, shuffle=True, num_workers=workers
                ),
                "batched": dataset.loader(args.batch, shuffle=True, num_workers=workers),
            }
            for name, loader in loaders.items():
                rates = [epoch_rate(loader, len(dataset)) for _ in range(args.repeats)]
                results[f"{name}, {workers} workers"] = statistics.median(rates)

    print(
        f"machine: {platform.node()} {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}"
    )
    print(f"date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}")
    print(f"command: {shlex.join([sys.executable, *sys.argv])}")
    print(
        f"cache: {args.volumes} volumes x {SHAPE} float16 "
        f"({args.volumes * np.prod(SHAPE) * 2 / 2**30:.2f} GiB), written in {build_s:.1f} s"
    )
    for name, rate in results.items():
        print(f"{name:>22}: {rate:8.0f} volumes/s (batch {args.batch}, median of {args.repeats})")
    if args.out:
        atomic_write_json(
            args.out,
            {
                "volumes": args.volumes,
                "batch": args.batch,
                "shape": SHAPE,
                "volumes_per_s": results,
            },
        )


if __name__ == "__main__":
    main()
