"""``sdf-ray reconstruct``, ``sdf-ray mesh`` and ``sdf-ray evaluate``.

The CLI calls :func:`register` with its subparsers; each command sets ``func(args) -> int``. Every check that
can fail on the user's input (run directory, dataset, settings, output directory) runs before Ray starts, and
raises a ``UserError`` the CLI prints as one line (exit 2).
"""

from __future__ import annotations

import argparse
import difflib
import logging
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from sdf_ray.errors import ConfigError, DataError

if TYPE_CHECKING:
    from sdf_ray.startup import StartupClock

log = logging.getLogger("sdf_ray")
MESH_SUFFIXES = (".ply", ".obj", ".off", ".stl")
# Settings that change how the work is spread, not what it computes (a batch equals separate runs): a resumed
# job may change them.
_DISTRIBUTION_KEYS = ("device", "num_workers", "cpus_per_worker", "cpus_per_mesh_task", "max_pending_shapes",
                      "shapes_per_batch", "points_per_forward")
SHEET_ENTRIES = 16
"""Shapes in ``DIR/reconstructions.png`` at most."""


def register(subparsers: Any) -> None:
    """Add ``reconstruct``, ``mesh`` and ``evaluate`` to an ``argparse`` subparsers object."""
    common_set = dict(dest="overrides", action="append", default=[], metavar="reconstruct.KEY=VALUE",
                      help="override one reconstruct setting (YAML-parsed), repeatable")
    address = dict(help="Ray cluster address (default: $RAY_ADDRESS, else an embedded local Ray)")

    p = subparsers.add_parser("reconstruct", help="reconstruct unseen shapes with a trained decoder, mesh and "
                              "measure them", description="Optimise one latent code per scene of DATASET with "
                              "the run's decoder frozen, mesh each shape and measure it against ground truth.")
    p.add_argument("--run", required=True, metavar="RUN_DIR", help="training run directory (holds checkpoint_*)")
    p.add_argument("--data", required=True, metavar="DATASET", help="dataset of the shapes to reconstruct")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory (re-running resumes)")
    p.add_argument("--scenes", nargs="+", metavar="NAME", help="only these scenes (default: all)")
    p.add_argument("--set", **common_set)  # type: ignore[arg-type]
    p.add_argument("--address", **address)  # type: ignore[arg-type]
    p.add_argument("--overwrite", action="store_true", help="discard results in DIR from another job")
    p.set_defaults(func=cmd_reconstruct)

    p = subparsers.add_parser("mesh", help="mesh training scenes from their learned codes",
                              description="Mesh a run's training scenes from the codes in its latest checkpoint "
                              "(and measure them where the dataset has ground truth).")
    p.add_argument("--run", required=True, metavar="RUN_DIR", help="training run directory (holds checkpoint_*)")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory (re-running resumes)")
    p.add_argument("--scenes", nargs="+", metavar="NAME", help="only these scenes (default: all)")
    p.add_argument("--data", metavar="DATASET", help="the training dataset (default: the run's data.path)")
    p.add_argument("--set", **common_set)  # type: ignore[arg-type]
    p.add_argument("--address", **address)  # type: ignore[arg-type]
    p.add_argument("--overwrite", action="store_true", help="discard results in DIR from another job")
    p.set_defaults(func=cmd_mesh)

    p = subparsers.add_parser("evaluate", help="measure existing meshes against a dataset's ground truth",
                              description="Compute the reconstruction metrics for meshes made elsewhere: "
                              "DIR/meshes/<scene>.ply (or DIR/<scene>.ply, .obj, .off, .stl).")
    p.add_argument("--meshes", required=True, metavar="DIR", help="directory of meshes named after the scenes")
    p.add_argument("--data", required=True, metavar="DATASET", help="dataset with ground truth")
    p.add_argument("--out", metavar="OUT", help="where metrics.csv and summary.json go (default: DIR/evaluation)")
    p.add_argument("--frame", choices=("normalized", "original"), default="normalized",
                   help="frame the meshes are in (default: normalized, as DeepSDF writes them)")
    p.add_argument("--set", **common_set)  # type: ignore[arg-type]
    p.add_argument("--address", **address)  # type: ignore[arg-type]
    p.set_defaults(func=cmd_evaluate)


