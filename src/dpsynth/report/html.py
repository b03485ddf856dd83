"""The self-contained HTML report: one index.html, images inline, nothing fetched from outside.

Every section renders from whatever the run and evaluation folders hold; a missing piece
becomes a visible "not run" note, so a report can be written at any stage of a study.
"""

from __future__ import annotations

import base64
import csv
import html
import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from dpsynth.config import check_candidates
from dpsynth.data.cache import Cache, is_cache
from dpsynth.data.volumes import load_volume_set
from dpsynth.errors import DpsynthError
from dpsynth.evaluation.controllability import CSV_FILE, SECOND_READER_CSV_FILE
from dpsynth.io import atomic_dir, atomic_write_text, read_json
from dpsynth.privacy.accounting import epsilon_for, format_bound
from dpsynth.privacy.one_run_audit import AUDIT_DIR, AUDIT_FILE
from dpsynth.privacy.outputs import EVAL_SUBDIR, EVALUATION_ONLY_LABEL, FIDELITY_FILE
from dpsynth.report import figures
from dpsynth.report.release import MODEL_CARD, PRIVACY_MD, verify
from dpsynth.report.stated_privacy import stated_privacy
from dpsynth.runs import MODEL_FILE, PROVENANCE_FILE, read_model_meta

N_SHOWN = 6  # volumes per set in the sample grids

CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;color:#1d2327;background:#fafafa}
main{max-width:1100px;margin:auto;padding:0 24px 48px}
header{background:#1d3557;color:#fff;padding:18px 24px}header h1{margin:0;font-size:22px}
nav{margin-top:6px;font-size:13px}nav a{color:#cfe3ff;margin-right:12px}
section{background:#fff;border:1px solid #e3e6ea;border-radius:6px;margin:18px 0;padding:6px 20px 16px}
h2{font-size:18px;border-bottom:1px solid #e3e6ea;padding-bottom:4px}
table{border-collapse:collapse;margin:8px 0;font-size:13px}
th,td{border:1px solid #dde1e5;padding:3px 8px;text-align:left;vertical-align:top}th{background:#f1f3f5}
td.num{text-align:right;font-variant-numeric:tabular-nums}
img{max-width:100%;height:auto;display:block;margin:8px 0}
figure{margin:10px 0}figcaption{font-size:12px;color:#555}
pre{background:#f6f8fa;padding:8px;overflow:auto;font-size:12px;max-height:420px}
.cards{display:flex;flex-wrap:wrap;gap:10px}
.card{border:1px solid #dde1e5;border-radius:6px;padding:8px 12px;min-width:140px;background:#fbfcfd}
.card b{display:block;font-size:20px}
.missing{color:#8a6d00;background:#fff8db;border-left:4px solid #e0b000;padding:6px 10px}
.warn{color:#7a1010;background:#fdecec;border-left:4px solid #c62828;padding:6px 10px}
.note{color:#0d3c61;background:#eaf3fb;border-left:4px solid #2a7ab8;padding:6px 10px}
.dpsynth-gallery{outline:none}.dpsynth-gallery .volumes{display:grid;grid-template-columns:repeat(4,max-content);gap:6px 12px}
.dpsynth-gallery canvas{image-rendering:pixelated;display:block;background:#000}
.dpsynth-gallery figcaption{white-space:pre-line}.dpsynth-gallery input{width:300px;vertical-align:middle}
"""
N_VIEWER = 4  # volumes per set in the slice viewer


# ---------------------------------------------------------------------------------------------
# Inputs


@dataclass
class _Run:
    """What one run folder (and its evaluation folder) holds; None where a piece is missing."""

    path: Path
    label: str
    eval_dir: Path
    config: str | None = None
    model: dict | None = None
    privacy: _Privacy | None = None
    training: list[dict] = field(default_factory=list)
    evaluation: dict | None = None
    controllability: list[dict] | None = None
    second_reader: list[dict] | None = None  # controllability rows of the 2D second reader
    attribute_fidelity: dict | None = None
    one_run_audit: dict | None = None  # `dpsynth audit-privacy` of this run's DP-SGD recipe
    errors: dict[str, str] = field(default_factory=dict)  # piece -> why it could not be read

    @property
    def epsilon(self) -> float:
        """Composed ε of the run; without a ledger there is no guarantee (ε = ∞)."""
        return self.privacy.epsilon if self.privacy else math.inf


def _read_run(path: Path, eval_dir: Path | None) -> _Run:
    run = _Run(path=path, label=path.name, eval_dir=eval_dir or path / EVAL_SUBDIR)
    pieces: dict[str, tuple[Path, Callable[[Path], Any]]] = {
        "config": (path / "config.yaml", lambda p: p.read_text()),
        "model": (path / MODEL_FILE, lambda p: read_model_meta(p.parent)),
        "privacy": (path / "ledger.json", _read_privacy),
        "training": (path / "metrics.jsonl", _read_jsonl),
        "evaluation": (run.eval_dir / "metrics.json", read_json),
        "controllability": (run.eval_dir / CSV_FILE, _read_csv),
        "second_reader": (run.eval_dir / SECOND_READER_CSV_FILE, _read_csv),
        "attribute_fidelity": (path / FIDELITY_FILE, read_json),
        "one_run_audit": (path / AUDIT_DIR / AUDIT_FILE, read_json),
    }
    for name, (file, reader) in pieces.items():
        if not file.exists():
            continue
        try:
            setattr(run, name, reader(file))
        except (DpsynthError, OSError, UnicodeDecodeError) as e:
            run.errors[name] = f"{file}: {e}"
    return run


def _private_losses(run: _Run) -> bool:
    """Whether the run's metrics.jsonl is a DP stage's: its label line says the losses
    were computed on private patients without DP (`training.trainer`)."""
    return any(r.get("label") == EVALUATION_ONLY_LABEL for r in run.training or ())


def _read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _read_jsonl(path: Path) -> list[dict]:
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a run killed mid-write leaves a partial last line; the rest is valid
    return [r for r in records if isinstance(r, dict)]


class _Rows:
    """Some rows of a memory-mapped cache, read on demand: the report shows only a few."""

    def __init__(self, images: np.ndarray, rows: np.ndarray):
        self.images, self.rows = images, rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int | slice) -> np.ndarray:
        return np.asarray(self.images[self.rows[i]], dtype=np.float32)


def _source_path(source: str | os.PathLike) -> Path:
    """The folder of a set given as a path, or as evaluate() records a cache split: PATH[split]."""
    text = os.fspath(source)
    return Path(text[: text.rindex("[")] if text.endswith("]") and "[" in text else text)


def _volume_set(source: Any, split: str) -> tuple[Any, np.ndarray | None] | None:
    """(volumes, attributes) from a cache path (its `split`), a NIfTI folder, a VolumeSet or a
    (volumes, attributes) pair."""
    if source is None:
        return None
    if isinstance(source, (str, os.PathLike)):
        path = _source_path(source)
        if is_cache(path):
            cache = Cache(path)
            rows = cache.volume_indices(split)
            return _Rows(cache.images, rows), np.asarray(cache.attributes[rows])

        source = load_volume_set(path, split)
    if hasattr(source, "volumes"):
        return source.volumes, source.attributes
    volumes, attributes = source
    return np.asarray(volumes), None if attributes is None else np.asarray(attributes)


def _load_set(run: _Run, piece: str, source: Any, split: str) -> Any:
    try:
        return _volume_set(source, split)
    except (DpsynthError, OSError) as e:
        run.errors[piece] = str(e)
        return None


# ---------------------------------------------------------------------------------------------
# HTML helpers


def _e(x: Any) -> str:
    return html.escape(str(x))


def _img(png: bytes, alt: str, caption: str = "") -> str:
    data = base64.b64encode(png).decode("ascii")
    cap = f"<figcaption>{_e(caption)}</figcaption>" if caption else ""
    return f'<figure><img src="data:image/png;base64,{data}" alt="{_e(alt)}">{cap}</figure>'


def _missing(what: str) -> str:
    return f'<p class="missing">Not run: {_e(what)}</p>'


def _absent(run: _Run, piece: str, what: str) -> str:
    """The note for a missing piece: why it could not be read, or that it was not run."""
    if piece in run.errors:
        return f'<p class="warn">Could not read {_e(piece)}: {_e(run.errors[piece])}</p>'
    return _missing(what)


def _num(x: Any, digits: int = 4) -> str:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return "—" if x is None else _e(x)
    if isinstance(x, int):
        return str(x)
    if math.isinf(x):
        return "∞"
    return f"{x:.{digits}g}"


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join(
        "<tr>"
        + "".join(
            f'<td class="num">{_num(c)}</td>'
            if isinstance(c, (int, float)) and not isinstance(c, bool)
            else f"<td>{'—' if c is None else _e(c)}</td>"
            for c in row
        )
        + "</tr>"
        for row in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


# ---------------------------------------------------------------------------------------------
# Ledger


@dataclass
class _Privacy:
    """A run's ledger as the report shows it: composed total and one row per DP stage."""

    epsilon: float
    delta: float
    accountant: str
    stages: list[list[Any]]
    non_private: list[Any]  # LedgerEntry objects flagged non_private
    records: int | None
    not_dp: list[str]  # private caches the lineage learned WITHOUT DP: ε is then ∞
    shaping: list[str]  # non-private uses that may have shaped the weights: ε is then ∞
    unchecked: list[str]  # why the lineage could not be checked (StatedPrivacy)


STAGE_COLUMNS = (
    "stage",
    "mechanism",
    "patients",
    "sample rate q",
    "noise σ",
    "steps / planned",
    "ε of this stage alone",
    "δ",
    "accountant",
    "data",
)


def _read_privacy(path: Path) -> _Privacy:
    """Load RUN/ledger.json; its ε is `StatedPrivacy.epsilon`, as budget and release state:
    ∞ when the lineage trained without DP on a cache the ledger names private, or a
    non-private use may have shaped the weights."""
    stated = stated_privacy([path])
    ledger = stated.ledger
    epsilon, delta, accountant = stated.epsilon()
    dp = [e for e in ledger if not e.non_private]
    stages = []
    for e in dp:
        spent = e.mechanism_spent()
        alone = epsilon_for([spent], delta, accountant) if spent else 0.0
        stages.append(
            [
                e.stage,
                e.mechanism,
                e.records,
                e.sample_rate,
                e.noise_multiplier,
                f"{e.steps} / {e.planned_steps}",
                format_bound(alone),
                delta,
                e.accountant,
                e.cache_id[:12] or None,
            ]
        )
    return _Privacy(
        epsilon=epsilon,
        delta=delta,
        accountant=accountant,
        stages=stages,
        non_private=[e for e in ledger if e.non_private],
        records=max((e.records for e in dp), default=None),
        not_dp=stated.not_dp,
        shaping=[e.stage for e in ledger.shaping_uses()],
        unchecked=stated.unchecked,
    )


def _attack_bound(epsilon: float, delta: float, fpr: float = 0.01) -> float:
    """Largest TPR any membership test can reach at `fpr` under (ε, δ)-DP (Kairouz et al.)."""
    if not math.isfinite(epsilon):
        return 1.0
    return min(1.0, math.exp(epsilon) * fpr + delta, 1.0 - math.exp(-epsilon) * (1.0 - delta - fpr))


def _explain_epsilon(epsilon: float, delta: float, records: int | None) -> str:
    bound = _attack_bound(epsilon, delta)
    vacuous = bound > 0.99
    return f"""
<p><b>What ε = {format_bound(epsilon, 3)} at δ = {format_bound(delta, 2)} means for one patient.</b> The unit of privacy is the
<b>patient</b>: one DP record holds all of a patient's volumes (ED and ES) and attributes, and
sampling and gradient clipping act per patient{f" ({_e(records)} patients)" if records else ""}.
Whatever an attacker already knows, every possible trained model is at most
e<sup>ε</sup> = {format_bound(math.exp(epsilon), 3)} times more (or less) likely with that patient in the training
set than without, except with probability δ. Equivalently, any test of "was this patient used?"
that wrongly accuses 1% of non-participants can correctly detect at most
<b>{math.ceil(1e4 * bound) / 100:g}%</b> of participants{" — at this ε the worst-case bound alone says almost nothing" if vacuous else ""}.
The membership-inference audit below measures what a concrete attack achieves.</p>
<p><b>Protected:</b> whether any one private patient took part, and anything specific to that
patient's volumes and attributes, in every stage listed in the ledger.
<b>Not protected:</b> what holds across many patients (that is what the model learns), the public
pre-training data, anything listed below as non-private, and the outputs of evaluations on
private data (including this report when it shows real images). A patient enrolled twice under
different identifiers counts as two records and is protected at up to twice the ε.</p>"""


# ---------------------------------------------------------------------------------------------
# Sections


@dataclass
class _Context:
    run: _Run
    compare: list[_Run]
    synthetic: tuple[np.ndarray, np.ndarray | None] | None
    real: tuple[np.ndarray, np.ndarray | None] | None
    train: tuple[np.ndarray, np.ndarray | None] | None
    release: Path | None = None  # a release bundle (dpsynth release)
    release_link: str = ""  # the bundle's path relative to the report folder
    candidates: int = 1  # best-of-k sampling of the synthetic set (its provenance.json)


HEADLINE = ("frd", "fid", "fd_referee", "controllability_lv_r", "ms_ssim", "utility_esed_accuracy")


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _mia_unit(run: _Run) -> dict | None:
    """The patient-level attack result (the privacy unit), else the volume-level one."""
    mia = _audit(run).get("membership_inference") or {}
    return mia.get("patient") or mia.get("volume")


def _metrics(run: _Run) -> dict:
    return dict((run.evaluation or {}).get("metrics") or {})


def _audit(run: _Run) -> dict:
    return dict((run.evaluation or {}).get("privacy_audit") or {})


def _section_summary(ctx: _Context) -> str:
    run, cards = ctx.run, []
    if run.privacy:
        unchecked = " (lineage not checked: ledger section)" if run.privacy.unchecked else ""
        cards.append(("ε per patient", format_bound(run.privacy.epsilon, 3) + unchecked))
        cards.append(("δ", format_bound(run.privacy.delta, 2)))
    elif "privacy" in run.errors:
        cards.append(("ε", "unreadable (ledger section)"))
    else:
        cards.append(("ε", "∞ (no ledger)"))
    metrics = _metrics(run)
    shown = [n for n in HEADLINE if n in metrics] + [n for n in metrics if n not in HEADLINE]
    shown = [n for n in shown if _is_number(metrics[n].get("value"))][:5]
    for name in shown:
        m = metrics[name]
        cards.append((name, f"{_num(m['value'])} (baseline {_num(m.get('baseline'))})"))
    one_run = run.one_run_audit
    if one_run and _is_number(one_run.get("epsilon_lb")):
        cards.append(("ε lower bound (one-run audit)", f"{one_run['epsilon_lb']:.2f}"))
    unit = _mia_unit(run)
    if unit:
        cards.append(("MIA AUC", f"{unit['auc']:.3f} ± {unit.get('auc_std', 0):.3f}"))
    body = "".join(f'<div class="card">{_e(k)}<b>{_e(v)}</b></div>' for k, v in cards)
    if run.evaluation:
        counts = (
            f"<p>Evaluated on {_e(run.evaluation.get('n_synthetic', '?'))} synthetic and "
            f"{_e(run.evaluation.get('n_real', '?'))} real volumes.</p>"
        )
    else:
        counts = _absent(run, "evaluation", f"evaluation (no {run.eval_dir / 'metrics.json'})")
    return f'<div class="cards">{body}</div>{counts}'


def _section_config(ctx: _Context) -> str:
    run = ctx.run
    if run.config is None:
        parts = [_absent(run, "config", f"no {run.path / 'config.yaml'}")]
    else:
        parts = [f"<h3>config.yaml</h3><pre>{_e(run.config)}</pre>"]
    if run.model is not None:
        # Shows where the latent scale and attribute ranges came from (BRIEF section 3).
        parts.append(f"<h3>model.json</h3><pre>{_e(json.dumps(run.model, indent=1))}</pre>")
    elif "model" in run.errors:
        parts.append(_absent(run, "model", ""))
    return "".join(parts)


def _section_ledger(ctx: _Context) -> str:
    run, p = ctx.run, ctx.run.privacy
    if "privacy" in run.errors:
        return f'<p class="warn">Could not read the privacy ledger: {_e(run.errors["privacy"])}</p>'
    if p is None:
        return (
            _missing(f"no privacy ledger ({run.path / 'ledger.json'})")
            + '<p class="warn">This run records no use of private data. If it was trained on '
            "private data, it has <b>no differential-privacy guarantee</b> (ε = ∞).</p>"
            + _evaluation_only(ctx)
        )
    parts = [
        f'<p class="warn"><b>NOT DP</b>: a stage of this model trained without DP on cache '
        f"{_e(cache_id)}, which the ledger names as private (ε = ∞).</p>"
        for cache_id in p.not_dp
    ]
    parts += [
        f'<p class="warn"><b>NOT DP</b>: the ledger records a non-private use "{_e(stage)}" '
        "that may have shaped the weights (ε = ∞).</p>"
        for stage in p.shaping
    ]
    parts += [f'<p class="warn">Lineage not checked: {_e(why)}.</p>' for why in p.unchecked]
    parts += [
        _table(
            ["composed ε (whole lineage)", "δ", "accountant"],
            [[format_bound(p.epsilon), p.delta, p.accountant]],
        ),
        "" if p.not_dp or p.shaping else _explain_epsilon(p.epsilon, p.delta, p.records),
        "<h3>Stages</h3>",
        _table(STAGE_COLUMNS, p.stages) if p.stages else _missing("the ledger lists no DP stage"),
    ]
    if p.non_private:
        items = "".join(
            f"<li>{_e(e.stage)} ({_e(e.records)} patients){' — ' + _e(e.note) if e.note else ''}"
            "</li>"
            for e in p.non_private
        )
        parts.append(
            f'<div class="warn"><b>Non-private uses of private data</b> (not covered '
            f"by ε above):<ul>{items}</ul></div>"
        )
    else:
        parts.append('<p class="note">The ledger records no non-private use of private data.</p>')
    parts.append(_evaluation_only(ctx))
    return "".join(parts)


def _evaluation_only(ctx: _Context) -> str:
    uses = []
    if _metrics(ctx.run):
        uses.append(
            "metrics comparing synthetic with real volumes (table below), when the real "
            "evaluation set is private"
        )
    if ctx.run.controllability:
        uses.append("the referee segmenter (trained on real volumes without DP) and its ceiling")
    if ctx.run.second_reader:
        uses.append("the second reader (a 2D U-Net trained on real volumes without DP)")
    if _audit(ctx.run):
        uses.append(
            "the privacy audit: membership inference and memorisation read training and "
            "held-out patients"
        )
    if ctx.run.attribute_fidelity is not None:
        uses.append("the DP attribute model's fidelity table, computed on the private table")
    if ctx.real is not None or ctx.train is not None:
        uses.append("the real images shown in this report")
    if _private_losses(ctx.run):
        uses.append("the training losses: a DP stage's losses on private patients, without DP")
    if not uses:
        return ""
    items = "".join(f"<li>{_e(u)}</li>" for u in uses)
    return (
        f'<div class="note"><b>Evaluation-only uses of private data</b> (BRIEF section 3 (c): '
        f"outputs never released with the model or the synthetic data):<ul>{items}</ul></div>"
    )


def _section_samples(ctx: _Context) -> str:
    sets = {}
    if ctx.real is not None:
        sets["real"] = (ctx.real[0][:N_SHOWN], _head(ctx.real[1]))
    if ctx.synthetic is not None:
        sets["synthetic"] = (ctx.synthetic[0][:N_SHOWN], _head(ctx.synthetic[1]))
    notes = [
        _absent(ctx.run, k, f"no {k} volumes given") for k in ("real", "synthetic") if k not in sets
    ]
    if not sets:
        return "".join(notes)
    return "".join(
        [
            *notes,
            _img(
                figures.mid_slice_grid(sets, N_SHOWN),
                "mid-slices",
                "Middle slice of each volume. Titles: a real volume's own attributes, or those a "
                "synthetic volume was conditioned on (phase, sex, age, BMI, LV and RV volumes at "
                "ED/ES).",
            ),
            _img(
                figures.slice_strips(sets, 2),
                "all slices",
                "All slices, base (left) to apex (right).",
            ),
        ]
    )


def _section_viewer(ctx: _Context) -> str:
    """Every slice of a few real and synthetic volumes, scrolled together (report/viewer.js)."""
    volumes = []
    for group, pair in (("real", ctx.real), ("synthetic", ctx.synthetic)):
        if pair is None:
            continue
        images, attributes = pair
        for i in range(min(N_VIEWER, len(images))):
            volume = np.rint(np.clip(np.asarray(images[i], np.float32), 0.0, 1.0) * 255.0)
            caption = figures.attribute_caption(None if attributes is None else attributes[i])
            volumes.append(
                {
                    "label": f"{group} {i + 1}\n{caption}".strip(),
                    "group": group,
                    "shape": list(volume.shape),
                    "data": base64.b64encode(volume.astype(np.uint8).tobytes()).decode("ascii"),
                }
            )
    if not volumes:
        return _missing("no real or synthetic volumes given")
    spec = json.dumps({"volumes": volumes}).replace("</", "<\\/")  # cannot close the script
    return (
        '<div class="dpsynth-gallery" tabindex="0"><p><input type="range" min="0" value="0" '
        'aria-label="slice"> <span class="slice-label"></span> · wheel or arrow keys over the '
        "images scroll through the slices, base to apex; real on the first row.</p>"
        f'<div class="volumes"></div><script type="application/json">{spec}</script></div>'
    )


def _head(attributes: np.ndarray | None) -> np.ndarray | None:
    return None if attributes is None else attributes[:N_SHOWN]


def _section_attributes(ctx: _Context) -> str:
    if ctx.real is None or ctx.synthetic is None or ctx.synthetic[1] is None or ctx.real[1] is None:
        return _missing("needs real and synthetic attributes")
    if not np.isfinite(ctx.synthetic[1]).any():
        return _missing("the synthetic set has no attributes.csv")
    real, synthetic = ctx.real[1], ctx.synthetic[1]
    return (
        _img(
            figures.attribute_marginals(real, synthetic),
            "attribute marginals",
            "Marginal distribution of each attribute: real cohort vs the values the synthetic "
            "set was conditioned on (user-specified, public, or drawn from the DP attribute "
            "model).",
        )
        + _img(
            figures.attribute_correlations(real, synthetic),
            "attribute correlations",
            "Pairwise correlations of the attributes: real cohort, synthetic conditioning "
            "values, and their difference.",
        )
        + _attribute_model_fidelity(ctx.run.attribute_fidelity)
    )


def _attribute_model_fidelity(fidelity: dict | None) -> str:
    """The DP attribute model's draws against the private table (attribute_fidelity.json)."""
    if fidelity is None:
        return ""
    rows = [
        [
            name,
            a["mean_real"],
            a["mean_synthetic"],
            a["std_real"],
            a["std_synthetic"],
            a["ks"],
            a["missing_real"],
            a["missing_synthetic"],
        ]
        for name, a in fidelity["attributes"].items()
    ]
    header = ["attribute", "mean real", "mean DP model", "std real", "std DP model", "KS",
              "missing real", "missing DP model"]  # fmt: skip
    return (
        f"<h3>DP attribute model fidelity</h3><p>{_e(fidelity['n_synthetic'])} rows drawn "
        f"from the DP attribute model against the {_e(fidelity['n_real'])} rows of the "
        "private training table it was fitted on (evaluation only). Largest difference between "
        "pairwise correlations: "
        f"<b>{_num(fidelity['max_abs_correlation_difference'], 2)}</b>.</p>" + _table(header, rows)
    )


def _controllability_table(summary: dict) -> str:
    """Per-quantity r, MAE (also as % of the mean requested value) and slope, with the
    ceiling."""
    header = ["quantity", "r", "MAE", "MAE % of mean requested", "slope (1: spread as requested)",
              "ceiling r (real)", "ceiling MAE", "ceiling MAE %", "ceiling slope", "n",
              "n real"]  # fmt: skip
    rows = [
        [
            a,
            s.get("r"),
            s.get("mae"),
            s.get("mae_pct"),
            s.get("slope"),
            s.get("ceiling_r"),
            s.get("ceiling_mae"),
            s.get("ceiling_mae_pct"),
            s.get("ceiling_slope"),
            s.get("n"),
            s.get("ceiling_n"),
        ]  # fmt: skip
        for a, s in summary.items()
    ]
    return _table(header, rows)


def _candidates(synthetic_dir: str | os.PathLike | None) -> int:
    """How many candidates each volume of the evaluated synthetic set was chosen from
    (1: plain sampling, or no provenance to say)."""
    path = Path(synthetic_dir) / PROVENANCE_FILE if synthetic_dir else None
    if path is None or not path.is_file():
        return 1
    provenance = read_json(path)
    candidates = provenance.get("candidates", 1) if isinstance(provenance, dict) else 1
    try:
        check_candidates(candidates)
    except DpsynthError:
        return 1  # not a dpsynth provenance: say nothing rather than something false
    return candidates


def _section_controllability(ctx: _Context) -> str:
    run = ctx.run
    evaluation = run.evaluation or {}
    summary = evaluation.get("controllability") or {}
    parts = []
    if summary:
        chosen = (
            f" Each synthetic volume is the best of {ctx.candidates} candidates: the one a "
            "segmenter declared public judged nearest the requested LV and RV volumes (and "
            "wall thickness, where the folder's provenance lists choice_weights), so those "
            "figures are usually higher than plain draws would score; ANGLE and DEPTH are "
            'not in the choice (BENCHMARKS.md, "Best of 4, and what else the choice could '
            'weigh": under the referee and an independent reader).'
            if ctx.candidates > 1
            else ""
        )
        parts.append(
            "<p>Requested vs measured by the referee, each per-phase quantity on the volumes "
            "of its phase; *_VOLUME and MYO_THICK pool ED and ES (the study's figures). "
            f"Ceiling: the referee on real test volumes against their true attributes.{chosen}</p>"
        )
        parts.append(_controllability_table(summary))
    if run.controllability:
        parts.append(
            _img(
                figures.controllability_scatter(run.controllability),
                "controllability",
                "Requested vs measured by the referee; dashed: identity. Orange: the "
                "referee on real test volumes (the ceiling).",
            )
        )
    second = evaluation.get("controllability_second_reader") or {}
    if second.get("attributes") or run.second_reader:
        reader = second.get("reader") or {}
        parts.append(
            "<h3>Second reader (independent 2D U-Net, evaluation only)</h3><p>"
            + _e(reader.get("description") or "a second segmenter")
            + f" (trained on {_e(reader.get('trained_on'))}, {_e(reader.get('epochs'))} epochs). "
            "It never saw synthetic data; figures that hold under the referee but not here "
            "depend on the referee. Trained on real data without DP: never released.</p>"
        )
        if second.get("attributes"):
            parts.append(_controllability_table(second["attributes"]))
        if run.second_reader:
            parts.append(
                _img(
                    figures.controllability_scatter(run.second_reader, "second reader"),
                    "controllability, second reader",
                    "Requested vs measured by the second reader; dashed: identity. Orange: "
                    "the second reader on real test volumes (its ceiling).",
                )
            )
    return "".join(parts) or _absent(run, "controllability", "controllability (needs a referee)")


def _section_metrics(ctx: _Context) -> str:
    metrics = _metrics(ctx.run)
    if not metrics:
        return _absent(ctx.run, "evaluation", "evaluation metrics")
    rows = [
        [
            name,
            m.get("value"),
            m.get("baseline"),
            m.get("baseline_label"),
            {True: "lower", False: "higher"}.get(m.get("lower_is_better"), "—"),
            m.get("config"),
            m.get("note"),
        ]
        for name, m in metrics.items()
    ]
    return _table(
        ["metric", "value", "baseline", "baseline is", "better", "configuration", "note"], rows
    )


def _one_run_audit(run: _Run) -> str:
    """The empirical lower bound ε_lb of `dpsynth audit-privacy` next to the accounted ε."""
    if "one_run_audit" in run.errors:
        return _absent(run, "one_run_audit", "")
    r = run.one_run_audit
    if not r:
        return _missing(
            f"one-run privacy audit of the DP-SGD engine (no {run.path / AUDIT_DIR / AUDIT_FILE}; "
            f"run `dpsynth audit-privacy {run.path}` or `make audit`)"
        )
    rec, g, st = r["recipe"], r.get("gaussian", {}), r.get("steinke", {})
    verdict = (
        '<p class="warn"><b>The lower bound exceeds the accounted ε</b>: the engine leaks more '
        "than the ledger says (a broken engine, or a 5% chance event: re-run with another "
        "seed).</p>"
        if r.get("exceeds_accounted")
        else '<p class="note">The empirical lower bound stays below the accounted ε, as it '
        "must for a correct engine.</p>"
    )
    return (
        "<h3>One-run audit of the DP-SGD engine (empirical ε lower bound)</h3>"
        f'<p class="note">{_e(r.get("label", ""))}</p>'
        f"<p>The DP-SGD recipe of this run (σ {_num(rec['noise_multiplier'])}, C "
        f"{_num(rec['max_grad_norm'])}, q {_num(rec['sample_rate'])}, {_e(rec['steps'])} steps) "
        f"re-run once through the engine ({_e(r.get('engine'))}) on simulated public phantoms "
        f"with {_e(r['canaries'])} two-volume canary patients, each included with probability ½; "
        "white-box: the auditor sees every noisy update. ε_lb holds with "
        f"{_num(100 * r['confidence'], 3)}% confidence at δ = {_num(r['delta'], 2)}.</p>"
        + _table(
            [
                "accounted ε (this DP-SGD stage)",
                "ε_lb Gaussian (Agrawal et al.)",
                "ε_lb / ε",
                "ε_lb Steinke et al. (no assumption)",
                "μ̂ (μ lower bound)",
                "Steinke guesses (correct)",
            ],
            [
                [
                    format_bound(r["accounted_epsilon"]),
                    r["epsilon_lb"],
                    r.get("ratio"),
                    r.get("epsilon_lb_steinke"),
                    f"{_num(g.get('mu_hat'), 3)} ({_num(g.get('mu_lb'), 3)})",
                    f"{_e(st.get('guesses'))} ({_e(st.get('correct'))})",
                ]
            ],
        )
        + verdict
    )


def _section_audit(ctx: _Context) -> str:
    one_run = _one_run_audit(ctx.run)
    audit = _audit(ctx.run)
    if not audit:
        return one_run + _absent(ctx.run, "evaluation", "privacy audit (evaluate with --model-run)")
    if "skipped" in audit:
        return one_run + _missing(f"privacy audit: {audit['skipped']}")
    parts = [one_run, "<h3>Membership inference and memorisation (evaluation only)</h3>",
             f'<p class="note">{_e(audit.get("label", ""))}</p>']  # fmt: skip
    mia = audit.get("membership_inference")
    if mia:
        units = {u: mia[u] for u in ("patient", "volume") if mia.get(u)}
        setup = [
            f"{label}: {mia[key]}"
            for key, label in (
                ("attack", "attack"),
                ("timesteps", "timesteps"),
                ("n_noise", "fixed noises"),
            )
            if key in mia
        ]
        if mia.get("member_volumes"):
            m = mia["member_volumes"]
            setup.append(f"members: a random {m['scored']} of {m['of']} training volumes")
        parts.append(
            f"<h3>Membership inference</h3><p>{_e('; '.join(setup))}. "
            "Target at ε = 10: AUC ≤ 0.55 (0.5 is chance).</p>"
        )
        parts.append(
            _table(
                [
                    "unit",
                    "AUC",
                    "± s.e.",
                    "TPR @ 1% FPR",
                    "TPR @ 10% FPR",
                    "members",
                    "non-members",
                ],
                [
                    [
                        u,
                        s["auc"],
                        s.get("auc_std"),
                        s.get("tpr_at_1pct_fpr"),
                        s.get("tpr_at_10pct_fpr"),
                        s.get("n_members"),
                        s.get("n_nonmembers"),
                    ]
                    for u, s in units.items()
                ],
            )
        )
        small = [u for u, s in units.items() if s.get("n_nonmembers", 0) < 100]
        if small:
            parts.append(
                f'<p class="missing">Fewer than 100 non-members ({_e(", ".join(small))}): '
                "TPR at 1% FPR is TPR at the lowest measurable FPR.</p>"
            )
        curves = {u: {**s["roc"], "auc": s["auc"]} for u, s in units.items() if s.get("roc")}
        if curves:
            parts.append(_img(figures.roc_figure(curves), "ROC", "Membership-inference ROC."))
    else:
        parts.append(_missing("membership inference"))
    mem = audit.get("memorisation")
    parts.append(_memorisation(ctx, mem) if mem else _missing("memorisation"))
    return "".join(parts)


def _memorisation(ctx: _Context, mem: dict) -> str:
    rows = [
        [
            space["metric"],
            space["fraction_closer_to_train"],
            space.get("reference_fraction"),
            mem.get("chance_level"),
            space.get("median_nearest_train"),
            space.get("median_nearest_test"),
        ]
        for space in (mem.get("image"), mem.get("features"))
        if space
    ]
    parts = [
        "<h3>Memorisation</h3>",
        f"<p>{_e(mem.get('n_synthetic'))} synthetic volumes against {_e(mem.get('n_train'))} "
        f"training and {_e(mem.get('n_test'))} held-out volumes. A generator that does not copy "
        "is as close to training as held-out data is: compare the fraction with the chance level "
        "M/(M+K) and with held-out real volumes' own fraction.</p>",
        _table(
            [
                "similarity",
                "synthetic closer to train",
                "held-out real closer to train",
                "chance level",
                "median nearest train",
                "median nearest held-out",
            ],
            rows,
        ),
    ]
    pairs = (mem.get("image") or {}).get("closest_pairs") or []
    if pairs and ctx.synthetic is not None and ctx.train is not None:
        ok = [
            p
            for p in pairs
            if p["synthetic_index"] < len(ctx.synthetic[0]) and p["train_index"] < len(ctx.train[0])
        ]
        if ok:
            parts.append(
                _img(
                    figures.closest_pairs_figure(ctx.synthetic[0], ctx.train[0], ok),
                    "closest pairs",
                    "Synthetic volumes most correlated with a training "
                    "volume (top) and that training volume (bottom).",
                )
            )
    elif pairs:
        parts.append(
            _table(
                ["synthetic", "nearest train", "r", "nearest held-out", "r"],
                [
                    [
                        p["synthetic_index"],
                        p["train_index"],
                        p["train_score"],
                        p["test_index"],
                        p["test_score"],
                    ]
                    for p in pairs
                ],
            )
        )
        parts.append(_missing("closest-pair images (pass the synthetic set and a real cache)"))
    return "".join(parts)


def _section_training(ctx: _Context) -> str:
    if not any(any("loss" in k for k in r) for r in ctx.run.training):
        return _absent(
            ctx.run, "training", f"no training losses in {ctx.run.path / 'metrics.jsonl'}"
        )
    return _img(figures.loss_curves(ctx.run.training), "loss curves", "From metrics.jsonl.")


def _section_comparison(ctx: _Context) -> str:
    if not ctx.compare:
        return _missing("comparison (pass --compare RUN for each other run)")
    runs = sorted([ctx.run, *ctx.compare], key=lambda r: r.epsilon)
    names = list(dict.fromkeys(n for r in runs for n in _metrics(r)))
    points = []
    for r in runs:
        values = {n: _metrics(r)[n].get("value") for n in _metrics(r)}
        unit = _mia_unit(r)
        if unit:
            values["MIA AUC"] = unit["auc"]
        points.append((r.label, r.epsilon, values))
    columns = names + (["MIA AUC"] if any("MIA AUC" in v for _, _, v in points) else [])
    table = _table(
        ["run", "ε", *columns],
        [[label, format_bound(eps), *[v.get(c) for c in columns]] for label, eps, v in points],
    )
    curve = [
        c for c in columns if sum(isinstance(v.get(c), (int, float)) for _, _, v in points) >= 2
    ]
    if not curve:
        return table + _missing("privacy–utility curves (no metric in two or more runs)")
    return table + _img(
        figures.privacy_utility(points, curve),
        "privacy-utility",
        "Metrics against ε; ∞ is the non-private run.",
    )


def _section_release(ctx: _Context) -> str:
    if ctx.release is None:
        return _missing(
            "no release bundle: `dpsynth release RUN --synthetic DIR --out BUNDLE` writes the "
            "files that may be shared"
        )
    try:
        summary = verify(ctx.release)
    except DpsynthError as e:
        return f'<p class="warn">The release bundle does not verify: {_e(e)}</p>'
    link = ctx.release_link
    links = " · ".join(
        f'<a href="{_e(link)}/{name}">{name}</a>' for name in (PRIVACY_MD, MODEL_CARD)
    )
    return (
        f'<p>Release bundle: <a href="{_e(link)}/">{_e(link)}/</a> ({links}).</p>'
        + _table(
            ["ε", "δ", "accountant", "files (SHA256SUMS)", "synthetic volumes"],
            [
                [
                    format_bound(summary["epsilon"]),
                    summary["delta"],
                    summary["accountant"],
                    summary["files"],
                    summary["volumes"],
                ]
            ],
        )  # fmt: skip
        + '<p class="note">Only this folder may be shared: it holds the model weights, the '
        "synthetic volumes with their conditions, PRIVACY.md, a model card and a SHA-256 "
        "manifest, chosen by allow-list; <code>dpsynth verify</code> re-checks it anywhere "
        "(this report found it intact). This report is not part of it.</p>"
    )


SECTIONS: tuple[tuple[str, str, Callable[[_Context], str]], ...] = (
    ("summary", "Summary", _section_summary),
    ("config", "Configuration", _section_config),
    ("ledger", "Privacy ledger", _section_ledger),
    ("samples", "Real vs synthetic", _section_samples),
    ("viewer", "Slice viewer", _section_viewer),
    ("attributes", "Conditioning attributes", _section_attributes),
    ("controllability", "Controllability", _section_controllability),
    ("metrics", "Metrics", _section_metrics),
    ("audit", "Privacy audit", _section_audit),
    ("training", "Training", _section_training),
    ("comparison", "Privacy–utility comparison", _section_comparison),
    ("release", "Release", _section_release),
)


def _render(section: Callable[[_Context], str], ctx: _Context) -> str:
    try:
        return section(ctx)
    # A malformed input file must cost its own section, not the whole report.
    except (DpsynthError, KeyError, TypeError, ValueError) as e:
        return f'<p class="warn">Could not render this section: {_e(type(e).__name__)}: {_e(e)}</p>'


# ---------------------------------------------------------------------------------------------
# Entry point


def write_report(
    run_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    compare: Sequence[str | os.PathLike] = (),
    eval_dir: str | os.PathLike | None = None,
    synthetic_dir: str | os.PathLike | None = None,
    real: Any = None,
    release: str | os.PathLike | None = None,
) -> Path:
    """Write `out_dir/index.html` for `run_dir` and return its path.

    `eval_dir` defaults to RUN/eval. `synthetic_dir` (NIfTI + attributes.csv) and `real` (a
    prepared cache, a NIfTI folder, a VolumeSet or (volumes, attributes)) default to the
    "synthetic" / "real" paths recorded in metrics.json, if any. `compare` lists other runs
    (each with its own RUN/eval) for the privacy–utility curves. `release` is a release
    bundle to verify and link (by a path relative to `out_dir`).
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise DpsynthError(f"{run_dir}: run folder not found")
    run = _read_run(run_dir, Path(eval_dir) if eval_dir else None)
    recorded = run.evaluation or {}
    synthetic_dir = synthetic_dir or recorded.get("synthetic")
    real = real if real is not None else recorded.get("real")
    real_is_cache = isinstance(real, (str, os.PathLike)) and is_cache(_source_path(real))
    ctx = _Context(
        run=run,
        compare=[_read_run(Path(p), None) for p in compare],
        synthetic=_load_set(run, "synthetic", synthetic_dir, "test"),
        real=_load_set(run, "real", real, "test"),
        # evaluate() audits the cache's training split: memorisation indices refer to it.
        train=_load_set(run, "real", real, "train") if real_is_cache and _audit(run) else None,
        release=Path(release) if release is not None else None,
        release_link=Path(os.path.relpath(release, out_dir)).as_posix() if release else "",
        candidates=_candidates(recorded.get("synthetic")),  # the set the figures measured
    )
    body = "".join(
        f'<section id="{sid}"><h2>{_e(title)}</h2>{_render(fn, ctx)}</section>'
        for sid, title, fn in SECTIONS
    )
    nav = "".join(f'<a href="#{sid}">{_e(title)}</a>' for sid, title, _ in SECTIONS)
    banner = ""
    if ctx.real is not None or ctx.train is not None or _audit(run) or _private_losses(run):
        banner = (
            '<p class="warn">This report contains results computed on private data and may '
            "show real images: it is an evaluation output (BRIEF section 3 (c)). Share it only "
            "with people allowed to see the private data.</p>"
        )
    script = ""
    if "dpsynth-gallery" in body:  # the viewer's script, inline: the report fetches nothing
        viewer = (resources.files("dpsynth") / "report" / "viewer.js").read_text()
        script = f"<script>{viewer}</script>"
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>dpsynth report: {_e(run.label)}</title><style>{CSS}</style></head>
<body><header><h1>dpsynth report: {_e(run.label)}</h1><nav>{nav}</nav></header>
<main>{banner}{body}</main>{script}</body></html>
"""
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        atomic_write_text(tmp / "index.html", page)
    return out_dir / "index.html"
