"""Every sdf-ray figure, headless and in one style: training curves, Tune sweeps, SDF slices, reconstructions.

Figures are drawn on ``matplotlib.figure.Figure`` objects with the Agg canvas, never through ``pyplot``: no
display, no global backend switch, nothing left open between calls (safe in a training driver or a Ray task).
Each figure goes next to the data it shows, under ``<dir>/plots/``.

* :func:`plot_training` -> ``RUN_DIR/plots/training.png``: loss, gradient norm before clipping against
  ``guard.grad_clip``, learning rates, samples/s, skipped steps per interval, validation metrics when the run
  has them; every skipped step, rollback and restart marked on the time axis. It returns the event positions it
  drew (:class:`TrainingEvents`).
* :func:`plot_sweep` -> ``SWEEP_DIR/plots/sweep.png``: each trial's metric curve coloured by its final status,
  and the searched parameters against each other coloured by the metric, the best trial marked.
* :func:`plot_sdf_slices` -> ``plots/slices.png``: decoded SDFs on the planes z = 0, y = 0, x = 0 with the zero
  contour, next to the exact SDF where it is known.
* :func:`contact_sheet`: rendered reconstructions next to their ground-truth points, the Chamfer distance under
  each (Lambert-shaded triangles, big meshes decimated by vertex clustering).

**The time axis of training curves is "steps executed"**: the number of optimizer steps run so far, skipped
ones included, counting again the steps re-run after a rollback (back to the last good checkpoint) or a worker-
group restart (back to the latest checkpoint). ``train/step`` cannot be the axis: it jumps back at both. Steps
executed only grows, so a rollback shows as a stretch of curve drawn twice over the same training steps, not as a
line folding back onto itself. Metrics are reported once per ``logging.every_n_steps`` interval; an event is drawn
at the end of the interval it happened in (a skip at its exact step when ``logging.every_n_steps = 1``), a
restart where the restarted worker group's steps begin.

The plotting functions take plain data (records, arrays, callables); reading run and sweep directories is done by
small loaders here. Nothing here imports Ray; torch only for decoding slices from a run's checkpoint.
"""

from __future__ import annotations

import csv
import json
import logging
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from sdf_ray.errors import UserError
from sdf_ray.metrics_log import METRICS_FILE
from sdf_ray.run_files import (
    RESOLVED_CONFIG_FILE,
    SUMMARY_FILE,
    SWEEP_FILE,
    SWEEP_SUMMARY_FILE,
    TRIALS_CSV,
    TRIALS_SUBDIR,
)

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

log = logging.getLogger("sdf_ray")

PLOTS_DIR = "plots"
TRAINING_PNG = "training.png"
SWEEP_PNG = "sweep.png"
SLICES_PNG = "slices.png"
VALIDATION_METRICS = ("val/sdf_l1", "val/chamfer_l2")
DPI = 100

# ---------------------------------------------------------------------------------------------
# One style

STYLE: dict[str, Any] = {
    "font.size": 9,
    "axes.titlesize": 10,
    "axes.titleweight": "bold",
    "axes.labelsize": 9,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.alpha": 0.25,
    "grid.linewidth": 0.6,
    "legend.fontsize": 8,
    "legend.frameon": False,
    "lines.linewidth": 1.4,
    "savefig.facecolor": "white",
    "figure.facecolor": "white",
}
BLUE, ORANGE, GREEN, RED, PURPLE, GREY = "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#7f7f7f"
EVENT_STYLE: dict[str, dict[str, Any]] = {  # how each event is marked across every training panel
    "skip": {"color": ORANGE, "linestyle": "-", "linewidth": 0.9, "alpha": 0.55},
    "rollback": {"color": RED, "linestyle": "--", "linewidth": 1.4, "alpha": 0.9},
    "restart": {"color": PURPLE, "linestyle": "-.", "linewidth": 1.4, "alpha": 0.9},
}
STATUS_COLORS = {  # final status of a Tune trial (tuning/sweep.py trial_rows)
    "finished": BLUE,
    "pruned_asha": "#a0a0a0",
    "pruned_diverged": RED,
    "pruned_collapsed": ORANGE,
    "error": "#222222",
    "stopped": "#8c564b",
    "unfinished": "#bcbd22",
}
STATUS_MARKERS = {"finished": "o", "pruned_asha": "s", "pruned_diverged": "X", "pruned_collapsed": "v",
                  "error": "P", "stopped": "D", "unfinished": "^"}


@contextmanager
def _style() -> Iterator[None]:
    import matplotlib

    with matplotlib.rc_context(dict(STYLE)):  # type: ignore[arg-type]  # the stubs list every rc key
        yield


def _figure(width_in: float, height_in: float) -> Figure:
    from matplotlib.figure import Figure

    # Figure() without pyplot: Agg renders savefig(.png); no GUI backend is ever touched.
    return Figure(figsize=(width_in, height_in), dpi=DPI, layout="constrained")


def _save(fig: Figure, out_path: str | Path) -> Path:
    """Render with Agg and write a 256-colour PNG (a third of the bytes of RGBA for flat-coloured figures)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from PIL import Image  # a dependency of matplotlib

    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    rgb = Image.fromarray(np.asarray(canvas.buffer_rgba())[..., :3])
    image = rgb.quantize(256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    tmp = out.with_name(f".{out.name}.tmp")
    image.save(tmp, format="png", optimize=True)
    tmp.replace(out)  # atomic: a reader never sees half a PNG
    return out


def _finite(value: Any) -> float:
    """A float, NaN for anything missing or non-finite (matplotlib leaves a gap at NaN)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return math.nan
    return number if math.isfinite(number) else math.nan


def _series(records: Sequence[Mapping[str, Any]], key: str) -> np.ndarray:
    return np.array([_finite(r.get(key)) for r in records], dtype=np.float64)


def _has(values: np.ndarray) -> bool:
    return bool(np.isfinite(values).any())


def _positive(values: np.ndarray) -> bool:
    finite = values[np.isfinite(values)]
    return bool(finite.size) and bool((finite > 0).all())


# ---------------------------------------------------------------------------------------------
# Training runs


@dataclass(frozen=True)
class TrainingEvents:
    """Where the guard and Ray intervened, in steps executed (the x axis of the training figure)."""

    skip_steps: tuple[int, ...] = ()
    """End of each logging interval with skipped steps (the skipped step itself when logging.every_n_steps = 1)."""
    skip_counts: tuple[int, ...] = ()
    """Steps skipped in each of those intervals."""
    rollback_steps: tuple[int, ...] = ()
    """Where the guard rolled back to the last good checkpoint (the end of the bad window)."""
    restart_steps: tuple[int, ...] = ()
    """Where a restarted worker group resumed from the latest checkpoint."""
    diverged_step: int | None = None
    """Where the run stopped as diverged, if it did."""


@dataclass(frozen=True)
class Timeline:
    """The reports of a run on the steps-executed axis, and the events between them."""

    x: np.ndarray
    """Steps executed at each report (non-decreasing)."""
    events: TrainingEvents


