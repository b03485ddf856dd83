"""Accountants and the budget planner, cross-checked against Google's dp_accounting."""

from __future__ import annotations

import warnings

import dp_accounting
import numpy as np
import pytest
from dp_accounting.pld import PLDAccountant
from dp_accounting.rdp import RdpAccountant

from dpsynth.errors import DpsynthError
from dpsynth.privacy.accounting import epsilon_for, format_bound, noise_for_epsilon, warn_delta
from dpsynth.privacy.planner import format_plan, plan

# (sample rate, noise multiplier, steps, delta)
GRID = [
    (0.01, 1.0, 1000, 1e-5),
    (0.1, 1.2, 300, 1e-5),
    (0.256, 2.0, 150, 1e-6),
    (0.05, 0.8, 600, 1e-5),
    (1.0, 3.0, 1, 1e-5),
    (1.0, 1.0, 5, 1e-7),
]


def _event(q: float, sigma: float, steps: int) -> dp_accounting.DpEvent:
    step = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma))
    return dp_accounting.SelfComposedDpEvent(step, steps)


def _google(event: dp_accounting.DpEvent, delta: float) -> tuple[float, float]:
    """(tight PLD ε, RDP ε) of `event` by dp_accounting, the independent implementation."""
    return (
        PLDAccountant().compose(event).get_epsilon(delta),
        RdpAccountant().compose(event).get_epsilon(delta),
    )


@pytest.mark.parametrize(("q", "sigma", "steps", "delta"), GRID)
def test_epsilon_matches_dp_accounting(q, sigma, steps, delta):
    pld, google_rdp = _google(_event(q, sigma, steps), delta)
    prv = epsilon_for([(sigma, q, steps)], delta, "prv")
    rdp = epsilon_for([(sigma, q, steps)], delta, "rdp")
    # never under-reported, and not absurdly loose
    assert prv >= pld * (1 - 1e-3)
    assert prv <= pld * 1.05
    assert rdp >= pld * (1 - 1e-3)
    assert rdp <= pld * 1.25
    # same bound, different order grids and RDP -> (ε, δ) conversions
    assert rdp == pytest.approx(google_rdp, rel=0.1)


def test_heterogeneous_composition_is_composed_not_summed():
    history = [(1.0, 0.02, 200), (2.0, 1.0, 1), (0.9, 0.1, 30)]
    event = dp_accounting.ComposedDpEvent([_event(q, s, k) for s, q, k in history])
    pld, _ = _google(event, 1e-5)
    total = epsilon_for(history, 1e-5)
    assert pld * (1 - 1e-3) <= total <= pld * 1.05
    assert total < sum(epsilon_for([m], 1e-5) for m in history) * 0.9
    assert epsilon_for([], 1e-5) == 0.0


@pytest.mark.parametrize(
    ("target", "q", "steps", "accountant"),
    [(3.0, 0.1, 300, "prv"), (1.0, 1.0, 1, "prv"), (8.0, 0.05, 400, "rdp")],
)
def test_noise_for_epsilon_round_trips_below_target(target, q, steps, accountant):
    sigma = noise_for_epsilon(target, 1e-5, q, steps, accountant)
    spent = epsilon_for([(sigma, q, steps)], 1e-5, accountant)
    assert target * 0.99 <= spent <= target
    pld, _ = _google(_event(q, sigma, steps), 1e-5)
    assert pld <= target * (1 + 1e-3)


def test_prv_numerical_failure_falls_back_to_the_rdp_bound():
    with pytest.warns(UserWarning, match="RDP bound"):
        eps = epsilon_for([(0.02, 1.0, 1)], 1e-5, "prv")
    assert eps == epsilon_for([(0.02, 1.0, 1)], 1e-5, "rdp")
    assert eps > 1000  # σ = 0.02 at q = 1 is nearly no privacy at all


