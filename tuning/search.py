"""The search file of ``sdf-ray tune``: strict loading, every problem reported at once as one ConfigError.

Example (``tuning/configs/stability.yaml``)::

    space:
      optim.decoder_lr: {loguniform: [1.0e-5, 1.0]}
      guard.grad_clip: {choice: [0, 0.1, 1, 10]}
    num_samples: 16
    metric: train/loss          # default
    mode: min                   # default
    scheduler: {type: asha, grace_period: 2, reduction_factor: 2}   # or `fifo`
    search_alg: random          # default; grid entries are expanded by the same generator; or `optuna`
    max_concurrent_trials: 4    # default: as many trials as the cluster holds at once
    divergence: {loss_growth_factor: 10, max_skip_fraction: 0.5}

Keys of ``space`` are dotted training-config keys (the same ones ``--set`` takes). Before any trial starts the
corners of the space are applied to the training config with ``apply_overrides``, so a sampled value the
training config would reject is reported here, not in a trial.
"""

from __future__ import annotations

import dataclasses
import difflib
import itertools
import math
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sdf_ray import config as config_mod
from sdf_ray.errors import ConfigError
from sdf_ray.metrics_log import REPORTED_METRICS

DISTRIBUTIONS = ("loguniform", "uniform", "choice", "grid")
TIME_ATTRS = ("training_iteration", "train/step", "train/epoch")
TOP_LEVEL_KEYS = ("space", "num_samples", "metric", "mode", "scheduler", "search_alg", "max_concurrent_trials",
                  "divergence")
MAX_CORNERS = 1024  # beyond this many corner combinations, check each parameter's corners one at a time


@dataclass(frozen=True)
class Param:
    key: str
    """Dotted training-config key."""
    kind: str
    """loguniform | uniform | choice | grid."""
    values: tuple[Any, ...]
    """(lo, hi) for the ranges, the candidates for choice and grid."""
    integer: bool = False
    """A range over an integer config key: sampled as integers."""

    def corners(self) -> tuple[Any, ...]:
        return self.values


@dataclass(frozen=True)
class SchedulerSpec:
    type: str = "asha"
    grace_period: int = 1
    reduction_factor: float = 2.0
    max_t: int | None = None
    """None: the number of reports a full trial makes (computed from the training config)."""
    time_attr: str = "training_iteration"


@dataclass(frozen=True)
class DivergenceSpec:
    loss_growth_factor: float | None = 10.0
    """Prune when the loss exceeds this many times the trial's best loss so far; null disables."""
    max_skip_fraction: float | None = 0.5
    """Prune when more than this fraction of an interval's steps were skipped; null disables."""


@dataclass(frozen=True)
class SearchSpec:
    space: tuple[Param, ...]
    num_samples: int = 1
    metric: str = "train/loss"
    mode: str = "min"
    scheduler: SchedulerSpec = dataclasses.field(default_factory=SchedulerSpec)
    search_alg: str = "random"
    max_concurrent_trials: int | None = None
    divergence: DivergenceSpec = dataclasses.field(default_factory=DivergenceSpec)

    @property
    def keys(self) -> list[str]:
        return [p.key for p in self.space]

    @property
    def has_grid(self) -> bool:
        return any(p.kind == "grid" for p in self.space)

    def num_trials(self) -> int:
        grid = math.prod(len(p.values) for p in self.space if p.kind == "grid")
        return self.num_samples * grid

    def to_dict(self) -> dict[str, Any]:
        """Plain data in the search-file format (saved next to a sweep to detect a changed search on resume)."""
        return {
            "space": {p.key: {p.kind: list(p.values)} for p in self.space},
            "num_samples": self.num_samples, "metric": self.metric, "mode": self.mode,
            "scheduler": dataclasses.asdict(self.scheduler), "search_alg": self.search_alg,
            "max_concurrent_trials": self.max_concurrent_trials,
            "divergence": dataclasses.asdict(self.divergence),
        }


# ---------------------------------------------------------------------------------------------
# Loading


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _key_type(dotted: str) -> Any:
    section, key = dotted.split(".", 1)
    section_cls = typing.get_type_hints(config_mod.TrainConfig)[section]
    return typing.get_type_hints(section_cls)[key]


