"""Load a trained run and write synthetic cohorts: NIfTI volumes plus their conditions."""

from __future__ import annotations

import contextlib
import math
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch.distributed as dist

from dpsynth.attributes import ATTRIBUTES, INDEX
from dpsynth.config import check_candidates, check_sampling, check_seed
from dpsynth.diffusion.pipeline import CHOICE_FRACTION, shard
from dpsynth.errors import DpsynthError
from dpsynth.evaluation.selection import SELECTION_WEIGHTS, load_selector, sample_best_of
from dpsynth.io import atomic_dir, atomic_write_json, read_json, sha256_file, write_nifti
from dpsynth.privacy.attribute_model import load_attribute_model
from dpsynth.privacy.outputs import evaluation_only_marker, mark_evaluation_only
from dpsynth.runs import (
    CONDITIONING,
    PROVENANCE_FILE,
    load,
    model_digest,
    parse_number,
    read_conditions_csv,
    read_model_meta,
    sampling_settings,
    write_attributes_csv,
)
from dpsynth.training.common import (
    barrier,
    is_distributed,
    is_main,
    join_process_group,
    pick_device,
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
        table[:, INDEX[name]] = parse_number(value, f"--set {item}")
    return table


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


def warn_untaught(table: np.ndarray, untaught: Sequence[int]) -> None:
    """Warn for each attribute set in `table` that the model reads as unknown anyway."""
    for i in untaught:
        if np.isfinite(table[:, i]).any():
            warnings.warn(
                f"{ATTRIBUTES[i]} is set (by --set, the conditions or the DP attribute model) "
                "but the model never learned it (its training data never gave it): it is "
                "sampled as unknown",
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
    temperature: float | None = None,
    seed: int = 0,
    conditions_source: str = "user",
    candidates: int = 1,
    selector: str | os.PathLike | None = None,
    private: Sequence[str | os.PathLike] = (),
) -> Path:
    """Sample `n` volumes into `out`: `synth_00000.nii.gz`, ..., `attributes.csv` and
    `provenance.json` (the model's digest, the conditions' source, each file's SHA-256).

    Conditioning: a CSV, `attributes="dp"` (the run's DP attribute model), `--set` values
    applied to every row, or nothing (all unknown). `conditions_source` says where a CSV's
    rows came from (a key of `CONDITIONING`); "private" folders are labelled evaluation only
    (`EVALUATION_ONLY.txt`) and `dpsynth release` refuses them.
    `candidates` > 1: each volume is the best of that many, chosen by the segmenter at
    `selector`, trained on public data only (`dpsynth.evaluation.selection`); `private`,
    the run's private caches, lets sampling refuse a selector that learned from their patients.
    Under torchrun each rank samples its share (`pipeline.shard`) on its own GPU; the
    folder equals the one-process folder for the same seed.
    """
    if n < 1:
        raise DpsynthError(f"--n: must be >= 1, got {n}")
    _check_settings(guidance, temperature, seed, candidates)  # the user's, before any work
    if (candidates > 1) != (selector is not None):
        raise DpsynthError("--selector: give it exactly when --candidates is above 1")
    if private and selector is None:
        raise DpsynthError("--private: give it only with --selector (it checks the selector)")
    if conditions_source not in CONDITIONING:
        raise DpsynthError(
            f"--conditions-source: {conditions_source!r} is not one of {', '.join(CONDITIONING)}"
        )
    if attributes == "dp":
        conditions_source = "dp"
    elif conditions_source == "dp":
        raise DpsynthError("--conditions-source dp: use --attributes dp")
    elif attributes is not None and conditions_source != "private":
        _refuse_evaluation_only_conditions(Path(attributes))

    run = Path(run)
    segmenter, selector_record = (
        _selector(run, selector, private) if candidates > 1 else (None, None)
    )
    join_process_group()  # under torchrun: each rank samples its own share (see `_shards`)
    pipe = load(run, device=pick_device())
    if attributes == "dp":
        table = _dp_conditions(run, n, seed)
    elif attributes is not None:
        table = read_conditions_csv(attributes, n)
    else:
        table = np.full((n, len(ATTRIBUTES)), np.nan, dtype=np.float32)
    overrides = parse_settings(settings, n)
    table = np.where(np.isfinite(overrides), overrides, table)
    if is_main():
        warn_out_of_range(table, pipe.run_meta.get("attribute_ranges", {}))
        warn_untaught(table, pipe.denoiser.attribute_encoder.untaught())
    defaults = sampling_settings(pipe.run_meta)
    sampler = sampler or defaults["sampler"]
    if steps is None and sampler != "ddpm":  # DDPM always runs all T steps
        steps = defaults["steps"]
    if guidance is None:
        guidance = defaults["guidance"]
    if temperature is None:
        temperature = defaults["temperature"]
    names = [f"synth_{i:05d}.nii.gz" for i in range(n)]
    with atomic_dir(out) if is_main() else contextlib.nullcontext() as tmp:
        tmp, part, ranks = _shards(tmp, n)
        try:
            count = part.stop - part.start  # 0 on a rank left without a whole batch
            volumes = sample_best_of(
                pipe,
                count,
                table[part],
                seed,
                candidates,
                segmenter,
                sampler=sampler,
                steps=steps,
                guidance=guidance,
                temperature=temperature,
                progress=is_main(),
                start=part.start,
            ) if count else []  # fmt: skip
            for name, volume in zip(names[part], volumes, strict=True):
                write_nifti(tmp / name, volume, pipe.spacing)
            outcome = {name: sha256_file(tmp / name) for name in names[part]}
        except Exception as e:  # every rank must reach the gather below, or the job hangs
            if ranks == 1:
                raise
            outcome = f"{type(e).__name__}: {e}"
        digests = _gather_digests(outcome, ranks)
        if is_main():
            write_attributes_csv(tmp / "attributes.csv", names, table)
            digests["attributes.csv"] = sha256_file(tmp / "attributes.csv")
            if conditions_source == "private":  # real private attributes, in clear
                mark_evaluation_only(tmp)
            provenance = {
                "model_digest": model_digest(run),
                "conditioning": conditions_source,
                "conditioning_meaning": CONDITIONING[conditions_source],
                "sampler": sampler,
                "steps": steps,
                "guidance": guidance,
                "temperature": temperature,
                "seed": seed,
                "candidates": candidates,
                # The rule: folders without choice_fraction were chosen from finished
                # volumes; without choice_weights (before a5225b6), by the LV and RV volumes
                # at equal weights (at 9366f2e alone: SELECTION_WEIGHTS' thickness too).
                **(
                    {
                        "selector": selector_record,
                        "choice_fraction": CHOICE_FRACTION,
                        "choice_weights": dict(SELECTION_WEIGHTS),
                    }
                    if selector_record
                    else {}
                ),
                "files": {p: digests[p] for p in [*names, "attributes.csv"]},
            }
            atomic_write_json(tmp / PROVENANCE_FILE, provenance)
    barrier()  # no rank returns before rank 0 has renamed the finished folder into place
    return Path(out)


def _refuse_evaluation_only_conditions(csv: Path) -> None:
    """Refuse conditions from an evaluation-only place unless they are declared private: a
    CSV under an `EVALUATION_ONLY.txt` (e.g. the sweep's real test rows) or the
    attributes.csv of a folder sampled on private rows. Read as user-specified, its rows
    (real patients' attributes) would be released with the samples."""
    provenance = csv.resolve().parent / PROVENANCE_FILE  # a link's target folder
    record = read_json(provenance) if provenance.is_file() else {}
    private = isinstance(record, dict) and record.get("conditioning") == "private"
    label = evaluation_only_marker(csv) or (provenance if private else None)
    if label is not None:
        raise DpsynthError(
            f"{csv}: evaluation only ({label}): its rows may be real private attributes; "
            "pass --conditions-source private (the samples are then evaluation only too)"
        )


def _check_settings(
    guidance: float | None, temperature: float | None, seed: int, candidates: int
) -> None:
    """The flags given that `sample` and a later release refuse, as one line naming the flag
    (settings left to the run's model.json are checked by `LatentDiffusion.sample`)."""
    try:
        check_sampling(guidance, temperature)
        check_seed(seed)
        check_candidates(candidates)
    except DpsynthError as e:
        raise DpsynthError(f"--{e}") from None


def _selector(run: Path, selector: str | os.PathLike, private: Sequence) -> tuple:
    """The best-of-k selector and its provenance record, checked against the run's model.json
    grid and ledger before any work."""
    meta = read_model_meta(run, kind="ldm")
    return load_selector(selector, run, tuple(meta["shape"]), tuple(meta["spacing"]), private)


def _shards(tmp: Path | None, n: int) -> tuple[Path, slice, int]:
    """The shared staging folder (rank 0's), this rank's slice of the cohort, the world size.

    torchrun ranks are assumed to share a filesystem (one node, or `out` on shared storage).
    """

    if not is_distributed():
        return tmp, slice(0, n), 1
    box = [str(tmp) if tmp is not None else None]
    dist.broadcast_object_list(box, src=0)
    rank, ranks = dist.get_rank(), dist.get_world_size()
    return Path(box[0]), shard(n, rank, ranks), ranks


def _gather_digests(outcome: dict[str, str] | str, ranks: int) -> dict[str, str]:
    """All ranks' {file: SHA-256}; a rank's error string fails every rank with one line."""

    if ranks == 1:
        return dict(outcome)
    outcomes: list = [None] * ranks
    dist.all_gather_object(outcomes, outcome)
    for rank, o in enumerate(outcomes):
        if isinstance(o, str):
            raise DpsynthError(f"sample: rank {rank} of {ranks} failed ({o}); nothing written")
    return {name: digest for o in outcomes for name, digest in o.items()}


def _dp_conditions(run: Path, n: int, seed: int) -> np.ndarray:
    """Draw conditions from the DP attribute model attached to the run (post-processing)."""

    model = load_attribute_model(run)
    rows = model.sample((n + 1) // 2, np.random.default_rng(seed))
    return rows[:n].astype(np.float32)
