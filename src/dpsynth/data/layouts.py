"""Readers for the on-disk dataset layouts users bring: ukbb, acdc, mnms and manifest.

A reader lists patients as :class:`PatientRecord` objects: where each phase's image and
mask live and the clinical attributes given by the dataset's tables. Listing is cheap (CSV
and Info.cfg files only); voxels are read per patient by :func:`load_patient`, so a cohort
larger than RAM streams through preparation. A patient that cannot be listed (bad table
value, missing phase) is still returned, with ``error`` set, so callers can skip it.

On-disk forms (BRIEF section 4):

- ``ukbb``: ``SRC/<id>/sa_ED.nii.gz, sa_ES.nii.gz, seg_sa_ED.nii.gz, seg_sa_ES.nii.gz`` and
  an optional attributes CSV keyed by ``id``.
- ``acdc``: ``SRC/**/patientNNN/Info.cfg`` (ED, ES, Height, Weight, ...),
  ``patientNNN_frameXX.nii.gz`` and ``patientNNN_frameXX_gt.nii.gz`` (labels 1 RV, 2 myo,
  3 LV, converted on load).
- ``mnms``: ``SRC/**/<code>/<code>_sa.nii.gz`` (4D) and ``<code>_sa_gt.nii.gz`` (4D masks),
  plus the information CSV (``--attributes``, or the only ``*.csv`` in SRC) giving 0-based
  ED/ES frames, age, sex, height, weight.
- ``manifest``: a CSV (SRC) with ``image, mask, patient, phase`` (mask may be empty) and
  optional attribute columns; relative paths are resolved against the CSV's folder.

Accepted column names are matched ignoring case, spaces, punctuation and a trailing unit
in parentheses: the patient key ``id``/``eid``/``patient``/``patient_id``/``subject``/
``subject_id``/``external code``/``code``; any of the 14 attributes except ESED; ``height``
or ``height_cm`` (cm), ``weight`` or ``weight_kg`` (kg), ``gender`` for SEX; for mnms also ``ed``, ``es`` and the ignored
descriptive columns ``vendor``, ``vendorname``, ``centre``/``center``, ``pathology``.
SEX may be 0/1, M/F or male/female. Any other column is an error naming it.
"""

from __future__ import annotations

import configparser
import csv
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dpsynth.attributes import ATTRIBUTES, PHASES, bmi
from dpsynth.errors import DpsynthError
from dpsynth.io import read_nifti

LAYOUTS = ("ukbb", "acdc", "mnms", "manifest")

# File label -> dpsynth label (1 LV blood, 2 LV myocardium, 3 RV blood).
ACDC_LABELS = (0, 3, 2, 1)
IDENTITY_LABELS = (0, 1, 2, 3)

_KEY_COLUMNS = {"id", "eid", "patient", "patientid", "subject", "subjectid", "externalcode", "code"}
_CSV_ATTRIBUTES = {a.lower(): a for a in ATTRIBUTES if a != "ESED"} | {"gender": "SEX"}
_BODY_COLUMNS = {"height": "HEIGHT", "heightcm": "HEIGHT", "weight": "WEIGHT", "weightkg": "WEIGHT"}
_MNMS_IGNORED = {"vendor", "vendorname", "centre", "center", "pathology"}
_MANIFEST_COLUMNS = {"image", "mask", "patient", "phase"}
_MISSING = {"", "nan", "na", "n/a", "none", "null"}
_SEX_CODES = {"0": 0.0, "1": 1.0, "f": 0.0, "female": 0.0, "m": 1.0, "male": 1.0}


@dataclass(frozen=True)
class VolumeSource:
    """Where one phase of a patient lives on disk."""

    image: Path
    mask: Path | None = None
    frame: int | None = None  # time index into 4D files (M&Ms); None for 3D files
    labels: tuple[int, ...] = IDENTITY_LABELS  # lookup table file label -> dpsynth label


