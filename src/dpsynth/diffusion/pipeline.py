"""The latent diffusion pipeline: encode, the training loss, and guided sampling."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from dpsynth.attributes import N_ATTRIBUTES, normalize
from dpsynth.config import (
    DEFAULT_BETA_END,
    DEFAULT_BETA_START,
    DEFAULT_SHAPE,
    DEFAULT_SPACING,
    DEFAULT_TIMESTEPS,
    check_candidates,
    check_sampling,
    check_seed,
)
from dpsynth.data.cache import Cache, load_volumes
from dpsynth.data.intensity import normalise_each
from dpsynth.diffusion.schedulers import SamplerName, add_noise, keep_rows, make_scheduler
from dpsynth.errors import DpsynthError
from dpsynth.models.blocks import single_as_pair

__all__ = [
    "CHOICE_FRACTION",
    "SAMPLE_BATCH",
    "Chooser",
    "DenoisingObjective",
    "LatentDiffusion",
    "batch_seed",
    "candidate_seed",
    "choice_step_of",
    "encode_scaled",
    "encode_split",
    "estimate_latent_scale",
    "shard",
]

SAMPLE_BATCH = 16  # volumes per denoiser call when sampling; part of what a seed means
# Best-of-k chooses among the candidates after this fraction of the sampling steps, from
# their predicted clean volumes: on the demo's DP model, choosing (best of 3, by the LV and
# RV volumes) after 4 of 10 DDIM steps kept the final reading's choice for 90 % of 120
# volumes and scored as well (BENCHMARKS.md, "Choosing early"), and only the kept
# trajectory runs the remaining steps.
CHOICE_FRACTION = 0.4
# (predicted clean volumes (k, b, S, H, W) in [0, 1], the batch's raw attributes (b, 14))
# -> the candidate to keep for each of the b volumes, shape (b,).
Chooser = Callable[[np.ndarray, np.ndarray], np.ndarray]


def batch_seed(seed: int, batch_index: int) -> int:
    """The noise seed of one sampling batch: a pure function of (seed, batch index), so any
    process can draw any batch of a cohort and get the volumes one process would."""
    return int(np.random.SeedSequence([seed, batch_index]).generate_state(1, np.uint64)[0] >> 1)


def candidate_seed(seed: int, candidate: int) -> int:
    """The sampling seed of best-of-k candidate `candidate` (0 keeps `seed`, so one candidate
    is plain sampling); the others are NumPy's independent child streams of `seed`."""
    if candidate == 0:
        return seed
    state = np.random.SeedSequence(seed, spawn_key=(candidate,)).generate_state(1, np.uint64)
    return int(state[0] >> 1)


def choice_step_of(steps: int) -> int:
    """The step (1..steps) after which best-of-k chooses: `CHOICE_FRACTION` of them, rounded
    up (rounded to 9 decimals first, so a fraction's float error cannot add a step)."""
    return max(1, math.ceil(round(CHOICE_FRACTION * steps, 9)))