def _did_you_mean(word: str, options: list[str] | tuple[str, ...]) -> str:
    close = difflib.get_close_matches(word, list(options), n=1)
    return f", did you mean `{close[0]}`?" if close else ""


def _parse_param(key: Any, entry: Any, problems: list[str]) -> Param | None:
    where = f"`space.{key}`"
    if not isinstance(key, str) or key not in config_mod.known_keys():
        problems.append(f"{where}: unknown training-config key{_did_you_mean(str(key), config_mod.known_keys())}")
        return None
    if not isinstance(entry, dict) or len(entry) != 1:
        problems.append(f"{where}: expected one of {{loguniform: [lo, hi]}}, {{uniform: [lo, hi]}}, "
                        f"{{choice: [...]}}, {{grid: [...]}}, got {entry!r}")
        return None
    (kind, values), = entry.items()
    if kind not in DISTRIBUTIONS:
        problems.append(f"{where}: unknown distribution `{kind}`{_did_you_mean(str(kind), DISTRIBUTIONS)} "
                        f"(expected one of {', '.join(DISTRIBUTIONS)})")
        return None
    if not isinstance(values, list):
        problems.append(f"{where}.{kind}: expected a list, got {type(values).__name__} {values!r}")
        return None
    if kind in ("choice", "grid"):
        if not values:
            problems.append(f"{where}.{kind}: empty list, give at least one value")
            return None
        return Param(key, kind, tuple(values))
    # Ranges.
    before = len(problems)
    if len(values) != 2:
        problems.append(f"{where}.{kind}: expected [lo, hi], got {len(values)} value(s)")
        return None
    lo, hi = values
    if not (_is_number(lo) and _is_number(hi)):
        problems.append(f"{where}.{kind}: bounds must be numbers, got {values!r}")
        return None
    field_type = _key_type(key)
    if field_type not in (int, float):
        problems.append(f"{where}.{kind}: `{key}` is not numeric; use choice or grid")
        return None
    integer = field_type is int
    if integer and not (isinstance(lo, int) and isinstance(hi, int)):
        problems.append(f"{where}.{kind}: `{key}` is an integer key; bounds must be integers, got {values!r}")
    if not (math.isfinite(lo) and math.isfinite(hi)):
        problems.append(f"{where}.{kind}: bounds must be finite, got {values!r}")
    elif lo > hi:
        problems.append(f"{where}.{kind}: lo > hi ({lo!r} > {hi!r})")
    elif lo == hi:
        problems.append(f"{where}.{kind}: empty range [{lo!r}, {hi!r}]; use choice for a fixed value")
    if kind == "loguniform" and _is_number(lo) and lo <= 0:
        problems.append(f"{where}.loguniform: bounds must be > 0, got lo={lo!r}")
    if len(problems) > before:
        return None
    return Param(key, kind, (lo, hi), integer=integer)


def _section(data: Any, name: str, problems: list[str]) -> dict[str, Any]:
    if data is None:
        return {}
    if not isinstance(data, dict):
        problems.append(f"`{name}`: expected a mapping, got {type(data).__name__} {data!r}")
        return {}
    return data


def _check_unknown(data: dict[str, Any], allowed: tuple[str, ...], prefix: str, problems: list[str]) -> None:
    for key in data:
        if key not in allowed:
            problems.append(f"`{prefix}{key}`: unknown key{_did_you_mean(str(key), allowed)}")


def _int(data: dict[str, Any], key: str, where: str, problems: list[str], minimum: int,
         default: int | None) -> int | None:
    value = data.get(key, default)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool):
        problems.append(f"`{where}`: expected an integer, got {type(value).__name__} {value!r}")
        return default
    if value < minimum:
        problems.append(f"`{where}`: must be >= {minimum}, got {value}")
        return default
    return value


