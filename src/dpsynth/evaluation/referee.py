"""The referee: a 3D segmenter + ED/ES classifier trained on real volumes with masks.

It measures synthetic volumes for controllability and gives encoder features for the
FD-referee distance and memorisation checks. It is an evaluation tool trained on real
data without DP: its weights must never be released with a model or a synthetic set.
Trained on public data (`public=True`), the same network is the selector of best-of-k
sampling (`dpsynth.evaluation.selection`); its meta names its cache by id for that check.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss
from monai.networks.layers.simplelayers import SkipConnection
from monai.networks.nets import UNet
from safetensors.torch import load_file, save_file

from dpsynth.attributes import INDEX
from dpsynth.data.cache import Cache
from dpsynth.data.volumes import VolumeSet, check_volume_array, load_volume_set
from dpsynth.errors import DpsynthError
from dpsynth.io import atomic_dir, atomic_write_json, read_json
from dpsynth.models.blocks import convolve_channels_last, single_as_pair
from dpsynth.privacy.outputs import mark_evaluation_only

N_CLASSES = 4  # background, LV blood pool, LV myocardium, RV blood pool
FORMAT_VERSION = 1
WEIGHTS_FILE = "referee.safetensors"
META_FILE = "referee.json"
CONSTANT_LR = "constant"  # the recipe of referees whose meta has no "lr" (before 60d2e9f)
UNTRAINED = "none (untrained)"  # `Referee.create`'s, for timing and tests


def label_map(logits: torch.Tensor) -> torch.Tensor:
    """Label of the largest class logit, (N, C, ...) -> (N, ...) uint8 (C <= 256).

    `max(1).indices`, not `argmax(1)`: the same first-maximum labels, but torch 2.13's CPU
    argmax over a non-innermost dimension is 5-23x slower (23x idle); it took 23 s of the
    demo's 118 s audit (BENCHMARKS.md, "Label maps").
    """
    return logits.max(1).indices.to(torch.uint8)


class RefereeNet(torch.nn.Module):
    """MONAI UNet with in-plane-only down-sampling (slices are 10 mm apart) and a phase head
    on the pooled bottleneck, which also serves as the feature vector.

    `downsample` > 1: the net reads volumes averaged over `downsample` x `downsample` pixels
    and its logits are interpolated back to the input grid, so masks and volumes stay at
    the input's resolution. At the study's 1.83 mm pixels, reading at 3.65 mm makes the
    demo's referee 4x cheaper (training, and features for FD-referee and the audit); its
    ceiling on real test volumes shows what that costs.
    """

    def __init__(
        self, channels: tuple[int, ...] = (16, 32, 64), num_res_units: int = 1, downsample: int = 1
    ):
        super().__init__()
        self.downsample = downsample
        self.unet = UNet(
            spatial_dims=3,
            in_channels=1,
            out_channels=N_CLASSES,
            channels=channels,
            strides=[(1, 2, 2)] * (len(channels) - 1),
            num_res_units=num_res_units,
            norm="instance",
        )
        self.phase_head = torch.nn.Linear(channels[-1], 1)
        self._bottleneck: torch.Tensor | None = None
        bottleneck_layer(self.unet).register_forward_hook(self._keep_bottleneck)
        convolve_channels_last(self.unet)

    def _keep_bottleneck(self, module, inputs, output) -> None:
        self._bottleneck = output

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (B, 1, S, H, W) → segmentation logits, ED logit (B,), pooled features (B, C)."""
        d = self.downsample
        if d > 1:
            if x.shape[-2] % d or x.shape[-1] % d:
                raise DpsynthError(
                    f"referee: in-plane size {tuple(x.shape[-2:])} not divisible by {d}"
                )
            x = F.avg_pool3d(x, (1, d, d))
        logits = self.unet(x).contiguous()  # channels-last out of a channels-last net
        if d > 1:
            logits = F.interpolate(logits, scale_factor=(1, d, d), mode="trilinear")
        features = self._bottleneck.mean(dim=(2, 3, 4))
        return logits, self.phase_head(features).squeeze(1), features


def bottleneck_layer(unet: UNet) -> torch.nn.Module:
    """MONAI's UNet nests (down, SkipConnection(inner), up); the innermost is the bottleneck."""
    node = unet.model
    while skips := [c for c in node.children() if isinstance(c, SkipConnection)]:
        node = skips[0].submodule
    return node


class RefereeOutput(NamedTuple):
    masks: np.ndarray  # (N, S, H, W) uint8 labels
    prob_ed: np.ndarray  # (N,) probability of end-diastole
    features: np.ndarray  # (N, D) pooled bottleneck features


