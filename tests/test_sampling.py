"""Schedulers, the latent diffusion pipeline, guidance and sampling."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import stored_channels_last, tiny_denoiser
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler
from torch import nn
from torch.func import functional_call, grad, vmap

from dpsynth.attributes import N_ATTRIBUTES, denormalize, normalize
from dpsynth.data.intensity import normalise_each
from dpsynth.diffusion import LatentDiffusion, add_noise, estimate_latent_scale, make_scheduler
from dpsynth.diffusion.pipeline import candidate_seed, choice_step_of
from dpsynth.errors import DpsynthError
from dpsynth.models import KLAutoencoder

# PyTorch notes that CPU flash attention has no vmap batching rule (a speed note only).
pytestmark = pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")

T = 150


@pytest.fixture(autouse=True)
def single_thread():
    """Tiny tensors: one thread avoids OpenMP spin-waits on a shared, loaded CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_pipeline(num_train_timesteps: int = T, slices: int = 5) -> LatentDiffusion:
    torch.manual_seed(0)
    ae = KLAutoencoder(channels=8, channel_multipliers=(1, 2), num_res_blocks=1, norm_groups=4)
    den = tiny_denoiser(num_slices=slices, dropout=0.1)
    return LatentDiffusion(
        ae,
        den,
        latent_scale=2.0,
        volume_shape=(slices, 8, 8),
        num_train_timesteps=num_train_timesteps,
    )


def raw_attributes(n: int, seed: int = 0) -> np.ndarray:
    """Mid-range raw attribute values (normalised to [-0.5, 0.5])."""
    rng = np.random.default_rng(seed)
    return denormalize(rng.uniform(-0.5, 0.5, (n, N_ATTRIBUTES)))


# --- schedulers -------------------------------------------------------------------------------


def test_linear_schedule_is_the_studys():
    s = make_scheduler("ddpm")
    assert torch.allclose(s.betas, torch.linspace(1e-4, 7e-2, T))
    assert s.betas[0].item() == pytest.approx(1e-4) and s.betas[-1].item() == pytest.approx(7e-2)
    assert torch.allclose(s.alphas_cumprod, torch.cumprod(1 - s.betas, 0))
    assert torch.equal(s.timesteps, torch.arange(T - 1, -1, -1))


@pytest.mark.parametrize("steps", [1, 7, 25, 100, T])
def test_fast_sampler_timesteps_span_the_schedule(steps):
    for name in ("ddim", "dpm++"):
        ts = make_scheduler(name, steps=steps).timesteps
        assert len(ts) == steps and ts[0] == T - 1
        assert ts[-1] == (T - 1 if steps == 1 else 0)
        assert torch.all(torch.diff(ts) < 0)  # strictly decreasing, no repeats


def test_ddim_matches_monai_ddim_where_monai_is_consistent():
    """With steps = T, MONAI's fixed-stride DDIM visits the same timesteps as ours."""
    ours = make_scheduler("ddim", steps=T)
    ref = DDIMScheduler(T, beta_start=1e-4, beta_end=7e-2, clip_sample=False)
    ref.set_timesteps(T)
    assert torch.equal(ours.timesteps, ref.timesteps)
    gen = torch.Generator().manual_seed(0)
    x = x_ref = torch.randn(2, 1, 3, 4, 4, generator=gen, dtype=torch.float64)
    for t in ours.timesteps:
        eps = torch.tanh(x_ref) * 0.5 + 0.1 * int(t) / T  # any smooth stand-in for a model
        x = ours.step(eps, int(t), x)[0]
        x_ref = ref.step(eps, int(t), x_ref)[0]
    assert torch.allclose(x, x_ref, atol=1e-5)