def _parse_scheduler(raw: Any, problems: list[str]) -> SchedulerSpec:
    if raw is None:
        return SchedulerSpec()
    if isinstance(raw, str):
        raw = {"type": raw}
    if not isinstance(raw, dict):
        problems.append(f"`scheduler`: expected `asha`, `fifo` or a mapping with `type`, got {raw!r}")
        return SchedulerSpec()
    kind = raw.get("type", "asha")
    if kind not in ("asha", "fifo"):
        problems.append(f"`scheduler.type`: expected 'asha' or 'fifo', got {kind!r}")
        return SchedulerSpec()
    if kind == "fifo":
        _check_unknown(raw, ("type",), "scheduler.", problems)
        return SchedulerSpec(type="fifo")
    _check_unknown(raw, ("type", "grace_period", "reduction_factor", "max_t", "time_attr"), "scheduler.", problems)
    grace = _int(raw, "grace_period", "scheduler.grace_period", problems, 1, 1)
    max_t = _int(raw, "max_t", "scheduler.max_t", problems, 1, None)
    factor = raw.get("reduction_factor", 2.0)
    if not _is_number(factor) or not factor > 1:
        problems.append(f"`scheduler.reduction_factor`: must be a number > 1, got {factor!r}")
        factor = 2.0
    time_attr = raw.get("time_attr", "training_iteration")
    if time_attr not in TIME_ATTRS:
        problems.append(f"`scheduler.time_attr`: expected one of {', '.join(TIME_ATTRS)}, got {time_attr!r}")
        time_attr = "training_iteration"
    if max_t is not None and grace is not None and max_t < grace:
        problems.append(f"`scheduler.max_t`: {max_t} is below scheduler.grace_period={grace}")
    return SchedulerSpec(type="asha", grace_period=grace or 1, reduction_factor=float(factor), max_t=max_t,
                         time_attr=time_attr)


def _parse_divergence(raw: Any, problems: list[str]) -> DivergenceSpec:
    data = _section(raw, "divergence", problems)
    _check_unknown(data, ("loss_growth_factor", "max_skip_fraction"), "divergence.", problems)
    default = DivergenceSpec()
    growth = data.get("loss_growth_factor", default.loss_growth_factor)
    if growth is not None and (not _is_number(growth) or not growth > 1):
        problems.append(f"`divergence.loss_growth_factor`: must be a number > 1 (or null to disable), got {growth!r}")
        growth = default.loss_growth_factor
    skip = data.get("max_skip_fraction", default.max_skip_fraction)
    if skip is not None and (not _is_number(skip) or not 0 <= skip < 1):
        problems.append(f"`divergence.max_skip_fraction`: must be in [0, 1) (or null to disable), got {skip!r}")
        skip = default.max_skip_fraction
    return DivergenceSpec(loss_growth_factor=None if growth is None else float(growth),
                          max_skip_fraction=None if skip is None else float(skip))


def parse(data: Any, problems: list[str]) -> SearchSpec | None:
    """Plain data -> SearchSpec, appending every problem found; None when the space is unusable."""
    if not isinstance(data, dict):
        problems.append(f"top level must be a mapping, got {type(data).__name__}")
        return None
    _check_unknown(data, TOP_LEVEL_KEYS, "", problems)
    space_raw = data.get("space")
    params: list[Param] = []
    if space_raw is None or space_raw == {}:
        problems.append("`space`: required, map dotted training-config keys to distributions")
    elif not isinstance(space_raw, dict):
        problems.append(f"`space`: expected a mapping, got {type(space_raw).__name__}")
    else:
        for key, entry in space_raw.items():
            param = _parse_param(key, entry, problems)
            if param is not None:
                params.append(param)
    num_samples = _int(data, "num_samples", "num_samples", problems, 1, 1) or 1
    metric = data.get("metric", "train/loss")
    if metric not in REPORTED_METRICS:
        problems.append(f"`metric`: {metric!r} is never reported by the trainer"
                        f"{_did_you_mean(str(metric), REPORTED_METRICS)} (reported: {', '.join(REPORTED_METRICS)})")
    mode = data.get("mode", "min")
    if mode not in ("min", "max"):
        problems.append(f"`mode`: expected 'min' or 'max', got {mode!r}")
    scheduler = _parse_scheduler(data.get("scheduler"), problems)
    search_alg = data.get("search_alg", "random")
    if search_alg not in ("random", "optuna"):
        problems.append(f"`search_alg`: expected 'random' or 'optuna', got {search_alg!r}")
    elif search_alg == "optuna":
        if any(p.kind == "grid" for p in params):
            problems.append("`search_alg`: optuna cannot expand grid entries; use choice, or search_alg: random")
        try:
            import optuna  # noqa: F401
        except ImportError:
            problems.append("`search_alg`: optuna is not installed; install the extra: pip install 'sdf-ray[optuna]'")
    max_concurrent = _int(data, "max_concurrent_trials", "max_concurrent_trials", problems, 1, None)
    divergence = _parse_divergence(data.get("divergence"), problems)
    return SearchSpec(space=tuple(params), num_samples=num_samples, metric=str(metric), mode=str(mode),
                      scheduler=scheduler, search_alg=str(search_alg), max_concurrent_trials=max_concurrent,
                      divergence=divergence)


