"""Typed training config: frozen dataclass sections, strict YAML loading, ``--set`` overrides.

Loading never stops at the first problem: every unknown key, wrong type and out-of-range value is
collected and raised together as one ``ConfigError``. The same ``apply_overrides`` path serves the
CLI's ``--set section.key=value`` and Ray Tune's sampled parameters.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from sdf_ray.errors import ConfigError

Precision = Literal["fp32", "tf32", "bf16"]
Schedule = Literal["step", "warmup", "constant"]
InjectSite = Literal["loss", "grad", "latent"]
InjectValue = Literal["nan", "inf"]
CompileMode = Literal["default", "max-autotune-no-cudagraphs", "reduce-overhead"]
PlacementStrategy = Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"]


class _YamlLoader(yaml.SafeLoader):
    """SafeLoader that also reads ``1e-3`` as a float (YAML 1.1 insists on ``1.0e-3``)."""


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
    |\.[0-9_]+(?:[eE][-+][0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."),
)


def yaml_load(text: str) -> Any:
    """Parse YAML the way configs and ``--set`` values are parsed everywhere in sdf-ray."""
    return yaml.load(text, Loader=_YamlLoader)  # noqa: S506 - a SafeLoader subclass


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    latent_size: int = 256
    """Length L of each scene's latent code."""
    hidden_dim: int = 512
    """Width of every hidden layer."""
    num_layers: int = 8
    """Number of hidden layers (each with weight norm, ReLU and dropout)."""
    latent_in_layers: tuple[int, ...] = (4,)
    """Hidden layers whose input re-concatenates [latent, xyz] (the skip connection)."""
    dropout: float = 0.2
    """Dropout probability after every hidden layer (0 disables)."""
    weight_norm: bool = True
    """Weight normalisation on every hidden layer, as in the DeepSDF reference."""
    output_tanh: bool = True
    """Squash the output with tanh."""
    pad_features_to: int = 8
    """Pad the odd width of the layer before a skip (253 = 512 - 259) to a multiple of this in forward, with
    zeros: same parameters and outputs, aligned bf16 GEMMs. 0 disables."""
    compile: bool = False
    """Compile the decoder with torch.compile (GPU fast path)."""
    compile_mode: CompileMode = "default"
    """torch.compile mode: default, or max-autotune-no-cudagraphs (Triton GEMMs with fused epilogues; slow
    to compile), or reduce-overhead (CUDA graphs)."""


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    path: str = "data/demo"
    """Dataset directory (Parquet files + manifest.json); relative paths resolve from the CWD."""
    scenes_per_step: int = 64
    """Global number of scenes per optimizer step, split evenly across workers."""
    samples_per_scene: int = 16384
    """SDF samples drawn per scene per step: half with sdf > 0, half with sdf <= 0 (must be even)."""
    seed: int = 0
    """Seed for scene order, point sampling, latent init and dropout."""


@dataclass(frozen=True, kw_only=True)
class LossConfig:
    clamp_dist: float = 0.1
    """delta: predictions and targets are clamped to [-delta, delta] before the L1."""
    code_reg_lambda: float = 1e-4
    """Weight of the latent-norm regulariser (0 disables)."""
    code_reg_ramp_epochs: int = 100
    """The regulariser ramps linearly from 0 to full weight over this many epochs."""


@dataclass(frozen=True, kw_only=True)
class OptimConfig:
    num_epochs: int = 2000
    """Training length; one epoch visits every scene once."""
    decoder_lr: float = 5e-4
    """Adam learning rate of the decoder."""
    latent_lr: float = 1e-3
    """Adam learning rate of the latent codes."""
    schedule: Schedule = "step"
    """Learning-rate schedule applied to both parameter groups."""
    lr_step_every_n_epochs: int = 500
    """step: multiply the learning rates by lr_step_factor every this many epochs."""
    lr_step_factor: float = 0.5
    """step: the multiplier."""
    warmup_epochs: int = 0
    """warmup: linear ramp from 0 over this many epochs, then the step schedule."""
    betas: tuple[float, float] = (0.9, 0.999)
    """Adam betas."""
    eps: float = 1e-8
    """Adam epsilon."""
    precision: Precision = "fp32"
    """fp32, tf32 (TF32 matmuls on Ampere+), or bf16 (autocast; weights and Adam stay fp32)."""


