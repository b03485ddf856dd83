"""DP training step vs non-private step of the latent denoiser, at the same physical batch.

Target (BRIEF §6): DP step <= 1.2x the time and <= 1.3x the peak memory of a plain step.
Times are medians of interleaved repeats in one process. Peak memory is measured in a
fresh subprocess per mode, so one mode's cached allocations cannot hide the other's: the
peak during the steps above the resting model + optimizer + data (CPU: Linux VmHWM,
reset through /proc/self/clear_refs; CUDA: max_memory_allocated).

    python benchmarks/bench_dp_step.py --preset demo --batch 8 [--out results.json]
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import subprocess
import sys
import time

import torch

from dpsynth.config import load_config
from dpsynth.io import atomic_write_json
from dpsynth.models.build import build_denoiser
from dpsynth.models.denoiser import LatentDenoiser
from dpsynth.privacy.dpsgd import PatientDPSGD

# The tiny denoiser of gpu_check.py --smoke (a CPU test of the code paths) and its latent
# shape (C, S, h, w); "demo" and "paper" are read from their presets.
SMOKE = (
    dict(
        channels=8,
        channel_multipliers=(1, 2),
        attention_levels=(False, True),
        num_res_blocks=1,
        num_heads=2,
        norm_groups=4,
        time_embed_dim=16,
    ),
    (2, 5, 4, 4),
)
PRESETS = ("demo", "paper", "smoke")


def denoiser_and_latent(preset: str) -> tuple[torch.nn.Module, tuple[int, int, int, int]]:
    """The preset's latent denoiser and the shape (C, S, h, w) of one latent it denoises."""
    if preset == "smoke":
        kwargs, (c, s, h, w) = SMOKE
        return LatentDenoiser(in_channels=c, num_slices=s, **kwargs), (c, s, h, w)
    cfg = load_config(preset)
    s, h, w = cfg.data.shape
    c = cfg.autoencoder.latent_channels
    f = 2 ** (len(cfg.autoencoder.channel_multipliers) - 1)  # the autoencoder's in-plane factor
    return build_denoiser(cfg.denoiser, s, c), (c, s, h // f, w // f)


NUM_TIMESTEPS = 150


def volume_losses(model_fn, batch):
    """Per-volume ε-prediction MSE for volumes stacked on dim 0."""
    eps = model_fn(batch["x"], batch["t"], batch["a"])
    return ((eps - batch["noise"]) ** 2).flatten(1).mean(1)


def patient_loss(model_fn, record):
    return volume_losses(model_fn, record).sum()  # a patient's loss sums its volumes


class Setup:
    def __init__(
        self, preset: str, volumes: int, device: str, vmap_patients: int | None, seed: int = 0
    ) -> None:
        torch.manual_seed(seed)
        model, (c, s, h, w) = denoiser_and_latent(preset)
        self.model = model.to(device)
        self.patients = volumes // 2
        self.batch = {
            "x": torch.randn(self.patients, 2, c, s, h, w, device=device),
            "noise": torch.randn(self.patients, 2, c, s, h, w, device=device),
            "t": torch.randint(0, NUM_TIMESTEPS, (self.patients, 2), device=device),
            "a": torch.rand(self.patients, 2, 14, device=device),
        }
        self.flat = {k: v.flatten(0, 1) for k, v in self.batch.items()}
        self.plain_opt = torch.optim.AdamW(self.model.parameters(), lr=1e-5)
        dp_opt = torch.optim.AdamW(self.model.parameters(), lr=1e-5)
        self.engine = PatientDPSGD(
            self.model,
            dp_opt,
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            sample_rate=self.patients / 1000,  # expected batch = this batch
            num_records=1000,
            physical_batch_size=vmap_patients or self.patients,
        )

    def plain_step(self) -> None:
        volume_losses(self.model, self.flat).mean().backward()
        self.plain_opt.step()
        self.plain_opt.zero_grad(set_to_none=True)

    def dp_step(self) -> None:
        self.engine.step(self.batch, patient_loss)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: str) -> tuple[float, float]:
    """Wall and process-CPU seconds of `fn` (CPU time suffers less from a shared machine)."""
    sync(device)
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    sync(device)
    return time.perf_counter() - wall, time.process_time() - cpu


