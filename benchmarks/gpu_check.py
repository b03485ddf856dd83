"""One prepared check for a first GPU: the `paper` preset's speed, DP overhead and memory.

Writes one JSON with the card (or "cpu"), torch / CUDA versions, date and command next to
every figure:
  - autoencoder and denoiser training throughput (volumes/s), fp32 and bf16 (autocast on
    CUDA; on CPU bf16 is reported as skipped, as training never autocasts there);
  - DP step vs non-private step, time and peak memory, at several physical batch sizes
    (`bench_dp_step`'s setup and memory probe: a fresh subprocess per mode);
  - a 200-step DP fine-tune of the denoiser (`PatientDPSGD`, Poisson batches of patients,
    the LDM trainer's `DenoisingObjective`) on random latents, with the ε it spent;
  - sampling 16 volumes with the preset's sampler through `LatentDiffusion.sample`.
Models have random weights: these are speed and memory figures, not quality. Each section
has a time cap (it stops early and says so); a failing section records its error and the
others still run. About 5 minutes on one H200-class GPU; <= 8 minutes by the caps.

    python benchmarks/gpu_check.py --out gpu_check.json           # on the GPU machine
    python benchmarks/gpu_check.py --smoke --out /tmp/smoke.json   # tiny, any CPU (tests)
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from types import SimpleNamespace

import numpy as np
import torch
from bench_dp_step import (
    Setup,
    machine,
    measure_memory_in_subprocess,
    step_figures,
    sync,
    timed,
)

from dpsynth.config import Config, load_config
from dpsynth.diffusion.schedulers import make_scheduler
from dpsynth.io import atomic_write_json
from dpsynth.models.build import build_autoencoder, build_denoiser
from dpsynth.privacy.accounting import epsilon_for
from dpsynth.privacy.dpsgd import PatientDPSGD
from dpsynth.runs import make_pipeline
from dpsynth.training.common import autocast
from dpsynth.training.ldm import DenoisingObjective

# (section caps in seconds, sizes): the full check and the CPU smoke test.
FULL = dict(
    preset="paper", throughput_batch=8, throughput_steps=10, dp_batches=(8, 16, 32),
    dp_repeats=5, finetune_steps=200, finetune_patients=16, finetune_records=1000,
    sample_n=16, caps=dict(autoencoder=45, denoiser=45, dp_step=120, finetune=120, sampling=60),
)  # fmt: skip
SMOKE = dict(
    preset="smoke", throughput_batch=2, throughput_steps=2, dp_batches=(4,), dp_repeats=2,
    finetune_steps=3, finetune_patients=2, finetune_records=20, sample_n=2, sample_steps=2,
    caps=dict(autoencoder=10, denoiser=10, dp_step=20, finetune=10, sampling=10),
)  # fmt: skip
# The smoke run's models: the demo preset shrunk (as the unit tests' tiny config), so the
# CPU test exercises every code path in seconds.
SMOKE_OVERRIDES = {
    "data.shape": [5, 16, 16], "autoencoder.channels": 8, "autoencoder.norm_groups": 4,
    "autoencoder.num_res_blocks": 1, "denoiser.channels": 8, "denoiser.norm_groups": 4,
    "denoiser.num_heads": 2, "denoiser.time_embed_dim": 16, "denoiser.num_res_blocks": 1,
    "privacy.physical_batch_size": 2, "privacy.accountant": "rdp",
}  # fmt: skip


def throughput(
    step: Callable[[], None], device: torch.device, volumes: int, steps: int, cap_s: float
) -> dict:
    """Volumes/s of `step` (one warm-up step, then up to `steps` timed ones within `cap_s`)."""
    step()
    sync(device.type)
    times, start = [], time.perf_counter()
    while len(times) < steps and time.perf_counter() - start < cap_s:
        times.append(timed(step, device.type)[0])
    s = statistics.median(times)
    return {"volumes_per_s": volumes / s, "step_s_median": s, "steps": len(times),
            "capped": len(times) < steps}  # fmt: skip


def train_step(model: torch.nn.Module, loss_fn: Callable[[], torch.Tensor], bf16: bool, device):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)

    def step() -> None:
        with autocast(device, bf16):
            loss = loss_fn()
        loss.float().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def section_throughput(kind: str, cfg: Config, p: dict, device: torch.device) -> dict:
    """Training-step throughput of the preset's autoencoder or denoiser, fp32 and bf16."""
    torch.manual_seed(0)
    b, shape = p["throughput_batch"], tuple(cfg.data.shape)
    if kind == "autoencoder":
        model = build_autoencoder(cfg.autoencoder).to(device)
        x = torch.rand(b, 1, *shape, device=device)

        def loss_fn():
            out = model(x)
            return (out[0].float() - x).square().mean() + out[1].float().mean()
    else:
        ae = cfg.autoencoder
        channels = ae.code_dim if ae.kind == "vq" else ae.latent_channels
        factor = 2 ** (len(ae.channel_multipliers) - 1)
        latent = (channels, shape[0], shape[1] // factor, shape[2] // factor)
        model = build_denoiser(cfg.denoiser, num_slices=shape[0], latent_channels=channels)
        model.to(device)
        x = torch.randn(b, *latent, device=device)
        t = torch.randint(0, cfg.diffusion.timesteps, (b,), device=device)
        a = torch.rand(b, 14, device=device)

        def loss_fn():
            return (model(x, t, a).float() - x).square().mean()

    result = {"parameters": sum(q.numel() for q in model.parameters()), "batch": b}
    cap = p["caps"][kind] / 2
    result["fp32"] = throughput(train_step(model, loss_fn, False, device), device, b,
                                p["throughput_steps"], cap)  # fmt: skip
    if device.type == "cuda":
        result["bf16"] = throughput(train_step(model, loss_fn, True, device), device, b,
                                    p["throughput_steps"], cap)  # fmt: skip
        result["bf16_speedup"] = result["bf16"]["volumes_per_s"] / result["fp32"]["volumes_per_s"]
    else:
        result["bf16"] = {"skipped": "bf16 autocast runs on CUDA only (training.common.autocast)"}
    return result


def section_dp_step(p: dict, device: torch.device) -> dict:
    """DP vs plain step of the denoiser at several physical batches (bench_dp_step)."""
    rows, start = [], time.perf_counter()
    for batch in p["dp_batches"]:
        if time.perf_counter() - start > p["caps"]["dp_step"]:
            rows.append({"volumes_per_step": batch, "skipped": "section time cap reached"})
            continue
        setup = Setup(p["preset"], batch, device.type, None)
        setup.plain_step()
        setup.dp_step()
        plain, dp = [], []
        for _ in range(p["dp_repeats"]):  # interleaved, so load changes hit both alike
            plain.append(timed(setup.plain_step, device.type))
            dp.append(timed(setup.dp_step, device.type))
        del setup
        if device.type == "cuda":
            torch.cuda.empty_cache()
        args = SimpleNamespace(preset=p["preset"], batch=batch, device=device.type,
                               vmap_patients=None)  # fmt: skip
        mem_plain = measure_memory_in_subprocess(args, "plain")
        mem_dp = measure_memory_in_subprocess(args, "dp")
        rows.append({"volumes_per_step": batch, **step_figures(plain, dp, mem_plain, mem_dp)})
    method = (
        "torch.cuda.max_memory_allocated above the resting model + optimizer + data"
        if device.type == "cuda"
        else "peak RSS (Linux VmHWM) above the resting RSS"
    )
    return {"model": f"bench_dp_step preset {p['preset']!r}", "memory_method":
            f"{method}, a fresh subprocess per mode", "batches": rows}  # fmt: skip


def section_finetune(cfg: Config, p: dict, device: torch.device) -> dict:
    """`finetune_steps` DP-SGD steps of the preset's denoiser on random patient latents."""
    torch.manual_seed(0)
    shape, ae = tuple(cfg.data.shape), cfg.autoencoder
    channels = ae.code_dim if ae.kind == "vq" else ae.latent_channels
    factor = 2 ** (len(ae.channel_multipliers) - 1)
    records = p["finetune_records"]
    latents = torch.randn(records, 2, channels, shape[0], shape[1] // factor, shape[2] // factor)
    attributes = np.full((records, 2, 14), np.nan, dtype=np.float32)
    model = build_denoiser(cfg.denoiser, num_slices=shape[0], latent_channels=channels)
    model.to(device)
    privacy = cfg.privacy
    engine = PatientDPSGD(
        model, torch.optim.AdamW(model.parameters(), lr=privacy.lr), noise_multiplier=1.0,
        max_grad_norm=privacy.max_grad_norm, sample_rate=p["finetune_patients"] / records,
        num_records=records, physical_batch_size=privacy.physical_batch_size,
    )  # fmt: skip
    d = cfg.diffusion
    scheduler = make_scheduler("ddpm", num_train_timesteps=d.timesteps, beta_start=d.beta_start,
                               beta_end=d.beta_end, schedule=d.schedule)  # fmt: skip
    objective = DenoisingObjective(scheduler, d.condition_dropout)
    generator = torch.Generator().manual_seed(0)
    losses, start, epoch = [], time.perf_counter(), 0
    while len(losses) < p["finetune_steps"]:
        for idx in engine.logical_batches(epoch):
            if len(losses) >= p["finetune_steps"]:
                break
            if time.perf_counter() - start > p["caps"]["finetune"]:
                break
            record = objective.draw(latents[idx], attributes[idx], generator)
            losses.append(float(engine.step({k: v.to(device) for k, v in record.items()},
                                            objective.patient_loss)))  # fmt: skip
        else:
            epoch += 1
            continue
        break
    sync(device.type)
    seconds = time.perf_counter() - start
    return {
        "steps": len(losses), "capped": len(losses) < p["finetune_steps"],
        "expected_patients_per_step": p["finetune_patients"], "records": records,
        "physical_batch_size": privacy.physical_batch_size, "noise_multiplier": 1.0,
        "seconds": seconds, "step_s_mean": seconds / max(len(losses), 1),
        "epsilon_spent": epsilon_for(
            [(engine.noise_multiplier, engine.sample_rate, engine.steps_taken)],
            privacy.delta, privacy.accountant,
        ),
        "delta": privacy.delta, "loss_first": losses[0], "loss_last": losses[-1],
    }  # fmt: skip


def section_sampling(cfg: Config, p: dict, device: torch.device) -> dict:
    """Sample `sample_n` volumes with the preset's sampler (random weights)."""
    torch.manual_seed(0)
    shape, ae = tuple(cfg.data.shape), cfg.autoencoder
    autoencoder = build_autoencoder(ae).to(device).eval()
    denoiser = build_denoiser(cfg.denoiser, num_slices=shape[0],
                              latent_channels=autoencoder.latent_channels).to(device).eval()  # fmt: skip
    pipe = make_pipeline(autoencoder, denoiser, cfg.diffusion, 1.0, shape, cfg.data.spacing)
    steps = p.get("sample_steps", cfg.sampling.steps)
    n = p["sample_n"]
    pipe.sample(1, sampler=cfg.sampling.sampler, steps=1, progress=False)  # warm-up
    sync(device.type)
    start = time.perf_counter()
    volumes = pipe.sample(n, sampler=cfg.sampling.sampler, steps=steps,
                          guidance=cfg.sampling.guidance, progress=False)  # fmt: skip
    sync(device.type)
    seconds = time.perf_counter() - start
    return {"volumes": len(volumes), "sampler": cfg.sampling.sampler, "steps": steps,
            "guidance": cfg.sampling.guidance, "seconds": seconds,
            "seconds_per_volume": seconds / n}  # fmt: skip


def run_section(fn: Callable[[], dict], device: torch.device) -> dict:
    """A section's result with its wall time, or its error: one failure never ends the check."""
    start = time.perf_counter()
    try:
        result = fn()
    except Exception as e:  # recorded in the JSON; the remaining sections still run
        traceback.print_exc()
        result = {"error": f"{type(e).__name__}: {e}".splitlines()[0]}
    if device.type == "cuda":
        result["peak_allocated_mib"] = torch.cuda.max_memory_allocated() / 2**20
        torch.cuda.reset_peak_memory_stats()
        torch.cuda.empty_cache()
    result["wall_s"] = time.perf_counter() - start
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="gpu_check.json", help="the JSON to write")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny sizes on the demo preset (the CPU test)")  # fmt: skip
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    p = SMOKE if args.smoke else FULL
    device = torch.device(args.device)
    cfg = load_config("demo", overrides=SMOKE_OVERRIDES) if args.smoke else load_config("paper")
    began = time.perf_counter()
    sections = {
        "autoencoder_throughput": lambda: section_throughput("autoencoder", cfg, p, device),
        "denoiser_throughput": lambda: section_throughput("denoiser", cfg, p, device),
        "dp_step": lambda: section_dp_step(p, device),
        "dp_finetune": lambda: section_finetune(cfg, p, device),
        "sampling": lambda: section_sampling(cfg, p, device),
    }
    results = {
        "card": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "machine": machine(device.type),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([sys.executable.rsplit("/", 1)[-1], *sys.argv]),
        "preset": p["preset"],
        "smoke": args.smoke,
        "section_caps_s": p["caps"],
    }
    for name, fn in sections.items():
        print(f"gpu_check: {name} ...", file=sys.stderr, flush=True)
        results[name] = run_section(fn, device)
    results["total_s"] = time.perf_counter() - began
    atomic_write_json(args.out, results)
    print(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
