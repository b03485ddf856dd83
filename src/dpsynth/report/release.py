"""`dpsynth release` and `dpsynth verify`: what may leave the data steward's site.

A release bundle is built by allow-list. Nothing is copied from the run folder by name or
pattern: every file is rebuilt from parsed, checked values, so a file dpsynth does not know
(checkpoints with the secret sampling seed, training losses, evaluation on private data, the
private cache's id) cannot slip in::

    BUNDLE/
      PRIVACY.md                     the guarantee in plain words
      MODEL_CARD.md                  what the model is, how to sample it, its limits
      privacy.json                   ε, δ, accountant, every mechanism's parameters
      model/model.json               architecture and sampling settings (allow-listed keys)
      model/denoiser.safetensors     weights, re-serialised without metadata
      model/autoencoder.safetensors
      synthetic/synth_NNNNN.nii.gz   the synthetic volumes, headers written afresh
      synthetic/attributes.csv       their conditions
      synthetic/provenance.json      model digest, conditioning source, sampler settings,
                                     best of k (`candidates`), file digests
      SHA256SUMS                     SHA-256 of every other file (`sha256sum -c SHA256SUMS`)

`release` refuses (one line, exit 2) when the ledger's composed ε is above the budget the
user set, a stage without DP learned from data a DP entry marks private, the run's lineage
cannot be checked against its ledger (`stated_privacy`), the synthetic set
was not sampled from this run, its volumes were chosen by a selector not declared public or
trained on a cache the ledger names, or its conditions were real private attributes. For a
best-of-k set, privacy.json also says whether `sample --private` checked the selector's
listed patients against every private cache the ledger names (`selector_patients_checked`).
`verify` re-checks a bundle anywhere: the file list and digests, and ε recomputed from the
mechanisms by the accountant named.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import math
import os
import re
import reprlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from dpsynth.attributes import ATTRIBUTES
from dpsynth.config import (
    Config,
    DenoiserConfig,
    DiffusionConfig,
    SamplingConfig,
    check_candidates,
    check_seed,
    config_from_dict,
    read_run_config,
)
from dpsynth.errors import DpsynthError, ReleaseRefusedError
from dpsynth.evaluation.selection import check_selector_record, refuse_private_selector
from dpsynth.io import (
    atomic_dir,
    atomic_write_json,
    atomic_write_text,
    read_json,
    read_nifti,
    sha256_file,
    write_nifti,
)
from dpsynth.privacy.accounting import (
    PRV_EPS_ERROR,
    Mechanism,
    check_epsilon,
    epsilon_for,
    format_bound,
)
from dpsynth.privacy.attribute_model import records_fit
from dpsynth.privacy.ledger import Ledger
from dpsynth.report.stated_privacy import StatedPrivacy, stated_privacy
from dpsynth.runs import (
    CONDITIONING,
    MODEL_FILE,
    PROVENANCE_FILE,
    RELEASABLE_CONDITIONING,
    WEIGHT_FILES,
    load_weights,
    model_digest,
    read_conditions_csv,
    read_model_meta,
    read_scale_source,
    sampling_settings,
    save_weights,
    write_attributes_csv,
)

FORMAT_VERSION = 1
MANIFEST = "SHA256SUMS"
PRIVACY_JSON = "privacy.json"
PRIVACY_MD = "PRIVACY.md"
MODEL_CARD = "MODEL_CARD.md"
MODEL_DIR = "model"
SYNTHETIC_DIR = "synthetic"
VOLUME_NAME = re.compile(r"synth_\d{5,}\.nii\.gz")
# Every path a bundle may hold (relative, '/'-separated). verify and the tests enforce it.
ALLOWED = (
    re.compile(re.escape(PRIVACY_MD)),
    re.compile(re.escape(MODEL_CARD)),
    re.compile(re.escape(PRIVACY_JSON)),
    re.compile(re.escape(MANIFEST)),
    re.compile(f"{MODEL_DIR}/model\\.json"),
    *(re.compile(f"{MODEL_DIR}/{re.escape(name)}") for name in WEIGHT_FILES),
    re.compile(f"{SYNTHETIC_DIR}/{VOLUME_NAME.pattern}"),
    re.compile(f"{SYNTHETIC_DIR}/attributes\\.csv"),
    re.compile(f"{SYNTHETIC_DIR}/{re.escape(PROVENANCE_FILE)}"),
)
REQUIRED = (
    PRIVACY_MD, MODEL_CARD, PRIVACY_JSON, f"{MODEL_DIR}/model.json",
    *(f"{MODEL_DIR}/{name}" for name in WEIGHT_FILES), f"{SYNTHETIC_DIR}/attributes.csv",
    f"{SYNTHETIC_DIR}/{PROVENANCE_FILE}",
)  # fmt: skip
# The architecture keys a sampler needs; the autoencoder's training settings (loss weights,
# a local perceptual-network path) stay behind.
AUTOENCODER_KEYS = (
    "kind", "channels", "channel_multipliers", "num_res_blocks", "latent_channels",
    "norm_groups", "codebook_size", "code_dim",
)  # fmt: skip
MODEL_SECTIONS = {  # and "sampling", every SamplingConfig key (released_model_json)
    "autoencoder": AUTOENCODER_KEYS,
    "denoiser": tuple(f.name for f in dataclasses.fields(DenoiserConfig)),
    "diffusion": tuple(f.name for f in dataclasses.fields(DiffusionConfig)),
}
# verify: the recomputed ε must match the stated one (the same accountant on the same
# history is deterministic; this only absorbs floating-point noise across machines).
EPSILON_RTOL = 1e-6


# ---------------------------------------------------------------------------------------------
# release


def release(
    run: str | os.PathLike,
    synthetic: str | os.PathLike,
    out: str | os.PathLike,
    max_epsilon: float | None = None,
) -> Path:
    """Write the allow-listed release bundle of DP run `run` and its synthetic set to `out`.

    `max_epsilon` is the steward's own limit on the composed ε, checked together with the
    run's (``privacy.max_total_epsilon``, else its planned ε). Raises
    :class:`ReleaseRefusedError` before writing anything when a check fails.
    """
    run, synthetic, out = Path(run), Path(synthetic), Path(out)
    meta = read_model_meta(run, kind="ldm")
    model = released_model_json(meta)  # the values the bundle copies, checked; the rest unread
    with _refusing():
        stated = stated_privacy([run], missing_ok=True)  # one read: what is checked is stated
    ledger = stated.ledger
    if not stated.dp:
        _refuse(f"{run}: the ledger records no DP mechanism; only DP runs are released")
    dp = [e for e in ledger if e.mechanism_spent() is not None]
    _check_non_private_training(run, stated)  # first: a NOT DP run has no ε to weigh
    config = _run_config(run, max_epsilon)
    epsilon, delta, accountant = stated.epsilon()
    limits = _budget_limits(config, ledger, delta, accountant, max_epsilon)
    for limit, source in limits:
        if not epsilon <= limit:  # also refuses an unbounded (inf/NaN) ε
            planned = source.startswith("the run's planned")
            hint = "; a steward may state the limit instead: --max-epsilon" if planned else ""
            _refuse(
                f"{run}: composed ε = {format_bound(epsilon)} at δ = {delta:g} ({accountant}) is over "
                f"{source} ({limit:g}){hint}"
            )
    provenance = _check_synthetic(run, model, synthetic, ledger)
    if out.exists() and not (out / MANIFEST).is_file():
        raise DpsynthError(f"{out}: exists and is not a release bundle; choose a new --out")

    privacy = {
        "format_version": FORMAT_VERSION,
        "unit": "patient",
        "epsilon": epsilon,
        "delta": delta,
        "accountant": accountant,
        "budget": [{"limit": limit, "source": source} for limit, source in limits],
        "mechanisms": [_mechanism(e) for e in dp],
        "evaluation_uses": [{"stage": e.stage, "note": e.note} for e in ledger if e.non_private],
        "conditioning": provenance["conditioning"],
        "candidates": provenance["candidates"],
        **_selector_checks(provenance, ledger),
    }
    with atomic_dir(out) as tmp:
        _write_model(run, model, tmp / MODEL_DIR)
        _write_synthetic(synthetic, provenance, model, tmp / SYNTHETIC_DIR)
        atomic_write_json(tmp / PRIVACY_JSON, privacy)
        atomic_write_text(tmp / PRIVACY_MD, privacy_markdown(privacy))
        atomic_write_text(tmp / MODEL_CARD, model_card(model, privacy, provenance))
        write_manifest(tmp)
    return out


def _refuse(message: str) -> None:
    raise ReleaseRefusedError(f"release refused: {message}")


@contextlib.contextmanager
def _refusing(where: str = "") -> Iterator[None]:
    """A check's one-line DpsynthError becomes a release refusal, `where` first."""
    try:
        yield
    except DpsynthError as e:
        _refuse(f"{where}{e}")


