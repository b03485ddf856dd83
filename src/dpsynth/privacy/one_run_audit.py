"""One-run empirical privacy audit of the DP-SGD engine (`dpsynth audit-privacy`).

Not to be confused with :mod:`dpsynth.evaluation.audit` (membership inference against a
trained model, BRIEF section 5). This audit tests the *implementation*: it re-runs a DP-SGD
recipe (σ, C, q, steps, δ, accountant) through the real patient-level engine
(`PatientDPSGD`) on simulated public phantoms with M canary patients added, each included
with probability ½ (Steinke, Nasr, Jagielski, NeurIPS 2023, "Privacy auditing with one (1)
training run"). It never reads private data, so its outputs are not private; they are not DP
outputs either, and the audit's model is never released.

Threat model: white-box, as the DP proof allows. The auditor sees every noisy update the
engine releases (the averaged noisy gradient, read by a step pre-hook on the wrapped
optimizer) and knows each canary's gradient direction.

Canaries: each canary patient holds TWO volumes (like ED and ES), each an input-space spike
on the canary's own coordinate of a linear probe, so each volume's gradient has norm 2C along
that coordinate. Clipped per patient (correct), a canary moves its coordinate by C when
sampled; clipped per volume (the reference study's flaw 2), by 2C. Canary coordinates are
disjoint from those the phantoms use (Dirac canaries), so canaries do not interfere.

Why a small model is a valid audit of the recipe: the (ε, δ) guarantee is a property of the
engine (Poisson sampling over patients, per-patient clipping to C, Gaussian noise σC, T steps)
for *any* per-patient gradients; the network only produces them. A gradient of norm C in a
direction nothing else touches is the worst case the proof covers, so the same engine must
hide it whatever the model. The real model's own risks to patient-level DP (BatchNorm,
running statistics, volumes mixed across patients) are rejected by `validate_model_for_dp`.

Score of a canary: the sum over steps of one step's log-likelihood ratio of the noisy update
along its direction (in units of C; a sampled canary adds 1), with the recipe's claimed σ and
q: the optimal per-step test. Two 95 % lower bounds on ε at the recipe's δ come from it:

- ``epsilon_lb`` (headline, Gaussian): Agrawal et al. 2026 ("Let's Ask Gauss") show that such
  canary-aligned sums over T steps are asymptotically Gaussian. We take a one-sided 95 %
  lower confidence bound μ_lb on the standardised shift (mean_in - mean_out) / sd_out and
  report the ε at δ of μ_lb-Gaussian DP. Included canaries' scores have a larger variance
  and a heavier right tail than excluded ones', so the equal-variance Gaussian pair
  understates how far they separate (conservative). For the demo's recipe a correct engine
  gives μ = 1.40, i.e. ε 6.5 of the accounted 8.0 (0.94 of 1.0 and 1.82 of 2.0 at σ
  calibrated to ε = 1, 2): a tight audit, still below the accounted ε.
- ``epsilon_lb_steinke`` (no distributional assumption): Steinke et al.'s bound from k top
  guesses "in" and k bottom guesses "out" (abstaining on the rest), Bonferroni-corrected over
  a fixed grid of k. It saturates with M (r guesses all right certify only about log(r/3)).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from scipy import optimize, special, stats

from dpsynth.config import load_config
from dpsynth.data.simulate import simulate_patient
from dpsynth.errors import DpsynthError
from dpsynth.io import atomic_write_json, atomic_write_text
from dpsynth.privacy.accounting import check_delta, epsilon_for, format_bound, noise_for_epsilon
from dpsynth.privacy.ledger import Ledger

AUDIT_DIR = "privacy_audit"  # default output folder inside the audited run (never released)
AUDIT_FILE = "one_run_audit.json"
LABEL_FILE = "AUDIT_ONLY.txt"
CONFIDENCE = 0.95
DEFAULT_CANARIES = 10_000
STEINKE_K_FRACTIONS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2)  # k / M, fixed before looking
PHANTOM_SHAPE = (13, 8, 8)  # the public phantoms' grid in the audit (only their count matters)
BROKEN_ENGINES = ("noise-quarter", "per-volume-clipping")
LABEL = (
    "AUDIT ONLY - NOT RELEASABLE. One-run privacy audit of the DP-SGD implementation "
    "(dpsynth audit-privacy): simulated public phantoms plus synthetic canaries, no private "
    "data. Nothing here is a DP output or a model to release; keep this folder out of releases.\n"
)


# ---------------------------------------------------------------------------------------------
# Bounds


def steinke_p_value(m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    """P[>= v of r guesses correct] for an (ε, δ)-DP mechanism with m canaries (Steinke et al.).

    β = P[Binomial(r, e^ε/(1+e^ε)) >= v]; the δ term adds 2mδ·max_i (P[Bin >= v-i] - β)/i.
    """
    if not 0 <= v <= r <= m:
        raise ValueError(f"need 0 <= v <= r <= m, got v={v}, r={r}, m={m}")
    p = special.expit(epsilon)
    beta = stats.binom.sf(v - 1, r, p)
    if delta == 0 or v == 0:
        return float(min(beta, 1.0))
    i = np.arange(1, v + 1)
    alpha = np.max((stats.binom.sf(v - i - 1, r, p) - beta) / i)
    return float(min(beta + 2 * m * delta * alpha, 1.0))


def steinke_epsilon_lb(m: int, r: int, v: int, delta: float, significance: float) -> float:
    """Largest ε whose (ε, δ)-DP claim `v` correct of `r` guesses rejects at `significance`."""

    def reject(eps: float) -> bool:
        return steinke_p_value(m, r, v, eps, delta) <= significance

    if r == 0 or not reject(0.0):
        return 0.0
    hi = 1.0
    while reject(hi):  # the p-value grows with ε: find where it stops rejecting
        hi *= 2
        if hi > 1e3:
            return math.inf
    return float(
        optimize.brentq(
            lambda e: steinke_p_value(m, r, v, e, delta) - significance, 0.0, hi, xtol=1e-6
        )
    )


def gdp_delta(epsilon: float, mu: float) -> float:
    """δ(ε) of μ-Gaussian DP (Dong, Roth, Su): Φ(-ε/μ + μ/2) - e^ε Φ(-ε/μ - μ/2)."""
    if mu <= 0:
        return 0.0
    a, b = -epsilon / mu + mu / 2, -epsilon / mu - mu / 2
    # e^ε Φ(b) in log space: e^ε overflows long before the product does
    return float(stats.norm.cdf(a) - np.exp(epsilon + stats.norm.logcdf(b)))


def gdp_epsilon(mu: float, delta: float) -> float:
    """Smallest ε with δ(ε) <= `delta` under μ-Gaussian DP (0 when μ <= 0, ∞ when μ is)."""
    if not math.isfinite(mu):
        return math.inf if mu > 0 else 0.0
    if mu <= 0 or gdp_delta(0.0, mu) <= delta:
        return 0.0
    hi = 1.0
    while gdp_delta(hi, mu) > delta:
        hi *= 2
    return float(optimize.brentq(lambda e: gdp_delta(e, mu) - delta, 0.0, hi, xtol=1e-8))


def gaussian_shift(
    inside: np.ndarray, outside: np.ndarray, confidence: float
) -> tuple[float, float]:
    """(μ̂, one-sided lower confidence bound) of (mean_in - mean_out) / sd_out.

    The standard error is the delta method's: the two means' variances plus the sd's own
    uncertainty (var(ŝ)/s² ≈ 1/(2 n_out)).
    """
    n_in, n_out = len(inside), len(outside)
    if n_in < 2 or n_out < 2:
        raise DpsynthError("audit: need at least 2 included and 2 excluded canaries")
    sd_out = float(np.std(outside, ddof=1))
    if sd_out == 0:
        return math.inf, math.inf  # no noise at all: nothing is hidden
    mu = (float(np.mean(inside)) - float(np.mean(outside))) / sd_out
    var_in = float(np.var(inside, ddof=1)) / sd_out**2
    se = math.sqrt(var_in / n_in + 1 / n_out + mu**2 / (2 * n_out))
    return mu, mu - float(stats.norm.ppf(confidence)) * se


def step_log_likelihood_ratio(x: np.ndarray, sigma: float, q: float) -> np.ndarray:
    """log [(1-q)·N(x; 0, σ²) + q·N(x; 1, σ²)] / N(x; 0, σ²): one step's optimal test.

    `x` is the noisy update along a canary's direction in units of C: a sampled canary adds
    1. The auditor uses the recipe's claimed σ and q, so a broken engine (less noise, larger
    sensitivity) separates these scores more, never less.
    """
    with np.errstate(divide="ignore"):  # q = 1: log(1 - q) = -inf, and logaddexp handles it
        return np.logaddexp(np.log1p(-q), (2 * x - 1) / (2 * sigma**2) + np.log(q))


def expected_shift(recipe: Recipe) -> float:
    """μ a correct engine gives: sqrt(T)·(E_in - E_out)/sd_out of one step's log-LR score.

    A numerical integral over one step (the T steps are i.i.d.); the audit reports it so a
    reader sees how close the measured μ̂ comes to what the recipe implies.
    """
    s, q = recipe.noise_multiplier, recipe.sample_rate
    x = np.linspace(-12 * s - 1, 12 * s + 2, 100_001)
    p_out = stats.norm.pdf(x, 0, s)
    p_in = (1 - q) * p_out + q * stats.norm.pdf(x, 1, s)
    score = step_log_likelihood_ratio(x, s, q)
    e_out, e_in = np.trapezoid(score * p_out, x), np.trapezoid(score * p_in, x)
    sd_out = math.sqrt(np.trapezoid((score - e_out) ** 2 * p_out, x))
    return float(math.sqrt(recipe.steps) * (e_in - e_out) / sd_out)


def steinke_from_scores(
    scores: np.ndarray, included: np.ndarray, delta: float, confidence: float
) -> dict:
    """Steinke et al.'s ε lower bound, best over the fixed k grid, Bonferroni over that grid."""
    m = len(scores)
    order = np.argsort(scores, kind="stable")
    significance = (1 - confidence) / len(STEINKE_K_FRACTIONS)
    best = {"epsilon_lb": 0.0, "k": 0, "guesses": 0, "correct": 0}
    for frac in STEINKE_K_FRACTIONS:
        k = max(1, int(frac * m))
        if 2 * k > m:
            continue
        correct = int(included[order[-k:]].sum() + (~included[order[:k]]).sum())
        eps = steinke_epsilon_lb(m, 2 * k, correct, delta, significance)
        if eps > best["epsilon_lb"]:
            best = {"epsilon_lb": eps, "k": k, "guesses": 2 * k, "correct": correct}
    return {**best, "significance_per_k": significance, "k_fractions": list(STEINKE_K_FRACTIONS)}


