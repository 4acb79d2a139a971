"""``sdf-ray data from-meshes``: triangle meshes to an sdf-ray dataset, one Ray task per mesh.

The driver finds the meshes, reads each file (so the tasks need no shared filesystem, except for ``.gltf``
files whose buffers live beside them), and keeps at most ``max_in_flight`` tasks running over every CPU of
the cluster. Each finished mesh is written atomically into a work directory next to the output,
``.<out>.from-meshes/``: a rerun after an interruption reuses every mesh already done there (if its file
and the sampling config are unchanged). When all meshes are done the dataset, with ``report.csv``
(``scene, status, reason, triangles, seconds, dropped_ambiguous``), is renamed into place in one step and
the work directory removed.

Statuses: ``ok``; ``invalid`` (the mesh cannot be sampled: unreadable, no triangles, zero area, NaN
vertices, over a size limit, sign undecidable); ``failed`` (the task crashed: a bug or the worker was
killed, e.g. out of memory; retried by a rerun); ``missing`` (a split instance without a mesh file).
"""

from __future__ import annotations

import argparse
import csv
import glob
import hashlib
import io
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Literal

import numpy as np

from sdf_ray.data.mesh_config import MESH_SUFFIXES, MeshSamplingConfig
from sdf_ray.errors import UserError, first_line
from sdf_ray.fsutil import atomic_file, write_json_atomic

log = logging.getLogger("sdf_ray")

REPORT_NAME = "report.csv"
REPORT_COLUMNS = ("scene", "status", "reason", "triangles", "seconds", "dropped_ambiguous")
WORK_VERSION = 1
SHAPENET_MODEL = ("models", "model_normalized")
Status = Literal["ok", "invalid", "failed", "missing"]


@dataclass(frozen=True)
class MeshJob:
    """One scene to produce: its name and mesh file (None when a split instance has no file)."""

    name: str
    path: Path | None
    reason: str = ""


@dataclass(frozen=True)
class MeshOutcome:
    """One row of ``report.csv``."""

    scene: str
    status: Status
    reason: str = ""
    triangles: int = 0
    seconds: float = 0.0
    dropped_ambiguous: int = 0
    reused: bool = False


@dataclass(frozen=True)
class FromMeshesSummary:
    out: Path
    outcomes: tuple[MeshOutcome, ...]
    seconds: float

    def count(self, status: Status) -> int:
        return sum(o.status == status for o in self.outcomes)

    @property
    def num_reused(self) -> int:
        return sum(o.reused for o in self.outcomes)

    def line(self) -> str:
        ok = self.count("ok")
        skipped = len(self.outcomes) - ok
        dropped = sum(o.dropped_ambiguous for o in self.outcomes)
        parts = [f"wrote {ok:,} of {len(self.outcomes):,} meshes to {self.out} in {self.seconds:.1f} s"]
        if skipped:
            detail = ", ".join(f"{self.count(s)} {s}" for s in ("invalid", "failed", "missing") if self.count(s))
            parts.append(f"{skipped:,} skipped ({detail}; see {self.out / REPORT_NAME})")
        if self.num_reused:
            parts.append(f"{self.num_reused:,} reused from an interrupted run")
        if dropped:
            parts.append(f"{dropped:,} samples with an ambiguous sign dropped")
        return "; ".join(parts)


# --------------------------------------------------------------------------------------------------
# Discovery


def _has_magic(s: str) -> bool:
    return any(c in s for c in "*?[")


def _is_mesh_file(p: Path) -> bool:
    return p.suffix.lower() in MESH_SUFFIXES and p.is_file()


def _scene_names(paths: Sequence[Path], base: Path) -> list[str]:
    """Relative path without suffix; ShapeNet's ``<synset>/<id>/models/model_normalized`` becomes ``<synset>/<id>``."""
    rel = [p.relative_to(base) for p in paths]
    names = []
    for r in rel:
        parts = r.with_suffix("").parts
        if parts[-2:] == SHAPENET_MODEL and len(parts) > 2:
            parts = parts[:-2]
        names.append("/".join(parts))
    seen: dict[str, int] = {}
    for n in names:
        seen[n] = seen.get(n, 0) + 1
    # Two files differing only in their suffix (chair.obj, chair.ply) keep it, to stay distinct.
    return [r.as_posix() if seen[n] > 1 else n for n, r in zip(names, rel)]


