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
import itertools
import math
import typing
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

from sdf_ray import config as config_mod
from sdf_ray.errors import ConfigError
from sdf_ray.metrics_log import REPORTED_METRICS, VALIDATION_METRICS
from sdf_ray.structure import STRUCTURE, Ge, Gt, Interval, convert, did_you_mean

Distribution = Literal["loguniform", "uniform", "choice", "grid"]
TimeAttr = Literal["training_iteration", "train/step", "train/epoch"]
DISTRIBUTIONS: tuple[str, ...] = get_args(Distribution)
TIME_ATTRS: tuple[str, ...] = get_args(TimeAttr)
MAX_CORNERS = 1024  # beyond this many corner combinations, check each parameter's corners one at a time


@dataclass(frozen=True)
class Param:
    key: str
    """Dotted training-config key."""
    kind: Distribution
    """loguniform | uniform | choice | grid."""
    values: tuple[Any, ...]
    """(lo, hi) for the ranges, the candidates for choice and grid."""
    integer: bool = False
    """A range over an integer config key: sampled as integers."""

    def corners(self) -> tuple[Any, ...]:
        return self.values


@dataclass(frozen=True, kw_only=True)
class SchedulerSpec:
    type: Literal["asha", "fifo"] = "asha"
    """asha: stop the worst trials early (Tune's ASHA); fifo: run every trial to the end."""
    grace_period: Annotated[int, Ge(1)] = 1
    """asha: reports every trial makes before it may be stopped."""
    reduction_factor: Annotated[float, Gt(1)] = 2.0
    """asha: keep 1/reduction_factor of the trials at each rung."""
    max_t: Annotated[int, Ge(1)] | None = None
    """asha: null means the number of reports a full trial makes (computed from the training config)."""
    time_attr: TimeAttr = "training_iteration"
    """asha: the result key that measures progress."""

    def validate(self) -> Iterator[tuple[str, str]]:
        if self.type == "fifo":
            asha_only = SchedulerSpec(type="fifo")
            for f in dataclasses.fields(self):
                if getattr(self, f.name) != getattr(asha_only, f.name):
                    yield f.name, "only the asha scheduler uses it (scheduler.type is 'fifo')"
        elif self.max_t is not None and 1 <= self.max_t < self.grace_period:
            yield "max_t", f"{self.max_t} is below scheduler.grace_period={self.grace_period}"


@dataclass(frozen=True, kw_only=True)
class DivergenceSpec:
    loss_growth_factor: Annotated[float, Gt(1)] | None = 10.0
    """Prune when the loss exceeds this many times the trial's best loss so far; null disables."""
    max_skip_fraction: Annotated[float, Interval(0, 1, "[)")] | None = 0.5
    """Prune when more than this fraction of an interval's steps were skipped; null disables."""


@dataclass(frozen=True, kw_only=True)
class CollapseSpec:
    """A decoder that collapsed to a constant: training loss and gradient norm both flat at a constant
    predictor's level for ``patience`` reports in a row. Such a trial would otherwise run to the end as
    ``finished`` (measured on an H200 with optim.decoder_lr >= 2e-3: loss stuck at ~0.104, |g| ~5e-6)."""

    max_grad_norm: Annotated[float, Gt(0)] | None = 1e-4
    """A report counts as flat only when train/grad_norm (before clipping) is below this; null disables."""
    max_loss_change: Annotated[float, Gt(0)] = 1e-3
    """...and train/loss changed by less than this fraction since the previous report."""
    patience: Annotated[int, Ge(1)] = 3
    """Prune after this many flat reports in a row."""


SEARCHABLE_METRICS = REPORTED_METRICS + VALIDATION_METRICS


def _reported_metric(metric: str) -> str | None:
    if metric in SEARCHABLE_METRICS:
        return None
    return (f"{metric!r} is never reported by the trainer{did_you_mean(metric, SEARCHABLE_METRICS)} "
            f"(reported: {', '.join(SEARCHABLE_METRICS)})")


def _structure_space(raw: Any, path: str, problems: list[str]) -> tuple[Param, ...] | None:
    if raw is None or raw == {}:
        problems.append(f"`{path}`: required, map dotted training-config keys to distributions")
        return None
    if not isinstance(raw, dict):
        problems.append(f"`{path}`: expected a mapping, got {type(raw).__name__}")
        return None
    params = (_parse_param(key, entry, problems) for key, entry in raw.items())
    return tuple(p for p in params if p is not None)