# --------------------------------------------------------------------------------------------------
# Shared checks


def _connect(address: str | None) -> str:
    from sdf_ray.ray_session import connect_ray

    return connect_ray(address, fast_reports=False, ray_train=False)


def _dataset(path: str) -> tuple[Path, Any]:
    from sdf_ray.data.format import validate_files

    if not path:
        raise DataError("dataset path must not be empty")
    d = Path(path).expanduser().resolve()
    return d, validate_files(d)


def select_scenes(manifest: Any, names: Sequence[str] | None) -> list[int]:
    """Global ids of ``names`` (all scenes when None); an unknown name is a DataError with a suggestion."""
    all_names = [s.name for s in manifest.scenes]
    if not names:
        return list(range(len(all_names)))
    index = {n: i for i, n in enumerate(all_names)}
    unknown = [n for n in names if n not in index]
    if unknown:
        close = difflib.get_close_matches(unknown[0], all_names, n=1)
        hint = f", did you mean {close[0]!r}?" if close else ""
        raise DataError(f"--scenes: {len(unknown)} unknown scene(s), first {unknown[0]!r}{hint}")
    return list(dict.fromkeys(index[n] for n in names))


def scene_infos(manifest: Any, ids: Sequence[int]) -> list[Any]:
    from sdf_ray.shapes.outputs import SceneInfo

    return [SceneInfo(i, manifest.scenes[i].name, dict(manifest.scenes[i].normalization),
                      manifest.scenes[i].has_ground_truth) for i in ids]


def _compile_cache(run: Any) -> str:
    """The compile cache of the run's storage path, shared with its training (``launch.compile_cache_dir``)."""
    from sdf_ray.launch import compile_cache_dir

    return compile_cache_dir(str(Path(run.directory).resolve().parent))


def _job_record(command: str, cfg: Any, **fields: Any) -> dict[str, Any]:
    from sdf_ray.shapes.config import to_dict

    settings = {k: v for k, v in to_dict(cfg).items() if k not in _DISTRIBUTION_KEYS}
    return {"command": command, **fields, "reconstruct": settings}


def sheet_picks(names: Sequence[str], max_entries: int = SHEET_ENTRIES) -> list[int]:
    """Positions in ``names`` of the shapes ``DIR/reconstructions.png`` shows: up to ``max_entries`` evenly spread
    in name order, listed in that order."""
    order = sorted(range(len(names)), key=names.__getitem__)
    if not order:
        return []
    spread = np.linspace(0, len(order) - 1, min(max_entries, len(order))).round()
    return [order[i] for i in sorted({int(i) for i in spread})]


def _draw_sheet(out_dir: Path, picked: Sequence[dict[str, Any]], total: int, data_path: str | None) -> Path:
    """The records ``picked`` of a job of ``total`` shapes rendered next to their ground truth, in the normalised
    frame (``sdf_ray.plots.contact_sheet``), into ``DIR/reconstructions.png``; raises when it cannot."""
    from sdf_ray.data.format import to_normalized
    from sdf_ray.plots import SheetEntry, contact_sheet
    from sdf_ray.shapes.ground_truth import load_ground_truth
    from sdf_ray.shapes.meshing import read_mesh
    from sdf_ray.shapes.outputs import PICTURE_FILE

    entries = []
    for row in picked:
        verts = faces = gt_points = None
        if row.get("status") == "ok" and row.get("mesh"):
            mesh = read_mesh(out_dir / row["mesh"])
            verts, faces = mesh.verts_V3, mesh.faces_F3
        if data_path and row.get("has_ground_truth"):
            gt = load_ground_truth(data_path, int(row["scene_id"]), {"offset": [0, 0, 0], "scale": 1.0})
            gt_points = None if gt is None else to_normalized(gt.points_M3, gt.normalization)
        chamfer = row.get("chamfer_l2")
        status = row.get("status", "")
        entries.append(SheetEntry(name=row["scene"], vertices=verts, faces=faces, gt_points=gt_points,
                                  chamfer=chamfer if isinstance(chamfer, float) and np.isfinite(chamfer) else None,
                                  status="" if status == "ok" else f"{status}: {row.get('reason', '')}"))
    return contact_sheet(entries, out_dir / PICTURE_FILE, title=f"{len(entries)} of {total} shapes (normalised frame)")