# ---------------------------------------------------------------------------------------------
# Recipe


@dataclass(frozen=True)
class Recipe:
    """The DP-SGD mechanism under audit; `epsilon` is its accounted ε alone, at `delta`."""

    noise_multiplier: float
    max_grad_norm: float
    sample_rate: float
    steps: int
    records: int
    delta: float
    accountant: str
    epsilon: float
    source: str

    @classmethod
    def of(
        cls,
        noise_multiplier: float,
        max_grad_norm: float,
        sample_rate: float,
        steps: int,
        records: int,
        delta: float,
        accountant: str,
        source: str,
    ) -> Recipe:
        """The recipe with its accounted ε (this mechanism alone, at `delta`)."""
        eps = epsilon_for([(noise_multiplier, sample_rate, steps)], delta, accountant)
        return cls(
            float(noise_multiplier),
            float(max_grad_norm),
            float(sample_rate),
            int(steps),
            int(records),
            float(delta),
            accountant,
            eps,
            source,
        )

    def to_json(self) -> dict:
        return asdict(self)


def recipe_from_run(run: str | Path) -> Recipe:
    """The last DP-SGD stage of `run`'s ledger, with C from the run's config.yaml."""

    run = Path(run)
    if not (run / "ledger.json").exists():
        raise DpsynthError(f"{run}: no ledger.json (not a DP training run)")
    stages = [e for e in Ledger.load(run) if e.mechanism == "dp-sgd" and not e.non_private]
    if not stages:
        raise DpsynthError(f"{run / 'ledger.json'}: no DP-SGD stage to audit")
    e = stages[-1]
    if not (run / "config.yaml").exists():
        raise DpsynthError(f"{run}: no config.yaml (the clipping norm C is read from it)")
    clip = load_config(path=run / "config.yaml").privacy.max_grad_norm
    return Recipe.of(
        e.noise_multiplier,
        clip,
        e.sample_rate,
        e.steps or e.planned_steps,
        e.records,
        e.delta,
        e.accountant,
        f"{run} ({e.stage})",
    )


