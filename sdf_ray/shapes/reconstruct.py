"""Reconstruction: optimise one latent code per shape with the decoder frozen (DeepSDF's ``reconstruct.py``),
many shapes at once.

B codes form one ``[B, L]`` tensor and one hand-written Adam whose state is per row. Each shape's loss is its
own clamped L1 plus ``lambda * mean(z^2)``; the step uses the gradient of the SUM of the per-shape losses, so
row b's gradient is exactly the gradient of shape b's loss: a batch equals B separate runs. The per-shape loss
vector is kept for the same reason the training guard keeps a vote: a non-finite loss or gradient in one shape
freezes that row (code and Adam moments untouched, ``torch.where`` and not a multiply, since 0 x NaN = NaN)
while the others step on. A frozen shape is retried from a fresh code, then reported failed with the reason.

Randomness never depends on the batch: each shape's initial code comes from a generator seeded by
``(seed, scene id, attempt)``, and its samples at iteration ``e`` are a counter-based hash of
``(that key, e, sample index)``, computed on the device for all shapes in one kernel chain.

Sampling differs from the reference in one detail: rows are drawn uniformly with replacement, where the
reference takes a random contiguous window of each sign's rows (random only because its files are shuffled).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from sdf_ray.data.sampler import mix_seed
from sdf_ray.shapes.config import ReconstructConfig, lr_at
from sdf_ray.shapes.samples import ShapeSamples

_TAG_INIT = 0x494E4954  # "INIT"
_TAG_SAMPLES = 0x53414D50  # "SAMP"
_MASK63 = (1 << 63) - 1


def _signed64(x: int) -> int:
    return x - (1 << 64) if x >= 1 << 63 else x


_GOLDEN = _signed64(0x9E3779B97F4A7C15)
_MIX1 = _signed64(0xBF58476D1CE4E5B9)
_MIX2 = _signed64(0x94D049BB133111EB)


def _shr(x: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's ``>>`` is arithmetic)."""
    return (x >> k) & ((1 << (64 - k)) - 1)


def _splitmix64(x: torch.Tensor) -> torch.Tensor:
    """Elementwise splitmix64 finaliser on int64 (multiplication wraps mod 2^64)."""
    x = x + _GOLDEN
    x = (x ^ _shr(x, 30)) * _MIX1
    x = (x ^ _shr(x, 27)) * _MIX2
    return x ^ _shr(x, 31)


@contextlib.contextmanager
def precision_context(precision: str, device: torch.device) -> Iterator[None]:
    """fp32; tf32 (TF32 matmuls, restored afterwards); bf16 (autocast, parameters stay fp32)."""
    if precision == "bf16":
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
            yield
    elif precision == "tf32" and device.type == "cuda":
        previous = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = True
        try:
            yield
        finally:
            torch.backends.cuda.matmul.allow_tf32 = previous
    else:
        yield


def decoding_context(decoder: nn.Module, precision: str, device: torch.device) -> Any:
    """:func:`precision_context` for running ``decoder`` (compiled or not), except that a :class:`FrozenDecoder`
    computes in its own dtypes: bf16 autocast around it would only be switched off again inside its graph."""
    from sdf_ray.shapes.frozen_decoder import FrozenDecoder

    if precision == "bf16" and isinstance(getattr(decoder, "_orig_mod", decoder), FrozenDecoder):
        return contextlib.nullcontext()
    return precision_context(precision, device)


def freeze(decoder: nn.Module) -> nn.Module:
    """Eval mode (no dropout) and no parameter gradients: reconstruction never touches the decoder."""
    decoder.eval()
    for p in decoder.parameters():
        p.requires_grad_(False)
    return decoder


@dataclass
class SampleBank:
    """Samples of several shapes on one device: each shape's positive rows, then its negative rows."""

    samples_M4: torch.Tensor
    pos_offset_B: torch.Tensor
    pos_count_B: torch.Tensor
    neg_offset_B: torch.Tensor
    neg_count_B: torch.Tensor
    scene_ids: list[int]
    sign_counts: list[tuple[int, int]]
    """Per shape (positive rows, negative rows), on the host: reading them never waits for the device."""

    @property
    def num_shapes(self) -> int:
        return len(self.scene_ids)

    @staticmethod
    def build(shapes: Sequence[ShapeSamples], device: torch.device | str) -> SampleBank:
        chunks: list[torch.Tensor] = []
        pos_offset, pos_count, neg_offset, neg_count = [], [], [], []
        at = 0
        for s in shapes:
            pos, neg = torch.from_numpy(s.pos_N4), torch.from_numpy(s.neg_N4)
            pos_offset.append(at)
            pos_count.append(len(pos))
            neg_offset.append(at + len(pos))
            neg_count.append(len(neg))
            at += len(pos) + len(neg)
            chunks += [pos, neg]
        samples = torch.cat(chunks) if chunks else torch.empty(0, 4)

        def ints(v: list[int]) -> torch.Tensor:
            return torch.tensor(v, dtype=torch.int64, device=device)

        return SampleBank(samples.to(device, torch.float32), ints(pos_offset), ints(pos_count), ints(neg_offset),
                          ints(neg_count), [s.scene_id for s in shapes], list(zip(pos_count, neg_count)))


