"""Patient-level DP-SGD: each test would fail under a specific broken guarantee."""

from __future__ import annotations

import copy
import json
import warnings

import numpy as np
import pytest
import torch
from conftest import give_attributes_a_say
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

from dpsynth.errors import DpsynthError
from dpsynth.privacy.dpsgd import PatientDPSGD, validate_model_for_dp


class TinyDenoiser(nn.Module):
    """Stand-in for the latent denoiser: 3D convs, GroupNorm, attribute conditioning."""

    def __init__(self, dropout: float = 0.0, mix: nn.Module | None = None) -> None:
        super().__init__()
        self.conv_in = nn.Conv3d(1, 8, 3, padding=1)
        self.norm = nn.GroupNorm(4, 8)
        self.mix = mix or nn.Identity()  # a rule across the batch, for the taps check's tests
        self.attr = nn.Linear(14, 8)
        self.drop = nn.Dropout(dropout)
        self.conv_out = nn.Conv3d(8, 1, 3, padding=1)

    def forward(self, x: torch.Tensor, attributes: torch.Tensor) -> torch.Tensor:
        h = self.mix(torch.nn.functional.silu(self.norm(self.conv_in(x))))
        h = h + self.attr(attributes)[:, :, None, None, None]
        return self.conv_out(self.drop(h))


def denoise_loss(model_fn, record):
    """One patient's loss: the SUM over its two volumes of the per-volume MSE."""
    out = model_fn(record["x"], record["a"])
    return ((out - record["y"]) ** 2).mean(dim=(1, 2, 3, 4)).sum()


def make_batch(patients: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "x": torch.randn(patients, 2, 1, 5, 8, 8, generator=g),
        "a": torch.randn(patients, 2, 14, generator=g),
        "y": torch.randn(patients, 2, 1, 5, 8, 8, generator=g),
    }


def make_engine(model, *, sigma=0.0, clip=1.0, q=0.25, n=20, physical=4, lr=1.0, **kw):
    kw.setdefault("generator", torch.Generator().manual_seed(123))
    kw.setdefault("sampling_seed", 7)
    optimizer = kw.pop("optimizer", None) or torch.optim.SGD(model.parameters(), lr=lr)
    return PatientDPSGD(
        model,
        optimizer,
        noise_multiplier=sigma,
        max_grad_norm=clip,
        sample_rate=q,
        num_records=n,
        physical_batch_size=physical,
        **kw,
    )


