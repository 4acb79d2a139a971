"""The two units of work of the output end, as plain functions (``pipeline`` puts them on Ray):

- :class:`ShapeWorker` (device): holds the frozen decoder; per batch of scenes it loads their samples,
  optimises their codes (or takes learned ones), measures ``sdf_l1`` and decodes each shape's sparse grid.
- :func:`finish_shape` (CPU): marching cubes, the meshes, the metrics against ground truth, and the shape's
  result record, written last so that a present record means the shape is done.

:func:`evaluate_mesh_file` is the CPU unit of ``sdf-ray evaluate`` (meshes made elsewhere).
"""

from __future__ import annotations

import contextlib
import math
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from sdf_ray.data.format import to_normalized, to_original
from sdf_ray.shapes.config import ReconstructConfig
from sdf_ray.shapes.meshing import GridSpec, Mesh, SparseGrid, extract_mesh, read_mesh, write_ply
from sdf_ray.shapes.outputs import SceneInfo, is_identity, mesh_path, write_result

Mode = Literal["reconstruct", "mesh"]


@dataclass(frozen=True)
class Job:
    """Everything a unit of work needs besides its scene (picklable; paths absolute)."""

    mode: Mode
    out_dir: str
    data_path: str | None
    """The dataset with the scenes' samples and ground truth (None: meshing a run whose dataset is gone)."""
    cfg: ReconstructConfig
    clamp_dist: float
    latent_size: int
    compile_cache_dir: str | None = None
    """torch.compile's caches (the trained run's storage path shares them with training: ``launch``)."""
    decoder_clamp: float = math.inf
    """The clamp distance the decoder was trained with (the run's ``loss.clamp_dist``): meshing reads values beyond
    it as far."""

    def grid_spec(self) -> GridSpec:
        return self.cfg.grid_spec(self.decoder_clamp)


@dataclass
class ShapeOutput:
    """A device's result for one shape: small, except ``grid`` (a few MB at N = 256)."""

    scene_id: int
    status: str
    reason: str
    code: np.ndarray
    loss: float = float("nan")
    iterations: int = 0
    attempts: int = 0
    sdf_l1: float = float("nan")
    dropped_nan_samples: int = 0
    stages: dict[str, float] = field(default_factory=dict)
    """Seconds by stage (``outputs.STAGES``), this shape's share of its batch: load, wait (for the batch's turn on
    the device), optimise, measure (``sdf_l1`` and decoding)."""
    grid: SparseGrid | None = field(default=None, repr=False)


