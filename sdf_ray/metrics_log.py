"""The training metrics: collected once per logging interval, printed as a progress line, and written by rank 0
to ``metrics.jsonl`` and TensorBoard event files in the run directory."""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sdf_ray.train_state import TrainState

METRICS_FILE = "metrics.jsonl"
# Every key the training loop reports each logging interval (to Ray, metrics.jsonl and TensorBoard).
REPORTED_METRICS = (
    "train/loss", "train/l1", "train/grad_norm", "train/epoch", "train/step", "train/lr_decoder",
    "train/lr_latents", "guard/skipped_steps", "guard/interval_skipped_steps", "guard/skip_fraction",
    "guard/consecutive_skips", "guard/longest_skip_streak", "guard/clipped_steps", "guard/rollbacks",
    "perf/samples_per_s", "perf/step_time_ms", "restarts", "diverged",
)
# What a validation pass adds to the report of its step (``validation.path`` set; a pass that is skipped on a
# non-finite decoder reports inf and val/skipped = 1). val/chamfer_l2 needs validation.mesh_resolution > 0.
VALIDATION_METRICS = ("val/sdf_l1", "val/chamfer_l2", "val/failed_shapes", "val/skipped", "perf/val_seconds")


def finite_or_inf(value: float) -> float:
    """Schedulers and JSON must never see NaN: report +inf instead."""
    return value if math.isfinite(value) else math.inf


@dataclass
class IntervalClock:
    """Host-side timing between logging syncs (the sync drains the device, so the times are real)."""

    last_counters: dict[str, int]
    start_time: float = field(default_factory=time.perf_counter)
    steady_samples: float = 0.0
    steady_time: float = 0.0
    intervals: int = 0

    @property
    def steady_samples_per_s(self) -> float:
        return self.steady_samples / self.steady_time if self.steady_time > 0 else 0.0


def collect_metrics(state: TrainState, clock: IntervalClock) -> dict[str, Any]:
    """The interval's ``REPORTED_METRICS``: one all-reduce and one host sync per logging interval."""
    acc = state.metric_acc.clone()
    state.coll.all_reduce_sum_(acc)
    (loss_sum, l1_sum, norm_sum), counters = state.counters.read_with(acc)  # the interval's one host sync
    state.metric_acc.zero_()
    now = time.perf_counter()
    state.counters.start_interval_()
    steps = counters["steps"] - clock.last_counters["steps"]
    skipped = counters["skipped_steps"] - clock.last_counters["skipped_steps"]
    good = steps - skipped
    elapsed = max(now - clock.start_time, 1e-9)
    samples = steps * state.cfg.data.scenes_per_step * state.cfg.data.samples_per_scene
    if clock.intervals > 0:  # the first interval carries warm-up (allocations, compilation)
        clock.steady_samples += samples
        clock.steady_time += elapsed
    clock.intervals += 1
    clock.start_time, clock.last_counters = now, counters
    state.elapsed_s += elapsed
    denominator = state.coll.world_size * good
    lrs = {g["name"]: g["lr"] for g in state.optimizer.param_groups}
    return {
        "train/loss": finite_or_inf(loss_sum / denominator) if good else math.inf,
        "train/l1": finite_or_inf(l1_sum / denominator) if good else math.inf,
        "train/grad_norm": finite_or_inf(norm_sum / denominator) if good else math.inf,
        "train/epoch": round(state.step / state.steps_per_epoch, 4),
        "train/step": state.step,
        "train/lr_decoder": lrs["decoder"],
        "train/lr_latents": lrs["latents"],
        "guard/skipped_steps": counters["skipped_steps"],
        "guard/interval_skipped_steps": skipped,
        "guard/skip_fraction": skipped / steps if steps else 0.0,
        "guard/consecutive_skips": counters["consecutive_skips"],
        "guard/longest_skip_streak": counters["longest_skip_streak"],
        "guard/clipped_steps": counters["clipped_steps"],
        "guard/rollbacks": state.escalation.rollbacks,
        "perf/samples_per_s": samples / elapsed,
        "perf/step_time_ms": 1000 * elapsed / steps if steps else 0.0,
        "restarts": state.restarts,
        "diverged": 0,
    }


def start_line(state: TrainState, resumed: bool) -> str:
    cfg = state.cfg
    return (f"training {state.num_scenes_total} scenes on {state.coll.world_size} worker(s) ({state.device.type}): "
            f"{state.steps_per_epoch} steps/epoch, {state.total_steps} steps, "
            f"{cfg.data.scenes_per_step * cfg.data.samples_per_scene:,} samples/step"
            + (f", compiled for {'a cached start' if cfg.model.compile_cacheable else 'the fastest step'}"
               if cfg.model.compile else "")
            + (f", resuming at step {state.step}" if resumed else ""))


def progress_line(state: TrainState, metrics: dict[str, Any]) -> str:
    epoch = state.step // state.steps_per_epoch
    remaining = state.total_steps - state.step
    eta = remaining * metrics["perf/step_time_ms"] / 1000
    return (f"epoch {epoch}/{state.cfg.optim.num_epochs}  step {state.step}/{state.total_steps}  "
            f"loss {metrics['train/loss']:.5f}  |g| {metrics['train/grad_norm']:.3g}  "
            f"{metrics['perf/samples_per_s'] / 1e6:.2f}M samples/s  "
            f"skipped {metrics['guard/skipped_steps']}  rollbacks {metrics['guard/rollbacks']}  "
            f"ETA {_fmt_duration(eta)}")


def _fmt_duration(seconds: float) -> str:
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s" if m else f"{s}s"


class MetricsWriter:
    """Rank 0's sinks: one JSON line per report, and TensorBoard scalars when enabled."""

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
