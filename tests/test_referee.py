"""Referee: trains on tiny phantoms, gives masks/phase/features, saves and loads."""

import csv
import json
import uuid

import numpy as np
import pytest
import torch
from conftest import stored_channels_last

from dpsynth.attributes import ATTRIBUTES, INDEX, N_ATTRIBUTES
from dpsynth.data.cache import FORMAT_VERSION
from dpsynth.data.measure import measure_volume
from dpsynth.data.volumes import VolumeSet
from dpsynth.errors import DpsynthError
from dpsynth.evaluation.referee import (
    CONSTANT_LR,
    Referee,
    fit_referee,
    label_map,
    lr_recipe,
    train_referee,
    warmup_cosine,
)

SPACING = (10.0, 1.8269, 1.8269)


def phantoms(n: int, shape=(5, 16, 16), seed: int = 0) -> VolumeSet:
    """Tiny heart-like volumes: LV disk (1) in a myocardial ring (2) beside an RV disk (3).

    Even rows are ED, odd rows ES (smaller LV); attributes are the masks' own measurements.
    """
    rng = np.random.default_rng(seed)
    slices, h, w = shape
    rows, cols = np.mgrid[:h, :w]
    volumes, masks = np.zeros((n, *shape), np.float32), np.zeros((n, *shape), np.uint8)
    attributes = np.full((n, N_ATTRIBUTES), np.nan, np.float32)
    for i in range(n):
        ed = i % 2 == 0
        r_lv = rng.uniform(2.5, 3.5) if ed else rng.uniform(1.2, 2.2)
        lv_d = np.hypot(rows - h / 2, cols - w / 2 + 2)
        rv_d = np.hypot(rows - h / 2, cols - w / 2 - 4.5)
        for z in range(rng.integers(2, slices + 1)):
            m = masks[i, z]
            m[lv_d < r_lv + 1.5] = 2
            m[lv_d < r_lv] = 1
            m[(rv_d < rng.uniform(1.5, 2.5)) & (m == 0)] = 3
        volumes[i] = np.array([0.1, 0.8, 0.35, 0.7], np.float32)[masks[i]]
        volumes[i] += rng.normal(0, 0.03, shape).astype(np.float32)
        measured = measure_volume(masks[i], SPACING)
        phase = "ED" if ed else "ES"
        attributes[i, INDEX[f"LV{phase}V"]] = measured["LV_ML"]
        attributes[i, INDEX[f"RV{phase}V"]] = measured["RV_ML"]
        attributes[i, INDEX[f"MYO{phase}THICK"]] = measured["MYO_THICK"]
        attributes[i, INDEX["DEPTH"]] = measured["DEPTH"]
        attributes[i, INDEX["ESED"]] = 1.0 if ed else 0.0
        attributes[i, INDEX["LVEF"]] = rng.uniform(40, 70)
    return VolumeSet(
        volumes=np.clip(volumes, 0, 1),
        attributes=attributes,
        spacing=SPACING,
        names=[f"p{i // 2:03d}_{'ED' if i % 2 == 0 else 'ES'}" for i in range(n)],
        masks=masks,
        patients=np.array([f"p{i // 2:03d}" for i in range(n)]),
        source="phantoms",
    )


