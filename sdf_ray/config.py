"""The training config: typed sections, strict loading, ``--set`` overrides, validation.

Each section is a ``@dataclass(frozen=True, kw_only=True)`` with a docstring under every field, ``Literal`` types
for choices and its ranges in the field types (``PositiveInt``, ``Annotated[float, Interval(0, 1, "[)")]``);
problems that involve several fields sit in a section's ``validate``. Loading goes through the one structurer
(:mod:`sdf_ray.structure`), so every unknown key, wrong type and out-of-range value is collected and raised
together as one ``ConfigError``. YAML and ``--set`` parsing live in :mod:`sdf_ray.config_files`; the same
:func:`apply_overrides` path serves the CLI's ``--set section.key=value`` and Ray Tune's sampled parameters.

A new section: define its frozen dataclass (here or in its own module), add a field to :class:`TrainConfig`,
and ``structure(Section, data)`` builds it alone when a command needs only that section.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from sdf_ray.config_files import (
    merge_overrides,
    parse_override,
    parse_overrides,
    read_yaml_file,
    read_yaml_sections,
    to_dict,
    to_yaml,
    yaml_load,
)
from sdf_ray.errors import ConfigError
from sdf_ray.structure import (
    Gt,
    Interval,
    NonEmpty,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    Rule,
    structure,
)

__all__ = [
    "CheckpointConfig", "CrashConfig", "DataConfig", "DebugConfig", "GuardConfig", "InjectConfig", "LoggingConfig",
    "LossConfig", "ModelConfig", "OptimConfig", "ScalingConfig", "TrainConfig",
    "apply_overrides", "from_dict", "known_keys", "load", "merge_overrides", "packaged_config", "parse_override",
    "read_yaml_file", "replace", "to_dict", "to_yaml", "yaml_load",
]

Precision = Literal["fp32", "tf32", "bf16"]
Schedule = Literal["step", "warmup", "constant"]
InjectSite = Literal["loss", "grad", "latent"]
InjectValue = Literal["nan", "inf"]
CompileMode = Literal["default", "max-autotune-no-cudagraphs", "reduce-overhead"]
PlacementStrategy = Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"]
Beta = Annotated[float, Interval(0, 1, "[)")]


def _even(n: int) -> bool:
    return n % 2 == 0


def _plain_name(name: str) -> bool:
    return not name or (name not in (".", "..") and "/" not in name)


# ---------------------------------------------------------------------------------------------
# Sections


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    latent_size: PositiveInt = 256
    """Length L of each scene's latent code."""
    hidden_dim: PositiveInt = 512
    """Width of every hidden layer."""
    num_layers: PositiveInt = 8
    """Number of hidden layers (each with weight norm, ReLU and dropout)."""
    latent_in_layers: tuple[int, ...] = (4,)
    """Hidden layers whose input re-concatenates [latent, xyz] (the skip connection)."""
    dropout: Annotated[float, Interval(0, 1, "[)")] = 0.2
    """Dropout probability after every hidden layer (0 disables)."""
    weight_norm: bool = True
    """Weight normalisation on every hidden layer, as in the DeepSDF reference."""
    output_tanh: bool = True
    """Squash the output with tanh."""
    pad_features_to: NonNegativeInt = 8
    """Pad the odd width of the layer before a skip (253 = 512 - 259) to a multiple of this in forward, with
    zeros: same parameters and outputs, aligned bf16 GEMMs. 0 disables."""
    compile: Literal["auto", True, False] = "auto"
    """Compile the decoder with torch.compile (the GPU fast path); auto: on CUDA devices, not on CPUs (resolved on
    the worker). The default since docs/fidelity.md found no held-out accuracy lost to bf16 + compile."""
    compile_cacheable: Literal["auto", True, False] = "auto"
    """Compile training into graphs that AOTAutograd's cache stores (plain ops): a warm-cache start then skips
    tracing and partitioning the joint graph again (first step 6.0 -> 2.2 s on an H200), but the step runs about
    3 % slower (31.4 against 30.5 ms at 1,048,576 samples; docs/performance.md). false: the faster step (a custom
    autograd.Function in the dropout, which the cache refuses). auto: cacheable for runs of fewer than 4e9 samples
    (about 4,000 steps of deepsdf.yaml), where the start-up saved outweighs the slower steps."""
    compile_mode: CompileMode = "default"
    """torch.compile mode: default, or max-autotune-no-cudagraphs (Triton GEMMs with fused epilogues; slow
    to compile), or reduce-overhead (CUDA graphs)."""

    def validate(self) -> Iterator[tuple[str, str]]:
        for name in ("compile", "compile_cacheable"):
            value = getattr(self, name)
            if not isinstance(value, bool) and value != "auto":  # 1 == True passes the Literal check
                yield name, f"expected true, false or 'auto', got {value!r}"
        for i, layer in enumerate(self.latent_in_layers):
            if not 0 < layer < self.num_layers:
                yield f"latent_in_layers[{i}]", f"must be in 1..{self.num_layers - 1}, got {layer}"
            elif self.hidden_dim <= self.latent_size + 3:
                yield "hidden_dim", "must exceed latent_size + 3 when latent_in_layers is used"


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    path: Annotated[str, NonEmpty("must name a dataset directory")] = "data/demo"
    """Dataset directory (Parquet files + manifest.json); relative paths resolve from the CWD."""
    scenes_per_step: PositiveInt = 64
    """Global number of scenes per optimizer step, split evenly across workers."""
    samples_per_scene: Annotated[int, Gt(0), Rule(_even, "must be even (half positive, half negative)")] = 16384
    """SDF samples drawn per scene per step: half with sdf > 0, half with sdf <= 0 (must be even)."""
    seed: int = 0
    """Seed for scene order, point sampling, latent init and dropout."""


