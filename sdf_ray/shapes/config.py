"""The ``reconstruct`` config section: every knob of code optimisation, meshing, metrics and distribution.

Defaults are DeepSDF's ``reconstruct.py`` / ``evaluate.py`` (800 iterations of 8,000 samples, Adam at 5e-3
divided by 10 halfway, codes from N(0, 0.01^2), 1e-4 * mean(z^2), a 256^3 grid, 30,000 metric points).
Ranges sit in the field types and cross-field checks in ``validate``; :func:`from_dict` / :func:`from_overrides`
go through the shared structurer (:mod:`sdf_ray.structure`), so every problem is reported at once, named by its
``reconstruct.KEY`` path (what ``--set`` takes).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from sdf_ray.config import CompileMode
from sdf_ray.errors import ConfigError
from sdf_ray.shapes.meshing import GridSpec
from sdf_ray.structure import Ge, Gt, Interval, NonNegativeInt, PositiveFloat, PositiveInt, Rule, convert

SECTION = "reconstruct"
Precision = Literal["auto", "fp32", "tf32", "bf16"]
Device = Literal["auto", "cuda", "cpu"]
MAX_RESOLUTION = 1024
MIN_RESOLUTION = 8
MAX_ITERATIONS = 100_000
Beta = Annotated[float, Interval(0, 1, "[)")]


def _even(n: int) -> bool:
    return n % 2 == 0


@dataclass(frozen=True, kw_only=True)
class ReconstructConfig:
    num_iterations: Annotated[int, Interval(1, MAX_ITERATIONS)] = 800
    """Adam steps per shape (the reference: 800)."""
    samples_per_iteration: Annotated[int, Gt(0), Rule(_even, "must be even (half positive, half negative)")] = 8000
    """SDF samples drawn per shape per step, resampled every step: half with sdf > 0, half with sdf <= 0."""
    lr: PositiveFloat = 5e-3
    """Initial Adam learning rate of the codes."""
    lr_step_fraction: Annotated[float, Interval(0, 1, "(]")] = 0.5
    """The rate is divided by ``lr_step_divisor`` every ``int(num_iterations * lr_step_fraction)`` steps (the
    reference: once, halfway)."""
    lr_step_divisor: Annotated[float, Ge(1)] = 10.0
    """See ``lr_step_fraction``."""
    betas: tuple[Beta, Beta] = (0.9, 0.999)
    """Adam betas."""
    eps: PositiveFloat = 1e-8
    """Adam epsilon."""
    init_std: Annotated[float, Ge(0)] = 0.01
    """Codes start from N(0, init_std^2) per entry."""
    code_reg_lambda: Annotated[float, Ge(0)] = 1e-4
    """Weight of mean(z^2) in each shape's loss (0 disables)."""
    clamp_dist: PositiveFloat | None = None
    """Clamp distance of the L1 loss; null: the run's ``loss.clamp_dist``."""
    max_retries: NonNegativeInt = 1
    """A shape whose loss or gradient turns non-finite restarts from a fresh code this many times, then fails."""
    precision: Precision = "auto"
    """fp32, tf32 (TF32 matmuls), or bf16 (bf16 GEMMs with fp32 accumulation; codes and Adam stay fp32) for
    optimising and decoding;
    auto: bf16 on CUDA devices with native bf16, fp32 elsewhere (docs/fidelity.md: bf16 moves the held-out
    Chamfer by 0.3 %, far below seed noise)."""
    compile: Literal["auto", True, False] = "auto"
    """Compile (torch.compile) the optimisation's iteration (with ``code_gradient: autograd``, the decoder) and the
    grid decoding; auto: on CUDA devices,
    not on CPUs. Batches are padded to ``shapes_per_batch`` and decoding chunks to fixed sizes, so each
    actor compiles once per graph, not once per batch size."""
    compile_mode: CompileMode = "default"
    """torch.compile mode: default, max-autotune-no-cudagraphs (Triton GEMMs with fused epilogues; minutes of
    autotuning on first use, cached under the run's storage path) or reduce-overhead (CUDA graphs)."""
    code_gradient: Literal["hand-written", "autograd"] = "hand-written"
    """How an iteration's code gradient is computed: hand-written (the decoder's weights materialised once in the
    precision's dtype, fused bias + ReLU GEMMs, the backward to the codes written out:
    ``sdf_ray.shapes.frozen_decoder``; 0.87 of autograd's step time on an H200) or autograd through the decoder
    module (the reference the hand-written one is tested against). Decoding (meshes, ``sdf_l1``, also in ``mesh``)
    goes through the same module: in bf16 the hand-written one sums the input layers' terms in fp32, so values
    differ from the module's at bf16 rounding. Validation during training (``val/*``) takes the same path, eager."""
    shapes_per_batch: PositiveInt = 64
    """Shapes optimised together in one device step (independent codes: a batch equals separate runs)."""
    seed: NonNegativeInt = 0
    """Seed of the code init and of each shape's sample stream (per shape: batching changes nothing)."""
    mesh_resolution: Annotated[int, Interval(MIN_RESOLUTION, MAX_RESOLUTION)] = 256
    """N: the SDF is decoded on an N^3 grid over [-1, 1]^3 (the reference: 256)."""
    mesh_coarse_stride: PositiveInt = 8
    """Fine cells per coarse block along an axis: the coarse grid decodes every this-many fine points; blocks
    near the surface are halved level by level while the size is even and above 2 (8 -> 4 -> 2), and the
    2-cell blocks the surface crosses are decoded at full resolution (1: dense decoding). At N = 256 a trained
    decoder decodes about 1.3 M of the 16.8 M points per shape (the summary's ``grid`` line), most of them at the
    middle levels. A stride at or above the resolution is one block over the whole grid (valid, just not sparse
    at the top level)."""
    mesh_refine_margin: Annotated[float, Ge(1)] = 2.0
    """A block (at any level but the last, see ``mesh_follow_surface``) is refined when its corners change sign or
    one has |sdf| below this many block half-diagonals. 1 suffices for a true distance function; a decoder only
    approximates one (it is trained on clamped targets), hence the default of 2."""
    mesh_follow_surface: bool = True
    """The last level (2-cell blocks) decodes the blocks whose corners change sign, then follows the surface: a
    block face whose decoded points change sign brings in the block beyond it, until the surface leaves the
    decoded blocks nowhere. Every marching-cubes surface that passes through such a block is then exactly the
    dense one, however flat or steep the decoder's field. Only a part that nowhere changes sign between the
    2-cell blocks' corners and touches no larger part (thinner than 2 cells all over) can be missed. At 256^3 a
    trained decoder (docs/performance.md, session 13) decodes 1.27 M points per shape instead of 4.28 M with the
    margin at the last level, in 0.42 of the time, with the same meshes; a sphere 0.63 M instead of 1.14 M. false:
    the last level refines by the margin too."""
    points_per_forward: Annotated[int, Ge(1024)] = 262_144
    """Grid points per decoder call (bounds device memory while decoding)."""
    fscore_tau: PositiveFloat = 0.01
    """F-score threshold, in the NORMALISED frame (the unit-sphere frame the decoder works in); distances
    measured in the ground truth's frame are multiplied by the normalisation scale before the comparison."""
    num_metric_points: PositiveInt = 30_000
    """Points sampled on the reconstructed mesh (area-weighted) for the metrics (the reference: 30,000)."""
    metric_seed: NonNegativeInt = 0
    """Seed of the surface sampling for the metrics."""
    write_original_frame: bool = True
    """Also write each mesh in the original frame (``meshes_original/``) when the dataset has a normalisation."""
    device: Device = "auto"
    """Optimiser actors on GPUs (cuda), on CPUs, or auto: GPUs when the cluster has any."""
    num_workers: NonNegativeInt = 0
    """Optimiser actors; 0: one per GPU of the cluster, or half its CPUs (at least 1) without GPUs."""
    batches_in_flight: Annotated[int, Interval(0, 4)] = 0
    """Batches an optimiser actor works on at once (threads of one actor, each on a CUDA stream of its own;
    their optimisations take turns); 0: 2 on GPUs, 1 on CPUs. With 2, one batch loads its samples, decodes
    its grids and hands them to Ray while the other optimises (on an H200: 0.177 s per shape in steady state
    against 0.199 with 1, docs/performance.md). 3 lets a third batch load and wait while one finishes and one
    optimises (for a batch slower to finish than the next one's optimisation; not measured to be faster). On
    CPUs a second batch would only compete for the same cores, and with ``compile_mode: reduce-overhead`` each
    thread would record CUDA graphs of its own: auto is 1 there. Each batch in flight holds its own device
    memory (2.6 GiB at 64 shapes of the reference decoder)."""
    cpus_per_worker: Annotated[float, Ge(0)] = 1.0
    """CPUs reserved per optimiser actor."""
    cpus_per_mesh_task: PositiveFloat = 1.0
    """CPUs reserved per meshing/metrics task (marching cubes, metrics, writing)."""
    max_pending_shapes: NonNegativeInt = 0
    """Shapes decoded but not yet meshed, at most (bounds the object store); 0: 4 per meshing slot, at
    least one batch more than the actors have in flight."""

    def validate(self) -> Iterator[tuple[str, str]]:
        """Problems between fields (the structurer runs this once the section is built)."""
        if not isinstance(self.compile, bool) and self.compile != "auto":  # 1 == True passes the Literal check
            yield "compile", f"expected true, false or 'auto', got {self.compile!r}"

    def grid_spec(self, decoder_clamp: float = math.inf, resolution: int | None = None) -> GridSpec:
        """The meshing grid of these settings (at ``resolution``, default ``mesh_resolution``) for a decoder trained
        on targets clamped at ``decoder_clamp``, beyond which its values only say "far" (:attr:`GridSpec.far`)."""
        return GridSpec(resolution or self.mesh_resolution, self.mesh_coarse_stride, self.mesh_refine_margin,
                        self.mesh_follow_surface, decoder_clamp)


