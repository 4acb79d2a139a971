"""Divergence pruning: stop a trial at the first report that shows it diverging.

A trial is pruned (status ``pruned_diverged``) when a report has a non-finite loss (the trainer reports ``inf``,
never NaN, for an interval without a finite step), ``diverged == 1`` (the guard gave up), an interval skip fraction
above ``max_skip_fraction``, or a loss above ``loss_growth_factor`` times the trial's best loss so far.

The stopper runs in the Tune driver, so it keeps ``reasons`` (trial id -> why). The decision is a pure function
of the trial's reports, so :func:`replay` recomputes it from a trial's stored results (a resumed sweep's stopper
never saw the trials pruned before the interruption).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

from ray.tune import Stopper

from tuning.search import DivergenceSpec

LOSS_KEY = "train/loss"
SKIP_FRACTION_KEY = "guard/skip_fraction"
DIVERGED_KEY = "diverged"


def as_float(value: Any) -> float | None:
    """A reported value as a float (``inf``/NaN included), or None when it is missing or not a number."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def finite_float(value: Any) -> float | None:
    """A reported value as a finite float, or None (missing, not a number, inf or NaN)."""
    number = as_float(value)
    return number if number is not None and math.isfinite(number) else None


def divergence_reason(result: Mapping[str, Any], best_loss: float | None, spec: DivergenceSpec) -> str | None:
    """Why this report shows a diverging trial, or None. ``best_loss``: the best finite loss of earlier reports."""
    diverged = as_float(result.get(DIVERGED_KEY))
    if diverged is not None and diverged >= 1:
        return "the trainer's guard gave up (diverged=1)"
    loss = as_float(result.get(LOSS_KEY))
    if loss is not None and not math.isfinite(loss):
        return f"non-finite loss ({loss}) at step {result.get('train/step')}"
    skip = as_float(result.get(SKIP_FRACTION_KEY))
    if spec.max_skip_fraction is not None and skip is not None and skip > spec.max_skip_fraction:
        return (f"skip fraction {skip:.2f} > divergence.max_skip_fraction={spec.max_skip_fraction:g} "
                f"at step {result.get('train/step')}")
    factor = spec.loss_growth_factor
    if factor is not None and loss is not None and best_loss is not None and best_loss > 0 and loss > factor * best_loss:
        return (f"loss {loss:.4g} > divergence.loss_growth_factor={factor:g} x best {best_loss:.4g} "
                f"at step {result.get('train/step')}")
    return None


def _better_best(best: float | None, result: Mapping[str, Any]) -> float | None:
    loss = finite_float(result.get(LOSS_KEY))
    if loss is None:
        return best
    return loss if best is None else min(best, loss)


def replay(results: Iterable[Mapping[str, Any]], spec: DivergenceSpec) -> tuple[str | None, int]:
    """Run the stopper's decisions over a trial's reports: (reason, 1-based index of the pruning report)."""
    best: float | None = None
    for index, result in enumerate(results, start=1):
        reason = divergence_reason(result, best, spec)
        if reason is not None:
            return reason, index
        best = _better_best(best, result)
    return None, 0


class DivergenceStopper(Stopper):
    """A ``tune.Stopper`` pruning diverging trials; ``reasons`` maps each pruned trial id to why."""

    def __init__(self, spec: DivergenceSpec) -> None:
        self.spec = spec
        self.best_loss: dict[str, float] = {}
        self.reasons: dict[str, str] = {}

    def __call__(self, trial_id: str, result: dict[str, Any]) -> bool:
        if trial_id in self.reasons:
            return True
        best = self.best_loss.get(trial_id)
        reason = divergence_reason(result, best, self.spec)
        if reason is not None:
            self.reasons[trial_id] = reason
            return True
        new_best = _better_best(best, result)
        if new_best is not None:
            self.best_loss[trial_id] = new_best
        return False

    def stop_all(self) -> bool:
        return False
