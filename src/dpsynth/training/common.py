"""Pieces every training loop shares: run folders, devices, schedules, batches."""

from __future__ import annotations

import contextlib
import math
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from dpsynth.config import RUN_CONFIG_FILE, Config, config_from_dict
from dpsynth.errors import DpsynthError
from dpsynth.io import atomic_write_text
from dpsynth.launch import launched_world_size
from dpsynth.privacy.ledger import Ledger
from dpsynth.runs import run_ledger, run_lineage


def prepare_run_dir(out: str | os.PathLike, resume: bool) -> Path:
    """Create the run folder; refuse to silently overwrite a previous run, and to resume a
    finished one (its one-shot releases, e.g. a DP latent scale, would be drawn again)."""
    out = Path(out)
    has_checkpoint = (out / "checkpoint" / "state.json").exists()
    if resume and (out / "model.json").exists():
        raise DpsynthError(f"{out}: this run is complete (model.json); --resume continues an "
                           "interrupted run only")  # fmt: skip
    if resume and not has_checkpoint:
        raise DpsynthError(f"{out}: --resume given but there is no checkpoint in this run")
    if not resume and (has_checkpoint or (out / "model.json").exists()):
        raise DpsynthError(f"{out}: a run already exists here (use --resume or a new --out)")
    out.mkdir(parents=True, exist_ok=True)
    return out


def save_config(run: Path, config: Config) -> None:
    """Record the run's config; called once the stage's checks (budget, plan) have passed,
    so a refused --resume leaves the config the run was trained with."""
    if is_main():
        atomic_write_text(run / RUN_CONFIG_FILE, config.to_yaml())


def init_distributed(dp: bool) -> int:
    """Join the torchrun process group (DP runs only); return this process's rank."""

    if launched_world_size() <= 1:
        return 0
    if not dp:
        raise DpsynthError("torchrun: multi-process training is supported for --dp runs only")
    return join_process_group()


def join_process_group() -> int:
    """Join torchrun's process group (NCCL on GPUs, gloo on CPUs) if launched under
    torchrun and not yet joined; return this process's rank (0 without torchrun)."""

    if launched_world_size() <= 1:
        return 0
    if not dist.is_initialized():
        if torch.cuda.is_available():  # NCCL's object collectives use the current device
            torch.cuda.set_device(pick_device())
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank()


def is_distributed() -> bool:
    """Whether this process is one rank of a torchrun job (`init_distributed` joined it)."""

    return dist.is_available() and dist.is_initialized()


def is_main() -> bool:
    """Whether this process writes the run's files (rank 0 under torchrun)."""

    return not is_distributed() or dist.get_rank() == 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def pick_device() -> torch.device:
    if torch.cuda.is_available():
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def autocast(device: torch.device, bf16: bool) -> contextlib.AbstractContextManager:
    """bf16 autocast on GPU only: CPU bf16 is slow and changes numerics for no gain here."""
    if bf16 and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def lr_factor(warmup_steps: int, decay_every: float | None = None, decay_factor: float = 1.0):
    """LambdaLR multiplier: linear warm-up, then x `decay_factor` every `decay_every` steps.

    The step decay follows the study's LDM trainer (projects/cardiac_diffusion/Trainer.py
    in compai-lab/2024-miccai-dgm-daum: StepLR, x0.9 every 25 epochs).
    """

    def factor(step: int) -> float:
        warm = min(1.0, (step + 1) / max(1, warmup_steps))
        if decay_every is None:
            return warm
        return warm * decay_factor ** math.floor(step / decay_every)

    return factor


def decay_steps(section, steps_per_epoch: float) -> float | None:
    """`lr_decay_epochs` of a TrainingConfig or PrivacyConfig, in optimiser steps."""
    if section.lr_decay_epochs is None:
        return None
    return section.lr_decay_epochs * steps_per_epoch


