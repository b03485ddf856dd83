"""Do dpsynth's fidelity metrics rank sets of known quality correctly? (issue 12 §4)

Against a real reference set (a cache's test split) every metric measures: an independent
real set (other patients of the same population: a fresh simulated cohort, one volume per
patient, ED and ES alternating), that set blurred in-plane at
2, 4 and 8 mm, and noise sets (voxel-permuted real volumes; a smooth random field with the
real histogram; the shipped public autoencoder decoding prior noise; the same autoencoder
under a randomly initialised denoiser, i.e. an untrained LDM; optionally samples of a run
given with --noise-run). Expected: independent < blur 2 < blur 4 < blur 8 mm < every noise
set. With --demo, the demo's synthetic set is placed on the same scale.

    python benchmarks/bench_fidelity_ranking.py                      # fresh phantoms
    python benchmarks/bench_fidelity_ranking.py --demo runs/demo     # a finished demo
    python benchmarks/bench_fidelity_ranking.py --inception-weights inception_study.pt
    python benchmarks/bench_fidelity_ranking.py --demo runs/demo \
        --second-reader runs/reader/second_reader --metrics fd_referee,fd_second_reader

`--second-reader` adds the Fréchet distance in the independent second reader's feature
space (`benchmarks/bench_second_reader.py` trains one); `--metrics` keeps the named ones.

Without --inception-weights the FID code path runs with a stand-in extractor (a randomly
initialised CNN saved as TorchScript): its ranking exercises the path, it says nothing
about Inception-v3. Everything here is evaluation only.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from dpsynth.app.demo import _with, demo_assets, simulate_and_prepare
from dpsynth.config import DenoiserConfig, DiffusionConfig, load_config
from dpsynth.data.volumes import VolumeSet, load_volume_set
from dpsynth.evaluation.diversity import mean_pairwise_ms_ssim
from dpsynth.evaluation.fid import (
    N_MIDDLE_SLICES,
    inception_features,
    load_feature_extractor,
    middle_slices,
)
from dpsynth.evaluation.frd import FRDConfig, frd_from_features, radiomics_features
from dpsynth.evaluation.frechet import feature_statistics, frechet_distance, real_vs_real_baseline
from dpsynth.evaluation.ranking import control_sets, place_of, ranking_errors
from dpsynth.evaluation.referee import Referee, bottleneck_layer, fit_referee
from dpsynth.evaluation.second_reader import SecondReader
from dpsynth.io import atomic_write_text
from dpsynth.models.build import build_denoiser
from dpsynth.privacy.outputs import labelled
from dpsynth.runs import lists_to_tuples, load, make_pipeline, read_model_meta

SYNTHETIC = "synthetic (demo)"
INDEPENDENT_SEED = 9090  # not the demo's public (101) or private (202) cohort seed


def independent_cohort(n: int, seed: int, tmp: Path, reference: VolumeSet) -> VolumeSet:
    """`n` real volumes of `n` patients the reference never held: a fresh `ukbb` cohort,
    prepared to the reference's grid and spacing.

    Not the cache's val split: the demo's 33 val patients are heavier by chance (BMI 29.0
    against 26.7), and the referee's features read that as 2x its baseline (BENCHMARKS.md).
    """
    grid = {"data.shape": list(reference.shape), "data.spacing": list(reference.spacing)}
    config = _with(load_config("demo"), **grid)
    spec = {"patients": n, "cohort": "ukbb", "seed": seed}
    cache = simulate_and_prepare(tmp / "independent", spec, config, split=(0, 0, 1))
    cohort = load_volume_set(cache, "test")  # rows: ED, ES of each patient
    return cohort.subset(2 * np.arange(n) + np.arange(n) % 2)


def world(args, tmp: Path) -> tuple[VolumeSet, VolumeSet, Referee, VolumeSet | None]:
    """Reference (test split), independent real, referee, synthetic or None."""
    if args.demo:
        demo = Path(args.demo)
        cache = demo / "data" / "ukbb_cache"
        synthetic = load_volume_set(demo / "synthetic", None)
        referee = Referee.load(demo / "referee")
    else:
        config = load_config("demo")
        spec = {"patients": args.patients, "cohort": "ukbb", "seed": args.seed}
        cache = simulate_and_prepare(tmp / "data", spec, config, split=(0.4, 0.2, 0.4))
        synthetic = None
        train = load_volume_set(cache, "train")
        print(f"training a referee on {len(train)} volumes", flush=True)
        referee = fit_referee(train, epochs=5, channels=(8, 16, 32), seed=0)
    reference = load_volume_set(cache, "test")
    independent = independent_cohort(args.n, INDEPENDENT_SEED + args.seed, tmp, reference)
    return reference, independent, referee, synthetic


def decoded_noise(shape, n: int, seed: int) -> dict[str, np.ndarray]:
    """Noise decoded by the shipped public autoencoder: its latent prior, and an untrained
    LDM (random-init denoiser, DDIM 10 steps). Skipped where the shipped model's grid differs."""
    ldm = demo_assets() / "ldm"
    meta = read_model_meta(ldm)
    if tuple(meta["shape"]) != tuple(shape):
        print(f"shipped public models are {meta['shape']}, data {list(shape)}: no decoded noise")
        return {}
    trained = load(ldm)
    torch.manual_seed(seed)
    untrained = make_pipeline(
        trained.autoencoder,
        build_denoiser(
            DenoiserConfig(**lists_to_tuples(meta["denoiser"])),
            num_slices=shape[0],
            latent_channels=trained.autoencoder.latent_channels,
        ).eval(),
        DiffusionConfig(**meta["diffusion"]),
        trained.latent_scale,
        meta["shape"],
        meta["spacing"],
    )
    generator = torch.Generator().manual_seed(seed)
    prior = torch.randn((n, *trained.latent_shape), generator=generator)
    return {
        "noise: public AE decodes prior": trained.decode_volumes(prior),
        "noise: untrained LDM": untrained.sample(n, steps=10, seed=seed, progress=False),
    }