class ShapeWorker:
    """The device side: one per GPU (or CPU worker). ``run`` processes a batch of scenes.

    ``run`` may be called from several threads at once (``reconstruct.batches_in_flight``): each thread works on
    CUDA streams of its own, so its host syncs (decoding plans, transfers) wait for its own kernels only, and
    the optimisations take turns under a lock (two at once would only split the GPU between them, and the
    second batch's results would come later); a thread decodes on a high-priority stream, so that its decoding
    is not queued behind the other thread's optimisation. The first batch runs alone.
    """

    def __init__(self, decoder_payload: dict[str, Any], job: Job, device: str) -> None:
        import torch

        from sdf_ray.data.format import read_manifest
        from sdf_ray.device_settings import resolve_reconstruct_for_device
        from sdf_ray.shapes.reconstruct import prepare
        from sdf_ray.shapes.trained_run import build_decoder

        self.device = torch.device(device)
        self.cfg = resolve_reconstruct_for_device(job.cfg, self.device)
        self.job = job
        if self.device.type == "cpu":
            # As many threads as CPUs reserved: more would spin against the meshing tasks on the same cores.
            torch.set_num_threads(max(1, int(job.cfg.cpus_per_worker)))
        # Compiled: batches are padded to shapes_per_batch and decoding chunks to fixed sizes (static_batch), so
        # the step sees one input shape and the decoder two (coarse and fine decoding): three compilations per
        # actor, whatever the batch sizes.
        self.static_batch = self.cfg.shapes_per_batch if self.cfg.compile else 0
        if self.cfg.compile and job.compile_cache_dir:
            from sdf_ray.device_settings import use_compile_cache

            use_compile_cache(job.compile_cache_dir)
        self.prepared = prepare(build_decoder(decoder_payload, self.device), self.cfg, job.clamp_dist,
                                compile=bool(self.cfg.compile))
        self.manifest = read_manifest(job.data_path) if job.data_path else None
        self.marks: dict[str, float] = {}
        """Wall-clock times of the first batch's steps (``startup.SHAPES``): loaded, optimised, decoded."""
        self._optimising = threading.Lock()
        self._first_batch = threading.Lock()
        self._warm = False
        self._first_decode = threading.Lock()
        self._decoded = False
        self._local = threading.local()
        if self.device.type == "cuda":
            if self.cfg.precision == "tf32":
                # Process-wide, set once: precision_context then finds it on and never switches it off under
                # another thread's forward.
                torch.backends.cuda.matmul.allow_tf32 = True
            torch.cuda.synchronize(self.device)  # the weights are on the default stream; the threads use others

    def _thread_stream(self, name: str, priority: int = 0) -> Any:
        """This thread's CUDA stream ``name`` (made on first use, at ``priority``)."""
        import torch

        stream = getattr(self._local, name, None)
        if stream is None:
            stream = torch.cuda.Stream(self.device, priority=priority)
            setattr(self._local, name, stream)
        return stream

    def _stream(self) -> contextlib.AbstractContextManager[Any]:
        """This thread's CUDA stream, as a context; nothing on CPUs."""
        import torch

        if self.device.type != "cuda":
            return contextlib.nullcontext()
        return torch.cuda.stream(self._thread_stream("stream"))

    @contextlib.contextmanager
    def _measure_stream(self) -> Iterator[None]:
        """This thread's stream for ``sdf_l1`` and decoding, at the highest priority, after the work queued so far
        on the current one; the current one waits for it afterwards (tensors of the batch go back to its pool).

        Decoding syncs with the host a few times per refinement level, and at the default priority each sync waited
        behind the other thread's queue of optimisation GEMMs; at a higher priority its kernels take SMs as blocks
        free up (measured on an H200: docs/performance.md, session 8). Running it after the optimisation instead,
        under the device lock, was slower (session 11): the GPU idles through its syncs and copies. Nothing on CPUs.
        """
        import torch

        if self.device.type != "cuda":
            yield
            return
        stream = self._thread_stream("measure_stream", priority=-100)  # clamped to the highest
        current = torch.cuda.current_stream(self.device)
        stream.wait_stream(current)
        try:
            with torch.cuda.stream(stream):
                yield
        finally:
            current.wait_stream(stream)

    def run(self, scene_ids: Sequence[int], codes_BL: np.ndarray | None = None) -> list[ShapeOutput]:
        """Optimise (``reconstruct``) or take ``codes_BL`` (``mesh``), then measure and decode every shape."""
        with self._stream():
            if not self._warm and not self.prepared.step_apart:
                # The step runs the decoding module: the first batch runs alone, since it compiles (and autotunes)
                # every graph and torch.compile does not promise that one thread may compile a function while
                # another runs it. Otherwise the step compiles under the device lock and the first decoding runs
                # alone (_first_decoding_alone), so the next batch optimises while the first one decodes.
                with self._first_batch:
                    if not self._warm:
                        outs = self._run(scene_ids, codes_BL)
                        # Warm once a batch went through every graph: one that decoded no shape (all failed)
                        # compiled no decoding graph, so the next batch runs alone too.
                        self._warm = any(o.grid is not None for o in outs)
                        return outs
            return self._run(scene_ids, codes_BL)

    def _run(self, scene_ids: Sequence[int], codes_BL: np.ndarray | None) -> list[ShapeOutput]:
        from sdf_ray.shapes.reconstruct import SampleBank, reconstruct_codes
        from sdf_ray.shapes.samples import load_shape_samples

        job, cfg = self.job, self.cfg
        t0 = time.perf_counter()
        shapes = (load_shape_samples(job.data_path, list(scene_ids), self.manifest)
                  if job.data_path is not None else None)
        bank = SampleBank.build(shapes, self.device) if shapes is not None else None
        t_load = time.perf_counter() - t0
        self.marks.setdefault("first_batch_loaded", time.time())
        outs: list[ShapeOutput] = []
        waited = optimised = 0.0
        if job.mode == "reconstruct":
            assert bank is not None and shapes is not None
            t_wait = time.perf_counter()
            with self._optimising:
                t_start = time.perf_counter()
                waited = t_start - t_wait
                found = reconstruct_codes(self.prepared.step, bank, cfg, job.clamp_dist, job.latent_size,
                                          self.static_batch)
                optimised = time.perf_counter() - t_start
            self.marks.setdefault("first_batch_optimised", time.time())
            for r, s in zip(found, shapes):
                outs.append(ShapeOutput(r.scene_id, r.status, r.reason, r.code.numpy(), r.loss, r.iterations,
                                        r.attempts, dropped_nan_samples=s.dropped_nan_rows))
        else:
            assert codes_BL is not None
            for j, sid in enumerate(scene_ids):
                outs.append(ShapeOutput(sid, "ok", "", np.asarray(codes_BL[j], dtype=np.float32),
                                        dropped_nan_samples=shapes[j].dropped_nan_rows if shapes else 0))
        good = [j for j, o in enumerate(outs) if o.status == "ok"]
        if good:
            with self._measure_stream(), self._first_decoding_alone() as decoded:
                self._measure(outs, good, bank, shapes)
                decoded.append(any(outs[j].grid is not None for j in good))
            self.marks.setdefault("first_batch_decoded", time.time())
        for o in outs:
            o.stages.update(load=t_load / len(outs), wait=waited / len(outs), optimise=optimised / len(outs))
        return outs

    @contextlib.contextmanager
    def _first_decoding_alone(self) -> Iterator[list[bool]]:
        """Until a batch has decoded a grid (compiling the decoding graphs), one batch at a time decodes; the caller
        appends whether its batch decoded one."""
        if self._decoded:
            yield []
            return
        with self._first_decode:
            decoded: list[bool] = []
            yield decoded
            self._decoded = self._decoded or any(decoded)

    def _measure(self, outs: list[ShapeOutput], good: list[int], bank: Any, shapes: Any) -> None:
        """``sdf_l1`` and the decoded grids of the shapes ``good`` of ``outs`` (their codes); ends in host copies,
        so no tensor of this call is still in use on the device when it returns."""
        import torch

        from sdf_ray.shapes.decode import decode_sparse_grids
        from sdf_ray.shapes.reconstruct import SampleBank, sdf_l1

        job, cfg = self.job, self.cfg
        t1 = time.perf_counter()
        codes = torch.from_numpy(np.stack([outs[j].code for j in good])).to(self.device)
        if bank is not None:
            sub = SampleBank.build([shapes[j] for j in good], self.device) if len(good) < len(outs) else bank
            for j, value in zip(good, sdf_l1(self.prepared.model, sub, codes, job.clamp_dist, cfg.precision,
                                             cfg.points_per_forward)):
                outs[j].sdf_l1 = value
        grids = decode_sparse_grids(self.prepared.decode, codes, job.grid_spec(), cfg.precision, cfg.points_per_forward,
                                    self.static_batch)
        t_measure = time.perf_counter() - t1  # sdf_l1 and the grids
        for j, grid in zip(good, grids):
            outs[j].grid = grid
            outs[j].stages["measure"] = t_measure / len(good)