def flat_params(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def reference_update(model, batch, clip, expected_batch_size) -> torch.Tensor:
    """Σ_patients clip(∇ patient loss) / B with plain autograd, one patient at a time."""
    total = torch.zeros_like(flat_params(model))
    for i in range(len(batch["x"])):
        model.zero_grad()
        denoise_loss(model, {k: v[i] for k, v in batch.items()}).backward()
        g = torch.cat([p.grad.flatten() for p in model.parameters()])
        total += g * min(1.0, clip / (g.norm().item() + 1e-6))
    return -total / expected_batch_size


@pytest.mark.parametrize("physical", [1, 2, 5])
def test_update_is_sum_of_clipped_per_patient_grads_for_any_physical_split(physical):
    torch.manual_seed(0)
    model = TinyDenoiser()
    reference_model = copy.deepcopy(model)
    batch = make_batch(5)
    clip = 0.3  # below most per-patient norms, so clipping is active
    engine = make_engine(model, clip=clip, q=0.25, n=20, physical=physical)
    before = flat_params(model)
    loss = engine.step(batch, denoise_loss)

    expected = reference_update(reference_model, batch, clip, expected_batch_size=5.0)
    assert torch.allclose(flat_params(model) - before, expected, atol=1e-6, rtol=1e-4)
    manual_loss = np.mean(
        [
            denoise_loss(reference_model, {k: v[i] for k, v in batch.items()}).item()
            for i in range(5)
        ]
    )
    assert loss == pytest.approx(manual_loss, rel=1e-5)


class Dot(nn.Module):
    """Volume output = <x, w>: a volume's gradient is exactly its x."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.w


def dot_loss(model_fn, record):
    return model_fn(record["x"]).sum()


def test_clipping_is_per_patient_not_per_volume():
    clip = 1.0
    model = Dot(3)
    # Two volumes of one patient, each with gradient norm 0.8 C: per-volume clipping leaves
    # them alone (sum norm 1.6 C); per-patient clipping scales the sum down to norm C.
    x = torch.tensor([[0.8, 0.0, 0.0], [0.8, 0.0, 0.0]]) * clip
    engine = make_engine(model, clip=clip, q=0.5, n=2)  # expected batch size 1
    engine.step({"x": x[None]}, dot_loss)
    assert model.w.detach().norm().item() == pytest.approx(clip, rel=1e-5)


class ManyZeroGrads(nn.Module):
    def __init__(self, dim: int = 20_000) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 0.0 * (x @ self.w[: x.shape[-1]])


@pytest.mark.parametrize("patients", [0, 3])
def test_noise_std_is_sigma_clip_over_expected_batch(patients):
    sigma, clip, q, n = 2.0, 0.5, 0.25, 16  # B = 4, target std 0.25
    model = ManyZeroGrads()
    engine = make_engine(model, sigma=sigma, clip=clip, q=q, n=n)
    engine.step({"x": torch.ones(patients, 2, 4)}, dot_loss)
    update = model.w.detach()
    # 20k draws: the std estimate is within ~0.5 %; a √2, ×2 or missing-noise bug is far off.
    assert update.std().item() == pytest.approx(sigma * clip / (q * n), rel=0.03)
    assert abs(update.mean().item()) < 0.01
    assert engine.steps_taken == 1


def test_every_noisy_step_is_counted_once_including_empty_ones():
    """The ledger sets its steps from this count: an empty Poisson batch still releases
    noise and counts; the physical chunks of one logical batch are one step."""
    sigma, q, n = 1.3, 0.1, 40
    engine = make_engine(Dot(3), sigma=sigma, q=q, n=n, physical=2)
    for patients in (2, 0, 5):  # 5 patients: three physical chunks, one noisy step
        engine.step({"x": torch.ones(patients, 2, 3)}, dot_loss)
    assert engine.steps_taken == 3
    assert (engine.noise_multiplier, engine.sample_rate) == (sigma, q)


def test_poisson_batches_have_rate_q_and_are_reproducible():
    q, n, epochs = 0.1, 100, 40
    engine = make_engine(Dot(3), q=q, n=n, sampling_seed=11)
    assert engine.steps_per_epoch == 10
    batches = [b for e in range(epochs) for b in engine.logical_batches(e)]
    assert len(batches) == epochs * 10
    counts = np.zeros(n)
    for b in batches:
        assert len(np.unique(b)) == len(b) and (b >= 0).all() and (b < n).all()
        counts[b] += 1
    sizes = np.array([len(b) for b in batches])
    assert abs(sizes.mean() - q * n) < 0.6  # 4 standard errors
    assert np.abs(counts / len(batches) - q).max() < 0.065  # every patient, 4.3 s.e.
    assert (sizes == 0).sum() == 0 or sizes.min() == 0
    again = list(engine.logical_batches(3))
    assert all(np.array_equal(a, b) for a, b in zip(again, batches[30:40], strict=True))
    other_seed = make_engine(Dot(3), q=q, n=n, sampling_seed=12)
    assert not all(
        np.array_equal(a, b) for a, b in zip(other_seed.logical_batches(3), again, strict=True)
    )


def _checkpointed(engine):
    """The engine's state as a checkpoint stores it: through safetensors + JSON, no pickle."""
    tensors, meta = engine.state_dict()
    return st_load(st_save(tensors)) if tensors else {}, json.loads(json.dumps(meta))


def test_resume_from_state_dict_gives_identical_next_step_without_noise():
    torch.manual_seed(0)
    model = TinyDenoiser(dropout=0.2)
    engine = make_engine(
        model, sigma=0.0, clip=0.5, optimizer=torch.optim.Adam(model.parameters(), lr=1e-2)
    )
    for step in range(2):
        engine.step(make_batch(3, seed=step), denoise_loss)
    tensors, meta = _checkpointed(engine)

    resumed_model = TinyDenoiser(dropout=0.2)
    resumed_model.load_state_dict(model.state_dict())
    resumed = make_engine(
        resumed_model,
        sigma=0.0,
        clip=0.5,
        optimizer=torch.optim.Adam(resumed_model.parameters(), lr=1e-2),
        generator=torch.Generator().manual_seed(999),
        sampling_seed=1,
    )
    resumed.load_state_dict(tensors, meta)
    assert resumed.steps_taken == engine.steps_taken == 2
    assert all(
        np.array_equal(a, b)
        for a, b in zip(resumed.logical_batches(5), engine.logical_batches(5), strict=True)
    )

    batch = make_batch(3, seed=9)
    for e in (engine, resumed):
        torch.manual_seed(42)  # dropout RNG is the caller's to restore
        e.step(batch, denoise_loss)
    assert torch.equal(flat_params(model), flat_params(resumed_model))  # Adam state restored
    assert not torch.equal(flat_params(model), flat_params(TinyDenoiser()))


def test_resume_draws_fresh_noise_for_the_steps_it_recomputes():
    """A crash after the checkpoint's step k lost step k+1; the resumed run redoes it with
    other noise, even when its engine starts from the same (leaked or fixed) noise seed."""
    sigma, clip, q, n = 2.0, 0.5, 0.25, 16

    def run_from_seed_123():
        model = ManyZeroGrads()  # zero data gradient: each update is the noise alone
        return model, make_engine(model, sigma=sigma, clip=clip, q=q, n=n)

    model, engine = run_from_seed_123()
    engine.step({"x": torch.ones(2, 2, 4)}, dot_loss)
    checkpoint = _checkpointed(engine)
    before = model.w.detach().clone()
    engine.step({"x": torch.ones(2, 2, 4)}, dot_loss)  # step 2 of the interrupted run
    lost_noise = model.w.detach() - before

    resumed_model, resumed = run_from_seed_123()
    resumed_model.load_state_dict({"w": before})
    resumed.load_state_dict(*checkpoint)
    resumed.step({"x": torch.ones(2, 2, 4)}, dot_loss)  # step 2 again
    new_noise = resumed_model.w.detach() - before
    std = sigma * clip / (q * n)
    assert new_noise.std().item() == pytest.approx(std, rel=0.03)  # same mechanism
    # Reused noise would correlate perfectly; independent draws of 20k values, ~0 ± 0.007.
    assert abs(np.corrcoef(new_noise.numpy(), lost_noise.numpy())[0, 1]) < 0.05
    assert resumed.steps_taken == 2
    assert not any("noise" in k for k in checkpoint[0])  # the noise state is never stored


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_patient_with_non_finite_gradient_is_zeroed_and_counted(bad):
    torch.manual_seed(0)
    model = TinyDenoiser()
    reference_model = copy.deepcopy(model)
    batch = make_batch(5)
    batch["y"][3, 1, 0, 0, 0, 0] = bad  # one voxel of one volume of patient 3
    clip = 0.3
    engine = make_engine(model, clip=clip, q=0.25, n=20, physical=2)
    before = flat_params(model)
    loss = engine.step(batch, denoise_loss)
    assert torch.isfinite(flat_params(model)).all()
    assert engine.nonfinite_records == 1
    # The other four patients' clipped gradients, averaged over the expected batch as usual.
    healthy = {k: v[[0, 1, 2, 4]] for k, v in batch.items()}
    expected = reference_update(reference_model, healthy, clip, expected_batch_size=5.0)
    assert torch.allclose(flat_params(model) - before, expected, atol=1e-6, rtol=1e-4)
    assert np.isfinite(loss)
    engine.step(batch, denoise_loss)
    assert engine.nonfinite_records == 2  # a running count, saved with the engine
    assert _checkpointed(engine)[1]["nonfinite_records"] == 2


def test_load_state_dict_rejects_other_dp_parameters():
    tensors, meta = make_engine(Dot(3), q=0.25).state_dict()
    with pytest.raises(DpsynthError, match="sample_rate"):
        make_engine(Dot(3), q=0.5).load_state_dict(tensors, meta)


class WithBatchNorm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block = nn.Sequential(nn.Conv3d(1, 4, 1), nn.BatchNorm3d(4))

    def forward(self, x):
        return self.block(x)


class WithUnused(TinyDenoiser):
    def __init__(self) -> None:
        super().__init__()
        self.spare = nn.Linear(3, 3)


def test_validate_model_names_offending_modules_and_parameters():
    with pytest.raises(DpsynthError, match=r"model\.block\.1: BatchNorm3d"):
        validate_model_for_dp(WithBatchNorm())
    with pytest.raises(DpsynthError, match=r"model\.block\.1: BatchNorm3d"):
        make_engine(WithBatchNorm())
    with pytest.raises(DpsynthError, match=r"model\.0: InstanceNorm3d"):
        validate_model_for_dp(nn.Sequential(nn.InstanceNorm3d(4, track_running_stats=True)))
    validate_model_for_dp(nn.Sequential(nn.InstanceNorm3d(4)))
    validate_model_for_dp(nn.MultiheadAttention(8, 2))  # fine under torch.func, unlike hooks

    record = {k: v[0] for k, v in make_batch(1).items()}
    model = WithUnused()
    with pytest.raises(DpsynthError, match=r"model\.spare\.weight: .*no gradient.*\(2 such"):
        validate_model_for_dp(model, probe_loss=lambda: denoise_loss(model, record))
    good = TinyDenoiser()
    validate_model_for_dp(good, probe_loss=lambda: denoise_loss(good, record))


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("sample_rate", 0.0),
        ("noise_multiplier", -1.0),
        ("max_grad_norm", 0.0),
        ("physical_batch_size", 0),
    ],
)
def test_bad_parameters_raise_one_line_errors(field, value):
    kwargs = {"sigma": 1.0, "clip": 1.0, "q": 0.25, "physical": 4}
    key = {"sample_rate": "q", "noise_multiplier": "sigma", "max_grad_norm": "clip"}.get(
        field, "physical"
    )
    kwargs[key] = value
    with pytest.raises(DpsynthError, match=field):
        make_engine(Dot(3), **kwargs)


