"""The output end without Ray: bad input (one line, exit 2, nothing half-written), the units of work, the
output files, the config section."""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys

import numpy as np
import pytest

from sdf_ray.data.format import to_original
from sdf_ray.errors import ConfigError, DataError, UserError
from sdf_ray.shapes.config import ReconstructConfig, from_overrides
from sdf_ray.shapes.meshing import read_mesh
from sdf_ray.shapes.outputs import CSV_COLUMNS, SceneInfo, check_job, metrics_csv, read_result, summarise
from sdf_ray.shapes.trained_run import load_trained_run
from sdf_ray.shapes.work import Job, ShapeWorker, evaluate_mesh_file, finish_shape
from tests.test_shapes_helpers import FAST, ShapesData, build_shapes_data, cli, one_thread, sphere_dataset


@pytest.fixture(scope="module")
def shapes_data(tmp_path_factory: pytest.TempPathFactory) -> ShapesData:
    return build_shapes_data(tmp_path_factory)


# --------------------------------------------------------------------------------------------------
# Bad input: each is a UserError whose message is one line, raised before Ray starts or anything is written.


def user_error(argv: list[str], kind: type[UserError], match: str) -> str:
    with pytest.raises(kind, match=match) as info:
        cli(argv)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_run_dir_without_checkpoint(tmp_path, shapes_data):
    empty = tmp_path / "run"
    empty.mkdir()
    out = tmp_path / "out"
    user_error(["reconstruct", "--run", str(empty), "--data", str(shapes_data.heldout), "--out", str(out)],
               ConfigError, "no checkpoint")
    user_error(["mesh", "--run", str(tmp_path / "missing"), "--out", str(out)], ConfigError, "does not exist")
    assert not out.exists()


def test_run_with_non_finite_decoder_weights(tmp_path, shapes_data):
    import torch

    from sdf_ray.shapes.trained_run import latest_checkpoint

    run = tmp_path / "run"
    shutil.copytree(shapes_data.run, run)
    state_file = next((latest_checkpoint(run) or run).glob("state.pt"))
    state = torch.load(state_file, weights_only=False)
    next(t for t in state["decoder"].values() if t.is_floating_point()).view(-1)[3] = float("nan")
    torch.save(state, state_file)
    out = tmp_path / "out"
    user_error(["reconstruct", "--run", str(run), "--data", str(shapes_data.heldout), "--out", str(out)],
               ConfigError, "1 non-finite decoder weights")
    assert not out.exists()


def test_unreadable_dataset(tmp_path, shapes_data):
    broken = tmp_path / "broken"
    shutil.copytree(shapes_data.heldout, broken)
    part = next(broken.glob("part-*.parquet"))
    part.write_bytes(part.read_bytes()[:100])
    out = tmp_path / "out"
    base = ["reconstruct", "--run", str(shapes_data.run), "--out", str(out)]
    user_error(base + ["--data", str(broken)], DataError, "corrupt or truncated")
    user_error(base + ["--data", str(tmp_path / "nowhere")], DataError, "does not exist")
    user_error(base + ["--data", str(shapes_data.heldout), "--scenes", "sphere-9"], DataError, "unknown scene")
    assert not out.exists()


@pytest.mark.parametrize("setting, match", [
    ("reconstruct.mesh_resolution=2048", r"mesh_resolution`: must be in \[8, 1024\]"),
    ("reconstruct.mesh_resolution=4", r"mesh_resolution`: must be in \[8, 1024\]"),
    ("reconstruct.num_iterations=0", r"num_iterations`: must be in \[1, 100000\]"),
    ("reconstruct.num_iterations=1000000", r"num_iterations`: must be in \[1, 100000\]"),
    ("reconstruct.num_iteration=5", "did you mean `reconstruct.num_iterations`"),
    ("optim.lr=1", "only `reconstruct.KEY=VALUE`"),
])
def test_settings_out_of_range(tmp_path, shapes_data, setting, match):
    out = tmp_path / "out"
    user_error(["reconstruct", "--run", str(shapes_data.run), "--data", str(shapes_data.heldout), "--out", str(out),
                "--set", setting], ConfigError, match)
    assert not out.exists()


