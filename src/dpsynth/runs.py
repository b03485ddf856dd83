"""A run folder's artefacts, one owner: model.json (validated), weights, the pipeline.

A run is what a training stage writes: ``model.json`` (kind, architecture, latent scale,
shape, spacing, lineage), safetensors weights, ``config.yaml`` and, for DP lineages,
``ledger.json`` (owned by :mod:`dpsynth.privacy.ledger`; `run_ledger` reads it checked
against model.json). Everything above this layer reads a run through these functions,
never by opening its files.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes

from dpsynth.attributes import ATTRIBUTES, INDEX
from dpsynth.config import AutoencoderConfig, DenoiserConfig, DiffusionConfig, SamplingConfig
from dpsynth.diffusion.pipeline import LatentDiffusion
from dpsynth.errors import DpsynthError
from dpsynth.io import atomic_write_bytes, read_json, sha256_file
from dpsynth.models.blocks import convolve_channels_last
from dpsynth.models.build import build_autoencoder, build_denoiser
from dpsynth.privacy.attribute_model import require_attribute_fit
from dpsynth.privacy.ledger import Ledger
from dpsynth.privacy.lineage import require_ledger

MODEL_FILE = "model.json"
KINDS = ("autoencoder", "ldm")
WEIGHT_FILES = ("denoiser.safetensors", "autoencoder.safetensors")
PROVENANCE_FILE = "provenance.json"
# Where a synthetic set's conditions came from. Only the first three may be released
# (BRIEF section 3); real private attributes are for evaluation.
CONDITIONING = {
    "user": "user-specified",
    "public": "public table",
    "dp": "DP attribute model",
    "private": "real private attributes (evaluation only)",
}
RELEASABLE_CONDITIONING = ("user", "public", "dp")


def read_model_meta(run: str | os.PathLike, kind: str | None = None) -> dict[str, Any]:
    """A run's model.json, checked: an object with a known `kind` (`kind` if given)."""
    path = Path(run) / MODEL_FILE
    meta = read_json(path)
    if not isinstance(meta, dict) or meta.get("kind") not in KINDS:
        found = meta.get("kind") if isinstance(meta, dict) else type(meta).__name__
        raise DpsynthError(f"{path}: not a dpsynth model (kind={found!r})")
    if kind is not None and meta["kind"] != kind:
        what = "latent diffusion" if kind == "ldm" else kind
        raise DpsynthError(f"{Path(run)}: not a {what} run (model.json kind={meta['kind']!r})")
    return meta


def read_lineage(meta: dict[str, Any], where: str | os.PathLike) -> list[dict[str, Any]]:
    """A model.json's ``trained_on``: [{cache_id, dp, ledger_entry (DP stages)}], every cache
    its weights learned from, whether with DP, and by which ledger entry. Fails closed: an
    entry that cannot be read might hide a stage that trained without DP (a ``dp`` of
    "false" would read as true). A run from before the field (an older dpsynth, or made by
    hand) has none; one from before ``ledger_entry`` names no entry."""
    lineage = meta.get("trained_on", [])
    if not isinstance(lineage, list) or not all(
        isinstance(item, dict)
        and isinstance(item.get("cache_id"), str)
        and isinstance(item.get("dp"), bool)
        and isinstance(item.get("ledger_entry", ""), str)
        for item in lineage
    ):
        raise DpsynthError(
            f"{where}: trained_on: expected a list of {{cache_id, dp: true/false, ledger_entry}}"
        )
    return lineage


def model_meta_if_any(run: str | os.PathLike) -> dict[str, Any] | None:
    """`read_model_meta` of a run folder, or None where it has no model.json (yet)."""
    return read_model_meta(run) if (Path(run) / MODEL_FILE).is_file() else None


def run_lineage(run: str | os.PathLike) -> list[dict[str, Any]]:
    """`read_lineage` of a run folder's model.json; a folder without one has none."""
    return read_lineage(model_meta_if_any(run) or {}, Path(run) / MODEL_FILE)


def run_ledger(run: str | os.PathLike) -> Ledger:
    """A run folder's ledger (its whole lineage's), checked against its model.json: refused
    where it is lost (`privacy.lineage.require_ledger`), misses DP training its
    ``trained_on`` names (`Ledger.require_accounted`) or the fit of the attribute model
    the folder holds (`privacy.attribute_model.require_attribute_fit`). Read as empty or
    partial, it would start a budget or a privacy check from too little. A public run
    reads as empty."""
    run = Path(run)
    meta = model_meta_if_any(run)
    require_ledger(run, meta)
    ledger = Ledger.load(run, missing_ok=True)
    check_ledger(run, meta, ledger)
    return ledger


def check_ledger(run: Path, meta: dict[str, Any] | None, ledger: Ledger) -> list[dict[str, Any]]:
    """Refuse `ledger`, read for run folder `run` (model.json `meta`, None: none), where it
    misses DP training the lineage names or the fit of the attribute model the folder
    holds; return the lineage (``trained_on``). The checks every reader of a run's ledger
    shares (`run_ledger`, `report.stated_privacy`)."""
    lineage = read_lineage(meta or {}, run / MODEL_FILE)
    ledger.require_accounted(lineage, run)
    require_attribute_fit(run, ledger)
    return lineage


