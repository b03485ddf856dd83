"""Membership-inference audit: attack strength and time against the number of fixed noises.

Runs the patient-level loss-threshold attack of `dpsynth evaluate` on a model run, with
the cache's train split as members and its test split as held-out patients, once per
`--noise` value. A non-private run is the one to use: there the attack has power to lose.

    .venv/bin/python benchmarks/bench_audit.py --run runs/bench-paper/epsinf_pretrain \\
        --data runs/bench-paper/data/ukbb_cache --noise 2 4
"""

from __future__ import annotations

import argparse
import time

import dpsynth
from dpsynth.data.volumes import load_volume_set
from dpsynth.evaluation.audit import membership_inference


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--noise", type=int, nargs="+", default=[2, 4])
    args = parser.parse_args()

    members, held_out = (load_volume_set(args.data, split) for split in ("train", "test"))
    pipeline = dpsynth.load(args.run)
    for n_noise in args.noise:
        start = time.perf_counter()
        r = membership_inference(
            pipeline,
            (members.volumes, members.attributes, members.patients),
            (held_out.volumes, held_out.attributes, held_out.patients),
            n_noise=n_noise,
        )
        p = r["patient"]
        print(
            f"n_noise {n_noise}: patient AUC {p['auc']:.3f} ± {p['auc_std']:.3f}, "
            f"TPR at 1% FPR {p['tpr_at_1pct_fpr']:.3f}, volume AUC {r['volume']['auc']:.3f}, "
            f"{time.perf_counter() - start:.0f} s",
            flush=True,
        )


if __name__ == "__main__":
    main()