@dataclass
class PatientRecord:
    """One patient as listed by a reader; voxels are read later by :func:`load_patient`."""

    patient: str
    volumes: dict[str, VolumeSource] = field(default_factory=dict)  # phase "ED"/"ES"
    attributes: dict[str, dict[str, float]] = field(default_factory=dict)  # phase -> given values
    error: str | None = None  # why this patient cannot be used, if known at listing


@dataclass
class Volume:
    """One loaded, validated phase: (slices, H, W) float32 image, uint8 mask in dpsynth labels,
    and the image's NIfTI affine (voxel (column, row, slice) -> patient mm), which defines
    ANGLE (:mod:`dpsynth.orientation`); None means dpsynth's assumed array orientation."""

    image: np.ndarray
    mask: np.ndarray | None
    spacing: tuple[float, float, float]
    affine: np.ndarray | None = None


def read_layout(
    layout: str, src: str | Path, attributes_csv: str | Path | None = None
) -> list[PatientRecord]:
    """List the patients of dataset `src` stored in `layout`, sorted by patient id."""
    readers: dict[str, Callable[[Path, Path | None], list[PatientRecord]]] = {
        "ukbb": _read_ukbb,
        "acdc": _read_acdc,
        "mnms": _read_mnms,
        "manifest": _read_manifest,
    }
    if layout not in readers:
        raise DpsynthError(
            f"layout: unknown layout {layout!r} (expected one of {', '.join(LAYOUTS)})"
        )
    src = Path(src)
    if not src.exists():
        raise DpsynthError(f"{src}: not found")
    csv_path = Path(attributes_csv) if attributes_csv is not None else None
    if csv_path is not None and not csv_path.is_file():
        raise DpsynthError(f"{csv_path}: attributes CSV not found")
    records = sorted(readers[layout](src, csv_path), key=lambda r: r.patient)
    if not records:
        raise DpsynthError(f"{src}: no patients found for layout {layout!r}")
    for a, b in zip(records, records[1:], strict=False):
        if a.patient == b.patient:
            raise DpsynthError(f"{src}: patient id {a.patient!r} appears more than once")
    return records


def load_patient(record: PatientRecord) -> dict[str, Volume]:
    """Read and validate the ED and ES volumes of `record`; errors name the offending file."""
    if record.error:
        raise DpsynthError(record.error)
    files: dict[Path, tuple[np.ndarray, tuple[float, float, float], np.ndarray]] = {}

    def read(path: Path) -> tuple[np.ndarray, tuple[float, float, float], np.ndarray]:
        if path not in files:  # ED and ES of a 4D file share one read
            files[path] = read_nifti(path)
        return files[path]

    return {phase: _load_volume(record.volumes[phase], read) for phase in PHASES}


def _load_volume(source: VolumeSource, read: Callable) -> Volume:
    data, spacing, affine = read(source.image)
    image, spacing = _frame(source.image, data, spacing, source.frame)
    if not np.isfinite(image).all():
        raise DpsynthError(f"{source.image}: image has non-finite voxels (NaN or inf)")
    if not np.isfinite(affine).all():
        raise DpsynthError(f"{source.image}: affine has non-finite entries")
    if source.mask is None:
        return Volume(image, None, spacing, affine)
    data, mask_spacing, _ = read(source.mask)
    mask, mask_spacing = _frame(source.mask, data, mask_spacing, source.frame)
    if mask.shape != image.shape:
        raise DpsynthError(
            f"{source.mask}: mask shape {mask.shape} differs from image shape {image.shape}"
        )
    if not np.allclose(mask_spacing, spacing, rtol=1e-3):
        raise DpsynthError(
            f"{source.mask}: mask spacing {mask_spacing} differs from image spacing {spacing}"
        )
    labels = np.asarray(source.labels, dtype=np.uint8)
    if not np.isin(mask, np.arange(len(labels))).all():
        raise DpsynthError(
            f"{source.mask}: mask values must be the labels 0..{len(labels) - 1}"
            f" (found {sorted(np.unique(mask)[:8].tolist())})"
        )
    mask = labels[mask.astype(np.uint8)]
    if not mask.any():
        raise DpsynthError(f"{source.mask}: empty mask (no labelled voxels)")
    return Volume(image, mask, spacing, affine)


