"""Cardiac phantom simulator: short-axis cine MRI at ED and ES with masks and ground truth.

Each patient is drawn in two steps:

1. ``draw_targets``: clinical attributes from a population model. ``ukbb`` follows the
   UK Biobank reference ranges (Petersen et al., JCMR 2017): sex differences in volumes,
   age trends, RV slightly larger than LV, all tied to a latent body size. ``acdc`` mimics
   the ACDC challenge: five pathology groups, no age or sex, another scanner.
2. ``render_patient``: anatomy that follows the attributes. The LV is a truncated
   ellipsoidal shell from base to apex, the RV a crescent wrapping the septum, the heart
   rotated in-plane by ANGLE and spanning DEPTH slices. Cavity volumes are met to the
   voxel by choosing the in-plane scale from the sorted per-voxel scale thresholds; the wall
   thickness is calibrated against :func:`dpsynth.data.measure.wall_thickness`. Images get
   endocardial trabeculation and papillary muscles (blood pool in the masks), atria and
   great vessels above the base, surrounding anatomy (chest wall, ribs, lungs, liver, spine,
   descending aorta), SSFP-like contrast, partial volume across each patient's slice
   thickness, breath-hold shifts, coil bias and Rician noise; fields of view, body turn and
   (``acdc``) the stored orientation vary, and some stacks miss the base or the apex.
   docs/PHANTOMS.md lists what is rendered and what is not.

The attributes written next to the images are *measured* from the produced masks, so the
ground truth is what the image shows; the requested values go to simulation_targets.csv.
"""

from __future__ import annotations

import csv
import io
import math
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from dpsynth.attributes import ATTRIBUTES, PHASES
from dpsynth.config import DEFAULT_SHAPE, DEFAULT_SPACING
from dpsynth.data.measure import LV_BLOOD, LV_MYO, RV_BLOOD, measure_patient, wall_thickness
from dpsynth.errors import DpsynthError
from dpsynth.io import atomic_dir, atomic_write_text, write_nifti
from dpsynth.orientation import array_affine

COHORTS = ("ukbb", "acdc")
GROUPS = ("NOR", "DCM", "HCM", "MINF", "ARV")  # ACDC groups; UK Biobank is all "NOR"
SUBJECT = ("AGE", "SEX", "BMI")
CARDIAC = tuple(a for a in ATTRIBUTES if a not in (*SUBJECT, "ESED"))  # the 10 measured ones


@dataclass(frozen=True)
class Scanner:
    """SSFP-like relative intensities (blood = 1) and acquisition properties of a cohort."""

    myocardium: float
    lung: float
    liver: float
    muscle: float
    fat: float
    tissue: float
    noise: float  # Rician sigma relative to blood
    bias: float  # std of the log coil-sensitivity coefficients
    psf_px: float  # in-plane blur (Gaussian sigma, pixels)
    gain: tuple[float, float]  # range of the arbitrary scanner scale of the int16 images
    inplane_scale: tuple[float, float]  # pixel size relative to the requested spacing
    thickness: tuple[float, float]  # slice thickness (mm) range; the gap is spacing - thickness
    fov: tuple[float, float]  # matrix size per axis relative to the requested one
    cut: float  # chance that the stack misses the base or the apex
    stored: float  # chance that a file is stored flipped or transposed (with its affine)


SCANNERS = {
    # UK Biobank: one protocol (Petersen et al., JCMR 2016): 8 mm slices with 2 mm gaps,
    # 1.8 mm pixels; files converted by ukbb_cardiac share one orientation.
    "ukbb": Scanner(
        myocardium=0.22, lung=0.04, liver=0.30, muscle=0.26, fat=0.80, tissue=0.38,
        noise=0.03, bias=0.15, psf_px=0.6, gain=(180, 420), inplane_scale=(1.0, 1.0),
        thickness=(8.0, 8.0), fov=(1.0, 1.0), cut=0.06, stored=0.0,
    ),
    # ACDC: another vendor and field strength, 1.37-1.68 mm pixels (0.75-0.92 x UK Biobank's
    # 1.83 mm), 5-10 mm slices (here 8-10), rectangular fields of view of varying size,
    # flatter contrast, more noise and coil shading, another intensity scale; NIfTI files
    # in several in-plane orientations, and stacks that miss part of the heart more often
    # (Bernard et al., IEEE TMI 2018).
    "acdc": Scanner(
        myocardium=0.32, lung=0.09, liver=0.42, muscle=0.35, fat=0.70, tissue=0.45,
        noise=0.055, bias=0.25, psf_px=0.8, gain=(500, 1500), inplane_scale=(0.75, 0.92),
        thickness=(8.0, 10.0), fov=(1.0, 1.2), cut=0.15, stored=0.5,
    ),
}  # fmt: skip