@dataclass(frozen=True, kw_only=True)
class LossConfig:
    clamp_dist: PositiveFloat = 0.1
    """delta: predictions and targets are clamped to [-delta, delta] before the L1."""
    code_reg_lambda: NonNegativeFloat = 1e-4
    """Weight of the latent-norm regulariser (0 disables)."""
    code_reg_ramp_epochs: NonNegativeInt = 100
    """The regulariser ramps linearly from 0 to full weight over this many epochs."""


@dataclass(frozen=True, kw_only=True)
class OptimConfig:
    num_epochs: PositiveInt = 2000
    """Training length; one epoch visits every scene once."""
    decoder_lr: PositiveFloat = 5e-4
    """Adam learning rate of the decoder."""
    latent_lr: PositiveFloat = 1e-3
    """Adam learning rate of the latent codes."""
    schedule: Schedule = "step"
    """Learning-rate schedule applied to both parameter groups."""
    lr_step_every_n_epochs: PositiveInt = 500
    """step: multiply the learning rates by lr_step_factor every this many epochs."""
    lr_step_factor: PositiveFloat = 0.5
    """step: the multiplier."""
    warmup_epochs: NonNegativeInt = 0
    """warmup: linear ramp from 0 over this many epochs, then the step schedule."""
    betas: tuple[Beta, Beta] = (0.9, 0.999)
    """Adam betas."""
    eps: PositiveFloat = 1e-8
    """Adam epsilon."""
    precision: Literal["auto", "fp32", "tf32", "bf16"] = "auto"
    """fp32, tf32 (TF32 matmuls on Ampere+), bf16 (autocast; weights and Adam stay fp32), or auto: bf16 on CUDA
    devices with native bf16 (compute capability 8.0+), fp32 elsewhere (resolved on the worker). auto is the
    default since docs/fidelity.md found no held-out accuracy lost to bf16 + compile beyond seed noise."""

    def validate(self) -> Iterator[tuple[str, str]]:
        if self.schedule == "warmup" and self.warmup_epochs == 0:
            yield "warmup_epochs", "must be > 0 when optim.schedule is 'warmup'"