def _contact_sheet(out_dir: Path, rows: Sequence[dict[str, Any]], data_path: str | None) -> Path | None:
    """``DIR/reconstructions.png`` of ``rows`` (the whole job's records, :func:`sheet_picks`); a failure is one
    warning line."""
    from sdf_ray.shapes.outputs import PICTURE_FILE

    picked = [rows[i] for i in sheet_picks([r["scene"] for r in rows])]
    if not picked:
        return None
    try:
        return _draw_sheet(out_dir, picked, len(rows), data_path)
    except Exception as exc:  # the picture is a convenience: never lose the run's results over it
        log.warning("could not draw %s: %s", PICTURE_FILE, exc)
        return None


class SheetInBackground:
    """Draws the contact sheet in a thread of the driver as soon as each of its shapes has its final record, while
    the others go on: the picture takes seconds, which otherwise follow the last shape."""

    def __init__(self, picked: Sequence[str], draw: Callable[[list[dict[str, Any]]], Path]) -> None:
        self._picked = list(picked)
        self._rows: dict[str, dict[str, Any]] = {}
        self._draw = draw
        self._thread: threading.Thread | None = None
        self._picture: Path | None = None

    def add(self, row: dict[str, Any]) -> None:
        """Take one shape's final record; the last of the picked ones starts the drawing."""
        if self._thread is not None or row["scene"] not in self._picked:
            return
        self._rows[row["scene"]] = row
        if len(self._rows) < len(self._picked):
            return
        thread = threading.Thread(target=self._draw_in_thread, args=([self._rows[n] for n in self._picked],),
                                  name="contact-sheet")
        try:
            thread.start()
        except RuntimeError as exc:  # no thread to be had: the picture is drawn at the end instead
            log.debug("contact sheet not drawn in the background: %s", exc)
            return
        self._thread = thread

    def _draw_in_thread(self, picked: list[dict[str, Any]]) -> None:
        try:
            self._picture = self._draw(picked)
        except Exception as exc:  # drawn again at the end, where a failure is the warning line
            log.debug("contact sheet in the background failed: %s", exc)

    def join(self) -> Path | None:
        """The picture, once drawn; None when the drawing failed or never started."""
        if self._thread is not None:
            self._thread.join()
        return self._picture


def _finish(out_dir: Path, verb: str, rows: list[dict[str, Any]], started: float, new: int,
            extra: dict[str, Any], data_path: str | None, clock: StartupClock | None = None,
            sheet: SheetInBackground | None = None) -> int:
    """Tables, summary (with the start-up breakdown of ``clock``, when this run did shapes) and the picture (the one
    ``sheet`` drew, else drawn here)."""
    from sdf_ray.fsutil import write_json_atomic
    from sdf_ray.shapes.outputs import SUMMARY_FILE, summarise, summary_lines, write_tables
    from sdf_ray.startup import SHAPES, format_breakdown

    summary = summarise(rows, seconds=time.perf_counter() - started, shapes_this_run=new, extra=extra)
    if clock is None:  # nothing was done this time: keep the breakdown of the run that did the shapes
        summary.update(_startup_fields(out_dir / SUMMARY_FILE))
    write_tables(out_dir, rows, summary)  # first: the picture takes seconds, and Ctrl-C then loses no table
    picture = sheet.join() if sheet is not None else None
    if picture is None:
        picture = _contact_sheet(out_dir, rows, data_path)
    if clock is not None:
        clock.mark("finished")
        summary.update(clock.summary_fields())
        write_json_atomic(out_dir / SUMMARY_FILE, summary)
    for line in summary_lines(summary):
        print(line)
    if clock is not None:
        print(format_breakdown(summary, SHAPES))
    print(f"{verb}: results in {out_dir}" + (f"; picture {picture}" if picture else ""))
    counts = summary["counts"]
    return 1 if rows and counts["failed"] == len(rows) else 0