@dataclass
class SimulatedPatient:
    """One patient in memory: int16 images and uint8 masks per phase, (dz, dy, dx) spacing."""

    images: dict[str, np.ndarray]
    masks: dict[str, np.ndarray]
    attributes: dict[str, float]  # AGE SEX BMI as drawn + the 10 cardiac attributes measured
    targets: dict[str, float | str]  # GROUP and every requested value
    spacing: tuple[float, float, float]
    storage: int = 0  # how its files store the arrays (:func:`stored_array`)


# ----------------------------------------------------------------------------- population


def draw_targets(rng: np.random.Generator, cohort: str, n_slices: int, dz: float) -> dict:
    """Requested attributes of one patient (GROUP, AGE, SEX, BMI and the 10 cardiac ones)."""
    _check_cohort(cohort)
    e = rng.standard_normal
    size = e()  # latent body size shared by BMI, volumes and wall thickness
    male = rng.random() < (0.47 if cohort == "ukbb" else 0.6)
    age = rng.uniform(45.0, 80.0) if cohort == "ukbb" else rng.uniform(20.0, 85.0)
    bmi = float(np.clip(27.0 + 4.5 * (0.4 * size + 0.92 * e()), 17.0, 50.0))
    da = age - 62.5

    # Petersen 2017: LVEDV 166 +- 32 mL (men), 124 +- 21 mL (women), falling with age;
    # LVEF 61 +- 6 %, higher in women and rising with age; RV ~5-10 % larger than LV.
    lvedv_mu, lvedv_sd = (166.0, 32.0) if male else (124.0, 21.0)
    lvedv = lvedv_mu * (1 - 0.004 * da) + lvedv_sd * (0.75 * size + 0.66 * e())
    lvef = 60.0 + 2.5 * (not male) + 0.08 * da + 5.5 * e()
    rv_ratio = (1.10 if male else 1.05) * math.exp(0.06 * e())
    rvef = lvef - 3.0 + 4.0 * e()
    thick_ed = (6.0 if male else 5.1) + 0.35 * size + 0.015 * da + 0.5 * e()
    thickening = 0.5 + 0.012 * (lvef - 61.0) + 0.07 * e()  # ES wall / ED wall - 1
    angle = 20.0 + 10.0 * e()  # degrees from the canonical LV -> RV direction (orientation.py)
    group = "NOR"

    if cohort == "acdc":
        group = GROUPS[rng.integers(len(GROUPS))]
        if group == "DCM":  # dilated: large volumes, low EF, thin walls
            lvedv, lvef, thick_ed = 280.0 + 60.0 * e(), 20.0 + 7.0 * e(), 5.8 + 0.8 * e()
            thickening = 0.15 + 0.06 * e()
        elif group == "HCM":  # hypertrophic: thick walls, small hyperdynamic cavity
            lvedv, lvef, thick_ed = 135.0 + 30.0 * e(), 72.0 + 6.0 * e(), 13.0 + 2.5 * e()
            thickening = 0.35 + 0.08 * e()
        elif group == "MINF":  # infarct: enlarged, reduced EF, a thinned segment
            lvedv, lvef, thick_ed = 230.0 + 50.0 * e(), 32.0 + 8.0 * e(), 7.0 + 1.0 * e()
            thickening = 0.2 + 0.06 * e()
        elif group == "ARV":  # abnormal RV: dilated, poorly contracting RV
            rv_ratio, rvef = 1.8 * math.exp(0.15 * e()), 33.0 + 9.0 * e()
        if group in ("DCM", "MINF"):
            rv_ratio, rvef = 0.75 * math.exp(0.15 * e()), lvef + 10.0 + 8.0 * e()
        angle = 10.0 + 18.0 * e()

    lvedv = float(np.clip(lvedv, 60.0, 420.0))
    lvef = float(np.clip(lvef, 8.0, 82.0))
    rvedv = float(np.clip(lvedv * rv_ratio, 60.0, 420.0))
    rvef = float(np.clip(rvef, 10.0, 80.0))
    thick_ed = float(np.clip(thick_ed, 3.5, 20.0))
    # LV length grows with the cube root of volume; DEPTH = slices it spans.
    length = 90.0 * (lvedv / 145.0) ** (1 / 3) * math.exp(0.05 * e())
    depth = int(np.clip(round(length / dz), 3, n_slices - 1))
    return {
        "GROUP": group,
        "AGE": float(age) if cohort == "ukbb" else float("nan"),
        "SEX": float(male) if cohort == "ukbb" else float("nan"),
        "BMI": bmi,
        "LVEDV": lvedv,
        "LVESV": lvedv * (1 - lvef / 100),
        "LVEF": lvef,
        "RVEDV": rvedv,
        "RVESV": rvedv * (1 - rvef / 100),
        "RVEF": rvef,
        "MYOESTHICK": thick_ed * (1 + max(thickening, 0.05)),
        "MYOEDTHICK": thick_ed,
        "ANGLE": float(np.clip(angle, -179.0, 179.0)),  # never near the wrap
        "DEPTH": float(depth),
    }


