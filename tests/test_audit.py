"""Privacy audit: ROC arithmetic, memorisation on constructed sets, MIA power on an over-fit model."""

import json

import numpy as np
import pytest
import torch

from dpsynth.attributes import INDEX, N_ATTRIBUTES
from dpsynth.errors import DpsynthError
from dpsynth.evaluation.audit import (
    EVALUATION_LABEL,
    _member_subset,
    attack_summary,
    default_timesteps,
    denoising_losses,
    membership_inference,
    memorisation,
    privacy_audit,
    roc_auc,
    roc_curve,
    tpr_at_fpr,
)

SHAPE = (5, 16, 16)


def _volumes(n, seed):
    return np.random.default_rng(seed).random((n, *SHAPE), dtype=np.float32)


def _attributes(n):
    # Cache convention: each patient is an ED row then an ES row.
    a = np.full((n, N_ATTRIBUTES), np.nan, dtype=np.float32)
    a[:, INDEX["ESED"]] = np.arange(n) % 2 == 0
    return a


# --- ROC ---------------------------------------------------------------------------------------


def test_roc_hand_case():
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4])
    labels = np.array([1, 0, 1, 1, 0, 0])
    fpr, tpr, thr = roc_curve(scores, labels)
    np.testing.assert_allclose(fpr, [0, 0, 1 / 3, 1 / 3, 1 / 3, 2 / 3, 1])
    np.testing.assert_allclose(tpr, [0, 1 / 3, 1 / 3, 2 / 3, 1, 1, 1])
    assert thr[0] == np.inf and thr[1] == 0.9
    # Pairs (member, non-member) ranked correctly: 1*3 + 2*2 ... = 7 of 9.
    assert roc_auc(fpr, tpr) == pytest.approx(7 / 9)
    assert tpr_at_fpr(fpr, tpr, 0.01) == pytest.approx(1 / 3)
    assert tpr_at_fpr(fpr, tpr, 0.34) == pytest.approx(1.0)


def test_roc_ties_are_one_point_and_count_half():
    fpr, tpr, _ = roc_curve(np.array([1.0, 1.0, 0.0, 0.0]), np.array([1, 0, 1, 0]))
    np.testing.assert_allclose(fpr, [0, 0.5, 1])
    np.testing.assert_allclose(tpr, [0, 0.5, 1])
    assert roc_auc(fpr, tpr) == pytest.approx(0.5)


def test_tpr_at_1pct_fpr_hand_case():
    # 200 non-members: 1% FPR allows 2 false positives. Members: 100, 30 of them above
    # every non-member, 20 more between the 2nd and 3rd highest non-member.
    rng = np.random.default_rng(0)
    nonmembers = np.sort(rng.random(200))  # in [0, 1)
    top2, third = nonmembers[-2], nonmembers[-3]
    members = np.r_[np.full(30, 5.0), np.full(20, (top2 + third) / 2), np.full(50, -1.0)]
    s = attack_summary(members, nonmembers)
    assert s["tpr_at_1pct_fpr"] == pytest.approx(0.5)
    assert s["n_members"] == 100 and s["n_nonmembers"] == 200
    assert s["fpr_resolution"] == pytest.approx(0.005)


def test_auc_perfect_and_chance():
    rng = np.random.default_rng(1)
    perfect = attack_summary(rng.random(50) + 2.0, rng.random(60))
    assert perfect["auc"] == pytest.approx(1.0) and perfect["tpr_at_1pct_fpr"] == 1.0
    assert perfect["auc_std"] == pytest.approx(0.0, abs=1e-6)
    same = attack_summary(rng.normal(size=4000), rng.normal(size=4000))
    assert abs(same["auc"] - 0.5) < 0.02
    assert same["auc_std"] == pytest.approx(0.0065, abs=0.001)  # sqrt(1/12 * (1/n+1/m))
    assert same["tpr_at_1pct_fpr"] < 0.03


# --- memorisation -----------------------------------------------------------------------------


def test_copies_of_training_volumes_are_caught():
    train, test = _volumes(20, 0), _volumes(10, 1)
    synthetic = train[[3, 7, 7, 12]] + 0.01  # copies with a shift: correlation stays 1
    r = memorisation(synthetic, train, test, features_fn=lambda v: v.reshape(len(v), -1)[:, :50])
    assert r["label"] == EVALUATION_LABEL
    assert r["chance_level"] == pytest.approx(20 / 30)
    assert r["image"]["fraction_closer_to_train"] == 1.0
    assert r["features"]["fraction_closer_to_train"] == 1.0
    pairs = r["image"]["closest_pairs"]
    assert {p["synthetic_index"]: p["train_index"] for p in pairs} == {0: 3, 1: 7, 2: 7, 3: 12}
    assert all(p["train_score"] == pytest.approx(1.0, abs=1e-5) for p in pairs)
    assert all(p["test_score"] < 0.3 for p in pairs)
    assert r["features"]["closest_pairs"][0]["train_score"] == pytest.approx(
        0.01 * 50**0.5, rel=1e-3
    )
    json.dumps(r)


