"""Load a trained run and write synthetic cohorts: NIfTI volumes plus their conditions."""

from __future__ import annotations

import csv
import math
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from dpsynth.attributes import ATTRIBUTES, INDEX
from dpsynth.errors import DpsynthError
from dpsynth.io import atomic_dir, read_json, write_nifti


def load(run: str | os.PathLike, device: str | torch.device | None = None):
    """The `LatentDiffusion` pipeline of a trained LDM run (EMA weights; no unpickling)."""
    from dpsynth.config import DenoiserConfig, DiffusionConfig
    from dpsynth.models.build import build_denoiser
    from dpsynth.training.checkpoint import load_weights
    from dpsynth.training.ldm import lists_to_tuples, load_autoencoder

    run = Path(run)
    meta = read_json(run / "model.json")
    if meta.get("kind") != "ldm":
        raise DpsynthError(
            f"{run}: not a latent diffusion run (model.json kind={meta.get('kind')!r})"
        )
    device = torch.device(device) if device else torch.device("cpu")
    autoencoder, _ = load_autoencoder(run, device)
    denoiser = build_denoiser(
        DenoiserConfig(**lists_to_tuples(meta["denoiser"])),
        num_slices=meta["shape"][0],
        latent_channels=autoencoder.latent_channels,
    )
    denoiser.load_state_dict(load_weights(run / "denoiser.safetensors"))
    denoiser.to(device).eval()
    pipe = make_pipeline(
        autoencoder,
        denoiser,
        DiffusionConfig(**meta["diffusion"]),
        latent_scale=float(meta["latent_scale"]),
        shape=meta["shape"],
        spacing=meta["spacing"],
    )
    pipe.run_meta = meta
    return pipe


def make_pipeline(autoencoder, denoiser, diffusion, latent_scale: float, shape, spacing):
    """A `LatentDiffusion` from modules and the run's diffusion settings."""
    from dpsynth.sampling.pipeline import LatentDiffusion

    return LatentDiffusion(
        autoencoder=autoencoder,
        denoiser=denoiser,
        latent_scale=latent_scale,
        volume_shape=tuple(shape),
        spacing=tuple(spacing),
        num_train_timesteps=diffusion.timesteps,
        beta_start=diffusion.beta_start,
        beta_end=diffusion.beta_end,
        schedule=diffusion.schedule,
    )


def parse_settings(settings: Sequence[str], n: int) -> np.ndarray:
    """`--set NAME=VALUE` flags as an (n, 14) table, NaN where not given."""
    table = np.full((n, len(ATTRIBUTES)), np.nan, dtype=np.float32)
    for item in settings:
        name, sep, value = item.partition("=")
        name = name.strip().upper()
        if not sep:
            raise DpsynthError(f"--set {item}: expected NAME=VALUE")
        if name not in INDEX:
            raise DpsynthError(
                f"--set {item}: unknown attribute '{name}' (known: {', '.join(ATTRIBUTES)})"
            )
        table[:, INDEX[name]] = _number(value, f"--set {item}")
    return table


def read_conditions_csv(path: str | os.PathLike, n: int | None) -> np.ndarray:
    """Rows of a CSV with attribute columns (names from ATTRIBUTES; empty or NaN = unknown).

    A `file` column is allowed (and ignored) so a sampled cohort's attributes.csv can be
    fed back. With `n`, the rows are cycled or cut to n.
    """
    path = Path(path)
    try:
        with path.open(newline="") as f:
            reader = csv.DictReader(f)
            columns = reader.fieldnames or []
            rows = list(reader)
    except FileNotFoundError:
        raise DpsynthError(f"{path}: attributes CSV not found") from None
    unknown = [c for c in columns if c.upper() not in INDEX and c not in ("file", "id")]
    if unknown:
        raise DpsynthError(
            f"{path}: unknown column '{unknown[0]}' (known: {', '.join(ATTRIBUTES)})"
        )
    if not any(c.upper() in INDEX for c in columns):
        raise DpsynthError(
            f"{path}: no attribute columns (expected some of {', '.join(ATTRIBUTES)})"
        )
    if not rows:
        raise DpsynthError(f"{path}: no rows")
    table = np.full((len(rows), len(ATTRIBUTES)), np.nan, dtype=np.float32)
    for r, row in enumerate(rows, start=2):
        for col, value in row.items():
            if col.upper() in INDEX and value not in ("", None):
                table[r - 2, INDEX[col.upper()]] = _number(value, f"{path}: line {r}, column {col}")
    if n is not None:
        table = table[np.arange(n) % len(table)]
    return table