def _run_config(run: Path, max_epsilon: float | None) -> Config | None:
    config = read_run_config(run)
    if config is not None:
        return config
    if max_epsilon is None:
        _refuse(f"{run}: no config.yaml to read the run's budget from; give --max-epsilon")
    return None


def _budget_limits(
    config: Config | None, ledger: Ledger, delta: float, accountant: str, max_epsilon: float | None
) -> list[tuple[float, str]]:
    """The budgets the composed ε must respect: the steward's and the run's total budget;
    with neither, the run's plan (its planned ε, or every entry at its planned steps)."""
    limits = []
    if max_epsilon is not None:
        limits.append((check_epsilon(max_epsilon, key="--max-epsilon"), "--max-epsilon"))
    p = config.privacy if config is not None else None
    if p is not None and p.max_total_epsilon is not None:
        limits.append((p.max_total_epsilon, "the run's budget privacy.max_total_epsilon"))
    if limits or p is None:
        return limits
    if p.epsilon is not None:
        return [(p.epsilon, "the run's planned ε privacy.epsilon")]
    planned = [  # a fixed noise multiplier: every entry at its budget-checked steps
        Mechanism(e.noise_multiplier, e.sample_rate, e.planned_steps)
        for e in ledger
        if not e.non_private and e.planned_steps > 0
    ]
    return [(epsilon_for(planned, delta, accountant), "the run's planned spending")]


