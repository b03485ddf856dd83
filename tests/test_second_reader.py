"""Second reader: a 2D U-Net trained slice by slice on real volumes reads them back."""

import numpy as np
import pytest
from test_referee import phantoms

from dpsynth.data.measure import measure_volume
from dpsynth.errors import DpsynthError
from dpsynth.evaluation.second_reader import SecondReader, fit_second_reader
from dpsynth.privacy.outputs import EVALUATION_ONLY_LABEL


def test_second_reader_learns_tiny_phantoms_and_round_trips(tmp_path):
    train, test = phantoms(16, shape=(5, 16, 16), seed=1), phantoms(4, shape=(5, 16, 16), seed=2)
    reader = fit_second_reader(train, epochs=15, batch_size=16, lr=1e-2, channels=(8, 16))
    losses = reader.meta["loss_per_epoch"]
    assert reader.meta["steps"] == 15 * 5 and losses[-1] < 0.3 * losses[0]
    assert (
        reader.meta["label"] == EVALUATION_ONLY_LABEL and "never release" in reader.meta["release"]
    )

    masks = reader.segment(test.volumes)
    assert masks.shape == test.masks.shape and masks.dtype == np.uint8
    assert np.mean(masks == test.masks) > 0.99  # voxel agreement on unseen real volumes
    for mask, truth in zip(masks, test.masks, strict=True):
        got, want = measure_volume(mask, test.spacing), measure_volume(truth, test.spacing)
        # within 0.25 mL (7 voxels of 0.033 mL) of volumes 0.3 to 3.7 mL
        assert got["LV_ML"] == pytest.approx(want["LV_ML"], abs=0.25)
        assert got["RV_ML"] == pytest.approx(want["RV_ML"], abs=0.25)

    path = reader.save(tmp_path / "reader")
    # Weights of a non-DP model of private data: labelled beside them; no exact private count.
    assert EVALUATION_ONLY_LABEL in (path / "EVALUATION_ONLY.txt").read_text()
    assert not any("n_train" in key for key in reader.meta)
    loaded = SecondReader.load(path)
    np.testing.assert_array_equal(loaded.segment(test.volumes), masks)


def test_second_reader_refuses_wrong_inputs(tmp_path):
    train = phantoms(2, shape=(5, 16, 16))
    reader = fit_second_reader(train, epochs=1, channels=(8, 16), max_steps=1)
    assert reader.meta["steps"] == 1
    with pytest.raises(DpsynthError, match="trained on 16x16 slices, got 24x24"):
        reader.segment(np.zeros((1, 5, 24, 24), np.float32))
    with pytest.raises(DpsynthError, match="divisible by 2"):
        reader.segment(np.zeros((1, 5, 15, 16), np.float32))
    train.masks = None
    with pytest.raises(DpsynthError, match="needs segmentation masks"):
        fit_second_reader(train)
    with pytest.raises(DpsynthError, match="not a second reader"):
        SecondReader.load(tmp_path)
