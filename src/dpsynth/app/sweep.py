"""The study's experiment: ε × (with, without public pre-training), one table.

`run_sweep` takes a preset (`demo` or `paper`) and optionally the user's own caches: the
public autoencoder and LDM are pre-trained on `public` (or, without it, the shipped demo
models / simulated public phantoms), and every cell DP fine-tunes (or, at ε = ∞, trains
non-privately) an LDM on the `private` cache (or a simulated private cohort). Every cell,
pre-trained or from scratch, runs the same number of optimiser steps: the DP plan's
ceil(privacy.epochs × patients / privacy.batch_size), which depends on neither ε nor the
initialisation; the ε = ∞ cells take those steps with 2 × privacy.batch_size volumes (both
phases of privacy.batch_size patients). Each cell samples volumes conditioned on the
private TEST split's attributes (evaluation only: these volumes are never released) the way
`make demo` samples (each the best of `CANDIDATES` by the public selector), and is evaluated
against the real test split with the demo's referee, trained once.
"""

from __future__ import annotations

import csv
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dpsynth.app.demo import (
    CANDIDATES,
    PRIVATE,
    _with,
    cohort_paths,
    demo_assets,
    pretrain_public,
    refuse_earlier_referee,
    simulate_and_prepare,
    train_demo_referee,
    train_selector,
)
from dpsynth.app.sample import sample_to_folder
from dpsynth.app.workflow import (
    is_complete,
    pretrain_public_models,
    refuse_same_data,
    train_stage,
)
from dpsynth.attributes import ATTRIBUTES
from dpsynth.config import Config, load_config
from dpsynth.data.cache import Cache
from dpsynth.errors import DpsynthError
from dpsynth.evaluation.controllability import PER_PHASE
from dpsynth.evaluation.evaluate import evaluate
from dpsynth.io import atomic_write_json, atomic_write_text, read_json
from dpsynth.launch import refuse_torchrun
from dpsynth.privacy.accounting import format_bound
from dpsynth.privacy.ledger import Ledger, LedgerEntry
from dpsynth.privacy.outputs import mark_evaluation_only
from dpsynth.privacy.planner import plan
from dpsynth.report.stated_privacy import stated_privacy
from dpsynth.runs import PROVENANCE_FILE, load
from dpsynth.training.ldm import train_ldm

N_SAMPLES = 80
DEFAULT_EPSILONS = "0.1,1,10,inf"  # the study's grid starts at 0.1
TABLE_START, TABLE_END = "<!-- sweep-table:start -->", "<!-- sweep-table:end -->"

NONPRIVATE_BASELINE = "sweep-nonprivate-baseline"  # the ε = ∞ cells' ledger stage
SOURCE_FILE = "inputs.json"  # the preset, --public and --private the folder's cells come from


def parse_epsilons(text: str) -> list[float]:
    return [math.inf if v.strip().lower() in ("inf", "∞") else float(v) for v in text.split(",")]


@dataclass(frozen=True)
class Cell:
    """One run of the grid."""

    name: str
    epsilon: float
    pretrain: bool
    steps: int


def plan_cells(config: Config, private: str | Path, epsilons: str, pretrain: str) -> list[Cell]:
    """The grid's cells, each with its number of optimiser steps (the same for all)."""

    p = config.privacy
    n = len(Cache(private).patient_rows("train"))
    # The step count depends on epochs, patients and batch only (not on ε): the same for
    # every cell, and given to the ε = ∞ cells explicitly.
    steps = plan(records=n, batch_size=p.batch_size, epochs=p.epochs, noise_multiplier=1.0).steps
    modes = {"both": (True, False), "on": (True,), "off": (False,)}[pretrain]
    return [
        Cell(f"eps{eps:g}_{'pretrain' if with_pretrain else 'scratch'}", eps, with_pretrain, steps)
        for eps in parse_epsilons(epsilons)
        for with_pretrain in modes
    ]