def ode_error(sampler: str, steps: int) -> float:
    """Max error of a sampler against the exact probability-flow ODE for N(mu, s^2) data.

    For Gaussian data the optimal ε is known in closed form and the ODE keeps the
    standardised value (x_t - α_t mu) / sqrt(α_t^2 s^2 + σ_t^2) constant.
    """
    mu, s = 0.5, 0.1
    sch = make_scheduler(sampler, steps=steps)
    alpha_bar = sch.alphas_cumprod.double()

    def alpha_sigma(t):
        return alpha_bar[t].sqrt(), (1 - alpha_bar[t]).sqrt()

    x = torch.linspace(-2.5, 2.5, 11, dtype=torch.float64)
    a, sig = alpha_sigma(int(sch.timesteps[0]))
    exact = mu + s * (x - a * mu) / (a**2 * s**2 + sig**2).sqrt()
    for t in sch.timesteps:
        a, sig = alpha_sigma(int(t))
        x = sch.step(sig * (x - a * mu) / (a**2 * s**2 + sig**2), int(t), x)[0]
    return (x - exact).abs().max().item()


def test_dpm_solver_restarts_on_set_timesteps():
    sch = make_scheduler("dpm++", steps=5)
    x0 = torch.randn(2, 3)

    def trajectory():
        x = torch.ones(2, 3)
        for t in sch.timesteps:
            x = sch.step(x - x0, int(t), x)[0]
        return x

    first = trajectory()
    sch.set_timesteps(5)
    assert torch.equal(trajectory(), first)


def test_dpm_solver_is_more_accurate_than_ddim_at_few_steps():
    ddim = [ode_error("ddim", n) for n in (10, 25, 75)]
    dpm = [ode_error("dpm++", n) for n in (10, 25, 75)]
    assert ddim[0] > ddim[1] > ddim[2] and dpm[0] > dpm[1] > dpm[2]  # both converge
    assert dpm[0] < 0.5 * ddim[0]  # second order pays off most at few steps
    assert dpm[1] < ddim[1]


def test_scheduler_errors():
    with pytest.raises(DpsynthError, match="steps"):
        make_scheduler("ddpm", steps=25)
    with pytest.raises(DpsynthError, match="steps"):
        make_scheduler("ddim", steps=T + 1)
    with pytest.raises(DpsynthError, match="sampler"):
        make_scheduler("euler")


def test_add_noise_matches_monai():
    s = make_scheduler("ddpm")
    x0, noise = torch.randn(4, 1, 5, 4, 4), torch.randn(4, 1, 5, 4, 4)
    t = torch.tensor([0, 10, 75, 149])
    ref = DDPMScheduler(T, beta_start=1e-4, beta_end=7e-2).add_noise(x0, noise, t)
    assert torch.allclose(add_noise(s, x0, noise, t), ref, atol=1e-6)


# --- pipeline: training side ------------------------------------------------------------------


def test_encode_decode_apply_latent_scale():
    pipe = tiny_pipeline().eval()
    v = torch.rand(2, 1, 5, 8, 8)
    z = pipe.encode(v)
    assert z.shape == (2, *pipe.latent_shape) == (2, 1, 5, 4, 4)
    assert torch.allclose(z, 2.0 * pipe.autoencoder.encode_latent(v))
    assert torch.allclose(pipe.decode(z), pipe.autoencoder.decode_latent(z / 2.0))


def test_denoising_loss_is_per_sample_mse_on_normalised_attributes():
    pipe = tiny_pipeline().eval()
    z, noise = torch.randn(3, 1, 5, 4, 4), torch.randn(3, 1, 5, 4, 4)
    t = torch.tensor([0, 70, 149])
    raw = raw_attributes(3)
    raw[1, 2] = np.nan
    loss = pipe.denoising_loss(z, torch.from_numpy(raw), t, noise)
    assert loss.shape == (3,) and torch.isfinite(loss).all()
    noisy = add_noise(pipe.noise_schedule, z, noise, t)
    eps = pipe.denoiser(noisy, t, torch.from_numpy(normalize(raw)))
    assert torch.allclose(loss, (eps - noise).square().mean(dim=(1, 2, 3, 4)), atol=1e-6)
    with pytest.raises(DpsynthError, match="attributes"):
        pipe.denoising_loss(z, torch.zeros(3, 13), t, noise)