@dataclass(frozen=True, kw_only=True)
class GuardConfig:
    enabled: bool = True
    """The whole guard: global norm, clipping, the non-finite vote and skipping (off: plain DDP steps)."""
    grad_clip: float = 1.0
    """Clip the global gradient norm (decoder + latents, after the all-reduce) to this; 0 disables."""
    max_consecutive_skips: int = 20
    """Roll back when this many steps in a row were skipped."""
    max_skip_fraction: float = 0.25
    """Roll back when more than this fraction of the last skip_window_steps steps were skipped."""
    skip_window_steps: int = 200
    """Window for max_skip_fraction."""
    max_rollbacks: int = 3
    """Rollbacks allowed before the run is stopped as diverged."""


@dataclass(frozen=True, kw_only=True)
class CheckpointConfig:
    storage_path: str = "runs"
    """Where runs live: a local directory, or a shared path (NFS) for multi-node clusters."""
    run_name: str = ""
    """Run name; the run directory is <storage_path>/<run_name>. Empty: the config file's stem."""
    every_n_epochs: int = 10
    """Checkpoint cadence in epochs (the last epoch is always checkpointed)."""
    num_to_keep: int = 2
    """Checkpoints kept on storage."""


@dataclass(frozen=True, kw_only=True)
class ScalingConfig:
    num_workers: int = 2
    """Ray Train workers (one per GPU when use_gpu)."""
    use_gpu: bool = False
    """Train on GPUs with NCCL; otherwise CPUs with gloo."""
    cpus_per_worker: float = 1.0
    """CPUs reserved per worker."""
    placement_strategy: PlacementStrategy = "PACK"
    """How workers are placed on nodes (STRICT_SPREAD forces one worker per node)."""
    max_failures: int = 2
    """Worker-group restarts from the latest checkpoint before the run is failed."""


@dataclass(frozen=True, kw_only=True)
class LoggingConfig:
    every_n_steps: int = 10
    """Metrics cadence: one all-reduce, one host sync, one metrics line and one Ray report."""
    tensorboard: bool = True
    """Write TensorBoard event files into the run directory."""
    level: Literal["DEBUG", "INFO", "WARNING"] = "INFO"
    """Log level of sdf-ray's own messages."""


@dataclass(frozen=True, kw_only=True)
class InjectConfig:
    step: int
    """Global step (0-based) at which to inject."""
    rank: int
    """Worker rank that sees the bad value."""
    site: InjectSite = "loss"
    """loss: the rank's loss; grad: a decoder gradient; latent: a latent-code gradient."""
    value: InjectValue = "nan"
    """The value injected."""
    repeat: bool = False
    """Also inject at every later step (a run that can only diverge: proves escalation and pruning)."""


@dataclass(frozen=True, kw_only=True)
class CrashConfig:
    step: int
    """Global step at which the worker process exits abruptly (once per run)."""
    rank: int = 0
    """Rank of the worker that dies."""


@dataclass(frozen=True, kw_only=True)
class DebugConfig:
    inject: tuple[InjectConfig, ...] = ()
    """Non-finite values to inject, to prove the guard works."""
    crash: CrashConfig | None = None
    """Kill one worker once, to prove recovery from checkpoints."""


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    guard: GuardConfig = field(default_factory=GuardConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)


