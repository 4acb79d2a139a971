"""The run's step schedule: steps per epoch, total steps, and at which steps the loop reports,
checkpoints and validates. The training loop, the CLI and Tune's planner (ASHA's ``max_t``) all ask
this one object, so the cadence can never disagree between the driver and the workers."""

from __future__ import annotations

import math
from dataclasses import dataclass

from sdf_ray.config import TrainConfig


def steps_per_epoch(num_scenes: int, scenes_per_step: int) -> int:
    return max(1, math.ceil(num_scenes / scenes_per_step))


@dataclass(frozen=True)
class RunSchedule:
    steps_per_epoch: int
    num_epochs: int
    log_every_n_steps: int
    checkpoint_every_n_epochs: int
    validate_every_n_epochs: int = 0
    """0: no validation passes."""

    @classmethod
    def of(cls, cfg: TrainConfig, num_scenes: int) -> RunSchedule:
        return cls(steps_per_epoch=steps_per_epoch(num_scenes, cfg.data.scenes_per_step),
                   num_epochs=cfg.optim.num_epochs, log_every_n_steps=cfg.logging.every_n_steps,
                   checkpoint_every_n_epochs=cfg.checkpoint.every_n_epochs,
                   validate_every_n_epochs=_validation_cadence(cfg))

    @property
    def total_steps(self) -> int:
        return self.num_epochs * self.steps_per_epoch

    def epoch_of(self, step: int) -> int:
        """The 0-based epoch that step ``step`` (0-based, about to run) belongs to."""
        return step // self.steps_per_epoch

    def epochs_done(self, steps_done: int) -> int:
        return math.ceil(steps_done / self.steps_per_epoch)

    def _end_of_epoch(self, steps_done: int) -> bool:
        return steps_done % self.steps_per_epoch == 0 or steps_done == self.total_steps

    def checkpoint_due(self, steps_done: int) -> bool:
        """After ``steps_done`` steps: is a checkpoint due (every N epochs, and always at the end)?"""
        return self._end_of_epoch(steps_done) and (
            self.epochs_done(steps_done) % self.checkpoint_every_n_epochs == 0 or steps_done == self.total_steps)

    def validation_due(self, steps_done: int) -> bool:
        """After ``steps_done`` steps: is a validation pass due (every N epochs, and at the end)?"""
        if self.validate_every_n_epochs <= 0:
            return False
        return self._end_of_epoch(steps_done) and (
            self.epochs_done(steps_done) % self.validate_every_n_epochs == 0 or steps_done == self.total_steps)

    def report_due(self, steps_done: int) -> bool:
        """Every logging interval, and at every checkpoint or validation pass."""
        return (steps_done % self.log_every_n_steps == 0 or self.checkpoint_due(steps_done)
                or self.validation_due(steps_done))

    def num_reports(self) -> int:
        """Reports of a run without rollbacks (what ASHA's ``max_t`` counts in reports)."""
        return sum(1 for s in range(1, self.total_steps + 1) if self.report_due(s))


def _validation_cadence(cfg: TrainConfig) -> int:
    validation = getattr(cfg, "validation", None)
    if validation is None or not getattr(validation, "path", ""):
        return 0
    return int(validation.every_n_epochs)
