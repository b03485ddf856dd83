"""Best-of-k sampling: start k candidate trajectories per condition and finish the one whose
LV and RV blood-pool volumes and LV wall thickness a segmenter trained on public data
measures nearest the request (read from each candidate's predicted clean volume part-way,
`pipeline.CHOICE_FRACTION`).

Why: the demo's generator gets an end-systolic cavity right only to about 3 pixels of
diameter, as much as the cohort varies (BENCHMARKS.md, "Best-of-k sampling"); drawing a few
and keeping the closest is the cheapest way to volumes that show what was asked.

Privacy: choosing among a DP model's outputs with a function of public data alone is
post-processing, so ε is unchanged. A segmenter that learned from private data would not be:
its choices would carry that data. That the selector's data is public is the data
steward's declaration (`dpsynth train-referee --public`), as it is for `--init` runs;
`load_selector` refuses a selector without it, one whose cache the run's ledger names, and,
for each of the run's private caches at hand (`sample --private`), one whose meta lists any
of its patients (the digests of byte-identical prepared volumes, whatever the cache id).
It cannot detect those patients prepared otherwise (another grid, crop or library
version), a meta edited by hand, or another private cohort the run never touched.
"""

from __future__ import annotations

import os
import re
import reprlib
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from dpsynth.attributes import INDEX, N_ATTRIBUTES
from dpsynth.config import check_candidates
from dpsynth.data.cache import Cache
from dpsynth.data.measure import measure_volume
from dpsynth.diffusion.pipeline import SAMPLE_BATCH, Chooser
from dpsynth.errors import DpsynthError
from dpsynth.evaluation.controllability import MEASURED_ATTRIBUTES, Segmenter
from dpsynth.evaluation.referee import META_FILE, WEIGHTS_FILE, Referee
from dpsynth.io import read_json, sha256_file
from dpsynth.privacy.ledger import Ledger
from dpsynth.privacy.outputs import MARKER_FILE
from dpsynth.runs import run_ledger

# What the choice compares, each with its weight in the summed relative error. Wall
# thickness counts as much as a volume: over five DP models and both readers, full weight
# lifted thickness r by 0.03 on average over half weight (-0.01 to +0.09) for 0.005 of the
# volumes' (-0.02 to +0.02), and half weight had lifted it 0.04 over none (BENCHMARKS.md,
# "Best of 4, and what else the choice could weigh", "Five DP models").
SELECTION_WEIGHTS = {
    "LVEDV": 1.0, "LVESV": 1.0, "RVEDV": 1.0, "RVESV": 1.0, "MYOEDTHICK": 1.0, "MYOESTHICK": 1.0,
}  # fmt: skip
CACHE_ID = re.compile(r"[0-9a-f]{32}")  # `Cache.cache_id`: a uuid4 in hex
PATIENT_DIGEST = re.compile(r"[0-9a-f]{32}")  # one of `Cache.patient_digests`
SHA256 = re.compile(r"[0-9a-f]{64}")


def check_selector_record(
    record: Any, where: str | os.PathLike, shape: Sequence[int], spacing: Sequence[float]
) -> dict[str, Any]:
    """A provenance file's `selector`: exactly {cache_id, weights_sha256, public, shape,
    spacing, patients_checked_against}: the cache it learned from (hex id), its weights'
    digest, the steward's declaration that the cache is public (true), the model's grid
    (`shape`, `spacing`), and the ids of the private caches the patients its meta lists were
    checked against (`refuse_shared_patients`; absent in folders sampled before that check
    existed)."""
    keys = {"cache_id", "weights_sha256", "public", "shape", "spacing"}
    checked = record.get("patients_checked_against", []) if isinstance(record, dict) else None
    if not (
        isinstance(record, dict)
        and set(record) in (keys, keys | {"patients_checked_against"})
        and isinstance(checked, list)
        and all(isinstance(c, str) and CACHE_ID.fullmatch(c) for c in checked)
        and isinstance(record["cache_id"], str)
        and CACHE_ID.fullmatch(record["cache_id"])
        and isinstance(record["weights_sha256"], str)
        and SHA256.fullmatch(record["weights_sha256"])
        and record["public"] is True
    ):
        raise DpsynthError(
            f"{where}: expected {{cache_id, weights_sha256, public: true, shape, spacing, "
            "patients_checked_against}} "
            "as `dpsynth sample --selector` writes it"
        )
    if not _same_grid(record["shape"], record["spacing"], shape, spacing):
        raise DpsynthError(
            f"{where}: made for shape {reprlib.repr(record['shape'])} at "
            f"{reprlib.repr(record['spacing'])} mm, the model makes {tuple(shape)} at "
            f"{tuple(spacing)} mm"
        )
    return dict(record)