# ---------------------------------------------------------------------------------------------
# Strict conversion from plain data (YAML, dicts from Ray workers) to the dataclasses.


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if tp is type(None):
        return "null"
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is tuple:
        return "list"
    if _is_dataclass_type(tp):
        return "mapping"
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, path: str, problems: list[str]) -> Any:
    """Convert ``value`` to ``tp`` or append a problem naming ``path``; returns None on failure."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        non_none = [a for a in args if a is not type(None)]
        if len(non_none) == 1:
            return _convert(value, non_none[0], path, problems)
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        problems.append(f"`{path}`: expected one of {_type_name(tp)}, got {value!r}")
        return None
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            problems.append(f"`{path}`: expected a list, got {type(value).__name__} {value!r}")
            return None
        if len(args) == 2 and args[1] is Ellipsis:
            item_types = [args[0]] * len(value)
        else:
            if len(value) != len(args):
                problems.append(f"`{path}`: expected a list of {len(args)} items, got {len(value)}")
                return None
            item_types = list(args)
        before = len(problems)
        items = [_convert(v, t, f"{path}[{i}]", problems) for i, (v, t) in enumerate(zip(value, item_types))]
        return tuple(items) if len(problems) == before else None
    if _is_dataclass_type(tp):
        return _build_dataclass(tp, value, path, problems)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    else:  # pragma: no cover - a field type this loader does not know is our bug
        raise AssertionError(f"unsupported config field type {tp!r} at {path}")
    problems.append(f"`{path}`: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")
    return None


def _build_dataclass(cls: Any, data: Any, path: str, problems: list[str]) -> Any:
    where = f"`{path}`" if path else "the config"
    if data is None:
        data = {}
    if not isinstance(data, dict):
        problems.append(f"{where}: expected a mapping, got {type(data).__name__} {data!r}")
        return None
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        dotted = f"{path}.{key}" if path else str(key)
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f", did you mean `{path + '.' if path else ''}{close[0]}`?" if close else ""
            problems.append(f"`{dotted}`: unknown key{hint}")
            continue
        before = len(problems)
        converted = _convert(value, hints[key], dotted, problems)
        # A nested section keeps its good fields even when one of them was bad.
        if len(problems) == before or (converted is not None and _is_dataclass_type(hints[key])):
            kwargs[key] = converted
        # else: leave the default in place so the remaining range checks still run
    for name, f in fields.items():
        if name not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            problems.append(f"`{path + '.' if path else ''}{name}`: required key is missing")
    try:
        return cls(**kwargs)
    except TypeError as exc:  # missing required keys, already reported above
        if not problems:
            problems.append(f"{where}: {exc}")
        return None


def _validate(cfg: TrainConfig) -> list[str]:
    """Range and consistency checks that types alone cannot express."""
    p: list[str] = []

    def positive(path: str, value: float) -> None:
        if not value > 0:
            p.append(f"`{path}`: must be > 0, got {value!r}")

    def non_negative(path: str, value: float) -> None:
        if not value >= 0:
            p.append(f"`{path}`: must be >= 0, got {value!r}")

    m, d, lo, o, g, c, s, lg, dbg = (cfg.model, cfg.data, cfg.loss, cfg.optim, cfg.guard,
                                    cfg.checkpoint, cfg.scaling, cfg.logging, cfg.debug)
    positive("model.latent_size", m.latent_size)
    positive("model.hidden_dim", m.hidden_dim)
    positive("model.num_layers", m.num_layers)
    for i, layer in enumerate(m.latent_in_layers):
        if not 0 < layer < m.num_layers:
            p.append(f"`model.latent_in_layers[{i}]`: must be in 1..{m.num_layers - 1}, got {layer}")
        elif m.hidden_dim <= m.latent_size + 3:
            p.append("`model.hidden_dim`: must exceed latent_size + 3 when latent_in_layers is used")
    non_negative("model.pad_features_to", m.pad_features_to)
    if not 0 <= m.dropout < 1:
        p.append(f"`model.dropout`: must be in [0, 1), got {m.dropout!r}")
    if not d.path:
        p.append("`data.path`: must name a dataset directory")
    positive("data.scenes_per_step", d.scenes_per_step)
    positive("data.samples_per_scene", d.samples_per_scene)
    if d.samples_per_scene % 2:
        p.append(f"`data.samples_per_scene`: must be even (half positive, half negative), got {d.samples_per_scene}")
    positive("loss.clamp_dist", lo.clamp_dist)
    non_negative("loss.code_reg_lambda", lo.code_reg_lambda)
    non_negative("loss.code_reg_ramp_epochs", lo.code_reg_ramp_epochs)
    positive("optim.num_epochs", o.num_epochs)
    positive("optim.decoder_lr", o.decoder_lr)
    positive("optim.latent_lr", o.latent_lr)
    positive("optim.lr_step_every_n_epochs", o.lr_step_every_n_epochs)
    positive("optim.lr_step_factor", o.lr_step_factor)
    non_negative("optim.warmup_epochs", o.warmup_epochs)
    if o.schedule == "warmup" and o.warmup_epochs == 0:
        p.append("`optim.warmup_epochs`: must be > 0 when optim.schedule is 'warmup'")
    for i, beta in enumerate(o.betas):
        if not 0 <= beta < 1:
            p.append(f"`optim.betas[{i}]`: must be in [0, 1), got {beta!r}")
    positive("optim.eps", o.eps)
    non_negative("guard.grad_clip", g.grad_clip)
    if not g.enabled and g.grad_clip > 0:
        p.append("`guard.grad_clip`: clipping uses the guard's all-reduced global norm; set guard.grad_clip=0 "
                 "when guard.enabled is false")
    positive("guard.max_consecutive_skips", g.max_consecutive_skips)
    if not 0 < g.max_skip_fraction <= 1:
        p.append(f"`guard.max_skip_fraction`: must be in (0, 1], got {g.max_skip_fraction!r}")
    positive("guard.skip_window_steps", g.skip_window_steps)
    non_negative("guard.max_rollbacks", g.max_rollbacks)
    if not c.storage_path:
        p.append("`checkpoint.storage_path`: must not be empty")
    if c.run_name and (c.run_name in (".", "..") or "/" in c.run_name):
        p.append(f"`checkpoint.run_name`: must be a plain name, got {c.run_name!r}")
    positive("checkpoint.every_n_epochs", c.every_n_epochs)
    positive("checkpoint.num_to_keep", c.num_to_keep)
    positive("scaling.num_workers", s.num_workers)
    positive("scaling.cpus_per_worker", s.cpus_per_worker)
    non_negative("scaling.max_failures", s.max_failures)
    if d.scenes_per_step > 0 and s.num_workers > 0 and d.scenes_per_step % s.num_workers:
        p.append(f"`data.scenes_per_step`: {d.scenes_per_step} does not split evenly over "
                 f"scaling.num_workers={s.num_workers}")
    positive("logging.every_n_steps", lg.every_n_steps)
    for i, inj in enumerate(dbg.inject):
        non_negative(f"debug.inject[{i}].step", inj.step)
        if not 0 <= inj.rank < max(s.num_workers, 1):
            p.append(f"`debug.inject[{i}].rank`: must be in 0..{s.num_workers - 1}, got {inj.rank}")
    if dbg.crash is not None:
        non_negative("debug.crash.step", dbg.crash.step)
        if not 0 <= dbg.crash.rank < max(s.num_workers, 1):
            p.append(f"`debug.crash.rank`: must be in 0..{s.num_workers - 1}, got {dbg.crash.rank}")
    return p


# ---------------------------------------------------------------------------------------------
# Public API


def from_dict(data: Any, source: str | None = None) -> TrainConfig:
    """Build and validate a config from plain data; raises one ConfigError listing every problem."""
    problems: list[str] = []
    cfg = _build_dataclass(TrainConfig, data, "", problems)
    if cfg is not None:
        problems.extend(_validate(cfg))
    if problems or cfg is None:
        raise ConfigError(problems or ["invalid config"], source=source)
    return cfg


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain, YAML- and pickle-friendly data (tuples become lists)."""

    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v) and not isinstance(v, type):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        return v

    result = plain(cfg)
    assert isinstance(result, dict)
    return result