def recalibrate(recipe: Recipe, epsilon: float) -> Recipe:
    """The same q, steps, C and δ with σ calibrated to `epsilon` (tests with power at small ε)."""
    sigma = noise_for_epsilon(
        epsilon, recipe.delta, recipe.sample_rate, recipe.steps, recipe.accountant
    )
    eps = epsilon_for([(sigma, recipe.sample_rate, recipe.steps)], recipe.delta, recipe.accountant)
    return replace(
        recipe,
        noise_multiplier=sigma,
        epsilon=eps,
        source=f"{recipe.source}, σ recalibrated to ε = {epsilon:g}",
    )


# ---------------------------------------------------------------------------------------------
# The audit run


def _public_phantoms(n: int, seed: int) -> np.ndarray:
    """(n, 2, D) ED/ES phantoms of the simulator's public (acdc-like) cohort, standardised."""
    # start-up time: the report reads this module's file names; torch loads for audits only
    import torch
    import torch.nn.functional as F

    out = np.empty((n, 2, int(np.prod(PHANTOM_SHAPE))), np.float32)
    for i in range(n):
        p = simulate_patient(
            np.random.default_rng([seed, i]),
            cohort="acdc",
            shape=PHANTOM_SHAPE,
            spacing=(10.0, 11.0, 11.0),
        )
        for j, phase in enumerate(("ED", "ES")):
            v = torch.from_numpy(p.images[phase].astype(np.float32))[None, None]
            out[i, j] = F.interpolate(v, size=PHANTOM_SHAPE, mode="trilinear").flatten().numpy()
    return (out - out.mean()) / (out.std() + 1e-6)


