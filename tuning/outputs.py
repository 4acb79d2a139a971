"""The sweep directory and the files written from Tune's results once ``fit()`` returns.

Layout under ``<checkpoint.storage_path>/<tune name>/``:

* Tune's experiment state and one ``tune-<trial_id>/`` directory per trial (Tune's results);
* ``trials/trial-<trial_id>/``: each trial's training run (checkpoints, metrics.jsonl, summary.json);
* ``sweep.yaml`` (the base config and search, to refuse resuming a different sweep), ``trials.csv`` (one row
  per trial), ``best_config.yaml`` (the best healthy trial's config, ready to train) and
  ``tune_summary.json`` (counts, best trial, every row).

A trial stopped by Tune never runs code after ``fit()``, so every outcome is computed here from Tune's own
results (and each trial's summary.json where it wrote one).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
from pathlib import Path
from typing import Any

from sdf_ray import config as config_mod
from sdf_ray.errors import ConfigError
from sdf_ray.fsutil import write_json_atomic, write_text_atomic
from sdf_ray.ray_session import tune_trials
from sdf_ray.run_files import BEST_CONFIG, SUMMARY_FILE, SWEEP_SUMMARY_FILE, TRIALS_CSV, TRIALS_SUBDIR
from sdf_ray.run_schedule import RunSchedule
from tuning.search import SearchSpec
from tuning.stopper import PRUNED_DIVERGED, as_float, finite_float, replay

HEALTHY = ("finished", "pruned_asha", "stopped")
"""Trial statuses that may provide the best config."""


def tune_dir(cfg: config_mod.TrainConfig, name: str) -> Path:
    return Path(cfg.checkpoint.storage_path) / name


def trial_run_name(trial_id: str) -> str:
    return f"trial-{trial_id}"


def plain(value: Any) -> Any:
    """numpy scalars (from Tune's samplers) -> Python scalars, recursively."""
    if hasattr(value, "item") and callable(value.item) and not isinstance(value, (list, dict, str)):
        return value.item()
    if isinstance(value, list):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    return value


def _json_number(value: Any) -> Any:
    """JSON cannot hold inf/NaN: non-finite floats become strings."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def _trial_id(result: Any) -> str:
    metrics = result.metrics or {}
    if metrics.get("trial_id"):
        return str(metrics["trial_id"])
    return Path(str(result.path)).name.removeprefix("tune-")


Entry = tuple[str, dict[str, Any], Any, str]
"""(trial id, sampled config, Tune Result, Tune trial status)."""


def trial_entries(results: Any) -> list[Entry]:
    """One entry per trial. A trial that failed before its first report has no config in its Result, and an
    interrupted sweep's Results do not say which trials were cut short: both come from Tune's trials
    (``ray_session.tune_trials``; the ResultGrid keeps their order)."""
    trials = tune_trials(results)
    items = list(results)
    if len(trials) == len(items):
        return [(str(t.trial_id), dict(t.config or {}), r, str(t.status)) for t, r in zip(trials, items, strict=True)]
    return [(_trial_id(r), dict(r.config or {}), r, "ERROR" if r.error else "TERMINATED") for r in items]


def trial_rows(cfg: config_mod.TrainConfig, spec: SearchSpec, entries: list[Entry],
               reasons: dict[str, str], num_scenes: int, trials_dir: Path) -> list[dict[str, Any]]:
    """One row per trial: id, params, status, reason, best/last metric, iterations, steps, skipped steps."""
    rows = []
    for trial_id, config, result, trial_status in entries:
        params = {k: plain(config.get(k)) for k in spec.keys}
        df = result.metrics_dataframe
        history = df.to_dict("records") if df is not None and len(df) else []
        last = history[-1] if history else dict(result.metrics or {})
        values = [finite_float(r.get(spec.metric)) for r in history]
        finite = [v for v in values if v is not None]
        best = (min(finite) if spec.mode == "min" else max(finite)) if finite else None
        reason = reasons.get(trial_id) or replay(history, spec.divergence, spec.collapse)[0]
        trial_summary_path = trials_dir / trial_run_name(trial_id) / SUMMARY_FILE
        trial_summary = json.loads(trial_summary_path.read_text()) if trial_summary_path.exists() else {}
        if reason is None and trial_summary.get("status") == "diverged":
            reason = trial_summary.get("message", "diverged")
        last_step = int(last.get("train/step") or 0)
        try:
            wanted_steps = RunSchedule.of(config_mod.apply_overrides(cfg, params), num_scenes).total_steps
        except ConfigError:
            wanted_steps = -1
        if reason is not None:
            status = getattr(reason, "status", PRUNED_DIVERGED)
        elif result.error is not None:
            status = "error"
            first = (str(result.error).strip().splitlines() or [type(result.error).__name__])
            reason = first[-1][:200]
        elif trial_summary.get("status") == "finished" or (wanted_steps > 0 and last_step >= wanted_steps):
            status = "finished"
        elif trial_status not in ("TERMINATED", "ERROR"):
            status = "unfinished"  # the sweep was interrupted: re-running the same command resumes it
        elif spec.scheduler.type == "asha":
            status = "pruned_asha"
        else:
            status = "stopped"
        rows.append({
            "trial_id": trial_id, **params, "status": status,
            f"best_{spec.metric}": best, f"last_{spec.metric}": last_reported(history, spec.metric),
            **{key: last_reported(history, key) for key in ("val/sdf_l1", "val/chamfer_l2")
               if key != spec.metric and any(key in r for r in history)},
            # Reports Tune received (since the last resume: a resumed trial restarts Tune's count).
            "iterations": len(history), "steps": last_step,
            "skipped_steps": int(last.get("guard/skipped_steps") or 0), "reason": reason or "",
        })
    rows.sort(key=lambda r: r["trial_id"])
    return rows


def last_reported(history: list[dict[str, Any]], key: str) -> float | None:
    """The trial's last reported ``key`` as a finite float (None when it was inf or never reported).

    Validation metrics come only with validation passes; in Tune's dataframe the other rows hold NaN."""
    for result in reversed(history):
        value = as_float(result.get(key))
        if value is not None and not math.isnan(value):
            return finite_float(value)
    return None


def best_row(spec: SearchSpec, rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The healthy trial with the best last metric (a diverged trial's early low loss does not count)."""
    key = f"last_{spec.metric}"
    healthy = [r for r in rows if r["status"] in HEALTHY and r[key] is not None]
    if not healthy:
        return None
    pick = min if spec.mode == "min" else max
    return pick(healthy, key=lambda r: r[key])


def best_config(cfg: config_mod.TrainConfig, params: dict[str, Any], name: str) -> config_mod.TrainConfig:
    """The original config with the best params, run name ``<name>-best`` and the debug section at defaults."""
    best = config_mod.apply_overrides(cfg, params)
    best = dataclasses.replace(best, debug=config_mod.DebugConfig())
    return config_mod.apply_overrides(best, {"checkpoint.run_name": f"{name}-best"})


def _csv_text(rows: list[dict[str, Any]]) -> str:
    out = io.StringIO()
    if rows:
        writer = csv.DictWriter(out, fieldnames=list(rows[0]))
        writer.writeheader()
        for row in rows:
            writer.writerow({k: json.dumps(v) if isinstance(v, (list, dict)) else v for k, v in row.items()})
    return out.getvalue()


def write_outputs(cfg: config_mod.TrainConfig, spec: SearchSpec, name: str, directory: Path, results: Any,
                  reasons: dict[str, str], num_scenes: int) -> dict[str, Any]:
    """Write trials.csv, best_config.yaml (removed when no trial is healthy) and tune_summary.json; return the
    summary. ``reasons``: the stopper's trial id -> why it was pruned."""
    rows = trial_rows(cfg, spec, trial_entries(results), reasons, num_scenes, directory / TRIALS_SUBDIR)
    write_text_atomic(directory / TRIALS_CSV, _csv_text(rows))
    counts: dict[str, int] = {}
    for row in rows:
        counts[row["status"]] = counts.get(row["status"], 0) + 1
    best = best_row(spec, rows)
    summary: dict[str, Any] = {
        "name": name, "directory": str(directory), "metric": spec.metric, "mode": spec.mode,
        "num_trials": len(rows), "status_counts": counts, "best_trial_id": None, "best_params": None,
        "best_metric": None, "best_config": None,
        "trials": [{k: _json_number(v) for k, v in row.items()} for row in rows],
    }
    best_path = directory / BEST_CONFIG
    if best is not None:
        params = {k: best[k] for k in spec.keys}
        write_text_atomic(best_path, config_mod.to_yaml(best_config(cfg, params, name)))
        summary.update(best_trial_id=best["trial_id"], best_params=params,
                       best_metric=best[f"last_{spec.metric}"], best_config=str(best_path))
    else:
        best_path.unlink(missing_ok=True)
    write_json_atomic(directory / SWEEP_SUMMARY_FILE, summary)
    return summary


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if value is None:
        return "-"
    return str(value)


def format_table(spec: SearchSpec, summary: dict[str, Any]) -> str:
    """The table `sdf-ray tune` prints: one line per trial, the status counts and the best trial."""
    columns = ["trial_id", *spec.keys, "status", f"last_{spec.metric}", f"best_{spec.metric}", "iterations",
               "skipped_steps"]
    rows = [[_fmt(t.get(c)) for c in columns] for t in summary["trials"]]
    widths = [max(len(c), *(len(r[i]) for r in rows)) if rows else len(c) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) for r in rows]
    counts = ", ".join(f"{n} {s}" for s, n in sorted(summary["status_counts"].items()))
    lines.append(f"{summary['num_trials']} trial(s): {counts}")
    if summary["best_trial_id"]:
        params = ", ".join(f"{k}={v!r}" for k, v in summary["best_params"].items())
        lines.append(f"best trial {summary['best_trial_id']}: {spec.metric} {_fmt(summary['best_metric'])} "
                     f"({params}); config {summary['best_config']}")
    else:
        lines.append("no healthy trial: no best config written")
    return "\n".join(lines)