def test_evaluate_without_meshes_or_ground_truth(tmp_path, shapes_data):
    meshes = tmp_path / "meshes"
    meshes.mkdir()
    (meshes / "someone-else.ply").write_text("ply\n")
    user_error(["evaluate", "--meshes", str(meshes), "--data", str(shapes_data.heldout)], DataError,
               "no mesh for any of the dataset's 3 scenes")
    no_gt = sphere_dataset(tmp_path / "no-gt", [0.4], num_surface=0)
    (meshes / "sphere-0.ply").write_text("ply\n")
    user_error(["evaluate", "--meshes", str(meshes), "--data", str(no_gt)], DataError, "no ground truth")
    user_error(["evaluate", "--meshes", str(tmp_path / "nothing"), "--data", str(no_gt)], DataError,
               "not a directory")


def test_output_path_problems(tmp_path, shapes_data):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    base = ["reconstruct", "--run", str(shapes_data.run), "--data", str(shapes_data.heldout)]
    user_error(base + ["--out", str(a_file)], ConfigError, "not a directory")
    other = tmp_path / "other"
    other.mkdir()
    (other / "job.json").write_text(json.dumps({"command": "reconstruct", "reconstruct": {"seed": 7}}))
    message = user_error(base + ["--out", str(other)], ConfigError, "holds results of another job")
    assert "--overwrite" in message


# --------------------------------------------------------------------------------------------------
# The units of work, in-process


@pytest.fixture(scope="module")
def worked(shapes_data, tmp_path_factory):
    """Two held-out spheres through the device unit and the CPU unit, in-process."""
    out = tmp_path_factory.mktemp("worked")
    run = load_trained_run(shapes_data.run)
    cfg = dataclasses.replace(from_overrides(FAST[1::2]), cpus_per_worker=1.0)
    job = Job("reconstruct", str(out), str(shapes_data.heldout), cfg, run.config.loss.clamp_dist, run.latent_size)
    from sdf_ray.data.format import read_manifest

    manifest = read_manifest(shapes_data.heldout)
    scenes = [SceneInfo(i, manifest.scenes[i].name, manifest.scenes[i].normalization, True) for i in (0, 1)]
    with one_thread():
        worker = ShapeWorker(run.decoder_payload(), job, "cpu")
        outs = worker.run([0, 1])
        rows = [finish_shape(o, job, s) for o, s in zip(outs, scenes)]
    return out, job, scenes, outs, rows


def test_finish_writes_meshes_in_both_frames_metrics_and_the_record_last(worked):
    out, job, scenes, outs, rows = worked
    for o, row, scene in zip(outs, rows, scenes):
        assert set(row["stages"]) == {"load", "wait", "optimise", "measure", "mesh", "metrics"}
        assert row["stages"]["optimise"] > 0 and row["stages"]["mesh"] > 0 and row["stages"]["metrics"] > 0
        assert row["stages"]["wait"] < 1e-3  # one batch on one thread never waits for the device
        assert sum(row["stages"].values()) == pytest.approx(row["seconds"], rel=0.05)
        assert o.grid is not None and o.status == "ok" and o.iterations == 40
        assert row["status"] == "ok", row["reason"]
        assert np.isfinite(row["chamfer_l2"]) and np.isfinite(row["sdf_l1"]) and 0 <= row["fscore"] <= 1
        mesh = read_mesh(out / "meshes" / f"{scene.name}.ply")
        original = read_mesh(out / "meshes_original" / f"{scene.name}.ply")
        np.testing.assert_allclose(original.verts_V3, to_original(mesh.verts_V3.astype(np.float64), scene.normalization),
                                   rtol=1e-6, atol=1e-6)
        assert read_result(out, scene.name) == json.loads(json.dumps(row))
        assert len(row["code"]) == 8
        n = job.cfg.mesh_resolution
        assert row["grid_points"] == o.grid.num_decoded and 0 < row["grid_points"] < n ** 3
        assert row["grid_fraction"] == pytest.approx(row["grid_points"] / n ** 3)


def test_evaluate_unit_reproduces_the_metrics_of_its_own_meshes(worked):
    out, job, scenes, outs, rows = worked
    for row, scene in zip(rows, scenes):
        again = evaluate_mesh_file(str(out / row["mesh"]), scene, job.data_path, job.cfg, "normalized")
        assert again["chamfer_l2"] == pytest.approx(row["chamfer_l2"], rel=1e-9)
        original = evaluate_mesh_file(str(out / "meshes_original" / f"{scene.name}.ply"), scene, job.data_path,
                                      job.cfg, "original")
        assert original["chamfer_l2"] == pytest.approx(row["chamfer_l2"], rel=1e-4)
    broken = out / "broken.ply"
    broken.write_text("not a mesh")
    assert evaluate_mesh_file(str(broken), scenes[0], job.data_path, job.cfg, "normalized")["status"] == "failed"


