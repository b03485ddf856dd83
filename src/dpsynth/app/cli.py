"""`dpsynth` command line: a thin layer over the Python API.

Each sub-command parses its flags, calls one API function and prints a short summary.
Commands import their modules inside the function: `dpsynth --help` and light commands
(budget, verify) start without loading torch and the models (start-up time).
User errors (DpsynthError) print one line and exit 2; nothing half-written is left.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

from dpsynth.config import (
    DEFAULT_DELTA,
    DEFAULT_SHAPE,
    DEFAULT_SPACING,
    Config,
    stage_config,
)
from dpsynth.errors import DpsynthError
from dpsynth.launch import refuse_torchrun


def _triple(kind: type):
    def parse(text: str) -> tuple:
        try:
            values = tuple(kind(v) for v in text.split(","))
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected three comma-separated numbers, got '{text}'"
            ) from None
        if len(values) != 3:
            raise argparse.ArgumentTypeError(
                f"expected three comma-separated numbers, got '{text}'"
            )
        return values

    return parse


def _xyz_spacing(text: str) -> tuple[float, float, float]:
    """`--spacing x,y,z` (NIfTI order, as users read it off headers) as (dz, dy, dx)."""
    x, y, z = _triple(float)(text)
    return (z, y, x)


def _selector_args(p: argparse.ArgumentParser) -> None:
    """--selector and --private, as `sample` and `explore` check a best-of-k selector."""
    p.add_argument(
        "--selector",
        type=Path,
        help="segmenter declared trained on PUBLIC data only (`dpsynth train-referee --public` "
        "on a public cache); one trained on a cache the run's ledger names is refused",
    )
    p.add_argument(
        "--private",
        type=Path,
        action="append",
        default=[],
        metavar="CACHE",
        help="a private cache the run's ledger names, where it is at hand (repeat for each): "
        "--selector is refused if its meta lists any of the cache's patients (by "
        "byte-identical prepared volumes), whatever the cache id; unchecked caches get a "
        "warning",
    )


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", choices=("demo", "paper"), help="start from a named preset")
    p.add_argument("--config", type=Path, help="YAML config file (overrides the preset)")
    p.add_argument("--steps", type=int, help="training steps (overrides the config)")
    p.add_argument("--seed", type=int, help="random seed (overrides the config)")
    p.add_argument(
        "--resume", action="store_true", help="continue the run in --out from its checkpoint"
    )


def _dp_args(p: argparse.ArgumentParser, optional: bool = True) -> None:
    g = p.add_argument_group("differential privacy (patient-level DP-SGD)")
    if optional:
        g.add_argument("--dp", action="store_true", help="train with DP-SGD; --data is private")
    g.add_argument(
        "--epsilon", type=float, help="target ε for this stage (noise is calibrated to it)"
    )
    g.add_argument(
        "--noise-multiplier", type=float, help="fixed noise multiplier σ instead of --epsilon"
    )
    g.add_argument(
        "--delta", type=float, help=f"δ (default {DEFAULT_DELTA:g}; must be well below 1/patients)"
    )
    g.add_argument("--max-grad-norm", type=float, help="per-patient clipping norm C")
    g.add_argument("--epochs", type=float, help="planned epochs over the patients")
    g.add_argument("--batch-size", type=int, help="expected patients per logical batch")
    g.add_argument("--physical-batch-size", type=int, help="patients per forward pass")
    g.add_argument("--accountant", choices=("prv", "rdp"), help="privacy accountant")
    g.add_argument(
        "--max-total-epsilon", type=float, help="refuse if the lineage total would exceed this"
    )


# --dp flag -> privacy.<key>: each lands in the stage's config (tests/test_cli.py checks all)
PRIVACY_FLAGS = (
    "epsilon",
    "noise_multiplier",
    "delta",
    "max_grad_norm",
    "epochs",
    "batch_size",
    "physical_batch_size",
    "accountant",
    "max_total_epsilon",
)


def config_from_args(args: argparse.Namespace, training_section: str) -> Config:
    """A training command's config: its flags as overrides of preset, file or saved config."""
    overrides = {
        f"{training_section}.{flag}": getattr(args, flag)
        for flag in ("steps", "seed")
        if getattr(args, flag) is not None
    }
    for flag in PRIVACY_FLAGS:
        if getattr(args, flag, None) is not None:
            overrides[f"privacy.{flag}"] = getattr(args, flag)
    return stage_config(args.out, args.resume, args.preset, args.config, overrides)