def training_timeline(records: Sequence[Mapping[str, Any]]) -> Timeline:
    """Place each report on the steps-executed axis and find the skips, rollbacks and restarts.

    A report's interval ran from the previous report boundary to its ``train/step``. When ``train/step`` jumps
    back (after a rollback, a worker-group restart, or a resumed ``sdf-ray train``), training resumed from a
    checkpoint, and every checkpoint is also a report: the interval began at the largest earlier reported step
    below this one (0 when none).
    """
    x: list[int] = []
    skip_steps: list[int] = []
    skip_counts: list[int] = []
    rollbacks: list[int] = []
    restarts: list[int] = []
    diverged: int | None = None
    seen_steps: list[int] = []
    executed = 0
    prev: Mapping[str, Any] | None = None
    for record in records:
        step = int(record.get("train/step") or 0)
        if prev is None:
            start = 0
        elif step > int(prev.get("train/step") or 0):
            start = int(prev.get("train/step") or 0)
        else:
            start = max((s for s in seen_steps if s < step), default=0)
        begin = executed
        executed += max(step - start, 0)
        x.append(executed)
        seen_steps.append(step)
        if "guard/interval_skipped_steps" in record:
            skipped = int(record.get("guard/interval_skipped_steps") or 0)
        else:  # older metrics files: the cumulative counter's growth
            skipped = int(record.get("guard/skipped_steps") or 0) - int((prev or {}).get("guard/skipped_steps") or 0)
        if skipped > 0:
            skip_steps.append(executed)
            skip_counts.append(skipped)
        if int(record.get("guard/rollbacks") or 0) > int((prev or {}).get("guard/rollbacks") or 0):
            rollbacks.append(executed)
        # `restarts` counts worker-group starts within one `sdf-ray train`; a new invocation starts again at 0.
        if int(record.get("restarts") or 0) > int((prev or {}).get("restarts") or 0):
            restarts.append(begin)
        if int(record.get("diverged") or 0) and diverged is None:
            diverged = executed
        prev = record
    events = TrainingEvents(skip_steps=tuple(skip_steps), skip_counts=tuple(skip_counts),
                            rollback_steps=tuple(rollbacks), restart_steps=tuple(restarts), diverged_step=diverged)
    return Timeline(x=np.array(x, dtype=np.float64), events=events)


@dataclass(frozen=True)
class TrainingPlot:
    path: Path
    events: TrainingEvents


def _mark_events(ax: Axes, events: TrainingEvents) -> None:
    for kind, positions in (("skip", events.skip_steps), ("rollback", events.rollback_steps),
                            ("restart", events.restart_steps)):
        for xpos in positions:
            ax.axvline(xpos, zorder=0.5, **EVENT_STYLE[kind])
    if events.diverged_step is not None:
        ax.axvline(events.diverged_step, color="black", linewidth=1.6, zorder=0.5)


def _event_legend(fig: Figure, events: TrainingEvents) -> None:
    from matplotlib.lines import Line2D

    handles, labels = [], []
    skipped = sum(events.skip_counts)
    for kind, count, label in (
        ("skip", skipped, f"skipped step{'s' if skipped != 1 else ''} ({skipped})"),
        ("rollback", len(events.rollback_steps), f"rollback{'s' if len(events.rollback_steps) != 1 else ''} "
                                                 f"({len(events.rollback_steps)})"),
        ("restart", len(events.restart_steps), f"worker-group restart{'s' if len(events.restart_steps) != 1 else ''} "
                                               f"({len(events.restart_steps)})"),
    ):
        if count:
            handles.append(Line2D([], [], **EVENT_STYLE[kind]))
            labels.append(label)
    if events.diverged_step is not None:
        handles.append(Line2D([], [], color="black", linewidth=1.6))
        labels.append("diverged: run stopped")
    if handles:
        fig.legend(handles, labels, loc="outside lower center", ncols=len(handles))


def _title(run_name: str, records: Sequence[Mapping[str, Any]], summary: Mapping[str, Any] | None) -> str:
    last = records[-1]
    summary = summary or {}
    status = summary.get("status") or ("diverged" if last.get("diverged") else "in progress")
    steps = summary.get("steps", last.get("train/step"))
    loss = _finite(summary.get("final_loss", last.get("train/loss")))
    parts = [f"{run_name}: {status}", f"{steps} steps"]
    if math.isfinite(loss):
        parts.append(f"final loss {loss:.4g}")
    parts.append(f"skipped {summary.get('skipped_steps', last.get('guard/skipped_steps', 0))}, "
                 f"rollbacks {summary.get('rollbacks', last.get('guard/rollbacks', 0))}, "
                 f"restarts {summary.get('restarts', last.get('restarts', 0))}")
    return "  ·  ".join(parts)