def test_without_ground_truth_shapes_are_meshed_and_the_summary_says_why_no_metrics(worked, tmp_path):
    from sdf_ray.shapes.outputs import summary_lines

    _, job, scenes, outs, _ = worked
    job = dataclasses.replace(job, out_dir=str(tmp_path))
    row = finish_shape(outs[0], job, dataclasses.replace(scenes[0], has_ground_truth=False))
    assert row["status"] == "ok" and (tmp_path / row["mesh"]).is_file()
    assert np.isnan(row["chamfer_l2"]) and np.isfinite(row["sdf_l1"])
    lines = summary_lines(summarise([row], seconds=1.0, shapes_this_run=1))
    assert any("need ground truth" in line for line in lines)


def test_batches_in_two_threads_equal_one_after_the_other_and_optimise_in_turn(shapes_data, tmp_path, monkeypatch):
    """``batches_in_flight: 2`` runs two ``ShapeWorker.run`` calls in threads of one actor: same codes, sdf_l1 and
    grids as the calls one after the other, and never two optimisations at once."""
    import threading
    import time

    import sdf_ray.shapes.reconstruct as rec

    run = load_trained_run(shapes_data.run)
    cfg = dataclasses.replace(from_overrides(FAST[1::2]), cpus_per_worker=1.0)
    job = Job("reconstruct", str(tmp_path), str(shapes_data.heldout), cfg, run.config.loss.clamp_dist,
              run.latent_size)
    batches = [[0, 2], [1]]
    with one_thread():
        worker = ShapeWorker(run.decoder_payload(), job, "cpu")
        alone = [worker.run(b) for b in batches]
        inside, most = [0], [0]
        optimise = rec.reconstruct_codes

        def tracked(*args, **kwargs):
            inside[0] += 1
            most[0] = max(most[0], inside[0])
            time.sleep(0.3)  # long enough for the other thread to arrive
            try:
                return optimise(*args, **kwargs)
            finally:
                inside[0] -= 1

        monkeypatch.setattr(rec, "reconstruct_codes", tracked)
        together: list = [None, None]

        def work(i: int) -> None:
            together[i] = worker.run(batches[i])

        threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert most[0] == 1
    # The batch that came second waited for the other's optimisation (0.3 s at least), and says so.
    assert max(sum(o.stages["wait"] for o in batch) for batch in together) > 0.25
    for a_batch, t_batch in zip(alone, together):
        assert t_batch is not None
        for a, t in zip(a_batch, t_batch):
            assert (a.scene_id, a.status) == (t.scene_id, t.status)
            np.testing.assert_array_equal(a.code, t.code)
            assert a.sdf_l1 == t.sdf_l1
            assert a.grid is not None and t.grid is not None
            np.testing.assert_array_equal(a.grid.fine_values, t.grid.fine_values)


def test_the_worker_finds_the_same_codes_with_either_code_gradient(shapes_data, tmp_path):
    """The optimiser actor's unit with the hand-written gradient (the default) and with autograd (fp32, same seeds)."""
    run = load_trained_run(shapes_data.run)
    found = {}
    for gradient in ("hand-written", "autograd"):
        cfg = dataclasses.replace(from_overrides(FAST[1::2]), code_gradient=gradient, precision="fp32")
        job = Job("reconstruct", str(tmp_path / gradient), str(shapes_data.heldout), cfg, run.config.loss.clamp_dist,
                  run.latent_size)
        with one_thread():
            found[gradient] = ShapeWorker(run.decoder_payload(), job, "cpu").run([0, 1])
    for a, b in zip(found["hand-written"], found["autograd"]):
        assert a.status == b.status == "ok" and a.iterations == b.iterations == 40
        np.testing.assert_allclose(a.code, b.code, rtol=1e-4, atol=1e-5)
        assert a.sdf_l1 == pytest.approx(b.sdf_l1, rel=1e-4)


def test_mesh_mode_takes_the_learned_codes(shapes_data, tmp_path):
    run = load_trained_run(shapes_data.run)
    cfg = from_overrides(FAST[1::2])
    job = Job("mesh", str(tmp_path), str(shapes_data.train), cfg, 0.5, run.latent_size)
    with one_thread():
        outs = ShapeWorker(run.decoder_payload(), job, "cpu").run([2], run.latents_NL[2:3].numpy())
    assert outs[0].iterations == 0 and outs[0].grid is not None
    np.testing.assert_array_equal(outs[0].code, run.latents_NL[2].numpy())
    assert outs[0].sdf_l1 < 0.1