# ---------------------------------------------------------------- handlers


def cmd_simulate(args: argparse.Namespace) -> None:
    from dpsynth.data.simulate import simulate_cohort  # start-up time (module docstring)

    out = simulate_cohort(
        args.out, args.patients, cohort=args.cohort, seed=args.seed, shape=tuple(args.shape),
        spacing=args.spacing, workers=args.workers,
    )  # fmt: skip
    print(f"simulated {args.patients} {args.cohort} patients -> {out}")


def cmd_prepare(args: argparse.Namespace) -> None:
    from dpsynth.data.prepare import prepare  # start-up time (module docstring)

    report = prepare(
        args.layout, args.src, args.out, attributes_csv=args.attributes, split=tuple(args.split),
        seed=args.seed, shape=tuple(args.shape), spacing=args.spacing,
        prefer_csv_attributes=args.prefer_csv_attributes, skip_bad=args.skip_bad,
    )  # fmt: skip
    print(report.summary())


def cmd_train_autoencoder(args: argparse.Namespace) -> None:
    from dpsynth.training.autoencoder import train_autoencoder  # start-up time (module docstring)

    config = config_from_args(args, "autoencoder_training")
    run = train_autoencoder(
        args.data, args.out, config, init=args.init, resume=args.resume, dp=args.dp
    )
    print(f"autoencoder run -> {run}")


def cmd_train_ldm(args: argparse.Namespace) -> None:
    from dpsynth.training.ldm import train_ldm  # start-up time (module docstring)

    config = config_from_args(args, "ldm_training")
    run = train_ldm(
        args.data, args.autoencoder, args.out, config, init=args.init, resume=args.resume,
        dp=args.dp, validation_data=args.validation_data,
        private_validation=args.private_validation,
    )  # fmt: skip
    print(f"latent diffusion run -> {run}")


def cmd_sample(args: argparse.Namespace) -> None:
    from dpsynth.app.sample import sample_to_folder  # start-up time (module docstring)
    from dpsynth.training.common import is_main

    out = sample_to_folder(
        args.run, args.out, n=args.n, attributes=args.attributes, settings=args.set,
        sampler=args.sampler, steps=args.steps, guidance=args.guidance,
        temperature=args.temperature, seed=args.seed, conditions_source=args.conditions_source,
        candidates=args.candidates, selector=args.selector, private=args.private,
    )  # fmt: skip
    if is_main():  # under torchrun, rank 0 speaks for the job
        print(f"{args.n} volumes -> {out}")


def cmd_release(args: argparse.Namespace) -> None:
    from dpsynth.report.release import release  # start-up time (module docstring)

    out = release(args.run, args.synthetic, args.out, max_epsilon=args.max_epsilon)
    print(f"release bundle -> {out} (check it anywhere with `dpsynth verify {out}`)")


def cmd_verify(args: argparse.Namespace) -> None:
    from dpsynth.report.release import describe, verify  # start-up time (module docstring)

    print(describe(verify(args.bundle)))


def cmd_fit_attributes(args: argparse.Namespace) -> None:
    from dpsynth.training.attributes import fit_attributes  # start-up time (module docstring)

    run = fit_attributes(
        args.data, args.out, epsilon=args.epsilon, delta=args.delta,
        max_total_epsilon=args.max_total_epsilon,
    )  # fmt: skip
    print(f"DP attribute model -> {run}")


