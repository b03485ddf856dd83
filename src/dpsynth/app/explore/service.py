"""The explorer's engine: validate a request, generate one volume, measure it, keep it in memory.

No web code here (the server in `dpsynth.app.explore.server` is a thin layer over this), so the
same checks run from Python and from HTTP. What it reads from the run folder is fixed:
model.json and the weights (through `dpsynth.app.sample.load`), attribute_model.json,
ledger.json (the privacy it shows is what `dpsynth budget` states), an optional referee
folder, the `EVALUATION_ONLY.txt` of any folder above the run, and with an optional public
selector (best-of-k sampling, as `make demo` samples) the selector's folder and, when
given, the private caches (`Cache` opens them to compare patient digests). It never
reads `checkpoint/` (secret noise seeds) or `eval/`, and never writes anywhere: generated
volumes live in memory only.
"""

from __future__ import annotations

import base64
import math
import os
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dpsynth.attributes import ATTRIBUTES, CATEGORICAL, CLINICAL_RANGES, INDEX, UNITS
from dpsynth.config import MAX_CANDIDATES, ExploreDefaults
from dpsynth.data.measure import measure_volume
from dpsynth.errors import DpsynthError
from dpsynth.evaluation.controllability import Segmenter
from dpsynth.evaluation.referee import META_FILE, Referee
from dpsynth.evaluation.selection import load_selector, sample_best_of, selectable
from dpsynth.io import nifti_bytes
from dpsynth.privacy.attribute_model import ATTRIBUTE_MODEL_FILE, load_attribute_model
from dpsynth.privacy.ledger import has_ledger
from dpsynth.privacy.outputs import evaluation_only_marker
from dpsynth.report.stated_privacy import stated_privacy
from dpsynth.runs import load, sampling_settings

REFEREE_SUBDIR = "referee"  # a referee inside the run folder is picked up without --referee
REFEREE_NOTE = (
    "Measured by an evaluation-only referee: a segmenter trained on real images without DP. "
    "These numbers are for exploring the model; do not release them with it."
)
# Which requested attribute each referee measurement answers, per phase (ESED 1 = ED).
MEASURED = {
    "LV_ML": {1.0: "LVEDV", 0.0: "LVESV"},
    "RV_ML": {1.0: "RVEDV", 0.0: "RVESV"},
    "MYO_THICK": {1.0: "MYOEDTHICK", 0.0: "MYOESTHICK"},
}
REQUEST_KEYS = ("attributes", "seed", "guidance", "steps", "sampler", "candidates")


class NotFoundError(DpsynthError):
    """A request for something the run does not have (HTTP 404)."""


@dataclass(frozen=True)
class Request:
    """A validated generation request: raw attributes (14,), NaN = unknown."""

    attributes: np.ndarray
    seed: int
    guidance: float
    steps: int
    sampler: str
    candidates: int  # > 1: the best of that many by the explorer's public selector


@dataclass(frozen=True)
class Generated:
    id: str
    volume: np.ndarray  # (S, H, W) float32 in [0, 1]
    request: Request
    measured: dict[str, float] | None
    seconds: float
    candidates: int  # trajectories the choice compared: 1 when the request gave nothing to compare


