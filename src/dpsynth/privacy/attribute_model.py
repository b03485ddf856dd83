"""A DP generative model of the private attribute table, for releasable conditioning.

Model: a Gaussian copula. Each of the twelve modelled variables (:data:`VARIABLES`: EDV
and EF of both ventricles, wall thicknesses, AGE, BMI, ANGLE, DEPTH at ED and at ES, SEX)
has a histogram marginal over FIXED bins of its clinical range (:mod:`dpsynth.attributes`,
public; ANGLE over :data:`MODEL_RANGES`; one bin per integer for SEX and DEPTH) and a missingness rate; a latent Gaussian with
correlation matrix R ties them together. Sampling draws the latent Gaussian, maps each
coordinate through its marginal's inverse CDF (uniform within a bin), blanks values at
the missingness rates (missing completely at random), and derives the rest
deterministically: ESV = EDV (1 - EF / 100) (EF lies in 5-85 %, so ESV < EDV), then EF =
ejection_fraction(EDV, ESV) exactly (NaN where EDV is missing, as in real tables), and
each patient gives an ED row (ESED 1) and an ES row (ESED 0) that differ only in DEPTH.

Why this design: a first version released the means and second moments of the variables
scaled to their clinical ranges. Real cohorts occupy a small part of those ranges (LVEDV
std 35 mL in 40-400 mL), so at n = 350 and ε = 2 the noise on the 55 second moments was
larger than the variances themselves and the marginals came out 2-4x too wide, which put
the demo's requested volumes outside what the image model had learned. Histograms need no
scale, and sign agreements (below) estimate correlations at full signal whatever the
range.

Privacy. One record = one patient (rows of a patient are averaged first). Two Gaussian
releases, the second chosen after the first (adaptive composition):
1. the one-hot bin-or-missing indicator of every variable (L2 norm √V per patient);
2. for every pair of variables, the product of their signs s ∈ {-1, +1} about a bin edge
   chosen from release 1 near the median (0 when missing), and whether both are present
   (the count that normalises the products): L2 norm ≤ √(V(V-1)).
Each release is scaled so its per-patient norm is at most √share (:data:`SHARES` sums to
1) and gets N(0, σ²) noise per coordinate. Gaussian mechanisms compose exactly, even
adaptively (μ-GDP: μ² adds), so the pair is one Gaussian mechanism of sensitivity 1 and
noise σ: one ledger entry ``(σ, 1.0, 1)`` whose ε is the requested one. Everything after
is post-processing: bins below :data:`KEEP_BIN_SIGMAS` noise stds are dropped (so the
noise does not smear mass over empty bins), and each sign agreement is inverted to the
latent correlation of a bivariate normal with the marginals' thresholds (tetrachoric
correlation), the matrix projected to a positive definite correlation matrix.
"""

from __future__ import annotations

import math
import numbers
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import optimize, stats

from dpsynth.attributes import (
    ATTRIBUTES,
    CLINICAL_RANGES,
    INDEX,
    N_ATTRIBUTES,
    ejection_fraction,
    pairwise_correlation,
)
from dpsynth.config import DEFAULT_DELTA
from dpsynth.errors import DpsynthError
from dpsynth.io import atomic_write_json, read_json
from dpsynth.privacy.accounting import (
    DEFAULT_ACCOUNTANT,
    check_delta,
    warn_delta,
)
from dpsynth.privacy.ledger import Ledger, LedgerEntry
from dpsynth.privacy.statistics import gaussian_noise_multiplier, group_mean