def _same_grid(shape: Any, spacing: Any, model_shape: Sequence, model_spacing: Sequence) -> bool:
    try:
        same_shape = [int(v) for v in shape] == [int(v) for v in model_shape]
        return same_shape and np.allclose(
            np.asarray(spacing, float), np.asarray(model_spacing, float)
        )
    except (TypeError, ValueError):
        return False


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


def refuse_shared_patients(
    meta: dict[str, Any], private: Sequence[str | os.PathLike], ledger: Ledger, where: str
) -> list[str]:
    """Refuse a selector whose meta lists any patient of the `private` caches (each one the
    run's ledger names), matched by byte-identical prepared volumes under any cache id, and
    return the ids checked; warn when they do not cover every cache the ledger names."""
    digests = meta.get("patient_digests")
    if not (
        isinstance(digests, list)
        and digests
        and all(isinstance(d, str) and PATIENT_DIGEST.fullmatch(d) for d in digests)
    ):
        raise DpsynthError(
            f"{where}: its meta lists no patient digests (trained by an older dpsynth), so it "
            "cannot be checked against private patients; train it again with "
            "`dpsynth train-referee --public`"
        )
    named, checked = ledger.cache_ids, set()
    for path in private:
        cache = Cache(path)
        if cache.cache_id not in named:
            raise DpsynthError(f"--private {path}: not a cache the run's ledger names")
        cache.require_patient_digests(f"--private {path}")
        shared = cache.shared_patients(digests)
        if shared:
            raise DpsynthError(
                f"{where}: learned from {shared} patients of the private cache {path}; "
                "best-of-k needs a segmenter trained on public data only"
            )
        checked.add(cache.cache_id)
    if named - checked:
        warnings.warn(
            f"{where} was not checked against the patients of {len(named - checked)} of the "
            f"{len(named)} private caches the run's ledger names; give --private CACHE for "
            "each, where they are at hand",
            stacklevel=3,
        )
    return sorted(checked)


def load_selector(
    path: str | os.PathLike,
    run: str | os.PathLike,
    shape: Sequence[int],
    spacing: Sequence[float],
    private: Sequence[str | os.PathLike] = (),
) -> tuple[Referee, dict[str, Any]]:
    """The segmenter at `path` and its provenance record, after checking that it is declared
    public, never learned from a cache `run`'s ledger names nor from a patient of the
    `private` caches at hand, and reads `shape` at `spacing`."""
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
    record = {
        "cache_id": meta["cache_id"],
        "weights_sha256": sha256_file(path / WEIGHTS_FILE),
        "public": True,
        "shape": meta.get("shape"),
        "spacing": meta.get("spacing"),
        "patients_checked_against": [],
    }
    record = check_selector_record(record, where, shape, spacing)
    ledger = run_ledger(run)  # lost or partial, it would let a private selector through
    refuse_private_selector(record, ledger, where)
    record["patients_checked_against"] = refuse_shared_patients(meta, private, ledger, where)
    return Referee.load(path), record


