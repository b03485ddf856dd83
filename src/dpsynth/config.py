"""One validated configuration schema for every stage, loaded from YAML presets and files.

Validation happens up front: an unknown key, a wrong type or an impossible value is a
one-line :class:`DpsynthError` naming the key (``config: ldm_training.lr: ...``).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import reprlib
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml

from dpsynth.errors import DpsynthError

# The reference study's settings (BRIEF section 2): every default elsewhere reads these.
DEFAULT_SHAPE: tuple[int, int, int] = (13, 96, 96)  # (slices, H, W)
DEFAULT_SPACING: tuple[float, float, float] = (10.0, 1.8269, 1.8269)  # (dz, dy, dx) mm
DEFAULT_TIMESTEPS = 150  # DDPM T
DEFAULT_BETA_START, DEFAULT_BETA_END = 1e-4, 7e-2  # linear β schedule
DEFAULT_DELTA = 1e-5  # δ of every DP mechanism unless the user sets one
DEFAULT_ACCOUNTANT = "prv"


@dataclass
class DataConfig:
    shape: tuple[int, int, int] = DEFAULT_SHAPE
    spacing: tuple[float, float, float] = DEFAULT_SPACING


@dataclass
class AutoencoderConfig:
    kind: Literal["kl", "vq"] = "kl"
    channels: int = 64
    channel_multipliers: tuple[int, ...] = (1, 2, 2)
    num_res_blocks: int = 2
    latent_channels: int = 1
    norm_groups: int = 16
    codebook_size: int = 4000
    code_dim: int = 4
    reconstruction_loss: Literal["l1", "l2"] = "l2"
    reconstruction_weight: float = 1.0  # the study: L2 x 1000
    kl_weight: float = 1e-6
    # Capacity-annealed KL (Burgess et al. 2018; the study's KLDLoss): with a capacity C_max
    # the KL term is kl_weight * |KL - C(step)|, KL per latent position (summed over channels,
    # averaged over positions), C rising linearly from 0 to C_max over kl_capacity_steps.
    # None: the plain kl_weight * KL summed over the latent.
    kl_capacity: float | None = None
    kl_capacity_steps: int = 100_000
    commitment_weight: float = 0.25
    adversarial_weight: float = 0.01
    adversarial_start: int = 1000
    adversarial_loss: Literal["hinge", "lsgan", "bce"] = "hinge"
    discriminator_channels: int = 32
    discriminator_lr: float | None = None  # None: the autoencoder's lr
    perceptual_weights: str | None = None
    perceptual_weight: float = 0.1


@dataclass
class DenoiserConfig:
    channels: int = 128
    channel_multipliers: tuple[int, ...] = (1, 2, 3)
    attention_levels: tuple[bool, ...] = (False, True, True)
    num_res_blocks: int = 2
    num_heads: int = 4
    time_embed_dim: int = 128
    attribute_embed_dim: int = 16
    dropout: float = 0.1
    norm_groups: int = 16


@dataclass
class DiffusionConfig:
    timesteps: int = DEFAULT_TIMESTEPS
    beta_start: float = DEFAULT_BETA_START
    beta_end: float = DEFAULT_BETA_END
    schedule: Literal["linear_beta", "scaled_linear_beta"] = "linear_beta"
    condition_dropout: float = 0.1


@dataclass
class TrainingConfig:
    steps: int = 1000
    # When set, the stage runs this many passes over its training volumes instead of
    # `steps` (ceil(epochs x volumes / (batch_size x grad_accumulation)) steps).
    epochs: float | None = None
    batch_size: int = 8
    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup_steps: int = 100
    # Step decay (the study's LDM: x0.9 every 25 epochs): lr x lr_decay_factor after each
    # lr_decay_epochs epochs. None: constant after the warm-up.
    lr_decay_epochs: float | None = None
    lr_decay_factor: float = 0.9
    grad_accumulation: int = 1
    ema_decay: float = 0.999
    checkpoint_every: int = 500
    sample_every: int = 500
    log_every: int = 10
    seed: int = 0
    finetune: Literal["all", "attention"] = "all"
    bf16: bool = True


@dataclass
class PrivacyConfig:
    epsilon: float | None = None
    noise_multiplier: float | None = None
    delta: float = DEFAULT_DELTA
    max_grad_norm: float = 1.0
    epochs: float = 150.0
    batch_size: int = 256
    physical_batch_size: int = 8
    accountant: Literal["prv", "rdp"] = DEFAULT_ACCOUNTANT
    max_total_epsilon: float | None = None
    lr: float = 1e-5
    warmup_steps: int = 0
    lr_decay_epochs: float | None = None  # as TrainingConfig; an epoch = 1 / sampling rate
    lr_decay_factor: float = 0.9
    latent_scale_epsilon: float = 1.0  # a DP autoencoder with no public --init run


@dataclass
class SamplingConfig:
    sampler: Literal["ddpm", "ddim", "dpm++"] = "ddim"
    steps: int = 25
    guidance: float = 1.0
    # The starting noise's standard deviation; below 1 trades diversity for control
    # (BENCHMARKS.md, "Sampling temperature"). 1 is the study's sampler.
    temperature: float = 1.0


# `make demo`'s best-of-k (and the sweep's, and the explorer's with a selector): on three DP
# models LVESV r +0.09-0.37 over plain draws, +0.02-0.07 over best of 3 (BENCHMARKS.md).
DEMO_CANDIDATES = 4


@dataclass(frozen=True)
class ExploreDefaults:
    """`dpsynth explore`: where it listens and what the page starts with.

    dpm++ at 10 steps matches DDIM-25's quality on the demo model at 0.4x the model calls
    (BENCHMARKS.md, Samplers); the page aims at one volume in 2 s on 2 CPU cores.
    """

    host: str = "127.0.0.1"  # loopback only: the model is not shared with the network by default
    port: int = 8765
    sampler: Literal["ddim", "dpm++"] = "dpm++"
    steps: int = 10
    max_steps: int = 50  # the page's slider end; more steps would hold the single worker long
    max_guidance: float = 8.0
    max_pending: int = 8  # queued generations before the server answers 503
    kept_volumes: int = 32  # generated volumes kept in memory for download
    # With --selector: the best of DEMO_CANDIDATES, as `make demo` samples: 1.9 s a volume
    # against 0.7 s plain on 2 cores at 13x96x96 (the choice is made part-way; BENCHMARKS.md,
    # Explorer).
    candidates: int = DEMO_CANDIDATES
    max_candidates: int = 8


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    autoencoder: AutoencoderConfig = field(default_factory=AutoencoderConfig)
    autoencoder_training: TrainingConfig = field(default_factory=TrainingConfig)
    denoiser: DenoiserConfig = field(default_factory=DenoiserConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    ldm_training: TrainingConfig = field(default_factory=TrainingConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)

    def to_dict(self) -> dict[str, Any]:
        return _to_plain(dataclasses.asdict(self))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


PRESETS = ("demo", "paper")


def load_config(
    preset: str | None = None,
    path: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
) -> Config:
    """Build a validated config: defaults < preset < YAML file < `overrides` (dotted keys)."""
    merged: dict[str, Any] = {}
    if preset is not None:
        if preset not in PRESETS:
            raise DpsynthError(
                f"--preset: unknown preset '{preset}' (choose from {', '.join(PRESETS)})"
            )
        text = resources.files("dpsynth.presets").joinpath(f"{preset}.yaml").read_text()
        _deep_update(merged, yaml.safe_load(text) or {})
    if path is not None:
        _deep_update(merged, _read_yaml(Path(path)))
    for dotted, value in (overrides or {}).items():
        node = merged
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    config = _build(Config, merged, "")
    _check_consistency(config)
    return config


def config_from_dict(data: dict[str, Any]) -> Config:
    """Validate a plain dict (e.g. a run's saved config.yaml)."""
    config = _build(Config, data, "")
    _check_consistency(config)
    return config


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise DpsynthError(f"{path}: config file not found") from None
    except yaml.YAMLError as e:
        raise DpsynthError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise DpsynthError(f"{path}: the config must be a mapping of sections")
    return data


def _deep_update(base: dict[str, Any], new: dict[str, Any]) -> None:
    for key, value in new.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _deep_update(base[key], value)
        else:
            base[key] = value


# Keys that configs and model.json files of earlier runs carry but nothing reads any more:
# accepted and dropped, so those runs still load. (`sampling.batch_size` was never read:
# the sampler's batch is fixed because it is part of what a seed means, `SAMPLE_BATCH`.)
RETIRED_KEYS = frozenset({"sampling.batch_size"})


def _build(cls: type, data: Any, prefix: str) -> Any:
    where = prefix.rstrip(".") or "config"
    if not isinstance(data, dict):
        raise DpsynthError(f"config: {where}: expected a mapping, got {_show(data)}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names and f"{prefix}{key}" not in RETIRED_KEYS:
            raise DpsynthError(f"config: unknown key '{prefix}{key}'")
    values = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        key = f"{prefix}{f.name}"
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            values[f.name] = _build(hint, data[f.name], key + ".")
        else:
            values[f.name] = _coerce(data[f.name], hint, key)
    return cls(**values)


def _coerce(value: Any, hint: Any, key: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key)
    if origin is Literal:
        if value not in args:
            choices = ", ".join(str(a) for a in args)
            raise DpsynthError(f"config: {key}: {_show(value)} is not one of {choices}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise DpsynthError(f"config: {key}: expected a list, got {_show(value)}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise DpsynthError(f"config: {key}: expected {len(args)} values, got {len(value)}")
        return tuple(
            _coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True))
        )
    if hint is bool:
        if not isinstance(value, bool):
            raise DpsynthError(f"config: {key}: expected true or false, got {_show(value)}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise DpsynthError(f"config: {key}: expected an integer, got {_show(value)}")
        return value
    if hint is float:
        if isinstance(value, str):  # YAML 1.1 reads `1e-4` (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                raise DpsynthError(
                    f"config: {key}: expected a number, got {_show(value)}"
                ) from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise DpsynthError(f"config: {key}: expected a number, got {_show(value)}")
        try:
            value = float(value)
        except OverflowError:  # an integer beyond any float
            raise DpsynthError(f"config: {key}: {_show(value)} is out of range") from None
        if math.isnan(value):  # inf is allowed: privacy.epsilon: inf means no DP
            raise DpsynthError(f"config: {key}: NaN is not allowed")
        return value
    if hint is str:
        if not isinstance(value, str):
            raise DpsynthError(f"config: {key}: expected a string, got {_show(value)}")
        return value
    raise TypeError(f"unsupported config type {hint} for {key}")  # a schema bug, not user input


def _show(value: Any) -> str:
    return f"{type(value).__name__} {reprlib.repr(value)}"  # cut short: errors stay one line


def _check_consistency(c: Config) -> None:
    """Reject values that are well-typed but impossible."""

    def need(ok: bool, key: str, problem: str) -> None:
        if not ok:
            raise DpsynthError(f"config: {key}: {problem}")

    s, h, w = c.data.shape
    need(min(s, h, w) >= 1, "data.shape", "every dimension must be >= 1")
    need(all(0 < x < math.inf for x in c.data.spacing), "data.spacing", "must be finite and > 0")
    ae = c.autoencoder
    need(len(ae.channel_multipliers) >= 1, "autoencoder.channel_multipliers", "needs >= 1 level")
    factor = 2 ** (len(ae.channel_multipliers) - 1)
    need(
        h % factor == 0 and w % factor == 0,
        "data.shape",
        f"in-plane size {h}x{w} is not divisible by the autoencoder down-sampling {factor}",
    )
    for key, v in (("channels", ae.channels), ("latent_channels", ae.latent_channels)):
        need(v >= 1, f"autoencoder.{key}", "must be >= 1")
    need(ae.norm_groups >= 1, "autoencoder.norm_groups", "must be >= 1")
    need(ae.channels % ae.norm_groups == 0, "autoencoder.norm_groups", "must divide channels")
    if ae.kind == "vq":
        need(
            ae.latent_channels <= ae.code_dim, "autoencoder.latent_channels", "must be <= code_dim"
        )
    need(ae.reconstruction_weight > 0, "autoencoder.reconstruction_weight", "must be > 0")
    if ae.kl_capacity is not None:
        need(ae.kl_capacity >= 0, "autoencoder.kl_capacity", "must be >= 0")
    need(ae.kl_capacity_steps >= 1, "autoencoder.kl_capacity_steps", "must be >= 1")
    if ae.discriminator_lr is not None:
        need(ae.discriminator_lr > 0, "autoencoder.discriminator_lr", "must be > 0")
    dn = c.denoiser
    need(
        len(dn.attention_levels) == len(dn.channel_multipliers),
        "denoiser.attention_levels",
        "needs one entry per channel multiplier",
    )
    dfactor = 2 ** (len(dn.channel_multipliers) - 1)
    lh, lw = h // factor, w // factor
    need(
        lh % dfactor == 0 and lw % dfactor == 0,
        "denoiser.channel_multipliers",
        f"latent size {lh}x{lw} is not divisible by the denoiser down-sampling {dfactor}",
    )
    for key, v in (("norm_groups", dn.norm_groups), ("num_heads", dn.num_heads)):
        need(v >= 1, f"denoiser.{key}", "must be >= 1")
    need(dn.channels % dn.norm_groups == 0, "denoiser.norm_groups", "must divide channels")
    need(dn.channels % dn.num_heads == 0, "denoiser.num_heads", "must divide channels")
    need(0.0 <= dn.dropout < 1.0, "denoiser.dropout", "must be in [0, 1)")
    df = c.diffusion
    need(df.timesteps >= 2, "diffusion.timesteps", "must be >= 2")
    need(
        0 < df.beta_start < df.beta_end < 1,
        "diffusion.beta_end",
        "need 0 < beta_start < beta_end < 1",
    )
    need(0.0 <= df.condition_dropout < 1.0, "diffusion.condition_dropout", "must be in [0, 1)")
    for name in ("autoencoder_training", "ldm_training"):
        t: TrainingConfig = getattr(c, name)
        need(t.steps >= 1, f"{name}.steps", "must be >= 1")
        need(t.batch_size >= 1, f"{name}.batch_size", "must be >= 1")
        need(t.lr > 0, f"{name}.lr", "must be > 0")
        if t.epochs is not None:
            need(t.epochs > 0, f"{name}.epochs", "must be > 0")
        _check_decay(need, name, t)
        need(t.grad_accumulation >= 1, f"{name}.grad_accumulation", "must be >= 1")
        need(0.0 <= t.ema_decay < 1.0, f"{name}.ema_decay", "must be in [0, 1)")
        for k in ("checkpoint_every", "sample_every", "log_every"):
            need(getattr(t, k) >= 1, f"{name}.{k}", "must be >= 1")
    p = c.privacy
    if p.epsilon is not None:
        need(p.epsilon > 0, "privacy.epsilon", "must be > 0")
    if p.noise_multiplier is not None:
        need(p.noise_multiplier > 0, "privacy.noise_multiplier", "must be > 0")
    need(0 < p.delta < 1, "privacy.delta", "must be in (0, 1)")
    need(p.max_grad_norm > 0, "privacy.max_grad_norm", "must be > 0")
    need(p.epochs > 0, "privacy.epochs", "must be > 0")
    need(p.batch_size >= 1, "privacy.batch_size", "must be >= 1")
    need(p.physical_batch_size >= 1, "privacy.physical_batch_size", "must be >= 1")
    need(p.lr > 0, "privacy.lr", "must be > 0")
    need(p.warmup_steps >= 0, "privacy.warmup_steps", "must be >= 0")
    _check_decay(need, "privacy", p)
    need(p.latent_scale_epsilon > 0, "privacy.latent_scale_epsilon", "must be > 0")
    if p.max_total_epsilon is not None:
        need(p.max_total_epsilon > 0, "privacy.max_total_epsilon", "must be > 0")
    sm = c.sampling
    need(sm.steps >= 1, "sampling.steps", "must be >= 1")
    need(
        sm.steps <= df.timesteps,
        "sampling.steps",
        f"must be <= diffusion.timesteps ({df.timesteps})",
    )
    try:
        check_sampling(sm.guidance, sm.temperature)
    except DpsynthError as e:
        raise DpsynthError(f"config: sampling.{e}") from None


def check_sampling(guidance: float | None = None, temperature: float | None = None) -> None:
    """The bounds every sampling obeys, from the config's `sampling` section or a `sample`
    call's arguments (one-line DpsynthError naming the value); None is not checked."""
    if guidance is not None and (not _is_real(guidance) or not 0 <= guidance < math.inf):
        raise DpsynthError(f"guidance: must be finite and >= 0, got {reprlib.repr(guidance)}")
    if temperature is not None and (not _is_real(temperature) or not 0 < temperature <= 1):
        raise DpsynthError(f"temperature: must be in (0, 1], got {reprlib.repr(temperature)}")


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_seed(seed: int) -> None:
    """A sampling seed: an unsigned 64-bit integer, what provenance files record and a
    release copies."""
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed < 2**64:
        raise DpsynthError(f"seed: expected an integer in [0, 2**64), got {reprlib.repr(seed)}")


MAX_CANDIDATES = 16  # best-of-k runs k trajectories 40 % of the way; more would rarely pay


def check_candidates(candidates: int) -> None:
    """How many candidates best-of-k sampling draws per volume: an integer in [1, 16]."""
    if (
        isinstance(candidates, bool)
        or not isinstance(candidates, numbers.Integral)
        or not 1 <= candidates <= MAX_CANDIDATES
    ):
        raise DpsynthError(
            f"candidates: expected an integer in [1, {MAX_CANDIDATES}], "
            f"got {reprlib.repr(candidates)}"
        )


def _check_decay(need, name: str, section: TrainingConfig | PrivacyConfig) -> None:
    if section.lr_decay_epochs is not None:
        need(section.lr_decay_epochs > 0, f"{name}.lr_decay_epochs", "must be > 0")
    need(0 < section.lr_decay_factor <= 1, f"{name}.lr_decay_factor", "must be in (0, 1]")


def _to_plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_to_plain(v) for v in obj]
    return obj


# -- a run's config.yaml (written by a training stage once its checks pass)
RUN_CONFIG_FILE = "config.yaml"


def read_run_config(run: str | Path) -> Config | None:
    """The config a run was trained with (its config.yaml, validated), or None without one."""
    path = Path(run) / RUN_CONFIG_FILE
    return load_config(path=path) if path.exists() else None


def stage_config(
    out: str | Path,
    resume: bool = False,
    preset: str | None = None,
    path: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
) -> Config:
    """The config of a training stage writing `out`: preset < file < `overrides`.

    A resume given neither a preset nor a file continues with the config the run saved
    (its `overrides` still apply); otherwise the preset defaults to "demo".
    """
    if resume and preset is None and path is None:
        saved = Path(out) / RUN_CONFIG_FILE
        if saved.exists():
            return load_config(path=saved, overrides=overrides)
    return load_config(preset=preset or "demo", path=path, overrides=overrides)