# --------------------------------------------------------------------------------------------------
# Output files


def test_csv_and_summary():
    nan = float("nan")
    rows = [{"scene": "b", "status": "ok", "chamfer_l2": 2e-3, "chamfer_l1": 0.01, "normal_consistency": 0.9,
             "fscore": 0.5, "sdf_l1": 0.01, "iterations": 800, "seconds": 1.5, "has_ground_truth": True,
             "dropped_nan_samples": 3},
            {"scene": "a", "status": "ok", "chamfer_l2": 4e-3, "chamfer_l1": 0.02, "normal_consistency": nan,
             "fscore": 1.0, "sdf_l1": 0.03, "iterations": 800, "seconds": 1.0, "has_ground_truth": True},
            {"scene": "c", "status": "empty", "chamfer_l2": nan, "iterations": 800, "seconds": 1.0},
            {"scene": "d", "status": "failed", "reason": "x", "iterations": 17}]
    text = metrics_csv(rows)
    lines = text.splitlines()
    assert lines[0] == ",".join(CSV_COLUMNS)
    assert lines[1] == "b,ok,0.002,0.01,0.9,0.5,0.01,800,1.5"
    assert lines[3] == "c,empty,,,,,,800,1"
    s = summarise(rows, seconds=2.0, shapes_this_run=4)
    assert s["counts"] == {"ok": 2, "empty": 1, "failed": 1}
    assert s["metrics"]["chamfer_l2"]["mean"] == pytest.approx(3e-3)
    assert s["chamfer_l2_x1e3"]["median"] == pytest.approx(3.0)
    assert s["metrics"]["normal_consistency"]["count"] == 1
    assert s["shapes_per_s"] == 2.0 and s["dropped_nan_samples"] == 3
    assert "stages" not in s  # records without stages (evaluate, older runs)


def test_summary_adds_up_where_the_time_went():
    from sdf_ray.shapes.outputs import STAGES, summary_lines

    rows = [{"scene": "a", "status": "ok", "stages": {"load": 0.01, "wait": 0.2, "optimise": 0.14, "measure": 0.02,
                                                      "mesh": 0.5, "metrics": 0.3}},
            {"scene": "b", "status": "failed", "stages": {"load": 0.03, "wait": 0.0, "optimise": 0.16}},
            {"scene": "c", "status": "failed", "reason": "lost with its actor"}]  # no stages: left out
    s = summarise(rows, seconds=1.0, shapes_this_run=3)
    assert list(s["stages"]) == list(STAGES)
    assert s["stages"]["optimise"] == {"per_shape_s": pytest.approx(0.15), "total_s": pytest.approx(0.30)}
    assert s["stages"]["wait"]["per_shape_s"] == pytest.approx(0.1)
    assert s["stages"]["mesh"] == {"per_shape_s": pytest.approx(0.25), "total_s": pytest.approx(0.5)}
    line = next(x for x in summary_lines(s) if "seconds per shape" in x)
    assert "optimise 0.150" in line and "metrics 0.150" in line
    assert "grid_points" not in s and not any("grid:" in x for x in summary_lines(s))


def test_summary_says_how_much_of_the_grid_was_decoded():
    from sdf_ray.shapes.outputs import summary_lines

    rows = [{"scene": "a", "status": "ok", "grid_points": 3_000_000, "grid_fraction": 0.2},
            {"scene": "b", "status": "empty", "grid_points": 1_000_000, "grid_fraction": 0.1},
            {"scene": "c", "status": "failed", "reason": "lost with its actor"}]  # never decoded: left out
    s = summarise(rows, seconds=1.0, shapes_this_run=3)
    assert s["grid_points"] == {"mean": 2e6, "fraction_of_dense": pytest.approx(0.15), "count": 2}
    assert "  grid: 2.00 M points decoded per shape, 15.0% of the dense grid" in "\n".join(summary_lines(s))


def test_job_record_resumes_same_job_and_refuses_another(tmp_path):
    job = {"command": "reconstruct", "dataset": "/d", "reconstruct": {"seed": 0}}
    assert check_job(tmp_path / "o", job, overwrite=False) is False
    (tmp_path / "o" / "results").mkdir()
    (tmp_path / "o" / "results" / "s.json").write_text("{}")
    assert check_job(tmp_path / "o", job, overwrite=False) is True
    other = {**job, "reconstruct": {"seed": 1}}
    with pytest.raises(ConfigError, match="reconstruct.seed: 0 -> 1"):
        check_job(tmp_path / "o", other, overwrite=False)
    assert check_job(tmp_path / "o", other, overwrite=True) is False
    assert not (tmp_path / "o" / "results").exists()


