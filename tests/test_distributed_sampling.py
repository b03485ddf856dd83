"""`dpsynth sample` under torchrun: ranks split the cohort, the union is the 1-process set."""

from __future__ import annotations

import csv
import os
import subprocess
import sys

import numpy as np
import pytest

from dpsynth.app.demo import demo_assets
from dpsynth.attributes import ATTRIBUTES
from dpsynth.diffusion.pipeline import SAMPLE_BATCH, shard
from dpsynth.io import read_json, read_nifti

N = SAMPLE_BATCH + 5  # two batches: one per rank, the second one partial


@pytest.mark.parametrize("n", [1, 5, 16, 17, 33, 100])
@pytest.mark.parametrize("world", [1, 2, 3, 8])
def test_shards_are_disjoint_batch_aligned_and_cover_the_cohort(n, world):
    parts = [shard(n, r, world) for r in range(world)]
    assert [i for p in parts for i in range(n)[p]] == list(range(n))
    assert all(p.start % SAMPLE_BATCH == 0 for p in parts)
    sizes = [p.stop - p.start for p in parts]
    assert max(sizes) - min(sizes) <= SAMPLE_BATCH  # whole batches, spread evenly


def _sample(tmp_path, out: str, launcher: list[str], extra: list[str]) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # both runs on one thread: same arithmetic
    command = [*launcher, "sample", str(demo_assets() / "ldm"),
               "--n", str(N), "--attributes", str(tmp_path / "rows.csv"), "--steps", "2",
               "--seed", "3", "--out", str(tmp_path / out), *extra]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.parametrize(
    "extra",
    [[], ["--candidates", "2", "--selector", str(demo_assets() / "selector")]],
    ids=["plain", "best-of-2"],
)
def test_torchrun_sample_equals_single_process(tmp_path, extra):
    rows = np.random.default_rng(0).uniform(60, 200, size=(N, 2))  # a distinct row per volume
    with (tmp_path / "rows.csv").open("w", newline="") as f:  # ED rows: volumes to compare
        csv.writer(f).writerows(
            [["LVEDV", "RVEDV", "ESED"], *(r + [1] for r in rows.round(1).tolist())]
        )
    _sample(tmp_path, "single", [sys.executable, "-m", "dpsynth"], extra)
    # `--` ends torchrun's options: its argparse would take `--n` for its own `--nnodes`.
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    _sample(tmp_path, "ranks", [*torchrun, "--nproc_per_node=2", "-m", "dpsynth", "--"], extra)

    single, ranks = tmp_path / "single", tmp_path / "ranks"
    assert sorted(p.name for p in ranks.iterdir()) == sorted(p.name for p in single.iterdir())
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left
    a, b = read_json(single / "provenance.json"), read_json(ranks / "provenance.json")
    assert list(a["files"]) == list(b["files"])  # every volume listed, in cohort order
    assert a["files"]["attributes.csv"] == b["files"]["attributes.csv"]
    assert {k: v for k, v in a.items() if k != "files"} == {
        k: v for k, v in b.items() if k != "files"
    }
    assert b["candidates"] == (2 if extra else 1) and ("selector" in b) == bool(extra)
    volumes = [name for name in a["files"] if name.endswith(".nii.gz")]
    assert len(volumes) == N
    first = read_nifti(single / volumes[0])[0]
    for name in volumes:
        x, y = read_nifti(single / name)[0], read_nifti(ranks / name)[0]
        assert np.abs(x - y).max() < 1e-5, name
    assert np.abs(read_nifti(single / volumes[-1])[0] - first).max() > 1e-2  # not one volume
    with (ranks / "attributes.csv").open() as f:
        table = list(csv.DictReader(f))
    assert [float(r["LVEDV"]) for r in table] == rows[:, 0].round(1).tolist()
    assert set(table[0]) == {"file", *ATTRIBUTES}


def _worker(rank: int, init_file: str, out: str, fail_rank: int, result: str) -> None:
    """One rank of a 2-process job: record which volumes this rank samples."""
    import torch
    import torch.distributed as dist

    from dpsynth.app.sample import sample_to_folder
    from dpsynth.diffusion.pipeline import LatentDiffusion
    from dpsynth.errors import DpsynthError

    os.environ["WORLD_SIZE"] = "2"
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    calls, inner = [], LatentDiffusion.sample

    def recording(self, n, *args, start=0, **kwargs):
        calls.append((n, start))
        if rank == fail_rank:
            raise RuntimeError("out of memory")
        return inner(self, n, *args, start=start, **kwargs)

    LatentDiffusion.sample = recording
    try:
        sample_to_folder(demo_assets() / "ldm", out, n=N, steps=1)
        error = ""
    except DpsynthError as e:
        error = str(e)
    torch.save({"calls": calls, "error": error}, f"{result}{rank}.pt")
    dist.destroy_process_group()


def _spawn(tmp_path, fail_rank: int) -> list[dict]:
    import torch
    import torch.multiprocessing as mp

    args = (str(tmp_path / "init"), str(tmp_path / "out"), fail_rank, str(tmp_path / "rank"))
    mp.spawn(_worker, args=args, nprocs=2, join=True)
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]


def test_each_rank_samples_only_its_share(tmp_path):
    r0, r1 = _spawn(tmp_path, fail_rank=-1)
    assert r0 == {"calls": [(SAMPLE_BATCH, 0)], "error": ""}
    assert r1 == {"calls": [(N - SAMPLE_BATCH, SAMPLE_BATCH)], "error": ""}
    assert len(read_json(tmp_path / "out" / "provenance.json")["files"]) == N + 1


def test_a_failing_rank_fails_every_rank_and_writes_nothing(tmp_path):
    r0, r1 = _spawn(tmp_path, fail_rank=1)
    expected = "sample: rank 1 of 2 failed (RuntimeError: out of memory); nothing written"
    assert r0["error"] == r1["error"] == expected
    assert not [p.name for p in tmp_path.iterdir() if "out" in p.name]  # nor a staging folder
