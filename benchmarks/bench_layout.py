"""Channels-last against the default layout for the demo's 3D convolution nets, side by side.

What `blocks.convolve_channels_last` rests on (BENCHMARKS.md, "Channels-last
convolutions"): the shipped demo autoencoder decoding and encoding a sampling batch, the
demo's denoiser predicting a guided sampling batch, the demo's referee (channels 8-16-32,
reading at 3.65 mm) taking a training step (batch 4) and reading a sampling batch, each
timed with its weights in both layouts; and what `referee.label_map` rests on
(BENCHMARKS.md, "Label maps"): `argmax(1)` against `max(1).indices` of a sampling batch's
referee logits. Interleaved call by call, median of `--repeats`:

    .venv/bin/python benchmarks/bench_layout.py --repeats 7
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable
from functools import partial

import torch
from monai.losses import DiceCELoss

import dpsynth
from dpsynth.app.demo import REFEREE_DOWNSAMPLE, demo_assets
from dpsynth.attributes import N_ATTRIBUTES
from dpsynth.diffusion.pipeline import SAMPLE_BATCH
from dpsynth.evaluation.referee import N_CLASSES, RefereeNet, label_map

DEFAULT = torch.contiguous_format
REFEREE_CHANNELS = (8, 16, 32)  # the demo's (`app.demo.run_demo`)


def interleaved(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median seconds per call of each function, called in turn `repeats` times."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for fn in fns.values():
        fn()  # warm-up: oneDNN builds its kernels on the first call
    for _ in range(repeats):
        for k, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}


def autoencoder_cases() -> dict[str, dict[str, Callable[[], object]]]:
    pipe = dpsynth.load(demo_assets() / "ldm")
    # `load` stores the autoencoder channels-last; a copy in the default layout is the baseline.
    ae = {"default": copy.deepcopy(pipe.autoencoder).to(memory_format=DEFAULT)}
    ae["channels-last"] = pipe.autoencoder
    g = torch.Generator().manual_seed(0)
    z = torch.randn(SAMPLE_BATCH, *pipe.latent_shape, generator=g)
    v = torch.rand(SAMPLE_BATCH, 1, *pipe.volume_shape, generator=g)
    # The denoiser as sampling runs it: a batch and its unconditional twin (guidance).
    den = {"default": copy.deepcopy(pipe.denoiser).to(memory_format=DEFAULT)}
    den["channels-last"] = pipe.denoiser
    zz = torch.cat([z, z])
    t = torch.full((len(zz),), 50)
    a = torch.randn(len(zz), N_ATTRIBUTES, generator=g)
    a[len(z) :] = float("nan")  # the twin conditions on "unknown"
    return {
        f"denoiser on {len(zz)} latents": {k: partial(m, zz, t, a) for k, m in den.items()},
        f"decode {SAMPLE_BATCH} volumes": {k: partial(m.decode_latent, z) for k, m in ae.items()},
        f"encode {SAMPLE_BATCH} volumes": {
            k: (lambda m=m: m.encode_latent(v).contiguous()) for k, m in ae.items()
        },
    }


def referee_cases() -> dict[str, dict[str, Callable[[], object]]]:
    """The demo referee's training step (batch 4) and its reading of a sampling batch (what
    best-of-k's selector does per candidate)."""
    torch.manual_seed(0)
    nets = {
        "default": RefereeNet(REFEREE_CHANNELS, downsample=REFEREE_DOWNSAMPLE).to(
            memory_format=DEFAULT
        )
    }
    nets["channels-last"] = RefereeNet(
        REFEREE_CHANNELS, downsample=REFEREE_DOWNSAMPLE
    )  # as it stores itself
    nets["channels-last"].load_state_dict(nets["default"].state_dict())
    x = torch.rand(4, 1, 13, 96, 96)
    y = torch.randint(0, 4, (4, 1, 13, 96, 96))
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    optimizers = {k: torch.optim.AdamW(n.parameters(), lr=1e-3) for k, n in nets.items()}

    def step(layout: str) -> None:
        loss = loss_fn(nets[layout].train()(x)[0], y)
        optimizers[layout].zero_grad()
        loss.backward()
        optimizers[layout].step()

    def read(layout: str) -> None:
        with torch.inference_mode():
            nets[layout].eval()(torch.rand(SAMPLE_BATCH, 1, 13, 96, 96))

    return {
        "referee training step (batch 4)": {k: partial(step, k) for k in nets},
        f"referee reading {SAMPLE_BATCH} volumes": {k: partial(read, k) for k in nets},
    }


def label_map_cases() -> dict[str, dict[str, Callable[[], object]]]:
    """Labels of a sampling batch's referee logits at the input grid, as `Referee.analyse`
    takes them."""
    logits = torch.randn(
        SAMPLE_BATCH, N_CLASSES, 13, 96, 96, generator=torch.Generator().manual_seed(0)
    )
    return {
        f"label map of {SAMPLE_BATCH} volumes' logits": {
            "argmax(1)": lambda: logits.argmax(1).to(torch.uint8),
            "max(1).indices": partial(label_map, logits),
        }
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(2)
    cases = autoencoder_cases() | referee_cases() | label_map_cases()
    print(f"median of {args.repeats}, 2 threads; seconds before -> after (speed-up)")
    for name, fns in cases.items():
        with torch.inference_mode(name.startswith(("denoiser", "decode", "encode"))):
            t = interleaved(fns, args.repeats)
        (before, t0), (after, t1) = t.items()
        print(f"{name}: {before} {t0:.3f} -> {after} {t1:.3f} s ({t0 / t1:.2f}x)")


if __name__ == "__main__":
    main()