def shape_key(seed: int, scene_id: int, attempt: int) -> int:
    """The 63-bit key of one shape's attempt: its code init and its sample stream derive from it alone."""
    return mix_seed(seed, scene_id, attempt)


def init_codes(keys: Sequence[int], latent_size: int, std: float) -> torch.Tensor:
    """``[B, L]`` fp32 CPU codes from N(0, std^2), row b a function of ``keys[b]`` alone."""
    rows = []
    for key in keys:
        g = torch.Generator().manual_seed(mix_seed(key, _TAG_INIT))
        rows.append(torch.randn(latent_size, generator=g) * std)
    return torch.stack(rows) if rows else torch.empty(0, latent_size)


def draw_samples(bank: SampleBank, rows_B: torch.Tensor, keys_B: torch.Tensor, iteration: int,
                 num_samples: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(xyz ``[B, S, 3]``, sdf ``[B, S]``) for the shapes ``rows_B`` of ``bank``: S/2 rows with sdf > 0 then
    S/2 with sdf <= 0, uniformly with replacement, a pure function of (key, iteration, sample index)."""
    half = num_samples // 2
    device = bank.samples_M4.device
    counter = torch.arange(num_samples, dtype=torch.int64, device=device)
    base = _splitmix64(keys_B + mix_seed(iteration, _TAG_SAMPLES))  # [B]
    h = _splitmix64(base[:, None] + counter[None, :]) & _MASK63  # [B, S], non-negative
    pos_count = bank.pos_count_B[rows_B][:, None]
    neg_count = bank.neg_count_B[rows_B][:, None]
    pos_rows = torch.remainder(h[:, :half], pos_count) + bank.pos_offset_B[rows_B][:, None]
    neg_rows = torch.remainder(h[:, half:], neg_count) + bank.neg_offset_B[rows_B][:, None]
    picked = bank.samples_M4[torch.cat([pos_rows, neg_rows], dim=1)]  # [B, S, 4]
    return picked[..., :3], picked[..., 3]


CodeStep = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
"""(codes ``[B, L]`` fp32, xyz ``[B, S, 3]``, sdf ``[B, S]``) -> (per-shape loss ``[B]``, its gradient ``[B, L]``)."""


def code_step(model: nn.Module | CodeStep, cfg: ReconstructConfig, clamp_dist: float) -> CodeStep:
    """One iteration's per-shape loss and code gradient through ``model``: the hand-written backward of a
    :class:`FrozenDecoder`, autograd through any other module (under ``cfg.precision``), or ``model`` itself
    when it is already a step (a compiled one: :func:`prepare`)."""
    from sdf_ray.shapes.frozen_decoder import FrozenDecoder, clamped_l1_and_code_gradient

    if not isinstance(model, nn.Module):
        return model
    lam = cfg.code_reg_lambda
    if isinstance(model, FrozenDecoder):
        frozen = model

        def hand_written(z: torch.Tensor, xyz: torch.Tensor, sdf: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return clamped_l1_and_code_gradient(frozen, z, xyz, sdf, clamp_dist, lam)

        return hand_written
    module = model

    def autograd_step(z: torch.Tensor, xyz: torch.Tensor, sdf: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z_in = z.detach().requires_grad_(True)
        with precision_context(cfg.precision, z.device):
            pred = module(z_in.unsqueeze(1), xyz)  # [B, S]
        l1 = (pred.float().clamp(-clamp_dist, clamp_dist) - sdf.clamp(-clamp_dist, clamp_dist)).abs().mean(dim=1)
        loss = l1 + lam * z_in.pow(2).mean(dim=1) if lam else l1
        (grad,) = torch.autograd.grad(loss.sum(), z_in)
        return loss, grad

    return autograd_step


@dataclass
class Prepared:
    """What an optimiser works through: ``model`` (the module that decodes: a :class:`FrozenDecoder` or the
    decoder itself, per ``cfg.code_gradient``), ``decode`` (the same, compiled when asked) and ``step`` (one
    iteration, compiled when asked)."""

    model: nn.Module
    decode: nn.Module
    step: CodeStep
    step_apart: bool = True
    """Whether ``step`` runs none of ``decode``'s compiled code (it does when autograd goes through the compiled
    module): then one thread may compile ``decode`` while another runs ``step``."""


def prepare(decoder: nn.Module, cfg: ReconstructConfig, clamp_dist: float, compile: bool) -> Prepared:
    """The decoding module and the iteration step for a frozen decoder (:func:`freeze`), compiled with
    ``cfg.compile_mode`` if ``compile`` (static shapes: the callers pad batches and chunks)."""
    from sdf_ray.model import DeepSDFDecoder
    from sdf_ray.shapes.frozen_decoder import FrozenDecoder, compute_dtype

    model = decoder  # any other module (an analytic test decoder, say) has no frozen form: autograd through it
    if cfg.code_gradient == "hand-written" and isinstance(decoder, DeepSDFDecoder):
        model = FrozenDecoder(decoder, compute_dtype(cfg.precision, decoder))
    if not compile:
        return Prepared(model, model, code_step(model, cfg, clamp_dist))
    from sdf_ray.device_settings import compile_module

    decode = compile_module(model, cfg.compile_mode, dynamic=False)
    if isinstance(model, FrozenDecoder):  # the whole iteration in one graph: forward and written-out backward
        return Prepared(model, decode, compile_module(code_step(model, cfg, clamp_dist), cfg.compile_mode,
                                                      dynamic=False))
    # Autograd through the compiled module: dynamo breaks the graph at torch.autograd.grad, so a compiled step
    # function would run the backward outside the compiled graph.
    return Prepared(model, decode, code_step(decode, cfg, clamp_dist), step_apart=False)


@dataclass
class ShapeCode:
    """The outcome of one shape's optimisation."""

    scene_id: int
    code: torch.Tensor
    """``[L]`` fp32 on the CPU: the final code (the last finite one for a failed shape)."""
    status: str
    """``ok`` or ``failed``."""
    reason: str
    """Why a shape failed ('' when ok)."""
    loss: float
    """The shape's loss at its last finite iteration (NaN if none)."""
    iterations: int
    """Steps taken over all attempts."""
    attempts: int


