"""`make demo`: the whole pipeline on embedded phantoms, sized for 2 CPU cores.

public phantoms (acdc-like) ─► pre-trained autoencoder + LDM (+ best-of-k selector),
                                shipped, see `pretrain_public`
private phantoms (ukbb-like) ─► DP fine-tune at ε ─► DP attribute model ─► sample
                                  ─► referee ─► evaluate ─► release bundle ─► report

The public stages are the expensive ones on a CPU, so the repository ships their weights
(`src/dpsynth/assets/demo`), produced from simulated public data by `dpsynth pretrain-demo`
(a documented, seeded command). With `--retrain-public` the demo trains them itself.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from dpsynth.app.sample import sample_to_folder
from dpsynth.app.workflow import is_complete, pretrain_public_models, train_stage
from dpsynth.config import DEMO_CANDIDATES, Config, config_from_dict, load_config
from dpsynth.data.cache import Cache
from dpsynth.data.prepare import prepare
from dpsynth.data.simulate import simulate_cohort
from dpsynth.errors import DpsynthError
from dpsynth.evaluation.controllability import PER_PHASE, POOLED
from dpsynth.evaluation.evaluate import ALL_METRICS, evaluate
from dpsynth.evaluation.referee import (
    CONSTANT_LR,
    META_FILE,
    UNTRAINED,
    lr_recipe,
    train_referee,
)
from dpsynth.io import atomic_write_json, read_json
from dpsynth.launch import refuse_torchrun
from dpsynth.privacy.accounting import format_bound
from dpsynth.privacy.one_run_audit import Recipe
from dpsynth.privacy.outputs import labelled, mark_evaluation_only
from dpsynth.privacy.planner import plan
from dpsynth.report.html import write_report
from dpsynth.report.release import release
from dpsynth.report.stated_privacy import stated_privacy
from dpsynth.runs import load
from dpsynth.training.attributes import fit_attributes
from dpsynth.training.ldm import train_ldm

PUBLIC = {"patients": 240, "cohort": "acdc", "seed": 101}
PRIVATE = {"patients": 500, "cohort": "ukbb", "seed": 202}
PRIVATE_SPLIT = (0.7, 0.1, 0.2)
ATTRIBUTE_EPSILON = 2.0  # of the demo's total ε; the LDM gets the rest
N_SYNTHETIC = 120
CANDIDATES = DEMO_CANDIDATES  # best-of-k sampling by the shipped public selector
REFEREE_EPOCHS = 5
REFEREE_DOWNSAMPLE = 2  # the referee reads at 3.65 mm: 4x cheaper at the study's grid
# The selector: the referee's network on the public cache, trained longer (it has half the
# volumes) and shipped with the public models.
SELECTOR_EPOCHS = 10
# FRD is not computed here: it misranks noise (BENCHMARKS.md, "Fidelity metrics that rank")
# and cost 51 s of the 96x96 demo's budget; `dpsynth evaluate --metrics frd` still runs it.
DEMO_METRICS = tuple(m for m in ALL_METRICS if m != "frd")


@dataclass
class Stage:
    """Prints a stage's name and wall time; skips it when its output exists and `keep`."""

    name: str
    output: Path
    keep: bool
    timings: dict

    def __enter__(self) -> bool:
        self.start = time.perf_counter()
        done = self.keep and self.output.exists()
        print(f"\n== {self.name}" + (" (kept)" if done else ""), flush=True)
        return done

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is None:
            self.timings[self.name] = round(time.perf_counter() - self.start, 1)


def demo_assets() -> Path:
    return Path(str(resources.files("dpsynth") / "assets" / "demo"))


def cohort_paths(out: Path, spec: dict) -> tuple[Path, Path]:
    """Where `simulate_and_prepare` puts a simulated cohort: (raw folder, prepared cache)."""
    return out / f"{spec['cohort']}_raw", out / f"{spec['cohort']}_cache"


def simulate_and_prepare(out: Path, spec: dict, config: Config, split=(0.8, 0.1, 0.1)) -> Path:
    raw, cache = cohort_paths(out, spec)
    if not raw.exists():
        simulate_cohort(raw, spec["patients"], cohort=spec["cohort"], seed=spec["seed"],
                        shape=config.data.shape, spacing=config.data.spacing)  # fmt: skip
    if not cache.exists():
        report = prepare("ukbb", raw, cache, attributes_csv=raw / "attributes.csv", split=split,
                         seed=spec["seed"], shape=config.data.shape,
                         spacing=config.data.spacing)  # fmt: skip
        print(report.summary())
    return cache


