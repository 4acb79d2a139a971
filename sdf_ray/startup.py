"""Where a run's time goes between the command and its first step, and between its last step and the exit.

The processes of a run mark the moments they reach (``StartupClock.mark``): the driver (the command started,
Ray connected, ``fit()`` called and returned, Ray shut down), Ray Train's controller (the worker group up, the
process group ready; ``ray_session.train_backend_config``) and rank 0 (the training function started, data
loaded, state built, first and last step done). Marks are wall-clock times (``time.time()``), comparable across
processes and across nodes whose clocks agree; each is kept as seconds since the origin: the driver process's
start (the command), or the start of a Tune trial. The driver passes its marks to the workers in the loop
config, rank 0 adds its own to ``summary.json``, and the driver completes them after ``fit()``.

Phases are the differences between consecutive marks, so they add up to the totals exactly:
``perf/startup_seconds`` (origin -> first step done), ``perf/first_step_seconds`` (state built -> first step
done: compilation), ``perf/teardown_seconds`` (last step done -> the last mark). A mark a process could not
take is left out and its phase merges with the next one (``data_load+state_build``). The same arithmetic serves
``sdf-ray reconstruct`` and ``sdf-ray mesh`` (:data:`SHAPES`: from the command to the first shape meshed, the
optimiser actors' marks included). Stdlib only.
"""

from __future__ import annotations

import importlib
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

_IMPORTED_AT = time.time()

# (mark, the phase that ends at it, what that phase covers), in the order a run reaches them.
MARKS: tuple[tuple[str, str, str], ...] = (
    ("origin", "", "the command (the driver process starts) or the Tune trial starts"),
    ("config_checked", "launch", "Python start-up, imports, config and dataset checks"),
    ("ray_connected", "ray_start", "start an embedded Ray, or connect to a cluster"),
    ("fit_start", "driver_prepare", "cluster checks, the trainer built, Ray Train's autoscaling coordinator up"),
    ("controller_process_started", "controller_spawn", "Ray Train's controller process spawned (0: prestarted)"),
    ("worker_process_started", "worker_spawn", "the controller up, the placement group, rank 0's process spawned "
                                               "(0: prestarted)"),
    ("worker_group_up", "worker_group_start", "the worker actors initialised, the worker group up (after "
                                              "prestarted processes: the controller's set-up too)"),
    ("process_group_ready", "process_group_init", "the early imports finished, the torch.distributed process group"),
    ("train_fn_start", "train_fn_launch", "the training function reaches the workers (imports)"),
    ("data_loaded", "data_load", "device set-up, resume checkpoint, this rank's scenes read"),
    ("state_built", "state_build", "decoder, codes, optimizer, samples on the device"),
    ("first_step_done", "first_step", "the first step, compilation included"),
    ("last_step_done", "training", "every other step"),
    ("training_done", "final_report", "the last report and checkpoint, replica checksums"),
    ("fit_end", "trainer_shutdown", "Ray Train stops its workers and controller"),
    ("exit", "ray_shutdown", "shut down the embedded Ray (or disconnect)"),
)
# The same for `sdf-ray reconstruct` and `sdf-ray mesh`: the driver takes the command's marks, the optimiser actors
# their own (the earliest actor's count), from the first batch an actor runs to its first shape's mesh.
SHAPE_MARKS: tuple[tuple[str, str, str], ...] = (
    ("origin", "", "the command (the driver process starts)"),
    ("checked", "launch", "Python start-up, imports, the run's, dataset's and output's checks"),
    ("ray_connected", "ray_start", "start an embedded Ray, or connect to a cluster"),
    ("actor_started", "actor_spawn", "Ray starts the first optimiser actor's process (0: a pooled one)"),
    ("actor_ready", "actor_init", "its imports (torch), the device, the decoder, the compiled functions set up"),
    ("first_batch_loaded", "first_load", "the first batch's samples read and on the device"),
    ("first_batch_optimised", "first_optimise", "the first batch's codes optimised, compilation included"),
    ("first_batch_decoded", "first_decode", "its sdf_l1 and grids decoded, decoding graphs compiled"),
    ("first_shape_done", "first_finish", "its first shape meshed and measured (a CPU task)"),
    ("last_shape_done", "shapes", "every other shape"),
    ("finished", "finish", "the actors stopped, metrics.csv and the picture written"),
)
STARTUP_KEY, FIRST_STEP_KEY, TEARDOWN_KEY = "perf/startup_seconds", "perf/first_step_seconds", "perf/teardown_seconds"
MARKS_KEY, ORIGIN_KEY, ORIGIN_TIME_KEY = "startup_marks", "startup_origin", "startup_origin_unix"


