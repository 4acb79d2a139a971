"""``sdf-ray bench``: the command's arguments. The CLI calls :func:`register` with its subparsers; the bench itself
(:mod:`sdf_ray.bench`, which imports torch) loads only when the command runs, so that no other command pays for it.
"""

from __future__ import annotations

import argparse
from typing import Any


def register(subparsers: Any) -> argparse.ArgumentParser:
    p: argparse.ArgumentParser = subparsers.add_parser(
        "bench", help="time the guarded training step against guard-off and a reference-style step")
    p.add_argument("--config", required=True, help="training config YAML")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--num-scenes", type=int, default=1000, help="scenes held on the device (default 1000)")
    p.add_argument("--steps", type=int, default=20, help="timed steps per round")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first (compilation, allocator)")
    p.add_argument("--rounds", type=int, default=3, help="rounds; the median round is reported")
    p.add_argument("--skip-reference", action="store_true", help="leave out the (slow) reference-style step")
    p.add_argument("--sweep", action="store_true", help="also vary samples per scene and the number of scenes")
    p.add_argument("--sweep-scenes", type=int, nargs="+", default=[1000, 100_000], metavar="N")
    p.add_argument("--sweep-samples", type=int, nargs="+", default=None, metavar="S",
                   help="samples per scene to sweep (default: a quarter, 1x and 4x the config's)")
    p.add_argument("--profile", type=int, default=0, metavar="STEPS",
                   help="instead of timing: profile STEPS guarded steps and print device time by kernel")
    p.add_argument("--precision-check", type=int, default=0, metavar="STEPS",
                   help="instead of timing: train fp32 and the config's precision/compile for STEPS steps on the "
                        "same batches and compare their final loss")
    p.set_defaults(func=_cmd_bench)
    return p


def _cmd_bench(args: argparse.Namespace) -> int:
    from sdf_ray.bench import cmd_bench

    return cmd_bench(args)