def plot_training_records(records: Sequence[Mapping[str, Any]], out_path: str | Path, *, grad_clip: float | None = None,
                          title: str = "") -> TrainingPlot:
    """Draw the training figure from ``metrics.jsonl`` records; returns its path and the events it marked."""
    from matplotlib.ticker import MaxNLocator

    if not records:
        raise UserError("no metrics to plot (metrics.jsonl is empty: the run stopped before its first report)")
    timeline = training_timeline(records)
    x, events = timeline.x, timeline.events
    validation = {k: _series(records, k) for k in VALIDATION_METRICS}
    has_val = any(_has(v) for v in validation.values())
    with _style():
        fig = _figure(12.0, 8.4)
        grid = fig.add_gridspec(3, 2, height_ratios=[1.0, 1.0, 0.9 if has_val else 0.6])
        ax_loss = fig.add_subplot(grid[0, 0])
        ax_norm = fig.add_subplot(grid[0, 1], sharex=ax_loss)
        ax_lr = fig.add_subplot(grid[1, 0], sharex=ax_loss)
        ax_perf = fig.add_subplot(grid[1, 1], sharex=ax_loss)
        if has_val:
            ax_guard = fig.add_subplot(grid[2, 0], sharex=ax_loss)
            ax_val: Axes | None = fig.add_subplot(grid[2, 1], sharex=ax_loss)
        else:
            ax_guard = fig.add_subplot(grid[2, :], sharex=ax_loss)
            ax_val = None

        loss = _series(records, "train/loss")
        ax_loss.plot(x, loss, color=BLUE)
        if _positive(loss):
            _log_scale(ax_loss, loss)
        ax_loss.set_title("training loss (clamped L1 + code regularisation)")

        norm = _series(records, "train/grad_norm")
        ax_norm.plot(x, norm, color=GREEN, label="global norm before clipping")
        if grad_clip:
            ax_norm.axhline(grad_clip, color="black", linestyle="--", linewidth=1.0,
                            label=f"guard.grad_clip = {grad_clip:g}")
        elif grad_clip == 0:
            ax_norm.text(0.99, 0.95, "clipping off (guard.grad_clip = 0)", transform=ax_norm.transAxes,
                         ha="right", va="top", color=GREY)
        if _positive(norm):
            _log_scale(ax_norm, np.r_[norm, grad_clip or np.nan])
        ax_norm.set_title("gradient norm (mean over the interval)")
        ax_norm.legend(loc="best")

        for key, color, label in (("train/lr_decoder", BLUE, "decoder"), ("train/lr_latents", ORANGE, "latent codes")):
            values = _series(records, key)
            if _has(values):
                ax_lr.plot(x, values, color=color, label=label, drawstyle="steps-post")
        rates = np.concatenate([_series(records, "train/lr_decoder"), _series(records, "train/lr_latents")])
        if _positive(rates):
            _log_scale(ax_lr, rates)
        ax_lr.set_title("learning rates")
        ax_lr.legend(loc="lower left")

        samples = _series(records, "perf/samples_per_s")
        scale, unit = (1e6, "M") if np.nanmax(np.r_[samples, 0.0]) >= 1e6 else (1e3, "k")
        ax_perf.plot(x, samples / scale, color=PURPLE)
        ax_perf.set_ylim(bottom=0)
        ax_perf.set_title(f"throughput ({unit} samples/s)")

        if events.skip_steps:
            positions = np.array(events.skip_steps, dtype=np.float64)
            ax_guard.vlines(positions, 0, events.skip_counts, color=ORANGE, linewidth=2.0)
            ax_guard.plot(positions, events.skip_counts, "o", color=ORANGE, markersize=3.5)
        else:
            ax_guard.text(0.5, 0.5, "no skipped steps", transform=ax_guard.transAxes, ha="center", va="center",
                          color=GREY)
        ax_guard.set_ylim(bottom=0, top=max([1, *events.skip_counts]) * 1.25)
        ax_guard.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax_guard.set_ylabel("skipped steps\nper interval")
        ax_guard.set_title("guard: skipped steps")

        if ax_val is not None:
            sdf = validation["val/sdf_l1"]
            chamfer = validation["val/chamfer_l2"]
            plotted = False
            if _has(sdf):
                ok = np.isfinite(sdf)
                ax_val.plot(x[ok], sdf[ok], "o-", color=GREEN, markersize=3.5, label="val/sdf_l1")
                plotted = True
                if _positive(sdf):
                    _log_scale(ax_val, sdf)
                ax_val.set_ylabel("SDF L1 (held-out)")
            if _has(chamfer):
                target = ax_val.twinx() if plotted else ax_val
                ok = np.isfinite(chamfer)
                target.plot(x[ok], chamfer[ok] * 1e3, "s--", color=RED, markersize=3.5, label="val/chamfer_l2 ×10³")
                target.set_ylabel("Chamfer-L2 ×10³ (held-out)")
                if _positive(chamfer):
                    _log_scale(target, chamfer * 1e3)
                if target is not ax_val:
                    target.grid(False)
                    target.spines["right"].set_visible(True)
                    h1, l1_ = ax_val.get_legend_handles_labels()
                    h2, l2_ = target.get_legend_handles_labels()
                    ax_val.legend(h1 + h2, l1_ + l2_, loc="upper right")
                else:
                    ax_val.legend(loc="upper right")
            elif plotted:
                ax_val.legend(loc="upper right")
            seconds = _series(records, "perf/val_seconds")
            skipped_passes = int(np.nansum(_series(records, "val/skipped")))
            notes = []
            if _has(seconds):
                notes.append(f"{np.nanmean(seconds):.3g} s per pass")
            if skipped_passes:
                notes.append(f"{skipped_passes} pass(es) skipped: non-finite decoder")
            ax_val.set_title("validation (held-out scenes" + "".join(f"; {n}" for n in notes) + ")")

        bottom = [ax_guard] if ax_val is None else [ax_guard, ax_val]
        for ax in (ax_loss, ax_norm, ax_lr, ax_perf, *bottom):
            _mark_events(ax, events)
        for ax in bottom:
            ax.set_xlabel("steps executed (incl. steps re-run after rollbacks and restarts)")
        for ax in (ax_loss, ax_norm, ax_lr, ax_perf):
            ax.tick_params(labelbottom=False)
        ax_loss.set_xlim(0, max(float(x[-1]) * 1.01, 1.0))
        if title:
            fig.suptitle(title, fontsize=11)
        _event_legend(fig, events)
        path = _save(fig, out_path)
    return TrainingPlot(path=path, events=events)


def _log_scale(ax: Axes, values: np.ndarray) -> None:
    """Log y axis, plain numbers on the ticks (0.034, not 3.4x10^-2) while the values span under 3 decades."""
    ax.set_yscale("log")
    _plain_log_ticks(ax.yaxis, values)


def _plain_log_ticks(axis: Any, values: np.ndarray) -> None:
    """Log-axis ticks written as plain numbers (0.03, not 3x10^-2) when the values span under 3 decades."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    finite = values[np.isfinite(values) & (values > 0)]
    if not finite.size:
        return
    span = finite.max() / finite.min()
    plain = FuncFormatter(lambda v, _pos: f"{v:.3g}")
    if span < 10:
        axis.set_major_locator(LogLocator(base=10, subs=(1.0, 1.5, 2.0, 3.0, 5.0, 7.0)))
    elif span < 1000:
        axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    else:
        return
    axis.set_major_formatter(plain)
    axis.set_minor_formatter(NullFormatter())


def _read_yaml(path: Path) -> Any:
    import yaml

    return yaml.safe_load(path.read_text())


def _grad_clip(run_dir: Path) -> float | None:
    path = run_dir / RESOLVED_CONFIG_FILE
    if not path.exists():
        return None
    try:
        guard = (_read_yaml(path) or {}).get("guard") or {}
        if guard.get("enabled") is False:
            return 0.0
        return float(guard.get("grad_clip", 1.0))
    except Exception:  # a config we cannot read only loses the clip line
        return None


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def is_run_dir(path: str | Path) -> bool:
    p = Path(path)
    return (p / METRICS_FILE).exists() or (p / RESOLVED_CONFIG_FILE).exists()


def is_sweep_dir(path: str | Path) -> bool:
    return (Path(path) / TRIALS_CSV).exists()


def plot_training(run_dir: str | Path, out_path: str | Path | None = None) -> TrainingPlot:
    """``RUN_DIR/plots/training.png`` from the run's metrics.jsonl, config.yaml and summary.json."""
    run = Path(run_dir)
    if not run.is_dir():
        raise UserError(f"{run}: no such directory")
    if not is_run_dir(run):
        raise UserError(f"{run} is not a run directory (no {METRICS_FILE} or {RESOLVED_CONFIG_FILE})")
    records = _read_records(run)
    if not records:
        raise UserError(f"{run} has no metrics yet ({METRICS_FILE} is missing or empty)")
    summary = _read_json(run / SUMMARY_FILE)
    return plot_training_records(records, out_path or run / PLOTS_DIR / TRAINING_PNG, grad_clip=_grad_clip(run),
                                 title=_title(run.name, records, summary))


def _read_records(run: Path) -> list[dict[str, Any]]:
    """metrics.jsonl, tolerating a half-written last line (the run may be writing it right now)."""
    path = run / METRICS_FILE
    if not path.exists():
        return []
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    records = []
    for i, line in enumerate(lines):
        try:
            records.append(json.loads(line))
        except ValueError as exc:
            if i == len(lines) - 1 and records:
                break
            raise UserError(f"{path} line {i + 1} is not JSON: {exc}") from None
    return records