def _check_non_private_training(run: Path, stated: StatedPrivacy) -> None:
    """Refuse weights that learned from private data without DP, or whose lineage could not
    be checked against the ledger (`stated_privacy`).

    Private data = any cache the ledger names (its entries record uses of private data).
    A lineage stage that trained on it without DP (model.json ``trained_on``), or a
    non-private ledger use other than an evaluation, would put un-noised private
    information into the weights.
    """
    for e in stated.ledger.shaping_uses():
        _refuse(f"{run}: the ledger records a non-private use '{e.stage}' ({e.note})")
    for why in stated.unchecked:  # every run since the field carries trained_on
        _refuse(why)
    if stated.not_dp:
        _refuse(f"{run}: a stage of its lineage trained without DP on private data")


def _check_synthetic(run: Path, model: dict, synthetic: Path, ledger: Ledger) -> dict:
    """The synthetic folder's provenance, after checking it was sampled from `run` as is and,
    for best-of-k sampling, chosen by a segmenter that never learned from private data."""
    path = synthetic / PROVENANCE_FILE
    if not path.is_file():
        _refuse(f"{synthetic}: no {PROVENANCE_FILE}; sample it with `dpsynth sample {run}`")
    provenance = read_json(path)
    if not isinstance(provenance, dict) or not isinstance(provenance.get("files"), dict):
        _refuse(f"{path}: not a dpsynth provenance file")
    if provenance.get("model_digest") != model_digest(run):
        _refuse(f"{synthetic}: not sampled from {run} (model digest differs)")
    source = provenance.get("conditioning")
    if source not in RELEASABLE_CONDITIONING:
        meaning = CONDITIONING.get(source, repr(source))
        _refuse(f"{synthetic}: conditioned on {meaning}, not a releasable source")
    if source == "dp" and not records_fit(ledger):
        _refuse(
            f"{synthetic}: conditioned on the DP attribute model, but {run}'s ledger records "
            "no attribute-model fit, so its ε would not count the released conditions"
        )
    files = provenance["files"]
    present = {p.name for p in synthetic.iterdir()} - {PROVENANCE_FILE}
    volumes = [name for name in files if VOLUME_NAME.fullmatch(name)]
    if present != set(files) or set(files) != {*volumes, "attributes.csv"} or not volumes:
        extra, missing = sorted(present - set(files)), sorted(set(files) - present)
        _refuse(f"{synthetic}: files differ from those sampled (extra {extra}, missing {missing})")
    for name, digest in files.items():
        if sha256_file(synthetic / name) != digest:
            _refuse(f"{synthetic / name}: changed since it was sampled")
    return {**provenance, **_provenance_sampling(provenance, model, path),
            **_provenance_selection(provenance, model, ledger, path)}  # fmt: skip


