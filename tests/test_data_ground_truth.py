"""Ground truth in datasets: surface samples + normalisation, written, read back, generated exactly, imported."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from sdf_ray.data import synth
from sdf_ray.data.deepsdf_import import import_deepsdf, read_ply_points
from sdf_ray.data.format import (
    MANIFEST_NAME,
    SceneSamples,
    load_scenes,
    load_surface,
    read_manifest,
    to_normalized,
    to_original,
    validate_files,
    write_dataset,
)
from sdf_ray.data.info import dataset_info, format_info
from sdf_ray.data.synth_shapes import Primitive, SynthShape
from sdf_ray.errors import DataError


def scene(i: int, num_surface: int = 0, normals: bool = True) -> SceneSamples:
    rng = np.random.default_rng(i)
    pos = rng.uniform(-1, 1, size=(6, 4)).astype(np.float32)
    pos[:, 3] = 0.25
    neg = rng.uniform(-1, 1, size=(5, 4)).astype(np.float32)
    neg[:, 3] = -0.25
    s = SceneSamples(name=f"s{i}", pos_N4=pos, neg_N4=neg,
                     normalization={"offset": [0.5 * i, -1.0, 2.0], "scale": 0.5 + i})
    if num_surface:
        s.surface_points_M3 = rng.normal(size=(num_surface, 3)).astype(np.float32)
        if normals:
            n = rng.normal(size=(num_surface, 3))
            s.surface_normals_M3 = (n / np.linalg.norm(n, axis=1, keepdims=True)).astype(np.float32)
    return s


def test_round_trip_with_and_without_ground_truth(tmp_path: Path) -> None:
    scenes = [scene(0, 40), scene(1), scene(2, 70, normals=False), scene(3, 30)]
    out = tmp_path / "ds"
    m = write_dataset(out, scenes, {"type": "test"}, max_rows_per_file=100)
    assert read_manifest(out) == m == validate_files(out)
    assert m.num_with_ground_truth == 3 and m.num_surface_samples == 140
    assert [s.num_surface for s in m.scenes] == [40, 0, 70, 30]
    assert [f.name for f in m.surface_files] == ["surface-00000.parquet", "surface-00001.parquet"]
    for f in m.surface_files:  # one row group per scene
        assert pq.ParquetFile(out / f.name).metadata.num_row_groups == sum(s.surface_file == f.name for s in m.scenes)
    raw = json.loads((out / MANIFEST_NAME).read_text())
    assert raw["format_version"] == 2 and raw["scenes"][1] == {**raw["scenes"][1], "num_surface": 0}
    assert "surface_file" not in raw["scenes"][1]

    truth = load_surface(out, [3, 1, 2, 0])
    assert sorted(truth) == [0, 2, 3]  # scene 1 has none
    for i in (0, 2, 3):
        t = truth[i]
        np.testing.assert_array_equal(t.points_M3, scenes[i].surface_points_M3)
        assert t.points_M3.dtype == np.float32 and t.normalization == m.scenes[i].normalization
        if scenes[i].surface_normals_M3 is None:
            assert t.normals_M3 is None
        else:
            np.testing.assert_array_equal(t.normals_M3, scenes[i].surface_normals_M3)
        np.testing.assert_allclose(t.normalized_points(), (t.points_M3 + np.array([0.5 * i, -1, 2])) * (0.5 + i),
                                   rtol=1e-6)
    assert load_surface(out, [1]) == {}
    # The SDF samples are untouched by the ground truth next to them.
    packed = load_scenes(out, [2])
    np.testing.assert_array_equal(packed.samples_M4, np.concatenate([scenes[2].pos_N4, scenes[2].neg_N4]))

    info = dataset_info(out)
    assert info["num_with_ground_truth"] == 3 and info["num_surface_samples"] == 140
    assert info["size_bytes"] == sum(p.stat().st_size for p in out.iterdir())
    assert "3 of 4 scenes with ground-truth surface samples (140 points, 2 of them with normals)" in format_info(info)


def test_frames_are_inverse() -> None:
    norm = {"offset": [0.1, -0.2, 0.3], "scale": 2.5}
    p = np.random.default_rng(0).normal(size=(10, 3))
    q = to_normalized(p, norm)
    np.testing.assert_allclose(q, (p + [0.1, -0.2, 0.3]) * 2.5)
    np.testing.assert_allclose(to_original(q, norm), p)
    assert to_normalized(p.astype(np.float32), norm).dtype == np.float32


def test_old_format_dataset_still_loads(tmp_path: Path) -> None:
    """A format-version-1 dataset (before ground truth) reads, loads and reports no ground truth."""
    out = tmp_path / "v1"
    write_dataset(out, [scene(0), scene(1)], {"type": "test"})
    raw = json.loads((out / MANIFEST_NAME).read_text())
    raw["format_version"] = 1
    del raw["surface_files"]
    for s in raw["scenes"]:
        del s["num_surface"]
    (out / MANIFEST_NAME).write_text(json.dumps(raw))
    m = validate_files(out)
    assert m.format_version == 1 and m.num_with_ground_truth == 0 and m.surface_files == ()
    assert load_scenes(out, [1, 0]).num_scenes == 2
    assert load_surface(out, [0, 1]) == {}
    assert "truth     none" in format_info(dataset_info(out))


def test_bad_ground_truth_is_refused(tmp_path: Path) -> None:
    bad = scene(0, 10)
    bad.surface_normals_M3 = bad.surface_normals_M3[:5]
    with pytest.raises(DataError, match="surface_normals_M3 has shape"):
        write_dataset(tmp_path / "a", [bad], {})
    bad = scene(0, 10)
    bad.surface_points_M3[3, 1] = np.nan
    with pytest.raises(DataError, match="surface_points_M3 contains NaN"):
        write_dataset(tmp_path / "a", [bad], {})
    with pytest.raises(DataError, match="surface_points_M3 is empty"):
        write_dataset(tmp_path / "a", [SceneSamples(name="e", pos_N4=scene(0).pos_N4, neg_N4=scene(0).neg_N4,
                                                    surface_points_M3=np.zeros((0, 3)))], {})
    assert list(tmp_path.iterdir()) == []

    out = tmp_path / "ds"
    write_dataset(out, [scene(0, 10), scene(1, 10)], {})
    original = (out / MANIFEST_NAME).read_text()
    for edit, message in [
        (lambda r: r["scenes"][1].update(surface_row_offset=3), "surface_row_offset 3 .* does not follow"),
        (lambda r: r["scenes"][0].update(surface_file="nope.parquet"), "not listed in 'surface_files'"),
        (lambda r: r["surface_files"][0].update(num_rows=7), "'surface_files' says 7 rows"),
        (lambda r: r["scenes"][0].update(num_surfce=3), r"scene 0 \(s0\): 'num_surfce': unknown key"),
    ]:
        raw = json.loads(original)
        edit(raw)
        (out / MANIFEST_NAME).write_text(json.dumps(raw))
        with pytest.raises(DataError, match=message):
            read_manifest(out)
    (out / MANIFEST_NAME).write_text(original)
    part = out / "surface-00000.parquet"
    part.write_bytes(part.read_bytes()[:100])
    with pytest.raises(DataError, match="corrupt or truncated Parquet file surface-00000.parquet"):
        validate_files(out)
    with pytest.raises(DataError, match="corrupt or truncated"):
        load_surface(out, [0])


# --------------------------------------------------------------------------------------------------
# Synthetic shapes: exact surface samples


def test_synth_surface_samples_lie_on_the_exact_surface_with_exact_normals() -> None:
    kinds = set()
    for i in range(40):
        s = synth.synth_scene(i, 7, 64, num_surface=3000)
        shape = synth.synth_shape(i, 7)
        kinds.add(shape.kind.split("-")[0])
        assert s.surface_points_M3.shape == s.surface_normals_M3.shape == (3000, 3)
        assert s.surface_points_M3.dtype == np.float32
        p = to_normalized(s.surface_points_M3.astype(np.float64), s.normalization)
        assert np.abs(shape.sdf(p)).max() < 1e-4, shape.kind
        n = s.surface_normals_M3.astype(np.float64)
        np.testing.assert_allclose(np.linalg.norm(n, axis=1), 1.0, atol=1e-6)
        # The SDF's gradient by central differences (wrong only within 1e-6 of an edge).
        steps = np.concatenate([np.eye(3), -np.eye(3)]) * 1e-6
        vals = shape.sdf((p[None] + steps[:, None]).reshape(-1, 3)).reshape(6, -1)
        g = (vals[:3] - vals[3:]).T
        g /= np.linalg.norm(g, axis=1, keepdims=True)
        err = np.linalg.norm(g - n, axis=1)
        assert (err < 1e-5).mean() > 0.999, shape.kind
    assert {"union", "box", "torus", "cone"} <= kinds


def test_synth_surface_samples_are_area_uniform() -> None:
    rng = np.random.default_rng(0)
    box = SynthShape(primitives=(Primitive("box", (0.2, 0.4, 0.6), np.eye(3), np.zeros(3)),),
                           blend_k=0.0, offset=np.zeros(3), scale=1.0)
    p, n = synth.surface_samples(box, rng, 60_000)
    on_face = np.argmax(np.abs(n), axis=1)  # which pair of faces
    fractions = np.bincount(on_face, minlength=3) / len(p)
    areas = np.array([0.4 * 0.6, 0.2 * 0.6, 0.2 * 0.4])
    np.testing.assert_allclose(fractions, areas / areas.sum(), atol=0.01)
    torus = SynthShape(primitives=(Primitive("torus", (0.6, 0.2), np.eye(3), np.zeros(3)),),
                             blend_k=0.0, offset=np.zeros(3), scale=1.0)
    p, n = synth.surface_samples(torus, rng, 60_000)
    # Area element (R + r cos t): the outer half of the tube carries (pi R + 2 r) / (2 pi R) of the area.
    outer = (np.hypot(p[:, 0], p[:, 2]) > 0.6).mean()
    assert outer == pytest.approx((np.pi * 0.6 + 2 * 0.2) / (2 * np.pi * 0.6), abs=0.01)
    sphere = SynthShape(primitives=(Primitive("sphere", (0.5,), np.eye(3), np.zeros(3)),),
                              blend_k=0.0, offset=np.zeros(3), scale=1.0)
    p, n = synth.surface_samples(sphere, rng, 1000)
    np.testing.assert_allclose(n, p / 0.5, atol=1e-12)


def test_synth_sdf_samples_do_not_depend_on_the_surface_count() -> None:
    a, b = synth.synth_scene(3, 1, 500, num_surface=0), synth.synth_scene(3, 1, 500, num_surface=100)
    np.testing.assert_array_equal(a.pos_N4, b.pos_N4)
    assert a.surface_points_M3 is None and b.surface_points_M3 is not None
    c = synth.synth_scene(3, 1, 500, num_surface=100)
    np.testing.assert_array_equal(b.surface_points_M3, c.surface_points_M3)


def test_synth_dataset_has_ground_truth_for_every_scene(tmp_path: Path) -> None:
    m = synth.synth_dataset(tmp_path / "d", num_scenes=3, samples_per_scene=64, seed=0, surface_samples_per_scene=500)
    assert m.num_with_ground_truth == 3 and all(s.surface_has_normals for s in m.scenes)
    truth = load_surface(tmp_path / "d", [0, 1, 2])
    for i, t in truth.items():
        shape = synth.synth_shape(i, 0)
        assert np.abs(shape.sdf(t.normalized_points().astype(np.float64))).max() < 1e-4
    m = synth.synth_dataset(tmp_path / "e", num_scenes=2, samples_per_scene=64, seed=0, surface_samples_per_scene=0)
    assert m.num_with_ground_truth == 0 and m.surface_files == ()
    with pytest.raises(DataError, match="surface samples per scene must be >= 0"):
        synth.synth_dataset(tmp_path / "f", num_scenes=2, samples_per_scene=64, seed=0, surface_samples_per_scene=-1)


# --------------------------------------------------------------------------------------------------
# DeepSDF import of SurfaceSamples and NormalizationParameters

DS, CLS = "ShapeNetV2", "03001627"


def write_deepsdf_instance(root: Path, inst: str, seed: int) -> None:
    rng = np.random.default_rng(seed)
    d = root / "SdfSamples" / DS / CLS
    d.mkdir(parents=True, exist_ok=True)
    pos = rng.uniform(-1, 1, size=(8, 4)).astype(np.float32)
    pos[:, 3] = 0.1
    neg = rng.uniform(-1, 1, size=(8, 4)).astype(np.float32)
    neg[:, 3] = -0.1
    np.savez(d / f"{inst}.npz", pos=pos, neg=neg)


def write_ascii_ply(path: Path, points: np.ndarray) -> None:
    """As DeepSDF's SampleVisibleMeshSurface writes it: x y z only, then a face list of consecutive triples."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = ["ply", "format ascii 1.0", f"element vertex {len(points)}", "property float x", "property float y",
             "property float z", f"element face {len(points) // 3}", "property list uchar int vertex_index",
             "end_header"]
    lines += [" ".join(f"{v:g}" for v in p) for p in points]
    lines += [f"3 {i} {i + 1} {i + 2}" for i in range(0, len(points) - 2, 3)]
    path.write_text("\n".join(lines) + "\n")