@dataclass(frozen=True, kw_only=True)
class GuardConfig:
    enabled: bool = True
    """The whole guard: global norm, clipping, the non-finite vote and skipping (off: plain DDP steps)."""
    grad_clip: NonNegativeFloat = 1.0
    """Clip the global gradient norm (decoder + latents, after the all-reduce) to this; 0 disables."""
    max_consecutive_skips: PositiveInt = 20
    """Roll back when this many steps in a row were skipped."""
    max_skip_fraction: Annotated[float, Interval(0, 1, "(]")] = 0.25
    """Roll back when more than this fraction of the last skip_window_steps steps were skipped."""
    skip_window_steps: PositiveInt = 200
    """Window for max_skip_fraction."""
    max_rollbacks: NonNegativeInt = 3
    """Rollbacks allowed before the run is stopped as diverged."""

    def validate(self) -> Iterator[tuple[str, str]]:
        if not self.enabled and self.grad_clip > 0:
            yield "grad_clip", ("clipping uses the guard's all-reduced global norm; set guard.grad_clip=0 when "
                                "guard.enabled is false")


@dataclass(frozen=True, kw_only=True)
class CheckpointConfig:
    storage_path: Annotated[str, NonEmpty()] = "runs"
    """Where runs live: a local directory, or a shared path (NFS) for multi-node clusters."""
    run_name: Annotated[str, Rule(_plain_name, "must be a plain name")] = ""
    """Run name; the run directory is <storage_path>/<run_name>. Empty: the config file's stem."""
    every_n_epochs: PositiveInt = 10
    """Checkpoint cadence in epochs (the last epoch is always checkpointed)."""
    num_to_keep: PositiveInt = 2
    """Checkpoints kept on storage."""


@dataclass(frozen=True, kw_only=True)
class ScalingConfig:
    num_workers: PositiveInt = 2
    """Ray Train workers (one per GPU when use_gpu)."""
    use_gpu: bool = False
    """Train on GPUs with NCCL; otherwise CPUs with gloo."""
    cpus_per_worker: PositiveFloat = 1.0
    """CPUs reserved per worker."""
    placement_strategy: PlacementStrategy = "PACK"
    """How workers are placed on nodes (STRICT_SPREAD forces one worker per node)."""
    max_failures: NonNegativeInt = 2
    """Worker-group restarts from the latest checkpoint before the run is failed."""
    gpus_per_worker: PositiveFloat = 1.0
    """GPUs each worker holds with use_gpu: 1, or a fraction 1/n (0.5, 0.25, ...) that packs n single-worker
    runs, such as the trials of a Tune sweep, on one GPU."""
    gpu_memory_per_worker_gib: NonNegativeFloat = 0.0
    """Expected peak GPU memory of one worker in GiB (a previous run's ``perf/peak_gpu_memory_gib`` plus about
    1 GiB of CUDA context); a sweep refuses to pack more workers on one GPU than its memory holds. 0: unchecked."""

    def validate(self) -> Iterator[tuple[str, str]]:
        share = self.gpus_per_worker
        if share == 1.0:
            return
        per_gpu = 1 / share if share > 0 else 0.0
        if not self.use_gpu:
            yield "gpus_per_worker", f"applies only with scaling.use_gpu: true, got {share:g}"
        elif share > 1:
            yield "gpus_per_worker", f"a worker uses one GPU: must be 1 or a fraction 1/n, got {share:g}"
        elif abs(per_gpu - round(per_gpu)) > 0.01:
            yield "gpus_per_worker", (f"{share:g} does not split a GPU evenly (1/{per_gpu:.3g} workers per GPU): "
                                      f"use 1/n, e.g. 0.5, 0.25, 0.2, 0.125")
        elif self.num_workers > 1:
            yield "gpus_per_worker", (f"a fraction ({share:g}) is for single-worker runs (packed Tune trials): with "
                                      f"num_workers={self.num_workers}, two ranks could share one GPU, which NCCL "
                                      f"refuses")


@dataclass(frozen=True, kw_only=True)
class LoggingConfig:
    every_n_steps: PositiveInt = 10
    """Metrics cadence: one all-reduce, one host sync, one metrics line and one Ray report."""
    tensorboard: bool = True
    """Write TensorBoard event files into the run directory."""
    level: Literal["DEBUG", "INFO", "WARNING"] = "INFO"
    """Log level of sdf-ray's own messages."""