@pytest.mark.parametrize(
    ("history", "delta", "accountant", "match"),
    [
        ([(0.0, 0.1, 10)], 1e-5, "prv", "noise_multiplier"),
        ([(-1.0, 0.1, 10)], 1e-5, "prv", "noise_multiplier"),
        ([(1.0, 0.0, 10)], 1e-5, "prv", "sample_rate"),
        ([(1.0, 1.5, 10)], 1e-5, "prv", "sample_rate"),
        ([(1.0, 0.1, 0)], 1e-5, "prv", "steps"),
        ([(1.0, 0.1, 2.5)], 1e-5, "prv", "steps"),
        ([(1.0, 0.1)], 1e-5, "prv", "expected"),
        ([(1.0, 0.1, 10)], 0.0, "prv", "delta"),
        ([(1.0, 0.1, 10)], 1.0, "prv", "delta"),
        ([(1.0, 0.1, 10)], 1e-5, "gdp", "accountant"),
    ],
)
def test_epsilon_for_refuses_bad_parameters(history, delta, accountant, match):
    with pytest.raises(DpsynthError, match=match):
        epsilon_for(history, delta, accountant)


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((0.0, 1e-5, 0.1, 10), "epsilon"),
        ((float("inf"), 1e-5, 0.1, 10), "epsilon"),
        ((1.0, 2.0, 0.1, 10), "delta"),
        ((1.0, 1e-5, 0.0, 10), "sample_rate"),
        ((1.0, 1e-5, 0.1, 0), "steps"),
        ((0.001, 1e-5, 1.0, 1), "below what the prv accountant can certify"),
    ],
)
def test_noise_for_epsilon_refuses_bad_parameters(args, match):
    with pytest.raises(DpsynthError, match=match):
        noise_for_epsilon(*args)


def test_delta_warning_only_when_delta_not_below_one_over_n():
    with pytest.warns(UserWarning, match=r"1/N = 1/200"):
        warn_delta(0.01, 200)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warn_delta(1e-5, 200)


def test_plan_for_target_epsilon():
    p = plan(records=1000, batch_size=100, epochs=3, epsilon=2.0)
    assert p.sample_rate == pytest.approx(0.1)
    assert p.steps == 30
    assert 1.98 <= p.epsilon <= 2.0
    assert p.epsilon == epsilon_for([(p.noise_multiplier, 0.1, 30)], 1e-5)
    pld, _ = _google(_event(0.1, p.noise_multiplier, 30), 1e-5)
    assert pld <= 2.0
    assert set(p.to_json()) == {
        "epsilon",
        "delta",
        "noise_multiplier",
        "sample_rate",
        "steps",
        "accountant",
    }
    text = format_plan(p)
    assert "steps             30" in text and f"{p.noise_multiplier:.6g}" in text


def test_plan_for_noise_multiplier_and_step_rounding():
    p = plan(records=10, batch_size=1, epochs=0.3, noise_multiplier=1.5, accountant="rdp")
    assert p.steps == 3  # exact arithmetic: 0.3 * 10 is 3 steps, not 4
    assert p.epsilon == epsilon_for([(1.5, 0.1, 3)], 1e-5, "rdp")
    assert plan(records=1000, batch_size=256, epochs=150, noise_multiplier=1.0).steps == 586


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"epsilon": 1.0, "noise_multiplier": 1.0}, "exactly one"),
        ({}, "exactly one"),
        ({"epsilon": 1.0, "batch_size": 200}, "batch_size"),
        ({"epsilon": 1.0, "batch_size": 0}, "batch_size"),
        ({"epsilon": 1.0, "epochs": 0}, "epochs"),
        ({"epsilon": -1.0}, "epsilon"),
        ({"noise_multiplier": 0.0}, "noise_multiplier"),
        ({"epsilon": 1.0, "accountant": "moments"}, "accountant"),
    ],
)
def test_plan_refuses_bad_parameters(kwargs, match):
    args = {"records": 100, "batch_size": 10, "epochs": 1} | kwargs
    with pytest.raises(DpsynthError, match=match):
        plan(**args)


def test_plan_warns_when_delta_too_large_for_cohort():
    with pytest.warns(UserWarning, match="delta"):
        plan(records=50, batch_size=10, epochs=1, noise_multiplier=1.0, delta=0.05)


def test_a_stated_bound_is_rounded_up_never_down():
    """Every printed ε (budget, report, PRIVACY.md) goes through `format_bound`: the figure
    read back is never below the accountant's, and at most one unit of its last digit above."""
    assert format_bound(8.34249) == "8.343"  # f"{8.34249:.4g}" states 8.342, below the bound
    assert format_bound(8.342) == "8.342"  # a figure already at four digits stays
    assert format_bound(9.99951, 3) == "10" and format_bound(2.0) == "2"
    assert format_bound(1234.56, 3) == "1.24e+03" and format_bound(float("inf")) == "∞"
    values = np.random.default_rng(0).uniform(-4, 6, 20_000)
    for value in 10.0**values:
        for digits in (2, 3, 4):
            shown = float(format_bound(value, digits))
            assert value <= shown <= value * (1 + 10.0 ** (1 - digits)), (value, digits)
    with pytest.raises(DpsynthError, match="NaN"):
        format_bound(float("nan"))
