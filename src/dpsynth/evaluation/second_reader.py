"""An independent second reader: a 2D U-Net that segments real short-axis slices one by one.

Controllability measured by the referee alone could be a property of the referee: it is
3D, shares the project's design choices, and a generator could learn what it rewards.
The second reader is built differently on purpose (MONAI's 2D `UNet`, each slice on its
own, no phase head, no augmentation at all, in particular no blur) and is trained only on
real training volumes with masks, never on synthetic data. If synthetic hearts are too
blurred or low-contrast for a plain slice segmenter, it reads less blood pool than was
requested, and its figures show it (issue 12 section 3).

Volumes and wall thickness come from its masks through `dpsynth.data.measure`, as for the
referee. Like the referee it is trained on private data without DP: evaluation only, its
weights and outputs are never released (its meta file carries the evaluation-only label).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.losses import DiceCELoss
from monai.networks.nets import UNet
from safetensors.torch import load_file, save_file

from dpsynth.data.volumes import VolumeSet, check_volume_array, load_volume_set
from dpsynth.errors import DpsynthError
from dpsynth.evaluation.referee import N_CLASSES, label_map
from dpsynth.io import atomic_dir, atomic_write_json, read_json
from dpsynth.privacy.outputs import labelled, mark_evaluation_only

FORMAT_VERSION = 1
WEIGHTS_FILE = "second_reader.safetensors"
META_FILE = "second_reader.json"
CHANNELS = (8, 16, 32, 64)
DESCRIPTION = (
    "2D U-Net (MONAI UNet, spatial_dims=2) trained slice by slice on real training volumes "
    "only, no augmentation; volumes and thickness measured from its masks"
)


def _net(channels: tuple[int, ...]) -> UNet:
    return UNet(
        spatial_dims=2,
        in_channels=1,
        out_channels=N_CLASSES,
        channels=channels,
        strides=(2,) * (len(channels) - 1),
        num_res_units=1,
        norm="instance",
    )


class SecondReader:
    """A trained 2D slice segmenter with the `segment` interface of the referee."""

    def __init__(self, net: UNet, meta: dict[str, Any]):
        self.net = net.eval()
        self.meta = meta

    @classmethod
    def load(cls, path: str | Path) -> SecondReader:
        path = Path(path)
        if not (path / META_FILE).exists():
            raise DpsynthError(f"{path}: not a second reader (no {META_FILE})")
        meta = read_json(path / META_FILE)
        if meta.get("format_version") != FORMAT_VERSION:
            raise DpsynthError(f"{path / META_FILE}: unsupported format_version")
        net = _net(tuple(meta["channels"]))
        net.load_state_dict(load_file(str(path / WEIGHTS_FILE)))
        return cls(net, meta)

    def save(self, path: str | Path) -> Path:
        with atomic_dir(path) as tmp:
            state = {k: v.contiguous() for k, v in self.net.state_dict().items()}
            save_file(state, str(tmp / WEIGHTS_FILE))
            atomic_write_json(tmp / META_FILE, self.meta)
            mark_evaluation_only(tmp)
        return Path(path)

    @torch.no_grad()
    def segment(self, volumes: np.ndarray, batch_slices: int = 64) -> np.ndarray:
        """Label masks (N, S, H, W) uint8 of volumes (N, S, H, W), each slice read alone."""
        check_volume_array(volumes.shape, 2 ** (len(self.meta["channels"]) - 1), "second reader")
        trained = self.meta.get("shape")
        if trained and list(volumes.shape[2:]) != trained[1:]:
            raise DpsynthError(
                f"second reader: trained on {trained[1]}x{trained[2]} slices, "
                f"got {volumes.shape[2]}x{volumes.shape[3]}"
            )
        slices = np.asarray(volumes, dtype=np.float32).reshape(-1, 1, *volumes.shape[2:])
        masks = [
            label_map(
                self.net(torch.from_numpy(np.ascontiguousarray(slices[i : i + batch_slices])))
            ).numpy()
            for i in range(0, len(slices), batch_slices)
        ]
        return np.concatenate(masks).reshape(volumes.shape)


def fit_second_reader(
    train: VolumeSet,
    epochs: int = 2,
    batch_size: int = 32,
    lr: float = 5e-3,
    channels: tuple[int, ...] = CHANNELS,
    seed: int = 0,
    max_steps: int | None = None,
) -> SecondReader:
    """Train on every slice of `train` (Dice + cross-entropy), shuffled, no augmentation.

    `max_steps` stops early (tests); the meta file records the steps actually taken.
    """
    if train.masks is None:
        raise DpsynthError(f"{train.source}: the second reader needs segmentation masks")
    check_volume_array(train.volumes.shape, 2 ** (len(channels) - 1), "second reader")
    images = np.asarray(train.volumes, dtype=np.float32).reshape(-1, 1, *train.shape[1:])
    labels = np.asarray(train.masks).reshape(-1, 1, *train.shape[1:])
    torch.manual_seed(seed)
    net = _net(channels).train()
    optimizer = torch.optim.AdamW(net.parameters(), lr=lr)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    rng = np.random.default_rng(seed)
    losses, steps = [], 0
    for _ in range(epochs):
        epoch_loss = []
        order = rng.permutation(len(images))
        for start in range(0, len(order), batch_size):
            if max_steps is not None and steps >= max_steps:
                break
            batch = np.sort(order[start : start + batch_size])  # sorted: cache-friendly reads
            x = torch.from_numpy(np.ascontiguousarray(images[batch]))
            y = torch.from_numpy(np.ascontiguousarray(labels[batch], dtype=np.int64))
            loss = loss_fn(net(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            epoch_loss.append(loss.item())
            steps += 1
        if epoch_loss:
            losses.append(float(np.mean(epoch_loss)))
    meta = labelled(
        {
            "format_version": FORMAT_VERSION,
            "description": DESCRIPTION,
            "channels": list(channels),
            "shape": list(train.shape),
            "spacing": list(train.spacing),
            "epochs": epochs,
            "steps": steps,
            "batch_size": batch_size,
            "seed": seed,
            "trained_on": train.source,
            "loss_per_epoch": losses,
            "release": "evaluation only: trained on real data without DP; never release",
        }
    )
    return SecondReader(net, meta)


def train_second_reader(
    cache_path: str | Path, out: str | Path, epochs: int = 2, seed: int = 0
) -> Path:
    """Train the second reader on a prepared cache's train split and save it to `out`."""
    train = load_volume_set(cache_path, split="train")
    return fit_second_reader(train, epochs=epochs, seed=seed).save(out)
