"""Budget planner: turn (records, batch size, epochs) and ε or σ into a DP-SGD plan.

Sampling is Poisson over patients (the unit of privacy): every step includes each patient
independently with probability ``sample_rate = batch_size / records``, so ``batch_size``
is the *expected* number of patients per step. One epoch is ``1 / sample_rate`` steps
(``records`` patients seen in expectation), hence ``steps = ceil(epochs / sample_rate)``.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass
from fractions import Fraction

from dpsynth.config import DEFAULT_DELTA
from dpsynth.errors import DpsynthError
from dpsynth.privacy.accounting import (
    DEFAULT_ACCOUNTANT,
    check_accountant,
    check_delta,
    check_epsilon,
    check_mechanism,
    epsilon_for,
    format_bound,
    noise_for_epsilon,
    warn_delta,
)


@dataclass(frozen=True)
class Plan:
    """A DP-SGD schedule and what it spends: `epsilon` is the accountant's bound at `delta`."""

    epsilon: float
    delta: float
    noise_multiplier: float
    sample_rate: float
    steps: int
    accountant: str

    def to_json(self) -> dict:
        return asdict(self)


def plan(
    records: int,
    batch_size: int,
    epochs: float,
    epsilon: float | None = None,
    noise_multiplier: float | None = None,
    delta: float = DEFAULT_DELTA,
    accountant: str = DEFAULT_ACCOUNTANT,
) -> Plan:
    """Plan DP-SGD for a target `epsilon` (σ is calibrated) or a given `noise_multiplier`.

    Exactly one of `epsilon` and `noise_multiplier` is given. With `epsilon` the returned
    plan's ε is the accountant's value for the calibrated σ: at most the target.
    """
    for key, value in (("records", records), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
            raise DpsynthError(f"{key}: must be an integer >= 1, got {value!r}")
    records, batch_size = int(records), int(batch_size)
    if batch_size > records:
        raise DpsynthError(f"batch_size: {batch_size} exceeds the number of records {records}")
    if isinstance(epochs, bool) or not (isinstance(epochs, numbers.Real) and 0 < epochs < math.inf):
        raise DpsynthError(f"epochs: must be a finite number > 0, got {epochs!r}")
    if (epsilon is None) == (noise_multiplier is None):
        raise DpsynthError("epsilon / noise_multiplier: give exactly one of them")
    check_accountant(accountant)
    delta = check_delta(delta)
    warn_delta(delta, records)

    sample_rate = batch_size / records
    # ceil(epochs / sample_rate) in exact arithmetic: 0.3 epochs of 10 records is 3 steps, not 4
    steps = math.ceil(Fraction(float(epochs)) * records / batch_size)
    if epsilon is not None:
        check_epsilon(epsilon)
        noise_multiplier = noise_for_epsilon(epsilon, delta, sample_rate, steps, accountant)
    check_mechanism((noise_multiplier, sample_rate, steps), key="noise_multiplier")
    spent = epsilon_for([(noise_multiplier, sample_rate, steps)], delta, accountant)
    return Plan(spent, delta, float(noise_multiplier), sample_rate, steps, accountant)


def format_plan(p: Plan) -> str:
    """Human-readable summary for ``dpsynth budget plan``."""
    return "\n".join(
        [
            f"DP-SGD plan ({p.accountant} accountant, Poisson sampling over patients)",
            f"  sample rate       q = {p.sample_rate:.6g} (expected batch / records)",
            f"  steps             {p.steps} (= ceil(epochs / q))",
            f"  noise multiplier  sigma = {p.noise_multiplier:.6g}",
            f"  privacy           epsilon = {format_bound(p.epsilon)} at delta = {p.delta:g}",
        ]
    )