# --- metrics: each maps the reference and a candidate set to a distance -------------------


class Metric:
    """A distance to the reference, with features of the reference computed once."""

    def __init__(self, name: str, features: Callable[[np.ndarray], np.ndarray], distance):
        self.name, self.features, self.distance_fn = name, features, distance
        self.reference_features = None

    def fit(self, reference: np.ndarray) -> None:
        self.reference_features = self.features(reference)

    def distance(self, volumes: np.ndarray) -> float:
        return self.distance_fn(self.reference_features, self.features(volumes))

    def baseline(self, seed: int) -> float | None:
        return None


class FrechetMetric(Metric):
    def __init__(self, name, features):
        super().__init__(name, features, _frechet)

    def baseline(self, seed: int) -> float:
        return real_vs_real_baseline(self.reference_features, np.random.default_rng(seed))


def _frechet(a: np.ndarray, b: np.ndarray) -> float:
    return frechet_distance(*feature_statistics(a), *feature_statistics(b))


class FRDMetric(Metric):
    def __init__(self, name, spacing, config: FRDConfig):
        self.config = config
        super().__init__(
            name,
            lambda v: radiomics_features(v, spacing, config),
            lambda r, s: frd_from_features(r, s).value,
        )

    def baseline(self, seed: int) -> float:
        return frd_from_features(self.reference_features, self.reference_features, seed).baseline


class DiversityGap(Metric):
    """|MS-SSIM of random pairs in the set − the same in the reference| (diversity metric)."""

    def __init__(self, pairs: int, seed: int):
        super().__init__("ms_ssim |gap|", lambda v: mean_pairwise_ms_ssim(v, pairs, seed).value,
                         lambda r, s: abs(s - r))  # fmt: skip


def stand_in_extractor(path: Path, seed: int = 0) -> Path:
    """A randomly initialised CNN (B,3,299,299) -> (B,64) as TorchScript: exercises the FID
    code path without downloading Inception weights. Not Inception; its ranking is its own."""
    torch.manual_seed(seed)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 5, stride=3), torch.nn.ReLU(),
        torch.nn.Conv2d(16, 32, 5, stride=3), torch.nn.ReLU(),
        torch.nn.Conv2d(32, 64, 5, stride=3), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
    ).eval()  # fmt: skip
    torch.jit.trace(net, torch.rand(2, 3, 299, 299)).save(str(path))
    return path


@torch.no_grad()
def second_reader_features(
    reader: SecondReader, volumes: np.ndarray, batch: int = 64
) -> np.ndarray:
    """(N, C): per volume, the second reader's U-Net bottleneck averaged over positions and
    over the middle 7 slices (those the study's FID reads): a feature space of a 2D net that
    never saw synthetic or blurred data."""
    slices = middle_slices(np.asarray(volumes, dtype=np.float32))[:, None]
    kept: list[torch.Tensor] = []
    hook = bottleneck_layer(reader.net).register_forward_hook(
        lambda module, inputs, output: kept.append(output.mean(dim=(2, 3)))
    )
    try:
        for i in range(0, len(slices), batch):
            reader.net(torch.from_numpy(np.ascontiguousarray(slices[i : i + batch])))
    finally:
        hook.remove()
    per_slice = torch.cat(kept).double().numpy()
    return per_slice.reshape(len(volumes), N_MIDDLE_SLICES, -1).mean(axis=1)