def cmd_budget(args: argparse.Namespace) -> None:
    from dpsynth.privacy.planner import format_plan, plan  # start-up time (module docstring)

    if args.targets[0] == "plan":
        if len(args.targets) > 1:
            raise DpsynthError("budget plan: takes no run folders")
        for flag in ("records", "batch_size", "epochs"):
            if getattr(args, flag) is None:
                raise DpsynthError(f"budget plan: --{flag.replace('_', '-')} is required")
        given = {k: getattr(args, k) for k in ("delta", "accountant")}
        given = {k: v for k, v in given.items() if v is not None}  # else plan's defaults
        result = plan(
            records=args.records, batch_size=args.batch_size, epochs=args.epochs,
            epsilon=args.epsilon, noise_multiplier=args.noise_multiplier, **given,
        )  # fmt: skip
        print(json.dumps(result.to_json()) if args.json else format_plan(result))
        return
    from dpsynth.privacy.ledger import format_ledger  # start-up time (module docstring)
    from dpsynth.report.stated_privacy import stated_privacy  # start-up time (module docstring)

    # Several runs: a public one (no ledger) may be the one that learned another's cohort.
    stated = stated_privacy(args.targets, missing_ok=len(args.targets) > 1)
    if len(args.targets) > 1 and not stated.ledger:
        raise DpsynthError("budget: the ledgers of these runs record no use of private data")
    if args.json:
        epsilon, delta, accountant = stated.epsilon()
        summary = {
            "runs": [str(run) for run in stated.runs],
            "epsilon": None if stated.is_not_dp else epsilon,
            "delta": delta,
            "accountant": accountant,
            "not_dp": stated.not_dp,
            "shaping_uses": [e.stage for e in stated.ledger.shaping_uses()],
            "lineage_unchecked": stated.unchecked,
            **stated.ledger.to_json(),
        }
        print(json.dumps(summary, indent=2))
        return
    if len(stated.runs) > 1:
        print(f"Joint ledger of {len(stated.runs)} runs released together (entries they share "
              "counted once):")  # fmt: skip
    print(format_ledger(stated.ledger, stated.not_dp, stated.delta))
    for why in stated.unchecked:
        print(f"  note: {why}")


def cmd_train_referee(args: argparse.Namespace) -> None:
    from dpsynth.evaluation.referee import train_referee  # start-up time (module docstring)

    out = train_referee(args.data, args.out, epochs=args.epochs, seed=args.seed,
                        public=args.public)  # fmt: skip
    print(f"referee -> {out}")


def cmd_train_second_reader(args: argparse.Namespace) -> None:
    from dpsynth.evaluation.second_reader import train_second_reader  # start-up time

    out = train_second_reader(args.data, args.out, epochs=args.epochs, seed=args.seed)
    print(f"second reader (evaluation only, never release) -> {out}")


def cmd_evaluate(args: argparse.Namespace) -> None:
    from dpsynth.evaluation.evaluate import evaluate  # start-up time (module docstring)
    from dpsynth.runs import load

    metrics = tuple(args.metrics.split(",")) if args.metrics else None
    kwargs = {"metrics": metrics} if metrics else {}
    result = evaluate(
        args.real, args.synthetic, args.out, referee=args.referee,
        inception_weights=args.inception_weights, seed=args.seed,
        pipeline=load(args.model_run) if args.model_run else None,
        study=args.study, second_reader=args.second_reader, **kwargs,
    )  # fmt: skip
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        for name, m in result.get("metrics", {}).items():
            print(f"{name:>16}: {m.get('value')}  (baseline {m.get('baseline')})")


def cmd_report(args: argparse.Namespace) -> None:
    from dpsynth.report.html import write_report  # start-up time (module docstring)

    path = write_report(
        args.run, args.out, compare=tuple(args.compare or ()), eval_dir=args.eval,
        synthetic_dir=args.synthetic, real=args.real, release=args.release,
    )  # fmt: skip
    print(f"report -> {path}")


def cmd_explore(args: argparse.Namespace) -> None:
    from dpsynth.app.explore.server import serve  # start-up time (module docstring)

    serve(args.run, host=args.host, port=args.port, referee=args.referee, selector=args.selector,
          private=args.private)  # fmt: skip


def cmd_demo(args: argparse.Namespace) -> None:
    from dpsynth.app.demo import run_demo  # start-up time (module docstring)

    run_demo(Path(args.out), fresh=not args.keep, retrain_public=args.retrain_public)


def cmd_pretrain_demo(args: argparse.Namespace) -> None:
    from dpsynth.app.demo import pretrain_public  # start-up time (module docstring)

    out = pretrain_public(args.out)
    print(f"public demo models -> {out}")


def cmd_audit_privacy(args: argparse.Namespace) -> None:
    from dpsynth.app.demo import demo_dp_recipe  # start-up time (module docstring)
    from dpsynth.privacy import one_run_audit as ora

    if (args.run is None) == (not args.demo_recipe):
        raise DpsynthError("audit-privacy: give a run folder or --demo-recipe (exactly one)")
    if args.report is not None and args.run is None:
        raise DpsynthError("audit-privacy: --report needs a run folder")
    out = args.out
    if out is None:
        # Only the run's own recipe on the shipped engine may sit in the run (the report shows it).
        if args.run is None or args.broken or args.epsilon is not None:
            raise DpsynthError(
                "audit-privacy: --out is required with --demo-recipe, --broken or --epsilon"
            )
        out = args.run / ora.AUDIT_DIR
    recipe = demo_dp_recipe() if args.demo_recipe else ora.recipe_from_run(args.run)
    if args.epsilon is not None:
        recipe = ora.recalibrate(recipe, args.epsilon)
    canaries = ora.DEFAULT_CANARIES if args.canaries is None else args.canaries
    say = None if args.json else (lambda msg: print(msg, flush=True))
    result = ora.audit_privacy(
        out, recipe, canaries=canaries, seed=args.seed, broken=args.broken,
        public_patients=args.public_patients, progress=say,
    )  # fmt: skip
    if args.report is not None:
        from dpsynth.report.html import write_report  # start-up time (module docstring)

        write_report(args.run, args.report)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(ora.format_result(result))
        print(f"audit (audit only, not releasable) -> {out / ora.AUDIT_FILE}")


