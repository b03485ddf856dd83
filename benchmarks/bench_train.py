"""Training throughput (volumes/s) of each preset's autoencoder and denoiser steps.

One AdamW step on random data at the preset's shapes, median of `--repeats`, on CPU or
the GPU if present (bf16 autocast on GPU, as in training).

    python benchmarks/bench_train.py --preset demo paper [--repeats 5]
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import sys
import time

import torch

from dpsynth.attributes import N_ATTRIBUTES
from dpsynth.config import load_config
from dpsynth.models.build import build_autoencoder, build_denoiser
from dpsynth.training.common import autocast


def _median_step(model, make_loss, device, repeats: int) -> float:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    times = []
    for i in range(repeats + 1):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with autocast(device, True):
            loss = make_loss()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i:  # the first step warms up kernels and allocators
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench(preset: str, repeats: int, device: torch.device) -> list[tuple[str, int, float]]:
    c = load_config(preset)
    s, h, w = c.data.shape
    ae = build_autoencoder(c.autoencoder).to(device)
    b = c.autoencoder_training.batch_size
    x = torch.rand(b, 1, s, h, w, device=device)
    t_ae = _median_step(
        ae, lambda: (ae(x).reconstruction.float() - x).abs().mean(), device, repeats
    )
    f = ae.downsample_factor
    den = build_denoiser(c.denoiser, s, ae.latent_channels).to(device)
    bl = c.ldm_training.batch_size
    z = torch.randn(bl, ae.latent_channels, s, h // f, w // f, device=device)
    t = torch.randint(0, c.diffusion.timesteps, (bl,), device=device)
    a = torch.rand(bl, N_ATTRIBUTES, device=device)
    t_den = _median_step(den, lambda: den(z, t, a).float().square().mean(), device, repeats)
    return [("autoencoder", b, b / t_ae), ("denoiser", bl, bl / t_den)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--preset", nargs="+", default=["demo"])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    card = torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu"
    print(f"device {card}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"{datetime.date.today()}, command: {' '.join(sys.argv)}")  # fmt: skip
    print("| preset | model | batch | volumes/s |\n|---|---|---|---|")
    for preset in args.preset:
        for model, batch, rate in bench(preset, args.repeats, device):
            print(f"| {preset} | {model} | {batch} | {rate:.2f} |", flush=True)


if __name__ == "__main__":
    main()
