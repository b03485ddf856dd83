"""Privacy accounting: (ε, δ) of a history of Poisson-subsampled Gaussian mechanisms.

Thin wrappers around Opacus' accountants. "prv" (default) is Opacus' PRV accountant
(Gopi et al. 2021), which we always read as its *upper* bound: Opacus returns the ε found
at δ − δ_error plus ``eps_error`` (here :data:`PRV_EPS_ERROR`, absolute), so the reported
ε is never below the true one. "rdp" is the looser Rényi-DP bound.

A history is a list of :class:`Mechanism` entries ``(noise_multiplier, sample_rate, steps)``
(Opacus' own history format). Heterogeneous entries are composed by the accountant, never
by summing their ε. A one-shot Gaussian-mechanism statistic is ``(σ, 1.0, 1)``.
"""

from __future__ import annotations

import contextlib
import math
import numbers
import warnings
from collections.abc import Iterable, Iterator
from decimal import ROUND_CEILING, Decimal
from typing import NamedTuple

import numpy as np
from opacus.accountants import IAccountant, PRVAccountant, RDPAccountant
from opacus.accountants.utils import get_noise_multiplier
from scipy.integrate import IntegrationWarning

from dpsynth.config import DEFAULT_ACCOUNTANT
from dpsynth.errors import DpsynthError

ACCOUNTANTS = ("prv", "rdp")
# Absolute error of the PRV upper bound; the reported ε is at most this much above the
# PRV estimate. Smaller values refine the discretisation mesh (memory ~ 1 / eps_error).
PRV_EPS_ERROR = 0.01


class Mechanism(NamedTuple):
    """`steps` compositions of a Gaussian mechanism on a Poisson sample at `sample_rate`."""

    noise_multiplier: float
    sample_rate: float
    steps: int


def check_accountant(name: str) -> str:
    if name not in ACCOUNTANTS:
        raise DpsynthError(f"accountant: unknown accountant {name!r} (choose one of prv, rdp)")
    return name


def make_accountant(name: str = DEFAULT_ACCOUNTANT) -> IAccountant:
    """A fresh Opacus accountant: "prv" (tight, default) or "rdp"."""
    return PRVAccountant() if check_accountant(name) == "prv" else RDPAccountant()


def _is_real(x: object) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _is_integer(x: object) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def check_epsilon(epsilon: float, key: str = "epsilon") -> float:
    if not (_is_real(epsilon) and 0 < epsilon < math.inf):
        raise DpsynthError(f"{key}: must be a finite number > 0, got {epsilon!r}")
    return float(epsilon)


def check_delta(delta: float, key: str = "delta") -> float:
    if not (_is_real(delta) and 0 < delta < 1):
        raise DpsynthError(f"{key}: must be in (0, 1), got {delta!r}")
    return float(delta)


def check_mechanism(mechanism: Iterable, key: str = "history") -> Mechanism:
    """Validate one ``(noise_multiplier, sample_rate, steps)`` entry."""
    try:
        sigma, q, steps = mechanism
    except (TypeError, ValueError):
        raise DpsynthError(
            f"{key}: expected (noise_multiplier, sample_rate, steps), got {mechanism!r}"
        ) from None
    if not (_is_real(sigma) and 0 < sigma < math.inf):
        raise DpsynthError(f"{key}: noise_multiplier must be a finite number > 0, got {sigma!r}")
    if not (_is_real(q) and 0 < q <= 1):
        raise DpsynthError(f"{key}: sample_rate must be in (0, 1], got {q!r}")
    if not (_is_integer(steps) and steps >= 1):
        raise DpsynthError(f"{key}: steps must be an integer >= 1, got {steps!r}")
    return Mechanism(float(sigma), float(q), int(steps))


def warn_delta(delta: float, n_records: int) -> None:
    """Warn when δ is not below 1/N: δ must be far below the chance of exposing one record."""
    if n_records >= 1 and delta >= 1.0 / n_records:
        warnings.warn(
            f"delta={delta:g} is not below 1/N = 1/{n_records}: a mechanism could expose one "
            f"patient outright with that probability; choose delta well below {1 / n_records:.1e}",
            UserWarning,
            stacklevel=2,
        )


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    # Opacus' PRV evaluates log(1 - q) = log(0) at q = 1 and exp overflows in masked-out
    # branches (harmless, np.where discards them); RDP notes when an extreme order is optimal
    # (the bound stays valid, only looser). Real failures still raise.
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Optimal order is the")
        warnings.filterwarnings("ignore", category=IntegrationWarning)
        yield


