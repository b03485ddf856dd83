"""Which files of a run are evaluation only (BRIEF section 3 (c)).

They hold exact statistics of private data computed without DP: shown in the report, never
released. Each JSON file among them carries ``"label": EVALUATION_ONLY_LABEL`` where it is
written (:func:`labelled`), and a DP run's ``metrics.jsonl`` starts with a line holding the
label. `dpsynth release` (an allow-list) and the report share :data:`EVALUATION_ONLY`.
"""

from __future__ import annotations

from pathlib import Path

from dpsynth.io import atomic_write_text

EVALUATION_ONLY_LABEL = (
    "evaluation only (BRIEF section 3 (c)): exact statistics of private data without DP; "
    "never release this file"
)
FIDELITY_FILE = "attribute_fidelity.json"  # the DP attribute model against the real table
RECONSTRUCTION_FILE = "reconstruction.json"  # autoencoder PSNR/SSIM on its test split
METRICS_FILE = "metrics.jsonl"  # training (and validation) losses
EVAL_SUBDIR = "eval"  # `dpsynth evaluate --out RUN/eval`
MARKER_FILE = "EVALUATION_ONLY.txt"  # beside files that cannot carry the label (weights, CSV)
EVALUATION_ONLY = (FIDELITY_FILE, RECONSTRUCTION_FILE, METRICS_FILE, EVAL_SUBDIR)


def labelled(record: dict) -> dict:
    """`record` with the evaluation-only label as its first field."""
    return {"label": EVALUATION_ONLY_LABEL, **record}


def mark_evaluation_only(folder: str | Path) -> Path:
    """Write the label into `folder` as `EVALUATION_ONLY.txt`, for the weights and CSV files
    beside it that cannot carry it themselves."""
    path = Path(folder) / MARKER_FILE
    atomic_write_text(path, f"{EVALUATION_ONLY_LABEL}\n")
    return path


def evaluation_only_marker(path: str | Path) -> Path | None:
    """The `EVALUATION_ONLY.txt` that labels `path`: in its folder or any folder above it
    (a file inside a labelled folder is evaluation only too); None if there is none."""
    for folder in Path(path).resolve().parents:
        if (folder / MARKER_FILE).is_file():
            return folder / MARKER_FILE
    return None


def is_evaluation_only(relative: str | Path) -> bool:
    """True for a path, relative to its run folder, that is or lies in an evaluation-only name."""
    parts = Path(relative).parts
    return bool(parts) and parts[0] in EVALUATION_ONLY
