"""Autoencoders, discriminator, attribute encoder and denoiser: shapes, losses, DP-compatibility."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import give_attributes_a_say, tiny_denoiser
from opacus.validators import ModuleValidator
from safetensors.torch import save_file
from torch import nn
from torch.func import functional_call, grad, vmap

from dpsynth.errors import DpsynthError
from dpsynth.models import AttributeEncoder, KLAutoencoder, LatentDenoiser, VQAutoencoder
from dpsynth.models.blocks import attention
from dpsynth.models.discriminator import (
    PatchDiscriminator3D,
    PerceptualLoss,
    discriminator_loss,
    generator_loss,
)

# PyTorch notes that CPU flash attention has no vmap batching rule (a speed note only).
pytestmark = pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")

TINY_AE = dict(channels=8, channel_multipliers=(1, 2, 2), num_res_blocks=1, norm_groups=4)


@pytest.fixture(autouse=True)
def single_thread():
    """Tiny tensors: one thread avoids OpenMP spin-waits on a shared, loaded CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def conv_depths(model: nn.Module, *inputs) -> set[int]:
    """Slice-axis sizes of every Conv3d output during one forward."""
    depths: set[int] = set()
    hooks = [
        m.register_forward_hook(lambda _m, _i, out: depths.add(out.shape[2]))
        for m in model.modules()
        if isinstance(m, nn.Conv3d)
    ]
    with torch.no_grad():
        model(*inputs)
    for h in hooks:
        h.remove()
    return depths


