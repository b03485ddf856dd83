"""Atomic checkpoints as safetensors + JSON: loading never unpickles arbitrary objects."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save as save_safetensors_bytes

from dpsynth.errors import DpsynthError
from dpsynth.io import atomic_dir, atomic_write_json, read_json
from dpsynth.runs import load_weights


def optimizer_state(optimizer: torch.optim.Optimizer, prefix: str) -> tuple[dict, dict]:
    """Split an optimizer's state_dict into tensors (for safetensors) and JSON metadata."""
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, pstate in sd["state"].items():
        for key, value in pstate.items():
            if torch.is_tensor(value):
                tensors[f"{prefix}.{pid}.{key}"] = value
            else:
                scalars.setdefault(str(pid), {})[key] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def load_optimizer_state(
    optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict, prefix: str
) -> None:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        if name.startswith(prefix + "."):
            _, pid, key = name.split(".", 2)
            state.setdefault(int(pid), {})[key] = value
    for pid, values in meta["scalars"].items():
        state.setdefault(int(pid), {}).update(values)
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def rng_state(generator: np.random.Generator) -> tuple[dict[str, torch.Tensor], dict]:
    """Capture torch's and our numpy generator's state so a resumed run continues exactly."""
    tensors = {"rng.torch": torch.get_rng_state()}
    return tensors, {"numpy": generator.bit_generator.state}


def restore_rng(
    tensors: dict[str, torch.Tensor], meta: dict, generator: np.random.Generator
) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    generator.bit_generator.state = meta["numpy"]


def save_checkpoint(
    directory: str | os.PathLike,
    tensors: dict[str, torch.Tensor],
    state: dict[str, Any],
    extra_json: dict[str, Any] | None = None,
) -> None:
    """Write `directory/state.safetensors` + `state.json` (+ extra JSON files) as one unit.

    The folder is built aside and renamed, so a crash leaves the previous checkpoint whole.
    """
    with atomic_dir(directory) as tmp:
        tensors = {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}
        (tmp / "state.safetensors").write_bytes(save_safetensors_bytes(tensors))
        atomic_write_json(tmp / "state.json", state)
        for name, obj in (extra_json or {}).items():
            atomic_write_json(tmp / name, obj)


def load_checkpoint(directory: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    directory = Path(directory)
    if not (directory / "state.json").exists():
        raise DpsynthError(f"{directory}: no checkpoint to resume from")
    return load_weights(directory / "state.safetensors"), read_json(directory / "state.json")


def strip_prefix(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries of a flat checkpoint under `prefix`, with the prefix removed."""
    return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
