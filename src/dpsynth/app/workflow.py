"""Public pre-training → private DP fine-tuning as one resumable command (`dpsynth workflow`).

    OUT/autoencoder   trained on the public cache (its latent scale is public)
    OUT/ldm           the LDM pre-trained on the public cache       (skipped by no_pretrain)
    OUT/ldm_dp        DP-SGD on the private cache, from OUT/ldm or, with no_pretrain, from
                      scratch under the same privacy settings: the study's ablation. The
                      autoencoder stays public in both arms.

A complete stage (its model.json exists) is kept and an interrupted one resumes from its
checkpoint, so rerunning the command continues the chain.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from dpsynth.config import Config
from dpsynth.data.cache import Cache
from dpsynth.errors import DpsynthError
from dpsynth.launch import launched_world_size
from dpsynth.runs import MODEL_FILE, run_lineage
from dpsynth.training.autoencoder import train_autoencoder
from dpsynth.training.ldm import train_ldm


def public_stages(ldm: bool = True) -> tuple[str, ...]:
    """The folders of the public stages under OUT: the autoencoder, and the LDM with `ldm`."""
    return ("autoencoder", "ldm") if ldm else ("autoencoder",)


def pretrain_public_models(
    public: str | os.PathLike, out: str | os.PathLike, config: Config, ldm: bool = True
) -> tuple[Path, Path | None]:
    """OUT/autoencoder and (with `ldm`) OUT/ldm trained on the public cache."""

    out = Path(out)
    for stage in public_stages(ldm):
        refuse_other_data(out / stage, Cache(public))
    autoencoder = train_stage(
        out / "autoencoder",
        lambda run, resume: train_autoencoder(public, run, config, resume=resume),
    )
    if not ldm:
        return autoencoder, None
    return autoencoder, train_stage(
        out / "ldm", lambda run, resume: train_ldm(public, autoencoder, run, config, resume=resume)
    )


def run_workflow(
    public: str | os.PathLike,
    private: str | os.PathLike,
    out: str | os.PathLike,
    config: Config,
    pretrain: bool = True,
) -> Path:
    """Run the chain into `out` and return the DP LDM run."""

    refuse_same_data(public, private)
    out = Path(out)
    if launched_world_size() > 1 and not all(is_complete(out / s) for s in public_stages(pretrain)):
        raise DpsynthError("workflow: the public stages train as one process; run it once "
                           "without torchrun, then again under torchrun for the DP stage")  # fmt: skip
    autoencoder, init = pretrain_public_models(public, out, config, ldm=pretrain)
    return train_stage(
        out / "ldm_dp",
        lambda run, resume: train_ldm(
            private, autoencoder, run, config, init=init, resume=resume, dp=True
        ),
    )


def refuse_same_data(public: str | os.PathLike, private: str | os.PathLike) -> None:
    """The public stages must not train on the private data (same cache, a copy of it, the
    same data prepared again, or any patient of it at the same grid): they have no DP."""

    public_cache, private_cache = Cache(public), Cache(private)
    shared = public_cache.shared_patients(private_cache.patient_digests)
    if public_cache.same_data(private_cache) or shared:
        raise DpsynthError(
            f"--public {public} and --private {private} hold the same data ({shared} patients "
            "in both): the public stages would train on private data without DP"
        )


def refuse_other_data(run: Path, cache: Cache) -> None:
    """A complete public stage is kept only if it learned from `cache` alone: one kept from
    an earlier --public was never checked against this run's private data. (An interrupted
    one is checked by its checkpoint on resume.)"""
    if not (run / MODEL_FILE).exists():
        return
    lineage = run_lineage(run)
    other = [item for item in lineage if item != {"cache_id": cache.cache_id, "dp": False}]
    if other or not lineage:
        learned = other[0]["cache_id"] if other else "data it does not name"
        raise DpsynthError(f"{run}: a complete stage trained on {learned}, not --public "
                           f"{cache.path} ({cache.cache_id}); use a new --out")  # fmt: skip


def is_complete(run: Path) -> bool:
    """Whether a stage finished: its model.json is written last."""
    return (run / MODEL_FILE).exists()


def train_stage(run: Path, train: Callable[[Path, bool], Path]) -> Path:
    """Keep a complete stage; continue an interrupted one from its checkpoint.

    The one resumable-stage idiom of the commands that chain stages (workflow, demo, sweep):
    `train(run, resume)` runs the stage.
    """
    if is_complete(run):
        print(f"== {run.name}: complete, kept")
        return run
    resume = (run / "checkpoint" / "state.json").exists()
    print(f"== {run.name}" + (" (resumed)" if resume else ""))
    return train(run, resume)