def run_sweep(
    out: str | Path,
    preset: str = "demo",
    public: str | Path | None = None,
    private: str | Path | None = None,
    epsilons: str = DEFAULT_EPSILONS,
    pretrain: str = "both",
    bench_md: str | Path | None = None,
    config: Config | None = None,
) -> list[dict]:
    """Run (or continue) the grid in `out`; returns the table's rows.

    `config` replaces the preset (tests use a tiny one). With `public`, the public models
    and the best-of-k selector are trained into OUT/public from that cache; `public` and
    `private` must hold different data. A folder left by an earlier recipe (plain draws, a
    full-resolution referee) is refused rather than mixed into the table.
    """
    refuse_torchrun("sweep", "each rank would simulate the cohort and train every cell")
    out = Path(out)
    config = config or load_config(preset)
    if bench_md is not None and private is not None:
        raise DpsynthError(
            "sweep: --bench-md would publish evaluation-only figures of the private cache "
            "(distances to its test split, its patient count); leave it out with --private"
        )
    source = {
        "preset": preset,
        "public_cache_id": None if public is None else Cache(public).cache_id,
        "private_cache_id": _private_id(out, private),
    }
    refuse_stale(out, source)
    if private is not None:
        check_caches(public, private)  # before anything is written
    out.mkdir(parents=True, exist_ok=True)
    # The simulated private cohort, conditions.csv, the referee and every cell's eval/ hold
    # private data or exact statistics of it: labelled before the first of them is written.
    mark_evaluation_only(out)
    if private is None:
        private = simulate_and_prepare(out / "data", _private_spec(), config, split=(0.7, 0.1, 0.2))
        check_caches(public, private)
        source["private_cache_id"] = _private_id(out, None)
    atomic_write_json(out / SOURCE_FILE, source)
    models = _public_models(out, preset, public, config)
    referee = out / "referee"
    if not referee.exists():
        train_demo_referee(private, referee)
    conditions = _test_conditions(private, out / "conditions.csv")

    rows = []
    for cell in plan_cells(config, private, epsilons, pretrain):
        run = out / cell.name
        _train_cell(private, models, run, config, cell)  # keeps a complete cell
        synthetic = out / f"{cell.name}_synthetic"
        if not synthetic.exists():
            sample_to_folder(run, synthetic, n=N_SAMPLES, attributes=conditions, seed=0,
                             conditions_source="private", candidates=CANDIDATES,
                             selector=models / "selector", private=[private])  # fmt: skip
        if not (run / "eval" / "metrics.json").exists():  # the cells share the real features
            evaluate(private, synthetic, run / "eval", referee=referee, pipeline=load(run),
                     metrics=("frd", "fd_referee", "ms_ssim", "controllability", "audit"),
                     cache_dir=out / "features")  # fmt: skip
        rows.append(_row(cell, _epsilon_spent(run), read_json(run / "eval" / "metrics.json")))
    atomic_write_json(out / "sweep.json", rows)
    table = format_table(rows)
    print(table)
    if bench_md is not None:
        write_table(Path(bench_md), table)
    return rows


def check_caches(public: str | Path | None, private: str | Path) -> None:
    """What best-of-k sampling needs of the caches, checked before hours of training: patient
    digests (the selector check compares them) and, with `public`, other data than `private`
    (the public stages have no DP) on one grid (the selector trained on `public` reads the
    cells' volumes)."""

    private_cache = Cache(private)
    private_cache.require_patient_digests(f"--private {private}")
    if public is None:
        return
    refuse_same_data(public, private)
    public_cache = Cache(public)
    public_cache.require_patient_digests(f"--public {public}")
    grids = [(c.shape, c.spacing) for c in (public_cache, private_cache)]
    if grids[0][0] != grids[1][0] or not np.allclose(grids[0][1], grids[1][1]):
        raise DpsynthError(f"--public {public}: volumes {grids[0][0]} at {grids[0][1]} mm, "
                           f"--private {private}: {grids[1][0]} at {grids[1][1]} mm; "
                           "the sweep needs one grid")  # fmt: skip


