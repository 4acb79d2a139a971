"""The output end through Ray with 2 optimiser actors: reconstruct, resume, mesh, evaluate (one Ray for all)."""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest

from sdf_ray.data.format import read_manifest
from tests.test_shapes_helpers import FAST, MarksActor, ShapesData, build_shapes_data, cli, inject_nan_rows

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def shapes_data(tmp_path_factory: pytest.TempPathFactory) -> ShapesData:
    return build_shapes_data(tmp_path_factory)


@pytest.fixture(scope="module")
def heldout_with_nan(shapes_data, tmp_path_factory):
    """The held-out spheres with 5 NaN rows in scene 1 (reconstruction drops and counts them)."""
    path = tmp_path_factory.mktemp("nan") / "heldout"
    shutil.copytree(shapes_data.heldout, path)
    inject_nan_rows(path, 1, 5)
    return path


@pytest.fixture(scope="module")
def reconstructed(ray_session, shapes_data, heldout_with_nan, tmp_path_factory):
    out = tmp_path_factory.mktemp("rec") / "out"
    # Two batches in flight per actor (the GPU default) on CPU actors: the threaded path, end to end.
    argv = ["reconstruct", "--run", str(shapes_data.run), "--data", str(heldout_with_nan), "--out", str(out), *FAST,
            "--set", "reconstruct.batches_in_flight=2", "--set", "reconstruct.shapes_per_batch=1"]
    assert cli(argv) == 0
    return out, argv


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_reconstruct_end_to_end(reconstructed, heldout_with_nan):
    out, _ = reconstructed
    rows = read_csv(out / "metrics.csv")
    names = [s.name for s in read_manifest(heldout_with_nan).scenes]
    assert [r["scene"] for r in rows] == sorted(names)
    for r in rows:
        assert r["status"] == "ok"
        assert float(r["chamfer_l2"]) < 0.05 and 0 <= float(r["fscore"]) <= 1 and float(r["sdf_l1"]) < 0.2
        assert r["iterations"] == "40"
        assert (out / "meshes" / f"{r['scene']}.ply").is_file()
        assert (out / "meshes_original" / f"{r['scene']}.ply").is_file()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["counts"] == {"ok": 3, "empty": 0, "failed": 0}
    assert summary["dropped_nan_samples"] == 5
    assert summary["shapes_this_run"] == 3 and summary["shapes_per_s"] > 0
    assert summary["chamfer_l2_x1e3"]["mean"] == pytest.approx(1e3 * summary["metrics"]["chamfer_l2"]["mean"])
    assert (out / "reconstructions.png").stat().st_size > 1000


def test_summary_says_where_the_time_went_before_the_first_shape(reconstructed):
    """The driver's and the actors' marks, each taken in its own process, arrive in the order the run reaches
    them; the start-up total is the command's time to its first shape, and the phases add up to it."""
    from sdf_ray import startup

    out, _ = reconstructed
    summary = json.loads((out / "summary.json").read_text())
    marks = summary[startup.MARKS_KEY]
    assert set(marks) == set(startup.SHAPES.names)
    times = [marks[m] for m in startup.SHAPES.names]
    assert times == sorted(times) and times[0] == 0.0
    assert summary[startup.STARTUP_KEY] == pytest.approx(marks["first_shape_done"], abs=1e-3)
    assert summary[startup.TEARDOWN_KEY] == pytest.approx(marks["finished"] - marks["last_shape_done"], abs=1e-3)
    listed = startup.phases(marks, startup.SHAPES)
    assert [p for p, _, _ in listed] == [phase for _, phase, _ in startup.SHAPE_MARKS[1:]]
    assert sum(seconds for _, seconds, _ in listed) == pytest.approx(marks["finished"], abs=1e-3)
    # Against the shapes' own stage clocks (one shape per batch here): the first batch's optimisation lies inside
    # the phase that ends with it, and so does its decoding.
    stages = [json.loads(p.read_text())["stages"] for p in (out / "results").glob("*.json")]
    rounding = 1e-3  # marks are kept to 0.1 ms
    assert summary["perf/phase/first_optimise_seconds"] >= min(st["optimise"] for st in stages) - rounding > 0
    assert summary["perf/phase/first_decode_seconds"] >= min(st["measure"] for st in stages) - rounding