@dataclass(frozen=True)
class Timeline:
    """The marks of one kind of command, in order; start-up ends at ``first`` and teardown follows ``last``."""

    marks: tuple[tuple[str, str, str], ...]
    first: str
    last: str
    first_what: str
    """What ``first`` means in the printed breakdown ('first step done', 'first shape done')."""
    middle: str
    """The label of the phases between start-up and teardown ('training', 'shapes')."""
    first_phase_key: str | None = None
    """A ``perf/*`` field for the phase that ends at ``first`` (training's: compilation)."""

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(m for m, _, _ in self.marks)

    def phase_of(self, mark: str) -> str:
        return next(phase for m, phase, _ in self.marks if m == mark)

    def description(self, phase: str) -> str:
        return next(text for _, p, text in self.marks if p == phase)


TRAINING = Timeline(MARKS, "first_step_done", "last_step_done", "first step done", "training", FIRST_STEP_KEY)
SHAPES = Timeline(SHAPE_MARKS, "first_shape_done", "last_shape_done", "first shape done", "shapes")
MARK_NAMES = TRAINING.names
FIRST_STEP, LAST_STEP = TRAINING.first, TRAINING.last


def process_start_time() -> float:
    """Wall-clock time at which this process started (Linux ``/proc``), else when this module was imported."""
    try:
        with open("/proc/self/stat") as f:
            # Field 22, starttime, in clock ticks after boot; fields after the ")" that closes the name start at 3.
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        age = uptime - start_ticks / os.sysconf("SC_CLK_TCK")
        return time.time() - age if 0 <= age < 86400 * 365 else _IMPORTED_AT
    except (OSError, ValueError, IndexError):
        return _IMPORTED_AT


class StartupClock:
    """Marks in seconds since ``origin`` (a wall-clock time). Plain data travels as :meth:`to_dict`."""

    def __init__(self, origin: float | None = None, marks: dict[str, float] | None = None,
                 origin_kind: str = "command", timeline: Timeline = TRAINING) -> None:
        self.origin = process_start_time() if origin is None else origin
        self.origin_kind = origin_kind  # "command" (the driver process's start) or "trial" (a Tune trial's start)
        self.timeline = timeline
        self.marks: dict[str, float] = dict(marks or {})
        self.marks.setdefault("origin", 0.0)

    def mark(self, name: str, at: float | None = None, *, keep_first: bool = False) -> None:
        """Record ``name`` now (or at the wall-clock time ``at``); ``keep_first`` leaves an earlier mark."""
        assert name in self.timeline.names, name
        if keep_first and name in self.marks:
            return
        self.marks[name] = round((time.time() if at is None else at) - self.origin, 4)

    def merge(self, marks: dict[str, float] | None) -> None:
        """Add another process's marks (same origin); ours win where both have one."""
        for name, value in (marks or {}).items():
            if name in self.timeline.names:
                self.marks.setdefault(name, float(value))

    def to_dict(self) -> dict[str, Any]:
        return {"origin": self.origin, "marks": dict(self.marks), "origin_kind": self.origin_kind}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StartupClock:
        return cls(origin=float(data["origin"]), marks=data.get("marks"),
                   origin_kind=str(data.get("origin_kind", "command")))

    def summary_fields(self) -> dict[str, Any]:
        return {**summary_fields(self.marks, self.timeline), ORIGIN_KEY: self.origin_kind,
                ORIGIN_TIME_KEY: round(self.origin, 3)}

    def complete(self, summary: dict[str, Any]) -> dict[str, Any]:
        """``summary`` with this clock's marks added to the ones it carries, and its perf fields recomputed."""
        self.merge(summary.get(MARKS_KEY))
        stale = [k for k in summary if k.startswith("perf/phase/")]
        return {**{k: v for k, v in summary.items() if k not in stale}, **self.summary_fields()}


def _ordered(marks: dict[str, float], timeline: Timeline) -> list[tuple[str, float]]:
    """The present marks in run order, each no earlier than the one before it (clocks of different nodes may
    disagree by milliseconds; phases must stay non-negative and still add up)."""
    out: list[tuple[str, float]] = []
    latest = 0.0
    for name in timeline.names:
        if name in marks:
            latest = max(latest, float(marks[name]))
            out.append((name, latest))
    return out