VARIABLES = (
    "LVEDV",
    "LVEF",
    "RVEDV",
    "RVEF",
    "MYOEDTHICK",
    "MYOESTHICK",
    "AGE",
    "BMI",
    "ANGLE",
    "DEPTH_ED",
    "DEPTH_ES",
    "SEX",
)
# DEPTH (slices the heart spans) differs by phase (the heart shortens at ES, about 1.5
# slices on the demo cohort): one variable per phase -> (column, ESED code of its rows).
PER_PHASE = {"DEPTH_ED": ("DEPTH", 1.0), "DEPTH_ES": ("DEPTH", 0.0)}
INTEGER = ("DEPTH_ED", "DEPTH_ES", "SEX")  # one bin per integer value; sampled as integers
BINS = 16  # per continuous variable, over its clinical range
# Fixed (data-independent) split of the noise budget between the two releases.
SHARES = {"histograms": 0.5, "signs": 0.5}
KEEP_BIN_SIGMAS = 2.5
CORRELATION_FLOOR = 1e-3  # smallest eigenvalue kept when projecting R to positive definite
FORMAT_VERSION = 3  # 3: signed ANGLE binned over MODEL_RANGES (2: ANGLE in [0, 360))
ATTRIBUTE_MODEL_FILE = "attribute_model.json"  # in the run folder it conditions
STAGE = "attribute-model"  # its ledger entries' stage

_V = len(VARIABLES)
_PAIRS = np.triu_indices(_V, k=1)


def column(name: str) -> str:
    """The attribute a modelled variable fills (DEPTH_ED and DEPTH_ES: DEPTH)."""
    return PER_PHASE.get(name, (name, None))[0]


# Bin ranges narrower than the clinical (normalisation) range, where that range is the whole
# domain: ANGLE is signed about the canonical orientation and real hearts lie within about
# +-45 degrees, so 16 bins over +-90 (11.25 degrees) resolve it; values beyond fall in the
# end bins.
MODEL_RANGES = {"ANGLE": (-90.0, 90.0)}


def _edges(name: str) -> np.ndarray:
    lo, hi = MODEL_RANGES.get(column(name), CLINICAL_RANGES[column(name)])
    if name in INTEGER:
        return np.arange(lo - 0.5, hi + 1.0)
    return np.linspace(lo, hi, BINS + 1)


EDGES = tuple(_edges(a) for a in VARIABLES)


@dataclass(frozen=True)
class Marginal:
    """One variable: bin `probs` over its fixed edges and the rate at which it is missing."""

    probs: np.ndarray
    missing: float

    def quantile(self, u: np.ndarray, edges: np.ndarray, integer: bool = False) -> np.ndarray:
        """Inverse CDF, uniform within a bin (bins of zero mass are never drawn); for an
        integer variable (one bin per value) the bin's centre, its value."""
        cum = np.cumsum(self.probs)
        last = int(np.flatnonzero(self.probs > 0)[-1])
        b = np.minimum(np.searchsorted(cum, u * cum[-1], side="right"), last)
        if integer:
            return (edges[b] + edges[b + 1]) / 2.0
        below = cum[b] - self.probs[b]
        frac = np.clip((u * cum[-1] - below) / self.probs[b], 0.0, 1.0)
        return edges[b] + frac * (edges[b + 1] - edges[b])