def median(samples: list[tuple[float, float]], which: int) -> float:
    return statistics.median(sample[which] for sample in samples)


def step_figures(plain: list, dp: list, mem_plain: int, mem_dp: int) -> dict:
    """Median wall times, peak memory (MiB) and the DP / plain ratios the targets name."""
    return {
        "plain_step_s_median": median(plain, 0),
        "dp_step_s_median": median(dp, 0),
        "time_ratio": median(dp, 0) / median(plain, 0),
        "plain_step_peak_mib": mem_plain / 2**20,
        "dp_step_peak_mib": mem_dp / 2**20,
        "memory_ratio": mem_dp / max(mem_plain, 1),
    }


def peak_step_memory(args: argparse.Namespace, steps: int = 2) -> int:
    """Bytes the steps need above the resting model + optimizer + data (run in a subprocess)."""
    device = args.device
    setup = Setup(args.preset, args.batch, device, args.vmap_patients)
    mode = args.memory_only
    step = setup.dp_step if mode == "dp" else setup.plain_step
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    base = _proc_status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM (peak RSS) to the current RSS
    for _ in range(steps):
        step()
    return (_proc_status_kib("VmHWM") - base) * 1024


def _proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(f"{field}:"))


def measure_memory_in_subprocess(args: argparse.Namespace, mode: str) -> int:
    cmd = [
        sys.executable,
        __file__,
        "--preset",
        args.preset,
        "--batch",
        str(args.batch),
        "--device",
        args.device,
        "--memory-only",
        mode,
    ]
    if args.vmap_patients:
        cmd += ["--vmap-patients", str(args.vmap_patients)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return int(out.strip().splitlines()[-1])


def machine(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    cpu = platform.processor() or platform.machine()
    return f"{cpu}, {torch.get_num_threads()} torch threads"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=PRESETS, default="demo")
    parser.add_argument("--batch", type=int, default=8, help="volumes per step (2 per patient)")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--vmap-patients",
        type=int,
        help="DP engine's physical_batch_size (patients per vmap call); default: the whole batch",
    )
    parser.add_argument("--out", help="also write the results as JSON here")
    parser.add_argument("--memory-only", choices=["plain", "dp"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.batch < 2 or args.batch % 2:
        parser.error("--batch: must be an even number of volumes >= 2")

    if args.memory_only:
        print(peak_step_memory(args))
        return

    setup = Setup(args.preset, args.batch, args.device, args.vmap_patients)
    for _ in range(args.warmup):
        setup.plain_step()
        setup.dp_step()
    plain, dp = [], []
    for _ in range(args.repeats):  # interleaved, so load changes hit both alike
        plain.append(timed(setup.plain_step, args.device))
        dp.append(timed(setup.dp_step, args.device))
    mem_plain = measure_memory_in_subprocess(args, "plain")
    mem_dp = measure_memory_in_subprocess(args, "dp")

    results = {
        "machine": machine(args.device),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([sys.executable.rsplit("/", 1)[-1], *sys.argv]),
        "preset": args.preset,
        "volumes_per_step": args.batch,
        "dp_patients_per_vmap": setup.engine.physical_batch_size,
        "parameters": sum(p.numel() for p in setup.model.parameters()),
        **step_figures(plain, dp, mem_plain, mem_dp),
        "plain_step_cpu_s_median": median(plain, 1),
        "dp_step_cpu_s_median": median(dp, 1),
        "cpu_time_ratio": median(dp, 1) / median(plain, 1),
    }
    print(json.dumps(results, indent=2))
    if args.out:
        atomic_write_json(args.out, results)


if __name__ == "__main__":
    main()