def phases(marks: dict[str, float], timeline: Timeline = TRAINING) -> list[tuple[str, float, str]]:
    """(phase, seconds, end mark) between consecutive present marks; a missing mark merges its phase into the
    next one's name (``data_load+state_build``)."""
    out: list[tuple[str, float, str]] = []
    ordered = _ordered(marks, timeline)
    names = timeline.names
    index = {name: i for i, name in enumerate(names)}
    for (prev, t0), (name, t1) in zip(ordered, ordered[1:]):
        spanned = [timeline.phase_of(m) for m in names[index[prev] + 1:index[name] + 1]]
        out.append(("+".join(spanned), round(t1 - t0, 4), name))
    return out


def _is_startup(end_mark: str, timeline: Timeline) -> bool:
    return timeline.names.index(end_mark) <= timeline.names.index(timeline.first)


def _is_teardown(end_mark: str, timeline: Timeline) -> bool:
    return timeline.names.index(end_mark) > timeline.names.index(timeline.last)


def summary_fields(marks: dict[str, float], timeline: Timeline = TRAINING) -> dict[str, Any]:
    """The ``perf/*`` start-up fields of ``summary.json`` (and the marks they come from).

    ``perf/phase/<phase>_seconds`` for every phase; the totals are sums of those phases: start-up ends with the
    timeline's first step (or shape), teardown starts after the last one. A total whose end marks are missing is
    left out.
    """
    fields: dict[str, Any] = {MARKS_KEY: dict(marks)}
    listed = phases(marks, timeline)
    for phase, seconds, _ in listed:
        fields[f"perf/phase/{phase}_seconds"] = seconds
    present = {name for name, _ in _ordered(marks, timeline)}
    if timeline.first in present:
        fields[STARTUP_KEY] = round(sum(s for _, s, end in listed if _is_startup(end, timeline)), 4)
        before = timeline.names[timeline.names.index(timeline.first) - 1]
        if timeline.first_phase_key and before in present:
            fields[timeline.first_phase_key] = fields[f"perf/phase/{timeline.phase_of(timeline.first)}_seconds"]
    if timeline.last in present:
        fields[TEARDOWN_KEY] = round(sum(s for _, s, end in listed if _is_teardown(end, timeline)), 4)
    return fields


def format_breakdown(summary: dict[str, Any], timeline: Timeline = TRAINING) -> str:
    """The breakdown printed at the end of a run, from its summary's marks."""
    marks = summary.get(MARKS_KEY) or {}
    listed = phases(marks, timeline)
    if not listed:
        return ""
    head = []
    if STARTUP_KEY in summary:
        head.append(f"{timeline.first_what} {summary[STARTUP_KEY]:.1f} s after the {_origin_word(summary)}")
    if TEARDOWN_KEY in summary:
        head.append(f"teardown {summary[TEARDOWN_KEY]:.1f} s after the last {timeline.first_what.split()[1]}")
    lines = ["time: " + ", ".join(head) if head else "time:"]
    for phase, seconds, end in listed:
        text = " + ".join(timeline.description(p) for p in phase.split("+"))
        where = ("start-up" if _is_startup(end, timeline) else "teardown" if _is_teardown(end, timeline)
                 else timeline.middle)
        lines.append(phase_line(where, phase, seconds, text))
    return "\n".join(lines)


def phase_line(where: str, phase: str, seconds: float, text: str) -> str:
    """One line of :func:`format_breakdown` (``where``: start-up, teardown or the middle's name)."""
    return f"  {where:9s} {phase:28s} {seconds:7.2f} s  {text}"


def _origin_word(summary: dict[str, Any]) -> str:
    return "trial's start" if summary.get(ORIGIN_KEY) == "trial" else "command"


# ---------------------------------------------------------------------------------------------
# Marks taken in Ray Train's controller, delivered to the worker processes (ray_session.train_backend_config)

_REMOTE_MARKS: dict[str, float] = {}
_CONTROLLER_RUNTIME_ENV: list[str] = []


def record_remote_marks(marks: dict[str, float], controller_runtime_env: str | None = None) -> None:
    """Runs in each worker process: keep the controller's wall-clock marks for the training function, and the digest
    of the controller's runtime env (``ray_session.runtime_env_digest``) when it knows it."""
    _REMOTE_MARKS.update(marks)
    if controller_runtime_env is not None:
        _CONTROLLER_RUNTIME_ENV[:] = [controller_runtime_env]