def test_only_optimizer_parameters_are_trained():
    torch.manual_seed(0)
    model = TinyDenoiser()
    frozen_before = flat_params(model.conv_in)
    engine = make_engine(model, optimizer=torch.optim.SGD(model.conv_out.parameters(), lr=1.0))
    before = flat_params(model.conv_out)
    engine.step(make_batch(2), denoise_loss)
    assert torch.equal(flat_params(model.conv_in), frozen_before)
    assert not torch.equal(flat_params(model.conv_out), before)


@pytest.mark.filterwarnings("ignore:There is a performance drop")  # vmap fallback for SDPA
def test_real_denoiser_with_unknown_attributes_under_vmap():
    from dpsynth.models.denoiser import LatentDenoiser

    torch.manual_seed(0)
    model = give_attributes_a_say(LatentDenoiser(
        in_channels=2, channels=16, channel_multipliers=(1, 2), attention_levels=(False, True),
        num_res_blocks=1, num_slices=5, time_embed_dim=16, attribute_embed_dim=8,
    ))  # fmt: skip
    g = torch.Generator().manual_seed(0)
    attributes = torch.rand(3, 2, 14, generator=g)
    attributes[0, :, 3] = float("nan")  # "unknown" must not poison the gradient
    batch = {
        "x": torch.randn(3, 2, 2, 5, 8, 8, generator=g),
        "t": torch.randint(0, 150, (3, 2), generator=g),
        "a": attributes,
        "eps": torch.randn(3, 2, 2, 5, 8, 8, generator=g),
    }

    def loss_fn(model_fn, record):
        eps = model_fn(record["x"], record["t"], record["a"])
        return ((eps - record["eps"]) ** 2).flatten(1).mean(1).sum()

    record = {k: v[0] for k, v in batch.items()}
    validate_model_for_dp(model, probe_loss=lambda: loss_fn(model, record))
    before = flat_params(model)
    engine = make_engine(model, clip=1.0, q=0.5, n=6, physical=2, lr=1e-2)
    loss = engine.step(batch, loss_fn)
    after = flat_params(model)
    assert np.isfinite(loss) and torch.isfinite(after).all()
    assert 0 < (after - before).norm().item() <= 1e-2 * 1.0 * 3 / 3 + 1e-6  # lr·C·|batch|/B


