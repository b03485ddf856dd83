"""Multi-process (torchrun) DP-SGD with the noise and averaging of a single process.

How Opacus' `DistributedDPOptimizer` (opacus 1.6, ``optimizers/ddpoptimizer.py``) works:
each rank clips and sums its own per-record gradients; ONLY rank 0 adds noise
N(0, (σC)²) to its sum; each rank divides by the `expected_batch_size` it was given; then
gradients are all-reduced (SUM) and divided by the world size K. Every rank ends with

    (Σ over all ranks of clipped gradients + N(0, (σC)²)) / (K · expected_batch_size).

Giving each rank ``expected_batch_size = q·N / K`` (as Opacus' PrivacyEngine does) yields
exactly the single-process average and noise std σC/(q·N): one patient, on one rank,
changes the global sum by at most C, and the noise on that sum is σC — the same mechanism.

Sampling: every rank draws the SAME global Poisson batch (the secret sampling seed, or
under `secure_rng` each epoch's fresh seed, is broadcast from rank 0) and keeps
``batch[rank::K]``. We do not use Opacus'
`DistributedUniformWithReplacementSampler`: it silently skips a rank's empty local batch,
so ranks would disagree on the number of steps and the all-reduce would hang or pair up
different steps. The accountant on every rank sees the global patient rate q per step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from opacus.optimizers import DistributedDPOptimizer, DPOptimizer
from torch import nn

from dpsynth.errors import DpsynthError


@dataclass(frozen=True)
class ProcessGroupInfo:
    """Where this process sits: rank, world size, and whether collectives are used."""

    rank: int = 0
    world_size: int = 1
    distributed: bool = False

    @classmethod
    def single(cls) -> ProcessGroupInfo:
        return cls()

    @classmethod
    def current(cls) -> ProcessGroupInfo:
        if not (dist.is_available() and dist.is_initialized()):
            raise DpsynthError(
                "distributed: torch.distributed is not initialised; launch with torchrun and "
                "call torch.distributed.init_process_group first"
            )
        return cls(dist.get_rank(), dist.get_world_size(), True)

    def sync_model_and_seed(self, model: nn.Module, seed: int) -> int:
        """Give every rank rank 0's weights and buffers; return rank 0's `seed`."""
        for tensor in [*model.parameters(), *model.buffers()]:
            dist.broadcast(tensor.data, src=0)
        return self.broadcast_seed(seed, device_of(model))

    def broadcast_seed(self, seed: int, device: torch.device) -> int:
        """Rank 0's `seed` on every rank (the identity in a single process)."""
        if not self.distributed:
            return seed
        shared = torch.tensor([seed], dtype=torch.int64, device=device)
        dist.broadcast(shared, src=0)
        return int(shared.item())

    def sum(self, value: int, device: torch.device) -> int:
        """`value` summed over the ranks (the identity in a single process)."""
        if not self.distributed:
            return value
        total = torch.tensor([value], dtype=torch.int64, device=device)
        dist.all_reduce(total)
        return int(total.item())


def make_dp_optimizer(
    optimizer: torch.optim.Optimizer,
    *,
    group: ProcessGroupInfo,
    noise_multiplier: float,
    max_grad_norm: float,
    expected_batch_size: float,
    generator: torch.Generator,
    secure_mode: bool,
) -> DPOptimizer:
    """Wrap `optimizer` so the averaged gradient has noise std σC / `expected_batch_size`.

    `expected_batch_size` is the GLOBAL q·N; it is split over ranks (see module docstring).
    """
    cls = DistributedDPOptimizer if group.distributed else DPOptimizer
    return cls(
        optimizer,
        noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm,
        expected_batch_size=expected_batch_size / group.world_size,
        loss_reduction="mean",
        generator=generator,
        secure_mode=secure_mode,
    )


def device_of(model: nn.Module) -> torch.device:
    # NCCL broadcasts need CUDA tensors; gloo takes CPU ones. Follow the model.
    return next(model.parameters()).device