class Explorer:
    """One loaded run, generating one volume at a time (a lock: CPU generations never overlap)."""

    def __init__(
        self,
        run: str | os.PathLike,
        referee: str | os.PathLike | None = None,
        device: str | None = None,
        defaults: ExploreDefaults | None = None,
        selector: str | os.PathLike | None = None,
        private: Sequence[str | os.PathLike] = (),
    ) -> None:
        self.run = Path(run)
        if not (self.run / "model.json").is_file():
            raise DpsynthError(
                f"{self.run}: no model.json here: not a trained latent diffusion run"
            )
        self.defaults = defaults or ExploreDefaults()
        self.pipe = load(self.run, device)
        meta = self.pipe.run_meta
        ranges = meta.get("attribute_ranges") or {}
        self.ranges = {
            a: tuple(float(v) for v in ranges.get(a, CLINICAL_RANGES[a])) for a in ATTRIBUTES
        }
        sampling = sampling_settings(meta)
        self.guidance = float(sampling["guidance"])
        self.temperature = float(sampling["temperature"])
        self.max_guidance = max(self.defaults.max_guidance, self.guidance)
        self.max_steps = min(self.defaults.max_steps, self.pipe.num_train_timesteps)
        self.attribute_model = self._attribute_model()
        self.referee = self._referee(referee)
        self.selector = self._selector(selector, private)
        self.privacy = self._privacy()
        self.evaluation_only = self._evaluation_only()
        has = self.selector is not None
        self.max_candidates = min(self.defaults.max_candidates, MAX_CANDIDATES) if has else 1
        self.candidates = min(self.defaults.candidates, self.max_candidates)
        self._lock = threading.Lock()
        self._kept: OrderedDict[str, Generated] = OrderedDict()

    def _privacy(self) -> dict[str, Any]:
        """What `dpsynth budget` states of the run (`stated_privacy`): whether it has a
        ledger and a DP mechanism that spent, NOT DP, ε (finite, else None) and δ, why the
        lineage went unchecked, or why no ε can be stated (`error`: a DP run whose ledger
        is lost). A run without a ledger recorded no use of private data."""
        ledger = has_ledger(self.run)
        try:
            stated = stated_privacy([self.run], missing_ok=True)
        except DpsynthError as e:
            return {"ledger": ledger, "error": str(e)}
        epsilon, delta, _ = stated.epsilon()
        return {
            "ledger": ledger,
            "dp": stated.dp,
            "is_not_dp": stated.is_not_dp,
            "epsilon": epsilon if stated.dp and math.isfinite(epsilon) else None,
            "delta": delta,
            "unchecked": stated.unchecked,
            "error": "",
        }

    def _evaluation_only(self) -> str:
        """Why what the explorer shows must stay on this machine ("" if it may be shared):
        a run under an `EVALUATION_ONLY.txt`; one with no ε to state, NOT DP (its slider
        ranges may be the cohort's exact extremes) or a ledger its lineage could not be
        checked against; or a referee trained on real data without DP measuring every
        volume."""
        marker = evaluation_only_marker(self.run / "model.json")
        p = self.privacy
        if marker is not None:
            return f"{marker} labels it evaluation only"
        if p["error"]:
            return f"no ε can be stated: {p['error']}"
        if p["is_not_dp"]:
            return "its lineage learned private data without DP (NOT DP)"
        if p["unchecked"]:
            return "its lineage could not be checked against its ledger"
        if self.referee is not None and self.referee.meta.get("public") is not True:
            return "its referee learned real data without DP"
        return ""

    def _attribute_model(self):
        return (
            load_attribute_model(self.run) if (self.run / ATTRIBUTE_MODEL_FILE).is_file() else None
        )

    def _selector(
        self, path: str | os.PathLike | None, private: Sequence[str | os.PathLike]
    ) -> Segmenter | None:
        """The public segmenter that picks the best of k, checked as `dpsynth sample
        --selector [--private CACHE]` checks it: declared public, never trained on a cache
        the run's ledger names nor on a patient of the `private` caches (under any cache id),
        the model's grid. Without `private` it warns that patients were not compared."""
        if path is None:
            if private:
                raise DpsynthError(
                    "--private: give it only with --selector (it checks the selector)"
                )
            return None
        segmenter, _ = load_selector(
            path, self.run, self.pipe.volume_shape, self.pipe.spacing, private
        )
        return segmenter

    def _referee(self, path: str | os.PathLike | None):
        if path is None:
            path = self.run / REFEREE_SUBDIR
            if not (path / META_FILE).is_file():
                return None
        referee = Referee.load(path)
        shape = referee.meta.get("shape")
        if shape is not None and tuple(shape) != self.pipe.volume_shape:
            raise DpsynthError(
                f"{path}: referee trained on volumes of shape {tuple(shape)}, the model makes "
                f"{self.pipe.volume_shape}"
            )
        return referee

    # ------------------------------------------------------------------ what the page needs

    def info(self) -> dict[str, Any]:
        """Attributes with their slider ranges (and whether the model learned each: one its
        training never gave reads as unknown), the volume grid and the sampling defaults."""
        untaught = set(self.pipe.denoiser.attribute_encoder.untaught())
        return {
            "run": self.run.name,
            "privacy": self.privacy,
            "evaluation_only": self.evaluation_only,
            "shape": list(self.pipe.volume_shape),
            "spacing": list(self.pipe.spacing),
            "attributes": [
                {
                    "name": a,
                    "unit": UNITS[a],
                    "min": self.ranges[a][0],
                    "max": self.ranges[a][1],
                    "categorical": a in CATEGORICAL,
                    "learned": INDEX[a] not in untaught,
                }
                for a in ATTRIBUTES
            ],
            "defaults": {
                "sampler": self.defaults.sampler,
                "steps": min(self.defaults.steps, self.max_steps),
                "guidance": self.guidance,
                "seed": 0,
                "temperature": self.temperature,  # shown, not asked: the run's setting
                "candidates": self.candidates,
            },
            "limits": {
                "max_steps": self.max_steps,
                "max_guidance": self.max_guidance,
                "max_candidates": self.max_candidates,
            },
            "attribute_model": self.attribute_model is not None,
            "referee": REFEREE_NOTE if self.referee is not None else None,
            "selector": self.selector is not None,
        }

    def parse(self, payload: Any) -> Request:
        """A request body as a `Request`; a DpsynthError names the first bad field."""
        if not isinstance(payload, dict):
            raise DpsynthError("request: expected a JSON object")
        for key in payload:
            if key not in REQUEST_KEYS:
                raise DpsynthError(
                    f"request: unknown field '{key}' (known: {', '.join(REQUEST_KEYS)})"
                )
        values = payload.get("attributes") or {}
        if not isinstance(values, dict):
            raise DpsynthError("attributes: expected an object {NAME: value or null}")
        table = np.full(len(ATTRIBUTES), np.nan, dtype=np.float32)
        for name, value in values.items():
            if name not in INDEX:
                raise DpsynthError(f"unknown attribute '{name}' (known: {', '.join(ATTRIBUTES)})")
            if value is None:
                continue  # unknown: the model conditions on "unknown"
            x = _number(value, name)
            lo, hi = self.ranges[name]
            # A slider's step snapping can land a few ulps past an end (seen at a drawn
            # value clipped to the end), so ends are compared within 1e-6 of the range.
            slack = 1e-6 * (hi - lo)
            if not lo - slack <= x <= hi + slack:
                raise DpsynthError(f"{name}={x:g} is outside the model's range [{lo:g}, {hi:g}]")
            x = min(max(x, lo), hi)
            if name in CATEGORICAL and x not in CATEGORICAL[name]:
                raise DpsynthError(f"{name}={x:g}: expected one of {CATEGORICAL[name]}")
            table[INDEX[name]] = x
        sampler = payload.get("sampler", self.defaults.sampler)
        if sampler not in ("ddim", "dpm++"):
            raise DpsynthError(f"sampler: expected 'ddim' or 'dpm++', got {sampler!r}")
        guidance = payload.get("guidance", self.guidance)
        steps = payload.get("steps", self.defaults.steps)
        candidates = _number(payload.get("candidates", self.candidates), "candidates", integer=True)
        if candidates > 1 and self.selector is None:
            raise DpsynthError(
                "candidates: best-of-k needs a public selector (dpsynth explore --selector)"
            )
        return Request(
            attributes=table,
            seed=int(_number(payload.get("seed", 0), "seed", 0, 2**31 - 1, integer=True)),
            guidance=_number(guidance, "guidance", 0.0, self.max_guidance),
            steps=int(_number(steps, "steps", 1, self.max_steps, integer=True)),
            sampler=sampler,
            candidates=int(_number(candidates, "candidates", 1, self.max_candidates)),
        )

    def draw(self, seed: int, phase: float | None) -> dict[str, Any]:
        """One patient's attributes from the run's DP attribute model (post-processing of a
        DP output), the row of `phase` (1 ED, 0 ES; None: ED). Values outside the sliders'
        ranges are clipped to them and listed in `clipped`."""
        if self.attribute_model is None:
            raise NotFoundError(f"{self.run.name}: this run has no DP attribute model")
        seed = int(_number(seed, "seed", 0, 2**31 - 1, integer=True))
        rows = self.attribute_model.sample(1, np.random.default_rng(seed))
        row = rows[0] if phase in (None, 1.0) else rows[1]
        values, clipped = {}, []
        for name, x in zip(ATTRIBUTES, row, strict=True):
            if not np.isfinite(x):
                values[name] = None
                continue
            lo, hi = self.ranges[name]
            if not lo <= x <= hi:
                clipped.append(name)
            values[name] = float(min(max(x, lo), hi))
        return {"attributes": values, "clipped": clipped}

    # ------------------------------------------------------------------ generation

    def generate(self, request: Request) -> Generated:
        """Generate and measure one volume; calls wait for each other (one at a time)."""
        with self._lock:
            start = time.perf_counter()
            volume = sample_best_of(
                self.pipe,
                1,
                request.attributes[None],
                request.seed,
                request.candidates,
                self.selector,
                progress=False,
                sampler=request.sampler,
                steps=request.steps,
                guidance=request.guidance,
                temperature=self.temperature,
            )[0]
            measured = self._measure(volume)
            compared = request.candidates if selectable(request.attributes[None])[0] else 1
            result = Generated(
                id=uuid.uuid4().hex,
                volume=volume,
                request=request,
                measured=measured,
                seconds=time.perf_counter() - start,
                candidates=compared,
            )
            self._kept[result.id] = result
            while len(self._kept) > self.defaults.kept_volumes:
                self._kept.popitem(last=False)
            return result

    def _measure(self, volume: np.ndarray) -> dict[str, float] | None:
        if self.referee is None:
            return None

        out = self.referee.analyse(volume[None])
        m = measure_volume(out.masks[0], self.pipe.spacing)
        return {
            "LV_ML": m["LV_ML"],
            "RV_ML": m["RV_ML"],
            "MYO_THICK": m["MYO_THICK"],
            "P_ED": float(out.prob_ed[0]),
        }

    def get(self, volume_id: str) -> Generated:
        """A kept volume by the id `generate` gave it (ids are never paths)."""
        try:
            return self._kept[volume_id]
        except KeyError:
            raise NotFoundError(f"volume {volume_id}: unknown or no longer kept") from None

    def nifti(self, volume_id: str) -> bytes:
        """A kept volume as .nii.gz bytes with the run's true voxel spacing."""

        return nifti_bytes(self.get(volume_id).volume, self.pipe.spacing)