def _row(scene: SceneInfo, status: str, reason: str = "", **values: Any) -> dict[str, Any]:
    nan = float("nan")
    row: dict[str, Any] = {"scene": scene.name, "scene_id": scene.scene_id, "status": status, "reason": reason,
                           "chamfer_l2": nan, "chamfer_l1": nan, "normal_consistency": nan, "fscore": nan,
                           "precision": nan, "recall": nan, "sdf_l1": nan, "iterations": None, "attempts": None,
                           "seconds": nan, "loss": nan, "dropped_nan_samples": 0,
                           "has_ground_truth": scene.has_ground_truth, "mesh": None}
    row.update(values)
    return row


def failed_row(scene: SceneInfo, reason: str) -> dict[str, Any]:
    """A shape lost to an error outside the shape itself (a dead worker, a bug): reported, never persisted,
    so a re-run tries it again."""
    return _row(scene, "failed", reason)


def _metrics(mesh: Mesh, scene: SceneInfo, job_data: str | None, cfg: ReconstructConfig) -> dict[str, Any]:
    from sdf_ray.shapes.ground_truth import load_ground_truth
    from sdf_ray.shapes.metrics import mesh_metrics

    if not scene.has_ground_truth or job_data is None:
        return {}
    gt = load_ground_truth(job_data, scene.scene_id, scene.normalization)
    if gt is None:
        return {}
    return mesh_metrics(mesh, gt.points_M3, gt.normals_M3, gt.normalization, num_points=cfg.num_metric_points,
                        tau_normalized=cfg.fscore_tau, seed=cfg.metric_seed).to_dict()


