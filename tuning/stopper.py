"""Failure pruning: stop a trial at the first report that shows it diverging, or its decoder collapsed.

A trial is pruned as ``pruned_diverged`` when a report has a non-finite loss (the trainer reports ``inf``,
never NaN, for an interval without a finite step), ``diverged == 1`` (the guard gave up), an interval skip fraction
above ``max_skip_fraction``, or a loss above ``loss_growth_factor`` times the trial's best loss so far; and as
``pruned_collapsed`` when its decoder collapsed to a constant: the gradient norm below ``collapse.max_grad_norm``
and the loss flat (relative change below ``collapse.max_loss_change``) for ``collapse.patience`` reports in a row.
Both look at the training signals only, whatever metric ranks the trials.

The stopper runs in the Tune driver, so it keeps ``reasons`` (trial id -> why). The decision is a pure function
of the trial's reports, so :func:`replay` recomputes it from a trial's stored results (a resumed sweep's stopper
never saw the trials pruned before the interruption).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

from ray.tune import Stopper

from tuning.search import CollapseSpec, DivergenceSpec

LOSS_KEY = "train/loss"
GRAD_NORM_KEY = "train/grad_norm"
SKIP_FRACTION_KEY = "guard/skip_fraction"
DIVERGED_KEY = "diverged"
PRUNED_DIVERGED, PRUNED_COLLAPSED = "pruned_diverged", "pruned_collapsed"


class PruneReason(str):
    """Why a trial was pruned, as the line a user reads; ``status`` is its trials.csv status."""

    status: str

    def __new__(cls, text: str, status: str = PRUNED_DIVERGED) -> PruneReason:
        self = super().__new__(cls, text)
        self.status = status
        return self


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


class TrialWatch:
    """One trial's pruning state, fed its reports in order: the best loss so far and the flat streak."""

    def __init__(self, divergence: DivergenceSpec, collapse: CollapseSpec | None = None) -> None:
        self.divergence, self.collapse = divergence, collapse
        self.best_loss: float | None = None
        self.previous_loss: float | None = None
        self.flat_reports = 0

    def observe(self, result: Mapping[str, Any]) -> PruneReason | None:
        """Why the trial should stop at this report, or None."""
        diverging = divergence_reason(result, self.best_loss, self.divergence)
        if diverging is not None:
            return PruneReason(diverging, PRUNED_DIVERGED)
        loss = finite_float(result.get(LOSS_KEY))
        collapsed = self._collapse(result, loss)
        if loss is not None:
            self.best_loss = loss if self.best_loss is None else min(self.best_loss, loss)
        self.previous_loss = loss
        return collapsed

    def _collapse(self, result: Mapping[str, Any], loss: float | None) -> PruneReason | None:
        spec = self.collapse
        if spec is None or spec.max_grad_norm is None:
            return None
        norm = finite_float(result.get(GRAD_NORM_KEY))
        previous = self.previous_loss
        flat = (loss is not None and previous is not None and norm is not None and norm < spec.max_grad_norm
                and abs(loss - previous) <= spec.max_loss_change * max(abs(previous), 1e-12))
        self.flat_reports = self.flat_reports + 1 if flat else 0
        if self.flat_reports < spec.patience:
            return None
        return PruneReason(f"decoder collapsed to a constant: |g| {norm:.3g} < collapse.max_grad_norm="
                           f"{spec.max_grad_norm:g} and loss flat at {loss:.4g} for {self.flat_reports} reports "
                           f"(step {result.get('train/step')})", PRUNED_COLLAPSED)


def replay(results: Iterable[Mapping[str, Any]], spec: DivergenceSpec, collapse: CollapseSpec | None = None,
           ) -> tuple[PruneReason | None, int]:
    """Run the stopper's decisions over a trial's reports: (reason, 1-based index of the pruning report)."""
    watch = TrialWatch(spec, collapse)
    for index, result in enumerate(results, start=1):
        reason = watch.observe(result)
        if reason is not None:
            return reason, index
    return None, 0


class DivergenceStopper(Stopper):
    """A ``tune.Stopper`` pruning diverging and collapsed trials; ``reasons`` maps each pruned trial id to
    why (a :class:`PruneReason`, whose ``status`` says which)."""

    def __init__(self, spec: DivergenceSpec, collapse: CollapseSpec | None = None) -> None:
        self.spec, self.collapse = spec, collapse
        self.watches: dict[str, TrialWatch] = {}
        self.reasons: dict[str, str] = {}

    def __call__(self, trial_id: str, result: dict[str, Any]) -> bool:
        if trial_id in self.reasons:
            return True
        watch = self.watches.setdefault(trial_id, TrialWatch(self.spec, self.collapse))
        reason = watch.observe(result)
        if reason is not None:
            self.reasons[trial_id] = reason
            return True
        return False

    def stop_all(self) -> bool:
        return False