def _corner_overrides(spec: SearchSpec) -> list[dict[str, Any]]:
    if not spec.space:
        return []
    combos = math.prod(len(p.corners()) for p in spec.space)
    if combos <= MAX_CORNERS:
        return [dict(zip(spec.keys, values, strict=True)) for values in itertools.product(*(p.corners() for p in spec.space))]
    return [{p.key: v} for p in spec.space for v in p.corners()]


def corner_problems(spec: SearchSpec, cfg: config_mod.TrainConfig) -> list[str]:
    """Apply the corners of the space to ``cfg``: each parameter's corners alone (so a problem names its
    parameter), then their combinations (problems of two values together); each distinct problem once."""
    problems: list[str] = []
    seen: set[str] = set()

    def check(overrides: dict[str, Any], describe: str) -> None:
        try:
            config_mod.apply_overrides(cfg, overrides)
        except ConfigError as exc:
            for problem in exc.problems:
                if problem not in seen:
                    seen.add(problem)
                    problems.append(f"{describe} gives an invalid training config: {problem}")

    for p in spec.space:
        for value in p.corners():
            check({p.key: value}, f"`space.{p.key}` value {value!r}")
    if len(spec.space) > 1:
        for overrides in _corner_overrides(spec):
            check(overrides, "the combination " + ", ".join(f"{k}={v!r}" for k, v in overrides.items()))
    return problems


def corner_configs(spec: SearchSpec, cfg: config_mod.TrainConfig) -> list[config_mod.TrainConfig]:
    """The validated corner configs (after ``corner_problems`` found none); at least ``cfg`` itself."""
    return [config_mod.apply_overrides(cfg, o) for o in _corner_overrides(spec)] or [cfg]


def from_dict(data: Any, cfg: config_mod.TrainConfig | None = None, source: str | None = None) -> SearchSpec:
    """Build and validate a search spec (and its corners against ``cfg``); one ConfigError listing every problem."""
    problems: list[str] = []
    spec = parse(data, problems)
    if spec is not None and cfg is not None:
        # The corners of the parameters that parsed are checked even when others did not: every problem at once.
        problems.extend(corner_problems(spec, cfg))
    if problems or spec is None:
        raise ConfigError(problems or ["invalid search file"], source=source)
    return spec


def load(path: str | Path, cfg: config_mod.TrainConfig | None = None) -> SearchSpec:
    return from_dict(config_mod.read_yaml_file(path, "search"), cfg, source=str(path))


def packaged_search(name: str) -> Path:
    """Path of a search file shipped in ``tuning/configs`` (``stability``, ``tiny``)."""
    return Path(__file__).parent / "configs" / f"{name}.yaml"


# ---------------------------------------------------------------------------------------------
# Tune objects


def tune_param_space(spec: SearchSpec) -> dict[str, Any]:
    """Tune domains keyed by the dotted config keys."""
    from ray import tune

    space: dict[str, Any] = {}
    for p in spec.space:
        if p.kind == "grid":
            space[p.key] = tune.grid_search(list(p.values))
        elif p.kind == "choice":
            space[p.key] = tune.choice(list(p.values))
        elif p.kind == "uniform":
            lo, hi = p.values
            space[p.key] = tune.randint(lo, hi + 1) if p.integer else tune.uniform(lo, hi)
        else:
            lo, hi = p.values
            space[p.key] = tune.lograndint(lo, hi + 1) if p.integer else tune.loguniform(lo, hi)
    return space
