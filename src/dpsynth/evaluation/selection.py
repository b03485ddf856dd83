"""Best-of-k sampling: draw k candidate volumes per condition and keep the one whose LV and
RV blood-pool volumes a segmenter trained on public data measures nearest the request.

Why: the demo's generator gets an end-systolic cavity right only to about 3 pixels of
diameter, as much as the cohort varies (BENCHMARKS.md, "Best-of-k sampling"); drawing a few
and keeping the closest is the cheapest way to volumes that show what was asked.

Privacy: choosing among a DP model's outputs with a function of public data alone is
post-processing, so ε is unchanged. A segmenter that learned from private data would not be:
its choices would carry that data. That the selector's data is public is the data
steward's declaration (`dpsynth train-referee --public`), as it is for `--init` runs;
`load_selector` refuses a selector without it, and one whose cache the run's ledger names.
It cannot detect the private patients prepared again under a new cache id, or another
private cohort the run never touched.
"""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from dpsynth.attributes import INDEX
from dpsynth.config import check_candidates
from dpsynth.data.measure import measure_volume
from dpsynth.diffusion.pipeline import SAMPLE_BATCH
from dpsynth.errors import DpsynthError
from dpsynth.evaluation.controllability import MEASURED_ATTRIBUTES, Segmenter
from dpsynth.evaluation.referee import META_FILE, WEIGHTS_FILE, Referee
from dpsynth.io import read_json, sha256_file
from dpsynth.privacy.ledger import Ledger
from dpsynth.privacy.outputs import MARKER_FILE

# The per-phase volumes the choice compares; wall thickness is left out: the segmenter
# reads it too coarsely (referee ceiling r 0.72-0.86 at the demo's 3.65 mm reading grid).
SELECTED_ATTRIBUTES = ("LVEDV", "LVESV", "RVEDV", "RVESV")
CACHE_ID = re.compile(r"[0-9a-f]{32}")  # `Cache.cache_id`: a uuid4 in hex
SHA256 = re.compile(r"[0-9a-f]{64}")
MISSING = 1e6  # error per requested structure the segmenter does not find: worse than any miss


def candidate_seed(seed: int, candidate: int) -> int:
    """The sampling seed of candidate `candidate` (0 keeps `seed`, so k = 1 is plain sampling);
    the others are NumPy's independent child streams of `seed`."""
    if candidate == 0:
        return seed
    state = np.random.SeedSequence(seed, spawn_key=(candidate,)).generate_state(1, np.uint64)
    return int(state[0] >> 1)


def check_selector_record(record: Any, where: str | os.PathLike) -> dict[str, str]:
    """A provenance file's `selector`: exactly {cache_id, weights_sha256} in hex."""
    if not (
        isinstance(record, dict)
        and set(record) == {"cache_id", "weights_sha256"}
        and isinstance(record["cache_id"], str)
        and CACHE_ID.fullmatch(record["cache_id"])
        and isinstance(record["weights_sha256"], str)
        and SHA256.fullmatch(record["weights_sha256"])
    ):
        raise DpsynthError(f"{where}: selector: expected {{cache_id, weights_sha256}} in hex")
    return dict(record)


def refuse_private_selector(record: dict[str, str], ledger: Ledger, where: str) -> None:
    """Refuse a selector whose cache the ledger names (the ledger's definition of private
    data), and any selector when a ledger entry names no cache (its data is unknown, so a
    selector cannot be shown apart from it)."""
    if any(not e.cache_id for e in ledger):
        raise DpsynthError(
            f"{where}: the run's ledger has an entry that names no cache (an older run), so "
            "the selector cannot be checked against its private data"
        )
    if ledger.not_dp([{"cache_id": record["cache_id"], "dp": False}]):
        raise DpsynthError(
            f"{where}: trained on cache {record['cache_id']}, which the run's ledger names as "
            "private; best-of-k needs a segmenter trained on public data only"
        )