def public_steps_per_epoch(tcfg, volumes: int) -> float:
    """Steps per pass over `volumes` training volumes in a non-private stage."""
    return volumes / (tcfg.batch_size * tcfg.grad_accumulation)


def public_total_steps(tcfg, volumes: int) -> int:
    """`steps`, or `epochs` passes over the training volumes when `epochs` is set."""
    if tcfg.epochs is None:
        return tcfg.steps
    return max(1, math.ceil(tcfg.epochs * public_steps_per_epoch(tcfg, volumes)))


def seed_everything(seed: int) -> np.random.Generator:
    torch.manual_seed(seed)
    return np.random.default_rng(seed)


def carry_lineage(run: Path, parents: list[Path]) -> None:
    """Give a run trained without DP the ledger of the runs it was built from, if any.

    A public LDM on a DP autoencoder still releases what the autoencoder learned from
    private data; `dpsynth budget` must show it. Merged with what the run already records.
    """

    ledger = Ledger.of_lineage(parents)
    if len(ledger):
        ledger.save(run / "ledger.json")


def trained_on(
    cache_id: str, dp: bool, parents: Sequence[Path], ledger_entry: str = ""
) -> list[dict]:
    """model.json's ``trained_on``: every cache this run's weights learned from, by random id,
    and whether with DP: its own data first, then its parents' (each once). A DP stage
    names its `ledger_entry` (id), so that a ledger holding only an ancestor's DP-SGD on
    the same cache (a parent's ledger copied over a lost one) cannot pass for its own.

    Runs from before this field contribute nothing.
    """
    if dp and not ledger_entry:
        raise DpsynthError(f"cache {cache_id}: a DP stage's trained_on must name its ledger entry")
    own = {"cache_id": cache_id, "dp": bool(dp)}
    items = [own | {"ledger_entry": ledger_entry} if ledger_entry else own]
    for parent in parents:
        for item in run_lineage(parent):
            if item not in items:
                items.append(item)
    return items


def refuse_unsafe_parents(cache_id: str, cache: Path, dp: bool, parents: Sequence[Path]) -> None:
    """Refuse a stage on `cache` whose parents learned from it the other way (DP or not), or
    whose parent's ledger does not record the DP spending its ``trained_on`` names.

    A DP stage must not build on a parent trained on its data without DP: that parent holds
    the data without a guarantee. A non-DP stage must not train on data a parent learned
    with DP (its ``trained_on`` or its lineage's ledger): the data is private, and the new
    weights would carry it with no guarantee while the ledger shows a finite ε. And no stage
    may build on a parent whose ledger misses its own DP lineage, or that has none where
    its model.json does not say it never had one (`privacy.lineage.may_lack_ledger`): the
    new run inherits that ledger, and every ε read from it would be too small.
    """

    for parent in parents:
        ledger = run_ledger(parent)  # its lineage too
        lineage = run_lineage(parent)
        for item in lineage:
            if item["cache_id"] == cache_id and item["dp"] != dp:
                raise DpsynthError(
                    f"{parent}: trained {'with' if item['dp'] else 'without'} DP on the "
                    f"private cache {cache} (cache id {cache_id}); a "
                    f"{'DP' if dp else 'non-DP'} stage cannot build on it"
                )
        if not dp and cache_id in ledger.cache_ids:
            raise DpsynthError(
                f"{parent}: trained with DP on the private cache {cache} (its ledger names "
                f"cache id {cache_id}); train on it with --dp"
            )


def adopt_architecture(config: Config, init_meta: dict, sections: tuple[str, ...]) -> Config:
    """`config` with the architecture `sections` of the pre-trained `--init` run's model.json."""

    merged = config.to_dict()
    for section in sections:
        if merged[section] != init_meta[section]:
            warnings.warn(f"--init: using the pre-trained run's {section} settings", stacklevel=3)
        merged[section] = init_meta[section]
    return config_from_dict(merged)