def refuse_stale(out: Path, source: dict) -> None:
    """Refuse a sweep folder whose referee or samples an earlier recipe made, or whose cells
    other inputs (another preset, --public or --private) began: the table would mix two
    measurements under one heading, public models kept from another --public were never
    checked against this run's private data, and a cell's ledger would name another cohort."""

    refuse_earlier_referee(out / "referee", "use a new --out")
    for provenance in sorted(out.glob(f"*_synthetic/{PROVENANCE_FILE}")):
        if read_json(provenance).get("candidates", 1) != CANDIDATES:
            raise DpsynthError(f"{provenance.parent}: sampled by an earlier sweep recipe (not "
                               f"best of {CANDIDATES}); use a new --out")  # fmt: skip
    recorded = out / SOURCE_FILE
    if recorded.exists() and read_json(recorded) != source:
        raise DpsynthError(f"{out}: begun with {read_json(recorded)}, not {source}; "
                           "use a new --out")  # fmt: skip
    if not recorded.exists() and any(out.glob("eps*")):
        raise DpsynthError(f"{out}: cells of a sweep that did not record its inputs; "
                           "use a new --out")  # fmt: skip


def _public_models(out: Path, preset: str, public, config: Config) -> Path:
    """A folder with the public `autoencoder` and `ldm` runs and the best-of-k `selector`."""

    if public is not None:
        pretrain_public_models(public, out / "public", config)
        train_selector(public, out / "public" / "selector")
        return out / "public"
    shipped = demo_assets()
    if preset == "demo" and is_complete(shipped / "ldm"):
        return shipped
    return pretrain_public(out / "public", config)  # simulated public phantoms


def _private_spec() -> dict:
    return PRIVATE


def _private_id(out: Path, private) -> str:
    """The private cache's id for DIR/inputs.json; without --private, the simulated one's in
    DIR/data once it exists (a cohort simulated again gets a new id: refused beside cells of
    the old one)."""
    if private is not None:
        return Cache(private).cache_id
    _, simulated = cohort_paths(out / "data", _private_spec())
    return f"simulated {Cache(simulated).cache_id}" if simulated.exists() else "simulated"


def _train_cell(private, models: Path, run: Path, config: Config, cell: Cell) -> None:
    init = models / "ldm" if cell.pretrain else None  # all parameters fine-tuned, as in the demo
    if math.isinf(cell.epsilon):  # non-private: same data, steps, batch and lr schedule
        _record_nonprivate_use(run, Cache(private))
        p = config.privacy
        cfg = _with(config, **{"ldm_training.steps": cell.steps, "ldm_training.epochs": None,
                               "ldm_training.lr": p.lr,
                               "ldm_training.warmup_steps": p.warmup_steps,
                               "ldm_training.lr_decay_epochs": p.lr_decay_epochs,
                               "ldm_training.lr_decay_factor": p.lr_decay_factor,
                               "ldm_training.batch_size": 2 * p.batch_size})  # fmt: skip
        train_stage(run, lambda run, resume: train_ldm(private, models / "autoencoder", run, cfg,
                                                       init=init, resume=resume))  # fmt: skip
    else:
        cfg = _with(config, **{"privacy.epsilon": cell.epsilon})
        train_stage(run, lambda run, resume: train_ldm(private, models / "autoencoder", run, cfg,
                                                       init=init, dp=True, resume=resume))  # fmt: skip


def _record_nonprivate_use(run: Path, cache: Cache) -> None:
    """The ε = ∞ cell's ledger entry, before its first step: no descendant of the model (e.g.
    an --init) is ever released with a DP statement (`dpsynth release` refuses lineages with
    non-private uses), and the selector check finds the cache in the ledger even if training
    stops part-way. Checked on every pass, so it is recorded once."""
    ledger = Ledger.of_run(run)
    if any((e.stage, e.cache_id) == (NONPRIVATE_BASELINE, cache.cache_id) for e in ledger):
        return
    ledger.add(LedgerEntry.non_private_use(
        NONPRIVATE_BASELINE, len(cache.patient_rows("train")),
        "sweep's ε = ∞ cell: trained without DP on the private cache", cache_id=cache.cache_id,
    ))  # fmt: skip
    run.mkdir(parents=True, exist_ok=True)
    ledger.save(run / "ledger.json")


def _test_conditions(private: Path, path: Path) -> Path:
    """The private test split's attribute rows, cycled to N_SAMPLES (evaluation only)."""

    cache = Cache(private)
    rows = cache.attributes[cache.volume_indices("test")]
    rows = rows[np.arange(N_SAMPLES) % len(rows)]
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(ATTRIBUTES)
        for row in rows:
            writer.writerow(["" if not np.isfinite(v) else f"{v:.6g}" for v in row])
    return path


