"""Rank 0's metrics sinks: ``metrics.jsonl`` and TensorBoard event files in the run directory."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

METRICS_FILE = "metrics.jsonl"
# Every key the training loop reports each logging interval (to Ray, metrics.jsonl and TensorBoard).
REPORTED_METRICS = (
    "train/loss", "train/l1", "train/grad_norm", "train/epoch", "train/step", "train/lr_decoder",
    "train/lr_latents", "guard/skipped_steps", "guard/interval_skipped_steps", "guard/skip_fraction",
    "guard/consecutive_skips", "guard/longest_skip_streak", "guard/clipped_steps", "guard/rollbacks",
    "perf/samples_per_s", "perf/step_time_ms", "restarts", "diverged",
)


def finite_or_inf(value: float) -> float:
    """Schedulers and JSON must never see NaN: report +inf instead."""
    return value if math.isfinite(value) else math.inf


class MetricsWriter:
    def __init__(self, run_dir: str | Path, tensorboard: bool) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._file = open(self.run_dir / METRICS_FILE, "a", buffering=1)  # noqa: SIM115 - closed in close()
        self._tb: Any = None
        if tensorboard:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(str(self.run_dir / "tensorboard"))

    def write(self, metrics: dict[str, float | int]) -> None:
        self._file.write(json.dumps(metrics, allow_nan=True) + "\n")
        if self._tb is not None:
            step = int(metrics.get("train/step", 0))
            for key, value in metrics.items():
                if isinstance(value, (int, float)) and "/" in key and math.isfinite(value):
                    self._tb.add_scalar(key, value, step)

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / METRICS_FILE
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