def _frame(path: Path, data: np.ndarray, spacing, frame: int | None) -> tuple[np.ndarray, tuple]:
    """The 3D volume at `frame` of a 4D file, or the 3D file itself."""
    if frame is None:
        if data.ndim == 4 and data.shape[3] == 1:
            return data[..., 0], spacing
        if data.ndim == 4:
            raise DpsynthError(f"{path}: expected a 3D volume, got 4D with {data.shape[3]} frames")
        return data, spacing
    if data.ndim != 4:
        raise DpsynthError(f"{path}: expected a 4D (cine) file, got {data.ndim}D")
    if not 0 <= frame < data.shape[3]:
        raise DpsynthError(f"{path}: frame {frame} out of range (file has {data.shape[3]} frames)")
    return np.ascontiguousarray(data[..., frame]), spacing


# --- layouts -----------------------------------------------------------------------------


def _read_ukbb(src: Path, csv_path: Path | None) -> list[PatientRecord]:
    table = _AttributeTable(csv_path) if csv_path else None
    records = []
    for folder in sorted(p for p in src.iterdir() if p.is_dir() and not p.name.startswith(".")):
        # Segmentations are optional, but only as a pair: one without the other is an error.
        segs = {phase: folder / f"seg_sa_{phase}.nii.gz" for phase in PHASES}
        with_masks = any(seg.exists() for seg in segs.values())
        volumes = {
            phase: VolumeSource(folder / f"sa_{phase}.nii.gz", segs[phase] if with_masks else None)
            for phase in PHASES
        }
        records.append(_record(folder.name, volumes, table))
    return records


def _read_acdc(src: Path, csv_path: Path | None) -> list[PatientRecord]:
    table = _AttributeTable(csv_path) if csv_path else None
    records = []
    for cfg in sorted(src.rglob("Info.cfg")):
        patient = cfg.parent.name
        try:
            info = _read_info_cfg(cfg)
            volumes = {}
            for phase in PHASES:
                if phase not in info:
                    raise DpsynthError(f"{cfg}: missing key {phase!r}")
                frame = _parse_int(info[phase], f"{cfg}: {phase}")
                stem = cfg.parent / f"{patient}_frame{frame:02d}"
                mask = Path(f"{stem}_gt.nii.gz")
                volumes[phase] = VolumeSource(
                    Path(f"{stem}.nii.gz"), mask if mask.exists() else None, labels=ACDC_LABELS
                )
        except DpsynthError as e:
            records.append(PatientRecord(patient, error=str(e)))
            continue
        # Height and weight come from Info.cfg; a CSV row, if given, adds to or overrides them.
        body = {k: info[k] for k in _BODY_COLUMNS if k in info}
        records.append(_record(patient, volumes, table, defaults=body, where=str(cfg)))
    return records


def _read_mnms(src: Path, csv_path: Path | None) -> list[PatientRecord]:
    if csv_path is None:
        found = sorted(p for p in src.glob("*.csv"))
        if len(found) != 1:
            raise DpsynthError(
                f"{src}: mnms needs its information CSV (pass --attributes; found {len(found)} *.csv in SRC)"
            )
        csv_path = found[0]
    table = _AttributeTable(csv_path, extra=_MNMS_IGNORED | {"ed", "es"}, required=("ed", "es"))
    records = []
    for image in sorted(src.rglob("*_sa.nii.gz")):
        code = image.name[: -len("_sa.nii.gz")]
        mask = image.with_name(f"{code}_sa_gt.nii.gz")
        raw = table.raw.get(code)
        if raw is None:
            records.append(PatientRecord(code, error=f"{csv_path}: no row for patient {code!r}"))
            continue
        try:
            volumes = {
                phase: VolumeSource(
                    image,
                    mask if mask.exists() else None,
                    frame=_parse_int(raw[phase.lower()], f"{csv_path}: patient {code}: {phase}"),
                )
                for phase in PHASES
            }
        except DpsynthError as e:
            records.append(PatientRecord(code, error=str(e)))
            continue
        records.append(_record(code, volumes, table))
    return records


