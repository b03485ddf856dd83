"""docs/phantoms.png: basal, mid and apical slices of simulated patients at ED and ES.

    .venv/bin/python benchmarks/phantom_figure.py --out docs/phantoms.png

One row per patient (ukbb and acdc cohorts, 13x96x96 at 1.8269 mm requested),
images as simulated (int16, shown with the 0.5-99.5 percentile window that `prepare`
uses), mask outlines: LV blood pool red, LV myocardium yellow, RV blood pool cyan.
Slices are picked from the ED mask: the most basal and most apical slice holding LV
myocardium, and the one between; ES shows the same slice positions (the base descends).
"""

from __future__ import annotations

import argparse

import numpy as np
from matplotlib.figure import Figure

from dpsynth.data.figures import png
from dpsynth.data.measure import LV_BLOOD, LV_MYO, RV_BLOOD
from dpsynth.data.simulate import simulate_patient
from dpsynth.io import atomic_write_bytes

OUTLINES = {LV_BLOOD: "tab:red", LV_MYO: "gold", RV_BLOOD: "cyan"}
PATIENTS = (("ukbb", 0), ("ukbb", 5), ("acdc", 1), ("acdc", 4))  # seeds: one of each look


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="docs/phantoms.png")
    args = parser.parse_args()

    fig = Figure(figsize=(6 * 2.4, len(PATIENTS) * 2.5))
    axes = fig.subplots(len(PATIENTS), 6, squeeze=False)
    for row, (cohort, seed) in enumerate(PATIENTS):
        p = simulate_patient(seed, cohort, (13, 96, 96))
        myo = np.flatnonzero((p.masks["ED"] == LV_MYO).any(axis=(1, 2)))
        picks = {"basal": myo[0], "mid": (myo[0] + myo[-1]) // 2, "apical": myo[-1]}
        for j, phase in enumerate(("ED", "ES")):
            image, mask = p.images[phase].astype(np.float32), p.masks[phase]
            lo, hi = np.percentile(image, (0.5, 99.5))
            for col, (name, k) in enumerate(picks.items()):
                ax = axes[row, 3 * j + col]
                ax.imshow(np.clip((image[k] - lo) / (hi - lo), 0, 1), cmap="gray", vmin=0, vmax=1)
                for label, colour in OUTLINES.items():
                    if (mask[k] == label).any():
                        ax.contour(mask[k] == label, [0.5], colors=colour, linewidths=0.5)
                ax.set_xticks([])
                ax.set_yticks([])
                if row == 0:
                    ax.set_title(f"{phase} {name}", fontsize=10)
        label = f"{cohort} #{seed}\n{p.targets['GROUP']}, {p.images['ED'].shape[1]}x{p.images['ED'].shape[2]}"
        axes[row, 0].set_ylabel(label, fontsize=9)
    fig.subplots_adjust(wspace=0.03, hspace=0.05)
    atomic_write_bytes(args.out, png(fig))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
