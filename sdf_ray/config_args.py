"""``--config FILE [--set SECTION.KEY=VALUE ...]``: the arguments of every command that takes a training config
(``train``, ``check-config``, ``print-config``, ``tune``, ``bench``), and loading the config they name."""

from __future__ import annotations

import argparse

from sdf_ray import config as config_mod


def add_config_args(parser: argparse.ArgumentParser, *, positional: bool = False) -> None:
    """Add the config file (``--config FILE``, or a positional ``config``) and the repeatable ``--set``."""
    if positional:
        parser.add_argument("config", help="training config YAML")
    else:
        parser.add_argument("--config", required=True, help="training config YAML")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one training-config value (YAML-parsed), repeatable")


def load_config(args: argparse.Namespace) -> config_mod.TrainConfig:
    """The validated config named by the arguments :func:`add_config_args` added (``ConfigError`` if not)."""
    return config_mod.load(args.config, args.overrides)
