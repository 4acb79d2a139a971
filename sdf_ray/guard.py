"""The step guard: global-norm clipping, the distributed non-finite vote, the conditional step, escalation.

Per step, on every rank, in this order (DESIGN.md section 3):

1. backward has run on every rank (the decoder all-reduce happened inside it);
2. ``local_bad`` = the rank's own non-finite loss (a device tensor, never ``.item()``);
3. the global gradient norm = decoder norm (identical on every rank after the all-reduce) plus every
   rank's latent share, summed with ONE all-reduce that also carries the vote;
4. ``bad`` = any rank voted, or the norm is non-finite;
5. clip by ``min(1, grad_clip / (norm + eps))``;
6. the optimizer step, latent projection and counters apply only where ``bad == 0``, on the device.

Nothing here reads a tensor on the host: the host looks at the counters once per logging interval
(:meth:`GuardCounters.read`) and takes escalation decisions from those voted values, which are
identical on every rank, so every rank decides the same thing.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Literal

import torch

from sdf_ray.config import GuardConfig
from sdf_ray.dist import Collectives

CLIP_EPS = 1e-6


def sum_of_squares(tensors: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """sum ||t||^2 over tensors, with foreach kernels, as a 0-dim fp32 device tensor."""
    if not tensors:
        return torch.zeros((), device=device)
    norms = torch._foreach_norm(tensors, 2.0)
    return torch.stack(norms).float().square().sum()


@dataclass
class StepVerdict:
    """Device tensors describing one guarded step."""

    bad: torch.Tensor  # 0-dim bool, identical on every rank
    grad_norm: torch.Tensor  # 0-dim fp32, global, before clipping


def vote_and_clip(
    decoder_grads: list[torch.Tensor],
    latent_grads: list[torch.Tensor],
    local_bad: torch.Tensor,
    coll: Collectives,
    grad_clip: float,
) -> StepVerdict:
    """Steps 3-5: global norm + vote in one all-reduce, then clip every gradient in place.

    ``latent_grads`` are rank-local (each scene's code lives on one rank) and must already be scaled
    by 1/world_size; ``decoder_grads`` are the all-reduced (averaged) decoder gradients.
    """
    device = local_bad.device
    decoder_sq = sum_of_squares(decoder_grads, device)
    latent_sq = sum_of_squares(latent_grads, device)
    # One tiny collective carries both the latent share of the norm and the vote. A NaN anywhere in a
    # rank's latent gradients turns the summed norm into NaN on every rank, so it is voted bad too.
    # The decoder gradients are normally identical after DDP's all-reduce, but a rank-local fault after
    # it (or a NaN produced while unbucketing) would only show in this rank's norm: it votes as well.
    local_bad = local_bad | ~torch.isfinite(decoder_sq)
    shared = torch.stack([latent_sq, local_bad.float()])
    coll.all_reduce_sum_(shared)
    grad_norm = torch.sqrt(decoder_sq + shared[0])
    bad = (shared[1] > 0) | ~torch.isfinite(grad_norm)
    if grad_clip > 0:
        coef = torch.clamp(grad_clip / (grad_norm + CLIP_EPS), max=1.0)
        grads = decoder_grads + latent_grads
        if grads:
            torch._foreach_mul_(grads, coef)
    return StepVerdict(bad=bad, grad_norm=grad_norm)


def conditional_step(optimizer: torch.optim.Optimizer, bad: torch.Tensor) -> None:
    """Step 6: the optimizer update applies only where ``bad == 0``, decided on the device.

    Fused Adam reads ``found_inf`` inside its kernel: a skipped step leaves parameters, moments and
    the step count bit-identical (multiplying the update by 0 would not: 0 x NaN = NaN).
    """
    optimizer.found_inf = bad.float()  # type: ignore[attr-defined]
    optimizer.step()


def materialise_adam_state(optimizer: torch.optim.Optimizer) -> None:
    """Create Adam's moments now (zeros) so that a skipped first step is bit-identical too."""
    device = next(p.device for g in optimizer.param_groups for p in g["params"])
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
    conditional_step(optimizer, torch.ones((), dtype=torch.bool, device=device))
    optimizer.zero_grad(set_to_none=True)


COUNTER_NAMES = ("skipped_steps", "consecutive_skips", "steps", "clipped_steps", "longest_skip_streak")
_CONSECUTIVE, _LONGEST = COUNTER_NAMES.index("consecutive_skips"), COUNTER_NAMES.index("longest_skip_streak")


class GuardCounters:
    """On-device counters, updated without host syncs; the host reads them once per interval."""

    def __init__(self, device: torch.device) -> None:
        self.values = torch.zeros(len(COUNTER_NAMES), dtype=torch.int64, device=device)

    def update_(self, verdict: StepVerdict, grad_clip: float) -> None:
        bad = verdict.bad.long()
        clipped = (verdict.grad_norm > grad_clip).long() * (1 - bad) if grad_clip > 0 else torch.zeros_like(bad)
        zero = torch.zeros_like(bad)
        self.values.add_(torch.stack([bad, zero, torch.ones_like(bad), clipped, zero]))
        # consecutive = (consecutive + 1) if bad else 0; and the longest streak since the host last looked,
        # so that a streak ending between two logging intervals still escalates.
        self.values[_CONSECUTIVE] = (self.values[_CONSECUTIVE] + bad) * bad
        self.values[_LONGEST] = torch.maximum(self.values[_LONGEST], self.values[_CONSECUTIVE])

    def start_interval_(self) -> None:
        """After the host read the counters: the next interval's longest streak starts from the current one."""
        self.values[_LONGEST] = self.values[_CONSECUTIVE]

    def reset_consecutive_(self) -> None:
        """After a rollback: the restored state starts a fresh streak (the totals keep the skipped steps)."""
        self.values[_CONSECUTIVE] = 0

    def read(self) -> dict[str, int]:
        """Host sync: call once per logging interval."""
        return dict(zip(COUNTER_NAMES, (int(v) for v in self.values.tolist())))

    def read_with(self, extra: torch.Tensor) -> tuple[list[float], dict[str, int]]:
        """Like :meth:`read`, and ``extra`` (a 1-d float64 device tensor) comes back in the same host sync."""
        values = torch.cat([extra, self.values.double()]).tolist()
        return values[: extra.numel()], dict(zip(COUNTER_NAMES, map(int, values[extra.numel():])))

    def load(self, values: list[int]) -> None:
        self.values.copy_(torch.tensor(values, dtype=torch.int64))

    def state(self) -> list[int]:
        return [int(v) for v in self.values.tolist()]


Decision = Literal["continue", "rollback", "diverged"]


@dataclass
class Escalation:
    """Host-side escalation policy, fed the voted counters at each logging interval.

    All inputs are identical on every rank, so every rank takes the same decision without talking.
    """

    cfg: GuardConfig
    rollbacks: int = 0
    history: deque[tuple[int, int]] = field(default_factory=deque)  # (step, skipped_total)
    reason: str = ""

    def observe(self, step: int, skipped_total: int, consecutive: int) -> Decision:
        """``consecutive``: the longest run of skipped steps since the last observation."""
        self.history.append((step, skipped_total))
        while len(self.history) > 1 and self.history[1][0] <= step - self.cfg.skip_window_steps:
            self.history.popleft()
        first_step, first_skipped = self.history[0]
        window = step - first_step if step - first_step >= self.cfg.skip_window_steps else 0
        fraction = (skipped_total - first_skipped) / window if window else 0.0
        if consecutive >= self.cfg.max_consecutive_skips:
            self.reason = f"{consecutive} consecutive non-finite steps (limit {self.cfg.max_consecutive_skips})"
        elif fraction > self.cfg.max_skip_fraction:
            self.reason = (f"{fraction:.0%} of the last {window} steps were skipped "
                           f"(limit {self.cfg.max_skip_fraction:.0%})")
        else:
            return "continue"
        if self.rollbacks >= self.cfg.max_rollbacks:
            return "diverged"
        self.rollbacks += 1
        self.history.clear()
        return "rollback"
