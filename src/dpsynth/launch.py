"""How this process was launched: alone, or as one rank of a torchrun job.

Light on purpose (no torch): the CLI asks before it imports anything heavy.
"""

from __future__ import annotations

import os

from dpsynth.errors import DpsynthError


def launched_world_size() -> int:
    """How many processes torchrun started for this job (its WORLD_SIZE; 1 without it)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def refuse_torchrun(command: str, why: str) -> None:
    """Refuse, before anything is written, a command that must run as one process."""
    if launched_world_size() > 1:
        raise DpsynthError(f"{command}: runs as one process, not under torchrun ({why})")
