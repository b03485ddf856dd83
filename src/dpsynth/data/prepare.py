"""Preparation: read a dataset layout, derive attributes, preprocess, write the cache.

Each volume is oriented base -> apex, resampled in-plane to the target spacing (slices are
kept, not resampled), turned in-plane into the canonical orientation of
:mod:`dpsynth.orientation` (from its NIfTI affine: however the scanner stored the array, the
cached array shows the heart the same way, so the ANGLE it is conditioned on is the one it
shows), intensity-normalised to [0, 1] and cropped or padded to (S, H, W) around the heart. Volumes stream into memory-mapped ``.npy`` files one patient at a time,
so cohorts larger than RAM can be prepared. The cache is built in a temporary directory
and renamed on success: a failure leaves nothing at ``out``.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import ndimage
from tqdm import tqdm

from dpsynth.attributes import ESED_CODE, INDEX, N_ATTRIBUTES, PHASES, ejection_fraction
from dpsynth.config import DEFAULT_SHAPE, DEFAULT_SPACING
from dpsynth.data.cache import (
    SPLITS,
    CacheWriter,
)
from dpsynth.data.intensity import NORMALISATION, normalise
from dpsynth.data.layouts import Volume, load_patient, read_layout
from dpsynth.data.measure import heart_depth, measure_volume
from dpsynth.errors import DpsynthError
from dpsynth.io import atomic_dir
from dpsynth.orientation import frame


@dataclass
class PrepareReport:
    """What :func:`prepare` wrote and what it skipped."""

    out: Path
    counts: dict[str, int]
    cache_id: str
    has_masks: bool
    skipped: list[dict[str, str]] = field(default_factory=list)  # {"patient", "reason"}

    def summary(self) -> str:
        c = self.counts
        lines = [
            f"{self.out}: {c['patients']} patients, {c['volumes']} volumes "
            f"(train {c['train']}, val {c['val']}, test {c['test']} patients), "
            f"masks {'yes' if self.has_masks else 'no'}, cache id {self.cache_id}"
        ]
        lines += [f"skipped {s['patient']}: {s['reason']}" for s in self.skipped]
        return "\n".join(lines)


def prepare(
    layout: str,
    src: str | os.PathLike,
    out: str | os.PathLike,
    attributes_csv: str | os.PathLike | None = None,
    split: Sequence[float] = (0.8, 0.1, 0.1),
    seed: int = 0,
    shape: Sequence[int] = DEFAULT_SHAPE,
    spacing: Sequence[float] = DEFAULT_SPACING,
    prefer_csv_attributes: bool = False,
    skip_bad: bool = False,
) -> PrepareReport:
    """Prepare dataset `src` (in `layout`) into the cache directory `out`.

    Attributes are measured from the masks where present; table values (CSV, Info.cfg)
    fill what masks cannot give, or win when `prefer_csv_attributes`. `spacing` is
    (dz, dy, dx) in mm: dy, dx are resampling targets; slices are kept, so dz is nominal
    (recorded in meta.json next to the source slice spacings actually found).
    With `skip_bad`, a patient with bad input is left out and listed in the report instead
    of failing the whole run.
    """
    ratios = _check_split(split)
    shape = _check_triple(shape, "shape", int)
    spacing = _check_triple(spacing, "spacing", float)
    records = read_layout(layout, src, attributes_csv)
    skipped: list[dict[str, str]] = []
    slice_spacings: set[float] = set()
    with atomic_dir(out) as tmp:
        writer = CacheWriter(tmp, capacity=2 * len(records), shape=shape)
        for record in tqdm(records, desc="prepare", unit="patient", disable=None):
            try:
                volumes = load_patient(record)
                prepared = [preprocess_volume(volumes[p], shape, spacing) for p in PHASES]
                attributes = patient_attributes(
                    volumes,
                    record.attributes,
                    prefer_csv_attributes,
                    prepared_masks={p: m for p, (_, m) in zip(PHASES, prepared, strict=True)},
                )
            except DpsynthError as e:
                if not skip_bad:
                    raise
                skipped.append({"patient": record.patient, "reason": str(e)})
                continue
            images, masks = zip(*prepared, strict=True)
            slice_spacings.update(round(volumes[p].spacing[0], 3) for p in PHASES)
            writer.add_patient(record.patient, np.stack(images), _stack_masks(masks), attributes)
        if writer.n_patients == 0:
            raise DpsynthError(f"{src}: no usable patients ({len(skipped)} skipped)")
        meta = writer.finish(
            assign_splits(writer.patients, ratios, seed),
            spacing=spacing,
            layout=layout,
            source=str(Path(src).resolve()),
            # Slices are kept, so the true slice spacing is the source's, recorded here.
            source_slice_spacing=sorted(slice_spacings),
            normalisation=NORMALISATION,
            split_ratios=list(ratios),
            seed=seed,
            attribute_source="csv first" if prefer_csv_attributes else "masks first, csv fills",
            skipped=skipped,
        )
    return PrepareReport(Path(out), meta["counts"], meta["cache_id"], meta["has_masks"], skipped)


# --- attributes ---------------------------------------------------------------------------


def patient_attributes(
    volumes: Mapping[str, Volume],
    given: Mapping[str, Mapping[str, float]],
    prefer_given: bool = False,
    prepared_masks: Mapping[str, np.ndarray | None] | None = None,
) -> np.ndarray:
    """(2, 14) raw attributes, rows ED then ES: measured from masks, merged with `given`.

    Measured values win unless `prefer_given`; either way a value missing on one side is
    taken from the other, and anything missing on both stays NaN. ANGLE is measured in
    patient coordinates (each volume's affine); DEPTH on `prepared_masks` where given (the
    slices the heart spans in the volume the model sees, which cropping may shorten).
    """
    m = {
        p: measure_volume(v.mask, v.spacing, v.affine) if v.mask is not None else {}
        for p, v in volumes.items()
    }
    for p, mask in (prepared_masks or {}).items():
        if mask is not None and m.get(p):
            m[p]["DEPTH"] = heart_depth(mask)
    nan = float("nan")
    ed, es = m["ED"], m["ES"]
    measured = {
        "LVEDV": ed.get("LV_ML", nan),
        "LVESV": es.get("LV_ML", nan),
        "RVEDV": ed.get("RV_ML", nan),
        "RVESV": es.get("RV_ML", nan),
        "MYOEDTHICK": ed.get("MYO_THICK", nan),
        "MYOESTHICK": es.get("MYO_THICK", nan),
    }
    rows = np.full((len(PHASES), N_ATTRIBUTES), np.nan)
    for i, phase in enumerate(PHASES):
        # ANGLE and DEPTH describe each volume; a mask without heart labels has DEPTH 0.
        own = {**measured, "ANGLE": m[phase].get("ANGLE", nan), "DEPTH": m[phase].get("DEPTH", nan)}
        for name, value in own.items():
            rows[i, INDEX[name]] = value
        table = given.get(phase, {})
        for name, value in table.items():
            if prefer_given or not np.isfinite(rows[i, INDEX[name]]):
                rows[i, INDEX[name]] = value
        # EF follows the volumes chosen above, unless the table's EF is preferred.
        for ef, edv, esv in (("LVEF", "LVEDV", "LVESV"), ("RVEF", "RVEDV", "RVESV")):
            computed = ejection_fraction(rows[i, INDEX[edv]], rows[i, INDEX[esv]])
            if np.isfinite(computed) and not (prefer_given and ef in table):
                rows[i, INDEX[ef]] = computed
        rows[i, INDEX["ESED"]] = ESED_CODE[phase]
    return rows.astype(np.float32)


# --- preprocessing ------------------------------------------------------------------------


def preprocess_volume(
    volume: Volume, shape: Sequence[int], spacing: Sequence[float]
) -> tuple[np.ndarray, np.ndarray | None]:
    """Orient, resample in-plane, normalise and crop/pad one volume to `shape`.

    Returns a float32 image in [0, 1] and the uint8 mask (or None) on the same grid.
    """
    image, mask = volume.image, volume.mask
    if mask is not None and _apex_first(mask):
        image, mask = image[::-1], mask[::-1]
    zoom = (1.0, volume.spacing[1] / spacing[1], volume.spacing[2] / spacing[2])
    if not np.allclose(zoom, 1.0, rtol=1e-4):
        # grid_mode: pixels are areas, so the field of view is preserved exactly.
        image = ndimage.zoom(image, zoom, order=1, mode="nearest", grid_mode=True)
        if mask is not None:
            mask = ndimage.zoom(mask, zoom, order=0, mode="nearest", grid_mode=True)
    image = normalise(image)
    if volume.affine is not None:
        image, mask = to_canonical(image, mask, volume.affine, spacing)
    if mask is not None and (mask > 0).any():
        # Centre on the LV: its slice extent, and its in-plane centroid.
        lv = np.isin(mask, (1, 2))
        heart = lv if lv.any() else mask > 0
        rows = np.flatnonzero(heart.any(axis=(1, 2)))
        _, row, col = ndimage.center_of_mass(heart)
        centre = [(rows[0] + rows[-1]) / 2, row, col]
    else:
        centre = [(n - 1) / 2 for n in image.shape]
    windows = [_window(n, m, c) for n, m, c in zip(image.shape, shape, centre, strict=True)]
    src = tuple(w[0] for w in windows)
    dst = tuple(w[1] for w in windows)
    out_image = np.zeros(shape, dtype=np.float32)
    out_image[dst] = image[src]
    if mask is None:
        return out_image, None
    out_mask = np.zeros(shape, dtype=np.uint8)
    out_mask[dst] = mask[src]
    return out_image, out_mask


def to_canonical(
    image: np.ndarray, mask: np.ndarray | None, affine: np.ndarray, spacing: Sequence[float]
) -> tuple[np.ndarray, np.ndarray | None]:
    """Turn (slices, H, W) arrays in-plane into dpsynth's assumed orientation.

    `affine` gives the stored axes' directions (its scale is ignored: the arrays are already
    at the in-plane `spacing` (dz, dy, dx)). Output columns run along -u and rows along -v of
    :func:`dpsynth.orientation.frame`; the grid grows to hold the turned slice, the new
    corners are 0. Flips and transposes are exact (nearest neighbour on the integer grid);
    other turns interpolate the image linearly and the mask by nearest neighbour.
    """
    axes = frame(affine)
    if axes is None:  # no defined orientation (ANGLE is NaN too): keep the array as stored
        return image, mask
    u, v, _ = axes
    a = np.asarray(affine, dtype=np.float64)[:3, :3]
    dy, dx = float(spacing[1]), float(spacing[2])
    # Stored (row, column) steps and wanted ones, as world vectors in mm.
    stored = np.column_stack(
        [a[:, 1] / np.linalg.norm(a[:, 1]) * dy, a[:, 0] / np.linalg.norm(a[:, 0]) * dx]
    )
    wanted = np.column_stack([-v * dy, -u * dx])
    turn = np.linalg.lstsq(stored, wanted, rcond=None)[0]  # wanted (row, col) -> stored index
    if np.allclose(turn, np.eye(2), atol=1e-6):
        return image, mask
    exact = np.allclose(np.abs(turn), np.round(np.abs(turn)), atol=1e-6)
    if exact:
        turn = np.round(turn)
    size = np.array(image.shape[1:], dtype=np.float64)
    half = np.abs(np.linalg.inv(turn)) @ ((size - 1) / 2)
    out = np.ceil(2 * half - 1e-6).astype(int) + 1
    matrix = np.eye(3)
    matrix[1:, 1:] = turn
    offset = np.concatenate([[0.0], (size - 1) / 2 - turn @ ((out - 1) / 2)])
    shape = (image.shape[0], *out)

    def resample(array: np.ndarray, order: int) -> np.ndarray:
        return ndimage.affine_transform(
            array, matrix, offset, output_shape=shape, order=order, mode="constant", cval=0
        )

    image = resample(image, 0 if exact else 1)
    return image, None if mask is None else resample(mask, 0)


def _apex_first(mask: np.ndarray) -> bool:
    """True when the LV cavity shrinks towards slice 0, i.e. the stack runs apex -> base."""
    area = (mask == 1).sum(axis=(1, 2)).astype(np.float64)
    index = np.flatnonzero(area)
    if index.size < 2:
        return False
    # Sign of the least-squares slope of cavity area against slice index.
    return float(np.cov(index, area[index])[0, 1]) > 0


def _window(size: int, target: int, centre: float) -> tuple[slice, slice]:
    """Source and destination slices taking `target` samples of an axis around `centre`.

    The window stays inside the data where the axis is long enough (crop) and keeps all of
    it where it is too short (pad), placing `centre` as near the middle as that allows.
    """
    start = int(round(centre - (target - 1) / 2))
    start = min(max(start, min(0, size - target)), max(0, size - target))
    src = slice(max(start, 0), min(start + target, size))
    dst = slice(src.start - start, src.stop - start)
    return src, dst


def _stack_masks(masks: Sequence[np.ndarray | None]) -> np.ndarray | None:
    return None if any(m is None for m in masks) else np.stack(masks)


# --- splits and the cache writer ----------------------------------------------------------


def assign_splits(patients: Sequence[str], ratios: Sequence[float], seed: int) -> dict[str, str]:
    """Patient -> "train"/"val"/"test" from a keyed hash of that patient's id alone.

    HMAC-SHA256 of the id under a key derived from `seed`, read as a number in [0, 1) and
    cut by `ratios`. A patient's split never depends on who else is in the cohort (a
    permutation of the whole cohort would move many patients when one is added or removed,
    so the splits themselves would tell neighbouring datasets apart); the split sizes are
    therefore the ratios only in expectation.
    """
    key = f"dpsynth-split:{seed}".encode()
    cuts = np.cumsum(ratios)[:-1]
    splits = {}
    for patient in patients:
        digest = hmac.new(key, str(patient).encode(), hashlib.sha256).digest()
        u = int.from_bytes(digest[:8], "big") / 2.0**64
        splits[patient] = SPLITS[int(np.searchsorted(cuts, u, side="right"))]
    return splits


# --- argument checks ----------------------------------------------------------------------


def _check_split(split: Sequence[float]) -> tuple[float, float, float]:
    try:
        ratios = tuple(float(r) for r in split)
    except (TypeError, ValueError):
        raise DpsynthError(f"split: expected three fractions, got {split!r}") from None
    if len(ratios) != 3 or min(ratios) < 0 or abs(sum(ratios) - 1.0) > 1e-6:
        raise DpsynthError(
            f"split: expected three non-negative fractions summing to 1, got {split!r}"
        )
    return ratios


def _check_triple(values: Sequence, name: str, kind: type) -> tuple:
    try:
        triple = tuple(kind(v) for v in values)
    except (TypeError, ValueError):
        raise DpsynthError(f"{name}: expected three numbers, got {values!r}") from None
    if len(triple) != 3 or min(triple) <= 0:
        raise DpsynthError(f"{name}: expected three positive numbers, got {values!r}")
    return triple