def _epsilon(history: list[Mechanism], delta: float, accountant: str) -> float:
    acc = make_accountant(accountant)
    acc.history = [tuple(m) for m in history]
    with _quiet():
        if accountant == "prv":
            eps = acc.get_epsilon(delta, eps_error=PRV_EPS_ERROR)  # Opacus' upper bound
        else:
            eps = acc.get_epsilon(delta)
    eps = float(eps)
    if math.isnan(eps):
        raise RuntimeError("accountant returned NaN")
    return eps


def epsilon_for(
    history: Iterable[Iterable], delta: float, accountant: str = DEFAULT_ACCOUNTANT
) -> float:
    """ε at `delta` of the composition of all mechanisms in `history` (0 for an empty one).

    If the PRV discretisation fails numerically (extreme regimes such as σ ≪ 0.1 at q = 1),
    the valid but looser RDP bound is returned with a warning, never an under-estimate.
    """
    check_accountant(accountant)
    delta = check_delta(delta)
    history = [check_mechanism(m) for m in history]
    if not history:
        return 0.0
    try:
        return _epsilon(history, delta, accountant)
    except (RuntimeError, ValueError, FloatingPointError) as e:
        if accountant != "prv":
            raise
        warnings.warn(f"PRV accountant failed ({e}); reporting the looser RDP bound", stacklevel=2)
        return _epsilon(history, delta, "rdp")


def format_bound(value: float, digits: int = 4) -> str:
    """An upper bound (ε, e^ε) as text with `digits` significant digits, rounded up: the
    figure read back is never below `value` (``f"{x:.4g}"`` rounds 8.34249 down to 8.342)."""
    if math.isnan(value):
        raise DpsynthError("format_bound: NaN is not a bound")
    if math.isinf(value) or value == 0:
        return "∞" if value > 0 else ("0" if value == 0 else "-∞")
    # The shortest decimal that reads back as `value` (8.342, not 8.34200000000000053):
    # float() is monotone, so its ceiling reads back at or above `value`.
    shortest = Decimal(repr(float(value)))
    step = Decimal(1).scaleb(shortest.adjusted() - digits + 1)
    return f"{float(shortest.quantize(step, rounding=ROUND_CEILING)):.{digits}g}"


def noise_for_epsilon(
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    accountant: str = DEFAULT_ACCOUNTANT,
) -> float:
    """Smallest noise multiplier (to 0.1 % of ε) whose `steps` steps spend at most `target_epsilon`.

    Binary search by Opacus' ``get_noise_multiplier``; the result is then re-checked with
    :func:`epsilon_for` and σ raised until ε <= target, so the budget is never over-spent.
    """
    target_epsilon = check_epsilon(target_epsilon)
    delta = check_delta(delta)
    _, q, steps = check_mechanism((1.0, sample_rate, steps))
    check_accountant(accountant)
    tolerance = 1e-3 * target_epsilon

    def search(name: str) -> float:
        kwargs = {"eps_error": PRV_EPS_ERROR} if name == "prv" else {}
        with _quiet():
            return get_noise_multiplier(
                target_epsilon=target_epsilon,
                target_delta=delta,
                sample_rate=q,
                steps=steps,
                accountant=name,
                epsilon_tolerance=tolerance,
                **kwargs,
            )

    # PRV can fail numerically in extreme regimes; RDP's σ is then larger, hence still safe
    candidates = [accountant, "rdp"] if accountant == "prv" else [accountant]
    for name in candidates:
        try:
            sigma = search(name)
            break
        except (ValueError, RuntimeError) as e:
            if "budget is too low" in str(e):
                raise DpsynthError(
                    f"epsilon: {target_epsilon:g} at delta={delta:g} is below what the {name} "
                    f"accountant can certify for {steps} steps at sample rate {q:g}"
                ) from None
            if name == candidates[-1]:
                raise
    for _ in range(200):
        if epsilon_for([(sigma, q, steps)], delta, accountant) <= target_epsilon:
            return float(sigma)
        sigma *= 1.01
    raise RuntimeError(f"could not calibrate noise for epsilon={target_epsilon:g}")