class Referee:
    """A RefereeNet with batched numpy helpers."""

    def __init__(self, net: RefereeNet, meta: dict[str, Any]):
        self.net = net.eval()
        self.meta = meta
        self._outputs: dict[str, RefereeOutput] = {}

    @classmethod
    def create(cls, channels: tuple[int, ...] = (16, 32, 64), seed: int = 0) -> Referee:
        """An untrained referee (for timing and tests)."""
        torch.manual_seed(seed)
        return cls(RefereeNet(channels), _base_meta(channels) | {"trained": False})

    @classmethod
    def load(cls, path: str | Path) -> Referee:
        path = Path(path)
        meta = read_json(path / META_FILE)
        if meta.get("format_version") != FORMAT_VERSION:
            raise DpsynthError(f"{path / META_FILE}: unsupported format_version")
        net = RefereeNet(tuple(meta["channels"]), meta["num_res_units"], meta.get("downsample", 1))
        net.load_state_dict(load_file(str(path / WEIGHTS_FILE)))
        return cls(net, meta)

    def save(self, path: str | Path) -> Path:
        """Weights and meta; labelled evaluation-only unless the meta says it learned from
        public data only."""
        with atomic_dir(path) as tmp:
            save_file(
                {k: v.contiguous() for k, v in self.net.state_dict().items()},
                str(tmp / WEIGHTS_FILE),
            )
            atomic_write_json(tmp / META_FILE, self.meta)
            if self.meta.get("public") is not True:
                mark_evaluation_only(tmp)
        return Path(path)

    @torch.no_grad()
    def analyse(self, volumes: np.ndarray, batch_size: int = 8) -> RefereeOutput:
        """Masks, ED probability and features of volumes (N, S, H, W) in one forward pass.

        The last few results are kept by content hash: evaluation asks for masks, phases and
        features of the same sets, and the forward pass dominates its cost.
        """
        check_volume_array(volumes.shape, 4, "referee")
        key = hashlib.sha256(np.ascontiguousarray(volumes).tobytes()).hexdigest()
        if key not in self._outputs:
            masks, prob_ed, features = [], [], []
            for start in range(0, len(volumes), batch_size):
                batch = np.ascontiguousarray(volumes[start : start + batch_size], dtype=np.float32)
                logits, phase_logit, pooled = single_as_pair(
                    self.net, torch.from_numpy(batch).unsqueeze(1)
                )
                masks.append(label_map(logits).numpy())
                prob_ed.append(torch.sigmoid(phase_logit).numpy())
                features.append(pooled.double().numpy())
            self._outputs[key] = RefereeOutput(
                np.concatenate(masks), np.concatenate(prob_ed), np.concatenate(features)
            )
            while len(self._outputs) > 2:
                self._outputs.pop(next(iter(self._outputs)))
        return self._outputs[key]

    def segment(self, volumes: np.ndarray) -> np.ndarray:
        """Label masks (N, S, H, W) uint8."""
        return self.analyse(volumes).masks

    def predict_phase(self, volumes: np.ndarray) -> np.ndarray:
        """Probability (N,) that each volume is end-diastolic."""
        return self.analyse(volumes).prob_ed

    def features(self, volumes: np.ndarray) -> np.ndarray:
        """Pooled bottleneck features (N, D) for Fréchet distances and nearest neighbours."""
        return self.analyse(volumes).features


def _base_meta(channels: tuple[int, ...], downsample: int = 1) -> dict[str, Any]:
    return {
        "format_version": FORMAT_VERSION,
        "channels": list(channels),
        "num_res_units": 1,
        "downsample": downsample,
    }


def lr_recipe(meta: dict[str, Any]) -> str:
    """How a referee's learning rate was set, read from its meta: e.g. "warmup_cosine, peak
    0.003", `CONSTANT_LR` or `UNTRAINED`. The recipe sets FD-referee's scale (BENCHMARKS.md,
    "Referee: a decaying learning rate"), so figures name it and kept referees are checked
    against it."""
    if meta.get("trained") is False:
        return UNTRAINED
    lr = meta.get("lr")
    if not lr:
        return CONSTANT_LR
    return f"{lr.get('schedule', 'unnamed schedule')}, peak {lr.get('peak')}"


