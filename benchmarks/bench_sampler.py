"""Sampler quality and speed versus number of steps, side by side in one run.

Samples the same conditions with full DDPM (T steps) and with the fast deterministic
samplers (DDIM, DPM-Solver++) at several step counts, then scores each set by a Fréchet
distance to real volumes — FRD (frd-score, Original image type) and a Fréchet distance on
autoencoder latents — and reports seconds per volume.

    python benchmarks/bench_sampler.py --run src/dpsynth/assets/demo/ldm --real CACHE [--n 64]
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time

import numpy as np
import torch

from dpsynth.data.volumes import VolumeSet, load_volume_set
from dpsynth.evaluation.frd import compute_frd
from dpsynth.evaluation.frechet import feature_statistics, frechet_distance
from dpsynth.runs import load


def latent_features(pipe, volumes: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        z = pipe.encode(torch.from_numpy(volumes).unsqueeze(1))
    return z.mean(dim=2).flatten(1).numpy()  # slice-averaged latent: a compact descriptor


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--run", required=True)
    parser.add_argument("--real", required=True, help="prepared cache of real volumes")
    parser.add_argument("--n", type=int, default=64)
    parser.add_argument("--out", help="also write the results as JSON")
    args = parser.parse_args()

    pipe = load(args.run)
    real = load_volume_set(args.real, split=None)
    idx = np.random.default_rng(0).choice(len(real.volumes), args.n, replace=False)
    real = real.subset(idx)
    conditions = real.attributes
    real_latent = feature_statistics(latent_features(pipe, real.volumes))
    settings = [
        ("ddpm", None),
        ("ddim", 10),
        ("ddim", 25),
        ("ddim", 50),
        ("dpm++", 10),
        ("dpm++", 25),
    ]
    results = []
    for sampler, steps in settings:
        t0 = time.perf_counter()
        volumes = pipe.sample(
            args.n, attributes=conditions, sampler=sampler, steps=steps, seed=1, progress=False
        )
        seconds = (time.perf_counter() - t0) / args.n
        synth = VolumeSet(volumes=volumes, attributes=conditions, spacing=real.spacing,
                          names=[f"s{i}" for i in range(args.n)])  # fmt: skip
        frd = compute_frd(real, synth).value
        fd_latent = frechet_distance(
            *real_latent, *feature_statistics(latent_features(pipe, volumes))
        )
        results.append({"sampler": sampler, "steps": steps or pipe.num_train_timesteps,
                        "frd": frd, "fd_latent": fd_latent, "seconds_per_volume": seconds})  # fmt: skip
        print(json.dumps(results[-1]), flush=True)
    base = results[0]
    print(f"\nmachine: {platform.machine()} {platform.processor()}, torch threads "
          f"{torch.get_num_threads()}, date {datetime.date.today()}, command: {' '.join(sys.argv)}")  # fmt: skip
    print(
        "| sampler | steps | FRD | FRD / DDPM | FD latent | s / volume |\n|---|---|---|---|---|---|"
    )
    for r in results:
        print(f"| {r['sampler']} | {r['steps']} | {r['frd']:.3g} | {r['frd'] / base['frd']:.2f} | "
              f"{r['fd_latent']:.3g} | {r['seconds_per_volume']:.3f} |")  # fmt: skip
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