def test_defaults_are_the_reference_ones():
    c = ReconstructConfig()
    assert (c.num_iterations, c.samples_per_iteration, c.lr, c.init_std, c.code_reg_lambda) == (800, 8000, 5e-3,
                                                                                                0.01, 1e-4)
    assert (c.mesh_resolution, c.num_metric_points, c.fscore_tau) == (256, 30_000, 0.01)


def test_only_errors_that_lose_the_cuda_context_restart_the_optimiser_actor():
    import torch

    from sdf_ray.shapes.pipeline import is_fatal_device_error

    assert is_fatal_device_error(RuntimeError("CUDA error: an illegal memory access was encountered"))
    if hasattr(torch, "AcceleratorError"):
        assert is_fatal_device_error(torch.AcceleratorError("CUDA error: device-side assert triggered"))
    assert not is_fatal_device_error(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert not is_fatal_device_error(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    assert not is_fatal_device_error(ValueError("CUDA error: not a RuntimeError"))


@pytest.mark.parametrize("where", ["embedded local Ray (127.0.0.1:1)", "existing Ray session"])
@pytest.mark.parametrize("finish_fails", [False, True])
def test_a_command_that_started_ray_stops_it_while_writing_its_tables_and_picture(where, finish_fails, tmp_path,
                                                                                monkeypatch):
    """reconstruct / mesh: once every shape is written, the Ray the command started shuts down in a thread while the
    tables and the picture are written, and the command returns (or raises) only after both; a session it found
    stays up."""
    import threading

    from sdf_ray import ray_session
    from sdf_ray.shapes import commands, pipeline

    shutting_down, finished = threading.Event(), threading.Event()
    seen: dict[str, object] = {}

    def disconnect() -> None:
        seen["thread"] = threading.current_thread().name
        shutting_down.set()
        seen["overlapped"] = finished.wait(timeout=10)  # the tables are written meanwhile
        seen["ended"] = True

    def finish(*args, **kwargs) -> int:
        if where.startswith("embedded"):
            assert shutting_down.wait(timeout=10)
        finished.set()
        if finish_fails:
            raise KeyboardInterrupt
        return 0

    monkeypatch.setattr(ray_session, "disconnect_ray", disconnect)
    monkeypatch.setattr(commands, "_connect", lambda address: where)
    monkeypatch.setattr(pipeline, "run_shapes", lambda *a, **k: [{"scene": "a", "status": "ok"}])
    monkeypatch.setattr(commands, "_finish", finish)
    job = Job("reconstruct", str(tmp_path), None, ReconstructConfig(), 0.1, 8)
    scenes = [SceneInfo(0, "a", {"offset": [0, 0, 0], "scale": 1.0}, False)]
    if finish_fails:
        with pytest.raises(KeyboardInterrupt):
            commands._run("reconstruct", job, scenes, {}, None, None, {})
    else:
        assert commands._run("reconstruct", job, scenes, {}, None, None, {}) == 0
    if where.startswith("existing"):
        assert seen == {}
    else:
        assert seen == {"thread": "ray-shutdown", "overlapped": True, "ended": True}  # joined before returning


def test_a_failed_shutdown_in_the_background_is_one_warning_line(monkeypatch, caplog):
    from sdf_ray import ray_session

    def broken() -> None:
        raise RuntimeError("raylet gone\nmore detail")

    monkeypatch.setattr(ray_session, "disconnect_ray", broken)
    seen: list[object] = []
    monkeypatch.setattr("threading.excepthook", seen.append)  # a traceback would be reported here
    thread = ray_session.disconnect_in_background("embedded local Ray (127.0.0.1:1)")
    assert thread is not None
    thread.join()
    assert seen == []
    assert [r.getMessage() for r in caplog.records] == ["warning: Ray did not shut down cleanly: raylet gone"]


def test_an_embedded_ray_loses_its_autoscaler_monitor_before_it_shuts_down(monkeypatch):
    """The monitor hangs a second on SIGTERM once the GCS is gone (Ray stops the GCS first): disconnect_ray kills it
    before ray.shutdown(), and a Ray that only connected (no node of its own) is shut down as before."""
    import ray
    from ray._private import ray_constants, worker

    from sdf_ray import ray_session

    class Process:
        killed = False

        def kill(self) -> None:
            self.killed = True

    class Info:
        def __init__(self) -> None:
            self.process = Process()

    monitor, raylet = Info(), Info()
    calls: list[tuple[bool, bool]] = []
    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray, "shutdown", lambda: calls.append((monitor.process.killed, raylet.process.killed)))
    node = type("Node", (), {"all_processes": {ray_constants.PROCESS_TYPE_MONITOR: [monitor],
                                               ray_constants.PROCESS_TYPE_RAYLET: [raylet]}})()
    monkeypatch.setattr(worker, "_global_node", node)
    ray_session.disconnect_ray()
    monkeypatch.setattr(worker, "_global_node", None)
    ray_session.disconnect_ray()
    assert calls == [(True, False), (True, False)]


# --------------------------------------------------------------------------------------------------
# The picture: its shapes go first, and it is drawn in the background as soon as they are done


def _scene(i: int, name: str) -> SceneInfo:
    return SceneInfo(i, name, {"offset": [0, 0, 0], "scale": 1.0}, False)


def test_the_picture_shows_up_to_16_shapes_evenly_spread_in_name_order():
    from sdf_ray.shapes.commands import sheet_picks

    assert sheet_picks([]) == []
    assert sheet_picks(["a"]) == [0]
    assert sheet_picks(["e", "b", "d", "a", "c"]) == [3, 1, 4, 2, 0]  # a b c d e
    sixteen = [f"s{k:02d}" for k in (5, 0, 15, 3, 9, 1, 14, 2, 4, 12, 6, 7, 13, 8, 10, 11)]
    assert sheet_picks(sixteen) == [sixteen.index(f"s{k:02d}") for k in range(16)]
    forty = [f"s{k:02d}" for k in np.random.default_rng(0).permutation(40)]
    # np.linspace(0, 39, 16) = 0, 2.6, 5.2, 7.8, ... 36.4, 39, rounded
    spread = [0, 3, 5, 8, 10, 13, 16, 18, 21, 23, 26, 29, 31, 34, 36, 39]
    assert sheet_picks(forty) == [forty.index(f"s{k:02d}") for k in spread]
    assert sheet_picks(forty, max_entries=2) == [forty.index("s00"), forty.index("s39")]


def test_the_pictures_shapes_go_first_and_every_shape_once(tmp_path):
    """Picked among all the job's shapes (done ones included, so a resumed run draws the same picture); the todo
    list keeps every other shape, in its order."""
    from sdf_ray.shapes.commands import _picks_first, _sheet_first, sheet_picks
    from sdf_ray.shapes.work import failed_row

    assert _picks_first([0, 2, 3, 5, 7, 8], [8, 3, 1]) == [3, 8, 0, 2, 5, 7]
    names = [f"s{k:02d}" for k in np.random.default_rng(1).permutation(40)]
    scenes = [_scene(i, n) for i, n in enumerate(names)]
    picks = sheet_picks(names)
    done_positions = [picks[0], picks[5], 7, 11]
    todo = [j for j in range(40) if j not in done_positions]
    done = [failed_row(scenes[j], "earlier") for j in done_positions]
    first, sheet = _sheet_first(tmp_path, scenes, done, todo, None)
    picked_to_do = [j for j in todo if j in picks]
    assert first[:len(picked_to_do)] == picked_to_do
    assert first[len(picked_to_do):] == [j for j in todo if j not in picks]
    assert sorted(first) == todo
    assert sheet.join() is None  # not every picked shape is done: nothing drawn


def test_the_picture_is_drawn_in_the_background_once_its_shapes_are_done(tmp_path):
    import threading

    from sdf_ray.shapes.commands import SheetInBackground

    started, release = threading.Event(), threading.Event()
    calls: list[tuple[str, list[str]]] = []

    def draw(picked: list[dict]) -> object:
        calls.append((threading.current_thread().name, [r["scene"] for r in picked]))
        started.set()
        assert release.wait(timeout=10)
        return tmp_path / "reconstructions.png"

    def drawing() -> bool:  # a thread started too early would still be here, waiting for release
        return any(t.name == "contact-sheet" for t in threading.enumerate())

    sheet = SheetInBackground(["a", "c", "e"], draw)
    for name in ("e", "b", "a", "d"):
        sheet.add({"scene": name, "status": "ok"})
        assert not drawing() and not calls
    sheet.add({"scene": "c", "status": "ok"})
    assert started.wait(timeout=10)
    sheet.add({"scene": "f", "status": "ok"})
    sheet.add({"scene": "a", "status": "ok"})
    release.set()
    assert sheet.join() == tmp_path / "reconstructions.png"
    assert calls == [("contact-sheet", ["a", "c", "e"])]  # once, in the picture's order
    assert not drawing()


def test_the_picture_drawn_in_the_background_equals_the_one_drawn_at_the_end(worked, monkeypatch):
    """Same entries (meshes, ground truth, Chamfer, status) and title, whichever order the records come in and
    whichever were done in an earlier run."""
    from sdf_ray import plots
    from sdf_ray.shapes import commands
    from sdf_ray.shapes.work import failed_row

    out, job, real_scenes, _, real_rows = worked
    fake = [_scene(10 + k, f"a-{k:02d}") for k in range(18)]  # sort before sphere-0, sphere-1
    scenes = [fake[5], real_scenes[1], *fake[:5], real_scenes[0], *fake[6:]]
    rows_by_name = {s.name: failed_row(s, "error: lost") for s in fake} | {
        s.name: r for s, r in zip(real_scenes, real_rows)}
    drawn: list[tuple[list[plots.SheetEntry], str]] = []

    def contact_sheet(entries, out_path, *, title=None, **kwargs):
        drawn.append((list(entries), title))
        return out_path

    monkeypatch.setattr(plots, "contact_sheet", contact_sheet)
    done = [rows_by_name[s.name] for s in scenes[:4]]
    todo, sheet = commands._sheet_first(out, scenes, done, list(range(4, len(scenes))), job.data_path)
    for j in todo:
        sheet.add(rows_by_name[scenes[j].name])
    assert sheet.join() == out / "reconstructions.png"
    assert commands._contact_sheet(out, list(rows_by_name.values()), job.data_path) == out / "reconstructions.png"
    (background, title), (at_end, end_title) = drawn
    assert title == end_title == "16 of 20 shapes (normalised frame)"
    assert [e.name for e in background] == [e.name for e in at_end]
    assert {"sphere-0", "sphere-1"} <= {e.name for e in at_end}
    for a, b in zip(background, at_end):
        for field in dataclasses.fields(a):
            x, y = getattr(a, field.name), getattr(b, field.name)
            assert np.array_equal(x, y) if isinstance(x, np.ndarray) else x == y, field.name
    meshed = [e for e in at_end if e.vertices is not None]
    assert len(meshed) == 2 and all(e.gt_points is not None and e.chamfer for e in meshed)


def _finish_once(tmp_path, sheet, capsys) -> str:
    from sdf_ray.shapes import commands
    from sdf_ray.shapes.work import failed_row

    commands._finish(tmp_path, "reconstruct", [failed_row(_scene(0, "a"), "error: x")], 0.0, 1, {}, None, None, sheet)
    return capsys.readouterr().out.splitlines()[-1]


@pytest.mark.parametrize("background", ["drawn", "failed", "never started", "none"])
def test_finish_draws_the_picture_when_the_background_one_failed_or_did_not_run(background, tmp_path, monkeypatch,
                                                                              capsys):
    from sdf_ray.shapes import commands

    def draw(picked: list[dict]) -> object:
        if background == "failed":
            raise OSError("disk full")
        return tmp_path / "background.png"

    at_end: list[int] = []
    monkeypatch.setattr(commands, "_contact_sheet", lambda out, rows, data: at_end.append(len(rows)) or out / "end.png")
    sheet = None if background == "none" else commands.SheetInBackground(["a"], draw)
    if background in ("drawn", "failed"):
        sheet.add({"scene": "a", "status": "failed"})
    last = _finish_once(tmp_path, sheet, capsys)
    if background == "drawn":
        assert at_end == [] and last.endswith("picture " + str(tmp_path / "background.png"))
    else:
        assert at_end == [1] and last.endswith("picture " + str(tmp_path / "end.png"))


def test_a_picture_that_cannot_be_drawn_is_one_warning_line(tmp_path, monkeypatch, capsys, caplog):
    from sdf_ray.shapes import commands

    def broken(*args) -> object:
        raise OSError("disk full")

    monkeypatch.setattr(commands, "_draw_sheet", broken)
    seen: list[object] = []
    monkeypatch.setattr("threading.excepthook", seen.append)
    sheet = commands.SheetInBackground(["a"], broken)
    sheet.add({"scene": "a", "status": "failed"})
    assert _finish_once(tmp_path, sheet, capsys) == f"reconstruct: results in {tmp_path}"
    assert seen == []
    assert [r.getMessage() for r in caplog.records if r.levelname == "WARNING"] == [
        "could not draw reconstructions.png: disk full"]
    assert (tmp_path / "metrics.csv").is_file()


@pytest.mark.parametrize("interrupted", [False, True])
def test_run_does_the_pictures_shapes_first_and_draws_it_while_the_others_go_on(interrupted, tmp_path, monkeypatch):
    """``mesh`` mode (codes follow their shapes); the picture is drawn once, in the background, while the shapes
    after its own are still to come; on Ctrl-C the drawing thread is joined before ``_run`` returns."""
    import threading

    from sdf_ray.shapes import commands, pipeline
    from sdf_ray.shapes.work import failed_row

    names = [f"s{k:02d}" for k in np.random.default_rng(2).permutation(20)]
    scenes = [_scene(i, n) for i, n in enumerate(names)]
    codes = np.arange(20, dtype=np.float32)[:, None]
    picked = {names[j] for j in commands.sheet_picks(names)}
    drawing = threading.Event()
    draws: list[tuple[str, list[str], int]] = []

    def draw_sheet(out_dir, rows, total, data_path) -> object:
        draws.append((threading.current_thread().name, [r["scene"] for r in rows], total))
        drawing.set()
        return out_dir / "reconstructions.png"

    def run_shapes(job, todo_scenes, payload, todo_codes, on_row, clock):
        assert {s.name for s in todo_scenes[:16]} == picked and len(todo_scenes) == 20
        np.testing.assert_array_equal(todo_codes[:, 0], [s.scene_id for s in todo_scenes])
        rows = []
        for k, scene in enumerate(todo_scenes):
            if k == 16:
                assert drawing.wait(timeout=10)  # the last 4 shapes are still to come
                if interrupted:
                    raise KeyboardInterrupt
            rows.append(failed_row(scene, "error: x"))
            on_row(rows[-1])
        return rows

    monkeypatch.setattr(commands, "_draw_sheet", draw_sheet)
    monkeypatch.setattr(commands, "_connect", lambda address: "existing Ray session")
    monkeypatch.setattr(pipeline, "run_shapes", run_shapes)
    job = Job("mesh", str(tmp_path), None, ReconstructConfig(), 0.1, 8)
    if interrupted:
        with pytest.raises(KeyboardInterrupt):
            commands._run("mesh", job, scenes, {}, codes, None, {})
    else:
        assert commands._run("mesh", job, scenes, {}, codes, None, {}) == 1  # every shape failed
    assert draws == [("contact-sheet", sorted(picked), 20)]
    assert not any(t.name == "contact-sheet" for t in threading.enumerate())


# --------------------------------------------------------------------------------------------------
# The console entry point leaves without finalising the interpreter after the shape commands


@pytest.mark.parametrize(("command", "fast"), [("reconstruct", True), ("evaluate", True), ("train", False)])
def test_the_entry_point_runs_the_exit_handlers_then_leaves_with_the_command_code(monkeypatch, command, fast):
    import atexit
    import os

    from sdf_ray import cli

    calls: list[str] = []

    class Left(Exception):
        pass

    def leave(code: int) -> None:
        calls.append(f"_exit {code}")
        raise Left

    monkeypatch.setattr(cli, "main", lambda: 2)
    monkeypatch.setattr(sys, "argv", ["sdf-ray", command, "--whatever"])
    monkeypatch.setattr(atexit, "_run_exitfuncs", lambda: calls.append("atexit"))
    monkeypatch.setattr(os, "_exit", leave)
    with pytest.raises(Left if fast else SystemExit) as raised:
        cli.run()
    assert calls == (["atexit", "_exit 2"] if fast else [])
    if not fast:
        assert raised.value.code == 2  # type: ignore[union-attr]


def test_a_fast_exit_waits_for_a_thread_still_running(monkeypatch):
    """A non-daemon thread still at work (writing something) gets the usual exit, which waits for it."""
    import threading

    from sdf_ray import cli

    release = threading.Event()
    worker = threading.Thread(target=release.wait)
    worker.start()
    try:
        monkeypatch.setattr(cli, "main", lambda: 0)
        monkeypatch.setattr(sys, "argv", ["sdf-ray", "reconstruct"])
        with pytest.raises(SystemExit):
            cli.run()
    finally:
        release.set()
        worker.join()