def to_yaml(cfg: TrainConfig) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=None)


def parse_override(text: str) -> tuple[str, Any]:
    """``section.key=value`` with a YAML-parsed value (``1e-3``, ``true``, ``[4]``, ``null``)."""
    if "=" not in text:
        raise ConfigError(f"`--set {text}`: expected section.key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or key.startswith(".") or key.endswith("."):
        raise ConfigError(f"`--set {text}`: expected section.key=value")
    try:
        value = yaml_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"`--set {text}`: value is not valid YAML ({exc.__class__.__name__})") from None
    return key, value


def merge_overrides(data: dict[str, Any], overrides: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """Apply dotted-key overrides to plain config data; returns the new data and any problems."""
    import copy

    merged = copy.deepcopy(data) if data else {}
    problems: list[str] = []
    for dotted, value in overrides.items():
        parts = dotted.split(".")
        node: Any = merged
        for part in parts[:-1]:
            if not isinstance(node, dict):
                problems.append(f"`{dotted}`: `{part}` is not a section")
                break
            node = node.setdefault(part, {})
        else:
            if isinstance(node, dict):
                node[parts[-1]] = value
            else:
                problems.append(f"`{dotted}`: cannot set a key inside a non-mapping value")
    return merged, problems


def read_yaml_file(path: str | Path, what: str = "config") -> Any:
    """Parse a YAML file; a missing, unreadable or malformed file is one ConfigError naming ``what``."""
    p = Path(path)
    try:
        text = p.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{what} file not found: {p}") from None
    except IsADirectoryError:
        raise ConfigError(f"{what} path is a directory, not a file: {p}") from None
    except OSError as exc:
        raise ConfigError(f"cannot read {what} file {p}: {exc.strerror}") from None
    try:
        return yaml_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"not valid YAML{at}", source=str(p)) from None