def load_selector(
    path: str | os.PathLike, run: str | os.PathLike, shape: tuple, spacing: tuple
) -> tuple[Referee, dict[str, str]]:
    """The segmenter at `path` and its provenance record, after checking that it is declared
    public, never learned from data `run`'s ledger names, and reads `shape` at `spacing`."""
    path = Path(path)
    where = f"--selector {path}"
    if not (path / META_FILE).is_file() or not (path / WEIGHTS_FILE).is_file():
        raise DpsynthError(f"{where}: not a segmenter folder (dpsynth train-referee --public)")
    meta = read_json(path / META_FILE)
    if (
        not isinstance(meta, dict)
        or meta.get("public") is not True
        or (path / MARKER_FILE).exists()
    ):
        raise DpsynthError(
            f"{where}: not declared trained on public data only "
            "(train it with `dpsynth train-referee --public` on a public cache)"
        )
    if "cache_id" not in meta:
        raise DpsynthError(f"{where}: its meta names no cache_id, so its data is unknown")
    record = {"cache_id": meta["cache_id"], "weights_sha256": sha256_file(path / WEIGHTS_FILE)}
    record = check_selector_record(record, where)
    refuse_private_selector(record, Ledger.load(run, missing_ok=True), where)
    grid = (tuple(meta.get("shape", ())), tuple(float(s) for s in meta.get("spacing", ())))
    if grid != (tuple(shape), tuple(float(s) for s in spacing)):
        raise DpsynthError(
            f"{where}: trained on {grid[0]} at {grid[1]} mm, the model makes {tuple(shape)} "
            f"at {tuple(spacing)} mm"
        )
    return Referee.load(path), record


def request_error(
    selector: Segmenter, volumes: np.ndarray, attributes: np.ndarray, spacing: tuple
) -> np.ndarray:
    """Per volume, the summed relative error of the selected volumes its phase requests, as
    `selector` measures them; `MISSING` for each such structure it does not find. A volume
    that requests none (or whose phase is unknown) scores 0."""
    error = np.zeros(len(volumes))
    wanted = selectable(attributes)
    for i, mask in enumerate(selector.segment(volumes)):
        measured = measure_volume(mask, spacing)
        for attribute in wanted[i]:
            requested = float(attributes[i, INDEX[attribute]])
            found = measured[MEASURED_ATTRIBUTES[attribute][0]]
            error[i] += abs(found - requested) / requested if np.isfinite(found) else MISSING
    return error


def selectable(attributes: np.ndarray) -> list[list[str]]:
    """Per row, the selected attributes the choice can compare: requested (finite, > 0) and
    of the row's phase."""
    rows = []
    for row in attributes:
        phase = row[INDEX["ESED"]]
        rows.append([
            a
            for a in SELECTED_ATTRIBUTES
            if MEASURED_ATTRIBUTES[a][1] == phase and row[INDEX[a]] > 0  # NaN compares False
        ])  # fmt: skip
    return rows


def sample_best_of(
    pipe: Any,
    n: int,
    attributes: np.ndarray,
    seed: int,
    candidates: int = 1,
    selector: Segmenter | None = None,
    start: int = 0,
    progress: bool = True,
    **settings: Any,
) -> np.ndarray:
    """`pipe.sample(n, attributes, seed=seed, start=start, **settings)`, drawn `candidates`
    times (seeds from `candidate_seed`), keeping per volume the candidate nearest its
    request; ties keep the earlier candidate. Sampling batch by batch keeps two batches in
    memory, and any batch-aligned `start` gives the volumes one call over the cohort would."""
    check_candidates(candidates)
    if candidates == 1:
        return pipe.sample(n, attributes=attributes, seed=seed, start=start, progress=progress,
                           **settings)  # fmt: skip
    if selector is None:
        raise DpsynthError("--selector: best-of-k sampling needs one")
    if not any(selectable(attributes)):
        warnings.warn(
            f"best of {candidates}: no volume requests an LV or RV volume of a known phase, so "
            "every volume is its first candidate",
            stacklevel=2,
        )
    out = []
    bar = tqdm(total=n * candidates, desc=f"sampling, best of {candidates}", unit="volume",
               disable=not progress)  # fmt: skip
    try:
        for offset in range(0, n, SAMPLE_BATCH):
            rows = attributes[offset : offset + SAMPLE_BATCH]
            best, error = None, None
            for candidate in range(candidates):
                volumes = pipe.sample(
                    len(rows), attributes=rows, seed=candidate_seed(seed, candidate),
                    start=start + offset, progress=False, **settings,
                )  # fmt: skip
                e = request_error(selector, volumes, rows, pipe.spacing)
                if best is None:
                    best, error = volumes, e
                else:
                    better = e < error
                    best[better], error[better] = volumes[better], e[better]
                bar.update(len(rows))
            out.append(best)
    finally:
        bar.close()
    return np.concatenate(out)
