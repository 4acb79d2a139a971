"""The output end on Ray: optimiser actors on the devices, meshing + metrics tasks on the CPUs, streamed.

Shape of the job: per shape, ~50 TFLOP of device work (800 steps x 8,000 samples through the decoder, plus
~1.3 M grid points) and ~1 s of single-threaded CPU work (marching cubes on a 256^3 volume, 30,000-point
KD-tree metrics, PLY writing). The two must overlap, and the device must never wait for the CPUs.

Mechanism: a pool of long-lived actors (one per GPU; CPU actors without GPUs) each holding the frozen decoder,
fed batches of scenes from the driver; each batch call returns one object per shape (``num_returns``), and each
of those feeds a CPU task at once (Ray resolves the argument when the batch finishes, without a round trip
through the driver). A GPU actor works on two batches at once (``reconstruct.batches_in_flight``, threads on
their own CUDA streams): while one optimises, the other loads its samples, decodes its grids and hands them to
Ray, work that leaves the GPU idle between batches otherwise. The driver keeps one batch more than that queued
per actor (the next is ready the moment a thread frees)
and stops feeding actors while too many decoded shapes wait for a CPU (``max_pending_shapes``), which bounds the
object store. It collects finished shapes with ``ray.wait``, prints progress, and writes nothing but the tables:
each CPU task writes its shape's mesh and record atomically, so a killed run resumes where it stopped.

Why not the alternatives:
- Ray Data (``map_batches`` with an actor pool feeding ``map``) streams this shape of job too, with its own
  backpressure. But one failing row fails the dataset unless an error budget is set, and a failure is then
  dropped rather than reported per shape; its blocks are Arrow/numpy tables, a poor fit for per-shape sparse
  grids of varying size; it reserves CPUs for its own operators; and per-shape resume and progress would live
  in UDF side effects anyway. What it adds over the ~80 lines below (autoscaling pools) is not needed for a
  fixed set of devices.
- Ray Train workers are an SPMD gang for collectives: reconstruction has no collective at all, the gang is
  scheduled all-or-nothing, and a lost worker restarts the whole group; here a lost actor is restarted by
  Ray (``max_restarts``) and its batch retried (``max_task_retries``) while the others go on.
- Plain tasks per batch would reload the decoder (and recompile it, on GPUs) for every batch.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from sdf_ray.errors import ClusterError, cause_line, first_line
from sdf_ray.shapes.outputs import SceneInfo
from sdf_ray.shapes.work import Job, ShapeWorker, evaluate_mesh_file, failed_row, finish_shape
from sdf_ray.startup import SHAPES, StartupClock

log = logging.getLogger("sdf_ray")


@dataclass
class Placement:
    use_gpu: bool
    num_workers: int
    mesh_slots: int
    """How many CPU tasks can run at once next to the actors."""


class _RemoteShapeWorker:
    """The actor: a :class:`ShapeWorker`, built on the first call; one Ray object per shape (``num_returns`` =
    batch size), so each feeds its own CPU task.

    Workaround: Ray logs an error line for every actor with ``max_restarts > 0`` whose constructor arguments live
    in the object store, nested ObjectRefs included (ray-project/ray#53727, Ray 2.60), because a restart fails if
    they are lost. The decoder's weights (~7 MB, always in the object store) therefore come with each call, as an
    ObjectRef inside a list that Ray does not resolve, and are fetched once; a restarted actor fetches them again
    on its next call. Delete when: Ray stops logging that line for arguments the caller keeps alive (then pass
    the weights to the constructor again).
    """

    def __init__(self, job: Job, device: str) -> None:
        from sdf_ray.startup import process_start_time

        self.job, self.device = job, device
        self.worker: ShapeWorker | None = None
        self._building = threading.Lock()  # calls run in threads when batches_in_flight > 1
        self._marks = {"actor_started": process_start_time()}

    def startup_marks(self) -> dict[str, float]:
        """Wall-clock times: this process started, the worker was ready, its first batch's steps."""
        return {**self._marks, **(self.worker.marks if self.worker is not None else {})}

    def run_split(self, decoder_payload: list[Any], scene_ids: Sequence[int], codes_BL: np.ndarray | None) -> Any:
        with self._building:
            if self.worker is None:
                import ray

                self.worker = ShapeWorker(ray.get(decoder_payload[0]), self.job, self.device)
                self._marks["actor_ready"] = time.time()
        try:
            outs = self.worker.run(scene_ids, codes_BL)
        except Exception as exc:
            if is_fatal_device_error(exc):
                # The CUDA context is lost for every thread of this process, and a live process is never restarted:
                # end it, so that Ray restarts the actor (max_restarts) and retries its batches (max_task_retries).
                print(f"[sdf-ray] optimiser actor: {type(exc).__name__}: {first_line(exc)}; "
                      "restarting the actor", file=sys.stderr, flush=True)
                os._exit(1)
            raise
        return outs[0] if len(outs) == 1 else tuple(outs)


def is_fatal_device_error(exc: BaseException) -> bool:
    """A device error after which the process's CUDA context is unusable (an illegal address, a device-side
    assert, a launch failure), as torch raises it: ``torch.AcceleratorError``, or a RuntimeError naming a CUDA
    error in older releases. Running out of memory is not one: the context survives it."""
    import torch

    if isinstance(exc, torch.OutOfMemoryError):
        return False
    accelerator_error = getattr(torch, "AcceleratorError", None)
    if accelerator_error is not None and isinstance(exc, accelerator_error):
        return True
    return isinstance(exc, RuntimeError) and str(exc).lstrip().startswith("CUDA error")


def plan_placement(cfg_device: str, num_workers: int, cpus_per_worker: float, cpus_per_mesh_task: float,
                   resources: dict[str, float]) -> Placement:
    """Where the actors go, from the cluster's resources; a cluster that cannot run the job is a ClusterError."""
    gpus = int(resources.get("GPU", 0))
    cpus = float(resources.get("CPU", 0))
    if cfg_device == "cuda" and gpus == 0:
        raise ClusterError("reconstruct.device is cuda but the Ray cluster has no GPUs")
    use_gpu = cfg_device == "cuda" or (cfg_device == "auto" and gpus > 0)
    n = num_workers or (gpus if use_gpu else max(1, int(cpus // 2)))
    if use_gpu and n > gpus:
        raise ClusterError(f"reconstruct.num_workers={n} GPU actors, but the cluster has {gpus} GPUs")
    left = cpus - n * cpus_per_worker
    if left < cpus_per_mesh_task:
        raise ClusterError(f"the Ray cluster has {cpus:g} CPUs: {n} optimiser actor(s) x {cpus_per_worker:g} CPU "
                           f"leave {max(left, 0):g}, fewer than one meshing task needs "
                           f"({cpus_per_mesh_task:g}); lower reconstruct.num_workers or reconstruct.cpus_per_worker")
    return Placement(use_gpu, n, max(1, int(left // cpus_per_mesh_task)))


class Progress:
    """One line every few seconds: shapes done, shapes/s, ETA."""

    def __init__(self, verb: str, total: int, every_s: float = 5.0, stream: Any = None) -> None:
        self.verb, self.total, self.every_s = verb, total, every_s
        self.stream = stream if stream is not None else sys.stderr
        self.start = time.perf_counter()
        self.last = self.start
        self.done = 0
        self.counts: dict[str, int] = {}

    def update(self, status: str) -> None:
        self.done += 1
        self.counts[status] = self.counts.get(status, 0) + 1
        now = time.perf_counter()
        if now - self.last >= self.every_s or self.done == self.total:
            self.last = now
            print(self.line(now), file=self.stream, flush=True)

    def line(self, now: float | None = None) -> str:
        elapsed = (now or time.perf_counter()) - self.start
        rate = self.done / elapsed if elapsed > 0 else 0.0
        eta = (self.total - self.done) / rate if rate > 0 else float("inf")
        other = ", ".join(f"{n} {s}" for s, n in sorted(self.counts.items()) if s != "ok")
        return (f"{self.verb}: {self.done}/{self.total} shapes" + (f" ({other})" if other else "")
                + f"  {rate:.2f} shapes/s  ETA {_duration(eta)}")


def _duration(seconds: float) -> str:
    if not np.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else (
        f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s")


def run_shapes(job: Job, scenes: Sequence[SceneInfo], decoder_payload: dict[str, Any],
               codes_NL: np.ndarray | None = None, on_row: Callable[[dict[str, Any]], None] | None = None,
               clock: StartupClock | None = None) -> list[dict[str, Any]]:
    """Optimise/decode ``scenes`` on actors and mesh/measure them in CPU tasks; returns one record per scene.

    ``codes_NL`` (``mesh`` mode): row j is the learned code of ``scenes[j]``. ``clock`` (``startup.SHAPES``)
    receives the actors' start-up marks, each the earliest actor's. Ray must be connected.
    """
    import ray

    cfg = job.cfg
    if not scenes:
        return []
    place = plan_placement(cfg.device, cfg.num_workers, cfg.cpus_per_worker, cfg.cpus_per_mesh_task,
                           ray.cluster_resources())
    payload_ref = ray.put(decoder_payload)
    # CUDA graphs (reduce-overhead) are recorded per thread, each with its own memory pool: one batch at a time.
    in_flight = cfg.batches_in_flight or (2 if place.use_gpu and cfg.compile_mode != "reduce-overhead" else 1)
    actor_cls = ray.remote(_RemoteShapeWorker).options(
        num_cpus=cfg.cpus_per_worker, num_gpus=1 if place.use_gpu else 0, max_restarts=1, max_task_retries=1,
        max_concurrency=in_flight)
    actors: list[Any] = [actor_cls.remote(job, "cuda" if place.use_gpu else "cpu")
              for _ in range(min(place.num_workers, len(scenes)))]
    finish = ray.remote(finish_shape).options(num_cpus=cfg.cpus_per_mesh_task, max_retries=1)
    # Equal-sized batches (a lone short tail would waste a device step on a handful of shapes).
    num_batches = max(-(-len(scenes) // cfg.shapes_per_batch), len(actors))
    bounds = np.linspace(0, len(scenes), num_batches + 1).round().astype(int)
    queue = deque([list(range(a, b)) for a, b in zip(bounds[:-1], bounds[1:]) if b > a])
    max_waiting = cfg.max_pending_shapes or max(4 * place.mesh_slots, (in_flight + 1) * cfg.shapes_per_batch)
    load = dict.fromkeys(range(len(actors)), 0)
    batch_refs: dict[Any, tuple[int, int]] = {}  # first return -> (actor, batch size)
    finish_refs: dict[Any, SceneInfo] = {}
    decoded_waiting = 0
    rows: list[dict[str, Any]] = []
    try:
        while queue or batch_refs or finish_refs:
            for a, actor in enumerate(actors):
                while queue and load[a] < in_flight + 1 and decoded_waiting < max_waiting:
                    idx = queue.popleft()
                    ids = [scenes[i].scene_id for i in idx]
                    codes = None if codes_NL is None else np.asarray(codes_NL[idx], dtype=np.float32)
                    refs = actor.run_split.options(num_returns=len(idx)).remote([payload_ref], ids, codes)
                    refs = [refs] if len(idx) == 1 else list(refs)
                    for i, ref in zip(idx, refs):
                        finish_refs[finish.remote(ref, job, scenes[i])] = scenes[i]
                    batch_refs[refs[0]] = (a, len(idx))
                    load[a] += 1
            waiting = list(batch_refs) + list(finish_refs)
            ready, rest = ray.wait(waiting, num_returns=1, timeout=5.0, fetch_local=False)
            if ready and rest:
                more, _ = ray.wait(rest, num_returns=len(rest), timeout=0, fetch_local=False)
                ready += more
            for ref in ready:
                if ref in batch_refs:
                    a, size = batch_refs.pop(ref)
                    load[a] -= 1
                    decoded_waiting += size
                    continue
                scene = finish_refs.pop(ref)
                decoded_waiting = max(0, decoded_waiting - 1)
                try:
                    row = ray.get(ref)
                except ray.exceptions.RayError as exc:
                    log.warning("%s: %s", scene.name, cause_line(exc))
                    row = failed_row(scene, f"error: {cause_line(exc)}")
                rows.append(row)
                if on_row is not None:
                    on_row(row)
        if clock is not None:
            _collect_marks(actors, clock)
    finally:
        for actor in actors:
            ray.kill(actor)
    return rows


# The marks an optimiser actor takes: those of the SHAPES timeline between Ray's connection and the first shape.
ACTOR_MARKS = SHAPES.names[SHAPES.names.index("ray_connected") + 1:SHAPES.names.index("first_shape_done")]


def _collect_marks(actors: Sequence[Any], clock: StartupClock) -> None:
    """The actors' start-up marks into ``clock``: per mark, the earliest actor's, no earlier than Ray's connection.
    Marks after the first shape was done come from an actor Ray restarted, not from the start-up, and are left
    out; so is an actor that does not answer within 10 s in all. A diagnostic: it never fails the run."""
    import ray

    try:
        refs = [actor.startup_marks.remote() for actor in actors]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=10.0)
        found: list[dict[str, float]] = []
        for ref in ready:
            try:
                found.append(ray.get(ref))
            except ray.exceptions.RayError as exc:
                log.debug("no start-up marks from an actor: %s", cause_line(exc))
        first_shape = clock.marks.get("first_shape_done")
        latest = float("inf") if first_shape is None else clock.origin + first_shape
        # A process Ray started earlier and hands to the actor (an idle pooled worker) started before this job:
        # its actor started when Ray was connected at the earliest.
        earliest = clock.origin + clock.marks.get("ray_connected", 0.0)
        for name in ACTOR_MARKS:
            times = [max(m[name], earliest) for m in found if name in m and m[name] <= latest]
            if times:
                clock.mark(name, at=min(times), keep_first=True)
    except Exception as exc:  # the shapes are done and written: a missing breakdown must not lose them
        log.debug("start-up marks not collected: %s", exc)


def evaluate_meshes(items: Sequence[tuple[str, SceneInfo]], data_path: str, cfg: Any, frame: Any,
                    on_row: Callable[[dict[str, Any]], None] | None = None) -> list[dict[str, Any]]:
    """Metrics of existing mesh files, one CPU task each (bounded in flight). Ray must be connected."""
    import ray

    task = ray.remote(evaluate_mesh_file).options(num_cpus=cfg.cpus_per_mesh_task, max_retries=1)
    cpus = float(ray.cluster_resources().get("CPU", 1))
    limit = max(2, int(2 * cpus / cfg.cpus_per_mesh_task))
    pending: dict[Any, SceneInfo] = {}
    todo = deque(items)
    rows: list[dict[str, Any]] = []
    while todo or pending:
        while todo and len(pending) < limit:
            path, scene = todo.popleft()
            pending[task.remote(path, scene, data_path, cfg, frame)] = scene
        ready, _ = ray.wait(list(pending), num_returns=1, timeout=5.0, fetch_local=False)
        for ref in ready:
            scene = pending.pop(ref)
            try:
                row = ray.get(ref)
            except ray.exceptions.RayError as exc:
                row = failed_row(scene, f"error: {cause_line(exc)}")
            rows.append(row)
            if on_row is not None:
                on_row(row)
    return rows
