"""torchrun-style DP-SGD on 2 CPU processes (gloo) gives the single-process mechanism."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_dpsgd import Dot, ManyZeroGrads, TinyDenoiser, denoise_loss, dot_loss, flat_params

from dpsynth.privacy.dpsgd import PatientDPSGD

WORLD = 2
SIGMA, CLIP, Q, N = 2.0, 0.5, 0.25, 16  # expected global batch 4: noise std 0.25


def engine(model, *, sigma, clip, distributed, noise_seed=0, secure_rng=False):
    return PatientDPSGD(
        model,
        torch.optim.SGD(model.parameters(), lr=1.0),
        noise_multiplier=sigma,
        max_grad_norm=clip,
        sample_rate=Q,
        num_records=N,
        physical_batch_size=2,
        generator=torch.Generator().manual_seed(noise_seed),
        sampling_seed=5,
        distributed=distributed,
        secure_rng=secure_rng,
    )


def worker(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    torch.manual_seed(rank)  # models differ per rank until the engine syncs them
    g = torch.Generator().manual_seed(0)
    data = {
        "x": torch.randn(N, 2, 1, 5, 8, 8, generator=g),
        "a": torch.randn(N, 2, 14, generator=g),
        "y": torch.randn(N, 2, 1, 5, 8, 8, generator=g),
    }
    result = {}

    # 1. Noise: zero data gradients, so the update is the noise alone.
    noisy = engine(ManyZeroGrads(), sigma=SIGMA, clip=CLIP, distributed=True, noise_seed=rank)
    local = next(noisy.logical_batches(0))
    noisy.step({"x": torch.ones(len(local), 2, 4)}, dot_loss)
    result["noise_update"] = noisy.model.w.detach().clone()

    # 2. Clipped gradients without noise: identical to one process on the global batch.
    model = TinyDenoiser()
    dp = engine(model, sigma=0.0, clip=0.05, distributed=True)
    start = copy.deepcopy(model)  # rank 0's weights, after the engine's broadcast
    batches = list(dp.logical_batches(0))
    for b in batches:
        dp.step({k: v[b] for k, v in data.items()}, denoise_loss)
    result.update(
        params=flat_params(model),
        local_batches=batches,
        steps=dp.steps_taken,
        chunks_by_path=dict(dp._chunks_by_path),
        tap_checks=dp.tap_checks,
    )
    if rank == 0:
        single = engine(start, sigma=0.0, clip=0.05, distributed=False)
        single_batches = list(single.logical_batches(0))
        for b in single_batches:
            single.step({k: v[b] for k, v in data.items()}, denoise_loss)
        result.update(
            single_params=flat_params(start),
            single_batches=single_batches,
            single_steps=single.steps_taken,
        )

    # 3. secure_rng: fresh OS entropy per epoch, still one global batch cut between ranks.
    secure = engine(Dot(3), sigma=1.0, clip=1.0, distributed=True, secure_rng=True)
    result["secure_batches"] = [b for epoch in range(10) for b in secure.logical_batches(epoch)]
    torch.save(result, f"{out_dir}/rank{rank}.pt")
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    mp.spawn(worker, args=(str(tmp / "init"), str(tmp)), nprocs=WORLD, join=True)
    return [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def test_noise_std_on_averaged_gradient_equals_single_process(results):
    update = results[0]["noise_update"]
    assert torch.equal(update, results[1]["noise_update"])  # all ranks apply the same step
    # Noise on every rank would give √2·σC/B; per-rank expected batch B would give 2·σC/B.
    assert update.std().item() == pytest.approx(SIGMA * CLIP / (Q * N), rel=0.03)


def test_update_and_accounting_match_single_process(results):
    r0, r1 = results
    assert torch.equal(r0["params"], r1["params"])
    assert torch.allclose(r0["params"], r0["single_params"], atol=1e-6)
    assert r0["steps"] == r1["steps"] == r0["single_steps"] == int(1 / Q)
    for a, b, whole in zip(
        r0["local_batches"], r1["local_batches"], r0["single_batches"], strict=True
    ):
        assert np.array_equal(np.sort(np.concatenate([a, b])), np.sort(whole))
        _assert_one_batch_cut_between_ranks(a, b)


def test_each_rank_checks_its_own_layer_taps_before_using_them(results):
    """Each rank runs its own check before it uses the taps on its chunks, and the parameters
    above still equal one process's: the taps gave per-patient gradients on every rank."""
    for r in results:
        assert r["tap_checks"] >= 1 and r["chunks_by_path"]["layer taps"] >= 1
        assert r["chunks_by_path"]["torch.func"] == 0


def _assert_one_batch_cut_between_ranks(a: np.ndarray, b: np.ndarray) -> None:
    """`a`, `b` are ranks 0 and 1's shares batch[0::2], batch[1::2] of ONE sorted batch."""
    whole = np.sort(np.concatenate([a, b]))
    assert not set(a) & set(b)  # no patient on two ranks in one step
    assert np.array_equal(a, whole[0::2]) and np.array_equal(b, whole[1::2])


def test_secure_rng_ranks_share_each_fresh_sampling_seed(results):
    r0, r1 = results
    assert len(r0["secure_batches"]) == len(r1["secure_batches"]) == 10 * int(1 / Q)
    sizes = []
    for a, b in zip(r0["secure_batches"], r1["secure_batches"], strict=True):
        _assert_one_batch_cut_between_ranks(a, b)
        sizes.append(len(a) + len(b))
    assert 2.5 < np.mean(sizes) < 5.5  # Poisson with rate Q over N = 16: mean 4, s.e. 0.27