def test_per_patient_grads_through_pipeline_match_single_patient():
    """What the DP engine does: functional_call on the pipeline, vmapped over patients."""
    pipe = tiny_pipeline()
    pipe.denoiser.eval()  # no dropout, so vmap and single forwards see the same function
    params = {f"denoiser.{k}": v.detach() for k, v in pipe.denoiser.named_parameters()}
    z, noise = torch.randn(3, 2, 1, 5, 4, 4), torch.randn(3, 2, 1, 5, 4, 4)
    t = torch.randint(0, T, (3, 2))
    raw = torch.from_numpy(raw_attributes(6).reshape(3, 2, N_ATTRIBUTES))
    raw[0, 1, 5] = float("nan")

    def loss(p, z, a, t, n):
        return functional_call(pipe, p, (z, a, t, n)).sum()

    per_patient = vmap(grad(loss), in_dims=(None, 0, 0, 0, 0), randomness="different")(
        params, z, raw, t, noise
    )
    for i in range(3):
        single = grad(loss)(params, z[i], raw[i], t[i], noise[i])
        for k in params:
            assert torch.isfinite(per_patient[k]).all()
            assert torch.allclose(per_patient[k][i], single[k], atol=1e-5), k


def test_estimate_latent_scale_is_inverse_std():
    class Scaled(nn.Module):
        def encode_latent(self, x):
            return 3.0 * x + 1.0

    gen = torch.Generator().manual_seed(0)
    batches = [torch.randn(4, 1, 5, 16, 16, generator=gen) for _ in range(5)]
    assert estimate_latent_scale(Scaled(), batches) == pytest.approx(1 / 3, rel=0.02)
    with pytest.raises(DpsynthError, match="latent_scale"):
        estimate_latent_scale(Scaled(), [])


# --- pipeline: sampling -----------------------------------------------------------------------


class IdentityAutoencoder(nn.Module):
    downsample_factor = 1
    latent_channels = 1

    def encode_latent(self, x):
        return x

    def decode_latent(self, z):
        return z


class OracleDenoiser(nn.Module):
    """Returns the exact noise that separates x_t from a known clean latent x0."""

    def __init__(self, x0: torch.Tensor, alphas_cumprod: torch.Tensor) -> None:
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(()))
        self.x0, self.alphas_cumprod = x0, alphas_cumprod

    def forward(self, x, t, attributes):
        a = self.alphas_cumprod[t].reshape(-1, 1, 1, 1, 1)
        return (x - a.sqrt() * self.x0[: x.shape[0]]) / (1 - a).sqrt()


@pytest.mark.parametrize(
    "sampler,steps", [("ddpm", None), ("ddim", 25), ("ddim", 5), ("dpm++", 25), ("dpm++", 5)]
)
def test_sampler_with_oracle_denoiser_recovers_the_clean_volume(sampler, steps):
    """With a perfect ε-model every sampler must land on x0, put on the data's intensity
    convention; checks scale, steps, decode."""
    target = torch.rand(3, 1, 5, 8, 8) * 0.8 + 0.1
    scale = 0.5
    pipe = LatentDiffusion(
        IdentityAutoencoder(),
        OracleDenoiser(target * scale, make_scheduler("ddpm").alphas_cumprod),
        latent_scale=scale,
        volume_shape=(5, 8, 8),
    )
    out = pipe.sample(3, sampler=sampler, steps=steps, batch_size=3, progress=False)
    assert out.shape == (3, 5, 8, 8) and out.dtype == np.float32
    assert np.abs(out - normalise_each(target[:, 0].numpy())).max() < 1e-3


def test_ddpm_and_ddim_run_end_to_end_in_unit_range():
    pipe = tiny_pipeline(num_train_timesteps=10)
    attrs = raw_attributes(3)
    for sampler in ("ddpm", "ddim", "dpm++"):
        out = pipe.sample(3, attrs, sampler=sampler, steps=None, batch_size=2, progress=False)
        assert out.shape == (3, 5, 8, 8) and np.isfinite(out).all()
        assert out.min() >= 0.0 and out.max() <= 1.0
    assert pipe.training  # sampling restores the training mode