def _selector_checks(provenance: dict, ledger: Ledger) -> dict:
    """What dpsynth checked of a best-of-k selector, for privacy.json: whether sampling
    checked its listed patients against every private cache the ledger names now (a cache
    added to the ledger after sampling was not; folders sampled before the check existed
    list none); nothing for plain draws."""
    if provenance["candidates"] == 1:
        return {}
    checked = set(provenance["selector"].get("patients_checked_against", []))
    return {"selector_patients_checked": bool(ledger.cache_ids) and ledger.cache_ids <= checked}


def _provenance_selection(provenance: dict, model: dict, ledger: Ledger, path: Path) -> dict:
    """`candidates` (1 for folders from before best-of-k) and, above 1, the `selector`
    record: declared public, made for the model's grid, and refused when the run's ledger
    names its cache (or has an entry naming none)."""
    candidates = provenance.get("candidates", 1)
    with _refusing(f"{path}: "):
        check_candidates(candidates)
        if candidates == 1:
            if "selector" in provenance:
                raise DpsynthError("selector: given, but no choice was made (candidates 1)")
            return {"candidates": 1}
        selector = check_selector_record(provenance.get("selector"), "selector",
                                         model["shape"], model["spacing"])  # fmt: skip
        refuse_private_selector(selector, ledger, "selector")
    return {"candidates": candidates}  # the bundle names no selector (see _write_synthetic)


def _provenance_sampling(provenance: dict, model: dict, path: Path) -> dict:
    """The sampler settings a provenance file names, checked like model.json's.

    They are copied into the bundle's provenance and model card, public files, so they must
    be the settings `dpsynth sample` writes and nothing else (no free text, no payload).
    """
    timesteps = model["diffusion"]["timesteps"]
    settings = {k: provenance.get(k) for k in ("sampler", "steps", "guidance")}
    if settings["sampler"] == "ddpm" and settings["steps"] is None:  # DDPM ran all T steps
        settings["steps"] = timesteps
    # Folders sampled before the temperature setting existed drew at its default.
    settings["temperature"] = provenance.get("temperature", SamplingConfig.temperature)
    seed = provenance.get("seed")
    with _refusing(f"{path}: "):
        check_seed(seed)
    checked = _schema({"diffusion": {"timesteps": timesteps}, "sampling": settings}, str(path))
    return {**{k: checked["sampling"][k] for k in settings}, "seed": seed}


def _schema(sections: dict, where: str) -> dict:
    """`sections` as the config schema reads them (plain values, defaults filled in), else
    a refusal naming `where`."""
    try:
        return config_from_dict(sections).to_dict()
    except DpsynthError as e:
        _refuse(f"{where}: {str(e).removeprefix('config: ').removeprefix('data.')}")


def _mechanism(entry) -> dict:
    """A ledger entry's accounting parameters only: no data id, no record count, no date."""
    return {
        "stage": entry.stage,
        "mechanism": entry.mechanism,
        "noise_multiplier": entry.noise_multiplier,
        "sample_rate": entry.sample_rate,
        "steps": entry.steps,
        "delta": entry.delta,
        "note": entry.note,
    }


def released_model_json(meta: dict) -> dict:
    """The run's model.json reduced to allow-listed keys, each value read by the config
    schema or checked against the few values training writes: nothing else is copied."""
    given = {"data": {"shape": meta.get("shape"), "spacing": meta.get("spacing")}}
    for section, keys in MODEL_SECTIONS.items():
        values = meta.get(section)
        if not isinstance(values, dict) or not set(keys) <= set(values):
            _refuse(f"model.json: {section}: expected a mapping with the keys {', '.join(keys)}")
        given[section] = {k: values[k] for k in keys}
    if not isinstance(meta.get("sampling", {}), dict):
        _refuse("model.json: sampling: expected a mapping")
    given["sampling"] = sampling_settings(meta)  # as `dpsynth sample` reads them
    checked = _schema(given, "model.json")
    out: dict[str, Any] = {"kind": "ldm"}
    out |= {s: {k: checked[s][k] for k in keys} for s, keys in MODEL_SECTIONS.items()}
    out["sampling"] = checked["sampling"]
    out["latent_scale"] = _finite(meta.get("latent_scale"), "latent_scale")
    with _refusing():
        out["latent_scale_source"] = read_scale_source(meta, MODEL_FILE)
    out["shape"], out["spacing"] = checked["data"]["shape"], checked["data"]["spacing"]
    _bounded(out, "")
    # DP runs take their ranges from the public --init run or the fixed clinical ranges
    # (training.ldm._attribute_ranges); runs without DP on private data are refused above.
    ranges = meta.get("attribute_ranges")
    out["attribute_ranges"] = {a: _range(ranges, a) for a in ATTRIBUTES}
    out["private"] = bool(meta.get("private"))
    return out


