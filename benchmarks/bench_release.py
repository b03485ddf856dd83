"""Wall time of `dpsynth release` and `dpsynth verify` at the demo's size.

The demo's last stage writes `runs/demo/release/` from its DP run and 120 synthetic
volumes; it must cost seconds within the `make demo` budget. This builds a stand-in run
(the shipped public demo LDM, a two-entry ledger) and 120 volumes of its shape, then times
release + verify (the report runs verify too). Volumes are smoothed noise, which compresses
worse than real samples: an upper bound on the NIfTI rewrite cost.

    .venv/bin/python benchmarks/bench_release.py [--n 120] [--repeats 3]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from scipy.ndimage import gaussian_filter

from dpsynth.app.demo import N_SYNTHETIC, demo_assets
from dpsynth.attributes import N_ATTRIBUTES
from dpsynth.config import load_config
from dpsynth.io import atomic_write_json, atomic_write_text, read_json, sha256_file, write_nifti
from dpsynth.privacy.ledger import Ledger, LedgerEntry
from dpsynth.report.release import release, verify
from dpsynth.runs import PROVENANCE_FILE, model_digest, write_attributes_csv


def stand_in(root: Path, n: int) -> tuple[Path, Path]:
    """A DP-run-shaped folder and a synthetic set with the provenance `dpsynth sample` writes."""
    run = root / "run"
    shutil.copytree(demo_assets() / "ldm", run)
    config = load_config(
        "demo", overrides={"privacy.epsilon": 8.0, "privacy.max_total_epsilon": 10.0}
    )
    atomic_write_text(run / "config.yaml", config.to_yaml())
    sgd = LedgerEntry(stage="ldm-dp-sgd", mechanism="dp-sgd", cache_id="bench", records=350,
                      noise_multiplier=0.9, sample_rate=48 / 350, planned_steps=59, steps=59)  # fmt: skip
    Ledger([sgd, LedgerEntry.gaussian("attribute-model", 3.0, records=350)]).save(run)
    meta = read_json(run / "model.json")
    synthetic = root / "synthetic"
    synthetic.mkdir()
    rng = np.random.default_rng(0)
    names = [f"synth_{i:05d}.nii.gz" for i in range(n)]
    for name in names:
        volume = gaussian_filter(rng.random(meta["shape"], dtype=np.float32), (0, 1, 1))
        write_nifti(synthetic / name, volume, meta["spacing"])
    write_attributes_csv(synthetic / "attributes.csv", names, rng.random((n, N_ATTRIBUTES)) * 100)
    files = {p: sha256_file(synthetic / p) for p in [*names, "attributes.csv"]}
    atomic_write_json(synthetic / PROVENANCE_FILE, {"model_digest": model_digest(run),
                      "conditioning": "dp", "sampler": "ddim", "steps": 25, "guidance": 3.0,
                      "seed": 0, "files": files})  # fmt: skip
    return run, synthetic


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=N_SYNTHETIC)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        run, synthetic = stand_in(root, args.n)
        times: dict[str, list[float]] = {"release": [], "verify": []}
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            release(run, synthetic, root / "bundle")
            t1 = time.perf_counter()
            summary = verify(root / "bundle")
            times["release"].append(t1 - t0)
            times["verify"].append(time.perf_counter() - t1)
        shape = read_json(run / "model.json")["shape"]
        print(f"{args.n} volumes {shape}, {summary['files']} files, ε = {summary['epsilon']:.3f}")
        for name, values in times.items():
            runs = ", ".join(f"{v:.2f}" for v in values)
            print(f"{name}: median {statistics.median(values):.2f} s (runs {runs})")


if __name__ == "__main__":
    main()
