"""``data from-meshes``: mesh discovery, every bad input, and Ray runs (broken files, resume, nothing usable)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import trimesh

from sdf_ray.data import format as fmt
from sdf_ray.data.from_meshes import (
    REPORT_NAME,
    MeshOutcome,
    add_arguments,
    cmd_from_meshes,
    discover_meshes,
    read_report,
    run_from_meshes,
    work_dir_for,
)
from sdf_ray.data.mesh_bench import box, sphere, torus
from sdf_ray.data.mesh_config import MeshSamplingConfig
from sdf_ray.data.mesh_sdf import Mesh
from sdf_ray.errors import UserError

SMALL = MeshSamplingConfig(num_samples=2000, num_surface_samples=200)
SHAPES = {"sphere": lambda: sphere(2)[0], "box": lambda: box(1)[0], "torus": lambda: torus(16, 8)[0]}


def save(mesh: Mesh, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    trimesh.Trimesh(mesh.vertices_V3, mesh.faces_F3, process=False).export(path)
    return path


def mesh_dir(root: Path, names: list[str]) -> Path:
    """``root`` filled with small closed meshes, cycling through the shapes."""
    makers = list(SHAPES.values())
    for i, name in enumerate(names):
        save(makers[i % len(makers)](), root / name)
    return root


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_arguments(p)
    return p.parse_args(argv)


# --------------------------------------------------------------------------------------------------
# Discovery (no Ray)


def test_directory_discovery_names_scenes_by_relative_path(tmp_path):
    mesh_dir(tmp_path, ["chairs/a.obj", "chairs/b.PLY", "c.obj", "c.stl", ".hidden/x.obj",
                        "03001627/abc/models/model_normalized.obj"])
    (tmp_path / "notes.txt").write_text("not a mesh")
    jobs = discover_meshes(tmp_path)
    assert [j.name for j in jobs] == ["03001627/abc", "c.obj", "c.stl", "chairs/a", "chairs/b"]
    assert all(j.path is not None and j.path.is_file() for j in jobs)


def test_glob_and_single_file_discovery(tmp_path):
    mesh_dir(tmp_path, ["set/a.obj", "set/sub/b.off", "set/c.ply"])
    jobs = discover_meshes(str(tmp_path / "set" / "**" / "*.o*"))
    assert [j.name for j in jobs] == ["a", "sub/b"]
    jobs = discover_meshes(tmp_path / "set" / "c.ply")
    assert [j.name for j in jobs] == ["c"]


def test_shapenet_layout_through_a_deepsdf_split(tmp_path):
    mesh_dir(tmp_path / "shapenet", ["03001627/aaa/models/model_normalized.obj",
                                     "03001627/bbb/models/model_normalized.obj"])
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"ShapeNetV2": {"03001627": ["bbb", "zzz", "aaa"]}}))
    jobs = discover_meshes(tmp_path / "shapenet", split)
    assert [j.name for j in jobs] == ["ShapeNetV2/03001627/bbb", "ShapeNetV2/03001627/zzz", "ShapeNetV2/03001627/aaa"]
    assert jobs[1].path is None and "no mesh file" in jobs[1].reason
    split.write_text(json.dumps({"ShapeNetV2": {"03001627": ["nope"]}}))
    with pytest.raises(UserError, match="none of the 1 instances"):
        discover_meshes(tmp_path / "shapenet", split)


# --------------------------------------------------------------------------------------------------
# Every bad input of the command (all refused before Ray starts)


def _bad_inputs(tmp: Path) -> dict[str, tuple[list[str], str]]:
    mesh_dir(tmp / "meshes", ["a.obj"])
    (tmp / "empty").mkdir()
    (tmp / "notes.txt").write_text("x")
    (tmp / "bad_split.json").write_text("{not json")
    (tmp / "a_file").write_text("x")
    (tmp / "other").mkdir()
    (tmp / "other" / "keep.txt").write_text("precious")
    fmt.write_dataset(tmp / "existing", [fmt.SceneSamples(name="s", pos_N4=np.array([[0, 0, 0, 1.0]]),
                                                           neg_N4=np.array([[0, 0, 0, -1.0]]))], {"type": "test"})
    ok = ["--input", str(tmp / "meshes")]
    out = ["--out", str(tmp / "out")]
    return {
        "missing input": (["--input", str(tmp / "nope"), *out], "does not exist"),
        "glob matches nothing": (["--input", str(tmp / "meshes" / "*.stl"), *out], "matches no mesh files"),
        "empty directory": (["--input", str(tmp / "empty"), *out], "holds no mesh files"),
        "not a mesh file": (["--input", str(tmp / "notes.txt"), *out], "not a mesh file"),
        "empty input": (["--input", "", *out], "--input must not be empty"),
        "bad split": ([*ok, *out, "--split", str(tmp / "bad_split.json")], "not valid JSON"),
        "missing split": ([*ok, *out, "--split", str(tmp / "nope.json")], "does not exist"),
        "split with a file input": (["--input", str(tmp / "notes.txt"), *out, "--split", str(tmp / "bad_split.json")],
                                    "must be the directory"),
        "output exists": ([*ok, "--out", str(tmp / "existing")], "already exists .use --overwrite"),
        "output is a file": ([*ok, "--out", str(tmp / "a_file")], "exists and is not a directory"),
        "output not a dataset": ([*ok, "--out", str(tmp / "other"), "--overwrite"], "refusing to replace"),
        "too few samples": ([*ok, *out, "--samples-per-scene", "1"], "--samples-per-scene must be at least 2"),
        "negative surface samples": ([*ok, *out, "--surface-samples", "-1"], "--surface-samples must be at least 0"),
        "no triangles allowed": ([*ok, *out, "--max-triangles", "0"], "--max-triangles must be at least 1"),
    }


BAD_INPUTS = ["missing input", "glob matches nothing", "empty directory", "not a mesh file", "empty input", "bad split",
              "missing split", "split with a file input", "output exists", "output is a file",
              "output not a dataset", "too few samples", "negative surface samples", "no triangles allowed"]


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_every_bad_input_is_one_user_error(tmp_path, case):
    argv, message = _bad_inputs(tmp_path)[case]
    with pytest.raises(UserError, match=message):
        cmd_from_meshes(parse(argv))
    assert not (tmp_path / "out").exists()
    assert (tmp_path / "other" / "keep.txt").read_text() == "precious"


# --------------------------------------------------------------------------------------------------
# Ray runs


@pytest.mark.ray
def test_run_over_a_directory_with_broken_files_finishes_and_reports_them(ray_session, tmp_path, capsys):
    src = mesh_dir(tmp_path / "in", ["a.obj", "b.ply", "sub/c.off"])
    (src / "broken.ply").write_bytes(b"ply\nformat ascii 1.0\nelement vertex 99\nend_header\n1 2\n")
    (src / "points.obj").write_text("v 0 0 0\nv 1 0 0\nv 0 1 0\n")
    save(sphere(4)[0], src / "big.stl")  # 5,120 triangles: over --max-triangles
    out = tmp_path / "ds"
    code = cmd_from_meshes(parse(["--input", str(src), "--out", str(out), "--samples-per-scene", "2000",
                                  "--surface-samples", "200", "--max-triangles", "2000"]))
    assert code == 0
    line = capsys.readouterr().out
    assert "wrote 3 of 6 meshes" in line and "3 skipped (3 invalid" in line

    rows = {r["scene"]: r for r in read_report(out / REPORT_NAME)}
    assert list(rows) == ["a", "b", "big", "broken", "points", "sub/c"]
    assert {s: r["status"] for s, r in rows.items()} == {"a": "ok", "b": "ok", "big": "invalid", "broken": "invalid",
                                                         "points": "invalid", "sub/c": "ok"}
    assert rows["broken"]["reason"].startswith("unreadable")
    assert rows["points"]["reason"] == "no triangles"
    assert rows["big"]["reason"].startswith("over the size limit: 5,120 triangles") and rows["big"]["triangles"] == "5120"
    assert int(rows["a"]["triangles"]) > 0 and float(rows["a"]["seconds"]) > 0

    manifest = fmt.read_manifest(out)
    assert [s.name for s in manifest.scenes] == ["a", "b", "sub/c"]
    assert manifest.source["type"] == "meshes" and manifest.source["num_skipped"] == 3
    packed = fmt.load_scenes(out, [0, 1, 2], manifest=manifest)
    assert int(packed.pos_count.sum() + packed.neg_count.sum()) == 3 * 2000
    assert manifest.scenes[0].normalization["scale"] == pytest.approx(1 / 1.03)  # a: the unit icosphere
    if hasattr(fmt, "load_surface"):  # ground truth travels with the dataset, in the mesh's frame
        gt = fmt.load_surface(out, [0])[0]
        radii = np.linalg.norm(gt.points_M3, axis=1)
        assert gt.points_M3.shape == (200, 3) and radii.max() <= 1 + 1e-6 and radii.min() > 0.9
    assert not work_dir_for(out).exists()


@pytest.mark.ray
def test_an_interrupted_run_resumes_where_it_stopped(ray_session, tmp_path):
    src = mesh_dir(tmp_path / "in", [f"m{i}.obj" for i in range(6)])
    out = tmp_path / "ds"

    class Stop(Exception):
        pass

    first: list[MeshOutcome] = []

    def stop_after_two(o: MeshOutcome) -> None:
        first.append(o)
        if len(first) == 2:
            raise Stop

    with pytest.raises(Stop):
        run_from_meshes(src, out, cfg=SMALL, on_result=stop_after_two)
    assert not out.exists()
    assert len(list((work_dir_for(out) / "results").glob("*.npz"))) == 2

    # A mesh edited since the interruption is computed again.
    edited = src / f"{first[0].scene}.obj"
    save(sphere(1)[0], edited)
    second: list[MeshOutcome] = []
    summary = run_from_meshes(src, out, cfg=SMALL, on_result=second.append)
    assert summary.num_reused == 1 and summary.count("ok") == 6
    assert sorted(o.scene for o in second) == sorted({f"m{i}" for i in range(6)} - {first[1].scene})
    assert fmt.read_manifest(out).num_scenes == 6
    assert not work_dir_for(out).exists()


@pytest.mark.ray
def test_a_changed_config_starts_over_and_overwrite_replaces(ray_session, tmp_path):
    src = mesh_dir(tmp_path / "in", ["a.obj", "b.obj"])
    out = tmp_path / "ds"
    with pytest.raises(KeyboardInterrupt):
        run_from_meshes(src, out, cfg=SMALL, on_result=lambda o: (_ for _ in ()).throw(KeyboardInterrupt))
    computed: list[MeshOutcome] = []
    summary = run_from_meshes(src, out, cfg=MeshSamplingConfig(num_samples=1000, num_surface_samples=100, seed=1),
                              on_result=computed.append)
    assert summary.num_reused == 0 and len(computed) == 2
    assert fmt.read_manifest(out).num_samples == 2000
    with pytest.raises(UserError, match="already exists"):
        run_from_meshes(src, out, cfg=SMALL)
    run_from_meshes(src / "a.obj", out, cfg=SMALL, overwrite=True)
    manifest = fmt.read_manifest(out)
    assert [s.name for s in manifest.scenes] == ["a"] and manifest.num_samples == 2000
    assert (out / REPORT_NAME).is_file()


@pytest.mark.ray
def test_no_usable_mesh_is_one_error_with_the_report_kept(ray_session, tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    (src / "a.obj").write_text("v 0 0 0\n")
    (src / "b.stl").write_bytes(b"solid x\nendsolid x\n")
    out = tmp_path / "ds"
    with pytest.raises(UserError, match=r"none of the 2 meshes could be sampled \(e.g. a: no triangles\)"):
        run_from_meshes(src, out, cfg=SMALL)
    assert not out.exists()
    rows = read_report(work_dir_for(out) / REPORT_NAME)
    assert [(r["scene"], r["status"]) for r in rows] == [("a", "invalid"), ("b", "invalid")]


@pytest.mark.ray
def test_a_model_trained_on_meshes_reconstructs_and_evaluates_end_to_end(ray_session, tmp_path, capsys):
    """Meshes in, shapes out: from-meshes -> train (2 workers) -> reconstruct -> evaluate, through the CLI."""
    import csv

    from sdf_ray.cli import main
    from sdf_ray.config import packaged_config

    src = mesh_dir(tmp_path / "in", ["s0.obj", "b0.ply", "t0.off", "s1.stl"])
    data = tmp_path / "ds"
    assert main(["data", "from-meshes", "--input", str(src), "--out", str(data), "--samples-per-scene", "4000",
                 "--surface-samples", "500"]) == 0
    assert main(["train", "--config", str(packaged_config("tiny")), "--set", f"data.path={data}",
                 "--set", f"checkpoint.storage_path={tmp_path / 'runs'}", "--set", "checkpoint.run_name=meshes",
                 "--set", "data.scenes_per_step=2", "--set", "optim.num_epochs=6"]) == 0
    recon = tmp_path / "recon"
    args = ["--set", "reconstruct.num_iterations=20", "--set", "reconstruct.samples_per_iteration=256",
            "--set", "reconstruct.mesh_resolution=24", "--set", "reconstruct.num_metric_points=500"]
    assert main(["reconstruct", "--run", str(tmp_path / "runs" / "meshes"), "--data", str(data), "--out", str(recon),
                 *args]) in (0, 1)  # 1 only if every shape failed, which the rows below would show
    with open(recon / "metrics.csv") as f:
        rows = {r["scene"]: r for r in csv.DictReader(f)}
    assert set(rows) == {"b0", "s0", "s1", "t0"}
    # The tiny decoder may not find a surface for every shape; each row is measured or says why not.
    assert all(r["status"] in ("ok", "empty") for r in rows.values())
    measured = {s: float(r["chamfer_l2"]) for s, r in rows.items() if r["status"] == "ok"}
    # Distances are in the meshes' own frame (the ground truth's): finite, and bounded by the shapes' size.
    assert all(0 <= v < 10 for v in measured.values())
    if measured:
        out = tmp_path / "eval"
        assert main(["evaluate", "--meshes", str(recon), "--data", str(data), "--out", str(out),
                     "--set", "reconstruct.num_metric_points=500"]) == 0
        with open(out / "metrics.csv") as f:
            again = {r["scene"]: float(r["chamfer_l2"]) for r in csv.DictReader(f) if r["status"] == "ok"}
        for scene, value in measured.items():
            assert again[scene] == pytest.approx(value, rel=1e-6)