def _split_candidates(root: Path, dataset: str, cls: str, inst: str) -> list[Path]:
    out = []
    for base in (root, root / dataset):
        out += [base / cls / inst / "models" / "model_normalized.obj", base / cls / inst / "model.obj"]
        out += [base / cls / f"{inst}{s}" for s in MESH_SUFFIXES]
    return out


def discover_meshes(input: str | Path, split: str | Path | None = None) -> list[MeshJob]:
    """The meshes ``input`` names, as jobs with DeepSDF-style scene names, in a fixed order.

    With ``split`` (a DeepSDF split JSON), ``input`` is a directory holding ``<class>/<instance>/models/
    model_normalized.obj`` (ShapeNetCore v2; v1's ``model.obj`` and ``<class>/<instance>.<ext>`` work too),
    scenes are named ``<dataset>/<class>/<instance>`` in the split's order, and instances without a file
    become ``missing`` jobs. Without a split, ``input`` is a directory (searched recursively), a glob
    pattern or one file; scenes are named by their path relative to the directory (or the glob's fixed
    prefix) without the suffix. Raises UserError when nothing matches.
    """
    from sdf_ray.data.deepsdf_import import read_split

    text = str(input)
    if not text:
        raise UserError("--input must not be empty")
    if split is not None:
        root = Path(text)
        if not root.is_dir():
            raise UserError(f"--input {text}: with --split it must be the directory holding <class>/<instance>/ "
                            "meshes, and it is not a directory")
        jobs = []
        for dataset, cls, inst in read_split(split):
            cands = _split_candidates(root, dataset, cls, inst)
            found = next((c for c in cands if c.is_file()), None)
            reason = "" if found else f"no mesh file (looked for {cands[0].relative_to(root)} and others)"
            jobs.append(MeshJob(name=f"{dataset}/{cls}/{inst}", path=found, reason=reason))
        if all(j.path is None for j in jobs):
            raise UserError(f"none of the {len(jobs)} instances of split {split} has a mesh under {root} "
                            f"({jobs[0].reason.removeprefix('no mesh file (')}")
        return jobs

    if _has_magic(text):
        fixed = text[:min(text.index(c) for c in "*?[" if c in text)]
        base = Path(fixed if fixed.endswith(os.sep) else os.path.dirname(fixed) or ".").absolute()
        paths = sorted({Path(q).absolute() for q in glob.glob(text, recursive=True) if _is_mesh_file(Path(q))})
        if not paths:
            raise UserError(f"--input {text} matches no mesh files ({', '.join(MESH_SUFFIXES)})")
    else:
        p = Path(text)
        if p.is_dir():
            base = p.absolute()
            paths = sorted(q.absolute() for q in p.rglob("*")
                           if _is_mesh_file(q) and not any(part.startswith(".") for part in q.relative_to(p).parts))
            if not paths:
                raise UserError(f"--input {text}: the directory holds no mesh files ({', '.join(MESH_SUFFIXES)})")
        elif p.is_file():
            if p.suffix.lower() not in MESH_SUFFIXES:
                raise UserError(f"--input {text}: not a mesh file (supported: {', '.join(MESH_SUFFIXES)})")
            base, paths = p.absolute().parent, [p.absolute()]
        else:
            raise UserError(f"--input {text} does not exist")
    names = _scene_names(paths, base)
    jobs = sorted((MeshJob(name=n, path=q) for n, q in zip(names, paths)), key=lambda j: j.name)
    return jobs


# --------------------------------------------------------------------------------------------------
# Output, work directory, per-mesh results


def _check_output(out: Path, overwrite: bool) -> None:
    from sdf_ray.data.format import MANIFEST_NAME

    if not (out.exists() or out.is_symlink()):
        return
    if out.is_symlink() or not out.is_dir():
        raise UserError(f"output path {out} exists and is not a directory")
    if not any(out.iterdir()):
        return
    if not overwrite:
        raise UserError(f"output {out} already exists (use --overwrite to replace it)")
    if not (out / MANIFEST_NAME).is_file():
        raise UserError(f"output directory {out} is not empty and is not an sdf-ray dataset; refusing to replace "
                        "it even with --overwrite")