@pytest.mark.parametrize("sampler", ["ddim", "dpm++"])
def test_deterministic_samplers_depend_only_on_seed(sampler):
    pipe = tiny_pipeline(num_train_timesteps=20)
    attrs = raw_attributes(2)
    with torch.no_grad():  # make the decoder output spread so clipping does not hide changes
        pipe.autoencoder.decoder.conv_out.bias.fill_(0.5)
    a = pipe.sample(2, attrs, sampler, steps=3, seed=7, batch_size=1, progress=False)
    b = pipe.sample(2, attrs, sampler, steps=3, seed=7, batch_size=1, progress=False)
    c = pipe.sample(2, attrs, sampler, steps=3, seed=8, batch_size=1, progress=False)
    assert np.array_equal(a, b)
    assert np.abs(a - c).max() > 1e-4


class CountingDenoiser(nn.Module):
    """Wraps a denoiser and records the batch size of every call."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner, self.calls = inner, []

    def forward(self, x, t, attributes):
        self.calls.append(x.shape[0])
        return self.inner(x, t, attributes)


def test_classifier_free_guidance():
    pipe = tiny_pipeline(num_train_timesteps=20)
    pipe.denoiser = CountingDenoiser(pipe.denoiser)
    with torch.no_grad():
        pipe.autoencoder.decoder.conv_out.bias.fill_(0.5)
    a, b = raw_attributes(2, seed=1), raw_attributes(2, seed=2)

    def run(attrs, w):
        pipe.denoiser.calls.clear()
        return pipe.sample(2, attrs, steps=4, guidance=w, batch_size=2, progress=False)

    cond_a = run(a, 1.0)
    assert pipe.denoiser.calls == [2] * 4  # w = 1: conditional pass only
    assert np.abs(cond_a - run(b, 1.0)).max() > 1e-4
    uncond = run(None, 1.0)
    assert np.array_equal(run(a, 0.0), uncond)  # w = 0 ignores the attributes
    assert np.array_equal(run(b, 0.0), uncond)
    guided = run(a, 3.0)
    assert pipe.denoiser.calls == [4] * 4  # conditional and unconditional in one batch
    assert np.abs(guided - cond_a).max() > 1e-4

    x = torch.randn(2, 1, 5, 4, 4)
    t = torch.tensor([5, 5])
    cond = pipe.normalize_attributes(torch.from_numpy(a))
    pipe.eval()
    eps_c = pipe.denoiser(x, t, cond)
    eps_u = pipe.denoiser(x, t, torch.full_like(cond, float("nan")))
    assert torch.allclose(
        pipe._guided_eps(x, t, cond, 3.0), eps_u + 3.0 * (eps_c - eps_u), atol=1e-5
    )


class FirstInput(nn.Module):
    """Wraps a denoiser and keeps the latent of its first call (the starting noise)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner, self.first = inner, None

    def forward(self, x, t, attributes):
        if self.first is None:
            self.first = x.clone()
        return self.inner(x, t, attributes)


@pytest.mark.parametrize("sampler", ["ddim", "dpm++"])
def test_temperature_scales_the_starting_noise(sampler):
    pipe = tiny_pipeline(num_train_timesteps=20)
    with torch.no_grad():
        pipe.autoencoder.decoder.conv_out.bias.fill_(0.5)
    attrs = raw_attributes(2)

    def run(temperature):
        pipe.denoiser = FirstInput(getattr(pipe.denoiser, "inner", pipe.denoiser))
        out = pipe.sample(2, attrs, sampler, steps=3, temperature=temperature, seed=3,
                          batch_size=2, progress=False)  # fmt: skip
        return out, pipe.denoiser.first

    cold, x_cold = run(0.6)
    prior, x_prior = run(1.0)
    assert torch.allclose(x_cold, 0.6 * x_prior)
    assert x_prior.std().item() == pytest.approx(1.0, abs=0.2)
    assert np.abs(cold - prior).max() > 1e-4
    for bad in (0.0, -1.0, 1.5):
        with pytest.raises(DpsynthError, match="temperature"):
            pipe.sample(1, attrs[:1], temperature=bad, progress=False)


