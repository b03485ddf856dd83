"""When can best-of-k choose? Reads every candidate's predicted clean volume after each
DDIM step and scores the volumes a choice at that step would keep (what
`dpsynth.diffusion.pipeline.CHOICE_FRACTION` rests on; BENCHMARKS.md, "Choosing early"):

    .venv/bin/python benchmarks/bench_choice_step.py --demo runs/demo \\
        --conditions runs/demo/synthetic/attributes.csv --reader runs/reader/second_reader

For candidates 1..K and choice steps 1..steps it prints how often the choice agrees with
the one made on finished volumes, and per-phase r / MAE % of the kept volumes under the
demo's referee and (optionally) a second reader. The candidates are the ones `dpsynth
sample --candidates K` starts (seed 0); the run's sampling settings are used. The
conditions and both readers' figures are evaluation only.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from dpsynth.app.demo import demo_assets
from dpsynth.attributes import INDEX
from dpsynth.data.measure import measure_volume
from dpsynth.diffusion.pipeline import SAMPLE_BATCH, batch_seed, candidate_seed
from dpsynth.diffusion.schedulers import make_scheduler
from dpsynth.evaluation.controllability import MEASURED_ATTRIBUTES
from dpsynth.evaluation.referee import Referee
from dpsynth.evaluation.second_reader import SecondReader
from dpsynth.evaluation.selection import SELECTION_WEIGHTS, nearest_candidate, selectable
from dpsynth.io import atomic_write_json
from dpsynth.privacy.outputs import labelled
from dpsynth.runs import load, read_conditions_csv, sampling_settings


@torch.no_grad()
def predictions(pipe, table: np.ndarray, k: int) -> np.ndarray:
    """Predicted clean latents (k, steps, n, ...) of each candidate after each step."""
    s = sampling_settings(pipe.run_meta)
    if s["sampler"] == "ddpm":  # its steps draw noise: a choice would not fix the trajectory
        raise SystemExit("bench_choice_step: the run samples with ddpm; use ddim or dpm++")
    n = len(table)
    out = np.zeros((k, s["steps"], n, *pipe.latent_shape), np.float32)
    cond_all = pipe.normalize_attributes(torch.from_numpy(table))
    for c in range(k):
        for offset in range(0, n, SAMPLE_BATCH):
            cond = cond_all[offset : offset + SAMPLE_BATCH]
            seed = batch_seed(candidate_seed(0, c), offset // SAMPLE_BATCH)
            g = torch.Generator().manual_seed(seed)
            x = s["temperature"] * torch.randn((len(cond), *pipe.latent_shape), generator=g)
            scheduler = make_scheduler(s["sampler"], steps=s["steps"], **pipe.schedule_config)
            for i, t in enumerate(scheduler.timesteps):
                eps = pipe._guided_eps(x, torch.full((len(cond),), int(t)), cond, s["guidance"])
                x, x0 = scheduler.step(eps, int(t), x)
                out[c, i, offset : offset + len(cond)] = x0.numpy()
    return out


def decode(pipe, latents: np.ndarray) -> np.ndarray:
    return np.concatenate([
        pipe.decode_volumes(torch.from_numpy(latents[i : i + SAMPLE_BATCH]))
        for i in range(0, len(latents), SAMPLE_BATCH)
    ])  # fmt: skip


def score(table, chosen, measured) -> dict:
    """Per-phase r and MAE % of what the choice compares, read on the kept volumes
    (`measured[c][i]`: candidate c, volume i)."""
    result = {}
    wanted = selectable(table)
    for name in SELECTION_WEIGHTS:
        key = MEASURED_ATTRIBUTES[name][0]
        pairs = [(table[i, INDEX[name]], measured[chosen[i]][i][key])
                 for i in range(len(table)) if name in wanted[i]]  # fmt: skip
        pairs = [p for p in pairs if np.isfinite(p[1])]
        if len(pairs) < 2:  # nothing to correlate (e.g. conditions without thickness)
            continue
        req, got = np.array(pairs).T
        mae = np.mean(np.abs(req - got)) / np.mean(req) * 100
        result[name] = (round(float(np.corrcoef(req, got)[0, 1]), 3), round(float(mae), 1))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo", default="runs/demo")
    parser.add_argument("--conditions", required=True,
                        help="attributes.csv of the volumes (6 significant digits: the volumes "
                        "match the folder's to rounding, not bit for bit)")  # fmt: skip
    parser.add_argument("--candidates", type=int, default=4)
    parser.add_argument("--reader", help="a second reader folder (optional)")
    parser.add_argument("--out", help="write the figures here as JSON")
    args = parser.parse_args()
    torch.set_num_threads(2)
    pipe = load(f"{args.demo}/ldm_dp")
    table = read_conditions_csv(args.conditions, None)
    selector = Referee.load(demo_assets() / "selector")
    t0 = time.perf_counter()
    x0 = predictions(pipe, table, args.candidates)
    print(f"{args.candidates} candidates x {len(table)} volumes: {time.perf_counter() - t0:.0f} s")
    steps = x0.shape[1]
    finals = [decode(pipe, x0[c, -1]) for c in range(args.candidates)]
    readers = {"referee": Referee.load(f"{args.demo}/referee")}
    if args.reader:
        readers["second reader"] = SecondReader.load(args.reader)
    measured = {
        name: [[measure_volume(m, pipe.spacing) for m in r.segment(v)] for v in finals]
        for name, r in readers.items()
    }

    choose = nearest_candidate(selector, pipe.spacing)

    def rank(volumes_per_candidate) -> np.ndarray:
        return choose(np.stack(volumes_per_candidate), table)

    final_choice = {k: rank(finals[:k]) for k in range(1, args.candidates + 1)}
    results = {}
    for k in range(1, args.candidates + 1):
        for step in range(1, steps + 1) if k > 1 else [steps]:
            chosen = final_choice[k] if step == steps else rank(
                [decode(pipe, x0[c, step - 1]) for c in range(k)]
            )  # fmt: skip
            row = {"agrees_with_final": float(np.mean(chosen == final_choice[k]))}
            row |= {name: score(table, chosen, m) for name, m in measured.items()}
            results[f"k={k} step={step}"] = row
            print(f"k={k} step={step}/{steps}: {json.dumps(row)}", flush=True)
    if args.out:  # read by the private referee and second reader: evaluation only
        atomic_write_json(args.out, labelled(results))


if __name__ == "__main__":
    main()