def test_secure_rng_keeps_noise_scale_and_draws_fresh_batches():
    sigma, clip, q, n = 2.0, 0.5, 0.25, 16
    model = ManyZeroGrads()
    engine = make_engine(model, sigma=sigma, clip=clip, q=q, n=n, secure_rng=True)
    engine.step({"x": torch.ones(2, 2, 4)}, dot_loss)
    assert model.w.detach().std().item() == pytest.approx(sigma * clip / (q * n), rel=0.03)
    first, second = (np.concatenate(list(engine.logical_batches(0))) for _ in range(2))
    assert not np.array_equal(first, second)  # the sampling_seed is not used


# --- Layer taps (privacy/grad_taps.py): one batched pass instead of vmap over patients ---


def tiny_latent_denoiser(dropout: float = 0.0) -> nn.Module:
    from dpsynth.models.denoiser import LatentDenoiser

    torch.manual_seed(0)
    # patients' attribute tokens must differ, or a tap rule mixing them would go unseen
    return give_attributes_a_say(LatentDenoiser(
        in_channels=2, channels=8, channel_multipliers=(1, 2), attention_levels=(False, True),
        num_res_blocks=1, num_slices=5, num_heads=2, norm_groups=4, time_embed_dim=16,
        attribute_embed_dim=8, dropout=dropout,
    ))  # fmt: skip