def write_cache(path, vols, splits):
    """A prepared cache in the ARCHITECTURE.md layout (rows: ED then ES per patient)."""
    path.mkdir(parents=True, exist_ok=True)
    np.save(path / "images.npy", vols.volumes.astype(np.float16))
    np.save(path / "masks.npy", vols.masks)
    with open(path / "attributes.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["patient", "phase", "split", *ATTRIBUTES])
        for i, row in enumerate(vols.attributes):
            values = ["" if np.isnan(x) else x for x in row]
            w.writerow([f"p{i // 2}", "ED" if i % 2 == 0 else "ES", splits[i // 2], *values])
    meta = {
        "format_version": FORMAT_VERSION,
        "shape": list(vols.shape),
        "spacing": list(SPACING),
        "has_masks": True,
        "cache_id": uuid.uuid4().hex,
    }
    (path / "meta.json").write_text(json.dumps(meta))


@pytest.fixture(scope="module")
def trained():
    train = phantoms(8)
    return train, fit_referee(train, epochs=12, batch_size=4, lr=3e-3, channels=(8, 16, 32), seed=0)


def test_training_reduces_loss_and_outputs_have_the_right_shapes(trained):
    train, referee = trained
    losses = referee.meta["loss_per_epoch"]
    assert len(losses) == 12 and losses[-1] < 0.7 * losses[0]
    masks = referee.segment(train.volumes)
    assert masks.shape == (8, 5, 16, 16) and masks.dtype == np.uint8
    assert set(np.unique(masks)) <= {0, 1, 2, 3}
    # Learned something: more than half of the foreground voxels are labelled right.
    fg = train.masks > 0
    assert (masks[fg] == train.masks[fg]).mean() > 0.5
    prob = referee.predict_phase(train.volumes)
    assert prob.shape == (8,) and np.all((prob >= 0) & (prob <= 1))
    assert referee.features(train.volumes).shape == (8, 32)


def test_save_load_roundtrip(trained, tmp_path):
    train, referee = trained
    path = referee.save(tmp_path / "ref")
    assert sorted(p.name for p in path.iterdir()) == [
        "EVALUATION_ONLY.txt", "referee.json", "referee.safetensors",
    ]  # fmt: skip
    assert "never release" in (path / "EVALUATION_ONLY.txt").read_text()
    loaded = Referee.load(path)
    np.testing.assert_array_equal(loaded.features(train.volumes), referee.features(train.volumes))
    np.testing.assert_array_equal(loaded.segment(train.volumes), referee.segment(train.volumes))


def test_the_learning_rate_rises_then_decays_to_zero_for_any_run_length():
    """`warmup_cosine`: 1/25 of the peak at the first step, the peak after the first tenth,
    then falling to ~0 at the last step; short runs (1, 2 and 10 steps, where torch's
    OneCycleLR divides by zero) work too and end low."""
    factor = warmup_cosine(100)
    values = [factor(step) for step in range(100)]
    assert values[0] == pytest.approx(1 / 25) and values[10] == pytest.approx(1.0)
    assert all(a < b for a, b in zip(values[:10], values[1:11], strict=True))
    assert all(a > b for a, b in zip(values[10:-1], values[11:], strict=True))
    assert values[-1] < 1e-3 and values[55] == pytest.approx(0.5, abs=0.02)
    for total in (1, 2, 10):
        short = [warmup_cosine(total)(step) for step in range(total)]
        assert all(0.0 <= v <= 1.0 for v in short) and max(short) > 0.0
    assert warmup_cosine(10)(9) < 0.1 and warmup_cosine(10)(1) == 1.0


def test_fit_referee_steps_the_schedule_once_per_batch(monkeypatch):
    """`fit_referee` asks `warmup_cosine` for its whole run (epochs x batches) and takes one
    step of it per batch; the meta records the recipe (it sets FD-referee's scale)."""
    from dpsynth.evaluation import referee as referee_module

    asked: list[int] = []
    totals: list[int] = []

    def recording(total_steps: int):
        totals.append(total_steps)
        factor = warmup_cosine(total_steps)
        return lambda step: asked.append(step) or factor(step)

    monkeypatch.setattr(referee_module, "warmup_cosine", recording)
    train = phantoms(6)
    referee = fit_referee(train, epochs=3, batch_size=2, channels=(4, 8), seed=0)
    assert totals == [9]
    assert asked == list(range(10))  # step 0 at creation, then one per batch
    assert referee.meta["lr"] == {"schedule": "warmup_cosine", "peak": 3e-3, "steps": 9}
    assert lr_recipe(referee.meta) == "warmup_cosine, peak 0.003"
    assert lr_recipe({"downsample": 2}) == CONSTANT_LR  # a meta written before the schedule


def test_label_maps_are_argmax_labels_with_ties_to_the_first_class():
    """`label_map` (the fast `max(1).indices`) gives `argmax(1)`'s labels, the first maximal
    class on ties, for 3D and 2D logits and for channels-last ones, and NaN's class."""
    g = torch.Generator().manual_seed(0)
    for shape in ((2, 4, 3, 8, 8), (5, 4, 8, 8)):
        logits = torch.randint(0, 3, shape, generator=g).float()  # many ties
        labels = label_map(logits)
        assert labels.dtype == torch.uint8 and labels.shape == shape[:1] + shape[2:]
        assert torch.equal(labels, logits.argmax(1).to(torch.uint8))
        assert set(labels.unique().tolist()) == {0, 1, 2, 3}
    tied = torch.zeros(1, 4, 2, 2)
    tied[:, 2:] = 1.0
    assert torch.equal(label_map(tied), torch.full((1, 2, 2), 2, dtype=torch.uint8))
    tied_cl = torch.randint(0, 3, (2, 4, 3, 8, 8), generator=g).float()
    cl = tied_cl.contiguous(memory_format=torch.channels_last_3d)
    assert torch.equal(label_map(cl), cl.argmax(1).to(torch.uint8))
    with_nan = torch.zeros(1, 4, 2, 2)
    with_nan[0, 3, 0, 0] = float("nan")  # NaN wins, in both
    assert label_map(with_nan)[0, 0, 0] == 3 == with_nan.argmax(1)[0, 0, 0]


def test_a_loaded_referee_convolves_channels_last_with_the_same_values(trained, tmp_path):
    """The referee's U-Net is stored channels-last (faster oneDNN 3D convolutions), also after
    save/load; it reads as the default layout does, to float rounding."""
    import copy

    train, referee = trained
    loaded = Referee.load(referee.save(tmp_path / "ref"))

    assert stored_channels_last(loaded.net) and all(stored_channels_last(loaded.net))
    plain = copy.deepcopy(loaded.net).to(memory_format=torch.contiguous_format)
    assert not any(stored_channels_last(plain))
    x = torch.from_numpy(train.volumes[:4]).unsqueeze(1).float()
    with torch.no_grad():
        got, want = loaded.net(x), plain(x)
    assert got[0].is_contiguous()  # the logits: default layout for every caller
    for g, w in zip(got, want, strict=True):  # logits, ED logit, pooled features
        torch.testing.assert_close(g, w, atol=1e-4, rtol=0)


def test_a_referee_reading_at_half_resolution_segments_at_the_input_grid(tmp_path):
    """downsample=2 (the demo's referee): it learns from 2x2-averaged volumes, returns masks
    at the input's grid, and keeps its reading scale through save/load."""
    train = phantoms(8, shape=(5, 32, 32))
    referee = fit_referee(train, epochs=20, batch_size=4, lr=3e-3, channels=(8, 16, 32), seed=0,
                          downsample=2)  # fmt: skip
    masks = referee.segment(train.volumes)
    assert masks.shape == (8, 5, 32, 32)
    fg = train.masks > 0
    assert (masks[fg] == train.masks[fg]).mean() > 0.5
    loaded = Referee.load(referee.save(tmp_path / "ref"))
    assert loaded.meta["downsample"] == loaded.net.downsample == 2
    np.testing.assert_array_equal(loaded.segment(train.volumes), masks)
    with pytest.raises(DpsynthError, match="not divisible by 2"):
        loaded.net(torch.zeros(1, 1, 5, 30, 31))


def test_rejects_bad_inputs():
    train = phantoms(2)
    train.masks = None
    with pytest.raises(DpsynthError, match="masks"):
        fit_referee(train, epochs=1)
    with pytest.raises(DpsynthError, match="divisible by 4"):
        Referee.create(channels=(8, 16)).segment(np.zeros((1, 5, 18, 18), np.float32))


def test_train_referee_from_cache_uses_the_train_split(tmp_path):
    write_cache(tmp_path / "cache", phantoms(8), ["train", "train", "test", "test"])
    path = train_referee(tmp_path / "cache", tmp_path / "ref", epochs=1, channels=(8, 16))
    referee = Referee.load(path)
    assert referee.meta["n_train"] == 4 and referee.meta["trained_on"].endswith("[train]")
    assert referee.segment(phantoms(2).volumes).shape == (2, 5, 16, 16)
