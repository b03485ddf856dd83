"""Best-of-k sampling: draw k candidate volumes per condition and keep the one whose LV and
RV blood-pool volumes a segmenter trained on public data measures nearest the request.

Why: the demo's generator gets an end-systolic cavity right only to about 3 pixels of
diameter, as much as the cohort varies (BENCHMARKS.md, "Best-of-k sampling"); drawing a few
and keeping the closest is the cheapest way to volumes that show what was asked.

Privacy: choosing among a DP model's outputs with a function of public data alone is
post-processing, so ε is unchanged. A segmenter that learned from the run's private data
would not be: its choices would carry that data. `load_selector` therefore refuses a
segmenter trained on any cache the run's ledger names (the ledger's definition of private
data); that its own cache is public is the user's word, as it is for `--init` runs.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from dpsynth.config import check_candidates
from dpsynth.data.volumes import VolumeSet
from dpsynth.errors import DpsynthError
from dpsynth.evaluation.controllability import rows_from_masks
from dpsynth.evaluation.referee import META_FILE, WEIGHTS_FILE, Referee
from dpsynth.io import read_json, sha256_file
from dpsynth.privacy.ledger import Ledger

# The per-phase volumes the choice compares; wall thickness is left out: the segmenter
# reads it too coarsely (referee ceiling r 0.72-0.86 at the demo's 3.65 mm reading grid).
SELECTED_ATTRIBUTES = ("LVEDV", "LVESV", "RVEDV", "RVESV")
CACHE_ID = re.compile(r"[0-9a-f]{32}")  # `Cache.cache_id`: a uuid4 in hex
DIGEST = re.compile(r"[0-9a-f]{64}")


def candidate_seed(seed: int, candidate: int) -> int:
    """The sampling seed of candidate `candidate` (0 keeps `seed`, so k = 1 is plain sampling);
    the others are NumPy's independent child streams of `seed`."""
    if candidate == 0:
        return seed
    state = np.random.SeedSequence(seed, spawn_key=(candidate,)).generate_state(1, np.uint64)
    return int(state[0] >> 1)


def check_selector_record(record: Any, where: str | os.PathLike) -> dict[str, str]:
    """A provenance file's `selector`: exactly {cache_id, weights_sha256}, the id of the cache
    it learned from and its weights' digest (a release copies them into a public file)."""
    if not (
        isinstance(record, dict)
        and set(record) == {"cache_id", "weights_sha256"}
        and isinstance(record["cache_id"], str)
        and CACHE_ID.fullmatch(record["cache_id"])
        and isinstance(record["weights_sha256"], str)
        and DIGEST.fullmatch(record["weights_sha256"])
    ):
        raise DpsynthError(f"{where}: selector: expected {{cache_id, weights_sha256}} in hex")
    return dict(record)


def refuse_private_selector(record: dict[str, str], ledger: Ledger, where: str) -> None:
    """A selector that learned from a cache the ledger names would make the choice, and so the
    released volumes, depend on private data without DP."""
    if ledger.not_dp([{"cache_id": record["cache_id"], "dp": False}]):
        raise DpsynthError(
            f"{where}: trained on cache {record['cache_id']}, which the run's ledger names as "
            "private; best-of-k needs a segmenter trained on public data only"
        )


def load_selector(path: str | os.PathLike, run: str | os.PathLike) -> tuple[Referee, dict]:
    """The segmenter at `path` and its provenance record, after checking it never learned from
    `run`'s private data."""
    path = Path(path)
    where = f"--selector {path}"
    if not (path / META_FILE).is_file() or not (path / WEIGHTS_FILE).is_file():
        raise DpsynthError(f"{where}: not a segmenter folder (dpsynth train-referee)")
    meta = read_json(path / META_FILE)
    if not isinstance(meta, dict) or "cache_id" not in meta:
        raise DpsynthError(
            f"{where}: its meta names no cache_id, so what it learned from is unknown"
        )
    record = {"cache_id": meta["cache_id"], "weights_sha256": sha256_file(path / WEIGHTS_FILE)}
    record = check_selector_record(record, where)
    refuse_private_selector(record, Ledger.load(run, missing_ok=True), where)
    return Referee.load(path), record


def request_error(
    selector: Referee, volumes: np.ndarray, attributes: np.ndarray, spacing: tuple
) -> np.ndarray:
    """Per volume, the summed relative error of the selected volumes its phase requests
    (0 where it requests none; infinite where the segmenter finds no such blood pool)."""
    names = [str(i) for i in range(len(volumes))]
    batch = VolumeSet(volumes, attributes, spacing, names)
    error = np.zeros(len(volumes))
    for name, attribute, requested, measured, _ in rows_from_masks(
        batch, selector.segment(volumes), "candidate"
    ):
        if attribute in SELECTED_ATTRIBUTES:
            miss = abs(measured - requested) / abs(requested) if np.isfinite(measured) else np.inf
            error[int(name)] += miss
    return error


def sample_best_of(
    pipe: Any,
    n: int,
    attributes: np.ndarray,
    seed: int,
    candidates: int = 1,
    selector: Referee | None = None,
    **settings: Any,
) -> np.ndarray:
    """`pipe.sample(n, attributes, seed=seed, **settings)` drawn `candidates` times (seeds
    from `candidate_seed`), keeping per volume the candidate nearest its request; ties keep
    the earlier candidate."""
    check_candidates(candidates)
    best = pipe.sample(n, attributes=attributes, seed=seed, **settings)
    if candidates == 1:
        return best
    if selector is None:
        raise DpsynthError("best-of-k sampling needs a selector")
    error = request_error(selector, best, attributes, pipe.spacing)
    for candidate in range(1, candidates):
        volumes = pipe.sample(
            n, attributes=attributes, seed=candidate_seed(seed, candidate), **settings
        )
        candidate_error = request_error(selector, volumes, attributes, pipe.spacing)
        better = candidate_error < error
        best[better], error[better] = volumes[better], candidate_error[better]
    return best
