"""Volume sets for evaluation: a prepared cache split or a folder of NIfTI files."""

from __future__ import annotations

import csv
import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dpsynth.attributes import ATTRIBUTES, N_ATTRIBUTES
from dpsynth.data.cache import Cache, is_cache
from dpsynth.data.intensity import normalise
from dpsynth.errors import DpsynthError
from dpsynth.io import read_nifti

NIFTI_SUFFIXES = (".nii", ".nii.gz")


@dataclass
class VolumeSet:
    """Volumes (N, S, H, W) float32 in [0, 1] with raw attributes (N, 14), NaN if unknown."""

    volumes: np.ndarray
    attributes: np.ndarray
    spacing: tuple[float, float, float]
    names: list[str]
    masks: np.ndarray | None = None
    patients: np.ndarray | None = None  # patient id per volume, where known (a cache)
    source: str = ""

    def __len__(self) -> int:
        return len(self.volumes)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.volumes.shape[1:])

    def subset(self, indices: np.ndarray) -> VolumeSet:
        indices = np.asarray(indices)
        return VolumeSet(
            volumes=self.volumes[indices],
            attributes=self.attributes[indices],
            spacing=self.spacing,
            names=[self.names[i] for i in indices],
            masks=None if self.masks is None else self.masks[indices],
            patients=None if self.patients is None else self.patients[indices],
            source=self.source,
        )

    def fingerprint(self) -> str:
        """Content hash of the volumes and spacing (keys on-disk caches of derived features)."""
        h = hashlib.sha256()
        h.update(repr((self.volumes.shape, tuple(self.spacing))).encode())
        for volume in self.volumes:
            h.update(np.ascontiguousarray(volume, dtype=np.float32).tobytes())
        return h.hexdigest()


def load_volume_set(path: str | Path, split: str | None = "test") -> VolumeSet:
    """Load a prepared cache (its `split` rows; None = all) or a folder of NIfTI volumes.

    A NIfTI folder may hold `attributes.csv` (a `file` column plus attribute columns, as
    written by `dpsynth sample`); attributes it does not give are NaN.
    """
    path = Path(path)
    if not path.exists():
        raise DpsynthError(f"{path}: not found")
    if is_cache(path):
        return _load_cache(path, split)
    if path.is_dir():
        return _load_nifti_folder(path)
    raise DpsynthError(f"{path}: expected a prepared cache or a folder of NIfTI files")


def check_compatible(a: VolumeSet, b: VolumeSet) -> None:
    """Raise if two sets cannot be compared volume to volume."""
    if a.shape != b.shape:
        raise DpsynthError(
            f"{b.source}: volume shape {b.shape} differs from {a.source} shape {a.shape}"
        )


def normalise_intensity(volume: np.ndarray) -> np.ndarray:
    """A volume in [0, 1] as it is; any other on the prepared data's convention."""
    volume = np.nan_to_num(np.asarray(volume, dtype=np.float32))
    if volume.min() >= 0.0 and volume.max() <= 1.0:
        return volume
    return normalise(volume)


def _load_cache(path: Path, split: str | None) -> VolumeSet:
    cache = Cache(path)
    rows = cache.volume_indices(split)
    if len(rows) == 0:
        raise DpsynthError(f"{path}: no volumes in split {split!r}")
    phases = np.asarray(cache.phases)[rows]
    patients = np.asarray(cache.patients)[rows]
    return VolumeSet(
        volumes=np.asarray(cache.images[rows], dtype=np.float32),
        attributes=np.asarray(cache.attributes[rows], dtype=np.float32),
        spacing=tuple(float(s) for s in cache.spacing),
        names=[f"{p}_{ph}" for p, ph in zip(patients, phases, strict=True)],
        masks=None if cache.masks is None else np.asarray(cache.masks[rows]),
        patients=patients,
        source=f"{path}[{split or 'all'}]",
    )


def _load_nifti_folder(path: Path) -> VolumeSet:
    files = sorted(f for f in path.iterdir() if f.name.endswith(NIFTI_SUFFIXES))
    if not files:
        raise DpsynthError(f"{path}: no .nii or .nii.gz files")
    volumes, spacing = [], None
    for f in files:
        volume, file_spacing, _ = read_nifti(f)
        if volume.ndim != 3:
            raise DpsynthError(f"{f}: expected a 3D volume, got shape {volume.shape}")
        if volumes and volume.shape != volumes[0].shape:
            raise DpsynthError(
                f"{f}: shape {volume.shape} differs from {files[0].name} {volumes[0].shape}"
            )
        spacing = spacing or file_spacing
        volumes.append(normalise_intensity(volume))
    names = [f.name for f in files]
    return VolumeSet(
        volumes=np.stack(volumes),
        attributes=_read_attributes_csv(path / "attributes.csv", names),
        spacing=spacing,
        names=names,
        source=str(path),
    )


def _read_attributes_csv(csv_path: Path, names: list[str]) -> np.ndarray:
    attributes = np.full((len(names), N_ATTRIBUTES), np.nan, dtype=np.float32)
    if not csv_path.exists():
        return attributes
    row_of = {name: i for i, name in enumerate(names)}
    with open(csv_path, newline="") as f:
        reader = csv.DictReader(f)
        if "file" not in (reader.fieldnames or []):
            raise DpsynthError(f"{csv_path}: missing the 'file' column")
        for line, row in enumerate(reader, start=2):
            name = Path(row["file"]).name
            if name not in row_of:
                raise DpsynthError(f"{csv_path}: line {line}: file {name!r} not in the folder")
            for j, attribute in enumerate(ATTRIBUTES):
                value = (row.get(attribute) or "").strip()
                if value and value.lower() != "nan":
                    try:
                        attributes[row_of[name], j] = float(value)
                    except ValueError:
                        raise DpsynthError(
                            f"{csv_path}: line {line}: {attribute}={value!r} is not a number"
                        ) from None
    return attributes


def check_volume_array(shape: tuple[int, ...], divisor: int, reader: str) -> None:
    """Refuse anything but (N, S, H, W) with H and W divisible by `divisor` (a U-Net's
    in-plane downsampling), naming the `reader` that needs it."""
    if len(shape) != 4 or shape[2] % divisor or shape[3] % divisor:
        raise DpsynthError(
            f"{reader}: volumes must be (N, S, H, W) with H, W divisible by {divisor}, got {shape}"
        )