def lr_at(cfg: ReconstructConfig, iteration: int) -> float:
    """The reference's schedule: ``lr / divisor ** (iteration // int(num_iterations * fraction))``."""
    every = max(1, int(cfg.num_iterations * cfg.lr_step_fraction))
    return cfg.lr / cfg.lr_step_divisor ** (iteration // every)


# --------------------------------------------------------------------------------------------------
# Loading


def from_dict(data: Any) -> ReconstructConfig:
    """A validated section from plain data (``{"num_iterations": 100, ...}``); one ConfigError lists every problem."""
    problems: list[str] = []
    cfg = convert(ReconstructConfig, data, problems, SECTION)
    if problems or cfg is None:
        raise ConfigError(problems or ["invalid reconstruct settings"])
    assert isinstance(cfg, ReconstructConfig)
    return cfg


def from_overrides(overrides: list[str]) -> ReconstructConfig:
    """``["reconstruct.num_iterations=100", ...]`` (``--set``) -> a validated section."""
    from sdf_ray.config_files import parse_overrides

    data: dict[str, Any] = {}
    problems: list[str] = []
    for key, value in parse_overrides(overrides, problems).items():
        section, _, name = key.partition(".")
        if section != SECTION or not name or "." in name:
            problems.append(f"`--set {key}=...`: only `{SECTION}.KEY=VALUE` can be set here")
            continue
        data[name] = value
    try:
        cfg = from_dict(data)
    except ConfigError as exc:
        problems.extend(exc.problems)
    if problems:
        raise ConfigError(problems)
    return cfg


def to_dict(cfg: ReconstructConfig) -> dict[str, Any]:
    """Plain, JSON-friendly data (tuples become lists)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(cfg).items()}