def test_sample_rejects_bad_attributes():
    pipe = tiny_pipeline(num_train_timesteps=20)
    with pytest.raises(DpsynthError, match="attributes"):
        pipe.sample(2, np.zeros((2, 13)), progress=False)
    with pytest.raises(DpsynthError, match="steps"):
        pipe.sample(2, sampler="ddpm", steps=5, progress=False)


def test_tiny_denoiser_overfits_one_latent():
    """Behaviour: 100 Adam steps on one fixed latent clearly reduce the denoising loss."""
    pipe = tiny_pipeline()
    pipe.denoiser.eval()  # no dropout: a clean signal for a short run
    gen = torch.Generator().manual_seed(0)
    latent = torch.randn(1, 1, 5, 4, 4, generator=gen)
    attrs = torch.from_numpy(raw_attributes(1))

    eval_t = torch.randint(0, T, (32,), generator=gen)
    eval_noise = torch.randn(32, 1, 5, 4, 4, generator=gen)

    def eval_loss() -> float:
        with torch.no_grad():
            return (
                pipe.denoising_loss(
                    latent.expand(32, -1, -1, -1, -1), attrs.expand(32, -1), eval_t, eval_noise
                )
                .mean()
                .item()
            )

    before = eval_loss()
    opt = torch.optim.Adam(pipe.denoiser.parameters(), lr=3e-3)
    for _ in range(100):
        t = torch.randint(0, T, (8,), generator=gen)
        noise = torch.randn(8, 1, 5, 4, 4, generator=gen)
        loss = pipe.denoising_loss(latent.expand(8, -1, -1, -1, -1), attrs.expand(8, -1), t, noise)
        opt.zero_grad()
        loss.mean().backward()
        opt.step()
    after = eval_loss()
    assert after < 0.5 * before, (before, after)


def test_one_volume_decodes_on_the_fast_convolution_path():
    """A batch of one took PyTorch's slow im2col 3D convolution (its oneDNN heuristic is written
    for 2D): `decode` runs it as a pair, same result, on the oneDNN path."""
    from torch.profiler import profile

    import dpsynth
    from dpsynth.app.demo import demo_assets

    pipe = dpsynth.load(demo_assets() / "ldm")
    torch.set_num_threads(2)  # the heuristic also depends on the thread count
    latent = torch.randn(1, *pipe.latent_shape, generator=torch.Generator().manual_seed(0))
    with profile() as prof:
        volume = pipe.decode(latent)
    ops = {e.key for e in prof.key_averages()}
    assert "aten::slow_conv3d_forward" not in ops and "aten::mkldnn_convolution" in ops
    pair = pipe.autoencoder.decode_latent(torch.cat([latent, latent]) / pipe.latent_scale)
    assert volume.shape == (1, 1, *pipe.volume_shape)
    torch.testing.assert_close(volume, pair[:1], atol=1e-5, rtol=0)


def _loaded_with_a_default_layout_copy(name: str):
    """The shipped demo pipeline, after checking that `load` stored its `name` net
    channels-last, and a default-layout copy of that net."""
    import copy

    import dpsynth
    from dpsynth.app.demo import demo_assets

    pipe = dpsynth.load(demo_assets() / "ldm")
    net = getattr(pipe, name)
    assert stored_channels_last(net) and all(stored_channels_last(net))
    plain = copy.deepcopy(net).to(memory_format=torch.contiguous_format)
    assert not any(stored_channels_last(plain))
    return pipe, plain


def test_a_loaded_denoiser_runs_channels_last_with_the_same_values():
    """`load` stores the inference denoiser channels-last too (sampling and the audit run it
    1.1x faster); it predicts what the default layout predicts and hands back a default-layout
    tensor."""
    pipe, plain = _loaded_with_a_default_layout_copy("denoiser")
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(3, *pipe.latent_shape, generator=g)
    timesteps = torch.tensor([1, 50, 140])
    attributes = torch.randn(3, N_ATTRIBUTES, generator=g)
    with torch.no_grad():
        got, want = (
            pipe.denoiser(latents, timesteps, attributes),
            plain(latents, timesteps, attributes),
        )
    assert got.is_contiguous()
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    assert (want - latents).abs().mean() > 0.1  # a real prediction, not the input handed back