def response(result: Generated) -> dict[str, Any]:
    """What the page shows of a generated volume: 8-bit slices (every pixel) and measurements."""
    data = np.rint(result.volume * 255.0).astype(np.uint8)
    phase = result.request.attributes[INDEX["ESED"]]
    requested = {}
    for key, by_phase in MEASURED.items():
        name = by_phase.get(float(phase)) if np.isfinite(phase) else None
        value = result.request.attributes[INDEX[name]] if name else np.nan
        requested[key] = {"attribute": name, "value": _json_number(value)}
    return {
        "id": result.id,
        "shape": list(result.volume.shape),
        "data": base64.b64encode(data.tobytes()).decode("ascii"),
        "seconds": round(result.seconds, 3),
        "candidates": result.candidates,
        "measured": (
            None
            if result.measured is None
            else {k: _json_number(v) for k, v in result.measured.items()}
        ),
        "requested": requested,
        "nifti": f"/api/volume/{result.id}.nii.gz",
    }


def _json_number(x: float) -> float | None:
    return float(x) if math.isfinite(float(x)) else None


def _number(
    value: Any,
    name: str,
    lo: float = -math.inf,
    hi: float = math.inf,
    integer: bool = False,
) -> float:
    # bool is an int in Python; a JSON true for a number is a client bug, not a 1.
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise DpsynthError(f"{name}: expected a number, got {value!r}")
    x = float(value)
    if not math.isfinite(x):
        raise DpsynthError(f"{name}: expected a finite number, got {value!r}")
    if integer and x != int(x):
        raise DpsynthError(f"{name}: expected an integer, got {value!r}")
    if not lo <= x <= hi:
        raise DpsynthError(f"{name}={x:g} is outside [{lo:g}, {hi:g}]")
    return x
