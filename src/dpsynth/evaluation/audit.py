"""Privacy audit: membership inference on the denoising loss and memorisation of training volumes.

Both attacks read private records (members and held-out patients), so their outputs are an
evaluation in the sense of BRIEF section 3 (c): reported, never released with the model or
the synthetic data. Every result carries that label.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from dpsynth.attributes import INDEX, N_ATTRIBUTES
from dpsynth.config import DEFAULT_TIMESTEPS
from dpsynth.errors import DpsynthError

EVALUATION_LABEL = (
    "Evaluation on private data (BRIEF section 3 (c)): computed on private member and "
    "held-out records; these outputs are not released with the model or the synthetic data."
)

# Fixed timesteps over the lower two thirds of the schedule, as fractions of T (5, 15, 30, 50,
# 75, 100 at the study's T = 150): at large t the noisy latent carries little of the volume,
# so the loss there hardly depends on membership.
TIMESTEP_FRACTIONS: tuple[float, ...] = (1 / 30, 0.1, 0.2, 1 / 3, 0.5, 2 / 3)


# Fixed noises per timestep. Two keep the attack's power: on the non-private bench-paper
# model (350 members, 100 held out) 2 draws gave patient AUC 0.610 and 4 gave 0.619 (std
# 0.03), at half the cost (109 s vs 210 s on 2 CPU cores; the audit dominated `make demo`).
N_NOISE = 2


def default_timesteps(num_train_timesteps: int = DEFAULT_TIMESTEPS) -> tuple[int, ...]:
    """The audit's fixed timesteps for a schedule of `num_train_timesteps` steps."""
    return tuple(sorted({round(f * num_train_timesteps) for f in TIMESTEP_FRACTIONS}))


# A set of real volumes: (volumes (N, S, H, W), attributes (N, 14)[, patient ids (N,)]).
AuditSet = Sequence[Any]


# ---------------------------------------------------------------------------------------------
# ROC


