"""Run a Ray Tune sweep of Train V2 runs: one function trainable per trial, each fitting a ``TorchTrainer``.

Layout under ``<checkpoint.storage_path>/<tune name>/``:

* Tune's experiment state and one ``tune-<trial_id>/`` directory per trial (Tune's results);
* ``trials/trial-<trial_id>/``: each trial's training run (checkpoints, metrics.jsonl, summary.json);
* ``sweep.yaml`` (the base config and search, to refuse resuming a different sweep), ``trials.csv``,
  ``best_config.yaml`` and ``tune_summary.json``.

The trainable holds no resources of its own (the TorchTrainer's workers hold them): Tune gets a head bundle of
a little memory and no CPU, and ``max_concurrent_trials`` keeps the number of in-flight Train runs to what the
cluster can hold. A trial stopped by Tune never runs code after ``fit()``, so every outcome is computed here from
Tune's own results.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import shutil
import time
from pathlib import Path
from typing import Any

import yaml

from sdf_ray import config as config_mod
from sdf_ray import launch
from sdf_ray.errors import ClusterError, ConfigError
from sdf_ray.fsutil import write_json_atomic, write_text_atomic
from sdf_ray.run_files import SUMMARY_FILE
from tuning.reaper import LeakedPlacementGroupReaper
from tuning.search import SearchSpec, corner_configs, tune_param_space
from tuning.stopper import DivergenceStopper, replay

SWEEP_FILE = "sweep.yaml"
TRIALS_CSV = "trials.csv"
BEST_CONFIG = "best_config.yaml"
SUMMARY_JSON = "tune_summary.json"
TRIALS_SUBDIR = "trials"
# Logical resources of the trial's own actor: it only drives the TorchTrainer. Tune needs a non-empty head
# bundle (a placement group cannot be empty), so it asks for a little memory and zero CPUs.
TRAINABLE_RESOURCES = {"CPU": 0, "memory": 64 * 1024**2}
HEALTHY = ("finished", "pruned_asha", "stopped")


def tune_dir(cfg: config_mod.TrainConfig, name: str) -> Path:
    return Path(cfg.checkpoint.storage_path) / name


def trial_run_name(trial_id: str) -> str:
    return f"trial-{trial_id}"


def _trial_dirname(trial: Any) -> str:
    return f"tune-{trial.trial_id}"


def _plain(value: Any) -> Any:
    """numpy scalars (from samplers) -> Python scalars, recursively."""
    if hasattr(value, "item") and callable(value.item) and not isinstance(value, (list, dict, str)):
        return value.item()
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def trial_config(base: config_mod.TrainConfig, params: dict[str, Any], trial_id: str,
                 trials_dir: str) -> config_mod.TrainConfig:
    cfg = config_mod.apply_overrides(base, {k: _plain(v) for k, v in params.items()})
    return config_mod.apply_overrides(cfg, {"checkpoint.run_name": trial_run_name(trial_id),
                                            "checkpoint.storage_path": trials_dir})


def train_driver_fn(config: dict[str, Any], base_config: dict[str, Any], trials_dir: str,
                    param_keys: list[str]) -> None:
    """The Tune function trainable: apply the sampled params and fit one Train V2 run, reporting through Tune."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    trial_id = tune.get_context().get_trial_id()
    params = {k: config[k] for k in param_keys if k in config}
    cfg = trial_config(config_mod.from_dict(base_config), params, trial_id, trials_dir)
    launch.prepare_run_dir(cfg, overwrite=False)  # a restored trial resumes from its Train checkpoints
    summary = launch.fit(cfg, callbacks=[TuneReportCallback()])
    if summary.get("status") == "failed":
        raise RuntimeError(summary.get("message", "training failed"))


# ---------------------------------------------------------------------------------------------
# Planning (driver side, before any trial starts)


def expected_reports(cfg: config_mod.TrainConfig, num_scenes: int) -> int:
    """Reports of a run without rollbacks (the loop's logging and checkpoint cadence)."""
    from sdf_ray.train_loop import steps_per_epoch

    spe = steps_per_epoch(num_scenes, cfg.data.scenes_per_step)
    total = cfg.optim.num_epochs * spe
    reports = 0
    for step in range(1, total + 1):
        end_of_epoch = step % spe == 0 or step == total
        checkpoint_due = end_of_epoch and (math.ceil(step / spe) % cfg.checkpoint.every_n_epochs == 0 or step == total)
        if step % cfg.logging.every_n_steps == 0 or checkpoint_due:
            reports += 1
    return reports


def total_steps(cfg: config_mod.TrainConfig, num_scenes: int) -> int:
    from sdf_ray.train_loop import steps_per_epoch

    return cfg.optim.num_epochs * steps_per_epoch(num_scenes, cfg.data.scenes_per_step)


@dataclasses.dataclass(frozen=True)
class Plan:
    cpus_per_trial: float
    gpus_per_trial: float
    max_concurrent_trials: int
    max_t: int | None


