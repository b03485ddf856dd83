"""The prepared cache: memory-mapped volumes, their attribute table, and torch Datasets.

One format, one module: :class:`CacheWriter` writes it (for :mod:`dpsynth.data.prepare`),
:class:`Cache` reads it. Layout (see docs/ARCHITECTURE.md)::

    CACHE/images.npy      float16 (N, S, H, W) in [0, 1]
    CACHE/masks.npy       uint8 (N, S, H, W), only when every volume has a mask
    CACHE/attributes.csv  patient, phase, split, then the 14 attributes; row i <-> images[i]
    CACHE/meta.json       shape, spacing, counts, cache_id, content_digest, patient_digests, ...

``cache_id`` is random (drawn once by prepare): runs and ledgers name their data by it.
``content_digest`` (SHA-256 of images + table without its split column) stays inside the
cache, which is private and never released; it only tells whether two caches at hand hold
the same data, however they were split. ``patient_digests`` (a SHA-256 prefix of each
patient's two prepared volumes) stay inside too: they tell whether two caches share any
patient (a subset, a superset, one patient skipped), for the public-vs-private refusal. Only
a public cache's are copied out, into a best-of-k selector's meta, so that sampling can
refuse a selector that learned from patients of the run's private cache.

Every patient has two consecutive rows, ED then ES. Arrays are opened with
``np.load(mmap_mode="r")`` so cohorts larger than RAM are read lazily, page by page.
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
import uuid
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from dpsynth.attributes import ATTRIBUTES, ESED_CODE, INDEX, N_ATTRIBUTES, PHASES
from dpsynth.errors import DpsynthError
from dpsynth.io import atomic_write_json, atomic_write_text, read_json

# 2: ANGLE signed in patient coordinates, DEPTH = slices the heart spans, arrays in the
# canonical in-plane orientation (dpsynth.orientation). 1: ANGLE in [0, 360) of the array.
FORMAT_VERSION = 2
IMAGES_FILE = "images.npy"
MASKS_FILE = "masks.npy"
ATTRIBUTES_FILE = "attributes.csv"
META_FILE = "meta.json"
SPLITS = ("train", "val", "test")
TABLE_COLUMNS = ("patient", "phase", "split", *ATTRIBUTES)


class CacheWriter:
    """Streams patients into ``images.npy``/``masks.npy`` memmaps; :meth:`finish` writes the
    attribute table and ``meta.json``. Writes into `directory`, which must exist."""

    def __init__(self, directory: str | os.PathLike, capacity: int, shape: Sequence[int]):
        self.directory = Path(directory)
        self.shape = tuple(int(s) for s in shape)
        full = (capacity, *self.shape)
        self._images = np.lib.format.open_memmap(
            self.directory / IMAGES_FILE, mode="w+", dtype=np.float16, shape=full
        )
        self._masks = np.lib.format.open_memmap(
            self.directory / MASKS_FILE, mode="w+", dtype=np.uint8, shape=full
        )
        self._has_masks = True
        self.patients: list[str] = []
        self._attributes: list[np.ndarray] = []
        self._digests: list[str] = []

    @property
    def n_patients(self) -> int:
        return len(self.patients)

    def add_patient(
        self, patient: str, images: np.ndarray, masks: np.ndarray | None, attributes: np.ndarray
    ) -> None:
        """Append one patient: images (2, S, H, W) in [0, 1], masks or None, attributes (2, 14)."""
        row = 2 * self.n_patients
        if row + 2 > len(self._images):
            raise ValueError("CacheWriter capacity exceeded")
        expected = (len(PHASES), *self.shape)
        if np.shape(images) != expected or (masks is not None and np.shape(masks) != expected):
            raise ValueError(f"images and masks must have shape {expected}")
        self._images[row : row + 2] = images
        stored = np.ascontiguousarray(self._images[row : row + 2])  # the bytes a reader sees
        self._digests.append(hashlib.sha256(stored.tobytes()).hexdigest()[:32])
        if masks is None:
            self._has_masks = False
        elif self._has_masks:
            self._masks[row : row + 2] = masks
        values = np.array(attributes, dtype=np.float32).reshape(len(PHASES), N_ATTRIBUTES)
        values[:, INDEX["ESED"]] = [ESED_CODE[p] for p in PHASES]  # always agrees with the phase
        self.patients.append(patient)
        self._attributes.append(values)

    def finish(self, splits: Mapping[str, str], spacing: Sequence[float], **meta) -> dict:
        """Trim the arrays to the patients written, write the table and meta; returns meta."""
        n = 2 * self.n_patients
        images = self._trim(IMAGES_FILE, self._images, n)
        if self._has_masks:
            self._trim(MASKS_FILE, self._masks, n)
        else:
            (self.directory / MASKS_FILE).unlink()
        self._images = self._masks = None
        table = self._table(splits)
        atomic_write_text(self.directory / ATTRIBUTES_FILE, table)
        digest = hashlib.sha256()
        for start in range(0, n, 256):  # chunked: the images may not fit in RAM
            digest.update(np.ascontiguousarray(images[start : start + 256]).tobytes())
        # The data without the split column: the split depends on the seed, and a new seed
        # must not make the same data look new to `Cache.same_data`.
        digest.update(self._table(dict.fromkeys(self.patients, "")).encode())
        split_counts = {s: sum(1 for p in self.patients if splits[p] == s) for s in SPLITS}
        meta = {
            "format_version": FORMAT_VERSION,
            "shape": list(self.shape),
            "spacing": [float(s) for s in spacing],
            **meta,
            "counts": {"patients": self.n_patients, "volumes": n, **split_counts},
            # A random name for runs to cite; the digest never leaves the cache (see cache.py).
            "cache_id": uuid.uuid4().hex,
            "content_digest": f"sha256:{digest.hexdigest()}",
            "patient_digests": self._digests,
            "has_masks": self._has_masks,
        }
        atomic_write_json(self.directory / META_FILE, meta)
        return meta

    def _trim(self, name: str, array: np.memmap, n: int) -> np.ndarray:
        """The first n rows of `array` as the file `name` (copied in chunks when shorter)."""
        array.flush()
        if len(array) == n:
            return array
        path = self.directory / name
        trimmed = np.lib.format.open_memmap(
            path.with_suffix(".tmp"), mode="w+", dtype=array.dtype, shape=(n, *array.shape[1:])
        )
        for start in range(0, n, 256):
            stop = min(start + 256, n)
            trimmed[start:stop] = array[start:stop]
        trimmed.flush()
        os.replace(path.with_suffix(".tmp"), path)
        return np.load(path, mmap_mode="r")

    def _table(self, splits: Mapping[str, str]) -> str:
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(TABLE_COLUMNS)
        for patient, values in zip(self.patients, self._attributes, strict=True):
            for phase, row in zip(PHASES, values, strict=True):
                cells = ["" if np.isnan(v) else str(v) for v in row]  # float32: shortest round-trip
                writer.writerow([patient, phase, splits[patient], *cells])
        return buffer.getvalue()


def is_cache(path: str | os.PathLike) -> bool:
    """Whether `path` looks like a prepared cache (`Cache(path)` then checks it in full)."""
    path = Path(path)
    return (path / META_FILE).is_file() and (path / IMAGES_FILE).is_file()


def load_volumes(images: np.ndarray, rows: np.ndarray) -> torch.Tensor:
    """Rows of a (memory-mapped) (N, S, H, W) array as a float32 (..., 1, S, H, W) tensor."""
    return _read(images, rows).float()[..., None, :, :, :]


class Cache:
    """Read-only view of a prepared cache; arrays are memory-mapped, never loaded whole."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not (self.path / META_FILE).is_file():
            raise DpsynthError(f"{self.path}: not a prepared cache (no {META_FILE})")
        self.meta = read_json(self.path / META_FILE)
        if self.meta.get("format_version") != FORMAT_VERSION:
            raise DpsynthError(
                f"{self.path / META_FILE}: cache format {self.meta.get('format_version')!r} is not "
                f"{FORMAT_VERSION} (attribute definitions changed); re-run `dpsynth prepare`"
            )
        if not isinstance(self.meta.get("cache_id"), str) or not self.meta["cache_id"]:
            raise DpsynthError(
                f"{self.path / META_FILE}: no cache_id (prepared by an older dpsynth); "
                "re-run `dpsynth prepare`"
            )
        self.images: np.ndarray = np.load(self.path / IMAGES_FILE, mmap_mode="r")
        self.masks: np.ndarray | None = (
            np.load(self.path / MASKS_FILE, mmap_mode="r") if self.meta["has_masks"] else None
        )
        self.patients, self.phases, self.splits, self.attributes = _read_table(
            self.path / ATTRIBUTES_FILE
        )
        self._check()

    def __getstate__(self) -> dict:
        # Worker processes reopen the files: pickling a memmap would copy the whole array.
        return {"path": self.path}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["path"])

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.meta["shape"])

    @property
    def cache_id(self) -> str:
        """The random id that names this cache in runs and ledgers (never a digest)."""
        return self.meta["cache_id"]

    def same_data(self, other: Cache) -> bool:
        """True when `other` is this cache, a copy of it, or a re-preparation of its data."""
        digest = self.meta.get("content_digest")
        return self.cache_id == other.cache_id or (
            digest is not None and digest == other.meta.get("content_digest")
        )

    @property
    def patient_digests(self) -> list[str]:
        """Each patient's digest (empty for caches written before they existed)."""
        return list(self.meta.get("patient_digests", ()))

    def require_patient_digests(self, where: str) -> list[str]:
        """`patient_digests`, or a one-line error naming `where` for a cache without them."""
        if not self.patient_digests:
            raise DpsynthError(
                f"{where}: lists no patient digests (prepared by an older dpsynth); re-run "
                "`dpsynth prepare`"
            )
        return self.patient_digests

    def shared_patients(self, digests: Iterable[str]) -> int:
        """How many of the patients `digests` names (another cache's, a public selector's)
        this cache holds, prepared alike (0 for caches written before patient digests
        existed; `same_data` still covers copies of those)."""
        return len(set(self.patient_digests).intersection(digests))

    @property
    def spacing(self) -> tuple[float, float, float]:
        return tuple(self.meta["spacing"])

    def __len__(self) -> int:
        return len(self.images)

    def volume_indices(self, split: str | None = None) -> np.ndarray:
        """Row indices of the volumes in `split` (all rows when None)."""
        if split is None:
            return np.arange(len(self))
        if split not in SPLITS:
            raise DpsynthError(
                f"split: unknown split {split!r} (expected one of {', '.join(SPLITS)})"
            )
        return np.flatnonzero(self.splits == split)

    def patient_rows(self, split: str | None = None) -> np.ndarray:
        """(P, 2) array of the [ED, ES] row indices of each patient in `split`."""
        rows = self.volume_indices(split)
        return rows[self.phases[rows] == "ED"][:, None] + np.array([0, 1])

    def _check(self) -> None:
        table = self.path / ATTRIBUTES_FILE
        n = len(self.images)
        if self.images.ndim != 4 or tuple(self.images.shape[1:]) != self.shape:
            raise DpsynthError(
                f"{self.path / IMAGES_FILE}: shape {self.images.shape} does not match meta"
            )
        if len(self.patients) != n or (
            self.masks is not None and self.masks.shape != self.images.shape
        ):
            raise DpsynthError(f"{table}: {len(self.patients)} rows for {n} volumes")
        ed, es = self.phases[0::2], self.phases[1::2]
        if (
            n % 2
            or (ed != "ED").any()
            or (es != "ES").any()
            or (self.patients[0::2] != self.patients[1::2]).any()
        ):
            raise DpsynthError(f"{table}: rows must come in pairs ED then ES per patient")
        if (self.splits[0::2] != self.splits[1::2]).any():
            raise DpsynthError(f"{table}: the ED and ES rows of a patient must share a split")