def _structure_scheduler(raw: Any, path: str, problems: list[str]) -> SchedulerSpec | None:
    if raw is None:
        return SchedulerSpec()
    if isinstance(raw, str):
        raw = {"type": raw}
    if not isinstance(raw, dict):
        problems.append(f"`{path}`: expected `asha`, `fifo` or a mapping with `type`, got {raw!r}")
        return None
    spec: SchedulerSpec | None = convert(SchedulerSpec, raw, problems, path, suggest_full_path=False)
    return spec


@dataclass(frozen=True, kw_only=True)
class SearchSpec:
    space: tuple[Param, ...] = field(metadata={STRUCTURE: _structure_space})
    """Dotted training-config key -> {loguniform|uniform: [lo, hi]} or {choice|grid: [values]}."""
    num_samples: Annotated[int, Ge(1)] = 1
    """Trials to sample (times the size of the grid)."""
    metric: Annotated[str, _reported_metric] = "train/loss"
    """The reported metric that ranks trials."""
    mode: Literal["min", "max"] = "min"
    """Whether a lower or a higher metric is better."""
    scheduler: SchedulerSpec = field(default_factory=SchedulerSpec, metadata={STRUCTURE: _structure_scheduler})
    """`asha`, `fifo`, or a mapping with `type` and ASHA's settings."""
    search_alg: Literal["random", "optuna"] = "random"
    """random (grid entries are expanded by the same generator) or optuna."""
    max_concurrent_trials: Annotated[int, Ge(1)] | None = None
    """null: as many trials as the cluster holds at once."""
    divergence: DivergenceSpec = field(default_factory=DivergenceSpec)
    """When the divergence stopper prunes a trial."""
    collapse: CollapseSpec = field(default_factory=CollapseSpec)
    """When a trial whose decoder collapsed to a constant is pruned (``pruned_collapsed``)."""

    @property
    def needs_validation(self) -> bool:
        """The metric comes from validation passes: the training config must name a held-out set."""
        return self.metric in VALIDATION_METRICS

    def validate(self) -> Iterator[tuple[str, str]]:
        if self.search_alg != "optuna":
            return
        if self.metric in VALIDATION_METRICS:
            # OptunaSearch.on_trial_result reads the metric from every report; val/* come only with validation.
            yield "search_alg", f"optuna needs the metric in every report, and {self.metric} comes only with " \
                                "validation passes; use search_alg: random"
        if self.has_grid:
            yield "search_alg", "optuna cannot expand grid entries; use choice, or search_alg: random"
        try:
            import optuna  # noqa: F401
        except ImportError:
            yield "search_alg", "optuna is not installed; install the extra: pip install 'sdf-ray[optuna]'"

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
            "collapse": dataclasses.asdict(self.collapse),
        }


# ---------------------------------------------------------------------------------------------
# Loading


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _key_type(dotted: str) -> Any:
    section, key = dotted.split(".", 1)
    section_cls = typing.get_type_hints(config_mod.TrainConfig)[section]
    return typing.get_type_hints(section_cls)[key]


def _parse_param(key: Any, entry: Any, problems: list[str]) -> Param | None:
    """One entry of ``space``: its own small grammar (a distribution name mapped to its values)."""
    where = f"`space.{key}`"
    if not isinstance(key, str) or key not in config_mod.known_keys():
        problems.append(f"{where}: unknown training-config key{did_you_mean(str(key), config_mod.known_keys())}")
        return None
    if not isinstance(entry, dict) or len(entry) != 1:
        problems.append(f"{where}: expected one of {{loguniform: [lo, hi]}}, {{uniform: [lo, hi]}}, "
                        f"{{choice: [...]}}, {{grid: [...]}}, got {entry!r}")
        return None
    (kind, values), = entry.items()
    if kind not in DISTRIBUTIONS:
        problems.append(f"{where}: unknown distribution `{kind}`{did_you_mean(str(kind), DISTRIBUTIONS)} "
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


def parse(data: Any, problems: list[str]) -> SearchSpec | None:
    """Plain data -> SearchSpec, appending every problem found; None when the space is unusable."""
    spec: SearchSpec | None = convert(SearchSpec, data, problems, suggest_full_path=False)
    return spec


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
        if spec.needs_validation and not cfg.validation.path:
            problems.append(f"`metric`: {spec.metric} comes from validation passes; set validation.path in the "
                            f"training config (or --set validation.path=HELD_OUT_DATASET)")
        if spec.metric == "val/chamfer_l2" and cfg.validation.mesh_resolution == 0:
            problems.append("`metric`: val/chamfer_l2 needs meshes; set validation.mesh_resolution (e.g. 64)")
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