def _bounded(value: Any, key: str) -> None:
    """What the schema leaves unbounded, bounded: no room for a payload in a setting."""
    if isinstance(value, dict):
        for k, v in value.items():
            _bounded(v, f"{key}.{k}" if key else k)
    elif isinstance(value, list):
        if len(value) > 16:
            _refuse(f"model.json: {key}: more than 16 values")
        for v in value:
            _bounded(v, key)
    elif isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 2**31:
        _refuse(f"model.json: {key}: {reprlib.repr(value)} is out of range")
    elif isinstance(value, float) and not math.isfinite(value):
        _refuse(f"model.json: {key}: expected a finite number")


def _range(ranges: Any, name: str) -> list[float]:
    pair = ranges.get(name) if isinstance(ranges, dict) else None
    if not isinstance(pair, list) or len(pair) != 2:
        _refuse(f"model.json: attribute_ranges.{name}: expected [low, high]")
    low, high = (_finite(v, f"attribute_ranges.{name}") for v in pair)
    if not low <= high:
        _refuse(f"model.json: attribute_ranges.{name}: low {low:g} is above high {high:g}")
    return [low, high]


def _finite(value: Any, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        _refuse(f"model.json: {key}: expected a finite number, got {reprlib.repr(value)}")
    return float(value)


def _write_model(run: Path, model: dict, folder: Path) -> None:
    folder.mkdir()
    atomic_write_json(folder / "model.json", model)
    for name in WEIGHT_FILES:  # tensors only: whatever metadata the file held stays behind
        save_weights(folder / name, load_weights(run / name))


def _write_synthetic(synthetic: Path, provenance: dict, model: dict, folder: Path) -> None:
    """Volumes with fresh headers (spacing from the model), conditions as parsed numbers."""
    folder.mkdir()
    names = [n for n in provenance["files"] if VOLUME_NAME.fullmatch(n)]  # sampling order
    shape, spacing = tuple(model["shape"]), tuple(model["spacing"])
    for name in names:
        volume, _, _ = read_nifti(synthetic / name)
        if volume.shape != shape:
            _refuse(f"{synthetic / name}: shape {volume.shape} is not the model's {shape}")
        write_nifti(folder / name, volume, spacing)
    table, files = _read_attributes(synthetic / "attributes.csv")
    if files != names:
        _refuse(f"{synthetic / 'attributes.csv'}: its rows do not list the volumes in order")
    write_attributes_csv(folder / "attributes.csv", names, table)
    names_kept = ("model_digest", "conditioning", "sampler", "steps", "guidance", "temperature",
                  "seed", "candidates")  # fmt: skip
    kept = {k: provenance.get(k) for k in names_kept}
    kept["conditioning_meaning"] = CONDITIONING[kept["conditioning"]]
    kept["files"] = {n: sha256_file(folder / n) for n in [*names, "attributes.csv"]}
    atomic_write_json(folder / PROVENANCE_FILE, kept)


def _read_attributes(path: Path) -> tuple[np.ndarray, list[str]]:
    with path.open(newline="") as f:
        files = [row.get("file", "") for row in csv.DictReader(f)]
    return read_conditions_csv(path, None), files


def write_manifest(folder: Path) -> None:
    """SHA256SUMS over every other file of `folder` (the format `sha256sum -c` reads)."""
    lines = [f"{sha256_file(folder / rel)}  {rel}" for rel in _bundle_files(folder)]
    atomic_write_text(folder / MANIFEST, "\n".join(lines) + "\n")


def _bundle_files(folder: Path) -> list[str]:
    """Every file under `folder` except the manifest, as sorted '/'-separated paths."""
    files = [p.relative_to(folder).as_posix() for p in folder.rglob("*") if not p.is_dir()]
    return sorted(f for f in files if f != MANIFEST)


# ---------------------------------------------------------------------------------------------
# verify


def verify(bundle: str | os.PathLike) -> dict:
    """Check a bundle: allow-listed names, manifest digests, ε recomputed from the mechanisms.

    Returns a summary; raises :class:`DpsynthError` naming the first problem.
    """
    bundle = Path(bundle)
    manifest = bundle / MANIFEST
    if not manifest.is_file():
        raise DpsynthError(f"{bundle}: no {MANIFEST}; not a release bundle")
    listed = _read_manifest(manifest)
    present = _bundle_files(bundle)
    for rel in present:
        if not any(p.fullmatch(rel) for p in ALLOWED):
            raise DpsynthError(f"{bundle / rel}: not a file a release may hold")
    extra, missing = sorted(set(present) - set(listed)), sorted(set(listed) - set(present))
    if extra or missing:
        raise DpsynthError(f"{manifest}: files differ (not listed {extra}, missing {missing})")
    for rel, digest in listed.items():
        if sha256_file(bundle / rel) != digest:
            raise DpsynthError(f"{bundle / rel}: SHA-256 does not match {MANIFEST}")

    absent = [rel for rel in REQUIRED if rel not in listed]
    if absent or not any(VOLUME_NAME.fullmatch(rel.split("/")[-1]) for rel in listed):
        raise DpsynthError(f"{bundle}: incomplete bundle (no {absent or 'synthetic volume'})")

    privacy = read_json(bundle / PRIVACY_JSON)
    epsilon = recompute_epsilon(privacy, str(bundle / PRIVACY_JSON))
    stated = privacy["epsilon"]
    if not math.isclose(epsilon, stated, rel_tol=EPSILON_RTOL):
        raise DpsynthError(
            f"{bundle / PRIVACY_JSON}: states ε = {stated!r} but its mechanisms compose to "
            f"{epsilon!r} ({privacy['accountant']})"
        )
    if _headline(privacy) not in (bundle / PRIVACY_MD).read_text():
        raise DpsynthError(
            f"{bundle / PRIVACY_MD}: does not state ε = {format_bound(stated)}, rounded up "
            "(an older dpsynth rounded to nearest, at times below the bound: release it again)"
        )
    _verify_selection_words(bundle, privacy)
    provenance = read_json(bundle / SYNTHETIC_DIR / PROVENANCE_FILE)
    if provenance.get("model_digest") != model_digest(bundle / MODEL_DIR):
        raise DpsynthError(f"{bundle}: the synthetic set's model digest is not the bundle's model")
    if provenance.get("conditioning") not in RELEASABLE_CONDITIONING:
        raise DpsynthError(f"{bundle}: the synthetic set's conditioning is not releasable")
    if provenance.get("candidates", 1) != privacy.get("candidates", 1):  # 1: older bundles
        raise DpsynthError(
            f"{bundle}: privacy.json and the synthetic set's provenance disagree on how many "
            "candidates each volume was chosen from"
        )
    return {
        "epsilon": epsilon,
        "delta": privacy["delta"],
        "accountant": privacy["accountant"],
        "files": len(listed) + 1,
        "volumes": sum(1 for rel in listed if rel.endswith(".nii.gz")),
    }


def _read_manifest(path: Path) -> dict[str, str]:
    listed = {}
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        digest, sep, rel = line.partition("  ")
        if not sep or not re.fullmatch(r"[0-9a-f]{64}", digest) or rel in listed:
            raise DpsynthError(f"{path}: line {n} is not '<sha256>  <path>' (or repeats a path)")
        listed[rel] = digest
    return listed


def recompute_epsilon(privacy: dict, source: str = PRIVACY_JSON) -> float:
    """ε of privacy.json's mechanisms composed by the accountant it names, at its δ."""
    try:
        history = [
            Mechanism(m["noise_multiplier"], m["sample_rate"], m["steps"])
            for m in privacy["mechanisms"]
        ]
        if not isinstance(privacy["epsilon"], (int, float)):
            raise TypeError("epsilon is not a number")
        return epsilon_for(history, privacy["delta"], privacy["accountant"])
    except (KeyError, TypeError) as e:
        raise DpsynthError(f"{source}: malformed ({type(e).__name__}: {e})") from None


# ---------------------------------------------------------------------------------------------
# documents


def _headline(privacy: dict) -> str:
    return f"(ε = {format_bound(privacy['epsilon'])}, δ = {privacy['delta']:g})"


ACCOUNTANT_WORDS = {
    "prv": (
        "the PRV accountant (Gopi, Lee and Wutschitz, 2021, as implemented in Opacus), read "
        f"as its upper bound: the stated ε includes its numerical error of {PRV_EPS_ERROR}"
    ),
    "rdp": "the Rényi-DP accountant (Mironov 2017, as implemented in Opacus), a valid upper bound",
}


def privacy_markdown(privacy: dict) -> str:
    """PRIVACY.md: the guarantee, its mechanisms and its limits, for a reader who is no expert."""
    eps, delta = privacy["epsilon"], privacy["delta"]
    rows = [
        f"| {m['stage']} | {m['mechanism']} | {m['noise_multiplier']:.6g} | "
        f"{m['sample_rate']:.6g} | {m['steps']} | {m['delta']:g} | {m['note']} |"
        for m in privacy["mechanisms"]
    ]
    budget = "; ".join(f"{b['source']}: {b['limit']:g}" for b in privacy["budget"])
    uses = privacy["evaluation_uses"]
    uses_text = (
        "".join(f"\n  - `{u['stage']}`: {u['note']}" for u in uses)
        if uses
        else " none were recorded."
    )
    source = CONDITIONING[privacy["conditioning"]]
    return f"""# Privacy of this release

**Guarantee: {_headline(privacy)}-differential privacy per patient.**

## What is protected

The unit of privacy is **one patient** of the private training set: all of that
patient's volumes (end-diastole and end-systole) and attributes together form one record.
For any one patient, everything in this folder (the model weights, the synthetic volumes
and their attributes) is almost equally likely to have come out whether or not that
patient was in the data: the probability of any outcome changes by at most a factor
e^ε = {format_bound(math.exp(min(eps, 700)))}, except with probability δ = {delta:g}.

## How

Every computation on the private data that can reach this folder is a differentially
private mechanism, and all of them are composed into the one ε above by
{ACCOUNTANT_WORDS.get(privacy["accountant"], privacy["accountant"])}.

| stage | mechanism | noise multiplier σ | sample rate q | steps | δ | details |
|---|---|---|---|---|---|---|
{chr(10).join(rows)}

"dp-sgd" is patient-level DP-SGD: each step samples patients independently with
probability q, clips each patient's gradient to a fixed norm and adds Gaussian noise of
standard deviation σ times that norm. "gaussian" is a one-shot Gaussian mechanism on
the whole private set (q = 1), e.g. the DP model of the attribute table. The synthetic
data are produced from the model afterwards, which costs no further privacy.
`dpsynth verify` recomputes ε from this table (`privacy.json`).

Budget checked before release: {budget}.

Conditions of the synthetic volumes (`synthetic/attributes.csv`): {source}.

## What is not covered

- Uses of the private data without differential privacy whose results are **not** in
  this folder (they stay with the data steward):{uses_text}
  Evaluation of the model on private data (fidelity, controllability, membership
  inference) is likewise not part of this release and not covered by ε.
- The sample rates and step counts above were set from the number of training patients,
  which they therefore reveal; as usual for DP-SGD that number is treated as public.
- Public data used for pre-training is not protected (it is public).{_selection_caveat(privacy)}
- Differential privacy limits what anyone can learn about one patient; it does not hide
  facts about the population that the data were meant to show.
- The guarantee assumes the noise and the patient sampling were secret: the training
  checkpoints (which hold the sampling seed) must never be released, and are not here.
- It covers only what the ledger of this run recorded; uses of the same patients outside
  dpsynth are not counted.
- Other models or data released from the same patients add to it: guarantees compose.
  The data steward states the joint ε of runs released together with
  `dpsynth budget RUN OTHER_RUN`.
"""


def _selection_caveat(privacy: dict) -> str:
    """PRIVACY.md's "not covered" item for best-of-k sampling (none for plain draws)."""
    k = privacy.get("candidates", 1)
    if k == 1:
        return ""
    return (
        f"\n- Each synthetic volume is the best of {k} candidates, chosen by a segmenter that the "
        "data steward declared trained on public data only. If it learned from private "
        f"patients, its choices are not covered by ε; {_selector_checked_words(privacy)}."
    )


def _verify_selection_words(bundle: Path, privacy: dict) -> None:
    """PRIVACY.md and the model card state the choice as privacy.json records it, and
    `selector_patients_checked` is a boolean, given only for a choice (bundles from before
    the check have none: they say only the cache id was checked)."""
    if "selector_patients_checked" in privacy and (
        privacy.get("candidates", 1) == 1
        or not isinstance(privacy["selector_patients_checked"], bool)
    ):
        raise DpsynthError(
            f"{bundle / PRIVACY_JSON}: selector_patients_checked must be a boolean, given only "
            "when candidates is above 1"
        )
    for name, words in ((PRIVACY_MD, _selection_caveat), (MODEL_CARD, _selection_sentence)):
        if words(privacy) not in (bundle / name).read_text():
            raise DpsynthError(
                f"{bundle / name}: does not say how its volumes were chosen as privacy.json does"
            )


def _selector_checked_words(privacy: dict) -> str:
    if privacy.get("selector_patients_checked"):
        return (
            "dpsynth checked that the cache it names is not one this run's ledger names, and, "
            "when sampling (as `dpsynth sample` recorded it), that none of the patients its "
            "folder lists as its training data is in a private cache this run's ledger names "
            "(by byte-identical prepared volumes: the same patients prepared otherwise would "
            "not be seen)"
        )
    return "dpsynth checked only that the cache it names is not one this run's ledger names"


def model_card(model: dict, privacy: dict, provenance: dict) -> str:
    """MODEL_CARD.md: what the released model is and how to use it."""
    ae, den, diff = model["autoencoder"], model["denoiser"], model["diffusion"]
    n = sum(1 for name in provenance["files"] if VOLUME_NAME.fullmatch(name))
    s, h, w = model["shape"]
    dz, dy, dx = model["spacing"]
    attention = [i + 1 for i, on in enumerate(den["attention_levels"]) if on]
    return f"""# Model card

**Conditional latent diffusion model of 3D short-axis cardiac MRI, trained with
differential privacy {_headline(privacy)} per patient (see PRIVACY.md).**

## Model

- Output: volumes of {s} slices × {h} × {w} pixels (base to apex), voxel
  {dx:g} × {dy:g} × {dz:g} mm, intensities in [0, 1]; one cardiac phase per volume.
- Conditions: the 14 attributes {", ".join(ATTRIBUTES)}; an empty value means unknown.
- Autoencoder: {ae["kind"].upper()}, {ae["channels"]} channels, multipliers
  {_listed(ae["channel_multipliers"])}; latent scale {model["latent_scale"]:.6g}
  (where the autoencoder's run took it from: {model["latent_scale_source"]}).
- Denoiser: UNet, {den["channels"]} channels, multipliers {_listed(den["channel_multipliers"])},
  attention at level(s) {_listed(attention) or "none"} (in-plane, across slices, and
  cross-attention to the attributes).
- Diffusion: DDPM, T = {diff["timesteps"]}, {diff["schedule"]} β from {diff["beta_start"]:g}
  to {diff["beta_end"]:g}, ε-prediction.
- Trained with dpsynth; every stage that learned from private data is listed in PRIVACY.md.

## Use

```bash
dpsynth sample model --n 16 --set LVEDV=150 --set ESED=1 --out my_samples
dpsynth sample model --n 16 --attributes my_conditions.csv --out my_samples
```

`synthetic/` holds {n} volumes sampled by the data steward (sampler
{provenance.get("sampler")}, {provenance.get("steps")} steps, guidance
{provenance.get("guidance")}, temperature {provenance.get("temperature")}); their
conditions: {CONDITIONING[provenance["conditioning"]]}.{_selection_sentence(privacy)}

## Limits

- Synthetic images are not real patients: do not use them for diagnosis, and check any
  finding on real data.
- The model was evaluated by the data steward on private data; those results are
  evaluation outputs and are not included.
- Attribute values outside the ranges in `model/model.json` (`attribute_ranges`) ask the
  model to extrapolate.
- The sampling settings (sampler, steps, guidance, temperature, best of k) are
  post-processing of the model and do not change ε, but settings chosen by looking at
  results on private data are not covered by ε. dpsynth's `demo` preset chose them on
  simulated patients; `paper` keeps the study's guidance and starting noise, with DDIM at
  25 steps chosen on public data.
"""


def _selection_sentence(privacy: dict) -> str:
    """The model card's words on best-of-k sampling (none for plain draws)."""
    k = privacy.get("candidates", 1)
    if k == 1:
        return ""
    return (
        f"\nEach is the best of {k} candidates: the one a segmenter judged nearest the "
        "requested cardiac measurements. The data steward declared that "
        f"segmenter trained on public data only ({_selector_checked_words(privacy)}); "
        "the choice is then post-processing and does not "
        "change ε (PRIVACY.md). Volumes sampled from `model/` are plain draws unless "
        "`dpsynth sample` is given `--candidates` and a `--selector` of your own."
    )


def _listed(values: list) -> str:
    return ", ".join(str(v) for v in values)


def describe(summary: dict) -> str:
    """One line for the CLI."""
    return (
        f"ok: {summary['files']} files match SHA256SUMS ({summary['volumes']} volumes); "
        f"ε = {format_bound(summary['epsilon'])} at δ = {summary['delta']:g} ({summary['accountant']})"
    )
