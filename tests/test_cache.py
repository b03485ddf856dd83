"""The cache reader and torch Datasets over a cache written with CacheWriter."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch

from dpsynth.app.workflow import refuse_same_data
from dpsynth.data.cache import SPLITS, Cache, CacheWriter, PatientDataset, VolumeDataset
from dpsynth.errors import DpsynthError

SHAPE = (5, 16, 16)


def _write_cache(path, n_patients=10, with_masks=True, seed=0):
    rng = np.random.default_rng(seed)
    path.mkdir()
    writer = CacheWriter(path, capacity=2 * n_patients, shape=SHAPE)
    images = rng.random((n_patients, 2, *SHAPE), dtype=np.float32)
    attributes = rng.normal(100, 20, (n_patients, 2, 14)).astype(np.float32)
    attributes[0, :, 8] = np.nan  # an unknown AGE
    attributes[:, :, 11] = [1, 0]  # ESED of rows ED, ES
    for p in range(n_patients):
        masks = rng.integers(0, 4, (2, *SHAPE), dtype=np.uint8) if with_masks else None
        writer.add_patient(f"p{p:02d}", images[p], masks, attributes[p])
    cuts = (0.6 * n_patients, 0.8 * n_patients)  # fixed 60/20/20 counts, in patient order
    splits = {
        f"p{p:02d}": SPLITS[int(np.searchsorted(cuts, p, side="right"))] for p in range(n_patients)
    }
    writer.finish(splits, spacing=(10, 2, 2), layout="test")
    return images, attributes


def test_round_trip_is_lazy_and_exact(tmp_path):
    images, attributes = _write_cache(tmp_path / "c")
    cache = Cache(tmp_path / "c")
    assert isinstance(cache.images, np.memmap) and isinstance(cache.masks, np.memmap)
    assert cache.images.dtype == np.float16 and cache.images.shape == (20, *SHAPE)
    np.testing.assert_allclose(cache.images, images.reshape(20, *SHAPE), atol=5e-4)
    np.testing.assert_array_equal(cache.attributes, attributes.reshape(20, 14))  # NaN kept
    assert cache.patients[:4].tolist() == ["p00", "p00", "p01", "p01"]
    assert cache.phases[:4].tolist() == ["ED", "ES", "ED", "ES"]
    assert cache.shape == SHAPE and cache.spacing == (10, 2, 2)
    assert cache.meta["counts"] == {"patients": 10, "volumes": 20, "train": 6, "val": 2, "test": 2}
    rows = cache.patient_rows("train")
    assert rows.shape == (6, 2) and (cache.phases[rows[:, 0]] == "ED").all()
    assert (cache.patients[rows[:, 0]] == cache.patients[rows[:, 1]]).all()
    assert sorted(cache.volume_indices("train")) == sorted(rows.ravel())
    assert len(cache.volume_indices()) == 20
    with pytest.raises(DpsynthError, match="unknown split 'holdout'"):
        cache.volume_indices("holdout")


def test_cache_is_named_by_a_random_id_and_keeps_its_digest_inside(tmp_path):
    _write_cache(tmp_path / "a")
    _write_cache(tmp_path / "b")
    _write_cache(tmp_path / "c", seed=1)
    a, b, c = (Cache(tmp_path / n) for n in "abc")
    assert len({a.cache_id, b.cache_id, c.cache_id}) == 3  # random, even for equal data
    assert a.meta["content_digest"] == b.meta["content_digest"] != c.meta["content_digest"]
    assert a.same_data(b) and not a.same_data(c)
    assert "fingerprint" not in a.meta


def test_shared_patients_finds_any_overlap_not_only_equal_data(tmp_path):
    """Review finding: the public-vs-private refusal saw only equal caches; a cache holding
    a subset of the private patients (or all but one) passed it."""
    _write_cache(tmp_path / "all", n_patients=10)
    _write_cache(tmp_path / "fewer", n_patients=4)  # same seed: the first patients' volumes
    _write_cache(tmp_path / "other", n_patients=10, seed=1)
    full, fewer, other = (Cache(tmp_path / n) for n in ("all", "fewer", "other"))
    assert not full.same_data(fewer)  # not the same data...
    assert full.shared_patients(fewer.patient_digests) == 4  # ...but overlapping
    assert fewer.shared_patients(full.patient_digests) == 4
    assert full.shared_patients(other.patient_digests) == 0
    assert full.shared_patients(full.patient_digests) == 10
    digests = full.patient_digests
    assert len(digests) == 10 and len(set(digests)) == 10 and len(digests[0]) == 32
    with pytest.raises(DpsynthError, match=r"hold the same data \(4 patients in both\)"):
        refuse_same_data(tmp_path / "fewer", tmp_path / "all")
    refuse_same_data(tmp_path / "other", tmp_path / "all")  # no patient in common: allowed


def test_cache_without_an_id_asks_to_prepare_again(tmp_path):
    _write_cache(tmp_path / "old")
    meta = json.loads((tmp_path / "old" / "meta.json").read_text())
    del meta["cache_id"]  # an older dpsynth wrote a content fingerprint instead
    (tmp_path / "old" / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(DpsynthError, match=r"no cache_id .* re-run `dpsynth prepare`"):
        Cache(tmp_path / "old")


def test_cache_of_the_old_attribute_format_asks_to_prepare_again(tmp_path):
    _write_cache(tmp_path / "old")
    meta = json.loads((tmp_path / "old" / "meta.json").read_text())
    meta["format_version"] = 1  # ANGLE in [0, 360) of the stored array, DEPTH = myocardium
    (tmp_path / "old" / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(
        DpsynthError, match=r"^[^\n]*cache format 1 is not 2 .*re-run `dpsynth prepare`$"
    ):
        Cache(tmp_path / "old")


def test_datasets_shapes_dtypes_and_batched_path(tmp_path):
    images, attributes = _write_cache(tmp_path / "c", with_masks=False)
    cache = Cache(tmp_path / "c")
    assert cache.masks is None

    volumes = VolumeDataset(cache, "train")
    assert len(volumes) == 12
    item = volumes[3]
    row = int(item["index"])
    assert item["image"].shape == (1, *SHAPE) and item["image"].dtype == torch.float32
    assert item["attributes"].shape == (14,) and item["attributes"].dtype == torch.float32
    np.testing.assert_array_equal(item["image"][0].numpy(), cache.images[row].astype(np.float32))

    patients = PatientDataset(cache, "test")
    item = patients[1]
    assert item["image"].shape == (2, 1, *SHAPE) and item["attributes"].shape == (2, 14)
    assert item["attributes"][:, 11].tolist() == [1.0, 0.0]  # ESED: ED then ES

    # The batched fast path returns exactly what per-item loading returns.
    for dataset in (volumes, PatientDataset(cache, "train")):
        batch = next(iter(dataset.loader(batch_size=4, shuffle=True)))
        per_item = torch.stack([dataset[int(i)]["image"] for i in _positions(dataset, batch)])
        torch.testing.assert_close(batch["image"], per_item)
        assert batch["image"].shape[0] == 4

    default = next(iter(torch.utils.data.DataLoader(volumes, batch_size=5)))
    assert default["image"].shape == (5, 1, *SHAPE) and default["index"].shape == (5,)


def _positions(dataset, batch) -> list[int]:
    """Dataset positions of a batch, from the cache rows it reports."""
    first_rows = batch["index"].reshape(len(batch["index"]), -1)[:, 0].tolist()
    rows = dataset.rows.reshape(len(dataset), -1)[:, 0].tolist()
    return [rows.index(r) for r in first_rows]


def test_broken_cache_is_a_user_error(tmp_path):
    with pytest.raises(DpsynthError, match="not a prepared cache"):
        Cache(tmp_path)
    _write_cache(tmp_path / "c", n_patients=3)
    table = tmp_path / "c" / "attributes.csv"
    lines = table.read_text().splitlines()
    table.write_text("\n".join([lines[0], lines[2], lines[1], *lines[3:]]) + "\n")
    with pytest.raises(DpsynthError, match="attributes.csv: rows must come in pairs ED then ES"):
        Cache(tmp_path / "c")


def test_masks_in_items_and_pickling_reopens_memmaps(tmp_path):
    _write_cache(tmp_path / "c", n_patients=4)
    cache = Cache(tmp_path / "c")
    item = PatientDataset(cache, with_masks=True)[2]
    assert item["mask"].shape == (2, 1, *SHAPE) and item["mask"].dtype == torch.uint8
    np.testing.assert_array_equal(item["mask"][:, 0].numpy(), cache.masks[4:6])
    blob = pickle.dumps(cache)
    assert len(blob) < 1000  # a path, not the arrays
    clone = pickle.loads(blob)
    assert isinstance(clone.images, np.memmap)
    np.testing.assert_array_equal(clone.attributes, cache.attributes)
