"""Remove the placement groups that Ray Train leaks when Tune kills a trial in mid-run.

Workaround (seen in CI on Ray 2.60): Tune stops a trial (pruned, diverged), its actor dies, and the trial's
Ray Train controller is torn down with it. While it dies, the controller can still notice its workers dying,
decide to retry, and create a new worker-group placement group. Nothing owns that group afterwards: Ray
Train's PlacementGroupCleaner already cleaned up the previous one and exited (ray-project/ray#62753, open:
a group registered just before the controller dies is orphaned; it follows #54305, Tune + Train V2 trials
not sharing resources, which the cleaner of PR #58515 fixed for the ordinary case). A placement group lives
as long as its job, and the job is the sweep itself, so every leak takes a worker's CPUs/GPUs away from the
remaining trials, and a sweep with enough pruned trials waits forever. ``sdf-ray tune`` also keeps Ray
Train's health check at its default (``ray_session.connect_ray(..., fast_reports=False)``), which makes the
race rarer but does not close it.

Delete when: #62753 is fixed in the Ray that pyproject.toml pins, and the Tune test
(tests/test_tune_sweep.py) passes with this callback left out of ``tuning.sweep`` and no leaked group in
``ray list placement-groups`` after it.

A placement group is reaped when it is CREATED, belongs to this job, is not a Tune trial's own bundle, and
holds no live actor in two passes at least ``interval_s`` apart. A Train worker group fills its group with
actors within moments of creating it, so only a leak stays empty that long.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping
from typing import Any

from ray.tune import Callback

from sdf_ray.ray_session import remove_placement_group_by_id

log = logging.getLogger("sdf_ray")


def empty_worker_groups(gcs_address: str, job_id: str, trial_bundle: Mapping[str, float]) -> set[str]:
    """Ids of this job's CREATED placement groups that hold no live actor, except Tune trials' own groups."""
    from ray.util.state import list_actors, list_placement_groups

    # The address is explicit: the State API's own lookup fails when several Ray instances share a machine.
    groups = list_placement_groups(address=gcs_address, filters=[("state", "=", "CREATED")], detail=True,
                                   limit=10_000, raise_on_missing_output=False)
    trial_resources = {k: float(v) for k, v in trial_bundle.items() if v}
    candidates = {
        g.placement_group_id for g in groups
        if g.creator_job_id == job_id and not g.is_detached
        and [b.get("unit_resources") for b in g.bundles or []] != [trial_resources]}
    # Per group, and raising on partial answers: an actor missing from the answer must never make an
    # occupied group look empty.
    return {pg_id for pg_id in candidates
            if not list_actors(address=gcs_address, limit=1, raise_on_missing_output=True,
                               filters=[("placement_group_id", "=", pg_id), ("state", "!=", "DEAD")])}


class LeakedPlacementGroupReaper(Callback):
    """Tune callback: every ``interval_s``, remove worker groups found empty in the previous pass too."""

    def __init__(self, trial_bundle: Mapping[str, float], interval_s: float = 10.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.trial_bundle = dict(trial_bundle)
        self.interval_s = interval_s
        self.clock = clock
        self._last_pass = -math.inf
        self._suspects: set[str] = set()
        self.removed: list[str] = []

    def on_step(self, iteration: int, trials: list[Any], **info: Any) -> None:
        if self.clock() - self._last_pass >= self.interval_s:
            self.reap()

    def reap(self) -> list[str]:
        """One pass; returns the ids removed in it."""
        import ray

        self._last_pass = self.clock()
        try:
            context = ray.get_runtime_context()
            empty = empty_worker_groups(context.gcs_address, context.get_job_id(), self.trial_bundle)
        except Exception as exc:  # the State API needs the dashboard; a sweep must not fail for want of it
            log.debug("placement-group reaper: cannot list placement groups: %s", exc)
            return []
        leaked, self._suspects = empty & self._suspects, empty - self._suspects
        for pg_id in sorted(leaked):
            try:
                remove_placement_group_by_id(pg_id)
            except Exception as exc:
                log.warning("could not remove leaked placement group %s: %s", pg_id, exc)
                continue
            log.warning("removed placement group %s, leaked by a stopped trial's Ray Train run", pg_id)
            self.removed.append(pg_id)
        return sorted(leaked)

    def __getstate__(self) -> dict[str, Any]:  # Tune pickles callbacks with the experiment state
        return {**self.__dict__, "_suspects": set(), "_last_pass": -math.inf}