def metrics_for(args, spacing, referee: Referee, tmp: Path) -> list[Metric]:
    metrics: list[Metric] = [
        FRDMetric("frd", spacing, FRDConfig(num_workers=args.workers)),
        FrechetMetric("fd_referee", referee.features),
        DiversityGap(args.pairs, args.seed),
    ]
    if args.second_reader:
        reader = SecondReader.load(args.second_reader)
        metrics.append(
            FrechetMetric("fd_second_reader", lambda v: second_reader_features(reader, v))
        )
    weights = args.inception_weights or stand_in_extractor(tmp / "stand_in.pt")
    label = "" if args.inception_weights else " (stand-in CNN)"
    extractor = load_feature_extractor(weights)
    for variant in ("standard", "study"):
        metrics.append(FrechetMetric(
            f"fid{'_study' if variant == 'study' else ''}{label}",
            lambda v, variant=variant: inception_features(v, extractor, variant=variant),
        ))  # fmt: skip
    if not args.metrics:
        return metrics
    wanted = args.metrics.split(",")
    unknown = set(wanted) - {m.name for m in metrics}
    if unknown:
        raise SystemExit(f"--metrics: unknown {sorted(unknown)}; have {[m.name for m in metrics]}")
    return [m for m in metrics if m.name in wanted]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--demo", help="a finished demo folder (data/ukbb_cache, referee, synthetic)"
    )
    parser.add_argument("--patients", type=int, default=150, help="phantom cohort size")
    parser.add_argument("--n", type=int, default=60, help="volumes per candidate set (at most)")
    parser.add_argument("--noise-run", help="an LDM run whose samples join the noise sets")
    parser.add_argument("--inception-weights", help="TorchScript Inception-v3 (see fid.py)")
    parser.add_argument("--pairs", type=int, default=100, help="MS-SSIM pairs per set")
    parser.add_argument("--workers", type=int, default=2, help="radiomics processes")
    parser.add_argument("--second-reader", help="a trained second reader: adds fd_second_reader")
    parser.add_argument("--metrics", help="comma-separated metric names to keep (default all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="fidelity_ranking.json")
    args = parser.parse_args()
    torch.set_num_threads(2)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="dpsynth-ranking-") as tmp:
        tmp = Path(tmp)
        reference, independent, referee, synthetic = world(args, tmp)
        n = min(args.n, len(independent))
        sets = control_sets(independent.volumes[:n], independent.spacing, seed=args.seed)
        sets.update(decoded_noise(reference.shape, n, args.seed))
        if args.noise_run:
            sets[f"noise: samples of {Path(args.noise_run).name}"] = load(args.noise_run).sample(
                n, steps=10, seed=args.seed, progress=False
            )
        if synthetic is not None:
            sets[SYNTHETIC] = synthetic.volumes[:n]
        print(f"reference {len(reference)} volumes {reference.shape}; {n} per candidate set")
        table: dict[str, dict] = {}
        for metric in metrics_for(args, reference.spacing, referee, tmp):
            t0 = time.perf_counter()
            metric.fit(reference.volumes)
            distances = {name: metric.distance(v) for name, v in sets.items()}
            controls = {k: v for k, v in distances.items() if k != SYNTHETIC}
            errors = ranking_errors(controls)
            table[metric.name] = {
                "distances": distances,
                "baseline": metric.baseline(args.seed),
                "ranks_correctly": not errors,
                "errors": errors,
                "synthetic_place": place_of(distances[SYNTHETIC], controls)
                if SYNTHETIC in distances
                else None,
                "seconds": round(time.perf_counter() - t0, 1),
            }
            print(f"{metric.name}: {'ranks correctly' if not errors else errors}", flush=True)
    # Distances to the reference: with --demo a private test split, so evaluation only.
    result = labelled(
        {
            "command": "python benchmarks/bench_fidelity_ranking.py "
            + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v),
            "reference": f"{reference.source}: {len(reference)} volumes {list(reference.shape)}",
            "n_per_set": n,
            "wall_s": round(time.perf_counter() - start, 1),
            "metrics": table,
        }
    )
    atomic_write_text(args.out, json.dumps(result, indent=1, default=float))
    print(markdown(result))


def markdown(result: dict) -> str:
    metrics = result["metrics"]
    names = list(next(iter(metrics.values()))["distances"])
    lines = [
        "| set | " + " | ".join(metrics) + " |",
        "|---|" + "---|" * len(metrics),
    ]
    for name in names:
        lines.append(f"| {name} | " + " | ".join(f"{m['distances'][name]:.3g}" for m in metrics.values()) + " |")  # fmt: skip
    lines.append("| real-vs-real (two halves of the reference) | " + " | ".join(
        "–" if m["baseline"] is None else f"{m['baseline']:.3g}" for m in metrics.values()) + " |")  # fmt: skip
    lines.append("| **ranks correctly** | " + " | ".join(
        "yes" if m["ranks_correctly"] else "**no**" for m in metrics.values()) + " |")  # fmt: skip
    return "\n".join(lines)


if __name__ == "__main__":
    main()