def latent_batch(patients: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    attributes = torch.rand(patients, 2, 14, generator=g)
    attributes[0, 1, 3] = float("nan")  # an unknown attribute takes the "unknown" token
    return {
        "x": torch.randn(patients, 2, 2, 5, 8, 8, generator=g),
        "t": torch.randint(0, 150, (patients, 2), generator=g),
        "a": attributes,
        "eps": torch.randn(patients, 2, 2, 5, 8, 8, generator=g)
        * torch.arange(1.0, patients + 1).view(
            -1, 1, 1, 1, 1, 1
        ),  # patients of growing gradient norm
    }


def eps_loss(model_fn, record):
    eps = model_fn(record["x"], record["t"], record["a"])
    return ((eps - record["eps"]) ** 2).flatten(1).mean(1).sum()


def per_patient_norms(grads: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.stack([g.flatten(1).square().sum(1) for g in grads.values()]).sum(0).sqrt()


def test_layer_taps_give_torch_func_per_patient_gradients_on_the_denoiser():
    from dpsynth.privacy.grad_taps import PatientTaps

    model = tiny_latent_denoiser()
    engine = make_engine(model)
    batch = latent_batch(3)
    fast, fast_loss = PatientTaps(model, engine._trainable)(batch, eps_loss)
    ref, ref_loss = engine._vmap_grads(batch, eps_loss)
    assert set(fast) == set(ref) and len(ref) > 100  # every parameter, slice position included
    diff = per_patient_norms({n: fast[n] - ref[n] for n in ref})
    assert (diff <= 1e-5 * per_patient_norms(ref)).all()
    assert torch.allclose(fast_loss, ref_loss, rtol=1e-6)


def test_layer_taps_clipped_update_equals_torch_func_with_clipped_and_unclipped_patients():
    from dpsynth.privacy.grad_taps import PatientTaps

    model = tiny_latent_denoiser()
    reference = copy.deepcopy(model)
    batch = latent_batch(4)
    norms = per_patient_norms(make_engine(model)._vmap_grads(batch, eps_loss)[0])
    clip = float(norms.sort().values[1:3].mean())  # between the 2nd and 3rd norm
    assert (norms < clip).sum() == 2 and (norms > clip).sum() == 2  # both kinds of patient
    fast = make_engine(model, clip=clip, physical=3, lr=1.0)
    slow = make_engine(reference, clip=clip, physical=3, lr=1.0)
    slow._taps = False  # the torch.func reference path
    before = flat_params(model)
    fast_loss, slow_loss = fast.step(batch, eps_loss), slow.step(batch, eps_loss)
    assert isinstance(fast._taps, PatientTaps)  # the denoiser runs on the fast path
    step_fast, step_slow = flat_params(model) - before, flat_params(reference) - before
    assert (step_fast - step_slow).norm() <= 1e-5 * step_slow.norm()
    assert fast_loss == pytest.approx(slow_loss, rel=1e-6)


class SequenceFirst(nn.Module):
    """A Linear over (L, B, d): rows are NOT patient-major, so the taps would mix patients."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x (B, L, 3) -> (B, L)
        return self.linear(x.transpose(0, 1))[..., 0].transpose(0, 1)


def test_taps_that_would_mix_patients_are_refused_and_the_step_stays_per_patient():
    from dpsynth.privacy.grad_taps import PatientTaps

    def loss_fn(model_fn, record):
        return model_fn(record["x"]).square().sum()

    torch.manual_seed(0)
    model = SequenceFirst()
    batch = {"x": torch.randn(2, 2, 4, 3)}  # 2 patients x 2 volumes x L = 4
    engine = make_engine(model, clip=0.5, q=0.5, n=4)
    fast = PatientTaps(model, engine._trainable)(batch, loss_fn)[0]
    ref = engine._vmap_grads(batch, loss_fn)[0]
    assert not torch.allclose(fast["linear.weight"], ref["linear.weight"], rtol=0.1)
    reference = copy.deepcopy(model)
    with pytest.warns(UserWarning, match="disagree with autograd"):
        engine.step(batch, loss_fn)
    assert engine._taps is False
    slow = make_engine(reference, clip=0.5, q=0.5, n=4)
    slow._taps = False
    slow.step(batch, loss_fn)
    assert torch.allclose(flat_params(model), flat_params(reference), rtol=1e-6)


class SharedTable(nn.Module):
    """A small Linear over a table shared by the whole batch: every patient's rows feed its
    gradient, and its effect is 1e-3 of the large layer's (review finding)."""

    def __init__(self) -> None:
        super().__init__()
        self.big, self.pos = nn.Linear(32, 32), nn.Linear(1, 32)
        self.register_buffer("table", torch.randn(4, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.big(x) + 1e-3 * self.pos(self.table).mean(0)


def test_a_small_layer_mixing_patients_is_not_drowned_by_a_large_one():
    def loss_fn(model_fn, record):
        return model_fn(record["x"]).square().sum()

    torch.manual_seed(0)
    engine = make_engine(SharedTable(), clip=1e9, q=0.5, n=8)
    with pytest.warns(UserWarning, match="disagree with autograd"):
        engine.step({"x": torch.randn(2, 2, 32) * 10}, loss_fn)
    assert engine._taps is False


def test_a_parameter_on_the_root_module_keeps_the_torch_func_path():
    engine = make_engine(Dot(3), q=0.5, n=4)
    engine.step({"x": torch.randn(2, 2, 3)}, dot_loss)
    assert engine._taps is False


class RareLayer(nn.Module):
    """A Linear that only records with ``use`` = 1 reach (like a null-condition embedding),
    applied sequence-first when `mixing` (rows not patient-major: taps would mix patients)."""

    def __init__(self, mixing: bool = False, train_only: bool = False) -> None:
        super().__init__()
        self.main, self.rare = nn.Linear(3, 1), nn.Linear(3, 1)
        self.mixing, self.train_only = mixing, train_only

    def forward(self, x: torch.Tensor, use: torch.Tensor) -> torch.Tensor:  # (B, L, 3), (B,)
        rare = self.rare(x.transpose(0, 1)).transpose(0, 1) if self.mixing else self.rare(x)
        if self.train_only and not self.training:  # a branch the check (dropout off) never sees
            rare = rare * 0
        return (self.main(x) + use[:, None, None] * rare)[..., 0]


def rare_loss(model_fn, record):
    return model_fn(record["x"], record["use"]).square().sum()


def rare_batch(users: list[int], patients: int = 4) -> dict[str, torch.Tensor]:
    """Patients x 2 volumes x L = 24 (a multiple of every chunk's volumes, so the taps do not
    refuse the sequence-first layer outright); only `users` reach the rare layer."""
    use = torch.zeros(patients, 2)
    use[users] = 1.0
    return {"x": torch.randn(patients, 2, 24, 3, generator=torch.Generator().manual_seed(0)),
            "use": use}  # fmt: skip


@pytest.mark.parametrize(
    "physical, path",
    [(4, "torch.func"), (2, "layer taps and torch.func")],  # user: 3rd of a chunk / later chunk
)
def test_a_mixing_layer_the_first_two_patients_do_not_use_is_still_refused(physical, path):
    torch.manual_seed(0)
    model = RareLayer(mixing=True)
    reference = copy.deepcopy(model)
    batch = rare_batch(users=[2])
    engine = make_engine(model, clip=0.5, q=0.5, n=8, physical=physical)
    with pytest.warns(UserWarning, match="disagree with autograd"):
        engine.step(batch, rare_loss)
    assert engine.per_patient_path == path
    slow = make_engine(reference, clip=0.5, q=0.5, n=8, physical=physical)
    slow._taps = False
    slow.step(batch, rare_loss)
    assert torch.allclose(flat_params(model), flat_params(reference), rtol=1e-6)


def test_taps_are_checked_until_each_used_parameter_is_verified_then_no_more():
    engine = make_engine(RareLayer(), clip=0.5, q=0.5, n=8, physical=2, lr=0.0)
    for _ in range(3):  # the rare layer's gradient is exactly 0: nothing to check it on
        engine.step(rare_batch(users=[]), rare_loss)
    assert engine.tap_checks == 1 and engine._unverified == {"rare.weight", "rare.bias"}
    engine.step(rare_batch(users=[3]), rare_loss)  # the second chunk uses it: checked
    assert engine.tap_checks == 2 and not engine._unverified
    for _ in range(3):
        engine.step(rare_batch(users=[0, 3]), rare_loss)
    assert engine.tap_checks == 2 and engine.per_patient_path == "layer taps"


def test_a_used_parameter_no_check_can_verify_is_never_left_to_the_taps():
    engine = make_engine(RareLayer(train_only=True), clip=0.5, q=0.5, n=8, physical=4)
    engine.step(rare_batch(users=[]), rare_loss)
    assert engine.per_patient_path == "layer taps"
    engine.step(rare_batch(users=[1]), rare_loss)  # checked, unverifiable: torch.func
    assert engine.tap_checks == 2 and engine.per_patient_path == "layer taps and torch.func"
    assert engine._chunks_by_path == {"layer taps": 1, "torch.func": 1}
    with pytest.warns(UserWarning, match="rare.* after 16 checks"):
        for _ in range(15):
            engine.step(rare_batch(users=[1]), rare_loss)
    assert engine.tap_checks == 16 and engine._taps is False


def test_a_resumed_engine_verifies_its_taps_again_instead_of_trusting_the_checkpoint():
    """What a check verified is not checkpointed: a resumed run (maybe other code, other
    torch) checks again before it trusts a tap, and finds a rule that now mixes patients."""
    checked = make_engine(RareLayer(), clip=0.5, q=0.5, n=8, physical=4, lr=0.0)
    checked.step(rare_batch(users=[0, 1]), rare_loss)
    assert checked.tap_checks == 1 and not checked._unverified
    tensors, meta = _checkpointed(checked)
    resumed = make_engine(RareLayer(mixing=True), clip=0.5, q=0.5, n=8, physical=4, lr=0.0)
    resumed.load_state_dict(tensors, meta)
    assert resumed.tap_checks == 0 and resumed._unverified == {
        "main.weight", "main.bias", "rare.weight", "rare.bias"}  # fmt: skip
    with pytest.warns(UserWarning, match="disagree with autograd"):
        resumed.step(rare_batch(users=[0, 1]), rare_loss)
    assert resumed.per_patient_path == "torch.func"


class SummingLinear(nn.Linear):
    """A Linear given (by monkeypatch) a tap rule that adds the whole chunk's gradients to
    each patient's own: that patient looks right to a check, only the others show it."""


class FaintRare(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.main, self.rare = nn.Linear(3, 1), SummingLinear(3, 1)

    def forward(self, x: torch.Tensor, use: torch.Tensor) -> torch.Tensor:  # (B, 3), (B,)
        return (self.main(x) + use[:, None] * self.rare(x))[:, 0]


def test_a_rule_summing_the_chunk_is_not_verified_by_one_faint_user(monkeypatch):
    from dpsynth.privacy import grad_taps

    def summing(*args):
        return {k: v.sum(0, keepdim=True).expand_as(v) for k, v in grad_taps._linear(*args).items()}

    monkeypatch.setitem(grad_taps._RULES, SummingLinear, summing)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 2, 3, generator=g)
    x[1:] *= 10.0  # the other two probe patients: ~1e4 x patient 0's squared gradient norm
    use = torch.zeros(3, 2)
    use[0] = 2e-4  # only patient 0 reaches the rare layer, at ~1e-8 of its squared norm
    # in train mode the check's independence test refuses the rule at once: a patient
    # changed in turn moves patient 0's faint gradient far beyond its own tolerance
    training = make_engine(FaintRare(), q=0.5, n=8, physical=3, lr=0.0)
    with pytest.warns(UserWarning, match="mix patients in train mode"):
        training.step({"x": x, "use": use}, rare_loss)
    # in eval mode only the comparison with autograd runs: its own floor is tested here
    torch.manual_seed(0)
    engine = make_engine(FaintRare().eval(), q=0.5, n=8, physical=3, lr=0.0)
    engine.step({"x": x, "use": use}, rare_loss)
    assert engine.tap_checks == 1 and {"rare.weight", "rare.bias"} <= engine._unverified
    everyone = {"x": torch.randn(3, 2, 3, generator=g), "use": torch.ones(3, 2)}
    with pytest.warns(UserWarning, match="disagree with autograd"):
        engine.step(everyone, rare_loss)  # the rare layer's rule is checked, and refused
    assert engine._taps is False and engine._chunks_by_path == {"layer taps": 0, "torch.func": 2}


def test_kl_autoencoder_taps_pass_their_check_instead_of_falling_back():
    """The check runs the model in eval mode twice (taps, then autograd) and compares: a KL
    autoencoder that drew its latent in eval mode too disagreed with itself, and DP
    fine-tuning fell back to torch.func for good behind a misleading warning."""
    import warnings

    from dpsynth.models.autoencoder import KLAutoencoder

    torch.manual_seed(0)
    model = KLAutoencoder(channels=8, channel_multipliers=(1, 2), num_res_blocks=1,
                          latent_channels=2, norm_groups=4)  # fmt: skip
    engine = make_engine(model, clip=1.0, q=0.5, n=8, physical=4, lr=0.0)
    volumes = torch.rand(4, 2, 1, 3, 8, 8, generator=torch.Generator().manual_seed(0))

    def loss(model_fn, record):
        out = model_fn(record["volumes"])
        l1 = (out.reconstruction - record["volumes"]).abs().mean(dim=(1, 2, 3, 4))
        return (l1 + 1e-3 * out.regularization_loss).sum()

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        engine.step({"volumes": volumes}, loss)
    assert engine.tap_checks == 1 and engine.per_patient_path == "layer taps"
    assert not engine._unverified


def test_kl_autoencoder_taps_hold_in_train_mode_where_it_draws(monkeypatch):
    """The engine checks its taps in eval mode, but DP training runs in train mode, where
    the KL autoencoder draws its latent: that draw must stay per row. With the draw fixed
    per row (so per-patient autograd and the batched taps see the same numbers), the taps
    in train mode equal autograd's per-patient gradients."""
    from dpsynth.models.autoencoder import KLAutoencoder
    from dpsynth.privacy.dpsgd import _agree
    from dpsynth.privacy.grad_taps import PatientTaps

    def fixed_per_row(t, *args, **kwargs):  # rows are (ED, ES) pairs: the same per patient
        n = t[0].numel()
        pair = torch.stack([torch.sin(torch.arange(n) * 0.37 + row) for row in range(2)])
        return pair.reshape(2, *t.shape[1:]).repeat(t.shape[0] // 2, *[1] * (t.dim() - 1))

    monkeypatch.setattr(torch, "randn_like", fixed_per_row)
    torch.manual_seed(0)
    model = KLAutoencoder(channels=8, channel_multipliers=(1, 2), num_res_blocks=1,
                          latent_channels=2, norm_groups=4, attention=True)  # fmt: skip
    engine = make_engine(model, clip=1.0, q=0.5, n=8, physical=4, lr=0.0)
    chunk = {"volumes": torch.rand(4, 2, 1, 3, 8, 8, generator=torch.Generator().manual_seed(0))}

    def loss(model_fn, record):
        out = model_fn(record["volumes"])
        l1 = (out.reconstruction - record["volumes"]).abs().mean(dim=(1, 2, 3, 4))
        return (l1 + 1e-3 * out.regularization_loss).sum()

    model.train()
    taps, _ = PatientTaps(model, engine._trainable)(chunk, loss)
    autograd, _ = engine._autograd_grads(chunk, loss)
    assert _agree(taps, autograd)


class Centering(nn.Module):
    """Subtracts `share` of the batch's mean in train mode only (a reviewer's mutation):
    eval mode, where the engine compares its taps with autograd, is per patient."""

    def __init__(self, share: float = 1.0) -> None:
        super().__init__()
        self.share = share

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h - self.share * h.mean(0, keepdim=True) if self.training else h


def train_only_centering(share: float = 1.0) -> TinyDenoiser:
    return TinyDenoiser(mix=Centering(share))


def test_taps_mixing_patients_in_train_mode_only_are_refused_and_the_step_stays_per_patient():
    torch.manual_seed(0)
    model = train_only_centering()
    reference = copy.deepcopy(model)
    batch = make_batch(4)
    engine = make_engine(model, clip=0.5, q=0.5, n=8)
    with pytest.warns(UserWarning, match="mix patients in train mode"):
        engine.step(batch, denoise_loss)
    assert engine._taps is False and engine.per_patient_path == "torch.func"
    slow = make_engine(reference, clip=0.5, q=0.5, n=8)
    slow._taps = False
    slow.step(batch, denoise_loss)
    assert torch.allclose(flat_params(model), flat_params(reference), rtol=1e-6)


def test_train_mode_check_holds_random_draws_equal_and_leaves_trainings_stream_alone():
    """Dropout draws differ from pass to pass: the independence test must hold them equal
    (else it refuses every model with dropout) and must not advance the global stream."""
    from dpsynth.privacy.grad_taps import PatientTaps

    torch.manual_seed(0)
    model = TinyDenoiser(dropout=0.5)
    engine = make_engine(model, clip=0.5, q=0.5, n=8)
    batch = make_batch(3)
    engine._taps = PatientTaps(model, engine._trainable)
    state = torch.get_rng_state()
    assert engine._independent(batch, denoise_loss)
    assert torch.equal(torch.get_rng_state(), state)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no refusal, no fallback
        engine.step(make_batch(4), denoise_loss)
    assert engine.tap_checks >= 1 and engine.per_patient_path == "layer taps"


class Pairing(nn.Module):
    """Adds each other's features to the first two patients' in train mode only: changing
    a third patient alone would show nothing."""

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return h
        # rows are (ED, ES) per patient: rows 0-1 and 2-3 swap
        return torch.cat([h[:4] + 0.5 * h[:4].roll(2, dims=0), h[4:]])


def test_taps_mixing_one_pair_of_patients_in_train_mode_are_refused():
    from dpsynth.privacy.grad_taps import PatientTaps

    torch.manual_seed(0)
    model = TinyDenoiser(mix=Pairing())
    engine = make_engine(model, clip=0.5, q=0.5, n=8)
    engine._taps = PatientTaps(model, engine._trainable)
    batch = make_batch(3)  # as many as a check probes
    assert not engine._independent(batch, denoise_loss)
    model.eval()
    assert engine._independent(batch, denoise_loss)


def test_the_denoiser_with_the_studys_dropout_keeps_its_taps_in_train_mode():
    """The study's denoiser trains with dropout 0.1: the train-mode independence test must
    pass it (equal draws in both passes), or every `paper` run falls back to torch.func."""
    model = tiny_latent_denoiser(dropout=0.1).train()
    engine = make_engine(model, clip=1.0, q=0.5, n=8, physical=4, lr=0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        engine.step(latent_batch(4), eps_loss)
    assert engine.tap_checks >= 1 and engine.per_patient_path == "layer taps"


def test_a_faint_train_mode_mixing_is_refused():
    """Equal draws make the kept patients' gradients bit for bit equal, so the independence
    test needs no rounding room: 1e-4 of the batch mean, which `_agree`'s float32 tolerance
    let through (review: refused only from 3e-3), is refused."""
    from dpsynth.privacy.grad_taps import PatientTaps

    torch.manual_seed(0)
    model = train_only_centering(share=1e-4)
    engine = make_engine(model, clip=0.5, q=0.5, n=8)
    engine._taps = PatientTaps(model, engine._trainable)
    assert not engine._independent(make_batch(3), denoise_loss)
    model.mix.share = 0.0
    assert engine._independent(make_batch(3), denoise_loss)


def test_probe_patients_with_one_record_prove_nothing_and_a_later_chunk_is_checked():
    """Replacing a patient's record by an equal one changes nothing, and an average of equal
    patients looks right to autograd: such a probe must not verify the taps (review: a
    train-mode mixing model kept its taps on three identical probe patients)."""
    torch.manual_seed(0)
    model = train_only_centering()
    twins = make_batch(4)
    for v in twins.values():
        v[1:3] = v[0]  # the probe: the first three patients (equal shares), one record
    engine = make_engine(model, clip=0.5, q=0.5, n=8, lr=0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        engine.step(twins, denoise_loss)
    assert engine.tap_checks == 0 and engine._chunks_by_path == {"layer taps": 0, "torch.func": 1}
    with pytest.warns(UserWarning, match="mix patients in train mode"):
        engine.step(make_batch(4), denoise_loss)
    assert engine.tap_checks == 1 and engine._taps is False


def test_a_check_keeps_each_modules_mode():
    """A submodule kept in eval mode (a frozen part) stays so after a check; a root in eval
    with a submodule in train still gets the train-mode test."""
    torch.manual_seed(0)
    model = TinyDenoiser(dropout=0.5)
    model.norm.eval()
    engine = make_engine(model, clip=0.5, q=0.5, n=8, lr=0.0)
    engine.step(make_batch(4), denoise_loss)
    assert engine.tap_checks >= 1 and model.training and not model.norm.training
    mixing = train_only_centering()
    mixing.eval()
    mixing.mix.train()
    engine = make_engine(mixing, clip=0.5, q=0.5, n=8, lr=0.0)
    with pytest.warns(UserWarning, match="mix patients in train mode"):
        engine.step(make_batch(4), denoise_loss)


def test_taps_verified_in_eval_mode_are_checked_again_when_training_starts():
    """A check in eval mode skips the train-mode test: verification done there must not
    carry over to training (review: a model checked in eval, then switched to train, kept
    taps that mix patients there)."""
    torch.manual_seed(0)
    model = train_only_centering().eval()
    engine = make_engine(model, clip=0.5, q=0.5, n=8, lr=0.0)
    engine.step(make_batch(4), denoise_loss)
    assert engine.tap_checks >= 1 and engine.per_patient_path == "layer taps"
    model.train()
    with pytest.warns(UserWarning, match="mix patients in train mode"):
        engine.step(make_batch(4, seed=1), denoise_loss)
    assert engine._taps is False