def write_training_plot(run_dir: str | Path) -> Path | None:
    """For ``sdf-ray train``: draw ``training.png`` and return its path; never raises (a failure is a warning)."""
    try:
        return plot_training(run_dir).path
    except Exception as exc:  # plotting must never fail a training run
        log.warning("warning: could not draw the training plot for %s: %s", run_dir, _one_line(exc))
        return None


def _one_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


# ---------------------------------------------------------------------------------------------
# Tune sweeps


@dataclass(frozen=True)
class SweepParam:
    key: str
    kind: str
    """loguniform | uniform | choice | grid (from sweep.yaml); "" when the sweep record is missing."""
    declared: tuple[Any, ...] = ()
    """The bounds or candidates the search declared (empty without the sweep record)."""


@dataclass
class Trial:
    trial_id: str
    status: str
    params: dict[str, Any]
    metric: float
    """The trial's last value of the sweep's metric (NaN when it never had a finite one)."""
    curve_x: np.ndarray = field(default_factory=lambda: np.zeros(0))
    curve_y: np.ndarray = field(default_factory=lambda: np.zeros(0))


@dataclass(frozen=True)
class Sweep:
    name: str
    metric: str
    mode: str
    params: tuple[SweepParam, ...]
    trials: tuple[Trial, ...]
    best_trial_id: str | None


