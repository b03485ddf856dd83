"""One exception type for bad input: the CLI prints its message on one line and exits 2."""

from __future__ import annotations


class DpsynthError(Exception):
    """A user-facing error: the message names the file, field or key and the problem."""

    exit_code = 2


class BudgetExceededError(DpsynthError):
    """A stage would push the lineage's total ε above the user's limit."""


class ReleaseRefusedError(DpsynthError):
    """`dpsynth release` will not write a bundle: a privacy condition is not met."""