def finish_shape(out: ShapeOutput, job: Job, scene: SceneInfo) -> dict[str, Any]:
    """Mesh, metrics and the shape's record (written last); returns the record."""
    t0 = time.perf_counter()
    out_dir = Path(job.out_dir)
    common: dict[str, Any] = {"iterations": out.iterations, "attempts": out.attempts, "loss": out.loss, "sdf_l1": out.sdf_l1,
              "dropped_nan_samples": out.dropped_nan_samples, "code": [float(v) for v in out.code]}
    stages = dict(out.stages)
    if out.grid is not None:  # what decoding cost: the grid points evaluated, and their share of the dense grid
        common.update(grid_points=out.grid.num_decoded,
                      grid_fraction=out.grid.num_decoded / out.grid.spec.resolution ** 3)
    if out.status != "ok" or out.grid is None:
        row = _row(scene, "failed", out.reason or "no grid was decoded", **common)
    else:
        result = extract_mesh(out.grid)
        if result.status != "ok" or result.mesh is None:
            row = _row(scene, result.status, result.reason, **common)
        else:
            mesh = result.mesh
            path = mesh_path(out_dir, scene.name)
            write_ply(path, mesh.verts_V3, mesh.faces_F3)
            if job.cfg.write_original_frame and not is_identity(scene.normalization):
                write_ply(mesh_path(out_dir, scene.name, original=True),
                          to_original(mesh.verts_V3.astype(np.float64), scene.normalization), mesh.faces_F3)
            t_mesh = time.perf_counter()
            metrics = _metrics(mesh, scene, job.data_path, job.cfg)
            stages["metrics"] = time.perf_counter() - t_mesh
            row = _row(scene, "ok", mesh=str(path.relative_to(out_dir)), **common, **metrics)
        stages["mesh"] = time.perf_counter() - t0 - stages.get("metrics", 0.0)  # marching cubes, PLY files
    row["stages"] = stages
    row["seconds"] = sum(v for name, v in stages.items() if name != "wait")  # its own work, not its wait
    write_result(out_dir, row)
    return row


def evaluate_mesh_file(path: str, scene: SceneInfo, data_path: str, cfg: ReconstructConfig,
                       frame: Literal["normalized", "original"]) -> dict[str, Any]:
    """Metrics of a mesh made elsewhere (in the normalised frame unless ``frame`` says original)."""
    t0 = time.perf_counter()
    try:
        mesh = read_mesh(path)
    except Exception as exc:  # trimesh raises many types for a bad file; the shape fails, the run goes on
        return _row(scene, "failed", f"cannot read {path}: {type(exc).__name__}: {exc}".splitlines()[0])
    if len(mesh.faces_F3) == 0:
        return _row(scene, "empty", f"{path} has no faces", seconds=time.perf_counter() - t0)
    if frame == "original":
        mesh = Mesh(to_normalized(mesh.verts_V3.astype(np.float64), scene.normalization), mesh.faces_F3)
    row = _row(scene, "ok", mesh=path, **_metrics(mesh, scene, data_path, cfg))
    row["seconds"] = time.perf_counter() - t0
    return row