def test_fresh_samples_sit_at_chance_level():
    # Smooth random volumes near a shared template: neighbours are meaningful, no copies.
    rng = np.random.default_rng(2)
    template = rng.random(SHAPE, dtype=np.float32)

    def draw(n):
        return template + 0.3 * rng.random((n, *SHAPE), dtype=np.float32)

    train, test, synthetic = draw(90), draw(30), draw(400)
    r = memorisation(synthetic, train, test, top_k=3)
    assert r["chance_level"] == pytest.approx(0.75)
    assert abs(r["image"]["fraction_closer_to_train"] - 0.75) < 0.07
    assert abs(r["image"]["reference_fraction"] - 90 / 119) < 0.15
    assert len(r["image"]["closest_pairs"]) == 3


def test_chunking_does_not_change_neighbours():
    from dpsynth.evaluation.audit import _nearest

    q, b = _volumes(7, 3), _volumes(11, 4)
    i1, s1 = _nearest(q, b, "correlation", chunk=3)
    i2, s2 = _nearest(q, b, "correlation", chunk=100)
    np.testing.assert_array_equal(i1, i2)
    np.testing.assert_allclose(s1, s2, rtol=1e-5)
    full = np.corrcoef(q.reshape(7, -1), b.reshape(11, -1))[:7, 7:]
    np.testing.assert_array_equal(i1, full.argmax(1))
    np.testing.assert_allclose(s1, full.max(1), rtol=1e-4)
    i3, _ = _nearest(b, b, "euclidean", exclude_self=True, chunk=4)
    assert np.all(i3 != np.arange(11))


def test_memorisation_rejects_mismatched_shapes():
    with pytest.raises(DpsynthError, match="test: volume shape"):
        memorisation(_volumes(2, 0), _volumes(3, 1), np.zeros((3, 5, 8, 8)))


# --- membership inference ----------------------------------------------------------------------


