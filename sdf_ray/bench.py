"""``sdf-ray bench``: time the real training step side by side with the guard off and a reference-style step.

All variants run in one process on the same device and the same synthetic scenes (generated in memory:
no files), alternating in rounds so that clock or thermal drift hits every variant alike. Reported per
variant: samples/s, TFLOP/s (6 x the multiply-adds it executes per sample), milliseconds per step, peak
device memory, and ratios against the guarded step.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import re
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from sdf_ray import config as config_mod
from sdf_ray.config import TrainConfig
from sdf_ray.data.format import PackedScenes
from sdf_ray.data.sampler import SceneSampler
from sdf_ray.device_settings import resolve_for_device
from sdf_ray.dist import LocalCollectives
from sdf_ray.errors import UserError
from sdf_ray.loss import sdf_loss
from sdf_ray.model import DeepSDFDecoder, flops_per_sample
from sdf_ray.train_loop import train_step
from sdf_ray.train_state import build_state, configure_precision

# Points held per synthetic scene. The sampler draws with replacement, so a step costs the same whatever
# this is; keeping it small lets the bench hold 100,000 scenes (the 1k-vs-100k comparison) in memory.
STORED_SAMPLES_PER_SCENE = 512


def synthetic_scenes(num_scenes: int, samples_per_scene: int, seed: int = 0) -> PackedScenes:
    """Random points with a sphere SDF per scene, packed like a loaded shard (half positive)."""
    rng = np.random.default_rng(seed)
    n = max(samples_per_scene, 2)
    xyz = rng.uniform(-1, 1, size=(num_scenes, n, 3)).astype(np.float32)
    radius = rng.uniform(0.3, 0.7, size=(num_scenes, 1)).astype(np.float32)
    sdf = np.linalg.norm(xyz, axis=2) - radius
    order = np.argsort(-sdf, axis=1)  # positives first
    xyz = np.take_along_axis(xyz, order[..., None], axis=1)
    sdf = np.take_along_axis(sdf, order, axis=1)
    num_pos = (sdf > 0).sum(axis=1)
    num_pos = np.clip(num_pos, 1, n - 1)
    samples = np.concatenate([xyz, sdf[..., None]], axis=2).reshape(-1, 4)
    offsets = np.arange(num_scenes, dtype=np.int64) * n
    return PackedScenes(samples_M4=samples, pos_offset=offsets, pos_count=num_pos.astype(np.int64),
                        neg_offset=offsets + num_pos, neg_count=(n - num_pos).astype(np.int64),
                        scene_ids=np.arange(num_scenes, dtype=np.int64))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def guarded_step_fn(cfg: TrainConfig, device: torch.device, packed: PackedScenes, *,
                    code_per_sample: bool = False) -> Callable[[int], torch.Tensor]:
    """The production step (``train_step`` with the config's guard settings) fed by the device sampler."""
    state = build_state(cfg, LocalCollectives(), device, packed.num_scenes)
    sampler = SceneSampler(packed, scenes_per_step=cfg.data.scenes_per_step,
                           samples_per_scene=cfg.data.samples_per_scene, steps_per_epoch=state.steps_per_epoch,
                           seed=0, rank=0, device=device)

    def step(i: int) -> torch.Tensor:
        _, _, l1 = train_step(state, *sampler.batch(i), reg_weight=cfg.loss.code_reg_lambda,
                              code_per_sample=code_per_sample)
        return l1

    return step


def precision_check(cfg: TrainConfig, device: torch.device, *, steps: int, num_scenes: int = 64,
                    tail: int = 20) -> dict[str, float]:
    """Train fp32 eager and ``cfg``'s precision/compile from the same init on the same batches; return the
    mean L1 over the last ``tail`` steps of each, and their relative difference."""
    cfg = resolve_for_device(cfg, device)  # auto precision/compile: what would run on this device
    packed = synthetic_scenes(num_scenes, STORED_SAMPLES_PER_SCENE)
    reference = config_mod.replace(config_mod.replace(cfg, "optim.precision", "fp32"), "model.compile", False)
    fast_name = cfg.optim.precision + ("+compile" if cfg.model.compile else "")
    result: dict[str, float] = {}
    for name, c in (("fp32", reference), (fast_name, cfg)):
        configure_precision(c)
        step = guarded_step_fn(c, device, packed)
        losses = torch.stack([step(i).detach() for i in range(steps)])
        result[name] = float(losses[-tail:].mean())
    result["relative_difference"] = abs(result[fast_name] - result["fp32"]) / result["fp32"]
    return result


def reference_step_fn(cfg: TrainConfig, device: torch.device, packed: PackedScenes) -> Callable[[int], None]:
    """Like the original single-GPU trainer: fp32 eager, codes in a CPU embedding gathered on the host and
    copied over, samples drawn on the host, ``.item()`` NaN check and ``clip_grad_norm_`` every step."""
    decoder = DeepSDFDecoder(cfg.model).to(device)
    codes = torch.nn.Embedding(packed.num_scenes, cfg.model.latent_size, max_norm=1.0)
    opt = torch.optim.Adam([{"params": decoder.parameters(), "lr": cfg.optim.decoder_lr},
                            {"params": codes.parameters(), "lr": cfg.optim.latent_lr}])
    samples = torch.from_numpy(packed.samples_M4)
    pos_off, pos_cnt = torch.from_numpy(packed.pos_offset), torch.from_numpy(packed.pos_count)
    neg_off, neg_cnt = torch.from_numpy(packed.neg_offset), torch.from_numpy(packed.neg_count)
    b, s = cfg.data.scenes_per_step, cfg.data.samples_per_scene
    gen = torch.Generator().manual_seed(0)

    def step(i: int) -> None:
        scenes = torch.randint(0, packed.num_scenes, (b,), generator=gen)
        half = s // 2
        pos = pos_off[scenes, None] + (torch.rand(b, half, generator=gen) * pos_cnt[scenes, None]).long()
        neg = neg_off[scenes, None] + (torch.rand(b, half, generator=gen) * neg_cnt[scenes, None]).long()
        batch = samples[torch.cat([pos, neg], 1).reshape(-1)].to(device)
        latent_bl = codes(scenes)  # on the host, as the original trainer did
        latent_nl = latent_bl.repeat_interleave(s, 0).to(device)
        opt.zero_grad()
        pred = decoder(latent_nl, batch[:, :3])
        loss, _ = sdf_loss(pred, batch[:, 3], latent_bl.to(device), cfg.loss, cfg.loss.code_reg_lambda)
        if torch.isnan(loss).item() or torch.isinf(loss).item():  # the per-step host sync
            return
        loss.backward()
        if cfg.guard.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(decoder.parameters(), cfg.guard.grad_clip)
            torch.nn.utils.clip_grad_norm_(codes.parameters(), cfg.guard.grad_clip)
        opt.step()

    return step


@dataclasses.dataclass
class Timing:
    name: str
    seconds: list[float]
    steps_per_round: int
    samples_per_step: int
    flops_per_sample: float
    peak_bytes: int = 0

    @property
    def step_s(self) -> float:
        return float(np.median(self.seconds)) / self.steps_per_round

    @property
    def samples_per_s(self) -> float:
        return self.samples_per_step / self.step_s

    @property
    def tflops(self) -> float:
        return self.samples_per_s * self.flops_per_sample / 1e12


def time_variants(variants: dict[str, tuple[Callable[[int], Any], float]], device: torch.device, *, steps: int,
                  warmup: int, rounds: int, samples_per_step: int) -> list[Timing]:
    """Time each ``name: (step function, FLOPs per sample)``; rounds alternate between the variants."""
    timings = {name: Timing(name, [], steps, samples_per_step, flops) for name, (_, flops) in variants.items()}
    for name, (fn, _) in variants.items():
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        for i in range(warmup):
            fn(i)
        _sync(device)
        if device.type == "cuda":
            timings[name].peak_bytes = torch.cuda.max_memory_allocated(device)
    for r in range(rounds):
        for name, (fn, _) in variants.items():
            _sync(device)
            t0 = time.perf_counter()
            for i in range(steps):
                fn(warmup + r * steps + i)
            _sync(device)
            timings[name].seconds.append(time.perf_counter() - t0)
    return list(timings.values())


def format_table(timings: list[Timing], baseline: str) -> str:
    base = next(t for t in timings if t.name == baseline)
    lines = [f"{'variant':<40} {'samples/s':>12} {'TFLOP/s':>8} {'ms/step':>8} {'vs guarded':>10} {'peak MiB':>9}"]
    for t in timings:
        lines.append(f"{t.name:<40} {t.samples_per_s:>12,.0f} {t.tflops:>8.2f} {1000 * t.step_s:>8.2f} "
                     f"{t.samples_per_s / base.samples_per_s:>10.3f} {t.peak_bytes / 2**20:>9.0f}")
    return "\n".join(lines)


_GEMM_KERNEL = re.compile(r"gemm|nvjet|cutlass|xmma|matmul", re.IGNORECASE)


def kernel_profile(step: Callable[[int], Any], device: torch.device, *, steps: int, first_step: int,
                   top: int = 15) -> str:
    """Profile ``steps`` calls of ``step``: device time per step by kernel, and matmul against the rest."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    if device.type != "cuda":
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for i in range(steps):
                step(first_step + i)
        return str(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top))
    _sync(device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for i in range(steps):
            step(first_step + i)
        _sync(device)
    per_kernel: dict[str, list[float]] = {}
    for event in prof.events():
        if event.device_type == DeviceType.CUDA:
            entry = per_kernel.setdefault(event.name, [0.0, 0])
            entry[0] += event.time_range.elapsed_us() / 1000 / steps
            entry[1] += 1 / steps
    total = sum(ms for ms, _ in per_kernel.values())
    gemm = sum(ms for name, (ms, _) in per_kernel.items() if _GEMM_KERNEL.search(name))
    lines = [f"device time per step: {total:.2f} ms in {sum(n for _, n in per_kernel.values()):.0f} kernels; "
             f"matmul {gemm:.2f} ms ({100 * gemm / total:.0f} %), everything else {total - gemm:.2f} ms",
             f"{'ms/step':>8} {'share':>6} {'calls':>5}  kernel"]
    for name, (ms, calls) in sorted(per_kernel.items(), key=lambda kv: -kv[1][0])[:top]:
        lines.append(f"{ms:>8.3f} {100 * ms / total:>5.1f}% {calls:>5.0f}  {name[:110]}")
    return "\n".join(lines)


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available here")
    return torch.device(name)


def run_bench(cfg: TrainConfig, device: torch.device, *, num_scenes: int, steps: int, warmup: int, rounds: int,
              reference: bool = True, variants_too: bool = True) -> list[Timing]:
    configure_precision(cfg)
    packed = synthetic_scenes(num_scenes, STORED_SAMPLES_PER_SCENE)
    no_guard = config_mod.replace(config_mod.replace(cfg, "guard.enabled", False), "guard.grad_clip", 0.0)
    flops = flops_per_sample(cfg.model, cfg.data.samples_per_scene)
    flops_unfactorised = flops_per_sample(cfg.model, 1)
    variants: dict[str, tuple[Callable[[int], Any], float]] = {
        "guarded (sdf-ray step)": (guarded_step_fn(cfg, device, packed), flops),
        "guard off": (guarded_step_fn(no_guard, device, packed), flops),
    }
    if variants_too:
        variants["guarded, a code per sample"] = (
            guarded_step_fn(cfg, device, packed, code_per_sample=True), flops_unfactorised)
    if reference:
        ref_cfg = config_mod.replace(config_mod.replace(cfg, "optim.precision", "fp32"), "model.compile", False)
        variants["reference (fp32, .item(), host codes)"] = (
            reference_step_fn(ref_cfg, device, packed), flops_unfactorised)
    samples_per_step = cfg.data.scenes_per_step * cfg.data.samples_per_scene
    return time_variants(variants, device, steps=steps, warmup=warmup, rounds=rounds,
                         samples_per_step=samples_per_step)


def cmd_bench(args: argparse.Namespace) -> int:
    cfg = config_mod.load(args.config, args.overrides)
    for name in ("num_scenes", "steps", "rounds"):
        _positive(f"--{name.replace('_', '-')}", getattr(args, name))
    if args.warmup < 0:
        raise UserError(f"--warmup must be >= 0, got {args.warmup}")
    if args.profile < 0:
        raise UserError(f"--profile must be a number of steps >= 0, got {args.profile}")
    if args.precision_check < 0:
        raise UserError(f"--precision-check must be a number of steps >= 0, got {args.precision_check}")
    device = _device(args.device)
    cfg = resolve_for_device(cfg, device)  # auto precision/compile for the device benchmarked
    if args.precision_check:
        result = precision_check(cfg, device, steps=args.precision_check)
        print("precision check, mean L1 of the last 20 of", args.precision_check, "steps on the same batches: "
              + ", ".join(f"{k} {v:.5g}" for k, v in result.items()))
        return 0
    print(f"sdf-ray bench: {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}), "
          f"precision {cfg.optim.precision}, compile {cfg.model.compile} ({cfg.model.compile_mode}), "
          f"{cfg.data.scenes_per_step} scenes x {cfg.data.samples_per_scene} samples/step, "
          f"{args.num_scenes} scenes, {flops_per_sample(cfg.model, cfg.data.samples_per_scene) / 1e6:.2f} MFLOP/sample executed", flush=True)
    if args.profile:
        configure_precision(cfg)
        step = guarded_step_fn(cfg, device, synthetic_scenes(args.num_scenes, STORED_SAMPLES_PER_SCENE))
        for i in range(args.warmup):
            step(i)
        print(f"profile of the guarded step over {args.profile} steps")
        print(kernel_profile(step, device, steps=args.profile, first_step=args.warmup))
        return 0
    timings = run_bench(cfg, device, num_scenes=args.num_scenes, steps=args.steps, warmup=args.warmup,
                        rounds=args.rounds, reference=not args.skip_reference)
    print(format_table(timings, "guarded (sdf-ray step)"))
    guarded, off = timings[0], timings[1]
    overhead = off.samples_per_s / guarded.samples_per_s - 1
    print(f"guard overhead: {100 * overhead:+.2f} % (guard off / guarded - 1)")
    if args.sweep:
        print("\nsweep (guarded step): cost against work per step and number of scenes")
        print(f"{'scenes/step':>11} {'samples/scene':>13} {'num scenes':>10} {'samples/s':>12} {'ms/step':>8}")
        sps = cfg.data.samples_per_scene
        for samples_per_scene in args.sweep_samples or sorted({max(2, sps // 4), sps, sps * 4}):
            for num_scenes in args.sweep_scenes:
                c = config_mod.replace(cfg, "data.samples_per_scene", samples_per_scene)
                t = run_bench(c, device, num_scenes=num_scenes, steps=args.steps, warmup=args.warmup,
                              rounds=args.rounds, reference=False, variants_too=False)[0]
                print(f"{c.data.scenes_per_step:>11} {samples_per_scene:>13} {num_scenes:>10} "
                      f"{t.samples_per_s:>12,.0f} {1000 * t.step_s:>8.2f}", flush=True)
    return 0


def _positive(name: str, value: int) -> None:
    if value <= 0 or not math.isfinite(value):
        raise UserError(f"{name} must be a positive integer, got {value}")