def test_start_up_marks_are_the_earliest_actors_and_never_fail_the_run(ray_session):
    """Per mark the earliest actor's; a mark after the first shape (a restarted actor's) is not start-up; an actor
    that fails to answer is left out without an error."""
    import ray

    from sdf_ray.shapes.pipeline import _collect_marks
    from sdf_ray.startup import SHAPES, StartupClock

    clock = StartupClock(origin=1000.0, timeline=SHAPES)
    clock.mark("ray_connected", at=1004.0)
    clock.mark("first_shape_done", at=1050.0)
    actor = ray.remote(num_cpus=0)(MarksActor)
    actors = [actor.remote({"actor_started": 990.0, "actor_ready": 1020.0, "first_batch_loaded": 1021.0}),
              actor.remote({"actor_started": 1005.0, "actor_ready": 1060.0, "first_batch_decoded": 1070.0}),
              actor.remote({}, fail=True)]
    _collect_marks(actors, clock)
    # 990: a process Ray had started before the job (a pooled worker): the actor started with the job at the earliest
    assert {k: clock.marks[k] for k in ("actor_started", "actor_ready", "first_batch_loaded")} == {
        "actor_started": 4.0, "actor_ready": 20.0, "first_batch_loaded": 21.0}
    assert "first_batch_optimised" not in clock.marks and "first_batch_decoded" not in clock.marks
    for a in actors:
        ray.kill(a)


def test_rerun_skips_done_shapes(reconstructed, capsys):
    out, argv = reconstructed
    before = {p: p.stat().st_mtime_ns for p in (out / "results").glob("*.json")}
    breakdown = {k: v for k, v in json.loads((out / "summary.json").read_text()).items() if k.startswith("perf/")}
    capsys.readouterr()
    assert cli(argv) == 0
    assert "3 of 3 shapes already done" in capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert summary["shapes_this_run"] == 0 and "perf/startup_seconds" in breakdown
    assert {k: v for k, v in summary.items() if k.startswith("perf/")} == breakdown  # the working run's, kept
    assert {p: p.stat().st_mtime_ns for p in (out / "results").glob("*.json")} == before
    redo = next(iter(before))
    redo.unlink()
    assert cli(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["shapes_this_run"] == 1 and summary["num_shapes"] == 3 and redo.is_file()


def test_mesh_training_scenes_from_their_codes(ray_session, shapes_data, tmp_path, capfd):
    out = tmp_path / "mesh"
    assert cli(["mesh", "--run", str(shapes_data.run), "--out", str(out), "--scenes", "sphere-1", "sphere-3",
                *FAST, "--set", "reconstruct.num_workers=1"]) == 0
    # Ray's error line for restartable actors built from object-store arguments (the weights travel per call)
    captured = capfd.readouterr()
    assert "constructor arguments in the object store" not in captured.err
    rows = read_csv(out / "metrics.csv")
    assert [r["scene"] for r in rows] == ["sphere-1", "sphere-3"]
    assert all(r["status"] == "ok" and r["iterations"] == "0" and float(r["chamfer_l2"]) < 0.05 for r in rows)
    # No optimisation: that mark is absent and its phase merges into decoding's, in summary.json and on screen.
    summary = json.loads((out / "summary.json").read_text())
    assert "first_batch_optimised" not in summary["startup_marks"]
    assert summary["perf/phase/first_optimise+first_decode_seconds"] >= 0
    assert "time: first shape done" in captured.out and "first_optimise+first_decode" in captured.out


def test_evaluate_meshes_made_elsewhere(ray_session, reconstructed, heldout_with_nan, tmp_path):
    out, _ = reconstructed
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(out / "meshes", elsewhere)
    next(elsewhere.glob("*.ply")).unlink()  # one shape has no mesh: measured are the others
    assert cli(["evaluate", "--meshes", str(elsewhere), "--data", str(heldout_with_nan), *FAST]) == 0
    rows = {r["scene"]: r for r in read_csv(elsewhere / "evaluation" / "metrics.csv")}
    ours = {r["scene"]: r for r in read_csv(out / "metrics.csv")}
    assert len(rows) == 2
    for name, r in rows.items():
        assert r["status"] == "ok" and r["sdf_l1"] == ""
        assert float(r["chamfer_l2"]) == pytest.approx(float(ours[name]["chamfer_l2"]), rel=1e-6)
    summary = json.loads((elsewhere / "evaluation" / "summary.json").read_text())
    assert summary["num_scenes_without_mesh"] == 1 and np.isfinite(summary["metrics"]["fscore"]["mean"])