def per_sample_grads_match(model: nn.Module, loss_fn, *batched) -> float:
    """Max |vmap per-sample grad - grad of the single-sample forward| over all parameters."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p, *sample):
        return loss_fn(lambda *args: functional_call(model, p, args), *sample)

    in_dims = (None,) + (0,) * len(batched)
    vmapped = vmap(grad(loss), in_dims=in_dims, randomness="different")(params, *batched)
    worst = 0.0
    for i in range(batched[0].shape[0]):
        single = grad(loss)(params, *(b[i] for b in batched))
        for k in params:
            assert torch.isfinite(vmapped[k]).all(), k
            worst = max(worst, (vmapped[k][i] - single[k]).abs().max().item())
    return worst


# --- autoencoders ---------------------------------------------------------------------------


@pytest.mark.parametrize("slices", [13, 5])
@pytest.mark.parametrize("cls", [KLAutoencoder, VQAutoencoder])
def test_autoencoder_downsamples_in_plane_only(cls, slices):
    torch.manual_seed(0)
    ae = cls(**TINY_AE, **({"codebook_size": 32} if cls is VQAutoencoder else {}))
    x = torch.rand(2, 1, slices, 16, 16)
    z = ae.encode_latent(x)
    assert ae.downsample_factor == 4
    assert z.shape == (2, ae.latent_channels, slices, 4, 4)
    assert ae.decode_latent(z).shape == x.shape
    out = ae(x)
    assert out.reconstruction.shape == x.shape
    assert out.regularization_loss.shape == (2,)
    assert conv_depths(ae, x) == {slices}


def test_kl_term_is_zero_for_standard_normal_posterior_and_positive_otherwise():
    torch.manual_seed(0)
    ae = KLAutoencoder(**TINY_AE, latent_channels=2)
    x = torch.rand(2, 1, 5, 16, 16)
    kl = ae(x).regularization_loss
    assert torch.isfinite(kl).all() and (kl > 0).all()
    with torch.no_grad():  # mean = 0, log-variance = 0 everywhere: KL(N(0,1) || N(0,1)) = 0
        ae.encoder.conv_out.weight.zero_()
        ae.encoder.conv_out.bias.zero_()
    assert ae(x).regularization_loss.abs().max() < 1e-6
    assert torch.equal(ae.encode_latent(x), torch.zeros(2, 2, 5, 4, 4))  # deterministic: mean


def test_vq_snaps_to_nearest_code_and_uses_the_codebook():
    torch.manual_seed(0)
    ae = VQAutoencoder(**TINY_AE, codebook_size=64, code_dim=4)
    with torch.no_grad():
        ae.codebook.normal_()
    z = ae.encode_latent(torch.rand(2, 1, 5, 16, 16)) * 10
    q = ae.quantize(z)
    flat = z.movedim(1, -1).reshape(-1, 4)
    nearest = torch.cdist(flat, ae.codebook).argmin(-1)
    assert torch.equal(q.indices.reshape(-1), nearest)
    assert torch.allclose(
        q.quantized.movedim(1, -1).reshape(-1, 4), ae.codebook[nearest], atol=1e-5
    )
    assert q.indices.unique().numel() >= 8  # not collapsed onto one code
    assert torch.isfinite(q.loss).all() and (q.loss > 0).all()
    # decode_latent quantises first: a latent nudged towards its code decodes identically
    nudged = z + 0.01 * (q.quantized - z)
    assert torch.allclose(ae.decode_latent(nudged), ae.decode_latent(z), atol=1e-6)


def test_vq_gradients_reach_encoder_and_codebook():
    torch.manual_seed(0)
    ae = VQAutoencoder(**TINY_AE, codebook_size=16)
    x = torch.rand(2, 1, 5, 16, 16)
    out = ae(x)
    ((out.reconstruction - x).square().mean() + out.regularization_loss.mean()).backward()
    assert ae.encoder.conv_in.weight.grad.abs().sum() > 0  # straight-through estimator
    assert ae.codebook.grad.abs().sum() > 0


def test_vq_diffuses_the_studys_one_channel_latent_and_quantises_4_dim_codes():
    torch.manual_seed(0)
    ae = VQAutoencoder(**TINY_AE, latent_channels=1, code_dim=4, codebook_size=16)
    x = torch.rand(2, 1, 5, 16, 16)
    z = ae.encode_latent(x)
    assert z.shape == (2, 1, 5, 4, 4)  # what the denoiser sees
    q = ae.quantize(z)
    assert q.quantized.shape == (2, 4, 5, 4, 4)
    # every position is exactly one codebook entry (4-dim), reached through the 1x1 conv
    assert torch.equal(q.quantized.detach().movedim(1, -1), ae.codebook.detach()[q.indices])
    assert ae.decode_latent(z).shape == x.shape
    out = ae(x)
    (out.reconstruction.square().mean() + out.regularization_loss.mean()).backward()
    assert ae.to_code.weight.grad.abs().sum() > 0
    with pytest.raises(DpsynthError, match="latent_channels"):
        VQAutoencoder(**TINY_AE, latent_channels=5, code_dim=4)


def test_bad_norm_groups_is_a_user_error():
    with pytest.raises(DpsynthError, match="norm_groups"):
        KLAutoencoder(channels=12, norm_groups=8)


def test_autoencoder_per_sample_grads_match_single_sample():
    torch.manual_seed(0)
    # one record = one patient = two volumes (ED, ES)
    x = torch.rand(3, 2, 1, 5, 8, 8)

    def loss(model, volumes):
        out = model(volumes)
        return (out.reconstruction - volumes).square().mean() + out.regularization_loss.mean()

    kl = KLAutoencoder(**TINY_AE, attention=True).eval()  # eval: the posterior mean, no draw
    assert per_sample_grads_match(kl, loss, x) < 1e-5
    vq = VQAutoencoder(**TINY_AE, codebook_size=16)
    assert per_sample_grads_match(vq, loss, x) < 1e-5
    study_vq = VQAutoencoder(**TINY_AE, codebook_size=16, latent_channels=1)  # paper's VQ
    assert per_sample_grads_match(study_vq, loss, x) < 1e-5


# --- discriminator ----------------------------------------------------------------------------


def test_patch_discriminator_shape_and_losses():
    torch.manual_seed(0)
    d = PatchDiscriminator3D(channels=8, num_layers=3, norm_groups=4)
    logits = d(torch.rand(2, 1, 13, 16, 16))
    assert logits.shape == (2, 1, 13, 2, 2)
    ones = torch.ones(4)
    assert discriminator_loss(2 * ones, -2 * ones, "hinge") == 0  # both beyond the margin
    assert discriminator_loss(0 * ones, 0 * ones, "hinge") == 1
    assert generator_loss(3 * ones, "hinge") == -3
    assert discriminator_loss(ones, 0 * ones, "lsgan") == 0
    assert generator_loss(0 * ones, "lsgan") == 1
    with pytest.raises(DpsynthError, match="adversarial_loss"):
        generator_loss(ones, "wgan")


def vgg_weights_file(path, drop: str | None = None) -> str:
    """A VGG16-shaped ``features.*`` state dict (random weights) as the user would supply."""
    gen = torch.Generator().manual_seed(0)
    shapes, prev = {}, 3
    for index, width in zip(
        (0, 2, 5, 7, 10, 12, 14), (64, 64, 128, 128, 256, 256, 256), strict=True
    ):
        shapes[f"features.{index}.weight"] = (width, prev, 3, 3)
        shapes[f"features.{index}.bias"] = (width,)
        prev = width
    shapes["features.17.weight"] = (512, 256, 3, 3)  # deeper layers are ignored
    state = {k: torch.randn(v, generator=gen) * 0.05 for k, v in shapes.items() if k != drop}
    save_file(state, str(path))
    return str(path)


def test_perceptual_loss_from_local_weights(tmp_path):
    loss = PerceptualLoss(vgg_weights_file(tmp_path / "vgg.safetensors"))
    assert not any(p.requires_grad for p in loss.parameters())
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(2, 1, 5, 16, 16, generator=gen)
    near = (x + 0.02 * torch.randn(x.shape, generator=gen)).requires_grad_()
    far = torch.rand(2, 1, 5, 16, 16, generator=gen)
    assert loss(x, x).abs().max() < 1e-6
    d_near, d_far = loss(x, near), loss(x, far)
    assert d_near.shape == (2,) and (d_near > 0).all()
    assert (d_far > 2 * d_near).all()
    d_near.sum().backward()
    assert near.grad.abs().sum() > 0


def test_perceptual_loss_rejects_bad_weight_files(tmp_path):
    with pytest.raises(DpsynthError, match="cannot read"):
        PerceptualLoss(tmp_path / "absent.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(DpsynthError, match="cannot read"):
        PerceptualLoss(tmp_path / "junk.safetensors")
    partial = vgg_weights_file(tmp_path / "partial.safetensors", drop="features.12.weight")
    with pytest.raises(DpsynthError, match="features.12.weight"):
        PerceptualLoss(partial)


# --- attribute encoder ------------------------------------------------------------------------


def test_attribute_encoder_unknown_path_and_finite_gradients():
    torch.manual_seed(0)
    enc = give_attributes_a_say(AttributeEncoder(num_attributes=14, embed_dim=8, num_heads=2))
    values = torch.rand(3, 14) * 2 - 1
    values[:, 4] = float("nan")
    tokens = enc(values)
    assert tokens.shape == (3, 14, 8) and torch.isfinite(tokens).all()
    tokens.square().sum().backward()
    for name, p in enc.named_parameters():
        assert torch.isfinite(p.grad).all(), name
    for known_path in (enc.known_shift, enc.value_weight):  # NaN never reaches it
        assert known_path.grad[4].abs().sum() == 0
        assert (known_path.grad[torch.arange(14) != 4].abs().sum(1) > 0).all()

    # the unknown embedding is exactly what a NaN contributes
    with torch.no_grad():
        enc.known_shift[4] = -0.5 * enc.value_weight[4]
        known = values.clone()
        known[:, 4] = 0.5
        assert torch.allclose(enc(values), enc(known), atol=1e-6)


def test_an_attribute_training_never_gave_reads_as_unknown():
    """The public cohort has no SEX: a model pre-trained on it must not read a given SEX as
    a random embedding (it shifted the shipped model's hearts by tens of mL)."""
    torch.manual_seed(0)
    enc = AttributeEncoder(num_attributes=14, embed_dim=8, num_heads=2)
    opt = torch.optim.AdamW(enc.parameters(), lr=1e-2, weight_decay=0.01)
    for _ in range(20):
        values = torch.rand(8, 14) * 2 - 1
        values[:, 9] = float("nan")  # never given
        opt.zero_grad()
        enc(values).sin().sum().backward()
        opt.step()
    assert enc.value_weight[0].abs().sum() > 0.1  # the given attributes were learned
    values = torch.rand(4, 14) * 2 - 1
    unknown = values.clone()
    unknown[:, 9] = float("nan")
    for sex in (-1.0, 1.0):
        values[:, 9] = sex
        assert torch.equal(enc(values), enc(unknown))


# --- denoiser ---------------------------------------------------------------------------------


def test_denoiser_shape_depth_and_conditioning():
    torch.manual_seed(0)
    den = tiny_denoiser().eval()
    x = torch.randn(2, 1, 13, 8, 8)
    t = torch.tensor([3, 120])
    a = torch.rand(2, 14) * 2 - 1
    eps = den(x, t, a)
    assert eps.shape == x.shape
    assert conv_depths(den, x, t, a) == {13}
    other = a.clone()
    other[:, 0] = -other[:, 0]
    assert (den(x, t, other) - eps).abs().max() > 1e-4  # attribute tokens change the output
    unknown = torch.full_like(a, float("nan"))
    assert (den(x, t, unknown) - eps).abs().max() > 1e-4
    with pytest.raises(DpsynthError, match="latents"):
        den(torch.randn(2, 1, 12, 8, 8), t, a)


def test_denoiser_nan_attributes_give_finite_gradients():
    torch.manual_seed(0)
    den = tiny_denoiser(dropout=0.1)
    a = torch.rand(2, 14)
    a[0, :5] = float("nan")
    a[1] = float("nan")
    den(torch.randn(2, 1, 13, 4, 4), torch.tensor([0, 149]), a).square().mean().backward()
    for name, p in den.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_denoiser_per_sample_grads_match_single_sample():
    torch.manual_seed(0)
    den = tiny_denoiser(dropout=0.0)
    # three records of two volumes each (a patient's ED and ES), NaN attributes included
    x = torch.randn(3, 2, 1, 13, 4, 4)
    t = torch.randint(0, 150, (3, 2))
    a = torch.rand(3, 2, 14)
    a[1, 0, 3] = float("nan")

    def loss(model, x, t, a):
        return model(x, t, a).square().mean()

    assert per_sample_grads_match(den, loss, x, t, a) < 1e-5


@pytest.mark.parametrize("lq, lk", [(16, 16), (13, 13), (40, 7)])  # plane, slice, cross
def test_attention_under_vmap_equals_sdpa_forward_and_gradients(lq, lk):
    """The vmap path (plain matmuls) computes F.scaled_dot_product_attention's function."""
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 2, 4, lq, 8), torch.randn(3, 2, 4, lk, 8), torch.randn(3, 2, 4, lk, 8)
    weight = torch.randn(3, 2, 4, lq, 8)  # a non-trivial upstream gradient

    def loss(f, q, k, v, w):
        return (f(q, k, v) * w).sum()

    reference = F.scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(vmap(attention)(q, k, v), reference, atol=1e-5, rtol=0)
    grads = vmap(grad(lambda *t: loss(attention, *t), argnums=(0, 1, 2)))(q, k, v, weight)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    expected = torch.autograd.grad(loss(F.scaled_dot_product_attention, *leaves, weight), leaves)
    for got, want in zip(grads, expected, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_denoiser_per_sample_grads_take_no_vmap_fallback():
    """Per-sample gradients batch every op: PyTorch warns on each slow per-sample loop."""
    torch.manual_seed(0)
    den = tiny_denoiser()
    x, t, a = torch.randn(2, 1, 13, 4, 4), torch.tensor([3, 140]), torch.rand(2, 14)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        per_sample_grads_match(
            den, lambda model, x, t, a: model(x[None], t[None], a[None]).square().mean(), x, t, a
        )
    assert not [w for w in caught if "batching rule" in str(w.message)]


def test_samples_in_a_batch_do_not_interact():
    """Changing one sample never changes another's output (no batch statistics anywhere)."""
    torch.manual_seed(0)
    den = tiny_denoiser().eval()
    ae = KLAutoencoder(**TINY_AE)
    x, t, a = torch.randn(3, 1, 13, 4, 4), torch.tensor([1, 50, 100]), torch.rand(3, 14)
    v = torch.rand(3, 1, 5, 16, 16)
    x2, a2, v2 = x.clone(), a.clone(), v.clone()
    x2[2], a2[2], v2[2] = torch.randn_like(x[2]), float("nan"), torch.rand_like(v[2])
    with torch.no_grad():
        eps, eps2 = den(x, t, a), den(x2, t, a2)
        assert torch.allclose(eps[:2], eps2[:2], atol=1e-6)
        assert (eps[2] - eps2[2]).abs().max() > 1e-3
        assert torch.allclose(ae.encode_latent(v)[:2], ae.encode_latent(v2)[:2], atol=1e-6)


def test_attention_and_conditioning_parameters_select_attention_only():
    den = tiny_denoiser()
    names = den.attention_and_conditioning_parameters()
    all_names = dict(den.named_parameters())
    assert set(names) <= set(all_names)
    assert any(n.startswith("attribute_encoder.") for n in names)
    assert any(n.endswith("slice_position.weight") for n in names)
    assert any("cross_attention" in n for n in names)
    assert not any(n.startswith(("conv_in", "conv_out", "time_embed")) for n in names)
    assert not any(".res." in n for n in names)
    assert 0 < len(names) < len(all_names)


def test_denoiser_needs_an_attention_level():
    with pytest.raises(DpsynthError, match="attention_levels"):
        LatentDenoiser(channels=8, channel_multipliers=(1, 2), attention_levels=(False, False))


def test_no_batchnorm_anywhere():
    models = [
        KLAutoencoder(**TINY_AE),
        VQAutoencoder(**TINY_AE, codebook_size=16),
        PatchDiscriminator3D(channels=8, norm_groups=4),
        tiny_denoiser(),
    ]
    for model in models:
        assert ModuleValidator.validate(model, strict=False) == []
        assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def test_denoiser_loads_checkpoints_with_the_old_slice_position_key():
    # Before SlicePosition (a module for DP-SGD's layer taps) the embedding was a bare
    # parameter `...transformer.slice_position`; the shipped demo models hold that key.
    source, target = tiny_denoiser(), tiny_denoiser()
    old = {k.removesuffix("slice_position.weight") + "slice_position"
           if k.endswith("slice_position.weight") else k: v
           for k, v in source.state_dict().items()}  # fmt: skip
    assert sum(k.endswith(".slice_position") for k in old) == 4
    target.load_state_dict(old)
    for k, v in source.state_dict().items():
        assert torch.equal(target.state_dict()[k], v)


def test_attribute_encoder_loads_weights_of_its_earlier_form_with_the_same_tokens():
    # Until 2026-12-03 a known token was identity + value * weight and a missing one
    # identity + unknown; runs and released models of that time must load unchanged.
    torch.manual_seed(0)
    identity, unknown, weight = torch.randn(3, 14, 8).unbind(0)
    values = torch.rand(5, 14) * 2 - 1
    values[1, 3] = values[4, 9] = float("nan")
    missing = torch.isnan(values)[..., None]
    old_tokens = identity + torch.where(missing, unknown, values.nan_to_num()[..., None] * weight)

    enc = AttributeEncoder(num_attributes=14, embed_dim=8, num_heads=2)
    old = {k: v for k, v in enc.state_dict().items() if k not in ("known_shift", "unknown")}
    enc.load_state_dict(old | {"identity": identity, "unknown": unknown, "value_weight": weight})
    expected = enc.norm_out(enc.layers(old_tokens))
    torch.testing.assert_close(enc(values), expected, atol=1e-6, rtol=0)