def cmd_workflow(args: argparse.Namespace) -> None:
    from dpsynth.app.workflow import run_workflow  # start-up time (module docstring)

    config = config_from_args(args, "ldm_training")
    run = run_workflow(args.public, args.private, args.out, config, pretrain=not args.no_pretrain)
    print(f"DP latent diffusion run -> {run}")


def cmd_sweep(args: argparse.Namespace) -> None:
    from dpsynth.app.sweep import run_sweep  # start-up time (module docstring)

    grid = {"epsilons": args.epsilons} if args.epsilons else {}  # else the sweep's default
    run_sweep(args.out, preset=args.preset, public=args.public, private=args.private,
              pretrain=args.pretrain, bench_md=args.bench_md, **grid)  # fmt: skip


# ---------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dpsynth",
        description="Differentially private latent diffusion for 3D medical volumes.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "simulate", help="write a cohort of cardiac MRI phantoms (ukbb_cardiac layout)"
    )
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--patients", required=True, type=int)
    p.add_argument("--cohort", choices=("ukbb", "acdc"), default="ukbb")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shape", type=_triple(int), default=DEFAULT_SHAPE, help="slices,H,W")
    p.add_argument(
        "--spacing", type=_xyz_spacing, default=DEFAULT_SPACING, help="x,y,z mm (NIfTI order)"
    )
    p.add_argument("--workers", type=int, default=2)
    p.set_defaults(func=cmd_simulate)

    p = sub.add_parser("prepare", help="ingest a dataset into a memory-mapped cache")
    p.add_argument("--layout", required=True, help="ukbb, acdc, mnms or manifest")
    p.add_argument("--src", required=True, type=Path)
    p.add_argument(
        "--attributes", type=Path, help="attributes CSV (ukbb: keyed by id; mnms: info CSV)"
    )
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--split", type=_triple(float), default=(0.8, 0.1, 0.1), help="train,val,test")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shape", type=_triple(int), default=DEFAULT_SHAPE, help="slices,H,W")
    p.add_argument(
        "--spacing", type=_xyz_spacing, default=DEFAULT_SPACING, help="x,y,z mm (NIfTI order)"
    )
    p.add_argument("--prefer-csv-attributes", action="store_true", help="CSV values win over masks")
    p.add_argument("--skip-bad", action="store_true", help="skip bad patients and list them")
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("train-autoencoder", help="train the compression model")
    p.add_argument("--data", required=True, type=Path)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--init", type=Path, help="pre-trained autoencoder run to fine-tune from")
    _config_args(p)
    _dp_args(p)
    p.set_defaults(func=cmd_train_autoencoder)

    p = sub.add_parser("train-ldm", help="train the latent denoiser")
    p.add_argument("--data", required=True, type=Path)
    p.add_argument("--autoencoder", required=True, type=Path, help="autoencoder run folder")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--init", type=Path, help="pre-trained LDM run to fine-tune from")
    p.add_argument("--validation-data", type=Path, help="public cache for validation under DP")
    p.add_argument(
        "--private-validation",
        action="store_true",
        help="--validation-data is private: record it in the ledger as a non-private use",
    )
    _config_args(p)
    _dp_args(p)
    p.set_defaults(func=cmd_train_ldm)

    p = sub.add_parser("sample", help="synthesise volumes as NIfTI + attributes.csv")
    p.add_argument("run", type=Path)
    p.add_argument("--n", required=True, type=int)
    p.add_argument(
        "--attributes", help="CSV of conditioning rows, or 'dp' for the DP attribute model"
    )
    p.add_argument("--set", action="append", default=[], metavar="NAME=VALUE")
    p.add_argument(
        "--conditions-source",
        choices=("user", "public", "private"),
        default="user",
        help="where the --attributes CSV came from; 'private' (real patients' attributes) "
        "marks the set evaluation-only, and `dpsynth release` refuses it",
    )
    p.add_argument("--sampler", choices=("ddpm", "ddim", "dpm++"))
    p.add_argument("--steps", type=int)
    p.add_argument("--guidance", type=float)
    p.add_argument(
        "--temperature", type=float, help="starting noise's sd, in (0, 1]; default: the run's"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--candidates",
        type=int,
        default=1,
        help="start this many trajectories per volume and finish the one whose LV/RV volumes "
        "and LV wall thickness --selector measures nearest the request, "
        "part-way (default 1: no choice)",
    )
    _selector_args(p)
    p.add_argument("--out", required=True, type=Path)
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser(
        "release", help="write the allow-listed release bundle of a DP run and its samples"
    )
    p.add_argument("run", type=Path, help="the DP latent diffusion run")
    p.add_argument("--synthetic", required=True, type=Path, help="a folder from `dpsynth sample`")
    p.add_argument("--out", required=True, type=Path, help="the bundle folder to write")
    p.add_argument(
        "--max-epsilon", type=float, help="the steward's limit on the composed ε (refuse above)"
    )
    p.set_defaults(func=cmd_release)

    p = sub.add_parser("verify", help="check a release bundle: file digests and recomputed ε")
    p.add_argument("bundle", type=Path)
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("fit-attributes", help="fit a DP model of the private attribute table")
    p.add_argument("--data", required=True, type=Path)
    p.add_argument("--dp", action="store_true", required=True)
    p.add_argument("--epsilon", required=True, type=float)
    p.add_argument("--delta", type=float, default=DEFAULT_DELTA)
    p.add_argument("--max-total-epsilon", type=float)
    p.add_argument("--out", required=True, type=Path, help="the model run whose ledger it joins")
    p.set_defaults(func=cmd_fit_attributes)

    p = sub.add_parser("budget", help="plan a DP budget, or show a run's ledger")
    p.add_argument(
        "targets", nargs="+", metavar="TARGET",
        help="'plan', or run folders (several: their joint ε, as if released together)",
    )  # fmt: skip
    p.add_argument("--records", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--epochs", type=float)
    p.add_argument("--epsilon", type=float)
    p.add_argument("--noise-multiplier", type=float)
    p.add_argument("--delta", type=float)
    p.add_argument("--accountant", choices=("prv", "rdp"))
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_budget)

    p = sub.add_parser(
        "train-referee", help="train the referee segmenter on real volumes with masks"
    )
    p.add_argument("--data", required=True, type=Path)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--public",
        action="store_true",
        help="the data is public (a selector for `sample --candidates`): not labelled "
        "evaluation-only, and its meta lists the cache's patient digests (never use it on "
        "private data)",
    )
    p.set_defaults(func=cmd_train_referee)

    p = sub.add_parser(
        "train-second-reader",
        help="train the independent 2D slice segmenter that re-measures controllability",
    )
    p.add_argument("--data", required=True, type=Path, help="prepared cache (train split)")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_train_second_reader)

    p = sub.add_parser("evaluate", help="compare synthetic volumes with real ones")
    p.add_argument("--real", required=True, type=Path)
    p.add_argument("--synthetic", required=True, type=Path)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--metrics", help="comma-separated subset")
    p.add_argument("--referee", type=Path)
    p.add_argument("--inception-weights", type=Path)
    p.add_argument("--model-run", type=Path, help="LDM run, for the membership-inference audit")
    p.add_argument(
        "--second-reader",
        type=Path,
        help="second reader folder (dpsynth train-second-reader): controllability re-measured "
        "by an independent 2D U-Net",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--study",
        action="store_true",
        help="also report the reference study's variants (*_study: its FID formula, "
        "neighbour MS-SSIM, pooled controllability, padding clean-up); FID then expects "
        "torchvision's Inception-v3 on ImageNet-normalised input",
    )
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("report", help="write the self-contained HTML report")
    p.add_argument("run", type=Path)
    p.add_argument("--compare", type=Path, action="append", help="other runs (privacy-utility)")
    p.add_argument("--eval", type=Path, help="evaluation folder (default RUN/eval)")
    p.add_argument("--synthetic", type=Path, help="synthetic folder (default: from metrics.json)")
    p.add_argument("--real", type=Path, help="real cache (default: from metrics.json)")
    p.add_argument("--release", type=Path, help="release bundle to verify and link")
    p.add_argument("--out", required=True, type=Path)
    p.set_defaults(func=cmd_report)

    p = sub.add_parser(
        "explore",
        help="a local web page to steer a run's sampler (with --selector: best of k, default 4)",
    )
    p.add_argument("run", type=Path)
    p.add_argument("--host", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, help="port (default 8765)")
    p.add_argument(
        "--referee", type=Path, help="referee folder to measure volumes (default: RUN/referee)"
    )
    _selector_args(p)  # the page then offers "best of" (default 4, as make demo samples)
    p.set_defaults(func=cmd_explore)

    p = sub.add_parser("demo", help="the whole pipeline on embedded phantoms (make demo)")
    p.add_argument("--out", type=Path, default=Path("runs/demo"))
    p.add_argument("--keep", action="store_true", help="reuse finished stages in --out")
    p.add_argument("--retrain-public", action="store_true", help="train the public models too")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("pretrain-demo", help="train the public demo models (shipped weights)")
    p.add_argument("--out", type=Path, default=Path("runs/pretrain-demo"))
    p.set_defaults(func=cmd_pretrain_demo)

    p = sub.add_parser(
        "audit-privacy",
        help="one-run empirical privacy audit of a run's DP-SGD recipe (simulated data only)",
    )
    p.add_argument(
        "run", nargs="?", type=Path, help="DP run whose recipe (ledger, config) to audit"
    )
    p.add_argument("--demo-recipe", action="store_true", help="the demo preset's recipe, no run")
    p.add_argument(
        "--epsilon", type=float, help="recalibrate σ to this accounted ε (same q, steps)"
    )
    p.add_argument("--canaries", type=int, help="canary patients M (default 10000)")
    p.add_argument("--public-patients", type=int, help="simulated phantoms (default: run's count)")
    p.add_argument(
        "--broken",
        choices=("noise-quarter", "per-volume-clipping"),
        help="audit a deliberately broken engine (shows the audit's power)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, help="output folder (default RUN/privacy_audit)")
    p.add_argument("--report", type=Path, help="then re-write RUN's HTML report into this folder")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_audit_privacy)

    p = sub.add_parser("workflow", help="public pre-training, then DP fine-tuning, resumable")
    p.add_argument("--public", required=True, type=Path, help="public cache (pre-training)")
    p.add_argument("--private", required=True, type=Path, help="private cache (DP stage)")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument(
        "--no-pretrain",
        action="store_true",
        help="ablation: DP-train the LDM from scratch under the same budget",
    )
    p.add_argument("--preset", choices=("demo", "paper"), help="start from a named preset")
    p.add_argument("--config", type=Path, help="YAML config file (overrides the preset)")
    _dp_args(p, optional=False)
    p.set_defaults(func=cmd_workflow, steps=None, seed=None, resume=False)

    p = sub.add_parser("sweep", help="the study's grid: ε × pre-training")
    p.add_argument("--out", type=Path, default=Path("runs/sweep"))
    p.add_argument("--preset", choices=("demo", "paper"), default="demo")
    p.add_argument(
        "--public",
        type=Path,
        help="public cache: the public models and the best-of-k selector (default: demo models / phantoms)",
    )
    p.add_argument("--private", type=Path, help="private cache (default: simulated phantoms)")
    p.add_argument(
        "--epsilons", help="comma-separated, inf = no DP (default: the study's 0.1,1,10,inf)"
    )
    p.add_argument("--pretrain", choices=("both", "on", "off"), default="both")
    p.add_argument("--bench-md", type=Path)
    p.set_defaults(func=cmd_sweep)
    return parser


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """A warning as one line for the command line user: `warning: <message>`."""
    print(f"warning: {message}", file=sys.stderr if file is None else file)


# Commands that use several processes under torchrun: DP training, sampling a share per rank,
# and the workflow's DP stage. Any other command on every rank would repeat its work into
# the same files (and `demo`, `sweep` would charge their DP stages once per rank).
MULTI_PROCESS_COMMANDS = ("train-ldm", "train-autoencoder", "sample", "workflow")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command not in MULTI_PROCESS_COMMANDS:
            why = f"only {', '.join(MULTI_PROCESS_COMMANDS)} use several processes"
            refuse_torchrun(args.command, why)
        with warnings.catch_warnings():  # restores the warning machinery on return
            warnings.showwarning = _show_warning
            args.func(args)
    except DpsynthError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