@dataclass
class _Attempt:
    codes_BL: torch.Tensor
    ok_B: torch.Tensor
    bad_iteration_B: torch.Tensor
    bad_kind_B: torch.Tensor
    loss_B: torch.Tensor


def _optimise(model: nn.Module | CodeStep, bank: SampleBank, rows: list[int], keys: list[int], cfg: ReconstructConfig,
              clamp_dist: float, latent_size: int, pad_to: int = 0) -> _Attempt:
    """One attempt for the shapes ``rows`` of ``bank``: ``cfg.num_iterations`` masked Adam steps, no host sync.

    ``pad_to``: optimise at least this many rows, the extra ones repeating the first shape (a compiled decoder
    then sees one batch shape); rows are independent, so the padding changes no real row and is dropped.
    """
    real = len(rows)
    if real < pad_to:
        rows = rows + [rows[0]] * (pad_to - real)
        keys = keys + [keys[0]] * (pad_to - real)
    out = _optimise_rows(model, bank, rows, keys, cfg, clamp_dist, latent_size)
    if real == len(rows):
        return out
    return _Attempt(out.codes_BL[:real], out.ok_B[:real], out.bad_iteration_B[:real], out.bad_kind_B[:real],
                    out.loss_B[:real])


def _optimise_rows(model: nn.Module | CodeStep, bank: SampleBank, rows: list[int], keys: list[int], cfg: ReconstructConfig,
                   clamp_dist: float, latent_size: int) -> _Attempt:
    device = bank.samples_M4.device
    B = len(rows)
    rows_B = torch.tensor(rows, dtype=torch.int64, device=device)
    keys_B = torch.tensor(keys, dtype=torch.int64, device=device)
    z = init_codes(keys, latent_size, cfg.init_std).to(device)
    m = torch.zeros_like(z)
    v = torch.zeros_like(z)
    active = torch.ones(B, dtype=torch.bool, device=device)
    bad_iteration = torch.full((B,), -1, dtype=torch.int64, device=device)
    bad_kind = torch.zeros(B, dtype=torch.int64, device=device)  # 1: loss, 2: gradient
    last_loss = torch.full((B,), float("nan"), device=device)
    b1, b2 = cfg.betas
    step = code_step(model, cfg, clamp_dist)
    for e in range(cfg.num_iterations):
        xyz, sdf = draw_samples(bank, rows_B, keys_B, e, cfg.samples_per_iteration)
        # TF32 is a process-wide GEMM switch: set around the step (a compiled one too), not traced inside it.
        with precision_context(cfg.precision, device) if cfg.precision == "tf32" else contextlib.nullcontext():
            loss, grad = step(z, xyz, sdf)
        loss_ok = torch.isfinite(loss)
        ok = loss_ok & torch.isfinite(grad).all(dim=1)
        newly_bad = active & ~ok
        bad_iteration = torch.where(newly_bad, e, bad_iteration)
        bad_kind = torch.where(newly_bad, torch.where(loss_ok, 2, 1), bad_kind)
        active = active & ok
        last_loss = torch.where(active, loss.detach(), last_loss)
        # torch.optim.Adam's arithmetic, with the step count shared by all rows of one attempt.
        t = e + 1
        keep = active[:, None]
        g = torch.where(keep, grad, 0.0)
        m = torch.where(keep, m * b1 + g * (1 - b1), m)
        v = torch.where(keep, v * b2 + g * g * (1 - b2), v)
        step_size = lr_at(cfg, e) / (1 - b1 ** t)
        denom = v.sqrt() / (1 - b2 ** t) ** 0.5 + cfg.eps
        z = torch.where(keep, z - step_size * m / denom, z)
    return _Attempt(z.detach(), active, bad_iteration, bad_kind, last_loss)