def _startup_fields(summary_path: Path) -> dict[str, Any]:
    """The start-up breakdown (``startup_*``, ``perf/*``) of an earlier ``summary.json``; {} if there is none."""
    import json

    try:
        earlier = json.loads(summary_path.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(earlier, dict):
        return {}
    return {k: v for k, v in earlier.items() if k.startswith(("startup_", "perf/"))}


def _resume(out_dir: Path, scenes: Sequence[Any]) -> tuple[list[dict[str, Any]], list[int]]:
    """(records of shapes already done, positions in ``scenes`` still to do)."""
    from sdf_ray.shapes.outputs import read_result

    done, todo = [], []
    for j, scene in enumerate(scenes):
        row = read_result(out_dir, scene.name)
        if row is None:
            todo.append(j)
        else:
            done.append(row)
    return done, todo


def _picks_first(todo: Sequence[int], picks: Sequence[int]) -> list[int]:
    """``todo`` with the positions in ``picks`` moved to the front, each order kept."""
    first = set(picks)
    return [j for j in todo if j in first] + [j for j in todo if j not in first]


def _sheet_first(out_dir: Path, scenes: Sequence[Any], done: Sequence[dict[str, Any]], todo: Sequence[int],
                 data_path: str | None) -> tuple[list[int], SheetInBackground]:
    """``todo`` with the picture's shapes first (picked among all ``scenes``, done ones included: a resumed run
    draws the same picture), and the :class:`SheetInBackground` that draws it once they are done."""
    picks = sheet_picks([s.name for s in scenes])
    sheet = SheetInBackground([scenes[j].name for j in picks],
                              lambda picked: _draw_sheet(out_dir, picked, len(scenes), data_path))
    for row in done:
        sheet.add(row)
    return _picks_first(todo, picks), sheet


def _run(verb: str, job: Any, scenes: list[Any], payload: dict[str, Any], codes: np.ndarray | None,
         address: str | None, extra: dict[str, Any]) -> int:
    from sdf_ray.shapes.pipeline import Progress, run_shapes
    from sdf_ray.startup import SHAPES, StartupClock, phase_line

    out_dir = Path(job.out_dir)
    started = time.perf_counter()
    done, todo = _resume(out_dir, scenes)
    if done:
        print(f"{verb}: {len(done)} of {len(scenes)} shapes already done in {out_dir}, {len(todo)} to go")
    rows = list(done)
    clock = None
    shutdown: threading.Thread | None = None
    sheet: SheetInBackground | None = None
    try:
        if todo:
            todo, sheet = _sheet_first(out_dir, scenes, done, todo, job.data_path)
            clock = StartupClock(timeline=SHAPES)
            clock.mark("checked")
            where = _connect(address)
            clock.mark("ray_connected")
            print(f"sdf-ray {verb}: {len(todo)} shapes on {where}", flush=True)
            progress = Progress(verb, len(todo))

            def on_row(row: dict[str, Any], clock: StartupClock = clock, sheet: SheetInBackground = sheet) -> None:
                clock.mark("first_shape_done", keep_first=True)
                clock.mark("last_shape_done")
                progress.update(row["status"])
                sheet.add(row)

            todo_scenes = [scenes[j] for j in todo]
            todo_codes = None if codes is None else codes[todo]
            rows += run_shapes(job, todo_scenes, payload, todo_codes, on_row=on_row, clock=clock)
            from sdf_ray.ray_session import disconnect_in_background

            shutdown = disconnect_in_background(where)  # every shape is written: Ray stops meanwhile
        return _finish(out_dir, verb, rows, started, len(todo), extra, job.data_path, clock, sheet)
    finally:
        if shutdown is not None:
            waited = time.perf_counter()
            shutdown.join()
            if sys.exc_info()[0] is None:  # not on the way out of an error or Ctrl-C
                print(phase_line("teardown", "ray_shutdown", time.perf_counter() - waited, "the embedded Ray "
                                 "stopped, after the lines above (it began as the last shape was written)"))
        if sheet is not None:
            sheet.join()


# --------------------------------------------------------------------------------------------------
# Commands


def cmd_reconstruct(args: argparse.Namespace) -> int:
    from sdf_ray.shapes.config import from_overrides
    from sdf_ray.shapes.outputs import check_job
    from sdf_ray.shapes.samples import load_shape_samples
    from sdf_ray.shapes.trained_run import load_trained_run
    from sdf_ray.shapes.work import Job

    cfg = from_overrides(args.overrides)
    run = load_trained_run(args.run)
    data, manifest = _dataset(args.data)
    ids = select_scenes(manifest, args.scenes)
    load_shape_samples(data, ids[:1], manifest)  # an unreadable dataset fails here, in one line, before Ray
    out_dir = _out_dir(args.out)
    clamp = cfg.clamp_dist if cfg.clamp_dist is not None else run.config.loss.clamp_dist
    record = _job_record("reconstruct", cfg, run=str(run.directory.resolve()), checkpoint=run.checkpoint.name,
                         dataset=str(data), clamp_dist=clamp)
    check_job(out_dir, record, args.overwrite)
    scenes = scene_infos(manifest, ids)
    if not any(s.has_ground_truth for s in scenes):
        print("reconstruct: the dataset has no ground truth (surface samples): shapes are reconstructed and "
              "meshed; the surface metrics need ground truth")
    job = Job("reconstruct", str(out_dir), str(data), cfg, clamp, run.latent_size, _compile_cache(run),
              run.config.loss.clamp_dist)
    extra = {"command": "reconstruct", "run": str(run.directory), "checkpoint": run.checkpoint.name,
             "dataset": str(data)}
    return _run("reconstruct", job, scenes, run.decoder_payload(), None, args.address, extra)


def cmd_mesh(args: argparse.Namespace) -> int:
    from sdf_ray.shapes.config import from_overrides
    from sdf_ray.shapes.outputs import SceneInfo, check_job
    from sdf_ray.shapes.trained_run import load_trained_run
    from sdf_ray.shapes.work import Job

    cfg = from_overrides(args.overrides)
    run = load_trained_run(args.run)
    num_codes = run.latents_NL.shape[0]
    data_arg = args.data or run.config.data.path
    data: Path | None
    if args.data or Path(data_arg).is_dir():
        data, manifest = _dataset(data_arg)
        if manifest.num_scenes != num_codes:
            raise DataError(f"dataset {data} has {manifest.num_scenes} scenes but the run has {num_codes} codes: "
                            f"not the run's training dataset")
        ids = select_scenes(manifest, args.scenes)
        scenes = scene_infos(manifest, ids)
    else:
        print(f"mesh: the run's dataset {data_arg} is not there: meshing from codes alone (scene-<id> names, "
              f"normalised frame, no metrics); pass --data to use it")
        data = None
        names = [f"scene-{i:06d}" for i in range(num_codes)]
        if args.scenes:
            unknown = [n for n in args.scenes if n not in names]
            if unknown:
                raise DataError(f"--scenes: unknown scene {unknown[0]!r} (without the dataset, scenes are "
                                f"scene-000000 .. scene-{num_codes - 1:06d})")
        ids = [names.index(n) for n in args.scenes] if args.scenes else list(range(num_codes))
        scenes = [SceneInfo(i, names[i], {"offset": [0.0, 0.0, 0.0], "scale": 1.0}, False) for i in ids]
    out_dir = _out_dir(args.out)
    record = _job_record("mesh", cfg, run=str(run.directory.resolve()), checkpoint=run.checkpoint.name,
                         dataset=None if data is None else str(data))
    check_job(out_dir, record, args.overwrite)
    clamp = cfg.clamp_dist if cfg.clamp_dist is not None else run.config.loss.clamp_dist
    job = Job("mesh", str(out_dir), None if data is None else str(data), cfg, clamp, run.latent_size,
              _compile_cache(run), run.config.loss.clamp_dist)
    codes = run.latents_NL.numpy()[ids]
    extra = {"command": "mesh", "run": str(run.directory), "checkpoint": run.checkpoint.name,
             "dataset": None if data is None else str(data)}
    return _run("mesh", job, scenes, run.decoder_payload(), codes, args.address, extra)


def find_mesh(mesh_dir: Path, name: str) -> Path | None:
    """``DIR/meshes/<name>.<ext>`` or ``DIR/<name>.<ext>`` for the first known extension that exists."""
    from sdf_ray.shapes.outputs import MESHES_DIR, scene_relpath

    for base in (mesh_dir / MESHES_DIR, mesh_dir):
        for suffix in MESH_SUFFIXES:
            path = base / scene_relpath(name, suffix)
            if path.is_file():
                return path
    return None


def cmd_evaluate(args: argparse.Namespace) -> int:
    from sdf_ray.shapes.config import from_overrides
    from sdf_ray.shapes.outputs import summarise, summary_lines, write_tables
    from sdf_ray.shapes.pipeline import Progress, evaluate_meshes

    cfg = from_overrides(args.overrides)
    mesh_dir = Path(args.meshes).expanduser().resolve()
    if not mesh_dir.is_dir():
        raise DataError(f"--meshes {mesh_dir}: not a directory")
    data, manifest = _dataset(args.data)
    scenes = scene_infos(manifest, range(manifest.num_scenes))
    if not any(s.has_ground_truth for s in scenes):
        raise DataError(f"dataset {data} has no ground truth (surface samples): evaluate needs it")
    items = [(str(p), s) for s in scenes if s.has_ground_truth and (p := find_mesh(mesh_dir, s.name)) is not None]
    if not items:
        raise DataError(f"--meshes {mesh_dir}: no mesh for any of the dataset's {manifest.num_scenes} scenes with "
                        f"ground truth (looked for meshes/<scene>.ply and <scene>{{{','.join(MESH_SUFFIXES)}}})")
    out_dir = Path(args.out).expanduser().resolve() if args.out else mesh_dir / "evaluation"
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"--out {out_dir}: cannot create it ({exc.strerror})") from None
    started = time.perf_counter()
    where = _connect(args.address)
    print(f"sdf-ray evaluate: {len(items)} meshes on {where}", flush=True)
    progress = Progress("evaluate", len(items))
    rows = evaluate_meshes(items, str(data), cfg, args.frame, on_row=lambda r: progress.update(r["status"]))
    summary = summarise(rows, seconds=time.perf_counter() - started, shapes_this_run=len(rows),
                        extra={"command": "evaluate", "meshes": str(mesh_dir), "dataset": str(data),
                               "frame": args.frame, "num_scenes_without_mesh": sum(
                                   1 for s in scenes if s.has_ground_truth) - len(items)})
    write_tables(out_dir, rows, summary)
    for line in summary_lines(summary):
        print(line)
    print(f"evaluate: results in {out_dir}")
    return 0


def _out_dir(out: str) -> Path:
    if not out:
        raise ConfigError("--out must not be empty")
    d = Path(out).expanduser().resolve()
    if d.exists() and not d.is_dir():
        raise ConfigError(f"--out {d}: exists and is not a directory")
    return d