def test_a_loaded_autoencoder_runs_channels_last_with_the_same_values():
    """`load` stores the frozen autoencoder channels-last (faster oneDNN 3D convolutions);
    encode and decode give what the default layout gives, and hand back default-layout
    tensors (what the denoiser and DP-SGD's taps see is unchanged)."""
    pipe, plain = _loaded_with_a_default_layout_copy("autoencoder")
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(2, *pipe.latent_shape, generator=g)
    volumes = pipe.decode(latents)
    with torch.no_grad():
        expected = plain.decode_latent(latents / pipe.latent_scale)
        torch.testing.assert_close(volumes, expected, atol=1e-4, rtol=0)
        z = pipe.encode(volumes)
        assert z.is_contiguous()  # channels-last out of the autoencoder, handed back default
        torch.testing.assert_close(
            z, plain.encode_latent(volumes) * pipe.latent_scale, atol=1e-4, rtol=0
        )


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_a_cohorts_batches_can_be_drawn_apart_and_equal_one_draw(sampler):
    """What torchrun sharding relies on: batch k's volumes depend on (seed, k) only."""
    pipe = tiny_pipeline(num_train_timesteps=10)
    with torch.no_grad():  # spread the decoder's output so clipping does not hide changes
        pipe.autoencoder.decoder.conv_out.bias.fill_(0.5)
    attrs = raw_attributes(5)
    kw = dict(sampler=sampler, steps=None if sampler == "ddpm" else 3, seed=4, batch_size=2)
    kw["progress"] = False
    whole = pipe.sample(5, attrs, **kw)
    parts = [pipe.sample(2, attrs[:2], **kw), pipe.sample(3, attrs[2:], start=2, **kw)]
    assert np.allclose(np.concatenate(parts), whole, atol=1e-6)
    assert np.abs(whole[0] - whole[2]).max() > 1e-4  # batches do not repeat one another's noise
    with pytest.raises(DpsynthError, match="start must be a multiple of batch_size 2"):
        pipe.sample(1, attrs[:1], start=1, **kw)


# --- best-of-k: several trajectories per volume, one finished -----------------------------


class RecordingChooser:
    """Keeps a fixed candidate per volume and records what it was shown."""

    def __init__(self, picks) -> None:
        self.picks, self.calls = np.asarray(picks), []

    def __call__(self, predicted, attributes):
        self.calls.append((predicted, attributes))
        return self.picks[: len(attributes)]


@pytest.mark.parametrize("sampler", ["ddim", "dpm++"])
def test_a_kept_candidate_is_what_its_seed_draws_alone(sampler):
    """Choosing after ceil(0.4 * 5) = 2 of 5 steps, then finishing the kept trajectories
    (the multistep solver's state narrowed with them)."""
    pipe = tiny_pipeline(num_train_timesteps=20)
    with torch.no_grad():
        pipe.autoencoder.decoder.conv_out.bias.fill_(0.5)
    attrs = raw_attributes(5)
    kw = dict(sampler=sampler, steps=5, guidance=2.0, batch_size=4, progress=False)
    alone = np.stack([pipe.sample(5, attrs, seed=candidate_seed(9, c), **kw) for c in range(3)])
    chooser = RecordingChooser([2, 0, 1, 2])
    kept = pipe.sample(5, attrs, seed=9, candidates=3, choose=chooser, **kw)
    picks = np.array([2, 0, 1, 2, 2])  # batches of 4 and 1
    np.testing.assert_array_equal(kept, alone[picks, np.arange(5)])
    assert [p.shape for p, _ in chooser.calls] == [(3, 4, 5, 8, 8), (3, 1, 5, 8, 8)]
    np.testing.assert_array_equal(chooser.calls[1][1], attrs[4:])
    shown = chooser.calls[0][0]  # each candidate's prediction, 2 of 5 steps in
    assert shown.min() >= 0 and shown.max() <= 1
    err = np.abs(shown[:, None] - alone[None, :, :4]).mean(axis=(2, 3, 4, 5))
    assert (err.argmin(axis=1) == np.arange(3)).all()  # nearest its own final volume