def shard(n: int, rank: int, world_size: int, batch_size: int = SAMPLE_BATCH) -> slice:
    """Rank `rank`'s contiguous, batch-aligned share of volumes 0..n-1 (may be empty).

    Whole batches are split between ranks so each rank's volumes equal the single-process
    ones: a batch's noise comes from `batch_seed` and the batch's composition is the same.
    """
    if not 0 <= rank < world_size:
        raise DpsynthError(f"shard: rank {rank} is not in 0..{world_size - 1}")
    batches = -(-n // batch_size)
    lo, hi = rank * batches // world_size, (rank + 1) * batches // world_size
    return slice(min(lo * batch_size, n), min(hi * batch_size, n))


def encode_scaled(autoencoder: nn.Module, volumes: torch.Tensor, scale: float) -> torch.Tensor:
    """Volumes (B, 1, S, H, W) to the denoiser's latents: the one place latents are scaled."""
    # contiguous: a channels-last autoencoder (`runs.load_autoencoder`) hands back
    # channels-last latents; the denoiser and DP-SGD's taps get the default layout.
    return (autoencoder.encode_latent(volumes) * scale).contiguous()


@torch.no_grad()
def encode_split(
    autoencoder, cache: Cache, rows: np.ndarray, scale: float, batch: int = 16
) -> Tensor:
    """Scaled latents of a cache's `rows`, encoded `batch` volumes at a time (on the CPU)."""
    device = next(autoencoder.parameters()).device
    out = [
        encode_scaled(
            autoencoder, load_volumes(cache.images, rows[i : i + batch]).to(device), scale
        )
        for i in range(0, len(rows), batch)
    ]
    return torch.cat([z.cpu() for z in out])


class DenoisingObjective:
    """ε-prediction MSE on noisy latents; the random draws happen outside the model call.

    Drawing timesteps, noise and condition dropout outside keeps the per-patient function
    deterministic, which `torch.func.vmap` under DP needs.
    """

    def __init__(self, scheduler, condition_dropout: float) -> None:
        self.scheduler = scheduler
        self.condition_dropout = condition_dropout

    def draw(self, latents: Tensor, attributes: np.ndarray, generator: torch.Generator) -> dict:
        """Noisy inputs and targets for a batch of latents (any leading batch shape)."""
        lead = latents.shape[: latents.dim() - 4]
        flat = latents.reshape(-1, *latents.shape[-4:])
        n = flat.shape[0]
        t = torch.randint(0, self.scheduler.num_train_timesteps, (n,), generator=generator)
        noise = torch.randn(flat.shape, generator=generator)
        noisy = add_noise(self.scheduler, flat, noise, t)  # shared with LatentDiffusion's loss
        attrs = torch.from_numpy(normalize(attributes)).reshape(n, N_ATTRIBUTES)
        drop_all = torch.rand(n, 1, generator=generator) < self.condition_dropout
        drop_one = torch.rand(attrs.shape, generator=generator) < self.condition_dropout
        attrs = torch.where(drop_all | drop_one, torch.full_like(attrs, float("nan")), attrs)
        batch = {"noisy": noisy, "timesteps": t, "attributes": attrs, "noise": noise}
        return {k: v.reshape(*lead, *v.shape[1:]) for k, v in batch.items()}

    @staticmethod
    def per_volume_loss(model_fn, batch: dict) -> Tensor:
        pred = model_fn(batch["noisy"], batch["timesteps"], batch["attributes"])
        return (pred.float() - batch["noise"]).pow(2).flatten(1).mean(1)

    @classmethod
    def patient_loss(cls, model_fn, record: dict) -> Tensor:
        """One DP record's loss: the SUM over that patient's volumes (clipped as one)."""
        return cls.per_volume_loss(model_fn, record).sum()


class LatentDiffusion(nn.Module):
    """A frozen autoencoder, an ε-prediction denoiser and the DDPM noise schedule.

    ``forward`` is :meth:`denoising_loss`, so a DP engine can run
    ``torch.func.functional_call(pipe, {"denoiser.<name>": ...}, (latents, attributes, t, noise))``.
    """

    def __init__(
        self,
        autoencoder: nn.Module,
        denoiser: nn.Module,
        latent_scale: float = 1.0,
        volume_shape: Sequence[int] = DEFAULT_SHAPE,
        spacing: Sequence[float] = DEFAULT_SPACING,
        num_train_timesteps: int = DEFAULT_TIMESTEPS,
        beta_start: float = DEFAULT_BETA_START,
        beta_end: float = DEFAULT_BETA_END,
        schedule: str = "linear_beta",
    ) -> None:
        super().__init__()
        self.autoencoder = autoencoder
        self.denoiser = denoiser
        self.latent_scale = float(latent_scale)
        self.volume_shape = tuple(int(s) for s in volume_shape)
        self.spacing = tuple(float(s) for s in spacing)
        self.schedule_config = dict(
            num_train_timesteps=num_train_timesteps,
            beta_start=beta_start,
            beta_end=beta_end,
            schedule=schedule,
        )
        self.noise_schedule = make_scheduler("ddpm", **self.schedule_config)
        # normalize() is affine per attribute: recover it as scale/offset so it runs in torch
        # (on device, under vmap) while dpsynth.attributes stays the single definition.
        offset = normalize(np.zeros(N_ATTRIBUTES))
        self.register_buffer("attribute_offset", torch.from_numpy(offset), persistent=False)
        self.register_buffer(
            "attribute_scale",
            torch.from_numpy(normalize(np.ones(N_ATTRIBUTES)) - offset),
            persistent=False,
        )

    @property
    def num_train_timesteps(self) -> int:
        return self.schedule_config["num_train_timesteps"]

    @property
    def latent_shape(self) -> tuple[int, int, int, int]:
        """(C, S, h, w) of one latent."""
        s, h, w = self.volume_shape
        f = self.autoencoder.downsample_factor
        return (self.autoencoder.latent_channels, s, h // f, w // f)

    def normalize_attributes(self, attributes_raw: torch.Tensor) -> torch.Tensor:
        """Raw attributes (..., 14) to the model's [-1, 1] scale; NaN stays NaN."""
        return attributes_raw * self.attribute_scale + self.attribute_offset

    @torch.no_grad()
    def encode(self, volumes: torch.Tensor) -> torch.Tensor:
        """Volumes (B, 1, S, H, W) to scaled latents (the autoencoder is frozen here)."""
        return encode_scaled(self.autoencoder, volumes, self.latent_scale)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents to volumes (B, 1, S, H, W), not clipped."""
        return single_as_pair(self.autoencoder.decode_latent, latents / self.latent_scale)

    def decode_volumes(self, latents: torch.Tensor) -> np.ndarray:
        """Scaled latents to volumes (B, S, H, W) on the prepared data's intensity
        convention (`dpsynth.data.intensity`), as the sampler returns them."""
        volumes = self.decode(latents)[:, 0].float().cpu().numpy()
        if not np.isfinite(volumes).all():  # one NaN would turn its whole volume to NaN
            raise DpsynthError("sample: the autoencoder decoded non-finite values")
        return normalise_each(volumes)

    def denoising_loss(
        self,
        latents: torch.Tensor,
        attributes_raw: torch.Tensor,
        timesteps: torch.Tensor,
        noise: torch.Tensor,
    ) -> torch.Tensor:
        """Per-sample ε-prediction MSE, shape (B,). NaN attributes condition on "unknown"."""
        if attributes_raw.shape[-1] != N_ATTRIBUTES:
            raise DpsynthError(
                f"attributes: expected {N_ATTRIBUTES} values per sample, got {attributes_raw.shape[-1]}"
            )
        batch = {
            "noisy": add_noise(self.noise_schedule, latents, noise, timesteps),
            "timesteps": timesteps,
            "attributes": self.normalize_attributes(attributes_raw),
            "noise": noise,
        }
        return DenoisingObjective.per_volume_loss(self.denoiser, batch)

    forward = denoising_loss

    def _guided_eps(
        self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, guidance: float
    ) -> torch.Tensor:
        """Classifier-free guidance: ε_u + w (ε_c − ε_u), where ε_u conditions on all-unknown."""
        uncond = torch.full_like(cond, float("nan"))
        if guidance == 1.0:
            return single_as_pair(self.denoiser, x, t, cond)
        if guidance == 0.0:
            return single_as_pair(self.denoiser, x, t, uncond)
        eps_c, eps_u = self.denoiser(
            torch.cat([x, x]), torch.cat([t, t]), torch.cat([cond, uncond])
        ).chunk(2)
        return eps_u + guidance * (eps_c - eps_u)

    @torch.no_grad()
    def sample(
        self,
        n: int,
        attributes: np.ndarray | None = None,
        sampler: SamplerName = "ddim",
        steps: int | None = None,
        guidance: float = 1.0,
        temperature: float = 1.0,
        seed: int = 0,
        batch_size: int = SAMPLE_BATCH,
        progress: bool = True,
        start: int = 0,
        candidates: int = 1,
        choose: Chooser | None = None,
    ) -> np.ndarray:
        """Generate ``n`` volumes (n, S, H, W) on the data's intensity convention, in [0, 1].

        ``attributes``: raw values (n, 14), NaN = unknown; None samples unconditionally.
        ``sampler``: "ddim" (deterministic), "dpm++" (DPM-Solver++(2M), deterministic) or
        "ddpm" (ancestral, all T steps).
        ``steps``: model calls per sample; default all T for DDPM, else 25 (at most T).
        ``guidance``: 1 = conditional only, 0 = unconditional, > 1 amplifies the attributes.
        ``temperature``: the starting noise's standard deviation (1 = the model's prior);
        below 1 draws nearer the model's mode: less diverse (BENCHMARKS.md: on the demo,
        closer to the requested attributes).
        Results depend on ``seed``, ``batch_size``, ``candidates`` and the choice only, not
        on earlier calls.
        ``start``: these are volumes start..start+n-1 of a larger cohort drawn with the same
        seed (a multiple of ``batch_size``; see `shard`): each batch has its own seed.
        ``candidates`` > 1: each volume starts that many trajectories (seeds from
        `candidate_seed`); after `CHOICE_FRACTION` of the steps ``choose`` picks one per
        volume from their predicted clean volumes, and only that one is finished. With the
        deterministic samplers the kept volume is the one its candidate's seed draws alone;
        DDPM draws every candidate's step noise from candidate 0's generator (valid draws,
        not those). ``choose`` must be a function of public data and the model's outputs
        only (`evaluation.selection.nearest_candidate` with a selector that passed
        `load_selector`), or ε does not cover the choice.
        """
        if n < 1 or batch_size < 1:
            raise DpsynthError(
                f"sample: n and batch_size must be positive, got {n} and {batch_size}"
            )
        try:
            check_sampling(guidance, temperature)
            check_seed(seed)
            check_candidates(candidates)
        except DpsynthError as e:
            raise DpsynthError(f"sample: {e}") from None
        if (candidates > 1) != (choose is not None):
            raise DpsynthError("sample: give `choose` exactly when candidates is above 1")
        if start < 0 or start % batch_size:
            raise DpsynthError(
                f"sample: start must be a multiple of batch_size {batch_size}, got {start}"
            )
        if attributes is None:
            attributes = np.full((n, N_ATTRIBUTES), np.nan, dtype=np.float32)
            guidance = 1.0  # all-unknown is the unconditional model whatever the weight
        attributes = np.asarray(attributes, dtype=np.float32)
        if attributes.shape != (n, N_ATTRIBUTES):
            raise DpsynthError(
                f"attributes: expected shape ({n}, {N_ATTRIBUTES}), got {attributes.shape}"
            )
        if steps is None:
            t_max = self.num_train_timesteps
            steps = t_max if sampler == "ddpm" else min(25, t_max)
        scheduler = make_scheduler(sampler, steps=steps, **self.schedule_config)

        device = next(self.denoiser.parameters()).device
        cond_all = self.normalize_attributes(torch.from_numpy(attributes).to(device))
        was_training = self.training
        self.eval()
        out = np.empty((n, *self.volume_shape), dtype=np.float32)
        bar = tqdm(total=n * steps, desc=f"sampling ({sampler})", unit="step", disable=not progress)
        try:
            for offset in range(0, n, batch_size):
                rows = slice(offset, offset + batch_size)
                generators = [
                    torch.Generator(device).manual_seed(
                        batch_seed(candidate_seed(seed, c), (start + offset) // batch_size)
                    )
                    for c in range(candidates)
                ]
                x = self._trajectories(
                    cond_all[rows], attributes[rows], scheduler, guidance, temperature,
                    generators, choose, bar,
                )  # fmt: skip
                out[rows] = self.decode_volumes(x)
        finally:
            bar.close()
            self.train(was_training)
        return out

    def _trajectories(
        self, cond, attributes, scheduler, guidance, temperature, generators, choose, bar
    ) -> torch.Tensor:
        """One batch's final latents: a trajectory per generator (candidate), narrowed to
        ``choose``'s pick per volume after `CHOICE_FRACTION` of the steps."""
        b, steps = cond.shape[0], scheduler.num_inference_steps
        x = torch.cat([
            temperature * torch.randn((b, *self.latent_shape), generator=g, device=cond.device)
            for g in generators
        ])  # fmt: skip
        choice_step = choice_step_of(steps) if len(generators) > 1 else None
        scheduler.set_timesteps(steps)  # multistep solvers keep per-trajectory state
        for i, t in enumerate(scheduler.timesteps, start=1):
            t_batch = torch.full((b,), int(t), device=cond.device, dtype=torch.long)
            # Candidates go through the denoiser one batch at a time, so each sees the
            # batch plain sampling would (and memory stays that of plain sampling).
            eps = torch.cat([self._guided_eps(xc, t_batch, cond, guidance) for xc in x.split(b)])
            x, x0 = scheduler.step(eps, int(t), x, generator=generators[0])
            if i == choice_step:
                keep = self._choice(x0, attributes, len(generators), choose)
                x = x[keep]
                keep_rows(scheduler, keep)
            bar.update(b)
        return x

    def _choice(self, x0: Tensor, attributes: np.ndarray, k: int, choose: Chooser) -> Tensor:
        """The rows of the k stacked candidate batches that ``choose`` keeps, one per volume."""
        b = len(attributes)
        # One candidate batch on the device at a time, as in plain sampling.
        predicted = np.stack([self.decode_volumes(z) for z in x0.split(b)])  # (k, b, S, H, W)
        chosen = np.asarray(choose(predicted, attributes))
        if chosen.shape != (b,) or not np.isin(chosen, np.arange(k)).all():
            raise DpsynthError(f"sample: choose must return {b} candidate indices in 0..{k - 1}")
        return torch.from_numpy(chosen.astype(np.int64) * b + np.arange(b)).to(x0.device)


@torch.no_grad()
def estimate_latent_scale(autoencoder: nn.Module, volumes_iter: Iterable[torch.Tensor]) -> float:
    """1 / std of the autoencoder's latents over batches (B, 1, S, H, W).

    Call it on PUBLIC data only: a statistic of private data here would be an unaccounted
    release (the study's flaw 3, BRIEF section 2).
    """
    total = total_sq = count = 0.0
    for volumes in volumes_iter:
        z = autoencoder.encode_latent(volumes).double()
        total += float(z.sum())
        total_sq += float(z.square().sum())
        count += z.numel()
    if count < 2:
        raise DpsynthError("latent_scale: no volumes to estimate the latent scale from")
    var = (total_sq - total * total / count) / (count - 1)
    if not var > 0:
        raise DpsynthError("latent_scale: latents have zero variance; is the autoencoder trained?")
    return float(1.0 / np.sqrt(var))