def _parse_cell(text: str | None) -> Any:
    """A trials.csv cell back to a value: numbers, JSON lists/dicts (how sweep.py writes them), else text."""
    if text is None or text == "":
        return None
    try:
        return json.loads(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        return text


def load_sweep(sweep_dir: str | Path) -> Sweep:
    """Read trials.csv, tune_summary.json, sweep.yaml and each trial's metrics.jsonl."""
    directory = Path(sweep_dir)
    csv_path = directory / TRIALS_CSV
    if not csv_path.exists():
        raise UserError(f"{directory} is not a sweep directory (no {TRIALS_CSV})")
    with csv_path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise UserError(f"{csv_path} lists no trials")
    summary = _read_json(directory / SWEEP_SUMMARY_FILE) or {}
    columns = list(rows[0])
    metric = summary.get("metric") or next((c.removeprefix("last_") for c in columns if c.startswith("last_")), None)
    if not metric:
        raise UserError(f"{csv_path} has no last_<metric> column and {SWEEP_SUMMARY_FILE} names no metric")
    mode = str(summary.get("mode") or "min")
    kinds: dict[str, str] = {}
    declared: dict[str, tuple[Any, ...]] = {}
    record_path = directory / SWEEP_FILE
    if record_path.exists():
        try:
            space = ((_read_yaml(record_path) or {}).get("search") or {}).get("space") or {}
            for k, v in space.items():
                if isinstance(v, dict) and v:
                    kind, values = next(iter(v.items()))
                    kinds[str(k)] = str(kind)
                    declared[str(k)] = tuple(values) if isinstance(values, list) else ()
        except Exception:  # without the record, axes fall back to guessing log scales from the values
            kinds, declared = {}, {}
    # trials.csv lists the searched parameters between trial_id and status (tuning/outputs.py trial_rows).
    between = columns[1:columns.index("status")] if columns[:1] == ["trial_id"] and "status" in columns else []
    keys = list(kinds) if kinds else between
    params = tuple(SweepParam(k, kinds.get(k, ""), declared.get(k, ())) for k in keys if k in columns)
    trials = []
    for row in rows:
        trial = Trial(trial_id=str(row.get("trial_id")), status=str(row.get("status") or "unknown"),
                      params={p.key: _parse_cell(row.get(p.key)) for p in params},
                      metric=_finite(row.get(f"last_{metric}")))
        records = _read_records(directory / TRIALS_SUBDIR / f"trial-{trial.trial_id}")
        if records:
            trial.curve_x = training_timeline(records).x
            trial.curve_y = _series(records, metric)
        trials.append(trial)
    best = summary.get("best_trial_id")
    if best is None:  # no summary: the healthy trial with the best last metric, as sweep.best_row picks it
        healthy = [t for t in trials if t.status in ("finished", "pruned_asha", "stopped") and math.isfinite(t.metric)]
        if healthy:
            pick = min if mode == "min" else max
            best = pick(healthy, key=lambda t: t.metric).trial_id
    return Sweep(name=str(summary.get("name") or directory.name), metric=str(metric), mode=mode, params=params,
                 trials=tuple(trials), best_trial_id=str(best) if best is not None else None)


@dataclass(frozen=True)
class _Axis:
    values: list[float]
    scale: str  # linear | log | symlog
    ticks: list[float] | None = None
    ticklabels: list[str] | None = None
    linthresh: float = 1.0


def _short(value: Any, width: int = 18) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    text = value if isinstance(value, str) else json.dumps(value)
    if text in ("[]", "{}", "null"):
        return {"[]": "none", "{}": "none", "null": "-"}[text]
    return text if len(text) <= width else text[: width - 1] + "…"


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _axis(param: SweepParam, values: list[Any]) -> _Axis:
    """Numeric parameters on their own scale, anything else as categories.

    Log-uniform ranges get a log axis; numeric choices spanning a decade or more too (by the declared candidates,
    not only the sampled ones), symlog when 0 is a candidate (``guard.grad_clip: {choice: [0, 0.1, 1, 10]}``).
    """
    numeric = all(_is_number(v) for v in values if v is not None)
    present = [float(v) for v in values if v is not None] if numeric else []
    if numeric and present:
        candidates = present + [float(v) for v in param.declared if _is_number(v)]
        positive = [v for v in candidates if v > 0]
        decades = bool(positive) and max(positive) / min(positive) >= 10
        if param.kind == "loguniform" or (param.kind in ("", "choice", "grid") and decades
                                          and len(positive) == len(candidates)):
            return _Axis([v if v is not None else math.nan for v in values], "log")
        if decades and min(candidates) == 0:
            # e.g. guard.grad_clip in {0, 0.1, 1, 10}: 0 (off) stays on the axis, the rest spaced by decades
            return _Axis([v if v is not None else math.nan for v in values], "symlog", linthresh=min(positive))
        return _Axis([v if v is not None else math.nan for v in values], "linear")
    labels = sorted({_short(v) for v in values}, key=str)
    index = {label: i for i, label in enumerate(labels)}
    return _Axis([float(index[_short(v)]) for v in values], "linear", ticks=[float(i) for i in range(len(labels))],
                 ticklabels=labels)


def _apply_axis(ax: Axes, axis: _Axis, which: str, label: str) -> None:
    setter = ax.set_xscale if which == "x" else ax.set_yscale
    limits = ax.set_xlim if which == "x" else ax.set_ylim
    if axis.scale == "symlog":
        setter("symlog", linthresh=axis.linthresh, linscale=0.5)
    else:
        setter(axis.scale)
    values = np.array(axis.values, dtype=np.float64)
    values = values[np.isfinite(values)]
    if axis.ticks is not None:
        (ax.set_xticks if which == "x" else ax.set_yticks)(axis.ticks, axis.ticklabels)
        limits(min(axis.ticks) - 0.5, max(axis.ticks) + 0.5)
    elif values.size and axis.scale == "log":
        limits(values.min() / 1.8, values.max() * 1.8)
    elif values.size and axis.scale == "symlog":
        limits(-0.5 * axis.linthresh, values.max() * 1.8)
    (ax.set_xlabel if which == "x" else ax.set_ylabel)(label)


def _jitter(values: list[float], axis: _Axis, seed: int) -> np.ndarray:
    """Spread categorical points a little so trials with the same category do not hide each other."""
    arr = np.array(values, dtype=np.float64)
    if axis.ticks is None:
        return arr
    return arr + np.random.default_rng(seed).uniform(-0.18, 0.18, size=arr.shape)


def _status_legend(ax: Axes, trials: Sequence[Trial]) -> None:
    from matplotlib.lines import Line2D

    counts: dict[str, int] = {}
    for t in trials:
        counts[t.status] = counts.get(t.status, 0) + 1
    handles = [Line2D([], [], color=STATUS_COLORS.get(s, GREY), marker=STATUS_MARKERS.get(s, "o"), markersize=6,
                      label=f"{s} ({n})") for s, n in sorted(counts.items())]
    ax.legend(handles=handles, loc="best")


def plot_sweep_data(sweep: Sweep, out_path: str | Path) -> Path:
    """Curves of the metric per trial coloured by status; searched parameters coloured by the metric."""
    from matplotlib import colors as mcolors

    trials = list(sweep.trials)
    params = list(sweep.params)
    pairs: list[tuple[int, int]] = []
    if len(params) >= 2:
        pairs = [(i, j) for i in range(len(params)) for j in range(i + 1, len(params))][:3]
    num_right = max(1, len(pairs)) if params else 0
    with _style():
        fig = _figure(5.6 + 4.6 * num_right, 4.6)
        grid = fig.add_gridspec(1, 1 + num_right, width_ratios=[1.25] + [1.0] * num_right)
        ax_curves = fig.add_subplot(grid[0, 0])
        all_y = np.concatenate([t.curve_y for t in trials] + [np.zeros(0)])
        order = sorted(trials, key=lambda t: t.trial_id == sweep.best_trial_id)  # the best on top
        for t in order:
            if not t.curve_y.size:
                continue
            color = STATUS_COLORS.get(t.status, GREY)
            is_best = t.trial_id == sweep.best_trial_id
            ok = np.isfinite(t.curve_y)
            ax_curves.plot(t.curve_x[ok], t.curve_y[ok], color=color, alpha=1.0 if is_best else 0.75,
                           linewidth=2.6 if is_best else 1.2, zorder=3 if is_best else 2)
            if ok.any():
                last = int(np.flatnonzero(ok)[-1])
                ax_curves.plot(t.curve_x[last], t.curve_y[last], STATUS_MARKERS.get(t.status, "o"), color=color,
                               markersize=6, zorder=3)
            if is_best and ok.any():
                ax_curves.annotate(f"best: {t.trial_id}", (t.curve_x[last], t.curve_y[last]), xytext=(-6, 8),
                                   textcoords="offset points", ha="right", fontsize=8, fontweight="bold")
        if _positive(all_y):
            _log_scale(ax_curves, all_y)
        ax_curves.set_xlabel("steps executed")
        ax_curves.set_ylabel(sweep.metric)
        ax_curves.set_title(f"{sweep.metric} per trial, by final status")
        _status_legend(ax_curves, trials)

        metric = np.array([t.metric for t in trials], dtype=np.float64)
        finite = metric[np.isfinite(metric)]
        norm: mcolors.Normalize | None = None
        if finite.size:
            lo, hi = float(finite.min()), float(finite.max())
            if lo > 0 and hi / lo > 10:
                norm = mcolors.LogNorm(vmin=lo, vmax=hi)
            else:
                norm = mcolors.Normalize(vmin=lo, vmax=hi if hi > lo else lo + 1e-12)
        cmap = "viridis" if sweep.mode == "min" else "viridis_r"  # dark = good in both modes
        scatter = None
        panels: list[tuple[Axes, int, int | None]] = []
        if len(params) == 1:
            panels.append((fig.add_subplot(grid[0, 1]), 0, None))
        for n, (a, b) in enumerate(pairs):
            panels.append((fig.add_subplot(grid[0, 1 + n]), a, b))
        for ax, i, j in panels:
            x_axis = _axis(params[i], [t.params.get(params[i].key) for t in trials])
            xs = _jitter(x_axis.values, x_axis, 1)
            if j is None:  # one searched parameter: the metric is the y axis, colour is the status
                ys = metric
                y_axis = _Axis(list(metric), "log" if finite.size and finite.min() > 0 else "linear")
                y_label = f"last {sweep.metric}"
            else:
                y_axis = _axis(params[j], [t.params.get(params[j].key) for t in trials])
                ys = _jitter(y_axis.values, y_axis, 2)
                y_label = params[j].key + (" (log-uniform)" if params[j].kind == "loguniform" else "")
            for k, t in enumerate(trials):
                marker = STATUS_MARKERS.get(t.status, "o")
                if j is None or not math.isfinite(t.metric):
                    y = ys[k] if j is not None else (t.metric if math.isfinite(t.metric) else math.nan)
                    if j is None and not math.isfinite(y):
                        continue
                    ax.scatter(xs[k], y, marker=marker, s=46, color=STATUS_COLORS.get(t.status, GREY),
                               edgecolors="white", linewidths=0.5, zorder=2)
                else:
                    scatter = ax.scatter(xs[k], ys[k], c=[t.metric], cmap=cmap, norm=norm, marker=marker, s=58,
                                         edgecolors="white", linewidths=0.5, zorder=2)
                if t.trial_id == sweep.best_trial_id:
                    y_best = ys[k] if j is not None else t.metric
                    ax.scatter(xs[k], y_best, marker="*", s=320, facecolors="none", edgecolors="black",
                               linewidths=1.4, zorder=3)
                    ax.annotate("best", (xs[k], y_best), xytext=(8, 6), textcoords="offset points", fontsize=8,
                                fontweight="bold")
            _apply_axis(ax, x_axis, "x", params[i].key + (" (log-uniform)" if params[i].kind == "loguniform" else ""))
            _apply_axis(ax, y_axis, "y", y_label)
            ax.set_title("searched parameters" + ("" if j is None else f", coloured by last {sweep.metric}"))
        if scatter is not None and panels:
            cbar = fig.colorbar(scatter, ax=[p[0] for p in panels], shrink=0.9, pad=0.01)
            cbar.set_label(f"last {sweep.metric}")
            if isinstance(norm, mcolors.LogNorm):
                _plain_log_ticks(cbar.ax.yaxis, finite)
        best = next((t for t in trials if t.trial_id == sweep.best_trial_id), None)
        headline = f"sweep {sweep.name}: {len(trials)} trial(s), {sweep.mode} {sweep.metric}"
        if best is not None and math.isfinite(best.metric):
            shown = ", ".join(f"{k}={_short(v, 12)}" for k, v in best.params.items())
            headline += f"  ·  best {best.trial_id}: {best.metric:.4g} ({shown})"
        fig.suptitle(headline, fontsize=11)
        return _save(fig, out_path)


def plot_sweep(sweep_dir: str | Path, out_path: str | Path | None = None) -> Path:
    """``SWEEP_DIR/plots/sweep.png`` for an ``sdf-ray tune`` directory."""
    directory = Path(sweep_dir)
    return plot_sweep_data(load_sweep(directory), out_path or directory / PLOTS_DIR / SWEEP_PNG)


def write_sweep_plot(sweep_dir: str | Path) -> Path | None:
    """For ``sdf-ray tune``: draw ``sweep.png`` and return its path; never raises (a failure is a warning)."""
    try:
        return plot_sweep(sweep_dir)
    except Exception as exc:  # plotting must never fail a sweep
        log.warning("warning: could not draw the sweep plot for %s: %s", sweep_dir, _one_line(exc))
        return None


# ---------------------------------------------------------------------------------------------
# SDF slices

SDFSource = Callable[[np.ndarray], np.ndarray] | np.ndarray
"""A callable ``xyz [N, 3] -> sdf [N]`` in the normalised frame, or the values on the planes ``[3, R, R]``."""
PLANES = (("z = 0", 0, 1), ("y = 0", 0, 2), ("x = 0", 1, 2))
"""Each plane: its name, then the world axes along the image's horizontal and vertical directions."""
AXIS_NAMES = "xyz"


@dataclass
class SliceScene:
    name: str
    decoded: SDFSource
    truth: SDFSource | None = None


def plane_points(resolution: int, extent: float = 1.0) -> np.ndarray:
    """The sample points of the three planes through the origin, ``[3, R, R, 3]``: ``[p, row, col]`` has the
    plane's vertical coordinate from ``row`` (upwards in the image) and horizontal from ``col``."""
    ticks = np.linspace(-extent, extent, resolution)
    vertical, horizontal = np.meshgrid(ticks, ticks, indexing="ij")
    points = np.zeros((3, resolution, resolution, 3))
    for p, (_, h, v) in enumerate(PLANES):
        points[p, :, :, h] = horizontal
        points[p, :, :, v] = vertical
    return points


def evaluate_planes(source: SDFSource, resolution: int, extent: float = 1.0) -> np.ndarray:
    """``[3, R, R]`` values of ``source`` on the planes (arrays are checked and passed through)."""
    if callable(source):
        pts = plane_points(resolution, extent).reshape(-1, 3)
        values = np.asarray(source(pts), dtype=np.float64).reshape(3, resolution, resolution)
        return values
    values = np.asarray(source, dtype=np.float64)
    if values.ndim != 3 or values.shape[0] != 3 or values.shape[1] != values.shape[2]:
        raise ValueError(f"precomputed slices must be [3, R, R], got {values.shape}")
    return values


def plot_sdf_slices(scenes: Sequence[SliceScene], out_path: str | Path, *, resolution: int = 128,
                    extent: float = 1.0, color_range: float | None = None) -> Path:
    """One row per scene: the decoded SDF on z = 0, y = 0, x = 0, then the truth's where known.

    Colours: blue inside (sdf < 0), red outside, white at the surface, the same scale in every panel, saturating
    at ``color_range`` (default the 98th percentile of |sdf| over all panels; for a run, its loss.clamp_dist: the
    decoder only learns distances inside that band). Solid black: the zero contour; on the decoded panels a
    dashed green line is the true surface, so errors show as the gap between the two lines.
    """
    if not scenes:
        raise UserError("no scenes to slice")
    decoded = [evaluate_planes(s.decoded, resolution, extent) for s in scenes]
    truth = [None if s.truth is None else evaluate_planes(s.truth, decoded[i].shape[-1], extent)
             for i, s in enumerate(scenes)]
    any_truth = any(t is not None for t in truth)
    stacked = np.concatenate([np.abs(a[np.isfinite(a)]).ravel() for a in decoded + [t for t in truth if t is not None]])
    c = color_range or (float(np.percentile(stacked, 98)) if stacked.size else 1.0) or 1.0
    cols = 6 if any_truth else 3
    rows = len(scenes)
    with _style():
        fig = _figure(1.75 * cols + 1.2, 1.75 * rows + 0.9)
        image = None
        axes = fig.subplots(rows, cols, squeeze=False)
        for r, scene in enumerate(scenes):
            known = truth[r]
            panels: list[tuple[np.ndarray | None, str, np.ndarray | None]] = [
                (decoded[r][p], f"decoded, {PLANES[p][0]}", None if known is None else known[p]) for p in range(3)]
            if any_truth:
                panels += [(None if known is None else known[p], f"truth, {PLANES[p][0]}", None) for p in range(3)]
            for col, (values, label, overlay) in enumerate(panels):
                ax = axes[r, col]
                ax.grid(False)
                ax.set_xticks([])
                ax.set_yticks([])
                for spine in ax.spines.values():
                    spine.set_visible(True)
                    spine.set_linewidth(0.5)
                if r == 0:
                    ax.set_title(label, fontsize=9, fontweight="normal")
                if col == 0:
                    ax.set_ylabel(_wrap_name(scene.name), fontsize=8)
                if values is None:
                    ax.text(0.5, 0.5, "no ground truth", ha="center", va="center", color=GREY, transform=ax.transAxes)
                    continue
                _, h, v = PLANES[col % 3]
                box = (-extent, extent, -extent, extent)
                image = ax.imshow(values, origin="lower", extent=box, cmap="RdBu_r", vmin=-c, vmax=c,
                                  interpolation="bilinear")
                grid_ticks = np.linspace(-extent, extent, values.shape[-1])
                if np.nanmin(values) < 0 < np.nanmax(values):
                    ax.contour(grid_ticks, grid_ticks, values, levels=[0.0], colors="black", linewidths=1.2)
                if overlay is not None and np.nanmin(overlay) < 0 < np.nanmax(overlay):
                    ax.contour(grid_ticks, grid_ticks, overlay, levels=[0.0], colors=GREEN, linewidths=1.0,
                               linestyles="--")
                ax.set_aspect("equal")
                if r == rows - 1:
                    ax.set_xlabel(f"{AXIS_NAMES[h]} →   ({AXIS_NAMES[v]} ↑)", fontsize=8)
        if image is not None:
            cbar = fig.colorbar(image, ax=axes, shrink=0.8, pad=0.01, extend="both")
            cbar.set_label(f"SDF (normalised units, < 0 inside), saturating at ±{c:.3g}")
        fig.suptitle("decoded SDF on the planes through the origin" + (
            "  ·  black: zero level set, dashed green: the true surface" if any_truth else "  ·  black: zero level set"),
            fontsize=10)
        return _save(fig, out_path)


def _wrap_name(name: str, width: int = 22) -> str:
    """Long scene names (``synth-000002-union-rounded-box-sphere``) on a few lines, broken at hyphens."""
    lines: list[str] = []
    for part in name.split("-"):
        if lines and len(lines[-1]) + 1 + len(part) <= width:
            lines[-1] += "-" + part
        else:
            lines.append(part if not lines else "-" + part)
    return "\n".join(lines)


def decoder_sdf(decoder: Any, code_L: Any, *, batch_size: int = 65536) -> Callable[[np.ndarray], np.ndarray]:
    """``xyz [N, 3] -> sdf [N]`` of a DeepSDF decoder for one latent code (eval mode, no gradients, CPU)."""
    import torch

    decoder.eval()
    param = next(decoder.parameters())
    code = torch.as_tensor(code_L, dtype=param.dtype, device=param.device)

    def evaluate(xyz_N3: np.ndarray) -> np.ndarray:
        out = []
        with torch.no_grad():
            for start in range(0, len(xyz_N3), batch_size):
                chunk = torch.as_tensor(xyz_N3[start:start + batch_size], dtype=param.dtype, device=param.device)
                out.append(decoder(code, chunk).float().cpu().numpy().reshape(-1))
        return np.concatenate(out) if out else np.zeros(0)

    return evaluate


def synth_ground_truth(source: Mapping[str, Any], scene_name: str, index: int) -> Callable[[np.ndarray], np.ndarray] | None:
    """The exact SDF of a scene of a generated (``sdf-ray data synth``) dataset, else None.

    The manifest's ``source`` records the seed; scene ``i`` of seed ``s`` is ``synth_shape(i, s)`` (synth.py
    draws the shape from ``default_rng([seed, i])`` before any sample). The name ``synth-<i:06d>-<kind>`` carries
    ``i`` and the kind, which is checked: a mismatch (another synth version) gives no ground truth, not a wrong one.
    """
    if not isinstance(source, Mapping) or source.get("type") != "synth" or "seed" not in source:
        return None
    from sdf_ray.data.synth import synth_shape

    parts = scene_name.split("-", 2)
    if len(parts) == 3 and parts[0] == "synth" and parts[1].isdigit():
        index = int(parts[1])
    shape = synth_shape(index, int(source["seed"]))
    if len(parts) == 3 and parts[2] != shape.kind.replace("_", "-"):
        return None
    return shape.sdf


@dataclass
class _RunModel:
    decoder: Any
    codes: Any  # [num_scenes, L] tensor
    data_path: str
    checkpoint: Path
    clamp_dist: float


def _load_run_model(run_dir: str | Path) -> _RunModel:
    """The decoder (eval mode, CPU) and codes of a run's latest checkpoint, through ``sdf_ray.shapes.trained_run``."""
    from sdf_ray.errors import ConfigError
    from sdf_ray.model import DeepSDFDecoder
    from sdf_ray.shapes.trained_run import latest_checkpoint, load_trained_run

    run = Path(run_dir)
    if latest_checkpoint(run) is None:
        raise UserError(f"{run} has no checkpoint (checkpoint_*/state.pt): slices need a trained decoder")
    try:
        trained = load_trained_run(run)
    except ConfigError as exc:  # its messages name reconstruct's --run flag
        raise UserError(str(exc).removeprefix("--run ")) from None
    decoder = DeepSDFDecoder(trained.config.model)
    decoder.load_state_dict(trained.decoder_state)
    decoder.eval()
    return _RunModel(decoder=decoder, codes=trained.latents_NL, data_path=trained.config.data.path,
                     checkpoint=trained.checkpoint, clamp_dist=trained.config.loss.clamp_dist)


def _pick_scenes(names: Sequence[str], wanted: Sequence[str] | None, default_count: int) -> list[int]:
    if not wanted:
        return list(range(min(default_count, len(names))))
    picked = []
    for item in wanted:
        if item in names:
            picked.append(names.index(item))
        elif item.isdigit() and int(item) < len(names):
            picked.append(int(item))
        else:
            matches = [i for i, n in enumerate(names) if item in n]
            if len(matches) != 1:
                hint = f"{len(matches)} scenes match" if matches else "no scene matches"
                raise UserError(f"--scenes {item!r}: {hint}; give a scene index (0-{len(names) - 1}) or a name "
                                f"such as {names[0]!r}")
            picked.append(matches[0])
    return picked


def plot_run_slices(run_dir: str | Path, scenes: Sequence[str] | None = None, *, resolution: int = 128,
                    out_path: str | Path | None = None, max_default_scenes: int = 4) -> Path:
    """``RUN_DIR/plots/slices.png`` for a few training scenes, from the run's latest checkpoint."""
    run = Path(run_dir)
    if not is_run_dir(run):
        raise UserError(f"{run} is not a run directory (no {METRICS_FILE} or {RESOLVED_CONFIG_FILE})")
    if not 8 <= resolution <= 1024:
        raise UserError(f"--resolution must be in [8, 1024], got {resolution}")
    model = _load_run_model(run)
    num_codes = int(model.codes.shape[0])
    source: Mapping[str, Any] = {}
    names = [f"scene {i}" for i in range(num_codes)]
    try:
        from sdf_ray.data.format import read_manifest

        manifest = read_manifest(model.data_path)
        if manifest.num_scenes == num_codes:
            names = [s.name for s in manifest.scenes]
            source = manifest.source
        else:
            log.warning("warning: dataset %s has %d scenes, the run %d codes: no names or ground truth",
                        model.data_path, manifest.num_scenes, num_codes)
    except UserError as exc:  # the dataset moved: the decoded slices can still be drawn
        log.warning("warning: dataset %s unreadable (%s): slices without names or ground truth", model.data_path, exc)
    picked = _pick_scenes(names, scenes, max_default_scenes)
    items = [SliceScene(name=names[i], decoded=decoder_sdf(model.decoder, model.codes[i]),
                        truth=synth_ground_truth(source, names[i], i)) for i in picked]
    return plot_sdf_slices(items, out_path or run / PLOTS_DIR / SLICES_PNG, resolution=resolution,
                           color_range=model.clamp_dist)


# ---------------------------------------------------------------------------------------------
# Contact sheet of reconstructions


@dataclass
class SheetEntry:
    name: str
    vertices: np.ndarray | None = None
    """[V, 3] reconstructed mesh vertices (None: no mesh, e.g. status empty or failed)."""
    faces: np.ndarray | None = None
    """[F, 3] triangle vertex indices."""
    gt_points: np.ndarray | None = None
    """[P, 3] ground-truth surface points, in the same frame as the mesh."""
    chamfer: float | None = None
    """Chamfer-L2 as DeepSDF's evaluate.py computes it (shown x 10^3)."""
    status: str = ""
    """Shown when there is no mesh (``empty``, ``failed: ...``)."""


def decimate(vertices: np.ndarray, faces: np.ndarray, max_faces: int) -> tuple[np.ndarray, np.ndarray]:
    """Vertex clustering: merge vertices per grid cell, coarser until at most ``max_faces`` triangles remain.

    Unlike dropping random faces it keeps a closed surface closed (no see-through holes in the picture).
    """
    v = np.asarray(vertices, dtype=np.float64)
    f = np.asarray(faces, dtype=np.int64)
    if len(f) <= max_faces:
        return v, f
    lo, span = v.min(axis=0), max(float(np.ptp(v, axis=0).max()), 1e-12)
    cells = 128
    while True:
        key = np.floor((v - lo) / span * (cells - 1e-9)).astype(np.int64)
        flat = (key[:, 0] * cells + key[:, 1]) * cells + key[:, 2]
        uniq, inverse = np.unique(flat, return_inverse=True)
        inverse = inverse.reshape(-1)
        sums = np.zeros((len(uniq), 3))
        np.add.at(sums, inverse, v)
        new_v = sums / np.bincount(inverse, minlength=len(uniq))[:, None]
        new_f = inverse[f]
        keep = (new_f[:, 0] != new_f[:, 1]) & (new_f[:, 1] != new_f[:, 2]) & (new_f[:, 0] != new_f[:, 2])
        new_f = new_f[keep]
        if len(new_f) <= max_faces or cells <= 8:
            return new_v, new_f
        cells = int(cells * 0.75)


VIEW_ELEV, VIEW_AZIM = 22.0, -58.0


def _view_direction(elev: float, azim: float) -> np.ndarray:
    e, a = np.radians(elev), np.radians(azim)
    return np.array([np.cos(e) * np.cos(a), np.cos(e) * np.sin(a), np.sin(e)])


def _lambert(tri_F33: np.ndarray, light: np.ndarray, base_rgb: np.ndarray) -> np.ndarray:
    normals = np.cross(tri_F33[:, 1] - tri_F33[:, 0], tri_F33[:, 2] - tri_F33[:, 0])
    normals /= np.maximum(np.linalg.norm(normals, axis=1, keepdims=True), 1e-12)
    # Two-sided: the winding of an arbitrary mesh is unknown, and a back face is lit like a front one.
    intensity = 0.28 + 0.72 * np.abs(normals @ light)
    return np.clip(intensity[:, None] * base_rgb[None, :], 0.0, 1.0)


def _frame(entry: SheetEntry) -> tuple[np.ndarray, float]:
    parts = [a for a in (entry.vertices, entry.gt_points) if a is not None and len(a)]
    if not parts:
        return np.zeros(3), 1.0
    pts = np.concatenate([np.asarray(a, dtype=np.float64).reshape(-1, 3) for a in parts])
    lo, hi = pts.min(axis=0), pts.max(axis=0)
    return (lo + hi) / 2, max(float((hi - lo).max()) / 2, 1e-6) * 1.05


def _setup_3d(ax: Any, center: np.ndarray, half: float) -> None:
    ax.set_xlim(center[0] - half, center[0] + half)
    ax.set_ylim(center[1] - half, center[1] + half)
    ax.set_zlim(center[2] - half, center[2] + half)
    ax.set_box_aspect((1, 1, 1), zoom=1.45)  # no axes drawn: use the room they would take
    ax.view_init(elev=VIEW_ELEV, azim=VIEW_AZIM)
    ax.set_axis_off()
    ax.set_proj_type("ortho")


def contact_sheet(entries: Sequence[SheetEntry], out_path: str | Path, *, columns: int = 4, max_faces: int = 12000,
                  max_points: int = 4000, title: str | None = None) -> Path:
    """Rendered reconstructions (left) next to their ground-truth points (right), name above and Chamfer below.

    Meshes are drawn with Lambert shading from a light beside the camera; meshes over ``max_faces`` triangles are
    decimated by vertex clustering (rendering only). Ground-truth points: those on the camera's side of the shape,
    at most ``max_points``, darker when nearer.
    """
    from mpl_toolkits.mplot3d.art3d import Poly3DCollection

    if not entries:
        raise UserError("no reconstructions to draw")
    columns = max(1, min(columns, len(entries)))
    rows = math.ceil(len(entries) / columns)
    view = _view_direction(VIEW_ELEV, VIEW_AZIM)
    light = view + np.array([0.0, 0.0, 0.6])  # from the camera, a little above
    light /= np.linalg.norm(light)
    mesh_rgb = np.array([0.55, 0.70, 0.88])
    rng = np.random.default_rng(0)
    with _style():
        fig = _figure(3.3 * columns, 1.9 * rows + (0.4 if title else 0.0))
        subfigs = np.atleast_1d(fig.subfigures(rows, columns, squeeze=False)).reshape(rows, columns)
        for k in range(rows * columns):
            sub = subfigs[k // columns, k % columns]
            if k >= len(entries):
                continue
            entry = entries[k]
            center, half = _frame(entry)
            ax_mesh = sub.add_subplot(1, 2, 1, projection="3d")
            ax_gt = sub.add_subplot(1, 2, 2, projection="3d")
            for ax in (ax_mesh, ax_gt):
                _setup_3d(ax, center, half)
            if entry.vertices is not None and entry.faces is not None and len(entry.faces):
                v, f = decimate(entry.vertices, entry.faces, max_faces)
                tris = v[f]
                collection = Poly3DCollection(tris, facecolors=_lambert(tris, light, mesh_rgb), edgecolors="none",
                                              linewidths=0.0)
                ax_mesh.add_collection3d(collection)
            else:
                ax_mesh.text2D(0.5, 0.5, entry.status or "no mesh", ha="center", va="center", color=RED,
                               transform=ax_mesh.transAxes)
            if entry.gt_points is not None and len(entry.gt_points):
                pts = np.asarray(entry.gt_points, dtype=np.float64).reshape(-1, 3)
                depth = pts @ view
                # Points behind the shape's centre would show through as speckle: keep the camera's side
                # (no normals to cull with; a cavity facing away is lost, fine for a thumbnail).
                front = pts[depth >= np.median(depth) - 0.05 * max(float(np.ptp(depth)), 1e-9)]
                if len(front) > max_points:
                    front = front[rng.choice(len(front), max_points, replace=False)]
                near = front @ view
                order = np.argsort(near)  # far first, so near points are drawn on top
                front, near = front[order], near[order]
                ax_gt.scatter(front[:, 0], front[:, 1], front[:, 2], c=near, cmap="Blues", s=1.2, linewidths=0,
                              depthshade=False, vmin=near.min() - 0.3 * np.ptp(near), vmax=near.max() + 0.2 * np.ptp(near))
            else:
                ax_gt.text2D(0.5, 0.5, "no ground truth", ha="center", va="center", color=GREY,
                             transform=ax_gt.transAxes)
            ax_mesh.set_title("reconstruction", fontsize=8, fontweight="normal", pad=0)
            ax_gt.set_title("ground truth", fontsize=8, fontweight="normal", pad=0)
            sub.suptitle(entry.name, fontsize=9, fontweight="bold")
            if entry.chamfer is not None and math.isfinite(entry.chamfer):
                caption = f"Chamfer-L2 ×10³ = {entry.chamfer * 1e3:.3f}"
            else:
                caption = "Chamfer-L2: n/a" + (f" ({entry.status})" if entry.status else "")
            sub.supxlabel(caption, fontsize=9)
        if title:
            fig.suptitle(title, fontsize=11)
        return _save(fig, out_path)