def test_sampled_volumes_and_the_candidates_shown_follow_the_data_intensity_convention():
    """The prepared data's convention (`dpsynth.data.intensity`: each volume's 0.5th and
    99.5th percentiles to 0 and 1, beyond them clipped): the volumes kept and the candidates
    the chooser reads span exactly [0, 1], with few voxels clipped. The decoder's own
    output, here squeezed near 0.5, does not."""
    pipe = tiny_pipeline(num_train_timesteps=10)
    with torch.no_grad():
        pipe.autoencoder.decoder.conv_out.bias.fill_(0.5)
        pipe.autoencoder.decoder.conv_out.weight.mul_(0.05)
    attrs, chooser = raw_attributes(3), RecordingChooser([1, 0, 1])
    kept = pipe.sample(3, attrs, steps=4, seed=2, candidates=2, choose=chooser, progress=False)
    shown = chooser.calls[0][0].reshape(-1, 5, 8, 8)
    for volume in (*kept, *shown):
        assert volume.min() == 0.0 and volume.max() == 1.0
        assert np.mean((volume == 0.0) | (volume == 1.0)) < 0.02
    with torch.no_grad():
        raw = pipe.decode(torch.randn(6, *pipe.latent_shape))[:, 0].numpy()
    assert (raw.min(axis=(1, 2, 3)) > 0.05).all() and (raw.max(axis=(1, 2, 3)) < 0.95).all()


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_best_of_k_finishes_only_the_kept_trajectories(sampler):
    """Every candidate runs the first ceil(0.4 * steps) steps in batches of plain sampling's
    size; then one trajectory per volume runs the rest, from what the chooser saw then."""
    pipe = tiny_pipeline(num_train_timesteps=10)
    pipe.denoiser = CountingDenoiser(pipe.denoiser)
    with torch.no_grad():
        pipe.autoencoder.decoder.conv_out.bias.fill_(0.5)
    attrs = raw_attributes(3)
    chooser = RecordingChooser([1, 2, 0])
    kept = pipe.sample(3, attrs, sampler, steps=None if sampler == "ddpm" else 10, guidance=2.0,
                       seed=1, candidates=3, choose=chooser, progress=False)  # fmt: skip
    assert pipe.denoiser.calls == [6] * (3 * 4) + [6] * 6  # 4 steps x 3 candidates, then 6
    shown = chooser.calls[0][0][[1, 2, 0], [0, 1, 2]]  # the kept candidates' predictions
    assert np.abs(shown - kept).max() > 1e-3  # read part-way, not from finished volumes
    assert kept.min() >= 0 and kept.max() <= 1 and np.isfinite(kept).all()


@pytest.mark.parametrize(("steps", "step"), [(1, 1), (2, 1), (3, 2), (10, 4), (25, 10), (150, 60)])
def test_the_choice_comes_after_40_percent_of_the_steps(steps, step):
    assert choice_step_of(steps) == step


def test_best_of_k_refuses_a_bad_choice():
    pipe = tiny_pipeline(num_train_timesteps=10)
    attrs = raw_attributes(2)
    kw = dict(steps=2, progress=False)
    with pytest.raises(DpsynthError, match="choose must return 2 candidate indices in 0..1"):
        pipe.sample(2, attrs, candidates=2, choose=RecordingChooser([0, 2]), **kw)
    with pytest.raises(DpsynthError, match="give `choose` exactly when candidates is above 1"):
        pipe.sample(2, attrs, candidates=2, **kw)
    with pytest.raises(DpsynthError, match="candidates"):
        pipe.sample(2, attrs, candidates=0, choose=RecordingChooser([0, 0]), **kw)