class TinyPipeline(torch.nn.Module):
    """The pipeline contract (encode, denoising_loss) around an MLP denoiser on pooled latents."""

    num_train_timesteps = 150

    def __init__(self):
        super().__init__()
        latent = SHAPE[0] * (SHAPE[1] // 4) * (SHAPE[2] // 4)
        self.net = torch.nn.Sequential(
            torch.nn.Linear(latent + 1, 256), torch.nn.SiLU(), torch.nn.Linear(256, latent)
        )
        betas = torch.linspace(1e-4, 7e-2, self.num_train_timesteps)
        self.register_buffer("alphas_cumprod", torch.cumprod(1 - betas, 0))

    def encode(self, volumes):
        return torch.nn.functional.avg_pool3d(volumes, (1, 4, 4)) * 4.0

    def denoising_loss(self, latents, attributes_raw, timesteps, noise):
        a = self.alphas_cumprod[timesteps].view(-1, 1, 1, 1, 1)
        noisy = (a.sqrt() * latents + (1 - a).sqrt() * noise).flatten(1)
        t = (timesteps.float() / self.num_train_timesteps)[:, None]
        return ((self.net(torch.cat([noisy, t], 1)) - noise.flatten(1)) ** 2).mean(1)


def _overfit(pipe, volumes, steps=400):
    torch.manual_seed(0)
    opt = torch.optim.Adam(pipe.parameters(), lr=2e-3)
    latents = pipe.encode(torch.as_tensor(volumes)[:, None])
    for _ in range(steps):
        t = torch.randint(0, 110, (len(latents),))
        loss = pipe.denoising_loss(latents, None, t, torch.randn_like(latents)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_default_timesteps_follow_the_schedule():
    assert default_timesteps(150) == (5, 15, 30, 50, 75, 100)
    assert default_timesteps(30) == (1, 3, 6, 10, 15, 20)
    assert max(default_timesteps(4)) < 4


def test_membership_inference_detects_an_overfit_model():
    members, nonmembers = _volumes(8, 10), _volumes(8, 11)
    pipe = TinyPipeline()
    _overfit(pipe, members)
    r = membership_inference(pipe, (members, _attributes(8)), (nonmembers, _attributes(8)))
    assert r["volume"]["auc"] >= 0.9
    assert r["patient"]["n_members"] == 4 and r["patient"]["auc"] >= 0.9
    assert r["volume"]["n_members"] == 8 and r["timesteps"] == [5, 15, 30, 50, 75, 100]
    assert pipe.training  # the audit restores the module's mode


def test_losses_use_the_same_noise_for_every_volume():
    # Identical volumes must get identical losses, whatever their position in the batch.
    pipe = TinyPipeline()
    v = np.repeat(_volumes(1, 5), 5, axis=0)
    loss = denoising_losses(pipe, v, _attributes(5), (10, 50), batch_size=2)
    np.testing.assert_allclose(loss, loss[0], rtol=1e-6)
    assert not np.allclose(denoising_losses(pipe, v[:1], _attributes(1), (10, 50), seed=1), loss[0])
    r = membership_inference(pipe, (v[:3], _attributes(3)), (v[3:], _attributes(2)))
    assert r["patient"] is None  # 3 rows cannot be ED/ES pairs and no ids were given


def test_explicit_patient_ids_group_volumes():
    pipe = TinyPipeline()
    members = (_volumes(6, 0), _attributes(6), np.array([0, 0, 0, 1, 1, 2]))
    r = membership_inference(pipe, members, (_volumes(4, 1), _attributes(4)), n_noise=1)
    assert r["patient"]["n_members"] == 3 and r["patient"]["n_nonmembers"] == 2


def test_privacy_audit_combines_both_and_is_json():
    pipe = TinyPipeline()
    members, nonmembers = (_volumes(4, 0), _attributes(4)), (_volumes(4, 1), _attributes(4))

    class Referee:  # the referee's interface: features(volumes) -> (n, D)
        def features(self, volumes):
            return volumes.mean(axis=(2, 3))

    r = privacy_audit(
        pipe, members, nonmembers, members[0][:2], Referee(), timesteps=(10,), n_noise=1
    )
    assert r["label"] == EVALUATION_LABEL
    assert r["memorisation"]["image"]["fraction_closer_to_train"] == 1.0
    assert r["memorisation"]["features"]["closest_pairs"][0]["train_score"] == pytest.approx(0)
    assert r["membership_inference"]["n_noise"] == 1
    json.loads(json.dumps(r))
    with pytest.raises(DpsynthError, match="members: expected volumes"):
        privacy_audit(pipe, (members[0], members[1][:, :3]), nonmembers, members[0])
    empty = (np.zeros((0, *SHAPE), np.float32), np.zeros((0, N_ATTRIBUTES), np.float32))
    with pytest.raises(DpsynthError, match="nonmembers: expected volumes"):
        privacy_audit(pipe, members, empty, members[0])


def test_audit_runs_on_the_real_latent_diffusion_pipeline():
    """Contract check against dpsynth's own pipeline (tiny autoencoder and denoiser)."""
    from dpsynth.diffusion import LatentDiffusion
    from dpsynth.models import KLAutoencoder, LatentDenoiser

    torch.manual_seed(0)
    ae = KLAutoencoder(channels=8, channel_multipliers=(1, 2, 2), num_res_blocks=1, norm_groups=4)
    den = LatentDenoiser(
        in_channels=1, channels=8, channel_multipliers=(1, 2), attention_levels=(False, True),
        num_res_blocks=1, num_heads=2, num_slices=SHAPE[0], time_embed_dim=16,
        attribute_embed_dim=8, dropout=0.1, norm_groups=4,
    )  # fmt: skip
    pipe = LatentDiffusion(ae, den, volume_shape=SHAPE, num_train_timesteps=30).train()
    v = np.repeat(_volumes(1, 0), 4, axis=0)
    r = membership_inference(pipe, (v[:2], _attributes(2)), (v[2:], _attributes(2)), n_noise=2)
    assert r["timesteps"] == [1, 3, 6, 10, 15, 20]
    # Same volume and attributes on both sides, dropout off during the audit: no signal.
    assert r["volume"]["auc"] == pytest.approx(0.5)
    assert pipe.training


def test_membership_inference_scores_a_seeded_subset_of_whole_member_patients():
    members, nonmembers = _volumes(16, 10), _volumes(4, 11)
    pipe = TinyPipeline()
    _overfit(pipe, members)
    r = membership_inference(
        pipe, (members, _attributes(16)), (nonmembers, _attributes(4)), member_patients=2, seed=3
    )
    assert r["member_volumes"] == {"scored": 4, "of": 16}
    assert r["patient"]["n_members"] == 2 and r["volume"]["n_members"] == 4
    assert r["volume"]["auc"] >= 0.9
    every = membership_inference(pipe, (members, _attributes(16)), (nonmembers, _attributes(4)))
    assert every["member_volumes"] is None and every["volume"]["n_members"] == 16


def test_member_subset_takes_whole_patients_from_the_seed():
    groups = np.arange(16) // 2
    picks = {tuple(_member_subset(groups, 16, 3, seed)) for seed in range(5)}
    assert len(picks) > 1  # the seed decides
    for pick in picks:
        assert len(pick) == 6 and set(pick) == {i ^ 1 for i in pick}  # ED and ES together
    np.testing.assert_array_equal(
        _member_subset(groups, 16, 3, 0), _member_subset(groups, 16, 3, 0)
    )
    np.testing.assert_array_equal(_member_subset(groups, 16, 8, 0), np.arange(16))
    np.testing.assert_array_equal(_member_subset(None, 5, 2, 0).shape, (2,))  # volumes as patients