def _read_manifest(src: Path, csv_path: Path | None) -> list[PatientRecord]:
    if src.is_dir():
        raise DpsynthError(f"{src}: the manifest layout takes the manifest CSV file as SRC")
    if csv_path is not None:
        raise DpsynthError(f"{csv_path}: the manifest layout reads attributes from its own columns")
    table = _AttributeTable(
        src, extra=_MANIFEST_COLUMNS, required=("image", "phase"), key="patient", per_row=True
    )
    root = src.parent
    rows_by_patient: dict[str, list[dict[str, str]]] = {}
    for row in table.rows:
        rows_by_patient.setdefault(row["patient"], []).append(row)
    records = []
    for patient, rows in rows_by_patient.items():
        record = PatientRecord(patient)
        try:
            for row in rows:
                phase = row.get("phase", "").strip().upper()
                if phase not in PHASES:
                    raise DpsynthError(
                        f"{src}: patient {patient}: phase {row.get('phase')!r} is not ED or ES"
                    )
                if phase in record.volumes:
                    raise DpsynthError(f"{src}: patient {patient}: more than one {phase} row")
                if not row.get("image", "").strip():
                    raise DpsynthError(f"{src}: patient {patient}: empty image path for {phase}")
                mask = row.get("mask", "").strip()
                record.volumes[phase] = VolumeSource(
                    root / row["image"].strip(), root / mask if mask else None
                )
                record.attributes[phase] = _parse_attributes(row, f"{src}: patient {patient}")
            for phase in PHASES:
                if phase not in record.volumes:
                    raise DpsynthError(f"{src}: patient {patient}: no {phase} row")
        except DpsynthError as e:
            record.error = str(e)
        records.append(record)
    return records


# --- tables ------------------------------------------------------------------------------


def _canon(column: str) -> str:
    """Column name for matching: lower case, unit in parentheses and punctuation dropped."""
    return re.sub(r"[^a-z0-9]", "", re.sub(r"\(.*?\)", "", column.lower()))


class _AttributeTable:
    """A CSV of clinical attributes keyed by patient, with validated column names."""

    def __init__(
        self,
        path: Path,
        extra: set[str] = frozenset(),
        required: tuple[str, ...] = (),
        key: str | None = None,
        per_row: bool = False,
    ):
        self.path = path
        try:
            with open(path, newline="", encoding="utf-8-sig") as f:
                reader = csv.reader(f)
                header = next(reader, None)
                body = [row for row in reader if any(cell.strip() for cell in row)]
        except (OSError, UnicodeDecodeError, csv.Error) as e:
            raise DpsynthError(f"{path}: unreadable CSV ({e})") from None
        if not header:
            raise DpsynthError(f"{path}: empty CSV")
        names = [_canon(c) for c in header]
        keys = {key} if key else _KEY_COLUMNS
        for column, name in zip(header, names, strict=True):
            known = (
                name in keys or name in _CSV_ATTRIBUTES or name in _BODY_COLUMNS or name in extra
            )
            if name and not known:
                raise DpsynthError(
                    f"{path}: unknown column {column!r} (expected a patient id column and any of "
                    f"{', '.join(sorted(set(_CSV_ATTRIBUTES.values())))}, HEIGHT, WEIGHT)"
                )
        key_names = [n for n in names if n in keys]
        if len(key_names) != 1:
            raise DpsynthError(
                f"{path}: needs exactly one patient id column (e.g. 'id'), found {len(key_names)}"
            )
        for name in required:
            if name not in names:
                raise DpsynthError(f"{path}: missing column {name!r}")
        self.rows = []
        for line, cells in enumerate(body, start=2):
            if len(cells) > len(names):
                raise DpsynthError(f"{path}: line {line} has more cells than the header")
            row = dict(zip(names, cells, strict=False))
            row["patient"] = row.pop(key_names[0], "").strip()
            if not row["patient"]:
                raise DpsynthError(f"{path}: line {line}: empty patient id")
            self.rows.append(row)
        self.raw: dict[str, dict[str, str]] = {}
        if not per_row:
            for row in self.rows:
                if row["patient"] in self.raw:
                    raise DpsynthError(f"{path}: patient {row['patient']!r} appears twice")
                self.raw[row["patient"]] = row