def plan(cfg: config_mod.TrainConfig, spec: SearchSpec, num_scenes: int,
         cluster: dict[str, float] | None = None) -> Plan:
    """Resources per trial, concurrency and ASHA's max_t; ClusterError when the cluster cannot hold them."""
    corners = corner_configs(spec, cfg)
    cpus = max(c.scaling.num_workers * c.scaling.cpus_per_worker for c in corners)
    gpus = max(c.scaling.num_workers if c.scaling.use_gpu else 0 for c in corners)
    if cluster is None:
        import ray

        cluster = ray.cluster_resources()
    have_cpus, have_gpus = cluster.get("CPU", 0.0), cluster.get("GPU", 0.0)
    exists = f"the cluster has {have_cpus:g} CPU(s), {have_gpus:g} GPU(s)"
    need = f"{cpus:g} CPU(s)" + (f" and {gpus:g} GPU(s)" if gpus else "")
    capacity = int(have_cpus // cpus) if cpus else spec.num_trials()
    if gpus:
        capacity = min(capacity, int(have_gpus // gpus))
    if capacity < 1:
        raise ClusterError(f"each trial needs {need} (scaling.num_workers x cpus_per_worker); {exists}")
    wanted = spec.max_concurrent_trials
    if wanted is not None and wanted > capacity:
        raise ClusterError(f"max_concurrent_trials={wanted} needs {wanted} x {need}; {exists}, enough for "
                           f"{capacity} trial(s) at once")
    concurrency = wanted or max(1, min(capacity, spec.num_trials()))
    max_t = spec.scheduler.max_t
    if spec.scheduler.type == "asha" and max_t is None:
        if spec.scheduler.time_attr == "train/epoch":
            max_t = max(c.optim.num_epochs for c in corners)
        elif spec.scheduler.time_attr == "train/step":
            max_t = max(total_steps(c, num_scenes) for c in corners)
        else:
            max_t = max(expected_reports(c, num_scenes) for c in corners)
        max_t = max(max_t, spec.scheduler.grace_period)
    return Plan(cpus_per_trial=cpus, gpus_per_trial=gpus, max_concurrent_trials=concurrency, max_t=max_t)


# ---------------------------------------------------------------------------------------------
# Running


def _sweep_record(cfg: config_mod.TrainConfig, spec: SearchSpec) -> dict[str, Any]:
    return {"config": config_mod.to_dict(cfg), "search": spec.to_dict()}


def _check_same_sweep(directory: Path, record: dict[str, Any]) -> None:
    saved = directory / SWEEP_FILE
    if not saved.exists():
        return
    try:
        old = config_mod.yaml_load(saved.read_text())
    except Exception:  # an unreadable record means we cannot prove it is the same sweep
        raise ConfigError(f"{saved} is unreadable; pass --overwrite to start the sweep afresh") from None
    if old != record:
        differ = [k for k in ("config", "search") if old.get(k) != record.get(k)]
        raise ConfigError(f"{directory} holds a sweep with a different {' and '.join(differ)}; pass --overwrite to "
                          f"replace it or choose another --name")


def _make_tuner(cfg: config_mod.TrainConfig, spec: SearchSpec, name: str, sweep_plan: Plan,
                stopper: DivergenceStopper, directory: Path) -> Any:
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    trainable = _trainable(cfg, spec, directory)
    scheduler: Any
    if spec.scheduler.type == "asha":
        assert sweep_plan.max_t is not None
        scheduler = ASHAScheduler(time_attr=spec.scheduler.time_attr, max_t=sweep_plan.max_t,
                                  grace_period=spec.scheduler.grace_period,
                                  reduction_factor=spec.scheduler.reduction_factor)
    else:
        scheduler = FIFOScheduler()
    search_alg = None
    if spec.search_alg == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        search_alg = OptunaSearch()
    return tune.Tuner(
        trainable,
        param_space=tune_param_space(spec),
        tune_config=tune.TuneConfig(
            metric=spec.metric, mode=spec.mode, num_samples=spec.num_samples, scheduler=scheduler,
            search_alg=search_alg, max_concurrent_trials=sweep_plan.max_concurrent_trials,
            trial_dirname_creator=_trial_dirname),
        run_config=tune.RunConfig(name=name, storage_path=str(directory.parent), stop=stopper,
                                  failure_config=tune.FailureConfig(max_failures=0), verbose=1,
                                  callbacks=[LeakedPlacementGroupReaper(TRAINABLE_RESOURCES)]),
    )


def _trainable(cfg: config_mod.TrainConfig, spec: SearchSpec, directory: Path) -> Any:
    from ray import tune

    fn = tune.with_parameters(train_driver_fn, base_config=config_mod.to_dict(cfg),
                              trials_dir=str(directory / TRIALS_SUBDIR), param_keys=spec.keys)
    return tune.with_resources(fn, dict(TRAINABLE_RESOURCES))


def run(cfg: config_mod.TrainConfig, spec: SearchSpec, name: str, *, num_scenes: int, overwrite: bool = False,
        log: Any = print) -> dict[str, Any]:
    """Run (or resume) the sweep; write trials.csv, best_config.yaml and tune_summary.json; return the summary.

    ``cfg`` has its paths resolved (``launch.resolve_paths``); Ray is connected.
    """
    from ray import tune

    if launch.is_uri(cfg.checkpoint.storage_path):
        raise ConfigError("`checkpoint.storage_path`: sdf-ray tune needs a local or mounted (NFS) path, "
                          f"got {cfg.checkpoint.storage_path!r}")
    directory = tune_dir(cfg, name)
    sweep_plan = plan(cfg, spec, num_scenes)
    record = _sweep_record(cfg, spec)
    if overwrite and directory.exists():
        shutil.rmtree(directory)
    stopper = DivergenceStopper(spec.divergence)
    started = time.perf_counter()
    if tune.Tuner.can_restore(str(directory)):
        _check_same_sweep(directory, record)
        log(f"sdf-ray tune: resuming the sweep in {directory}")
        tuner = tune.Tuner.restore(str(directory), trainable=_trainable(cfg, spec, directory),
                                   resume_unfinished=True, restart_errored=False)
    else:
        directory.mkdir(parents=True, exist_ok=True)
        write_text_atomic(directory / SWEEP_FILE, yaml.safe_dump(record, sort_keys=False))
        log(f"sdf-ray tune: {spec.num_trials()} trial(s), up to {sweep_plan.max_concurrent_trials} at once "
            f"({sweep_plan.cpus_per_trial:g} CPU(s) each); sweep directory {directory}")
        tuner = _make_tuner(cfg, spec, name, sweep_plan, stopper, directory)
    results = tuner.fit()
    summary = write_outputs(cfg, spec, name, directory, results, stopper.reasons, num_scenes)
    summary["elapsed_s"] = round(time.perf_counter() - started, 1)
    write_json_atomic(directory / SUMMARY_JSON, summary)
    return summary


# ---------------------------------------------------------------------------------------------
# Outputs


def _finite(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


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
    interrupted sweep's Results do not say which trials were cut short: both come from Tune's trials (the
    ResultGrid keeps their order)."""
    analysis = getattr(results, "_experiment_analysis", None)
    trials = list(getattr(analysis, "trials", None) or [])
    items = list(results)
    if len(trials) == len(items):
        return [(str(t.trial_id), dict(t.config or {}), r, str(t.status)) for t, r in zip(trials, items, strict=True)]
    return [(_trial_id(r), dict(r.config or {}), r, "ERROR" if r.error else "TERMINATED") for r in items]


def trial_rows(cfg: config_mod.TrainConfig, spec: SearchSpec, entries: list[Entry],
               reasons: dict[str, str], num_scenes: int, trials_dir: Path) -> list[dict[str, Any]]:
    """One row per trial: id, params, status, reason, best/last metric, iterations, steps, skipped steps."""
    rows = []
    for trial_id, config, result, trial_status in entries:
        params = {k: _plain(config.get(k)) for k in spec.keys}
        df = result.metrics_dataframe
        history = df.to_dict("records") if df is not None and len(df) else []
        last = history[-1] if history else dict(result.metrics or {})
        values = [_finite(r.get(spec.metric)) for r in history]
        finite = [v for v in values if v is not None]
        best = (min(finite) if spec.mode == "min" else max(finite)) if finite else None
        reason = reasons.get(trial_id) or replay(history, spec.divergence)[0]
        trial_summary_path = trials_dir / trial_run_name(trial_id) / SUMMARY_FILE
        trial_summary = json.loads(trial_summary_path.read_text()) if trial_summary_path.exists() else {}
        if reason is None and trial_summary.get("status") == "diverged":
            reason = trial_summary.get("message", "diverged")
        last_step = int(last.get("train/step") or 0)
        try:
            wanted_steps = total_steps(config_mod.apply_overrides(cfg, params), num_scenes)
        except ConfigError:
            wanted_steps = -1
        if reason is not None:
            status = "pruned_diverged"
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
            f"best_{spec.metric}": best, f"last_{spec.metric}": _finite(last.get(spec.metric)) if last else None,
            # Reports Tune received (since the last resume: a resumed trial restarts Tune's count).
            "iterations": len(history), "steps": last_step,
            "skipped_steps": int(last.get("guard/skipped_steps") or 0), "reason": reason or "",
        })
    rows.sort(key=lambda r: r["trial_id"])
    return rows


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
    write_json_atomic(directory / SUMMARY_JSON, summary)
    return summary


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if value is None:
        return "-"
    return str(value)


def format_table(spec: SearchSpec, summary: dict[str, Any]) -> str:
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