@dataclass(frozen=True, kw_only=True)
class InjectConfig:
    step: NonNegativeInt
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
    step: NonNegativeInt
    """Global step at which the worker process exits abruptly (once per run)."""
    rank: int = 0
    """Rank of the worker that dies."""


@dataclass(frozen=True, kw_only=True)
class DebugConfig:
    inject: tuple[InjectConfig, ...] = ()
    """Non-finite values to inject, to prove the guard works."""
    crash: CrashConfig | None = None
    """Kill one worker once, to prove recovery from checkpoints."""


def _mesh_resolution(n: int) -> bool:
    return n == 0 or 8 <= n <= 1024


@dataclass(frozen=True, kw_only=True)
class ValidationConfig:
    path: str = ""
    """Held-out dataset directory (scenes the run never trains on); empty: no validation."""
    every_n_epochs: PositiveInt = 10
    """Validate every this many epochs, and at the end of the run."""
    num_scenes: PositiveInt = 8
    """Held-out scenes reconstructed per pass (the dataset's first ones, sharded over the workers)."""
    num_iterations: Annotated[int, Interval(1, 100_000)] = 200
    """Adam steps of each held-out code per pass (a full reconstruction uses 800)."""
    samples_per_iteration: Annotated[int, Gt(0), Rule(_even, "must be even (half positive, half negative)")] = 4000
    """SDF samples per held-out scene per step."""
    mesh_resolution: Annotated[int, Rule(_mesh_resolution, "must be 0 (no meshes) or in 8..1024")] = 0
    """N of the N^3 grid the held-out shapes are meshed on for val/chamfer_l2; 0: no meshes, val/sdf_l1 only."""
    num_metric_points: PositiveInt = 30_000
    """Points sampled on each mesh for the Chamfer distance (DeepSDF: 30,000)."""
    seed: NonNegativeInt = 0
    """Seed of the held-out codes' init and sample streams (the same every pass: passes are comparable)."""


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
    validation: ValidationConfig = field(default_factory=ValidationConfig)

    def validate(self) -> Iterator[tuple[str, str]]:
        """Problems between sections."""
        d, s = self.data, self.scaling
        if d.scenes_per_step > 0 and s.num_workers > 0 and d.scenes_per_step % s.num_workers:
            yield "data.scenes_per_step", (f"{d.scenes_per_step} does not split evenly over "
                                           f"scaling.num_workers={s.num_workers}")
        ranks = f"must be in 0..{s.num_workers - 1}"
        for i, inj in enumerate(self.debug.inject):
            if not 0 <= inj.rank < max(s.num_workers, 1):
                yield f"debug.inject[{i}].rank", f"{ranks}, got {inj.rank}"
        if self.debug.crash is not None and not 0 <= self.debug.crash.rank < max(s.num_workers, 1):
            yield "debug.crash.rank", f"{ranks}, got {self.debug.crash.rank}"


# ---------------------------------------------------------------------------------------------
# Loading and overrides


def from_dict(data: Any, source: str | None = None) -> TrainConfig:
    """Build and validate a config from plain data; raises one ConfigError listing every problem."""
    return structure(TrainConfig, data, source=source)


def load(path: str | Path, overrides: list[str] | dict[str, Any] | None = None) -> TrainConfig:
    """Load a YAML config, apply ``--set`` style overrides, validate; one ConfigError on failure.

    An empty ``checkpoint.run_name`` becomes the config file's stem.
    """
    data = read_yaml_sections(path)
    problems: list[str] = []
    if isinstance(overrides, list):
        overrides = parse_overrides(overrides, problems)
    data, merge_problems = merge_overrides(data, overrides or {})
    problems.extend(merge_problems)
    try:
        cfg = from_dict(data, source=str(path))
    except ConfigError as exc:
        raise ConfigError(problems + exc.problems, source=str(path)) from None
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