def remote_marks() -> dict[str, float]:
    """The wall-clock marks the controller delivered to this worker process (``{}`` when it delivered none)."""
    return dict(_REMOTE_MARKS)


def controller_runtime_env() -> str | None:
    """The digest of the controller's runtime env that it delivered to this worker process (None when it did not)."""
    return _CONTROLLER_RUNTIME_ENV[0] if _CONTROLLER_RUNTIME_ENV else None


# ---------------------------------------------------------------------------------------------
# Ray Train's worker processes import torch and friends in a thread from the moment they start

WORKER_IMPORTS = ("torch", "torch._dynamo", "sdf_ray.train_loop")
"""What a Ray Train worker imports before its first step (torch._dynamo too: ``torch.optim`` loads it), none of them
importing Ray, so that the thread never waits on the main thread's imports of Ray Train."""
COMPILER_IMPORTS = ("torch._inductor.compile_fx",)
"""What a compiling worker imports next (0.8 s on the 2-core CI machine), for runs that compile."""

_WORKER_IMPORTS: list[BackgroundImports] = []
_ENV_BEFORE_IMPORTS: dict[str, str] = {}


def start_worker_imports() -> None:
    """Ray's worker-process setup hook for sdf-ray's Ray Train workers (``ray_session.train_worker_runtime_env``).

    Starts importing :data:`WORKER_IMPORTS` in a daemon thread and returns at once: the imports then overlap with
    the worker actor's initialisation and the worker group's set-up, instead of following them (measured on an H200
    with bytecode: torch 1.3-1.8 s, torch._dynamo 1 s). The main thread waits for them
    (:func:`finish_worker_imports`) before it imports torch itself, which re-raises a failed import.
    """
    _start_worker_imports(WORKER_IMPORTS + COMPILER_IMPORTS)


def start_worker_imports_eager() -> None:
    """:func:`start_worker_imports` for runs that do not compile: the compiler's modules are left out."""
    _start_worker_imports(WORKER_IMPORTS)


def _start_worker_imports(modules: tuple[str, ...]) -> None:
    _ENV_BEFORE_IMPORTS.update(os.environ)
    _WORKER_IMPORTS.append(BackgroundImports(modules, daemon=True))


def finish_worker_imports() -> None:
    """Wait for :func:`start_worker_imports`'s thread (if this process ran it) and re-raise its first failed import.

    Called before the main thread imports torch itself (the process group's set-up, the training function).
    ``torch._dynamo`` and ``torch._inductor`` import each other: a main thread that starts importing one while the
    thread is inside the other deadlocks on their module locks, which Python breaks by failing one of the imports
    (seen on a CPU: ``_DeadlockError``, then a half-initialised torch). So the two threads never import torch's
    packages at the same time; the thread's head start covers the worker actor's set-up (2.8 s on an H200)."""
    for imports in _WORKER_IMPORTS:
        imports.finish()


def worker_imports_started() -> bool:
    """Whether this process ran :func:`start_worker_imports`."""
    return bool(_WORKER_IMPORTS)


def environment_before_imports() -> dict[str, str] | None:
    """The environment as it was before :func:`start_worker_imports` began importing (None if it did not run).

    Importing ``torch._dynamo`` sets ``TORCHINDUCTOR_CACHE_DIR`` to torch's default when it is unset; whoever
    decides the cache directory afterwards needs to know whether the user or the imports set it."""
    return dict(_ENV_BEFORE_IMPORTS) if _WORKER_IMPORTS else None


class BackgroundImports:
    """Modules imported in a thread, to overlap them with waiting (an embedded Ray's processes starting).

    A later import of one of them in the main thread waits for that module's import lock and finds it loaded. The
    thread is not a daemon unless asked: a command that ends first waits for it rather than exit halfway through an
    import (a Ray worker process, which Ray ends, asks for one).
    :meth:`finish` waits for the thread and re-raises the first failed import as it happened (a module that fails
    halfway would otherwise fail again in the main thread, with a different and misleading error).
    """

    def __init__(self, modules: Sequence[str], *, daemon: bool = False) -> None:
        self.modules = tuple(modules)
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="sdf-ray-imports", daemon=daemon)
        self._thread.start()

    def _run(self) -> None:
        for name in self.modules:
            try:
                importlib.import_module(name)
            except BaseException as exc:  # kept for finish(), in the main thread
                self.error = exc
                return

    def finish(self) -> None:
        self._thread.join()
        if self.error is not None:
            raise self.error