def write_binary_ply(path: Path, points: np.ndarray, normals: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    header = ["ply", "format binary_little_endian 1.0", "comment made by a test", f"element vertex {len(points)}"]
    header += [f"property float {c}" for c in ("x", "y", "z", "nx", "ny", "nz")] + ["end_header"]
    body = np.concatenate([points, normals], axis=1).astype("<f4").tobytes()
    path.write_bytes(("\n".join(header) + "\n").encode() + body)


def test_import_with_and_without_ground_truth(tmp_path: Path) -> None:
    src = tmp_path / "deepsdf"
    for k, inst in enumerate(["a", "b", "c"]):
        write_deepsdf_instance(src, inst, k)
    rng = np.random.default_rng(0)
    pts_a = np.round(rng.normal(size=(30, 3)), 4)
    pts_a[4, 2] = np.nan  # dropped
    write_ascii_ply(src / "SurfaceSamples" / DS / CLS / "a.ply", pts_a)
    norm_dir = src / "NormalizationParameters" / DS / CLS
    norm_dir.mkdir(parents=True)
    np.savez(norm_dir / "a.npz", offset=np.array([0.1, -0.2, 0.3]), scale=np.array([2.0], dtype=np.float32))
    pts_c = rng.normal(size=(12, 3)).astype(np.float32)
    nrm_c = rng.normal(size=(12, 3))
    nrm_c /= np.linalg.norm(nrm_c, axis=1, keepdims=True)
    write_binary_ply(src / "SurfaceSamples" / DS / CLS / "c.ply", pts_c, nrm_c)
    split = tmp_path / "split.json"
    split.write_text(json.dumps({DS: {CLS: ["a", "b", "c"]}}))

    m = import_deepsdf(src, split, tmp_path / "out")
    assert m.num_with_ground_truth == 2 and [s.num_surface for s in m.scenes] == [29, 0, 12]
    assert m.scenes[0].normalization == {"offset": [0.1, -0.2, 0.3], "scale": 2.0}
    truth = load_surface(tmp_path / "out", [0, 1, 2])
    assert sorted(truth) == [0, 2]
    np.testing.assert_allclose(truth[0].points_M3, np.delete(pts_a, 4, axis=0), rtol=1e-6)
    assert truth[0].normals_M3 is None  # DeepSDF's files have no normals
    np.testing.assert_array_equal(truth[2].points_M3, pts_c)
    np.testing.assert_allclose(truth[2].normals_M3, nrm_c, atol=1e-6)

    points, normals = read_ply_points(src / "SurfaceSamples" / DS / CLS / "c.ply")
    assert points.shape == (12, 3) and normals is not None


def test_import_without_any_surface_samples(tmp_path: Path) -> None:
    src = tmp_path / "deepsdf"
    write_deepsdf_instance(src, "a", 0)
    split = tmp_path / "split.json"
    split.write_text(json.dumps({DS: {CLS: ["a"]}}))
    m = import_deepsdf(src, split, tmp_path / "out")
    assert m.num_with_ground_truth == 0 and m.surface_files == ()


def test_import_bad_ply_writes_nothing(tmp_path: Path) -> None:
    src = tmp_path / "deepsdf"
    write_deepsdf_instance(src, "a", 0)
    split = tmp_path / "split.json"
    split.write_text(json.dumps({DS: {CLS: ["a"]}}))
    ply = src / "SurfaceSamples" / DS / CLS / "a.ply"
    ply.parent.mkdir(parents=True)
    for content, message in [(b"not a ply", "not a PLY file"),
                             (b"ply\nformat ascii 1.0\nelement face 1\nend_header\n", "no vertex element"),
                             (b"ply\nformat ascii 1.0\nelement vertex 2\nproperty float x\nproperty float y\n"
                              b"property float z\nend_header\n1 2 3\n", "truncated or malformed")]:
        ply.write_bytes(content)
        with pytest.raises(DataError, match=message):
            import_deepsdf(src, split, tmp_path / "out")
        assert not (tmp_path / "out").exists()