def _parse_attributes(row: Mapping[str, str], where: str) -> dict[str, float]:
    """The attributes given in `row` (empty cells left out); BMI from height and weight."""
    values: dict[str, float] = {}
    body: dict[str, float] = {}
    for name, cell in row.items():
        if name not in _CSV_ATTRIBUTES and name not in _BODY_COLUMNS:
            continue
        text = cell.strip()
        if text.lower() in _MISSING:
            continue
        column = f"{where}: column {(_BODY_COLUMNS.get(name) or _CSV_ATTRIBUTES[name])}"
        if name in _BODY_COLUMNS:
            body[_BODY_COLUMNS[name]] = _parse_float(text, column)
        elif _CSV_ATTRIBUTES[name] == "SEX":
            code = _SEX_CODES.get(text.lower().removesuffix(".0"))
            if code is None:
                raise DpsynthError(f"{column}: {text!r} is not a sex code (0/1, F/M)")
            values["SEX"] = code
        else:
            values[_CSV_ATTRIBUTES[name]] = _parse_float(text, column)
    if "BMI" not in values and body:
        value = bmi(body.get("HEIGHT", math.nan), body.get("WEIGHT", math.nan))
        if math.isfinite(value):
            values["BMI"] = value
    return values


def _record(
    patient: str,
    volumes: dict[str, VolumeSource],
    table: _AttributeTable | None,
    defaults: Mapping[str, str] | None = None,
    where: str = "",
) -> PatientRecord:
    """A record whose attributes (the same for both phases) come from `table` over `defaults`."""
    record = PatientRecord(patient, volumes)
    row = dict(defaults or {})
    if table is not None and patient in table.raw:
        row.update({k: v for k, v in table.raw[patient].items() if v.strip()})
        where = str(table.path)
    try:
        given = _parse_attributes(row, f"{where}: patient {patient}")
    except DpsynthError as e:
        record.error = str(e)
        given = {}
    record.attributes = dict.fromkeys(PHASES, given)
    return record


def _read_info_cfg(path: Path) -> dict[str, str]:
    """ACDC's Info.cfg (``Key: value`` lines) with lower-case keys, ED/ES upper-case."""
    parser = configparser.ConfigParser(delimiters=(":",))
    try:
        parser.read_string("[info]\n" + path.read_text())
    except (OSError, UnicodeDecodeError, configparser.Error) as e:
        raise DpsynthError(f"{path}: unreadable Info.cfg ({type(e).__name__})") from None
    info = dict(parser["info"])
    return {k.upper() if k in ("ed", "es") else k: v for k, v in info.items()}


def _parse_float(text: str, where: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise DpsynthError(f"{where}: non-numeric value {text!r}") from None
    if not math.isfinite(value):
        raise DpsynthError(f"{where}: non-finite value {text!r}")
    return value


def _parse_int(text: str, where: str) -> int:
    value = _parse_float(text.strip(), where)
    if value != int(value) or value < 0:
        raise DpsynthError(f"{where}: {text!r} is not a frame index")
    return int(value)