def pretrain_public(out: Path, config: Config | None = None) -> Path:
    """Train the public autoencoder and LDM from simulated public phantoms into `out`.

    This is the command that produced the shipped demo weights (`dpsynth pretrain-demo`).
    """

    refuse_torchrun("pretrain-demo", "public pre-training is not split between ranks")
    config = config or load_config("demo")
    out = Path(out)
    cache = simulate_and_prepare(out / "data", PUBLIC, config)
    pretrain_public_models(cache, out, config)
    train_selector(cache, out / "selector")
    return out


def train_selector(public_cache: Path, out: Path) -> Path:
    """The demo's best-of-k selector: a segmenter of the public phantoms only. A finished
    one is kept (a resumed pre-training must not swap it under volumes already sampled), if
    it learned from `public_cache`: one left by an earlier --public was never checked against
    this run's private data."""
    if out.exists():
        if not (out / META_FILE).is_file():
            raise DpsynthError(f"{out}: an incomplete selector folder (no {META_FILE}); "
                               "remove it and run again")  # fmt: skip
        meta, wanted = read_json(out / META_FILE), Cache(public_cache).cache_id
        if meta.get("public") is not True or meta.get("cache_id") != wanted:
            raise DpsynthError(f"{out}: a selector not trained on --public {public_cache} "
                               f"(cache id {meta.get('cache_id')}, not {wanted}); use a new --out")  # fmt: skip
        return out
    return train_referee(public_cache, out, epochs=SELECTOR_EPOCHS, channels=(8, 16, 32), seed=0,
                         downsample=REFEREE_DOWNSAMPLE, public=True)  # fmt: skip


def train_demo_referee(private_cache: Path, out: Path) -> Path:
    """The referee the demo and the sweep measure with (evaluation only: it learns the
    private training split)."""
    return train_referee(private_cache, out, epochs=REFEREE_EPOCHS, channels=(8, 16, 32), seed=0,
                         downsample=REFEREE_DOWNSAMPLE)  # fmt: skip


def refuse_earlier_referee(referee: Path, remedy: str) -> None:
    """Refuse a kept referee folder that an earlier recipe trained: figures read by it
    would sit beside this recipe's on another scale (a full-resolution reading; a constant
    learning rate, under which FD-referee's baseline is half the current one; or none, an
    untrained referee)."""
    meta_path = referee / META_FILE
    if not meta_path.exists():
        return
    meta = read_json(meta_path)
    if meta.get("downsample", 1) != REFEREE_DOWNSAMPLE:
        raise DpsynthError(f"{referee}: a referee of an earlier recipe (full resolution); {remedy}")
    recipe = lr_recipe(meta)
    if recipe in (CONSTANT_LR, UNTRAINED):
        raise DpsynthError(f"{referee}: a referee of an earlier recipe (learning rate {recipe}: "
                           f"another FD-referee scale); {remedy}")  # fmt: skip


def demo_dp_recipe():
    """The demo's DP LDM recipe, planned from its preset without running it, for
    `dpsynth audit-privacy --demo-recipe` when there is no runs/demo."""

    p = load_config("demo").privacy
    records = round(PRIVATE["patients"] * PRIVATE_SPLIT[0])  # the split's expected size
    pl = plan(records=records, batch_size=p.batch_size, epochs=p.epochs,
              epsilon=p.epsilon - ATTRIBUTE_EPSILON, delta=p.delta, accountant=p.accountant)  # fmt: skip
    return Recipe.of(pl.noise_multiplier, p.max_grad_norm, pl.sample_rate, pl.steps, records,
                     p.delta, p.accountant, "demo preset (planned; runs/demo not used)")  # fmt: skip