def _number(text: str, where: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise DpsynthError(f"{where}: '{text}' is not a number") from None
    if math.isinf(value):
        raise DpsynthError(f"{where}: '{text}' is not a finite number")
    return value


def warn_out_of_range(table: np.ndarray, ranges: dict[str, list[float]]) -> None:
    for i, name in enumerate(ATTRIBUTES):
        lo, hi = ranges.get(name, (-math.inf, math.inf))
        col = table[:, i]
        bad = np.isfinite(col) & ((col < lo) | (col > hi))
        if bad.any():
            warnings.warn(
                f"{name}={col[bad][0]:g} is outside the training range [{lo:g}, {hi:g}]; "
                "the model extrapolates there",
                stacklevel=2,
            )


def sample_to_folder(
    run: str | os.PathLike,
    out: str | os.PathLike,
    n: int,
    attributes: str | os.PathLike | None = None,
    settings: Sequence[str] = (),
    sampler: str | None = None,
    steps: int | None = None,
    guidance: float | None = None,
    seed: int = 0,
) -> Path:
    """Sample `n` volumes into `out`: `synth_00000.nii.gz`, ... and `attributes.csv`.

    Conditioning: a CSV, `attributes="dp"` (the run's DP attribute model), `--set` values
    applied to every row, or nothing (all unknown).
    """
    if n < 1:
        raise DpsynthError(f"--n: must be >= 1, got {n}")
    run = Path(run)
    pipe = load(run)
    if attributes == "dp":
        table = _dp_conditions(run, n, seed)
    elif attributes is not None:
        table = read_conditions_csv(attributes, n)
    else:
        table = np.full((n, len(ATTRIBUTES)), np.nan, dtype=np.float32)
    overrides = parse_settings(settings, n)
    table = np.where(np.isfinite(overrides), overrides, table)
    warn_out_of_range(table, pipe.run_meta.get("attribute_ranges", {}))
    defaults = pipe.run_meta.get("sampling", {})
    sampler = sampler or defaults.get("sampler", "ddim")
    if steps is None and sampler != "ddpm":  # DDPM always runs all T steps
        steps = defaults.get("steps")
    volumes = pipe.sample(
        n,
        attributes=table,
        sampler=sampler,
        steps=steps,
        guidance=guidance if guidance is not None else defaults.get("guidance", 1.0),
        seed=seed,
    )
    with atomic_dir(out) as tmp:
        names = [f"synth_{i:05d}.nii.gz" for i in range(n)]
        for name, volume in zip(names, volumes, strict=True):
            write_nifti(tmp / name, volume, pipe.spacing)
        with (tmp / "attributes.csv").open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["file", *ATTRIBUTES])
            for name, row in zip(names, table, strict=True):
                writer.writerow([name, *("" if not np.isfinite(v) else f"{v:.6g}" for v in row)])
    return Path(out)


def _dp_conditions(run: Path, n: int, seed: int) -> np.ndarray:
    """Draw conditions from the DP attribute model attached to the run (post-processing)."""
    from dpsynth.privacy.release import load_attribute_model

    model = load_attribute_model(run)
    rows = model.sample((n + 1) // 2, np.random.default_rng(seed))
    return rows[:n].astype(np.float32)