def reconstruct_codes(model: nn.Module | CodeStep, bank: SampleBank, cfg: ReconstructConfig, clamp_dist: float,
                      latent_size: int, pad_to: int = 0) -> list[ShapeCode]:
    """Optimise a code for every shape of ``bank`` through ``model`` (see :func:`code_step`; a decoder module must
    be frozen: :func:`freeze`).

    A shape whose loss or gradient turns non-finite is frozen at that step, retried from a fresh code (a new
    key, so new samples too) up to ``cfg.max_retries`` times, then reported ``failed``; a shape without samples
    of both signs fails at once. The others are unaffected. ``pad_to``: every attempt runs at least this many
    rows (for a compiled decoder: one batch shape, one compilation); the results are the same.
    """
    n = bank.num_shapes
    results: list[ShapeCode | None] = [None] * n
    iterations = [0] * n
    pending: list[int] = []
    for b in range(n):
        if min(bank.sign_counts[b]) == 0:
            results[b] = ShapeCode(bank.scene_ids[b], torch.zeros(latent_size), "failed",
                                   "no finite samples with sdf > 0 and with sdf <= 0", float("nan"), 0, 0)
        else:
            pending.append(b)
    last_reason: dict[int, str] = {}
    for attempt in range(cfg.max_retries + 1):
        if not pending:
            break
        keys = [shape_key(cfg.seed, bank.scene_ids[b], attempt) for b in pending]
        out = _optimise(model, bank, pending, keys, cfg, clamp_dist, latent_size, pad_to)
        ok = out.ok_B.cpu().tolist()
        bad_at = out.bad_iteration_B.cpu().tolist()
        kinds = out.bad_kind_B.cpu().tolist()
        codes = out.codes_BL.float().cpu()
        losses = out.loss_B.float().cpu().tolist()
        retry: list[int] = []
        for j, b in enumerate(pending):
            iterations[b] += cfg.num_iterations if ok[j] else bad_at[j]
            if ok[j]:
                results[b] = ShapeCode(bank.scene_ids[b], codes[j], "ok", "", losses[j], iterations[b], attempt + 1)
                continue
            what = "loss" if kinds[j] == 1 else "gradient"
            last_reason[b] = f"non-finite {what} at iteration {bad_at[j]} of attempt {attempt + 1}"
            if attempt == cfg.max_retries:
                results[b] = ShapeCode(bank.scene_ids[b], codes[j], "failed", last_reason[b], losses[j],
                                       iterations[b], attempt + 1)
            else:
                retry.append(b)
        pending = retry
    assert all(r is not None for r in results)
    return [r for r in results if r is not None]


@torch.no_grad()
def sdf_l1(decoder: nn.Module, bank: SampleBank, codes_BL: torch.Tensor, clamp_dist: float, precision: str,
           points_per_forward: int) -> list[float]:
    """Per shape: mean over ALL its samples of |clamp(f(z, x)) - clamp(s)| at the run's clamp distance (the
    quantity the loss fits, on every sample rather than a draw). One host sync for the whole bank."""
    device = bank.samples_M4.device
    totals = torch.zeros(bank.num_shapes, dtype=torch.float64, device=device)
    counts = [sum(c) for c in bank.sign_counts]
    start = 0
    for b, count in enumerate(counts):
        rows = bank.samples_M4[start:start + count]
        start += count
        code = codes_BL[b].to(device, torch.float32)
        for at in range(0, count, points_per_forward):
            chunk = rows[at:at + points_per_forward]
            with decoding_context(decoder, precision, device):
                pred = decoder(code, chunk[:, :3])
            err = (pred.float().clamp(-clamp_dist, clamp_dist) - chunk[:, 3].clamp(-clamp_dist, clamp_dist)).abs()
            totals[b] += err.sum(dtype=torch.float64)
    return [total / count if count else float("nan") for total, count in zip(totals.cpu().tolist(), counts)]
