"""What a user watches during long work: a progress bar with rate and ETA, metrics.jsonl."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from dpsynth.privacy.accounting import format_bound
from dpsynth.privacy.outputs import METRICS_FILE


class Monitor:
    """Progress bar (loss, volumes/s, ETA) plus an append-only `metrics.jsonl`."""

    def __init__(self, run_dir: Path, total_steps: int, start_step: int, desc: str) -> None:
        self.path = Path(run_dir) / METRICS_FILE
        self.bar = tqdm(
            total=total_steps, initial=start_step, desc=desc, unit="step", dynamic_ncols=True
        )
        self._t0 = time.perf_counter()
        self._volumes = 0

    def step(self, step: int, volumes: int, metrics: dict[str, float], log: bool) -> None:
        self._volumes += volumes
        rate = self._volumes / max(time.perf_counter() - self._t0, 1e-9)
        self.bar.update(1)
        if log:
            shown = {k: f"{v:.4g}" for k, v in metrics.items() if k == "loss"}
            if "epsilon" in metrics:  # spent so far, stated rounded up as everywhere
                shown["epsilon"] = format_bound(metrics["epsilon"])
            self.bar.set_postfix(**shown, vol_s=f"{rate:.1f}")
            self.write({"step": step, "volumes_per_s": round(rate, 3), **metrics})

    def write(self, record: dict[str, Any]) -> None:
        append_metrics(self.path.parent, record)

    def close(self) -> None:
        self.bar.close()


def append_metrics(run_dir: Path, record: dict[str, Any]) -> None:
    """Append one timestamped JSON line to `run_dir/metrics.jsonl`."""
    with (Path(run_dir) / METRICS_FILE).open("a") as f:
        f.write(json.dumps({"time": round(time.time(), 3), **record}) + "\n")