def _read_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    data = read_yaml_file(p)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"top level must be a mapping of sections, got {type(data).__name__}", source=str(p))
    return data


def load(path: str | Path, overrides: list[str] | dict[str, Any] | None = None) -> TrainConfig:
    """Load a YAML config, apply ``--set`` style overrides, validate; one ConfigError on failure.

    An empty ``checkpoint.run_name`` becomes the config file's stem.
    """
    data = _read_yaml(path)
    problems: list[str] = []
    if isinstance(overrides, list):
        parsed: dict[str, Any] = {}
        for text in overrides:
            try:
                k, v = parse_override(text)
            except ConfigError as exc:
                problems.extend(exc.problems)
                continue
            parsed[k] = v
        overrides = parsed
    data, merge_problems = merge_overrides(data, overrides or {})
    problems.extend(merge_problems)
    try:
        cfg = from_dict(data, source=str(path))
    except ConfigError as exc:
        problems.extend(exc.problems)
        raise ConfigError(problems, source=str(path)) from None
    if problems:
        raise ConfigError(problems, source=str(path))
    if not cfg.checkpoint.run_name:
        cfg = replace(cfg, "checkpoint.run_name", Path(path).stem)
    return cfg


def replace(cfg: TrainConfig, dotted: str, value: Any) -> TrainConfig:
    """A copy of ``cfg`` with one dotted key changed (no validation; use apply_overrides for that)."""
    section, key = dotted.split(".", 1)
    return dataclasses.replace(cfg, **{section: dataclasses.replace(getattr(cfg, section), **{key: value})})


def apply_overrides(cfg: TrainConfig, overrides: dict[str, Any]) -> TrainConfig:
    """Re-validate ``cfg`` with dotted-key overrides applied (the path Tune trials use)."""
    data, problems = merge_overrides(to_dict(cfg), overrides)
    if problems:
        raise ConfigError(problems)
    return from_dict(data)


def known_keys() -> list[str]:
    """Every dotted key a config may set (for validating search spaces)."""
    keys: list[str] = []
    for section in dataclasses.fields(TrainConfig):
        section_cls = typing.get_type_hints(TrainConfig)[section.name]
        keys.extend(f"{section.name}.{f.name}" for f in dataclasses.fields(section_cls))
    return keys


def packaged_config(name: str) -> Path:
    """Path of a config shipped in ``sdf_ray/configs`` (``tiny``, ``demo``, ``deepsdf``)."""
    return Path(__file__).parent / "configs" / f"{name}.yaml"