@dataclass(frozen=True)
class AttributeModel:
    """A fitted DP attribute model; see the module docstring for the design."""

    marginals: tuple[Marginal, ...]
    correlation: np.ndarray
    noise_multiplier: float
    delta: float
    epsilon: float | None = None

    def sample(self, n_patients: int, rng: np.random.Generator) -> np.ndarray:
        """(2 n, 14) raw attributes: rows 2i (ED, ESED 1) and 2i+1 (ES, ESED 0) of patient i."""
        if isinstance(n_patients, bool) or not isinstance(n_patients, numbers.Integral):
            raise DpsynthError(f"n_patients: must be an integer >= 0, got {n_patients!r}")
        if n_patients < 0:
            raise DpsynthError(f"n_patients: must be an integer >= 0, got {n_patients}")
        z = rng.standard_normal((n_patients, _V)) @ np.linalg.cholesky(self.correlation).T
        u = stats.norm.cdf(z)
        rows = np.full((n_patients, N_ATTRIBUTES), np.nan)
        per_phase = {}
        for j, (name, m, edges) in enumerate(zip(VARIABLES, self.marginals, EDGES, strict=True)):
            x = m.quantile(u[:, j], edges, integer=name in INTEGER)
            x = np.where(rng.random(n_patients) < m.missing, np.nan, x)
            if name in PER_PHASE:
                per_phase[name] = x
            else:
                rows[:, INDEX[name]] = x
        for side in ("LV", "RV"):
            edv, ef = rows[:, INDEX[f"{side}EDV"]], rows[:, INDEX[f"{side}EF"]]
            esv = edv * (1.0 - ef / 100.0)  # EF in its clinical range [5, 85] %: ESV < EDV
            rows[:, INDEX[f"{side}ESV"]] = esv
            rows[:, INDEX[f"{side}EF"]] = ejection_fraction(edv, esv)  # NaN if EDV missing
        out = np.repeat(rows, 2, axis=0)
        out[:, INDEX["ESED"]] = np.tile([1.0, 0.0], n_patients)
        for name, (col, code) in PER_PHASE.items():
            out[0 if code == 1.0 else 1 :: 2, INDEX[col]] = per_phase[name]
        return out

    def to_json(self) -> dict:
        return {
            "format_version": FORMAT_VERSION,
            "variables": list(VARIABLES),
            "privacy": {
                "epsilon": self.epsilon,
                "delta": self.delta,
                "noise_multiplier": self.noise_multiplier,
            },
            "marginals": {
                name: {"bin_edges": edges.tolist(), "probs": m.probs.tolist(), "missing": m.missing}
                for name, m, edges in zip(VARIABLES, self.marginals, EDGES, strict=True)
            },
            "correlation": self.correlation.tolist(),
        }

    @classmethod
    def from_json(cls, obj: dict, source: str = "attribute model") -> AttributeModel:
        try:
            if obj["format_version"] != FORMAT_VERSION or obj["variables"] != list(VARIABLES):
                raise DpsynthError(
                    f"{source}: unsupported format_version or variables (refit it with "
                    "`dpsynth fit-attributes`)"
                )
            marginals = tuple(
                Marginal(
                    np.asarray(obj["marginals"][a]["probs"], dtype=np.float64),
                    float(obj["marginals"][a]["missing"]),
                )
                for a in VARIABLES
            )
            stored_edges = [
                np.asarray(obj["marginals"][a]["bin_edges"], dtype=np.float64) for a in VARIABLES
            ]
            privacy = obj["privacy"]
            model = cls(
                marginals,
                np.asarray(obj["correlation"], dtype=np.float64),
                float(privacy["noise_multiplier"]),
                float(privacy["delta"]),
                None if privacy["epsilon"] is None else float(privacy["epsilon"]),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise DpsynthError(
                f"{source}: malformed attribute model ({type(e).__name__}: {e})"
            ) from None
        for name, m, edges, stored in zip(
            VARIABLES, model.marginals, EDGES, stored_edges, strict=True
        ):
            ok = (
                stored.shape == edges.shape
                and np.allclose(stored, edges)
                and m.probs.shape == (len(edges) - 1,)
                and np.all(np.isfinite(m.probs) & (m.probs >= 0))
                and abs(m.probs.sum() - 1.0) < 1e-6
                and 0.0 <= m.missing <= 1.0
            )
            if not ok:
                raise DpsynthError(
                    f"{source}: marginal {name}: invalid bin edges, probs or missing rate"
                )
        r = model.correlation
        ok = (
            r.shape == (_V, _V)
            and np.all(np.isfinite(r))
            and np.allclose(r, r.T)
            and np.allclose(np.diag(r), 1.0)
        )
        try:
            ok = ok and np.linalg.cholesky(r) is not None  # what sample() needs
        except np.linalg.LinAlgError:
            ok = False
        if not ok:
            raise DpsynthError(f"{source}: correlation is not a positive definite correlation")
        privacy_ok = (
            math.isfinite(model.noise_multiplier)
            and model.noise_multiplier > 0
            and 0 < model.delta < 1
            and (model.epsilon is None or (math.isfinite(model.epsilon) and model.epsilon > 0))
        )
        if not privacy_ok:
            raise DpsynthError(f"{source}: privacy: invalid noise_multiplier, delta or epsilon")
        return model

    def save(self, path: str | Path, *, ledger_entry: str) -> None:
        """Write the model; `ledger_entry` names the fit's entry in its run's ledger, which
        `require_attribute_fit` then requires ("": none, the weaker σ and δ match)."""
        atomic_write_json(
            path, self.to_json() | ({"ledger_entry": ledger_entry} if ledger_entry else {})
        )

    @classmethod
    def load(cls, path: str | Path) -> AttributeModel:
        return cls.from_json(read_json(path), source=str(path))


def patient_records(table: np.ndarray, patients: np.ndarray | None) -> np.ndarray:
    """(P, V) one record per patient in VARIABLES order.

    A patient's rows are averaged; a per-phase variable averages the
    rows of its phase (rows of unknown phase count for both) and is missing without one."""
    table = np.asarray(table, dtype=np.float64)
    if table.ndim != 2 or table.shape[1] != N_ATTRIBUTES:
        raise DpsynthError(f"table: expected shape (rows, {N_ATTRIBUTES}), got {table.shape}")
    sex = table[:, INDEX["SEX"]]
    if not np.all(np.isnan(sex) | (sex == 0) | (sex == 1)):
        raise DpsynthError("table: SEX must be 0, 1 or NaN")
    if patients is not None and np.asarray(patients).dtype.kind == "f":
        if not np.all(np.isfinite(patients)):  # NaN ids would merge patients into one record
            raise DpsynthError("patients: ids must be finite")
    phases = table[:, INDEX["ESED"]]
    if patients is None and np.unique(phases[np.isfinite(phases)]).size > 1:
        # two rows of one patient counted as two records would double the true sensitivity
        raise DpsynthError(
            "table: rows hold both phases (ESED 0 and 1): pass patients=<id per row>"
        )
    per_patient = group_mean(table, patients)  # ANGLE is signed, not circular: a plain mean
    records = per_patient[:, [INDEX[column(a)] for a in VARIABLES]]
    for name, (col, code) in PER_PHASE.items():
        own = (phases == code) | np.isnan(phases)
        values = np.where(own, table[:, INDEX[col]], np.nan)[:, None]
        records[:, VARIABLES.index(name)] = group_mean(values, patients)[:, 0]
    return records


def _bins(records: np.ndarray) -> np.ndarray:
    """(P, V) bin index of each variable, values outside the range in the end bins; -1 = missing."""
    out = np.full(records.shape, -1)
    for j, edges in enumerate(EDGES):
        ok = np.isfinite(records[:, j])
        b = np.searchsorted(edges, records[ok, j], side="right") - 1
        out[ok, j] = np.clip(b, 0, len(edges) - 2)
    return out


def histogram_contributions(bins: np.ndarray) -> np.ndarray:
    """(P, Σ(bins+1)) release 1, unscaled: per variable a one-hot over its bins + missing."""
    blocks = []
    for j, edges in enumerate(EDGES):
        n_bins = len(edges) - 1
        slot = np.where(bins[:, j] < 0, n_bins, bins[:, j])
        blocks.append(np.eye(n_bins + 1)[slot])
    return np.hstack(blocks)


def sign_contributions(bins: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """(P, 2 · V(V-1)/2) release 2, unscaled: per pair of variables, the product of their
    signs about `thresholds` (bin index: +1 at or above it, -1 below, 0 when missing or when
    the threshold is -1, uninformative), then whether both are present. The co-presence
    counts normalise the products: variables missing together (e.g. no demographics) would
    otherwise inflate the agreement."""
    present = (bins >= 0).astype(np.float64)
    s = np.where(bins >= thresholds, 1.0, -1.0)
    s[(bins < 0) | (thresholds < 0)] = 0.0
    i, j = _PAIRS
    return np.hstack([s[:, i] * s[:, j], present[:, i] * present[:, j]])


# Largest L2 norm of one patient's unscaled contribution to each release: √V one-hot slots;
# per pair a sign product and a co-presence indicator, both 0 unless the pair is present.
SENSITIVITY = {"histograms": math.sqrt(_V), "signs": math.sqrt(2 * len(_PAIRS[0]))}


def _release(contrib: np.ndarray, name: str, sigma: float, rng: np.random.Generator):
    """Noisy column sums of `contrib`, the noise scaled to its share of the budget.

    Returns the sums in unscaled units and the std of their noise."""
    scale = math.sqrt(SHARES[name]) / SENSITIVITY[name]  # per-patient L2 norm <= √share
    noisy = contrib.sum(axis=0) * scale + rng.normal(0.0, sigma, contrib.shape[1])
    return noisy / scale, sigma / scale


def _split(counts: np.ndarray) -> list[np.ndarray]:
    """Release 1 cut into one (bins + missing) block per variable."""
    return np.split(counts, np.cumsum([len(e) for e in EDGES])[:-1])


def _marginals(counts: np.ndarray, noise_std: float) -> tuple[Marginal, ...]:
    """Post-processing of release 1.

    Every variable's block sums to the patient count, with noise variance proportional to
    its length: their inverse-variance weighted mean estimates it with the least noise. Bins below the noise threshold are dropped unless next to a kept one (a
    tail), missing counts below it are dropped, and missingness is a share of the count."""
    blocks = _split(counts)
    weights = np.array([1.0 / len(b) for b in blocks])
    n = max(float(np.dot(weights, [b.sum() for b in blocks]) / weights.sum()), 1.0)
    out = []
    for block in blocks:
        hist, missing = block[:-1], block[-1]
        keep = hist >= KEEP_BIN_SIGMAS * noise_std
        keep[1:] |= keep[:-1].copy()  # plus each kept bin's neighbours, so tails survive
        keep[:-1] |= keep[1:].copy()
        hist = np.where(keep & (hist > 0), hist, 0.0)
        missing = missing if missing >= KEEP_BIN_SIGMAS * noise_std else 0.0
        probs = hist / hist.sum() if hist.sum() > 0 else np.full(len(hist), 1.0 / len(hist))
        out.append(Marginal(probs, float(min(missing / n, 1.0))))
    return tuple(out)


def _thresholds(marginals: tuple[Marginal, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Per variable, the bin index whose lower edge splits its marginal closest to half and
    half, and the model's mass below that edge; (-1, NaN) when all mass is in one bin (its
    sign then carries no information)."""
    index, mass = np.full(_V, -1), np.full(_V, np.nan)
    for j, m in enumerate(marginals):
        below = np.cumsum(m.probs)[:-1]  # mass below the lower edge of bins 1 ..
        inside = np.flatnonzero((below > 1e-9) & (below < 1 - 1e-9))
        if inside.size:
            k = inside[np.argmin(np.abs(below[inside] - 0.5))]
            index[j], mass[j] = 1 + k, below[k]
    return index, mass


def _latent_correlation(agreement: float, p_i: float, p_j: float) -> float:
    """ρ of a standard bivariate normal whose signs about the p_i and p_j quantiles have
    expected product `agreement` (clamped to what ρ ∈ (-1, 1) can give)."""
    a_i, a_j = stats.norm.ppf(p_i), stats.norm.ppf(p_j)

    def expected(rho: float) -> float:
        both_below = stats.multivariate_normal.cdf([a_i, a_j], cov=[[1.0, rho], [rho, 1.0]])
        return 1.0 - 2.0 * p_i - 2.0 * p_j + 4.0 * both_below

    lo, hi = -0.999, 0.999
    e_lo, e_hi = expected(lo), expected(hi)
    if agreement <= e_lo:
        return lo
    if agreement >= e_hi:
        return hi
    return optimize.brentq(lambda r: expected(r) - agreement, lo, hi, xtol=1e-6)


def _correlation(
    products: np.ndarray,
    copresent: np.ndarray,
    noise_std: float,
    thresholds: np.ndarray,
    below: np.ndarray,
) -> np.ndarray:
    """Post-processing of release 2: the positive definite latent correlation matrix.

    Each agreement is first pulled towards its value under independence by one noise std
    (soft thresholding), so pure noise does not come out as a correlation."""
    r = np.eye(_V)
    for k, (i, j) in enumerate(zip(*_PAIRS, strict=True)):
        if thresholds[i] < 0 or thresholds[j] < 0:
            continue
        pairs = max(float(copresent[k]), 1.0)
        independent = (1.0 - 2.0 * below[i]) * (1.0 - 2.0 * below[j])
        excess = products[k] / pairs - independent
        excess = math.copysign(max(abs(excess) - noise_std / pairs, 0.0), excess)
        agreement = float(np.clip(independent + excess, -1.0, 1.0))
        r[i, j] = r[j, i] = _latent_correlation(agreement, below[i], below[j])
    vals, vecs = np.linalg.eigh(r)
    r = (vecs * np.clip(vals, CORRELATION_FLOOR, None)) @ vecs.T
    d = np.sqrt(np.diag(r))
    r = r / np.outer(d, d)
    return (r + r.T) / 2


def attribute_model_entry(
    records: int,
    *,
    epsilon: float | None = None,
    noise_multiplier: float | None = None,
    delta: float = DEFAULT_DELTA,
    accountant: str = DEFAULT_ACCOUNTANT,
    cache_id: str = "",
) -> LedgerEntry:
    """The ledger entry that charges one fit on `records` patients.

    It depends on no private value but the patient count, so a caller can check the budget
    and record it before :func:`fit_attribute_model` draws any noise.
    """
    delta = check_delta(delta)
    sigma = gaussian_noise_multiplier(epsilon, noise_multiplier, delta, accountant)
    return LedgerEntry.gaussian(
        STAGE,
        sigma,
        records=records,
        delta=delta,
        accountant=accountant,
        cache_id=cache_id,
        note=(
            "Gaussian copula: histograms of the clinical attributes, then pairwise sign "
            "agreements; two releases of L2 sensitivity sqrt(share) each, composed exactly"
        ),
    )


def load_attribute_model(run: str | os.PathLike) -> AttributeModel:
    """The DP attribute model of run folder `run`, refused unless the run's ledger records
    its fit (`require_attribute_fit`)."""
    path = Path(run) / ATTRIBUTE_MODEL_FILE
    if not path.is_file():
        raise DpsynthError(
            f"{run}: no DP attribute model ({ATTRIBUTE_MODEL_FILE}); run `dpsynth fit-attributes` "
            "first"
        )
    obj = read_json(path)
    _require_fit(path, obj, Ledger.load(run, missing_ok=True))
    return AttributeModel.from_json(obj, source=str(path))


def require_attribute_fit(run: str | os.PathLike, ledger: Ledger) -> None:
    """Refuse run folder `run` if it holds an attribute model whose fit `ledger` (the run's)
    does not record: one copied in from another run, or whose entry a replaced ledger.json
    lost, is covered by no ε the run states."""
    path = Path(run) / ATTRIBUTE_MODEL_FILE
    if path.is_file():
        _require_fit(path, read_json(path), ledger)


def records_fit(ledger: Ledger) -> bool:
    """Whether `ledger` records an attribute-model fit."""
    return bool(_fits(ledger))


def _fits(ledger: Ledger) -> list[LedgerEntry]:
    return [e for e in ledger if e.stage == STAGE and not e.non_private]


def _require_fit(path: Path, obj: object, ledger: Ledger) -> None:
    """Refuse the model read from `path` (`obj`) unless `ledger` holds its fit: by the entry
    id the model names (since stop 45), else a fit at its noise multiplier and δ (a Gaussian
    mechanism's ε depends on nothing else). Reads only those fields, so that the models of
    older formats are checked too."""
    try:
        entry = obj.get("ledger_entry", "")
        sigma, delta = (float(obj["privacy"][k]) for k in ("noise_multiplier", "delta"))
    except (AttributeError, KeyError, TypeError, ValueError):
        raise DpsynthError(f"{path}: not a DP attribute model (no privacy block)") from None
    fits = _fits(ledger)
    if entry:
        covered, what = any(e.id == entry for e in fits), f"its fit (ledger entry {entry})"
    else:
        covered = any((e.noise_multiplier, e.delta) == (sigma, delta) for e in fits)
        what = f"a fit at noise multiplier {sigma:g} and δ = {delta:g}"
    if not covered:
        raise DpsynthError(
            f"{path}: the run's ledger does not record {what} (copied from another run, or "
            f"its ledger.json lost or replaced): no ε covers it; restore the run's ledger.json, "
            f"or remove {ATTRIBUTE_MODEL_FILE} (and what was sampled from it) and fit again"
        )


def fit_attribute_model(
    table: np.ndarray,
    *,
    rng: np.random.Generator,
    epsilon: float | None = None,
    noise_multiplier: float | None = None,
    delta: float = DEFAULT_DELTA,
    patients: np.ndarray | None = None,
    accountant: str = DEFAULT_ACCOUNTANT,
    cache_id: str = "",
) -> tuple[AttributeModel, LedgerEntry]:
    """Fit the model on a private table with (`epsilon`, `delta`)-DP (or a given σ).

    `table` is (P, 14) with one row per patient, or per-volume rows with `patients` giving
    each row's patient id. Returns the model and the ledger entry that charges it
    (:func:`attribute_model_entry`).
    """
    records = patient_records(table, patients)
    entry = attribute_model_entry(
        len(records), epsilon=epsilon, noise_multiplier=noise_multiplier, delta=delta,
        accountant=accountant, cache_id=cache_id,
    )  # fmt: skip
    sigma, delta = entry.noise_multiplier, entry.delta
    warn_delta(delta, len(records))

    bins = _bins(records)
    counts, noise_std = _release(histogram_contributions(bins), "histograms", sigma, rng)
    marginals = _marginals(counts, noise_std)
    thresholds, below = _thresholds(marginals)
    released, sign_noise = _release(sign_contributions(bins, thresholds), "signs", sigma, rng)
    products, copresent = np.split(released, 2)
    correlation = _correlation(products, copresent, sign_noise, thresholds, below)

    model = AttributeModel(marginals, correlation, sigma, delta, epsilon)
    return model, entry


def attribute_fidelity(real: np.ndarray, synthetic: np.ndarray) -> dict:
    """Marginal and pairwise fidelity of synthetic attribute rows (N, 14) against real ones.

    Per attribute (raw units, NaN excluded): Wasserstein-1, Kolmogorov–Smirnov statistic,
    mean, std and missing rate of both; plus the largest absolute difference between the
    pairwise-complete Pearson correlation matrices (pairs constant in either set skipped).
    """
    real = np.asarray(real, dtype=np.float64)
    synthetic = np.asarray(synthetic, dtype=np.float64)
    for name, arr in (("real", real), ("synthetic", synthetic)):
        if arr.ndim != 2 or arr.shape[1] != N_ATTRIBUTES or len(arr) == 0:
            raise DpsynthError(
                f"{name}: expected shape (rows >= 1, {N_ATTRIBUTES}), got {arr.shape}"
            )
    per_attribute = {}
    for j, name in enumerate(ATTRIBUTES):
        a, b = real[np.isfinite(real[:, j]), j], synthetic[np.isfinite(synthetic[:, j]), j]
        both = a.size > 0 and b.size > 0
        per_attribute[name] = {
            "wasserstein": float(stats.wasserstein_distance(a, b)) if both else math.nan,
            "ks": float(stats.ks_2samp(a, b).statistic) if both else math.nan,
            "mean_real": float(a.mean()) if a.size else math.nan,
            "mean_synthetic": float(b.mean()) if b.size else math.nan,
            "std_real": float(a.std()) if a.size else math.nan,
            "std_synthetic": float(b.std()) if b.size else math.nan,
            "missing_real": 1.0 - a.size / len(real),
            "missing_synthetic": 1.0 - b.size / len(synthetic),
        }
    diff = np.abs(pairwise_correlation(real) - pairwise_correlation(synthetic))
    max_diff = float(np.nanmax(diff)) if np.isfinite(diff).any() else math.nan
    return {
        "n_real": len(real),
        "n_synthetic": len(synthetic),
        "attributes": per_attribute,
        "max_abs_correlation_difference": max_diff,
    }