def warmup_cosine(total_steps: int, warmup_fraction: float = 0.1) -> Callable[[int], float]:
    """Learning-rate factor per step: a cosine rise from 1/25 to 1 over the first tenth of
    `total_steps`, then a cosine decay to 0 (the shape of `OneCycleLR` at pct_start 0.1,
    without its momentum cycling; it divides by zero for some short runs, e.g. 10 steps).

    Instead of a constant rate: on the demo's 5 epochs the referee's ceilings on real test
    volumes rise from 0.72 / 0.87 to 0.81 / 0.89 (wall thickness, ED / ES) and its ED/ES
    accuracy from 0.93 to 0.97, at the same cost (BENCHMARKS.md, "Referee: a
    decaying learning rate").
    """
    warmup = max(1, round(warmup_fraction * total_steps))

    def factor(step: int) -> float:
        if step < warmup:
            return 1 / 25 + (1 - 1 / 25) * (1.0 - math.cos(math.pi * step / warmup)) / 2
        done = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return (1.0 + math.cos(math.pi * done)) / 2

    return factor


def fit_referee(
    train: VolumeSet,
    epochs: int = 30,
    batch_size: int = 4,
    lr: float = 3e-3,
    channels: tuple[int, ...] = (16, 32, 64),
    phase_weight: float = 0.5,
    seed: int = 0,
    downsample: int = 1,
) -> Referee:
    """Train segmentation (Dice + CE) and the ED/ES head (BCE) jointly on a set with masks;
    `lr` is the peak of `warmup_cosine`; `downsample`: see `RefereeNet`."""
    if train.masks is None:
        raise DpsynthError(f"{train.source}: the referee needs segmentation masks")
    check_volume_array(train.volumes.shape, 4, "referee")
    phase = train.attributes[:, INDEX["ESED"]]
    has_phase = torch.from_numpy(np.isfinite(phase))
    phase = torch.from_numpy(np.nan_to_num(phase).astype(np.float32))
    torch.manual_seed(seed)
    net = RefereeNet(channels, downsample=downsample).train()
    optimizer = torch.optim.AdamW(net.parameters(), lr=lr)
    n_batches = max(1, len(train) // batch_size)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(epochs * n_batches))
    seg_loss = DiceCELoss(to_onehot_y=True, softmax=True)
    rng = np.random.default_rng(seed)
    losses = []
    for _ in range(epochs):
        epoch_loss = []
        for batch in np.array_split(rng.permutation(len(train)), n_batches):
            x = torch.from_numpy(np.ascontiguousarray(train.volumes[batch], dtype=np.float32))
            y = torch.from_numpy(np.ascontiguousarray(train.masks[batch], dtype=np.int64))
            logits, phase_logit, _ = net(x.unsqueeze(1))
            loss = seg_loss(logits, y.unsqueeze(1))
            known = has_phase[batch]
            if known.any():
                loss = loss + phase_weight * F.binary_cross_entropy_with_logits(
                    phase_logit[known], phase[batch][known]
                )
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            epoch_loss.append(loss.item())
        losses.append(float(np.mean(epoch_loss)))
    meta = _base_meta(channels, downsample) | {
        "shape": list(train.shape),
        "spacing": list(train.spacing),
        "epochs": epochs,
        "lr": {"schedule": "warmup_cosine", "peak": lr, "steps": epochs * n_batches},
        "seed": seed,
        "n_train": len(train),
        "trained_on": train.source,
        "loss_per_epoch": losses,
        "trained": True,
        "release": "evaluation only: trained on real data without DP; never release",
    }
    return Referee(net, meta)


def train_referee(
    cache_path: str | Path,
    out: str | Path,
    epochs: int = 30,
    batch_size: int = 4,
    lr: float = 3e-3,
    channels: tuple[int, ...] = (16, 32, 64),
    seed: int = 0,
    downsample: int = 1,
    public: bool = False,
) -> Path:
    """Train the referee on a prepared cache's train split and save it to `out`.

    `public`: the caller's word that the cache holds public data only; the folder is then
    not labelled evaluation-only (e.g. the shipped demo selector), and its meta lists the
    cache's patient digests. Either way the meta names the cache by id. Best-of-k sampling
    checks the id against a run's ledger, and the digests against the run's private caches
    at hand, so that the same patients prepared again under a new id are refused too.
    """
    cache = Cache(cache_path)
    digests = cache.require_patient_digests(str(cache_path)) if public else None
    train = load_volume_set(cache_path, split="train")
    referee = fit_referee(
        train,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        channels=channels,
        seed=seed,
        downsample=downsample,
    )
    referee.meta["cache_id"] = cache.cache_id
    if public:  # digests of public patients only: an evaluation referee's meta never has them
        referee.meta["patient_digests"] = digests
        referee.meta["public"] = True
        referee.meta["release"] = "public: trained on public data only; never released itself"
    return referee.save(out)
