"""Dataset format: write/read round trip, validation of bad inputs, atomic writes, info and CLI glue."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sdf_ray.data import commands
from sdf_ray.data.format import (
    MANIFEST_NAME,
    SCHEMA,
    SceneSamples,
    load_scenes,
    read_manifest,
    validate_files,
    write_dataset,
)
from sdf_ray.data.info import dataset_info, format_info
from sdf_ray.errors import DataError, UserError


def make_scene(i: int, num_pos: int, num_neg: int, seed: int = 0) -> SceneSamples:
    rng = np.random.default_rng([seed, i])
    pos = rng.uniform(-1, 1, size=(num_pos, 4)).astype(np.float32)
    pos[:, 3] = rng.uniform(0.001, 0.5, size=num_pos)
    neg = rng.uniform(-1, 1, size=(num_neg, 4)).astype(np.float32)
    neg[:, 3] = -rng.uniform(0.0, 0.5, size=num_neg)
    neg[0, 3] = 0.0  # exact zero belongs to the non-positive side
    return SceneSamples(name=f"scene-{i}", pos_N4=pos, neg_N4=neg,
                        normalization={"offset": [0.1 * i, 0.0, -0.5], "scale": 1.0 + i}, dropped_nan_rows=i % 3)


SIZES = [(30, 20), (5, 7), (40, 41), (12, 3), (25, 25), (1, 1)]


@pytest.fixture
def small_dataset(tmp_path: Path) -> tuple[Path, list[SceneSamples]]:
    scenes = [make_scene(i, p, n) for i, (p, n) in enumerate(SIZES)]
    out = tmp_path / "ds"
    write_dataset(out, scenes, {"type": "test"}, max_rows_per_file=100)
    return out, scenes


def test_round_trip_multiple_files(small_dataset: tuple[Path, list[SceneSamples]]) -> None:
    out, scenes = small_dataset
    m = read_manifest(out)
    assert m.num_scenes == len(SIZES)
    assert m.num_samples == sum(p + n for p, n in SIZES)
    assert len(m.files) > 1
    assert all(f.num_rows <= 100 for f in m.files)
    assert [s.name for s in m.scenes] == [s.name for s in scenes]
    assert m.scenes[2].normalization == {"offset": [0.2, 0.0, -0.5], "scale": 3.0}
    assert m.dropped_nan_rows == sum(i % 3 for i in range(len(SIZES)))
    assert validate_files(out) == m
    # One row group per scene, and the scene column holds the global id.
    for f in m.files:
        pf = pq.ParquetFile(out / f.name)
        in_file = [i for i, s in enumerate(m.scenes) if s.file == f.name]
        assert pf.metadata.num_row_groups == len(in_file)
        assert sorted(set(pf.read().column("scene").to_pylist())) == in_file

    ids = [4, 0, 5, 2]
    packed = load_scenes(out, ids)
    assert packed.scene_ids.tolist() == ids
    assert packed.samples_M4.dtype == np.float32
    assert packed.samples_M4.shape == (sum(sum(SIZES[i]) for i in ids), 4)
    for j, i in enumerate(ids):
        pos = packed.samples_M4[packed.pos_offset[j]:packed.pos_offset[j] + packed.pos_count[j]]
        neg = packed.samples_M4[packed.neg_offset[j]:packed.neg_offset[j] + packed.neg_count[j]]
        np.testing.assert_array_equal(pos, scenes[i].pos_N4)
        np.testing.assert_array_equal(neg, scenes[i].neg_N4)
        assert packed.neg_offset[j] == packed.pos_offset[j] + packed.pos_count[j]
    assert load_scenes(out, []).samples_M4.shape == (0, 4)


def test_load_reads_only_requested_row_groups(small_dataset: tuple[Path, list[SceneSamples]],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    out, _ = small_dataset
    requested: list[list[int]] = []
    real = pq.ParquetFile.read_row_groups

    def spy(self: pq.ParquetFile, row_groups: list[int], *args: object, **kwargs: object) -> pa.Table:
        requested.append(list(row_groups))
        return real(self, row_groups, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(pq.ParquetFile, "read_row_groups", spy)
    load_scenes(out, [3])  # files of <= 100 rows: [scene 0, 1], [scene 2, 3], [scene 4, 5]
    assert requested == [[1]]


def test_load_rejects_out_of_range_id(small_dataset: tuple[Path, list[SceneSamples]]) -> None:
    out, _ = small_dataset
    with pytest.raises(DataError, match="scene id 6 out of range"):
        load_scenes(out, [0, 6])


def test_existing_output_refused_then_overwritten(tmp_path: Path) -> None:
    out = tmp_path / "ds"
    write_dataset(out, [make_scene(0, 4, 4)], {"v": 1})
    with pytest.raises(DataError, match="already holds a dataset"):
        write_dataset(out, [make_scene(0, 4, 4)], {"v": 2})
    assert read_manifest(out).source == {"v": 1}
    write_dataset(out, [make_scene(i, 4, 4) for i in range(3)], {"v": 2}, overwrite=True)
    assert read_manifest(out).source == {"v": 2}
    assert read_manifest(out).num_scenes == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]  # no temp/old dirs left behind


def test_non_empty_dir_refused_empty_dir_accepted(tmp_path: Path) -> None:
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(DataError, match="not empty"):
        write_dataset(other, [make_scene(0, 4, 4)], {})
    with pytest.raises(DataError, match="refusing to replace"):
        write_dataset(other, [make_scene(0, 4, 4)], {}, overwrite=True)
    assert (other / "notes.txt").read_text() == "keep me"
    empty = tmp_path / "empty"
    empty.mkdir()
    write_dataset(empty, [make_scene(0, 4, 4)], {})
    assert read_manifest(empty).num_scenes == 1


@pytest.mark.parametrize("num_pos, num_neg", [(0, 5), (5, 0)])
def test_scene_without_both_signs_refused(tmp_path: Path, num_pos: int, num_neg: int) -> None:
    scene = make_scene(0, max(num_pos, 1), max(num_neg, 1))
    scene.pos_N4, scene.neg_N4 = scene.pos_N4[:num_pos], scene.neg_N4[:num_neg]
    with pytest.raises(DataError, match="scene-0: needs both positive and negative"):
        write_dataset(tmp_path / "ds", [scene], {})
    assert not (tmp_path / "ds").exists()


def test_mis_signed_rows_and_no_scenes_refused(tmp_path: Path) -> None:
    scene = make_scene(0, 4, 4)
    scene.pos_N4[2, 3] = -0.1
    with pytest.raises(DataError, match="pos_N4 has rows with sdf <= 0"):
        write_dataset(tmp_path / "ds", [scene], {})
    with pytest.raises(DataError, match="no scenes"):
        write_dataset(tmp_path / "ds", [], {})
    with pytest.raises(DataError, match="duplicate scene name"):
        write_dataset(tmp_path / "ds", [make_scene(0, 3, 3), make_scene(0, 3, 3)], {})
    assert list(tmp_path.iterdir()) == []


def test_crash_mid_write_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = {"n": 0}
    real = pq.ParquetWriter.write_table

    def flaky(self: pq.ParquetWriter, table: pa.Table, *args: object, **kwargs: object) -> None:
        calls["n"] += 1
        if calls["n"] > 2:  # the first file (2 scenes of 60 rows, 100 rows max) is complete by then
            raise OSError("disk on fire")
        real(self, table, *args, **kwargs)  # type: ignore[arg-type]

    out = tmp_path / "ds"
    monkeypatch.setattr(pq.ParquetWriter, "write_table", flaky)
    with pytest.raises(OSError, match="disk on fire"):
        write_dataset(out, [make_scene(i, 30, 30) for i in range(4)], {}, max_rows_per_file=100)
    assert calls["n"] == 3
    assert list(tmp_path.iterdir()) == []


def test_crash_mid_overwrite_keeps_old_dataset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "ds"
    write_dataset(out, [make_scene(i, 10, 10) for i in range(2)], {"v": "old"})
    before = load_scenes(out, [0, 1]).samples_M4

    def scenes():  # type: ignore[no-untyped-def]
        yield make_scene(0, 50, 50, seed=1)
        yield make_scene(1, 50, 50, seed=1)
        raise KeyboardInterrupt  # e.g. Ctrl-C while the second file is being written

    with pytest.raises(KeyboardInterrupt):
        write_dataset(out, scenes(), {"v": "new"}, overwrite=True, max_rows_per_file=100)
    assert read_manifest(out).source == {"v": "old"}
    np.testing.assert_array_equal(load_scenes(out, [0, 1]).samples_M4, before)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]


def test_missing_empty_and_corrupt_manifest(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        read_manifest(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="is empty"):
        read_manifest(tmp_path / "empty")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / MANIFEST_NAME).write_text("{not json")
    with pytest.raises(DataError, match="corrupt manifest .*manifest.json"):
        read_manifest(bad)
    (bad / MANIFEST_NAME).write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(DataError, match="not an sdf-ray dataset manifest"):
        read_manifest(bad)


def _edit_manifest(ds: Path, edit) -> None:  # type: ignore[no-untyped-def]
    raw = json.loads((ds / MANIFEST_NAME).read_text())
    edit(raw)
    (ds / MANIFEST_NAME).write_text(json.dumps(raw))


def test_manifest_with_zero_scenes_and_bad_fields(small_dataset: tuple[Path, list[SceneSamples]]) -> None:
    out, _ = small_dataset
    original = (out / MANIFEST_NAME).read_text()
    cases = [
        (lambda r: r.update(scenes=[], files=[], num_scenes=0, num_samples=0), "empty dataset"),
        (lambda r: r.update(format_version=99), "newer sdf-ray"),
        (lambda r: r.pop("files"), "missing key 'files'"),
        (lambda r: r["scenes"][1].update(num_pos="12"), r"scene 1 \(scene-1\): 'num_pos'"),
        (lambda r: r["scenes"][0]["normalization"].update(scale=-1), "'scale' must be a positive number"),
        (lambda r: r["files"][0].update(name="../evil.parquet"), "invalid file name"),
        (lambda r: r.update(num_scenes=5), "num_scenes is 5 but 6 scenes"),
    ]
    for edit, message in cases:
        (out / MANIFEST_NAME).write_text(original)
        _edit_manifest(out, edit)
        with pytest.raises(DataError, match=message):
            read_manifest(out)


def test_truncated_parquet_detected(small_dataset: tuple[Path, list[SceneSamples]]) -> None:
    out, _ = small_dataset
    part = out / read_manifest(out).files[1].name
    data = part.read_bytes()
    part.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=f"corrupt or truncated Parquet file {part.name}"):
        validate_files(out)
    with pytest.raises(DataError, match=f"corrupt or truncated Parquet file {part.name}"):
        load_scenes(out, [3])
    load_scenes(out, [0])  # scenes in intact files still load


def test_missing_file_detected(small_dataset: tuple[Path, list[SceneSamples]]) -> None:
    out, _ = small_dataset
    name = read_manifest(out).files[0].name
    (out / name).unlink()
    with pytest.raises(DataError, match=f"missing data file {name}"):
        validate_files(out)


def test_manifest_row_counts_disagree_with_file(small_dataset: tuple[Path, list[SceneSamples]]) -> None:
    out, _ = small_dataset
    m = read_manifest(out)
    f0 = m.files[0]
    last = max(i for i, s in enumerate(m.scenes) if s.file == f0.name)

    def shrink(raw: dict) -> None:  # type: ignore[type-arg]
        raw["files"][0]["num_rows"] -= 1
        raw["scenes"][last]["num_neg"] -= 1
        raw["num_samples"] -= 1

    _edit_manifest(out, shrink)
    read_manifest(out)  # self-consistent manifest...
    with pytest.raises(DataError, match=f"manifest says {f0.num_rows - 1} rows in {f0.name}, file has {f0.num_rows}"):
        validate_files(out)  # ...that disagrees with the file
    with pytest.raises(DataError, match="manifest says"):
        load_scenes(out, [0])

    _edit_manifest(out, lambda r: r["files"][0].update(num_rows=5))
    with pytest.raises(DataError, match=f"'files' says 5 rows in {f0.name}"):
        read_manifest(out)


def test_scene_column_and_sign_mismatch_detected(tmp_path: Path) -> None:
    out = tmp_path / "ds"
    write_dataset(out, [make_scene(i, 6, 4) for i in range(2)], {})
    part = out / "part-00000.parquet"
    table = pq.read_table(part)
    # Same row count, scene ids swapped: the manifest now points at the wrong rows.
    swapped = table.set_column(0, "scene", pa.array(np.repeat(np.array([1, 0], np.int32), 10)))
    pq.write_table(swapped, part)
    validate_files(out)  # metadata still agrees
    with pytest.raises(DataError, match=r"scene column mismatch .*scene 0 \(scene-0\)"):
        load_scenes(out, [0])
    # Rows reordered so that a negative row sits in the positive block.
    sdf = table.column("sdf").to_numpy().copy()
    sdf[[0, 7]] = sdf[[7, 0]]
    pq.write_table(table.set_column(4, pa.field("sdf", pa.float32(), nullable=False), pa.array(sdf)), part)
    with pytest.raises(DataError, match="not positive-first"):
        load_scenes(out, [0])


def test_wrong_schema_detected(small_dataset: tuple[Path, list[SceneSamples]]) -> None:
    out, _ = small_dataset
    name = read_manifest(out).files[0].name
    table = pq.read_table(out / name)
    pq.write_table(table.set_column(1, "x", table.column("x").cast(pa.float64())), out / name)
    with pytest.raises(DataError, match=f"wrong schema in {name}"):
        validate_files(out)
    assert SCHEMA.names == ["scene", "x", "y", "z", "sdf"]


def test_dataset_info(small_dataset: tuple[Path, list[SceneSamples]]) -> None:
    out, scenes = small_dataset
    info = dataset_info(out)
    all_sdf = np.concatenate([np.concatenate([s.pos_N4[:, 3], s.neg_N4[:, 3]]) for s in scenes])
    assert info["num_scenes"] == len(SIZES)
    assert info["num_pos"] == sum(p for p, _ in SIZES)
    assert info["num_neg"] == sum(n for _, n in SIZES)
    assert info["pos_fraction"] == pytest.approx(info["num_pos"] / info["num_samples"])
    assert info["sdf_min"] == pytest.approx(float(all_sdf.min()))
    assert info["sdf_max"] == pytest.approx(float(all_sdf.max()))
    assert info["sdf_mean_abs"] == pytest.approx(float(np.abs(all_sdf).mean()), rel=1e-5)
    assert info["dropped_nan_rows"] == 6
    assert info["size_bytes"] == sum(p.stat().st_size for p in out.iterdir())
    assert info["source"] == {"type": "test"}
    text = format_info(info)
    assert f"{info['num_samples']:,}" in text and "positive" in text and "type=test" in text


def _cli() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sdf-ray")
    commands.register(parser.add_subparsers(dest="command", required=True))
    return parser


def test_cli_synth_info_and_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "demo"

    def synth(out_dir: Path, num_scenes: str = "3", samples: str = "64", *extra: str) -> int:
        args = _cli().parse_args(["data", "synth", "--out", str(out_dir), "--num-scenes", num_scenes,
                                  "--samples-per-scene", samples, "--seed", "1", *extra])
        return int(args.func(args))

    assert synth(out) == 0
    assert f"wrote 3 scenes, 192 samples to {out}" in capsys.readouterr().out
    assert read_manifest(out).source == {"type": "synth", "num_scenes": 3, "samples_per_scene": 64, "seed": 1}
    with pytest.raises(DataError, match="already holds a dataset"):
        synth(out, "5")
    assert read_manifest(out).num_scenes == 3
    assert synth(out, "5", "64", "--overwrite") == 0
    assert read_manifest(out).num_scenes == 5

    args = _cli().parse_args(["data", "info", str(out)])
    assert args.func(args) == 0
    assert "5 in 1 file(s)" in capsys.readouterr().out

    for bad in ("63", "0", "-2"):
        with pytest.raises(UserError, match="positive even number"):
            synth(tmp_path / "x", "3", bad)
    with pytest.raises(DataError, match="number of scenes must be positive"):
        synth(tmp_path / "x", "0")
    assert not (tmp_path / "x").exists()

    args = _cli().parse_args(["data", "info", str(tmp_path / "missing")])
    with pytest.raises(DataError, match="does not exist"):
        args.func(args)


def test_write_uses_temp_dir_next_to_target(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[str] = []
    real_replace = os.replace  # fsutil.atomic_directory renames with os.replace

    def spy(src: str | Path, dst: str | Path) -> None:
        seen.append(f"{Path(src).name}->{Path(dst).name}")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", spy)
    write_dataset(tmp_path / "ds", [make_scene(0, 3, 3)], {})
    assert seen == [f".ds.tmp-{os.getpid()}->ds"]


def test_non_finite_samples_in_a_dataset_are_a_data_error(tmp_path):
    """A dataset written by another tool may hold NaN: loading refuses it instead of training on it."""
    import numpy as np
    import pyarrow.parquet as pq
    import pytest

    from sdf_ray.data.format import SceneSamples, load_scenes, read_manifest, write_dataset
    from sdf_ray.errors import DataError

    pos = np.array([[0.1, 0.2, 0.3, 0.5], [0.0, 0.0, 0.4, 0.2]], dtype=np.float32)
    neg = np.array([[0.0, 0.0, 0.0, -0.1]], dtype=np.float32)
    write_dataset(tmp_path / "d", [SceneSamples(name="s0", pos_N4=pos, neg_N4=neg)], source={"kind": "test"})
    path = tmp_path / "d" / read_manifest(tmp_path / "d").files[0].name
    table = pq.read_table(path)
    x = table.column("x").to_numpy().copy()
    x[1] = np.nan
    pq.write_table(table.set_column(1, table.schema.field("x"), [x]), path)
    with pytest.raises(DataError, match="NaN or Inf"):
        load_scenes(tmp_path / "d", [0])
