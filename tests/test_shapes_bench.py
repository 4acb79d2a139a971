"""``python -m sdf_ray.shapes.bench``: every stage runs and reports, on a CPU at a tiny size."""

from __future__ import annotations

import re

import pytest


@pytest.mark.parametrize("points", [0, 5000])
def test_the_reconstruction_bench_reports_every_stage(points, capsys):
    from sdf_ray.shapes.bench import main

    main(["--device", "cpu", "--shapes", "2", "--iterations", "2", "--samples", "64", "--resolution", "24",
          "--mesh-shapes", "1"] + (["--points-per-shape", str(points)] if points else []))
    out = capsys.readouterr().out
    for stage in ("optimise:", "decode:", "device total:", "mesh (CPU, 1 core):"):
        assert stage in out, out
    decoded = re.search(r"decode: ([\d,]+) points/shape( \(analytic shapes\))?", out)
    assert decoded is not None, out
    if points:  # the count asked for, not the analytic shapes'
        assert decoded.group(1) == "5,000" and decoded.group(2) is None
    else:
        assert 0 < int(decoded.group(1).replace(",", "")) < 24 ** 3 and decoded.group(2)
