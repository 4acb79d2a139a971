"""DeepSDF .npz import: NaN handling, sign re-split, normalisation, and every kind of bad input."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest

from sdf_ray.data import commands
from sdf_ray.data.deepsdf_import import import_deepsdf, read_split
from sdf_ray.data.format import load_scenes, read_manifest
from sdf_ray.errors import DataError

DS, CLS = "ShapeNetV2", "04256520"


def write_instance(root: Path, inst: str, pos: np.ndarray, neg: np.ndarray, cls: str = CLS) -> Path:
    d = root / "SdfSamples" / DS / cls
    d.mkdir(parents=True, exist_ok=True)
    path = d / f"{inst}.npz"
    np.savez(path, pos=pos, neg=neg)
    return path


def rows(n: int, sign: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    a = rng.uniform(-1, 1, size=(n, 4)).astype(np.float32)
    a[:, 3] = sign * rng.uniform(0.01, 0.1, size=n)
    return a


def write_split(path: Path, instances: list[str], cls: str = CLS) -> Path:
    path.write_text(json.dumps({DS: {cls: instances}}))
    return path


def test_import_with_nan_rows_and_resplit(tmp_path: Path) -> None:
    src = tmp_path / "deepsdf"
    pos_a, neg_a = rows(10, +1, 0), rows(8, -1, 1)
    pos_a[3, 3] = np.nan  # NaN sdf
    pos_a[5, 0] = np.nan  # NaN coordinate
    neg_a[0, 3] = 0.0  # exact zero in neg stays non-positive
    neg_a[1, 3] = 0.05  # a positive row filed under neg moves to pos
    write_instance(src, "aaa", pos_a, neg_a)
    pos_b, neg_b = rows(6, +1, 2), rows(6, -1, 3)
    neg_b[2] = np.nan
    write_instance(src, "bbb", pos_b, neg_b)
    norm_dir = src / "NormalizationParameters" / DS / CLS
    norm_dir.mkdir(parents=True)
    np.savez(norm_dir / "bbb.npz", offset=np.array([0.1, -0.2, 0.3]), scale=np.float64(2.5))

    split = write_split(tmp_path / "split.json", ["aaa", "bbb"])
    m = import_deepsdf(src, split, tmp_path / "out")
    assert [s.name for s in m.scenes] == [f"{DS}/{CLS}/aaa", f"{DS}/{CLS}/bbb"]
    a, b = m.scenes
    assert (a.dropped_nan_rows, b.dropped_nan_rows) == (2, 1)
    assert m.dropped_nan_rows == 3
    assert (a.num_pos, a.num_neg) == (10 - 2 + 1, 8 - 1)
    assert (b.num_pos, b.num_neg) == (6, 5)
    assert a.normalization == {"offset": [0.0, 0.0, 0.0], "scale": 1.0}
    assert b.normalization == {"offset": [0.1, -0.2, 0.3], "scale": 2.5}
    assert m.source["type"] == "deepsdf" and m.source["split"] == str(split.resolve())
    assert read_manifest(tmp_path / "out") == m

    packed = load_scenes(tmp_path / "out", [0])
    got = packed.samples_M4
    assert np.isfinite(got).all()
    expected_pos = np.concatenate([np.delete(pos_a, [3, 5], axis=0), neg_a[1:2]])
    np.testing.assert_array_equal(got[: a.num_pos], expected_pos)
    np.testing.assert_array_equal(got[a.num_pos:], np.delete(neg_a, 1, axis=0))
    assert got[a.num_pos, 3] == 0.0


def test_missing_instances_listed_in_one_error(tmp_path: Path) -> None:
    src = tmp_path / "deepsdf"
    write_instance(src, "present", rows(4, 1, 0), rows(4, -1, 1))
    names = ["present"] + [f"gone{i:02d}" for i in range(13)]
    split = write_split(tmp_path / "split.json", names)
    with pytest.raises(DataError) as info:
        import_deepsdf(src, split, tmp_path / "out")
    msg = str(info.value)
    assert msg.startswith(f"13 instances missing from {src / 'SdfSamples'}: {DS}/{CLS}/gone00.npz, ")
    assert f"{DS}/{CLS}/gone09.npz" in msg and "gone10" not in msg
    assert msg.endswith("... and 3 more")
    assert "\n" not in msg
    assert not (tmp_path / "out").exists()

    write_split(tmp_path / "one.json", ["present", "gone00"])
    with pytest.raises(DataError, match=r"^1 instance missing from .*gone00\.npz$"):
        import_deepsdf(src, tmp_path / "one.json", tmp_path / "out")


def test_bad_npz_files(tmp_path: Path) -> None:
    src = tmp_path / "deepsdf"
    good = write_instance(src, "good", rows(4, 1, 0), rows(4, -1, 1))
    d = good.parent
    np.savez(d / "nopos.npz", neg=rows(4, -1, 1))
    np.savez(d / "badshape.npz", pos=rows(4, 1, 0)[:, :3], neg=rows(4, -1, 1))
    (d / "garbage.npz").write_bytes(b"this is not a zip file")
    np.savez(d / "allpos.npz", pos=rows(4, 1, 0), neg=rows(4, 1, 1))
    cases = {
        "nopos": r"nopos\.npz: missing array\(s\) pos \(has: neg\)",
        "badshape": r"badshape\.npz: 'pos' must have shape \(N, 4\), got \(4, 3\)",
        "garbage": r"cannot read .*garbage\.npz",
        "allpos": r"allpos\.npz: needs both positive and negative samples, has 8 with sdf > 0 and 0",
    }
    for inst, message in cases.items():
        split = write_split(tmp_path / f"{inst}.json", ["good", inst])
        with pytest.raises(DataError, match=message):
            import_deepsdf(src, split, tmp_path / "out")
        assert not (tmp_path / "out").exists()  # the scene before it was written to a temp dir only
        assert list(tmp_path.glob(".out*")) == []


def test_bad_normalization_file(tmp_path: Path) -> None:
    src = tmp_path / "deepsdf"
    write_instance(src, "a", rows(4, 1, 0), rows(4, -1, 1))
    norm_dir = src / "NormalizationParameters" / DS / CLS
    norm_dir.mkdir(parents=True)
    np.savez(norm_dir / "a.npz", offset=np.zeros(2), scale=np.float64(1.0))
    with pytest.raises(DataError, match=r"a\.npz: expected offset of 3 values"):
        import_deepsdf(src, write_split(tmp_path / "s.json", ["a"]), tmp_path / "out")


@pytest.mark.parametrize(
    "content, message",
    [
        ("{nope", "is not valid JSON"),
        ("[1, 2]", "got a JSON list"),
        (json.dumps({DS: ["a"]}), "must map class names"),
        (json.dumps({DS: {CLS: "a"}}), "must be a list of instance names"),
        (json.dumps({DS: {CLS: []}}), "lists no instances"),
        (json.dumps({DS: {CLS: ["a", "a"]}}), "twice"),
        (json.dumps({DS: {CLS: ["../../etc/passwd"]}}), "invalid name"),
    ],
)
def test_bad_split_files(tmp_path: Path, content: str, message: str) -> None:
    split = tmp_path / "split.json"
    split.write_text(content)
    with pytest.raises(DataError, match=message):
        read_split(split)


def test_bad_paths(tmp_path: Path) -> None:
    split = write_split(tmp_path / "s.json", ["a"])
    with pytest.raises(DataError, match="does not exist or is not a directory"):
        import_deepsdf(tmp_path / "nothing", split, tmp_path / "out")
    (tmp_path / "src").mkdir()
    with pytest.raises(DataError, match="no SdfSamples/ directory"):
        import_deepsdf(tmp_path / "src", split, tmp_path / "out")
    (tmp_path / "src" / "SdfSamples").mkdir()
    with pytest.raises(DataError, match="split file .*missing.json does not exist"):
        import_deepsdf(tmp_path / "src", tmp_path / "missing.json", tmp_path / "out")


def test_cli_import(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "deepsdf"
    pos = rows(5, 1, 0)
    pos[0, 1] = np.nan
    write_instance(src, "a", pos, rows(5, -1, 1))
    split = write_split(tmp_path / "s.json", ["a"])
    parser = argparse.ArgumentParser()
    commands.register(parser.add_subparsers(dest="command", required=True))
    argv = ["data", "import-deepsdf", "--data-source", str(src), "--split", str(split), "--out", str(tmp_path / "o")]
    args = parser.parse_args(argv)
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "imported 1 scenes, 9 samples to" in out and "dropped 1 rows with NaN" in out
    args = parser.parse_args(argv)
    with pytest.raises(DataError, match="already holds a dataset"):
        args.func(args)
    args = parser.parse_args([*argv, "--overwrite"])
    assert args.func(args) == 0