def _probe_model(canaries: int, dim: int):
    """The audited network: a linear probe over canary coordinates and phantoms (the audit
    scores its canary weights) plus a small 3D branch on the phantoms (Conv3d, GroupNorm,
    SiLU, LayerNorm), so the engine's per-patient gradients come through the tap rules the
    denoiser's layers use (`grad_taps`), not the Linear rule alone.

    The branch sees the phantoms pooled in-plane to 13 x 2 x 2 (it only has to exercise the
    rules: the audit's cost stays the linear probe's), and its output is multiplied by that
    input, which is 0 in a canary: a canary's gradient on the branch is exactly 0, so its
    whole gradient stays 2C per volume along its coordinate and clipping per patient moves
    that coordinate by exactly C. The price: a branch rule that mixed patients would leave
    ε_lb unchanged (nothing of a canary flows there), and the conditioning modules' rules
    (`AttributeEncoder`, `SlicePosition`) are not in the probe at all; the engine's own
    check against autograd guards those (`PatientDPSGD._patient_grads`, tests/test_dpsgd.py).
    """
    import torch.nn.functional as F  # start-up time, as in _public_phantoms
    from torch import nn

    class Probe(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = nn.Linear(dim, 1, bias=False)
            nn.init.zeros_(self.linear.weight)
            self.conv = nn.Conv3d(1, 4, 3, padding=1)
            self.group_norm = nn.GroupNorm(2, 4)
            self.layer_norm = nn.LayerNorm((2, 2))

        def forward(self, x):  # (volumes, dim) -> (volumes, 1)
            phantom = x[:, canaries:].reshape(-1, 1, *PHANTOM_SHAPE)
            small = F.adaptive_avg_pool3d(phantom, (PHANTOM_SHAPE[0], 2, 2))
            h = self.layer_norm(F.silu(self.group_norm(self.conv(small))))
            return self.linear(x) + (h * small).mean((1, 2, 3, 4))[:, None]

    return Probe()


def _engine_class(broken: str | None):
    from dpsynth.privacy.dpsgd import PatientDPSGD  # start-up time: torch, as above

    if broken != "per-volume-clipping":
        return PatientDPSGD

    class PerVolumeClippingDPSGD(PatientDPSGD):
        """DELIBERATELY BROKEN (audit tests only): each volume is its own DP record, so a
        patient's two volumes are clipped separately (the reference study's flaw 2)."""

        def _set_grad_samples(self, chunk, loss_fn):
            return super()._set_grad_samples(
                {k: v.reshape(-1, 1, *v.shape[2:]) for k, v in chunk.items()}, loss_fn
            )

    return PerVolumeClippingDPSGD


def run_canary_audit(
    recipe: Recipe,
    canaries: int = DEFAULT_CANARIES,
    seed: int = 0,
    broken: str | None = None,
    public_patients: int | None = None,
    confidence: float = CONFIDENCE,
    progress: Callable[[str], None] | None = None,
) -> dict:
    """Run the recipe once with `canaries` two-volume canary patients; return the audit result.

    `broken` ("noise-quarter": the engine draws σ/4 while the ledger accounts σ;
    "per-volume-clipping") builds a deliberately wrong engine to show the audit catches it.
    `public_patients` (default: the recipe's record count) simulated phantoms are the data.
    """
    # start-up time: torch loads for audits only (see _public_phantoms)
    import torch

    if broken is not None and broken not in BROKEN_ENGINES:
        raise DpsynthError(
            f"broken: unknown engine {broken!r} (choose {', '.join(BROKEN_ENGINES)})"
        )
    if not (isinstance(canaries, int) and canaries >= 20):
        raise DpsynthError(f"canaries: need an integer >= 20, got {canaries!r}")
    check_delta(recipe.delta)
    t0 = time.perf_counter()
    say = progress or (lambda _: None)
    rng = np.random.default_rng(seed)
    n_public = recipe.records if public_patients is None else int(public_patients)
    say(f"simulating {n_public} public phantoms")
    public = _public_phantoms(n_public, seed)
    d_public = public.shape[-1]

    included = rng.random(canaries) < 0.5  # each canary joins the training set w.p. 1/2
    members = np.flatnonzero(included)
    m_in = len(members)
    dim = (
        canaries + d_public
    )  # canary coordinates first, phantoms after (disjoint: no interference)
    n = n_public + m_in  # records 0..n_public-1 are phantoms, then the included canaries
    public_t = torch.from_numpy(public)
    # Public patients get random ±1 labels, so their gradients average to ~0 on every coordinate.
    labels = torch.from_numpy(rng.choice([-1.0, 1.0], size=n_public)).float()
    coordinate = torch.from_numpy(members)
    spike = 2.0 * recipe.max_grad_norm  # each volume's gradient norm: above C, clipped to C

    def records(idx: np.ndarray) -> dict:
        """The step's patients as (patients, 2 volumes, dim) inputs, built only when drawn."""
        idx = torch.from_numpy(idx)
        xs, ys = torch.zeros(len(idx), 2, dim), torch.ones(len(idx), 2)
        pub = idx < n_public
        xs[pub, :, canaries:] = public_t[idx[pub]]
        ys[pub] = labels[idx[pub]][:, None]
        can = torch.nonzero(~pub)[:, 0]
        xs[can, :, coordinate[idx[can] - n_public]] = spike
        return {"x": xs, "y": ys}

    torch.manual_seed(seed)
    model = _probe_model(canaries, dim)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # the released updates are the data
    scale = recipe.sample_rate * n / recipe.max_grad_norm  # mean grad -> units of C
    scores = np.zeros(canaries)

    def observe(opt, args, kwargs) -> None:  # white-box: every noisy update the engine releases
        x = -model.linear.weight.grad[0, :canaries].double().numpy() * scale
        scores[:] += step_log_likelihood_ratio(x, recipe.noise_multiplier, recipe.sample_rate)

    optimizer.register_step_pre_hook(observe)
    sigma = recipe.noise_multiplier / (4 if broken == "noise-quarter" else 1)
    engine = _engine_class(broken)(
        model,
        optimizer,
        noise_multiplier=sigma,
        max_grad_norm=recipe.max_grad_norm,
        sample_rate=recipe.sample_rate,
        num_records=n,
        physical_batch_size=4096,
        generator=torch.Generator().manual_seed(int(rng.integers(2**63))),
        sampling_seed=int(rng.integers(2**63)),
    )

    def loss_fn(model_fn, record):  # ONE patient: the sum of its two volumes' losses
        return -(record["y"] * model_fn(record["x"])[:, 0]).sum()

    step, epoch = 0, 0
    while step < recipe.steps:
        for idx in engine.logical_batches(epoch):
            if step == recipe.steps:
                break
            engine.step(records(idx), loss_fn)
            step += 1
        epoch += 1
        say(f"step {step}/{recipe.steps}")

    s = scores
    mu, mu_lb = gaussian_shift(s[included], s[~included], confidence)
    eps_lb = gdp_epsilon(mu_lb, recipe.delta)
    steinke = steinke_from_scores(s, included, recipe.delta, confidence)
    return {
        "kind": "one-run privacy audit of the DP-SGD implementation (audit only)",
        "label": LABEL.strip(),
        "releasable": False,
        "accounted_epsilon": recipe.epsilon,
        "delta": recipe.delta,
        "epsilon_lb": eps_lb,
        "epsilon_lb_steinke": steinke["epsilon_lb"],
        "ratio": eps_lb / recipe.epsilon,
        "exceeds_accounted": bool(
            eps_lb > recipe.epsilon or steinke["epsilon_lb"] > recipe.epsilon
        ),
        "confidence": confidence,
        "gaussian": {
            "mu_hat": mu,
            "mu_lb": mu_lb,
            "mu_expected_correct_engine": expected_shift(recipe),
            "epsilon_expected_correct_engine": gdp_epsilon(expected_shift(recipe), recipe.delta),
        },
        "steinke": steinke,
        "canaries": canaries,
        "canaries_included": m_in,
        "public_patients": n_public,
        "recipe": recipe.to_json(),
        "engine": broken or "PatientDPSGD (as shipped)",
        "per_patient_gradients": engine.per_patient_path,
        "broken": broken,
        "threat_model": "white-box: every noisy update; two-volume Dirac canary patients, "
        "gradient norm 2C per volume",
        "model": f"linear probe on {dim} features (canary coordinates + {PHANTOM_SHAPE} "
        "phantoms) plus a Conv3d-GroupNorm-LayerNorm branch on the pooled phantoms",
        "data": "simulated public phantoms (acdc-like) and synthetic canaries; no private data",
        "seed": seed,
        "wall_s": round(time.perf_counter() - t0, 1),
    }


def audit_privacy(
    out: str | Path,
    recipe: Recipe,
    *,
    canaries: int = DEFAULT_CANARIES,
    seed: int = 0,
    broken: str | None = None,
    public_patients: int | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run the audit and write `out`/one_run_audit.json plus its AUDIT_ONLY label."""

    result = run_canary_audit(
        recipe,
        canaries=canaries,
        seed=seed,
        broken=broken,
        public_patients=public_patients,
        progress=progress,
    )
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / LABEL_FILE, LABEL)
    atomic_write_json(out / AUDIT_FILE, result)
    return result


def format_result(r: dict) -> str:
    """Human-readable summary for the CLI."""
    rec = r["recipe"]
    lines = [
        f"one-run privacy audit ({r['engine']}; {r['canaries']} canaries, "
        f"{r['canaries_included']} included; {r['wall_s']} s)",
        f"  recipe      σ {rec['noise_multiplier']:.4g}, C {rec['max_grad_norm']:g}, "
        f"q {rec['sample_rate']:.4g}, {rec['steps']} steps, δ {rec['delta']:g}",
        f"  accounted   ε = {format_bound(r['accounted_epsilon'])}",
        f"  ε_lb (95%)  {r['epsilon_lb']:.3f} Gaussian (ratio {r['ratio']:.2f}); "
        f"{r['epsilon_lb_steinke']:.3f} Steinke et al.",
    ]
    if r["exceeds_accounted"]:
        lines.append(
            "  VIOLATION: the lower bound exceeds the accounted ε: the engine leaks "
            "more than its ledger says"
        )
    return "\n".join(lines)
