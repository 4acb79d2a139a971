"""`sdf-ray bench` on CPU at tiny sizes: the variants run, ratios and the precision check are computed."""

from __future__ import annotations

import torch

from sdf_ray import config as C
from sdf_ray.bench import precision_check, run_bench, synthetic_scenes
from sdf_ray.cli import main
from tests.helpers import tiny_config


def test_synthetic_scenes_are_packed_positive_first():
    packed = synthetic_scenes(5, 64)
    for s in range(5):
        pos = packed.samples_M4[packed.pos_offset[s]: packed.pos_offset[s] + packed.pos_count[s], 3]
        neg = packed.samples_M4[packed.neg_offset[s]: packed.neg_offset[s] + packed.neg_count[s], 3]
        assert (pos > 0).all() and (neg <= 0).all() and len(pos) + len(neg) == 64


def test_bench_times_every_variant_with_the_same_work():
    cfg = tiny_config(**{"scaling.num_workers": 1})
    timings = run_bench(cfg, torch.device("cpu"), num_scenes=16, steps=2, warmup=1, rounds=1)
    assert [t.name for t in timings] == ["guarded (sdf-ray step)", "guard off", "guarded, a code per sample",
                                         "reference (fp32, .item(), host codes)"]
    for t in timings:
        assert t.samples_per_step == 4 * 64 and t.samples_per_s > 0 and t.tflops > 0
    # A code per sample executes the code GEMM for every sample: more FLOPs per sample.
    assert timings[2].flops_per_sample > timings[0].flops_per_sample == timings[1].flops_per_sample


def test_bf16_reaches_the_fp32_loss_on_the_same_batches():
    cfg = C.apply_overrides(tiny_config(**{"scaling.num_workers": 1}), {"optim.precision": "bf16"})
    result = precision_check(cfg, torch.device("cpu"), steps=120)
    assert set(result) == {"fp32", "bf16", "relative_difference"}
    assert result["fp32"] < 0.15  # it trained (the loss starts near 0.2)
    assert result["relative_difference"] < 0.05


def test_bench_cli_prints_the_table_and_overhead(capsys):
    code = main(["bench", "--config", str(C.packaged_config("tiny")), "--set", "scaling.num_workers=1",
                 "--device", "cpu", "--num-scenes", "8", "--steps", "1", "--rounds", "1", "--warmup", "0"])
    out = capsys.readouterr().out
    assert code == 0 and "guard overhead:" in out and "reference (fp32, .item(), host codes)" in out
    assert main(["bench", "--config", str(C.packaged_config("tiny")), "--steps", "0"]) == 2
