"""File handling shared by every stage: atomic outputs and NIfTI volumes as (slices, H, W)."""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from dpsynth.errors import DpsynthError
from dpsynth.orientation import array_affine


@contextlib.contextmanager
def atomic_dir(out: str | os.PathLike) -> Iterator[Path]:
    """Build a directory in a temporary sibling and rename it to `out` only on success.

    An existing `out` is replaced only after the new one is complete, so a failure leaves
    whatever was there before (or nothing) and never a half-written result.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


RUN_LOCK = "run.lock"


@contextlib.contextmanager
def hold_run(run: str | os.PathLike) -> Iterator[Path]:
    """Hold `run` (created if absent) for this process while it trains or writes into it.

    A second holder fails at once with one line: two resumes of one run would both retrain
    the steps after their checkpoint with fresh noise while the ledger counts them once,
    and a budget check beside a running stage would not see the steps it is still taking.
    An advisory ``flock`` on ``RUN/run.lock`` (POSIX; elsewhere no lock), released on exit.
    """
    run = Path(run)
    run.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl  # optional: POSIX only
    except ImportError:  # pragma: no cover - Windows
        yield run
        return
    fd = os.open(run / RUN_LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise DpsynthError(
                f"{run}: another dpsynth process is training or writing in this run; "
                "wait for it to finish"
            ) from None
        yield run
    finally:
        os.close(fd)  # closing releases the lock


def atomic_write_bytes(path: str | os.PathLike, data: bytes, fsync: bool = True) -> None:
    """Write `data` to a temporary file in the same folder, fsync, then rename over `path`.

    `fsync=False` skips the flush for bulk outputs (thousands of volumes) where the
    enclosing `atomic_dir` rename already gives all-or-nothing.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, allow_nan=True) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise DpsynthError(f"{path}: file not found") from None
    except json.JSONDecodeError as e:
        raise DpsynthError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None


def sha256_file(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes, as hex (read in blocks: volumes and weights can be large)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_nifti(
    path: str | os.PathLike,
) -> tuple[np.ndarray, tuple[float, float, float], np.ndarray]:
    """Read a NIfTI file as float32 (slices, H, W[, T]) with spacing (dz, dy, dx) in mm.

    NIfTI stores (x, y, z[, t]); dpsynth works in (z, y, x) = (slices, rows, columns).
    Returns the array, the spacing and the affine. Errors name the file.
    """
    path = Path(path)
    if not path.exists():
        raise DpsynthError(f"{path}: file not found")
    try:
        img = nib.load(str(path))
        data = np.asarray(img.dataobj, dtype=np.float32)
    except Exception as e:  # nibabel raises many types for corrupt files
        raise DpsynthError(
            f"{path}: unreadable NIfTI ({type(e).__name__}: {e})".replace("\n", " ")
        ) from None
    if data.ndim not in (3, 4):
        raise DpsynthError(f"{path}: expected a 3D or 4D image, got {data.ndim}D")
    zooms = img.header.get_zooms()
    spacing = (float(zooms[2]), float(zooms[1]), float(zooms[0]))
    if not all(np.isfinite(s) and s > 0 for s in spacing):
        raise DpsynthError(f"{path}: invalid voxel spacing {spacing}")
    axes = (2, 1, 0, 3) if data.ndim == 4 else (2, 1, 0)
    return np.ascontiguousarray(data.transpose(axes)), spacing, img.affine


def write_nifti(
    path: str | os.PathLike,
    volume: np.ndarray,
    spacing: tuple[float, float, float],
    dtype: type = np.float32,
    label: bool = False,
    affine: np.ndarray | None = None,
) -> None:
    """Write a (slices, H, W) volume with spacing (dz, dy, dx) mm, atomically.

    The affine defaults to :func:`dpsynth.orientation.array_affine`: the orientation dpsynth
    assumes for its arrays, so a written volume reads back (and is prepared) with the same
    ANGLE. Another `affine` (voxel (column, row, slice) -> mm) describes an array stored
    otherwise, as scanners do (the simulator's flipped or transposed files).

    `label=True` marks a segmentation (NIfTI intent "label").
    """
    gz = str(path).endswith(".gz")
    data = nifti_bytes(volume, spacing, dtype, label, gz, affine)
    atomic_write_bytes(path, data, fsync=False)


def nifti_bytes(
    volume: np.ndarray,
    spacing: tuple[float, float, float],
    dtype: type = np.float32,
    label: bool = False,
    gz: bool = True,
    affine: np.ndarray | None = None,
) -> bytes:
    """The bytes of :func:`write_nifti`'s file (gzipped with `gz`), for serving without a file."""
    dz, dy, dx = (float(s) for s in spacing)
    data = np.asarray(volume).transpose(2, 1, 0).astype(dtype)
    img = nib.Nifti1Image(data, array_affine((dz, dy, dx)) if affine is None else affine)
    img.header.set_zooms((dx, dy, dz))
    img.header.set_xyzt_units("mm")
    if label:
        img.header.set_intent("label")
    raw = img.to_bytes()
    return _gzip(raw) if gz else raw


def _gzip(raw: bytes) -> bytes:
    return gzip.compress(raw, compresslevel=1, mtime=0)