# Where a run's latent scale came from (model.json `latent_scale_source`): the only values
# training writes, and so the only ones a release copies.
SCALE_FROM_OWN_DATA = "public training data of this run"
SCALE_FROM_INIT = "public: the pre-trained --init run"
SCALE_FROM_DP_ESTIMATE = "DP estimate on the private training data (ledger: latent-scale)"
SCALE_FROM_AUTOENCODER = "autoencoder run"  # an autoencoder run that predates the key
LATENT_SCALE_SOURCES = (
    SCALE_FROM_OWN_DATA,
    SCALE_FROM_INIT,
    SCALE_FROM_DP_ESTIMATE,
    SCALE_FROM_AUTOENCODER,
)


def read_scale_source(meta: dict[str, Any], where: str | os.PathLike) -> str:
    """A model.json's `latent_scale_source`, one of `LATENT_SCALE_SOURCES` (a public run from
    before the key reads as `SCALE_FROM_AUTOENCODER`); anything else, or a DP run without
    the key (its scale might be a DP estimate), is a one-line error, since the label travels
    into child runs and releases."""
    if meta.get("private") and "latent_scale_source" not in meta:
        raise DpsynthError(f"{where}: a DP run without latent_scale_source")
    source = meta.get("latent_scale_source", SCALE_FROM_AUTOENCODER)
    if source not in LATENT_SCALE_SOURCES:
        raise DpsynthError(f"{where}: latent_scale_source: not one of the values training writes")
    return source


def sampling_settings(meta: dict[str, Any]) -> dict[str, Any]:
    """A run's sampling settings (model.json); a key the run predates reads as its default."""
    return {**dataclasses.asdict(SamplingConfig()), **meta.get("sampling", {})}


def save_weights(path: str | os.PathLike, state: dict[str, torch.Tensor]) -> None:
    """Write a flat tensor dict to a safetensors file atomically."""
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in state.items()}
    atomic_write_bytes(path, save_safetensors_bytes(tensors))


def load_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    path = Path(path)
    try:
        return load_safetensors_bytes(path.read_bytes())
    except FileNotFoundError:
        raise DpsynthError(f"{path}: weights file not found") from None
    except Exception as e:  # safetensors raises its own error types for corrupt files
        raise DpsynthError(f"{path}: unreadable safetensors file ({e})") from None


def lists_to_tuples(d: dict) -> dict:
    """A config section read from JSON, with lists back as tuples for the dataclasses."""
    return {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}


def load_autoencoder(run: str | os.PathLike, device: torch.device) -> tuple[torch.nn.Module, dict]:
    """The frozen autoencoder of a run, with its model.json (latent scale, shape, spacing)."""
    run = Path(run)
    meta = read_model_meta(run)
    model = build_autoencoder(AutoencoderConfig(**lists_to_tuples(meta["autoencoder"])))
    model.load_state_dict(load_weights(run / "autoencoder.safetensors"))
    model.to(device).eval().requires_grad_(False)
    return convolve_channels_last(model), meta  # frozen: no DP-SGD taps read it


def make_pipeline(
    autoencoder, denoiser, diffusion: DiffusionConfig, latent_scale: float, shape, spacing
) -> LatentDiffusion:
    """A `LatentDiffusion` from modules and the run's diffusion settings."""
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


def load(run: str | os.PathLike, device: str | torch.device | None = None) -> LatentDiffusion:
    """The `LatentDiffusion` pipeline of a trained LDM run (EMA weights; no unpickling).

    For inference: on the CPU its autoencoder and denoiser weights are stored channels-last
    (`convolve_channels_last`); to train one, build it as `training.ldm` does.
    """
    run = Path(run)
    meta = read_model_meta(run, kind="ldm")
    device = torch.device(device) if device else torch.device("cpu")
    autoencoder, _ = load_autoencoder(run, device)
    denoiser = build_denoiser(
        DenoiserConfig(**lists_to_tuples(meta["denoiser"])),
        num_slices=meta["shape"][0],
        latent_channels=autoencoder.latent_channels,
    )
    denoiser.load_state_dict(load_weights(run / "denoiser.safetensors"))
    # Channels-last: sampling and the audit run the denoiser 1.13x faster.
    convolve_channels_last(denoiser.to(device).eval())
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


def model_digest(run: str | os.PathLike) -> str:
    """One SHA-256 over a run's weight files: which model a synthetic set came from.

    Weights are a DP output of a DP run, so their digest may be released; model.json is
    left out (a run's copy may hold private-side fields that a release drops).
    """
    h = hashlib.sha256()
    for name in WEIGHT_FILES:
        h.update(bytes.fromhex(sha256_file(Path(run) / name)))
    return f"sha256:{h.hexdigest()}"


# -- a synthetic set's attributes.csv (its conditions) and provenance.json
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
                table[r - 2, INDEX[col.upper()]] = parse_number(
                    value, f"{path}: line {r}, column {col}"
                )
    if n is not None:
        table = table[np.arange(n) % len(table)]
    return table


def parse_number(text: str, where: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise DpsynthError(f"{where}: '{text}' is not a number") from None
    if math.isinf(value):
        raise DpsynthError(f"{where}: '{text}' is not a finite number")
    return value


def write_attributes_csv(path: str | os.PathLike, names: Sequence[str], table: np.ndarray) -> None:
    """A synthetic set's attributes.csv: `file`, then the 14 attributes (empty = unknown)."""
    with Path(path).open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["file", *ATTRIBUTES])
        for name, row in zip(names, table, strict=True):
            writer.writerow([name, *("" if not np.isfinite(v) else f"{v:.6g}" for v in row)])