def work_dir_for(out: str | Path) -> Path:
    """Where results of an unfinished run live: a hidden sibling of the output."""
    out = Path(os.path.abspath(out))
    return out.parent / f".{out.name}.from-meshes"


def _prepare_work_dir(work: Path, cfg: MeshSamplingConfig) -> None:
    state = {"version": WORK_VERSION, "sampling": cfg.to_dict()}
    run_file = work / "run.json"
    if run_file.is_file():
        try:
            previous = json.loads(run_file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            previous = None
        if previous == json.loads(json.dumps(state)):
            return
        log.warning("from-meshes: %s holds results of a run with other settings; starting over", work)
    if work.exists():
        shutil.rmtree(work)
    (work / "results").mkdir(parents=True)
    write_json_atomic(run_file, state)


def _result_path(work: Path, name: str) -> Path:
    return work / "results" / f"{hashlib.sha1(name.encode('utf-8')).hexdigest()[:24]}.npz"


def _fingerprint(path: Path) -> list[int]:
    st = path.stat()
    return [int(st.st_size), int(st.st_mtime_ns)]


def _save_result(work: Path, job: MeshJob, fingerprint: list[int], outcome: MeshOutcome,
                 arrays: dict[str, np.ndarray], normalization: dict[str, Any] | None) -> None:
    """``fingerprint`` is the file's (size, mtime) when it was read, so a later edit invalidates the result."""
    meta = {"name": job.name, "source": fingerprint, "status": outcome.status, "reason": outcome.reason,
            "triangles": outcome.triangles, "seconds": outcome.seconds, "dropped_ambiguous": outcome.dropped_ambiguous,
            "normalization": normalization}
    with atomic_file(_result_path(work, job.name)) as tmp, open(tmp, "wb") as fh:
        payload: dict[str, Any] = {"meta": np.array(json.dumps(meta)), **arrays}
        np.savez(fh, **payload)


def _load_meta(work: Path, job: MeshJob) -> dict[str, Any] | None:
    """The saved result's description if it belongs to this job and its file is unchanged, else None."""
    p = _result_path(work, job.name)
    if job.path is None or not p.is_file():
        return None
    try:
        with np.load(p, allow_pickle=False) as npz:
            meta = json.loads(str(npz["meta"]))
        if meta.get("name") != job.name or meta.get("source") != _fingerprint(job.path):
            return None
        return dict(meta)
    except (OSError, ValueError, KeyError):
        return None


def _scene_samples(work: Path, name: str, normalization: dict[str, Any]) -> Any:
    from sdf_ray.data.format import SceneSamples

    with np.load(_result_path(work, name), allow_pickle=False) as npz:
        arrays = {k: npz[k] for k in ("pos_N4", "neg_N4", "surface_points_M3", "surface_normals_M3")}
    kwargs: dict[str, Any] = {"name": name, "pos_N4": arrays["pos_N4"], "neg_N4": arrays["neg_N4"],
                              "normalization": normalization}
    have = {f.name for f in fields(SceneSamples)}
    for key in ("surface_points_M3", "surface_normals_M3"):
        if key in have and len(arrays[key]):
            kwargs[key] = arrays[key]
    return SceneSamples(**kwargs)


def _write_report(path: Path, outcomes: Sequence[MeshOutcome]) -> None:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(REPORT_COLUMNS)
    for o in outcomes:
        writer.writerow([o.scene, o.status, o.reason, o.triangles, f"{o.seconds:.3f}", o.dropped_ambiguous])
    with atomic_file(path) as tmp:
        tmp.write_text(buf.getvalue(), encoding="utf-8")


def read_report(path: str | Path) -> list[dict[str, str]]:
    """Rows of a ``report.csv`` as dicts keyed by column name."""
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


# --------------------------------------------------------------------------------------------------
# The Ray task


def sample_mesh_task(name: str, source: str | bytes, file_type: str, cfg_dict: dict[str, Any]) -> dict[str, Any]:
    """Body of one Ray task: sample one mesh; returns ``{"status", "reason", "triangles", "seconds", ...}``.

    A mesh that cannot be sampled is a normal result (``invalid``), not an exception: only crashes fail a task.
    """
    from sdf_ray.data.mesh_sdf import MeshError, process_mesh, set_igl_threads

    set_igl_threads(1)  # the task owns one CPU; libigl would otherwise start a thread per core
    cfg = MeshSamplingConfig.from_dict(cfg_dict)
    t0 = time.perf_counter()
    try:
        ms = process_mesh(source, name, cfg, file_type)
    except MeshError as e:
        return {"status": "invalid", "reason": e.reason, "triangles": e.num_triangles,
                "seconds": time.perf_counter() - t0}
    return {"status": "ok", "reason": "", "triangles": ms.num_triangles, "seconds": time.perf_counter() - t0,
            "dropped_ambiguous": ms.num_dropped_ambiguous, "normalization": ms.normalization,
            "arrays": {"pos_N4": ms.pos_N4, "neg_N4": ms.neg_N4, "surface_points_M3": ms.surface_points_M3,
                       "surface_normals_M3": ms.surface_normals_M3}}


def _connect(address: str | None) -> str:
    from sdf_ray.ray_session import connect_ray

    return connect_ray(address, ray_train=False)


class _Progress:
    def __init__(self, total: int, every_s: float, emit: Callable[[str], None]) -> None:
        self.total, self.every_s, self.emit = total, every_s, emit
        self.done = 0
        self.skipped = 0
        self.t0 = time.perf_counter()
        self.last = -float("inf")

    def tick(self, outcome: MeshOutcome) -> None:
        self.done += 1
        self.skipped += outcome.status != "ok"
        now = time.perf_counter()
        if now - self.last >= self.every_s or self.done == self.total:
            self.last = now
            rate = self.done / max(now - self.t0, 1e-9)
            left = (self.total - self.done) / rate if rate > 0 else float("inf")
            eta = _duration(left) if self.done < self.total else "done"
            skipped = f" ({self.skipped} skipped)" if self.skipped else ""
            self.emit(f"from-meshes: {self.done:,}/{self.total:,} meshes{skipped}, {rate:.2f} meshes/s, ETA {eta}")


def _duration(s: float) -> str:
    if s == float("inf"):
        return "?"
    if s < 90:
        return f"{s:.0f} s"
    if s < 5400:
        return f"{s / 60:.0f} min"
    return f"{s / 3600:.1f} h"


def _run_tasks(jobs: Sequence[MeshJob], work: Path, cfg: MeshSamplingConfig, address: str | None,
               max_in_flight: int | None, progress: _Progress,
               on_result: Callable[[MeshOutcome], None] | None,
               normalizations: dict[str, dict[str, Any]]) -> Iterator[MeshOutcome]:
    from sdf_ray.data.mesh_sdf import file_type_of

    _connect(address)
    import ray

    remote = ray.remote(num_cpus=1, max_retries=1)(sample_mesh_task)
    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    limit = max_in_flight or 2 * cpus  # a queue beyond the CPUs hides the driver's reading and writing
    cfg_dict = cfg.to_dict()
    pending: dict[Any, tuple[MeshJob, float, list[int]]] = {}
    todo = iter(jobs)

    def finish(outcome: MeshOutcome) -> MeshOutcome:
        progress.tick(outcome)
        if on_result is not None:
            on_result(outcome)
        return outcome

    try:
        while True:
            while len(pending) < limit:
                job = next(todo, None)
                if job is None:
                    break
                assert job.path is not None
                ftype = file_type_of(job.path)
                try:
                    fingerprint = _fingerprint(job.path)
                    size = fingerprint[0]
                    # gltf keeps its buffers in side files: the task reads it by path (needs a shared filesystem).
                    source: str | bytes | None = None
                    if size <= cfg.max_file_bytes:
                        source = str(job.path) if ftype == "gltf" else job.path.read_bytes()
                except OSError as e:
                    yield finish(MeshOutcome(job.name, "invalid", f"unreadable: {e.strerror or e}"))
                    continue
                if source is None:  # rejected without reading it
                    outcome = MeshOutcome(job.name, "invalid", f"over the size limit: file is {size:,} bytes, "
                                          f"limit {cfg.max_file_bytes:,}")
                    _save_result(work, job, fingerprint, outcome, {}, None)
                    yield finish(outcome)
                    continue
                pending[remote.remote(job.name, source, ftype, cfg_dict)] = (job, time.perf_counter(), fingerprint)
            if not pending:
                break
            ready, _ = ray.wait(list(pending), num_returns=1)
            for ref in ready:
                job, t_submit, fingerprint = pending.pop(ref)
                try:
                    res = ray.get(ref)
                except (ray.exceptions.RayError, MemoryError) as e:
                    outcome = MeshOutcome(job.name, "failed", f"{type(e).__name__}: {first_line(e)}"[:300],
                                          seconds=time.perf_counter() - t_submit)
                    yield finish(outcome)  # not saved: a rerun tries it again
                    continue
                outcome = MeshOutcome(job.name, res["status"], res["reason"], int(res["triangles"]),
                                      float(res["seconds"]), int(res.get("dropped_ambiguous", 0)))
                _save_result(work, job, fingerprint, outcome, res.get("arrays", {}), res.get("normalization"))
                if outcome.status == "ok":
                    normalizations[job.name] = res["normalization"]
                del res
                yield finish(outcome)
    finally:
        for ref in pending:
            try:
                ray.cancel(ref, force=True)
            except Exception:  # noqa: BLE001 - best effort while unwinding
                pass


# --------------------------------------------------------------------------------------------------
# The command


def run_from_meshes(input: str | Path, out: str | Path, split: str | Path | None = None,
                    cfg: MeshSamplingConfig | None = None, address: str | None = None, overwrite: bool = False, *,
                    max_in_flight: int | None = None, progress_every_s: float = 5.0,
                    on_result: Callable[[MeshOutcome], None] | None = None) -> FromMeshesSummary:
    """Sample every mesh of ``input`` on Ray and write the dataset ``out`` (with ``report.csv``) atomically.

    Resumes from the work directory of an interrupted run (:func:`work_dir_for`). ``on_result`` is called
    after each mesh this run finishes (tests interrupt a run from it). Raises UserError when the input matches
    nothing, when ``out`` exists without ``overwrite``, or when no mesh could be sampled.
    """
    from sdf_ray.data.format import write_dataset

    t0 = time.perf_counter()
    cfg = (cfg or MeshSamplingConfig()).checked()
    if max_in_flight is not None and max_in_flight < 1:
        raise UserError(f"max_in_flight must be a positive integer, got {max_in_flight}")
    if not str(out):
        raise UserError("--out must not be empty")
    out = Path(os.path.abspath(out))
    _check_output(out, overwrite)
    jobs = discover_meshes(input, split)
    work = work_dir_for(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        _prepare_work_dir(work, cfg)
    except OSError as e:
        raise UserError(f"cannot write next to {out}: {e}") from None

    outcomes: dict[str, MeshOutcome] = {}
    normalizations: dict[str, dict[str, Any]] = {}
    todo: list[MeshJob] = []
    for job in jobs:
        if job.path is None:
            outcomes[job.name] = MeshOutcome(job.name, "missing", job.reason)
            continue
        meta = _load_meta(work, job)
        if meta is None:
            todo.append(job)
        else:
            outcomes[job.name] = MeshOutcome(job.name, meta["status"], meta["reason"], int(meta["triangles"]),
                                              float(meta["seconds"]), int(meta["dropped_ambiguous"]), reused=True)
            if meta["status"] == "ok":
                normalizations[job.name] = meta["normalization"]
    reused = sum(o.reused for o in outcomes.values())
    if reused:
        log.info("from-meshes: resuming: %d of %d meshes already done in %s", reused, len(jobs), work)
    if todo:
        progress = _Progress(len(todo), progress_every_s, log.info)
        for outcome in _run_tasks(todo, work, cfg, address, max_in_flight, progress, on_result, normalizations):
            outcomes[outcome.scene] = outcome

    ordered = tuple(outcomes[j.name] for j in jobs)
    ok = [o for o in ordered if o.status == "ok"]
    if not ok:
        report = work / REPORT_NAME
        _write_report(report, ordered)
        first = next((o for o in ordered if o.reason), None)
        example = f" (e.g. {first.scene}: {first.reason})" if first else ""
        raise UserError(f"none of the {len(ordered)} meshes could be sampled{example}; see {report}")

    def scenes() -> Iterator[Any]:
        for o in ok:
            yield _scene_samples(work, o.scene, normalizations[o.scene])

    source = {"type": "meshes", "input": os.path.abspath(str(input)),
              "split": None if split is None else os.path.abspath(str(split)),
              "sampling": cfg.to_dict(), "num_meshes": len(ordered), "num_ok": len(ok),
              "num_skipped": len(ordered) - len(ok),
              "num_dropped_ambiguous": sum(o.dropped_ambiguous for o in ordered)}
    staging = work / "dataset"
    if staging.exists():
        shutil.rmtree(staging)
    write_dataset(staging, scenes(), source)
    _write_report(staging / REPORT_NAME, ordered)
    _swap_into_place(staging, out, work, overwrite)
    shutil.rmtree(work, ignore_errors=True)
    return FromMeshesSummary(out=out, outcomes=ordered, seconds=time.perf_counter() - t0)


def _swap_into_place(staging: Path, out: Path, work: Path, overwrite: bool) -> None:
    _check_output(out, overwrite)  # again: something may have appeared while we were sampling
    old: Path | None = None
    if out.exists():
        if any(out.iterdir()):
            old = work / "replaced"
            os.replace(out, old)
        else:
            out.rmdir()
    try:
        os.replace(staging, out)
    except BaseException:
        if old is not None and not out.exists():
            os.replace(old, out)
        raise


# --------------------------------------------------------------------------------------------------
# CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``data from-meshes`` flags; ``commands.py`` adds the subparser and calls this."""
    d = MeshSamplingConfig()
    parser.add_argument("--input", required=True, metavar="DIR_OR_GLOB",
                        help="a directory (searched recursively), a quoted glob, or one mesh file; with --split, "
                             "the ShapeNet directory holding <class>/<instance>/models/model_normalized.obj")
    parser.add_argument("--out", required=True, metavar="DATASET", help="output dataset directory")
    parser.add_argument("--split", metavar="SPLIT.json", help="DeepSDF split file selecting the instances")
    parser.add_argument("--samples-per-scene", type=int, default=d.num_samples, metavar="N",
                        help=f"SDF samples drawn per mesh (default {d.num_samples:,})")
    parser.add_argument("--surface-samples", type=int, default=d.num_surface_samples, metavar="M",
                        help=f"ground-truth surface points with normals per mesh (default {d.num_surface_samples:,})")
    parser.add_argument("--seed", type=int, default=d.seed, metavar="S", help="sampling seed (default 0)")
    parser.add_argument("--max-triangles", type=int, default=d.max_triangles, metavar="T",
                        help=f"skip meshes with more triangles (default {d.max_triangles:,})")
    parser.add_argument("--address", metavar="ADDR", help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing dataset at --out")


def cmd_from_meshes(args: argparse.Namespace) -> int:
    """``sdf-ray data from-meshes``: exit 0 with the counts when at least one mesh was sampled."""
    for flag, value, low in (("--samples-per-scene", args.samples_per_scene, 2),
                             ("--surface-samples", args.surface_samples, 0),
                             ("--max-triangles", args.max_triangles, 1), ("--seed", args.seed, 0)):
        if value < low:
            raise UserError(f"{flag} must be at least {low}, got {value}")
    cfg = MeshSamplingConfig(num_samples=args.samples_per_scene, num_surface_samples=args.surface_samples,
                             seed=args.seed, max_triangles=args.max_triangles)
    summary = run_from_meshes(args.input, args.out, split=args.split, cfg=cfg, address=args.address,
                              overwrite=args.overwrite)
    print(summary.line())
    return 0