# ------------------------------------------------------------------------------- anatomy


@dataclass
class _Frame:
    """Per-patient in-plane geometry on the (slices, H, W) grid, in mm."""

    x: np.ndarray  # scene coordinates (breath-hold shifts applied per slice)
    y: np.ndarray
    r: np.ndarray  # distance from the LV axis
    u: np.ndarray  # along LV centre -> RV centre
    v: np.ndarray  # towards the anterior wall
    phi: np.ndarray  # polar angle about the LV axis, atan2(v, u)
    ellipse: np.ndarray  # LV cross-section radius per unit scale, by polar angle
    wall: np.ndarray  # relative wall thickness by polar angle (infarct thinning)
    fat: np.ndarray  # epicardial fat thickness (mm) by polar angle
    z: np.ndarray  # slice centres (S,)
    z_base: float  # ED base plane
    z_apex: float  # epicardial apex (ES and ED)
    rv_wrap: float
    radius: float  # nominal LV radius at ED (mm): sizes the atria and great vessels
    thickness: float  # slice thickness (mm): the slab each slice averages over


@dataclass
class _Heart:
    """One phase: long-axis extent and the fitted scales of cavity, wall and RV."""

    z_base: float
    cavity_len: float
    outer_len: float
    rv_len: float
    scale: float = 0.0
    thick: float = 0.0
    rv_offset: float = 0.0
    rv_scale: float = 0.0


def _frame(targets: dict, shape, spacing, rng: np.random.Generator, scanner: Scanner) -> _Frame:
    """Place and orient the heart: in-plane coordinates, cross-section shape, long axis."""
    n_s, n_h, n_w = shape
    dz, dy, dx = spacing
    # One breath-hold per slice: small independent in-plane shifts of a few mm; where the
    # heart sits in the field of view varies between patients.
    shift = rng.normal(0.0, 1.2, size=(n_s, 2)) + rng.normal(0.0, 5.0, size=2)
    rows = (np.arange(n_h) - (n_h - 1) / 2) * dy
    cols = (np.arange(n_w) - (n_w - 1) / 2) * dx
    y = (rows[None, :, None] - shift[:, 0, None, None]).astype(np.float32)
    x = (cols[None, None, :] - shift[:, 1, None, None]).astype(np.float32)
    y, x = np.broadcast_arrays(y, x)

    # The arrays are in dpsynth's assumed orientation (orientation.array_affine): ANGLE 0
    # puts the RV towards -columns (image left), positive ANGLE turns it towards -rows (the
    # anterior wall, image top). theta is the LV -> RV direction as atan2(row, column).
    theta = math.radians(targets["ANGLE"] + 180.0)
    # Put the LV a bit opposite the RV so the whole heart sits near the image centre.
    cy, cx = -14.0 * math.sin(theta), -14.0 * math.cos(theta)
    u = (x - cx) * math.cos(theta) + (y - cy) * math.sin(theta)
    v = (y - cy) * math.cos(theta) - (x - cx) * math.sin(theta)
    phi = np.arctan2(v, u)
    aspect = rng.uniform(0.85, 1.0)  # area-preserving elliptic cross-section
    tilt = rng.uniform(0, math.pi)
    ellipse = 1.0 / np.sqrt(aspect * np.cos(phi - tilt) ** 2 + np.sin(phi - tilt) ** 2 / aspect)
    wall = np.ones_like(phi)
    if targets["GROUP"] == "MINF":
        # A transmural infarct thins a ~90 degree segment of the free wall to ~40 %.
        centre = rng.uniform(0.6 * math.pi, 1.4 * math.pi)
        wall = 1.0 - 0.6 * np.exp(-0.5 * (np.angle(np.exp(1j * (phi - centre))) / 0.5) ** 2)

    # Long axis: the base plane lies just above slice k0's centre, the apex between the
    # last myocardial slice's centre and the next one, so exactly DEPTH slices hold LV.
    # Some stacks miss the base (it lies above the first slice) or the apex (below the
    # last): DEPTH still counts the slices that show heart, and the volumes fitted below
    # are those of the visible part, so the ground truth stays what the image shows.
    depth = int(targets["DEPTH"])
    z = ((np.arange(n_s) + 0.5) * dz).astype(np.float32)
    cut = rng.choice(3, p=(1.0 - scanner.cut, scanner.cut / 2, scanner.cut / 2))
    if cut == 1:  # missed base: the first slice lies 0.6-1.5 slices below the base plane
        k0, z_base = 0, (0.5 - rng.uniform(0.6, 1.5)) * dz
    else:
        k0 = n_s - depth if cut == 2 else int(rng.integers(0, max(1, min(3, n_s - depth + 1))))
        z_base = (k0 + 0.5 - rng.uniform(0.1, 0.45)) * dz
    span = z[k0 + depth - 1] - z_base
    if cut == 2:  # missed apex: it lies 1-2 slices beyond the last one
        z_apex = z[-1] + rng.uniform(1.0, 2.0) * dz
    else:
        f_min = span / (span + dz)
        z_apex = z_base + span / (f_min + (1 - f_min) * rng.uniform(0.25, 0.6))
    # Half-ellipsoid: V = 2/3 pi R^2 L.
    radius = math.sqrt(1.5 * targets["LVEDV"] * 1000.0 / (math.pi * (z_apex - z_base)))
    return _Frame(
        x=x,
        y=y,
        r=np.hypot(u, v),
        u=u,
        v=v,
        phi=phi,
        ellipse=ellipse.astype(np.float32),
        wall=wall.astype(np.float32),
        fat=(1.0 + 1.25 * (1 + np.cos(2 * phi + rng.uniform(0, 2 * math.pi)))).astype(np.float32),
        z=z,
        z_base=float(z_base),
        z_apex=float(z_apex),
        rv_wrap=rng.uniform(1.4, 1.8),
        radius=float(np.clip(radius, 12.0, 45.0)),
        thickness=float(rng.uniform(*scanner.thickness)),
    )