def _read_table(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    with open(path, newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if tuple(header or ()) != TABLE_COLUMNS:
            raise DpsynthError(f"{path}: header must be {', '.join(TABLE_COLUMNS)}")
        rows = list(reader)
    columns = list(zip(*rows, strict=True)) if rows else [()] * len(TABLE_COLUMNS)
    values = np.array(
        [[float(v) if v else np.nan for v in row[3:]] for row in rows], dtype=np.float32
    ).reshape(len(rows), N_ATTRIBUTES)
    return (
        np.array(columns[0], dtype=str),
        np.array(columns[1], dtype=str),
        np.array(columns[2], dtype=str),
        values,
    )


class _CacheDataset(Dataset):
    """Items read from cache rows ``self.rows``; an array of positions reads a whole batch."""

    rows: np.ndarray

    def __init__(self, cache: Cache, with_masks: bool = False):
        if with_masks and cache.masks is None:
            raise DpsynthError(f"{cache.path}: cache has no masks")
        self.cache = cache
        self.with_masks = with_masks

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i) -> dict[str, torch.Tensor]:
        rows = self.rows[i]
        item = {
            "image": load_volumes(self.cache.images, rows),
            "attributes": torch.from_numpy(self.cache.attributes[rows]),
            "index": torch.as_tensor(rows),
        }
        if self.with_masks:
            item["mask"] = _read(self.cache.masks, rows)[..., None, :, :, :]
        return item

    def loader(
        self, batch_size: int, shuffle: bool = True, drop_last: bool = False, **kwargs
    ) -> torch.utils.data.DataLoader:
        """A DataLoader reading each batch with one memmap read instead of item by item.

        On the 2-core reference machine this path reaches the loading target in the main
        process (``num_workers=0``); worker processes only add inter-process copies.
        """
        base = torch.utils.data.RandomSampler(self) if shuffle else range(len(self))
        sampler = torch.utils.data.BatchSampler(base, batch_size, drop_last)
        # batch_size=None: each sampled item is already a batch, so nothing is re-stacked.
        return torch.utils.data.DataLoader(self, sampler=sampler, batch_size=None, **kwargs)


class VolumeDataset(_CacheDataset):
    """One item per volume of `split`: ``{"image": (1, S, H, W) f32, "attributes": (14,) raw,
    "index": cache row}``, plus ``"mask": (1, S, H, W) uint8`` when `with_masks`."""

    def __init__(self, cache: Cache, split: str | None = None, with_masks: bool = False):
        super().__init__(cache, with_masks)
        self.rows = cache.volume_indices(split)


class PatientDataset(_CacheDataset):
    """One item per patient of `split`, the unit of privacy for patient-level DP-SGD:
    ``{"image": (2, 1, S, H, W) f32, "attributes": (2, 14), "index": (2,) rows [ED, ES]}``."""

    def __init__(self, cache: Cache, split: str | None = None, with_masks: bool = False):
        super().__init__(cache, with_masks)
        self.rows = cache.patient_rows(split)


def _read(array: np.ndarray, rows: np.ndarray) -> torch.Tensor:
    """array[rows] as a tensor, read in sorted row order (one sequential pass over the file).

    Callers convert float16 with torch, whose vectorised cast is ~20x numpy's here.
    """
    if np.ndim(rows) == 0:
        return torch.from_numpy(np.array(array[rows]))
    flat = np.asarray(rows).ravel()
    order = np.argsort(flat, kind="stable")
    data = array[flat[order]][np.argsort(order)]
    return torch.from_numpy(data).reshape(*np.shape(rows), *array.shape[1:])