def request_error(
    selector: Segmenter, volumes: np.ndarray, attributes: np.ndarray, spacing: tuple
) -> tuple[np.ndarray, np.ndarray]:
    """Per volume, how many of the selected attributes its phase requests `selector` does
    not find, and the weighted sum (`SELECTION_WEIGHTS`) of the relative errors of those it
    finds; candidates rank by the first, then the second. A volume that requests none (or
    whose phase is unknown) scores (0, 0)."""
    missing, error = np.zeros(len(volumes), dtype=int), np.zeros(len(volumes))
    wanted = selectable(attributes)
    for i, mask in enumerate(selector.segment(volumes)):
        measured = measure_volume(mask, spacing)
        for attribute in wanted[i]:
            requested = float(attributes[i, INDEX[attribute]])
            found = measured[MEASURED_ATTRIBUTES[attribute][0]]
            if np.isfinite(found):
                error[i] += SELECTION_WEIGHTS[attribute] * abs(found - requested) / requested
            else:
                missing[i] += 1
    return missing, error


def selectable(attributes: np.ndarray) -> list[list[str]]:
    """Per row, the selected attributes the choice can compare: requested (finite, > 0) and
    of the row's phase (the per-phase rule of `controllability.MEASURED_ATTRIBUTES`)."""
    rows = []
    for row in attributes:
        phase = row[INDEX["ESED"]]
        rows.append([
            a
            for a in SELECTION_WEIGHTS
            if MEASURED_ATTRIBUTES[a][1] == phase and 0 < row[INDEX[a]] < np.inf  # NaN: False
        ])  # fmt: skip
    return rows


def nearest_candidate(selector: Segmenter, spacing: tuple) -> Chooser:
    """A `LatentDiffusion.sample` chooser: per volume, the candidate whose predicted volume
    `request_error` ranks first (fewest selected attributes not found, then the least
    weighted relative error; ties keep the earlier candidate)."""

    def choose(predicted: np.ndarray, attributes: np.ndarray) -> np.ndarray:
        scores = [request_error(selector, volumes, attributes, spacing) for volumes in predicted]
        missing, error = (np.stack(s) for s in zip(*scores, strict=True))
        return np.lexsort((error, missing), axis=0)[0]  # stable: ties keep the earlier

    return choose


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
    """`pipe.sample(n, attributes, seed=seed, start=start, **settings)` with `candidates`
    trajectories per volume, keeping the one `nearest_candidate` ranks first by `selector`
    (which must have passed `load_selector`: a segmenter of public data). Sampling is batch
    by batch (`SAMPLE_BATCH`), so any batch-aligned `start` gives the volumes one call over
    the cohort would; a batch with nothing to compare is sampled plainly."""
    check_candidates(candidates)
    if candidates == 1:
        return pipe.sample(n, attributes=attributes, seed=seed, start=start, progress=progress,
                           **settings)  # fmt: skip
    if selector is None:
        raise DpsynthError("--selector: best-of-k sampling needs one")
    if "batch_size" in settings:
        raise DpsynthError("best-of-k samples in batches of SAMPLE_BATCH; no batch_size")
    attributes = np.asarray(attributes, dtype=np.float32)
    if n < 1 or attributes.shape != (n, N_ATTRIBUTES):
        raise DpsynthError(
            f"attributes: expected shape ({n}, {N_ATTRIBUTES}), got {attributes.shape}"
        )
    if not any(selectable(attributes)):
        warnings.warn(
            f"best of {candidates}: no volume (of this share) requests a volume or wall "
            "thickness of a known phase, so every volume is its first candidate",
            stacklevel=2,
        )
    choose = nearest_candidate(selector, pipe.spacing)
    out = []
    with tqdm(total=n, desc=f"sampling, best of {candidates}", unit="volume",
              disable=not progress) as bar:  # fmt: skip
        for offset in range(0, n, SAMPLE_BATCH):
            rows = attributes[offset : offset + SAMPLE_BATCH]
            compare = any(selectable(rows))  # nothing to compare: keep the first candidate
            out.append(pipe.sample(
                len(rows), attributes=rows, seed=seed, start=start + offset, progress=False,
                candidates=candidates if compare else 1, choose=choose if compare else None,
                **settings,
            ))  # fmt: skip
            bar.update(len(rows))
    return np.concatenate(out)