def run_demo(out: Path, fresh: bool = True, retrain_public: bool = False) -> dict:
    refuse_torchrun("demo", "each rank would empty --out and run every stage itself")
    out = Path(out)
    if fresh and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    config = load_config("demo")
    total_epsilon = config.privacy.epsilon
    timings: dict[str, float] = {}
    keep = not fresh
    if keep:  # before any work: a kept referee's figures would mix two scales
        refuse_earlier_referee(out / "referee", "run without --keep")
    t0 = time.perf_counter()

    with Stage("public pre-trained models", out / "public", keep, timings):
        public = demo_assets()
        if retrain_public or not is_complete(public / "ldm"):
            print("training the public models (no shipped weights found; ~90 min on 2 cores)")
            public = pretrain_public(out / "public", config)
        else:
            print(f"using shipped public weights: {public}")
    with Stage("simulate + prepare private cohort", out / "data" / "ukbb_cache", keep, timings):
        # The simulated private cohort stands for the steward's data: labelled like it.
        mark_evaluation_only(out / "data")
        private = simulate_and_prepare(out / "data", PRIVATE, config, split=PRIVATE_SPLIT)
    ldm_run = out / "ldm_dp"
    with Stage(f"DP fine-tuning (ε budget {total_epsilon:g} in total)", ldm_run / "model.json",
               keep, timings) as done:  # fmt: skip
        if not done:
            dp_config = _with(config, **{"privacy.epsilon": total_epsilon - ATTRIBUTE_EPSILON,
                                         "privacy.max_total_epsilon": total_epsilon})  # fmt: skip
            train_stage(ldm_run, lambda run, resume: train_ldm(
                private, public / "autoencoder", run, dp_config, init=public / "ldm", dp=True,
                resume=resume))  # fmt: skip
    with Stage("DP attribute model", ldm_run / "attribute_model.json", keep, timings) as done:
        if not done:
            fit_attributes(private, ldm_run, epsilon=ATTRIBUTE_EPSILON, delta=config.privacy.delta,
                           max_total_epsilon=total_epsilon)  # fmt: skip
    synthetic = out / "synthetic"
    with Stage("sample from DP attributes", synthetic, keep, timings) as done:
        if not done:
            # Best of 4 by the public selector, chosen part-way: on three DP models LVESV
            # r +0.09-0.37 over plain draws, +0.02-0.07 over best of 3; channels-last
            # convolutions paid for the time (BENCHMARKS.md, "Best of 4, and what else
            # the choice could weigh", "Channels-last convolutions").
            sample_to_folder(ldm_run, synthetic, n=N_SYNTHETIC, attributes="dp", seed=0,
                             candidates=CANDIDATES, selector=public / "selector",
                             private=[private])  # fmt: skip
    referee = out / "referee"
    with Stage("train referee (evaluation only)", referee, keep, timings) as done:
        if not done:
            train_demo_referee(private, referee)
    eval_dir = ldm_run / "eval"
    with Stage("evaluate", eval_dir / "metrics.json", keep, timings) as done:
        if not done:
            evaluate(private, synthetic, eval_dir, metrics=DEMO_METRICS, referee=referee,
                     pipeline=load(ldm_run), seed=0)  # fmt: skip
    bundle = out / "release"
    with Stage("release (allow-listed bundle)", bundle, keep, timings) as done:
        if not done:
            release(ldm_run, synthetic, bundle)
    with Stage("report", out / "report" / "index.html", keep, timings):
        report = write_report(ldm_run, out / "report", release=bundle)

    epsilon, delta, _ = stated_privacy([ldm_run]).epsilon()
    summary = {
        "report": str(report),
        "release": str(bundle),
        "total_epsilon": epsilon,
        "delta": delta,
        "timings_s": timings,
        "wall_s": round(time.perf_counter() - t0, 1),
        "headline": _headline(eval_dir / "metrics.json"),
    }
    atomic_write_json(out / "summary.json", labelled(summary))  # headline: private test figures
    print(f"\nreport: {report}")
    print(f"release bundle (the only folder to share): {bundle}")
    print(
        f"total privacy spent: ε = {format_bound(summary['total_epsilon'])} at δ = {summary['delta']:g}"
    )
    for name, value in summary["headline"].items():
        print(f"  {name}: {value}")
    print(f"demo wall time: {summary['wall_s']:.0f} s")
    return summary


def _with(config: Config, **overrides) -> Config:
    plain = config.to_dict()
    for dotted, value in overrides.items():
        section, key = dotted.split(".")
        plain[section][key] = value
    return config_from_dict(plain)


def _headline(metrics_path: Path) -> dict:
    if not metrics_path.exists():
        return {}
    result = read_json(metrics_path)
    head = {}
    for name, m in result.get("metrics", {}).items():
        head[name] = f"{m.get('value')} (baseline {m.get('baseline')})"
    for attr in (*PER_PHASE, *POOLED):
        c = result.get("controllability", {}).get(attr)
        if c:
            head[f"controllability {attr}"] = (
                f"r {c.get('r')}, MAE {c.get('mae')} ({c.get('mae_pct')} %), "
                f"slope {c.get('slope')} (real ceiling r {c.get('ceiling_r')}, "
                f"MAE {c.get('ceiling_mae')})"
            )
    return head