def _metric(result: dict, name: str) -> float:
    value = result.get("metrics", {}).get(name, {}).get("value")
    return math.nan if value is None else float(value)


def _epsilon_spent(run: Path) -> float:
    """The ε `dpsynth budget` states for a cell (`stated_privacy`: an error for a DP cell
    whose ledger is lost); ∞ without a DP mechanism."""
    stated = stated_privacy([run], missing_ok=True)
    return stated.epsilon()[0] if stated.dp else math.inf


def _row(cell: Cell, epsilon_spent: float, result: dict) -> dict:
    ctrl = result.get("controllability", {})
    mia = (result.get("privacy_audit") or {}).get("membership_inference", {}).get("patient", {})
    return {
        "cell": cell.name,
        "epsilon_target": cell.epsilon,
        "epsilon_spent": epsilon_spent,
        "pretrain": cell.pretrain,
        "steps": cell.steps,
        "frd": _metric(result, "frd"),
        "frd_baseline": result.get("metrics", {}).get("frd", {}).get("baseline"),
        "fd_referee": _metric(result, "fd_referee"),
        "ms_ssim": _metric(result, "ms_ssim"),
        "lv_volume_r": (ctrl.get("LV_VOLUME") or {}).get("r"),
        "per_phase_r": [(ctrl.get(name) or {}).get("r") for name in PER_PHASE],
        "esed_accuracy": _metric(result, "esed_accuracy"),
        "mia_auc": mia.get("auc"),
    }


def _fmt(value, digits=3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, float) and math.isinf(value):
        return "∞"
    return f"{value:.{digits}g}" if isinstance(value, float) else str(value)


def _fmt_r(value: float | None) -> str:
    """A correlation to two decimals: "0.00", not "0.0002" (a scratch cell's noise)."""
    return "–" if value is None or math.isnan(value) else f"{value:.2f}"


def format_table(rows: list[dict]) -> str:
    head = (
        "| ε target | ε spent | pre-training | steps | FRD | FD-referee | MS-SSIM | LV volume r "
        f"| r: {', '.join(PER_PHASE)} | ES/ED acc. | MIA AUC (patient) |"
    )
    lines = [head, "|" + "---|" * 11]
    for r in rows:
        lines.append(
            f"| {_fmt(r['epsilon_target'])} | {format_bound(r['epsilon_spent'], 3)} | "
            f"{'yes' if r['pretrain'] else 'no'} | {_fmt(r.get('steps'))} | "
            f"{_fmt(r['frd'])} | {_fmt(r['fd_referee'])} | "
            f"{_fmt(r['ms_ssim'])} | {_fmt(r['lv_volume_r'])} | "
            f"{', '.join(_fmt_r(v) for v in r.get('per_phase_r') or [None] * len(PER_PHASE))} | "
            f"{_fmt(r['esed_accuracy'])} | "
            f"{_fmt(r['mia_auc'])} |"
        )
    ratios = {m: pretrain_ratio(rows, 10.0, m) for m in ("frd", "fd_referee")}
    if all(r is not None for r in ratios.values()):
        lines.append(
            f"\nAt ε = 10, distance without / with pre-training: FRD {ratios['frd']:.2f}×, "
            f"FD-referee {ratios['fd_referee']:.2f}× (study, FID: 3.5×)."
        )
    return "\n".join(lines)


def pretrain_ratio(rows: list[dict], eps: float, metric: str = "frd") -> float | None:
    cells = {r["pretrain"]: r[metric] for r in rows if r["epsilon_target"] == eps}
    if True in cells and False in cells and cells[True] > 0:
        return cells[False] / cells[True]
    return None


def write_table(path: Path, table: str) -> None:
    """Replace the marked sweep section of BENCHMARKS.md (or append it)."""
    text = path.read_text() if path.exists() else ""
    block = f"{TABLE_START}\n{table}\n{TABLE_END}"
    if TABLE_START in text:
        text = re.sub(re.escape(TABLE_START) + ".*?" + re.escape(TABLE_END), lambda _: block,
                      text, flags=re.S)  # fmt: skip
    else:
        text += "\n" + block + "\n"
    atomic_write_text(path, text)