def _profile(z: np.ndarray, z_base: float, length: float) -> np.ndarray:
    """Half-ellipsoid radius profile (1 at the base plane, 0 at the tip), per slice."""
    t = (z - z_base) / length
    g = np.sqrt(np.clip(1.0 - t * t, 0.0, None))
    return np.where(t >= 0, g, 0.0).astype(np.float32)[:, None, None]


def _nth_smallest(q: np.ndarray, n: int) -> float:
    """The scale at which exactly n voxels satisfy q <= scale (clamped to what fits)."""
    finite = q[np.isfinite(q)]
    if n <= 0 or finite.size == 0:
        return 0.0
    n = min(n, finite.size)
    return float(np.partition(finite, n - 1)[n - 1])


class _Phase:
    """The heart at one phase; renders label maps at any slice positions (mask = centres)."""

    def __init__(self, frame: _Frame, heart: _Heart):
        self.f, self.h = frame, heart
        self.rv_plane = None  # in-plane RV distance, fixed once the RV offset is chosen

    def cavity_q(self, z: np.ndarray) -> np.ndarray:
        """Per voxel, the smallest cavity scale that includes it (inf outside the extent)."""
        g = _profile(z, self.h.z_base, self.h.cavity_len) * self.f.ellipse
        with np.errstate(divide="ignore"):
            return np.where(g > 0, self.f.r / g, np.inf)

    def outer_radius(self, z: np.ndarray, thick: float) -> np.ndarray:
        f, h = self.f, self.h
        g = _profile(z, h.z_base, h.cavity_len) * f.ellipse
        go = _profile(z, h.z_base, h.outer_len) * f.ellipse
        wall = thick * f.wall
        # In-plane offset of the cavity by the wall, capped by the outer ellipsoid so that
        # the apex closes; zero outside the LV's long-axis extent.
        return np.where(go > 0, np.maximum(h.scale * g + wall, (h.scale + wall) * go), 0.0)

    def rv_q(self, z: np.ndarray) -> np.ndarray:
        """Per voxel, the smallest RV scale that includes it, ignoring the LV."""
        if self.rv_plane is None:
            f = self.f
            self.rv_plane = np.hypot(f.u - self.h.rv_offset, f.v / f.rv_wrap)
        g = _profile(z, self.h.z_base, self.h.rv_len)
        with np.errstate(divide="ignore"):
            return np.where(g > 0, self.rv_plane / g, np.inf)

    def render(self, z: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Labels, LV outer radius, LV cavity and RV scale fields at slice positions z."""
        h = self.h
        q = self.cavity_q(z)
        outer = self.outer_radius(z, h.thick)
        rv = self.rv_q(z)
        labels = np.zeros(q.shape, np.uint8)
        labels[rv <= h.rv_scale] = RV_BLOOD
        labels[self.f.r < outer] = LV_MYO
        labels[q <= h.scale] = LV_BLOOD
        return labels, outer, q, rv


def _fit_heart(frame: _Frame, targets: dict, phase: str, spacing) -> _Phase:
    """Choose the phase's scales so its mask meets the requested volumes and thickness."""
    lv_ml, rv_ml = targets[f"LV{phase}V"], targets[f"RV{phase}V"]
    thick = targets["MYOEDTHICK" if phase == "ED" else "MYOESTHICK"]
    outer_len = frame.z_apex - frame.z_base
    if phase == "ES":  # the base descends towards the (nearly fixed) apex in systole
        outer_len *= 1.0 - float(np.clip(0.15 * targets["LVEF"] / 62.0, 0.02, 0.2))
    heart = _Heart(
        z_base=frame.z_apex - outer_len,
        cavity_len=max(outer_len - 0.8 * thick, 0.5 * outer_len),
        outer_len=outer_len,
        rv_len=0.85 * outer_len,
    )
    ph = _Phase(frame, heart)
    z = frame.z
    voxel_ml = float(np.prod(spacing)) / 1000.0

    q = ph.cavity_q(z)
    heart.scale = _nth_smallest(q, round(lv_ml / voxel_ml))
    cavity = q <= heart.scale
    # Fixed point: the measured thickness moves ~1:1 with the wall parameter (~2 rounds).
    heart.thick = thick
    for _ in range(6):
        myo = (frame.r < ph.outer_radius(z, heart.thick)) & ~cavity
        measured = wall_thickness(np.where(cavity, LV_BLOOD, np.where(myo, LV_MYO, 0)), spacing)
        if not math.isfinite(measured) or abs(measured - thick) < 0.02:
            break
        heart.thick = max(heart.thick + thick - measured, 0.5)

    # RV: an ellipse centred near the LV's free edge, wide across (rv_wrap) so that, with
    # the LV cut out, it is a crescent around the septum; its scale meets the volume.
    outer = ph.outer_radius(z, heart.thick)
    heart.rv_offset = 0.7 * float(outer.max())
    q = np.where(frame.r >= outer, ph.rv_q(z), np.inf)
    heart.rv_scale = _nth_smallest(q, round(rv_ml / voxel_ml))
    return ph


# -------------------------------------------------------------------------------- images


def _ellipse(y, x, cy, cx, ry, rx) -> np.ndarray:
    return ((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2 < 1.0


def _scene(frame: _Frame, scanner: Scanner, bmi: float, rng: np.random.Generator):
    """Relative intensities around the heart (chest wall, ribs, lungs, liver, spine and the
    descending aorta) and the in-plane footprint of the atria and great vessels, which show
    above the LV base."""
    # The body turns a little with how the short-axis plane was planned.
    a = math.radians(rng.normal(0.0, 7.0))
    x = math.cos(a) * frame.x - math.sin(a) * frame.y
    y = math.sin(a) * frame.x + math.cos(a) * frame.y
    jitter = rng.uniform(0.9, 1.1, size=8)
    img = np.zeros(y.shape, np.float32)  # air
    # Body: subcutaneous fat that thickens with BMI over the chest-wall muscle.
    ry, rx = 120.0 + 1.5 * (bmi - 27.0), 165.0 + 2.0 * (bmi - 27.0)
    fat_mm = float(np.clip(8.0 + 1.6 * (bmi - 22.0), 4.0, 40.0))
    body = ((y - 45.0) / ry) ** 2 + (x / rx) ** 2
    img[body < 1.0] = scanner.fat * jitter[0]
    img[body < (1.0 - fat_mm / ry) ** 2] = scanner.muscle * jitter[1]  # chest wall
    img[body < (1.0 - (fat_mm + 14.0) / ry) ** 2] = scanner.tissue * jitter[2]  # mediastinum
    # Ribs in the anterior and lateral chest wall: dark cortex around brighter marrow.
    for t in rng.uniform(-2.7, -0.45, size=3):
        cy = 45.0 + (ry - fat_mm - 8.0) * math.sin(t)
        cx = (rx - fat_mm - 8.0) * math.cos(t)
        img[_ellipse(y, x, cy, cx, 5.0, 9.0)] = 0.08
        img[_ellipse(y, x, cy, cx, 3.0, 6.0)] = scanner.muscle * 1.6
    # Lungs, dark, with the bright dots of vessels crossing the slice.
    lungs = _ellipse(y, x, 6.0, 64.0, 58.0, 32.0) | _ellipse(y, x, 2.0, -70.0, 52.0, 30.0)
    vessel = rng.random(y.shape, dtype=np.float32) < 0.01
    img[lungs] = scanner.lung * jitter[3]
    img[lungs & vessel] = scanner.lung + 0.3

    below = np.clip((frame.z - frame.z_base) / (frame.z_apex - frame.z_base), 0, 1)[:, None, None]
    liver = _ellipse(y, x, 75.0 - 30.0 * below, -40.0, 20.0 + 30.0 * below, 45.0 + 25.0 * below)
    img[liver & (below > 0.3)] = scanner.liver * jitter[4]
    # Spine: vertebral body (fatty marrow in a dark cortex), the bright CSF of the spinal
    # canal behind it, and the descending aorta beside it (flowing blood, bright).
    img[_ellipse(y, x, 70.0, 0.0, 14.0, 16.0)] = 0.08
    img[_ellipse(y, x, 70.0, 0.0, 12.0, 14.0)] = scanner.muscle * 1.7 * jitter[5]
    img[_ellipse(y, x, 91.0, 0.0, 6.0, 7.0)] = 0.9 * jitter[6]
    img[_ellipse(y, x, 56.0, 30.0, 11.0, 11.0)] = jitter[7]

    # Atria and great vessels in the heart's own frame (u towards the RV, v anterior), sized
    # by the LV: left atrium behind, aortic root (the LV outflow) in the middle, pulmonary
    # trunk in front on the RV side, right atrium behind the RV.
    u, v, rad = frame.u, frame.v, frame.radius
    vessels = (
        _ellipse(v, u, -1.15 * rad, -0.2 * rad, 0.75 * rad, 1.05 * rad)
        | _ellipse(v, u, 0.2 * rad, 0.35 * rad, 0.5 * rad, 0.5 * rad)
        | _ellipse(v, u, 1.05 * rad, 1.2 * rad, 0.42 * rad, 0.42 * rad)
        | _ellipse(v, u, -0.5 * rad, 2.0 * rad, 0.8 * rad, 0.7 * rad)
    )
    # Tissue texture: a few random plane waves (15-40 mm) modulating everything by ~+-8 %.
    texture = np.ones(y.shape[1:], np.float32)
    for _ in range(4):
        k = 2 * math.pi / rng.uniform(15.0, 40.0)
        a = rng.uniform(0, 2 * math.pi)
        texture += 0.04 * np.cos(
            k * (math.cos(a) * x[0] + math.sin(a) * y[0]) + rng.uniform(0, 6.3)
        )
    return img * texture, vessels


@dataclass(frozen=True)
class _Trabeculae:
    """Fine endocardial strands: three interfering angular waves (strand positions) and a
    slower one (how far each reaches into the cavity), all twisting slowly with depth."""

    n: np.ndarray  # angular frequencies
    phase: np.ndarray
    twist: float  # rad per mm of depth: the strands move between slices

    @classmethod
    def draw(cls, rng: np.random.Generator) -> _Trabeculae:
        n = np.array([rng.integers(10, 15), rng.integers(16, 23), rng.integers(25, 33), 3])
        return cls(n, rng.uniform(0, 2 * math.pi, 4), float(rng.normal(0, 0.03)))

    def strands(self, phi: np.ndarray, z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Where strands are (wave above ~1), and how deep they reach (0.2-1) by angle."""
        zz = z[:, None, None] * self.twist
        wave = sum(np.cos(self.n[i] * phi + self.phase[i] + zz * (i + 1)) for i in range(3))
        return wave, 0.6 + 0.4 * np.cos(self.n[3] * phi + self.phase[3] - zz)


def _heart_intensity(
    ph: _Phase,
    z: np.ndarray,
    scene: np.ndarray,
    scanner: Scanner,
    strands: tuple[np.ndarray, np.ndarray],
) -> np.ndarray:
    f, h = ph.f, ph.h
    labels, outer, q, rv = ph.render(z)
    img = scene.copy()
    # Epicardial fat of varying thickness, and the thin RV free wall (dark like myocardium).
    background = labels == 0
    fat = (f.r < outer + f.fat) | (rv <= h.rv_scale + 3.0 + f.fat)
    img[background & fat] = scanner.fat
    img[background & (rv <= h.rv_scale + 3.0)] = scanner.myocardium
    lv, rv_blood = labels == LV_BLOOD, labels == RV_BLOOD
    img[lv | rv_blood] = 1.0
    img[labels == LV_MYO] = scanner.myocardium
    # Endocardial trabeculation: thin irregular strands along the cavity border, deeper
    # towards the apex, in the LV and (coarser) the RV. The masks count them as blood pool,
    # as ukbb_cardiac's segmentations do (Bai et al., JCMR 2018).
    wave, reach = strands
    apical = np.clip((z - h.z_base) / (h.outer_len + 1e-6), 0, 1)[:, None, None]
    grey = scanner.myocardium + 0.3 * (1.0 - scanner.myocardium)  # thin: partial volume
    depth = (0.14 + 0.2 * apical) * reach  # fraction of the cavity radius they reach in
    img[lv & (q > h.scale * (1.0 - depth)) & (wave > 0.9)] = grey
    img[rv_blood & (rv > h.rv_scale * (1.0 - 0.15 * reach)) & (wave < -1.3)] = grey
    # Two papillary muscles: dark spots that the masks count as blood pool (as UK Biobank's).
    rc = h.scale * _profile(z, h.z_base, h.cavity_len)
    for ang in (math.pi - 0.9, math.pi + 0.9):
        pu, pv = 0.55 * rc * math.cos(ang), 0.55 * rc * math.sin(ang)
        spot = (f.u - pu) ** 2 + (f.v - pv) ** 2 < (0.18 * rc) ** 2
        img[spot & lv] = scanner.myocardium * 1.3
    return img


def _acquire(signal: np.ndarray, frame: _Frame, scanner: Scanner, rng) -> np.ndarray:
    """Scanner effects on relative intensities: PSF, coil bias, Rician noise, int16 scale."""
    signal = ndimage.gaussian_filter(signal, sigma=(0, scanner.psf_px, scanner.psf_px))
    # Smooth coil sensitivity, brighter towards the anterior (top) surface coil.
    c = rng.normal(0.0, scanner.bias, size=3)
    y, x = frame.y[0], frame.x[0]
    signal *= np.exp(c[0] * x / 100 + (c[1] - 0.2) * y / 100 + c[2] * (x * x + y * y) / 1e4)
    noise = rng.standard_normal((2, *signal.shape), dtype=np.float32) * scanner.noise
    gain = rng.uniform(*scanner.gain)
    return np.clip(np.rint(np.hypot(signal + noise[0], noise[1]) * gain), 0, 32767).astype(np.int16)


def render_patient(
    targets: dict,
    rng: np.random.Generator,
    shape: tuple[int, int, int] = DEFAULT_SHAPE,
    spacing: tuple[float, float, float] = DEFAULT_SPACING,
    cohort: str = "ukbb",
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Images (int16) and masks (uint8) at ED and ES for the requested attributes."""
    _check_cohort(cohort)
    if not 1 <= targets["DEPTH"] <= shape[0]:
        raise DpsynthError(f"DEPTH: {targets['DEPTH']} slices do not fit a {shape[0]}-slice volume")
    scanner = SCANNERS[cohort]
    frame = _frame(targets, shape, spacing, rng, scanner)
    bmi = targets.get("BMI", float("nan"))
    surroundings, vessels = _scene(frame, scanner, bmi if math.isfinite(bmi) else 27.0, rng)
    # The strands' pattern hardly moves within a slab or between phases: drawn once.
    strands = _Trabeculae.draw(rng).strands(frame.phi, frame.z)
    # Through-slice partial volume: average the slab (the slice thickness) at three depths.
    slab = (-frame.thickness / 3, 0.0, frame.thickness / 3)
    images, masks = {}, {}
    for phase in PHASES:
        ph = _fit_heart(frame, targets, phase, spacing)
        masks[phase] = ph.render(frame.z)[0]
        # Bright atrial and vessel blood above this phase's base (it descends in systole).
        signal = sum(
            _heart_intensity(
                ph,
                frame.z + d,
                np.where(vessels & (frame.z + d < ph.h.z_base)[:, None, None], 1.0, surroundings),
                scanner,
                strands,
            )
            for d in slab
        )
        images[phase] = _acquire(signal / len(slab), frame, scanner, rng)
    return images, masks


def simulate_patient(
    rng: np.random.Generator | int,
    cohort: str = "ukbb",
    shape: tuple[int, int, int] = DEFAULT_SHAPE,
    spacing: tuple[float, float, float] = DEFAULT_SPACING,
) -> SimulatedPatient:
    """Draw and render one patient; attributes are measured from the rendered masks."""
    rng = np.random.default_rng(rng)
    _check_cohort(cohort)
    scanner = SCANNERS[cohort]
    m = rng.uniform(*scanner.inplane_scale)
    spacing = (float(spacing[0]), float(spacing[1]) * m, float(spacing[2]) * m)
    # Finer pixels come with a larger matrix, as on a real scanner: the field of view never
    # shrinks below the requested one (a smaller one leaves black borders after resampling);
    # some scanners' fields of view are larger and rectangular.
    fov = rng.uniform(*scanner.fov, size=2)
    shape = (shape[0], math.ceil(shape[1] * fov[0] / m), math.ceil(shape[2] * fov[1] / m))
    targets = draw_targets(rng, cohort, shape[0], spacing[0])
    images, masks = render_patient(targets, rng, shape, spacing, cohort)
    attributes = {k: targets[k] for k in SUBJECT}
    attributes.update(measure_patient(masks["ED"], masks["ES"], spacing))
    storage = int(rng.integers(1, 8)) if rng.random() < scanner.stored else 0
    return SimulatedPatient(images, masks, attributes, targets, spacing, storage)


def stored_array(
    volume: np.ndarray, spacing: tuple[float, float, float], storage: int
) -> tuple[np.ndarray, tuple[float, float, float], np.ndarray]:
    """A (slices, H, W) array in dpsynth's orientation as a scanner may store it: flipped
    (bits 1: rows, 2: columns) then transposed in-plane (bit 4), with the NIfTI affine that
    keeps every voxel at its place in the patient, so ANGLE and prepared arrays are unchanged.

    Returns the stored array, its (dz, dy, dx) spacing and affine.
    """
    dz, dy, dx = spacing
    _, n_h, n_w = volume.shape
    index = np.eye(4)  # stored voxel (column, row, slice, 1) -> canonical voxel
    if storage & 1:
        volume = volume[:, ::-1]
        index = np.diag([1.0, -1.0, 1.0, 1.0]) @ index
        index[1, 3] = n_h - 1
    if storage & 2:
        volume = volume[:, :, ::-1]
        flip = np.diag([-1.0, 1.0, 1.0, 1.0])
        flip[0, 3] = n_w - 1
        index = flip @ index
    if storage & 4:
        volume = volume.transpose(0, 2, 1)
        index = index[:, [1, 0, 2, 3]]
        dy, dx = dx, dy
    return np.ascontiguousarray(volume), (dz, dy, dx), array_affine(spacing) @ index


# -------------------------------------------------------------------------------- cohort


def patient_id(cohort: str, index: int) -> str:
    return f"{1000001 + index}" if cohort == "ukbb" else f"patient{index + 1:03d}"


def _write_patient(job: tuple) -> tuple[dict, dict]:
    root, index, seed, cohort, shape, spacing = job
    rng = np.random.default_rng(np.random.SeedSequence([seed, index]))
    p = simulate_patient(rng, cohort, shape, spacing)
    folder = Path(root) / patient_id(cohort, index)
    folder.mkdir()
    for ph in PHASES:
        image, spacing, affine = stored_array(p.images[ph], p.spacing, p.storage)
        write_nifti(folder / f"sa_{ph}.nii.gz", image, spacing, np.int16, affine=affine)
        mask, _, _ = stored_array(p.masks[ph], p.spacing, p.storage)
        write_nifti(folder / f"seg_sa_{ph}.nii.gz", mask, spacing, np.uint8, True, affine)
    return p.attributes, p.targets


def _csv(rows: list[dict], columns: tuple[str, ...]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow([_fmt(row[c]) for c in columns])
    return buf.getvalue()


def _fmt(value) -> str:
    if isinstance(value, str):
        return value
    return "nan" if not math.isfinite(value) else f"{value:.6g}"


def simulate_cohort(
    out: str | os.PathLike,
    n_patients: int,
    cohort: str = "ukbb",
    seed: int = 0,
    shape: tuple[int, int, int] = DEFAULT_SHAPE,
    spacing: tuple[float, float, float] = DEFAULT_SPACING,
    workers: int = 2,
) -> Path:
    """Write a simulated cohort in the ukbb_cardiac layout and return its folder.

    ``out/<id>/{sa,seg_sa}_{ED,ES}.nii.gz``, ``out/attributes.csv`` (id, AGE, SEX, BMI and
    the 10 cardiac attributes measured from the masks; missing = nan) and
    ``out/simulation_targets.csv`` (id, GROUP and the requested values). Patient i uses the
    RNG stream (seed, i), so the output does not depend on ``workers``.
    """
    _check_cohort(cohort)
    if not isinstance(n_patients, int) or n_patients < 1:
        raise DpsynthError(f"n_patients: expected a positive integer, got {n_patients!r}")
    if not isinstance(seed, int) or seed < 0:
        raise DpsynthError(f"seed: expected a non-negative integer, got {seed!r}")
    if len(shape) != 3 or any(int(s) != s or s < 1 for s in shape) or shape[0] < 4:
        raise DpsynthError(f"shape: expected (slices >= 4, H, W) positive integers, got {shape}")
    if len(spacing) != 3 or not all(math.isfinite(s) and s > 0 for s in spacing):
        raise DpsynthError(f"spacing: expected (dz, dy, dx) > 0 mm, got {spacing}")
    if workers < 1:
        raise DpsynthError(f"workers: expected at least 1, got {workers}")
    shape = tuple(int(s) for s in shape)
    spacing = tuple(float(s) for s in spacing)

    out = Path(out)
    with atomic_dir(out) as tmp:
        jobs = [(str(tmp), i, seed, cohort, shape, spacing) for i in range(n_patients)]
        if workers == 1:
            results = list(map(_write_patient, jobs))
        else:
            with ProcessPoolExecutor(max_workers=workers) as pool:
                results = list(pool.map(_write_patient, jobs, chunksize=8))
        ids = [patient_id(cohort, i) for i in range(n_patients)]
        attributes = [{"id": i, **a} for i, (a, _) in zip(ids, results, strict=True)]
        targets = [{"id": i, **t} for i, (_, t) in zip(ids, results, strict=True)]
        atomic_write_text(tmp / "attributes.csv", _csv(attributes, ("id", *SUBJECT, *CARDIAC)))
        atomic_write_text(
            tmp / "simulation_targets.csv",
            _csv(targets, ("id", "GROUP", *SUBJECT, *CARDIAC)),
        )
    return out


def _check_cohort(cohort: str) -> None:
    if cohort not in COHORTS:
        raise DpsynthError(f"cohort: expected one of {', '.join(COHORTS)}, got {cohort!r}")