def roc_curve(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC of `scores` (higher = more likely positive) against binary `labels`.

    Returns (fpr, tpr, thresholds), starting at (0, 0) with threshold +inf. Tied scores are
    one operating point, so the curve never depends on the order of equal scores.
    """
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels).astype(bool)
    if scores.shape != labels.shape or scores.ndim != 1:
        raise ValueError(f"scores {scores.shape} and labels {labels.shape} must be equal 1-D")
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError("ROC needs at least one positive and one negative")
    order = np.argsort(-scores, kind="stable")
    scores, labels = scores[order], labels[order]
    last_of_tie = np.r_[np.flatnonzero(np.diff(scores)), scores.size - 1]
    tp = np.cumsum(labels)[last_of_tie]
    fp = (last_of_tie + 1) - tp
    fpr = np.r_[0.0, fp / n_neg]
    tpr = np.r_[0.0, tp / n_pos]
    return fpr, tpr, np.r_[np.inf, scores[last_of_tie]]


def roc_auc(fpr: np.ndarray, tpr: np.ndarray) -> float:
    """Area under a ROC curve by the trapezoid rule (ties count one half, as Mann-Whitney)."""
    return float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2.0))


def tpr_at_fpr(fpr: np.ndarray, tpr: np.ndarray, max_fpr: float) -> float:
    """Highest TPR at an operating point whose FPR does not exceed `max_fpr`."""
    return float(tpr[fpr <= max_fpr + 1e-12].max())


def _auc_standard_error(auc: float, n_pos: int, n_neg: int) -> float:
    # Hanley & McNeil (1982): gives the reader a scale for AUC on a few dozen patients.
    q1, q2 = auc / (2.0 - auc), 2.0 * auc**2 / (1.0 + auc)
    var = (auc * (1 - auc) + (n_pos - 1) * (q1 - auc**2) + (n_neg - 1) * (q2 - auc**2)) / (
        n_pos * n_neg
    )
    return float(math.sqrt(max(var, 0.0)))


def attack_summary(member_scores: np.ndarray, nonmember_scores: np.ndarray) -> dict[str, Any]:
    """AUC, its standard error, TPR at 1% and 10% FPR and the ROC points, JSON-able."""
    scores = np.r_[member_scores, nonmember_scores]
    labels = np.r_[np.ones(len(member_scores)), np.zeros(len(nonmember_scores))]
    fpr, tpr, _ = roc_curve(scores, labels)
    auc = roc_auc(fpr, tpr)
    return {
        "auc": auc,
        "auc_std": _auc_standard_error(auc, len(member_scores), len(nonmember_scores)),
        "tpr_at_1pct_fpr": tpr_at_fpr(fpr, tpr, 0.01),
        "tpr_at_10pct_fpr": tpr_at_fpr(fpr, tpr, 0.10),
        "n_members": len(member_scores),
        "n_nonmembers": len(nonmember_scores),
        # Below 1/n_nonmembers the FPR axis has no resolution: TPR@1% is then TPR at FPR 0.
        "fpr_resolution": 1.0 / len(nonmember_scores),
        "roc": {"fpr": fpr.tolist(), "tpr": tpr.tolist()},
    }


# ---------------------------------------------------------------------------------------------
# Memorisation


def _flatten(x: np.ndarray) -> np.ndarray:
    return np.asarray(x, dtype=np.float32).reshape(len(x), -1)


def _standardise(x: np.ndarray) -> np.ndarray:
    # Zero mean, unit norm per row: a dot product of two rows is then their Pearson correlation.
    x = x - x.mean(axis=1, keepdims=True)
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norm > 0, norm, 1.0)


def _nearest(
    query: np.ndarray,
    bank: np.ndarray,
    metric: str,
    exclude_self: bool = False,
    chunk: int = 64,
) -> tuple[np.ndarray, np.ndarray]:
    """Nearest row of `bank` for every row of `query`: (index, score), higher score = closer.

    `metric` is "correlation" (score = Pearson r of the flattened arrays) or "euclidean"
    (score = -distance). Both sets are processed in chunks of `chunk` rows, so neither needs
    to fit in memory as float32 (a memory-mapped float16 cache works as is).
    """
    best = np.full(len(query), -np.inf)
    best_index = np.full(len(query), -1, dtype=np.int64)
    for q0 in range(0, len(query), chunk):
        q = _flatten(query[q0 : q0 + chunk])
        q = _standardise(q) if metric == "correlation" else q
        for b0 in range(0, len(bank), chunk):
            b = _flatten(bank[b0 : b0 + chunk])
            if metric == "correlation":
                score = q @ _standardise(b).T
            else:
                sq = (q**2).sum(1)[:, None] + (b**2).sum(1)[None, :] - 2.0 * (q @ b.T)
                score = -np.sqrt(np.maximum(sq, 0.0))
            if exclude_self:  # query is bank: a row is not its own neighbour
                rows = np.arange(q0, q0 + len(q))[:, None]
                score = np.where(rows == np.arange(b0, b0 + len(b))[None, :], -np.inf, score)
            j = score.argmax(axis=1)
            s = score[np.arange(len(q)), j]
            better = s > best[q0 : q0 + len(q)]
            best[q0 : q0 + len(q)][better] = s[better]
            best_index[q0 : q0 + len(q)][better] = j[better] + b0
    return best_index, best


def _closer_to_train(train_score: np.ndarray, test_score: np.ndarray) -> float:
    # Ties count one half, so copies present in both sets do not bias the fraction.
    return float(np.mean((train_score > test_score) + 0.5 * (train_score == test_score)))


def _nearest_neighbours(
    synthetic: np.ndarray, train: np.ndarray, test: np.ndarray, metric: str, top_k: int
) -> dict[str, Any]:
    i_train, s_train = _nearest(synthetic, train, metric)
    i_test, s_test = _nearest(synthetic, test, metric)
    reference = None
    if len(test) > 1:  # real-vs-real: each held-out volume plays a fair "synthetic" sample
        _, r_train = _nearest(test, train, metric)
        _, r_test = _nearest(test, test, metric, exclude_self=True)
        reference = _closer_to_train(r_train, r_test)
    sign = 1.0 if metric == "correlation" else -1.0  # report distances as positive numbers
    order = np.argsort(-s_train, kind="stable")[:top_k]
    return {
        "metric": "pearson correlation" if metric == "correlation" else "euclidean distance",
        "fraction_closer_to_train": _closer_to_train(s_train, s_test),
        "reference_fraction": reference,
        "median_nearest_train": float(sign * np.median(s_train)),
        "median_nearest_test": float(sign * np.median(s_test)),
        "closest_pairs": [
            {
                "synthetic_index": int(k),
                "train_index": int(i_train[k]),
                "train_score": float(sign * s_train[k]),
                "test_index": int(i_test[k]),
                "test_score": float(sign * s_test[k]),
            }
            for k in order
        ],
    }


def memorisation(
    synthetic: np.ndarray,
    train: np.ndarray,
    test: np.ndarray,
    features_fn: Callable[[np.ndarray], np.ndarray] | None = None,
    top_k: int = 8,
) -> dict[str, Any]:
    """Is each synthetic volume closer to a training volume than to any held-out volume?

    For every synthetic volume (N, S, H, W) the nearest training volume (M) and the nearest
    held-out test volume (K) are found by Pearson correlation of the voxels and, when
    `features_fn` (volumes -> (n, D) features, e.g. the referee's) is given, by Euclidean
    distance between features.

    Null expectation: a generator that does not memorise produces fresh draws from the data
    distribution, exchangeable with the M + K real volumes, so its nearest real neighbour is a
    training volume with probability M / (M + K) (`chance_level`), not 1/2 when the sets
    differ in size. As an empirical reference, `reference_fraction` runs the same test on the
    held-out volumes themselves (each against the training set and the *other* held-out
    volumes, chance M / (M + K - 1)). A fraction well above both signals memorisation;
    `closest_pairs` lists the synthetic volumes most similar to a training volume, to look at.
    """
    # np.asarray keeps a memory-mapped cache mapped: _nearest reads it chunk by chunk.
    synthetic, train, test = (np.asarray(a) for a in (synthetic, train, test))
    for name, a in (("synthetic", synthetic), ("train", train), ("test", test)):
        if a.ndim != 4 or len(a) == 0:
            raise DpsynthError(f"{name}: expected a non-empty (N, S, H, W) array, got {a.shape}")
        if a.shape[1:] != train.shape[1:]:
            raise DpsynthError(f"{name}: volume shape {a.shape[1:]} != train {train.shape[1:]}")
    m, k = len(train), len(test)
    result: dict[str, Any] = {
        "label": EVALUATION_LABEL,
        "n_synthetic": len(synthetic),
        "n_train": m,
        "n_test": k,
        "chance_level": m / (m + k),
        "image": _nearest_neighbours(synthetic, train, test, "correlation", top_k),
    }
    if features_fn is not None:
        feats = [np.asarray(features_fn(a), dtype=np.float32) for a in (synthetic, train, test)]
        result["features"] = _nearest_neighbours(*feats, "euclidean", top_k)
    return result


# ---------------------------------------------------------------------------------------------
# Membership inference


def _unpack(data: AuditSet, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    if len(data) not in (2, 3):
        raise DpsynthError(f"{name}: expected (volumes, attributes[, patient ids])")
    volumes, attributes = data[0], np.asarray(data[1], dtype=np.float32)
    patients = None if len(data) == 2 or data[2] is None else np.asarray(data[2])
    if volumes.ndim != 4 or len(volumes) == 0 or attributes.shape != (len(volumes), N_ATTRIBUTES):
        raise DpsynthError(
            f"{name}: expected volumes (N > 0, S, H, W) and attributes (N, {N_ATTRIBUTES}), "
            f"got {tuple(volumes.shape)} and {attributes.shape}"
        )
    if patients is not None and len(patients) != len(volumes):
        raise DpsynthError(f"{name}: {len(patients)} patient ids for {len(volumes)} volumes")
    return volumes, attributes, patients


def _patient_groups(attributes: np.ndarray, patients: np.ndarray | None) -> np.ndarray | None:
    """Patient id of every volume; by default the cache's convention (ED row, then ES row)."""
    if patients is not None:
        return patients
    esed = attributes[:, INDEX["ESED"]]
    if len(esed) % 2 == 0 and np.all(esed[0::2] == 1) and np.all(esed[1::2] == 0):
        return np.arange(len(esed)) // 2
    return None


def count_patients(data: AuditSet) -> int:
    """Patients in an audit set (its volumes where patients are unknown)."""
    volumes, attributes, patients = _unpack(data, "audit set")
    groups = _patient_groups(attributes, patients)
    return len(volumes) if groups is None else len(np.unique(groups))


def denoising_losses(
    pipeline: Any,
    volumes: np.ndarray,
    attributes: np.ndarray,
    timesteps: Sequence[int],
    n_noise: int = N_NOISE,
    seed: int = 0,
    batch_size: int = 8,
) -> np.ndarray:
    """Per-volume denoising loss averaged over fixed timesteps and fixed noises, shape (N,).

    The noises are drawn once from `seed` and shared by every volume, so two volumes' losses
    differ only through the volumes and the model: the attack compares like with like.
    """
    is_module = isinstance(pipeline, torch.nn.Module)
    was_training = is_module and pipeline.training
    device = next(pipeline.parameters(), torch.empty(0)).device if is_module else "cpu"
    if is_module:
        pipeline.eval()  # dropout would add noise to the score
    losses, noises = [], None
    try:
        with torch.no_grad():
            for b0 in range(0, len(volumes), batch_size):
                x = np.asarray(volumes[b0 : b0 + batch_size], dtype=np.float32)
                x = torch.as_tensor(x, device=device)
                attrs = torch.as_tensor(attributes[b0 : b0 + batch_size], device=device)
                latents = pipeline.encode(x[:, None])
                if noises is None:
                    gen = torch.Generator().manual_seed(seed)
                    noises = torch.randn(
                        (n_noise, *latents.shape[1:]), generator=gen, dtype=latents.dtype
                    ).to(latents.device)
                total = torch.zeros(len(x), dtype=torch.float64)
                for t in timesteps:
                    ts = torch.full((len(x),), int(t), dtype=torch.long, device=latents.device)
                    for noise in noises:
                        noise = noise.expand_as(latents)
                        total += pipeline.denoising_loss(latents, attrs, ts, noise).double().cpu()
                losses.append(total / (len(timesteps) * n_noise))
    finally:
        if is_module:
            pipeline.train(was_training)
    return torch.cat(losses).numpy()


def _by_patient(values: np.ndarray, groups: np.ndarray) -> np.ndarray:
    _, inverse = np.unique(groups, return_inverse=True)
    return np.bincount(inverse, weights=values) / np.bincount(inverse)


def _member_subset(groups: np.ndarray | None, n_volumes: int, count: int, seed: int) -> np.ndarray:
    """Indices of the volumes of `count` member patients drawn at random (all if fewer)."""
    ids = np.arange(n_volumes) if groups is None else groups
    patients = np.unique(ids)
    if count >= len(patients):
        return np.arange(n_volumes)
    chosen = np.random.default_rng(seed).choice(patients, size=count, replace=False)
    return np.flatnonzero(np.isin(ids, chosen))


def membership_inference(
    pipeline: Any,
    members: AuditSet,
    nonmembers: AuditSet,
    timesteps: Sequence[int] | None = None,
    n_noise: int = N_NOISE,
    seed: int = 0,
    batch_size: int = 8,
    member_patients: int | None = None,
) -> dict[str, Any]:
    """Loss-threshold membership inference: a lower denoising loss suggests a training member.

    `members` and `nonmembers` are (volumes, attributes[, patient ids]). The score of a volume
    is minus its mean denoising loss (see :func:`denoising_losses`). Results are given per
    volume and per patient (the privacy unit: a patient's volumes' losses are averaged);
    patients default to consecutive ED/ES rows, the prepared cache's convention. `timesteps`
    defaults to :func:`default_timesteps` of the pipeline's ``num_train_timesteps``.

    `member_patients` scores only that many member patients, drawn at random from `seed`
    (patients are volumes where they are unknown): the AUC of a random subset estimates the
    full set's without bias, while scoring costs 12 denoiser passes per volume.
    """
    if timesteps is None:
        timesteps = default_timesteps(getattr(pipeline, "num_train_timesteps", DEFAULT_TIMESTEPS))
    scores: dict[str, np.ndarray] = {}
    groups: dict[str, np.ndarray | None] = {}
    scored_members = None
    for name, data in (("members", members), ("nonmembers", nonmembers)):
        volumes, attributes, patients = _unpack(data, name)
        group = _patient_groups(attributes, patients)
        if name == "members" and member_patients is not None:
            keep = _member_subset(group, len(volumes), member_patients, seed)
            scored_members = {"scored": len(keep), "of": len(volumes)}
            volumes, attributes = volumes[keep], attributes[keep]
            group = None if group is None else group[keep]
        loss = denoising_losses(pipeline, volumes, attributes, timesteps, n_noise, seed, batch_size)
        scores[name] = -loss
        groups[name] = group
    result = {
        "label": EVALUATION_LABEL,
        "attack": "loss threshold (score = -mean denoising loss)",
        "timesteps": [int(t) for t in timesteps],
        "n_noise": n_noise,
        "seed": seed,
        "member_volumes": scored_members,  # None: every member volume was scored
        "volume": attack_summary(scores["members"], scores["nonmembers"]),
        "patient": None,
    }
    if groups["members"] is not None and groups["nonmembers"] is not None:
        result["patient"] = attack_summary(
            _by_patient(scores["members"], groups["members"]),
            _by_patient(scores["nonmembers"], groups["nonmembers"]),
        )
    return result


# ---------------------------------------------------------------------------------------------
# Both


def _features_fn(referee: Any) -> Callable[[np.ndarray], np.ndarray] | None:
    if referee is None:
        return None
    if hasattr(referee, "features"):
        return referee.features
    if callable(referee):
        return referee
    raise DpsynthError(f"referee: {type(referee).__name__} has no features() method")


def privacy_audit(
    pipeline: Any,
    member_set: AuditSet,
    nonmember_set: AuditSet,
    synthetic_set: np.ndarray | AuditSet,
    referee: Any = None,
    seed: int = 0,
    timesteps: Sequence[int] | None = None,
    n_noise: int = N_NOISE,
    member_patients: int | None = None,
) -> dict[str, Any]:
    """Membership inference and memorisation in one JSON-able dict.

    `pipeline` is the model under audit (``dpsynth.load(RUN)``, or any object with
    ``encode`` and ``denoising_loss``): evaluation takes pipelines, never run folders.
    `member_set` holds training patients' (volumes, attributes[, patient ids]), `nonmember_set`
    held-out patients'; `synthetic_set` is the synthetic volumes (or (volumes, attributes)).
    `referee` (optional) supplies features for a second memorisation test: an object with
    ``features(volumes)`` or a callable. `member_patients` limits membership inference to a
    random subset of members (see :func:`membership_inference`); memorisation uses them all.
    """
    synthetic = synthetic_set if isinstance(synthetic_set, np.ndarray) else synthetic_set[0]
    mia = membership_inference(pipeline, member_set, nonmember_set, timesteps, n_noise, seed,
                               member_patients=member_patients)  # fmt: skip
    mem = memorisation(synthetic, member_set[0], nonmember_set[0], _features_fn(referee))
    return {"label": EVALUATION_LABEL, "membership_inference": mia, "memorisation": mem}
