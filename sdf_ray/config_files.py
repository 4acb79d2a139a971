"""YAML files and ``--set KEY=VALUE`` overrides as plain data, and plain data back to YAML.

The plain-data end of every structured file (training configs, search files): parse here, then hand the data
to :mod:`sdf_ray.structure`. One override path serves the CLI's ``--set section.key=value`` and Tune's sampled
parameters.
"""

from __future__ import annotations

import copy
import dataclasses
import re
from pathlib import Path
from typing import Any

import yaml

from sdf_ray.errors import ConfigError


class _YamlLoader(yaml.SafeLoader):
    """SafeLoader that also reads ``1e-3`` as a float (YAML 1.1 insists on ``1.0e-3``)."""


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
    |\.[0-9_]+(?:[eE][-+][0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."),
)


def yaml_load(text: str) -> Any:
    """Parse YAML the way configs and ``--set`` values are parsed everywhere in sdf-ray."""
    return yaml.load(text, Loader=_YamlLoader)  # noqa: S506 - a SafeLoader subclass


def read_yaml_file(path: str | Path, what: str = "config") -> Any:
    """Parse a YAML file; a missing, unreadable or malformed file is one ConfigError naming ``what``."""
    p = Path(path)
    try:
        text = p.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{what} file not found: {p}") from None
    except IsADirectoryError:
        raise ConfigError(f"{what} path is a directory, not a file: {p}") from None
    except OSError as exc:
        raise ConfigError(f"cannot read {what} file {p}: {exc.strerror}") from None
    try:
        return yaml_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"not valid YAML{at}", source=str(p)) from None


def read_yaml_sections(path: str | Path, what: str = "config") -> dict[str, Any]:
    """A YAML file whose top level is a mapping of sections (an empty file is ``{}``)."""
    data = read_yaml_file(path, what)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"top level must be a mapping of sections, got {type(data).__name__}", source=str(path))
    return data


def parse_override(text: str) -> tuple[str, Any]:
    """``section.key=value`` with a YAML-parsed value (``1e-3``, ``true``, ``[4]``, ``null``)."""
    if "=" not in text:
        raise ConfigError(f"`--set {text}`: expected section.key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or key.startswith(".") or key.endswith("."):
        raise ConfigError(f"`--set {text}`: expected section.key=value")
    try:
        value = yaml_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"`--set {text}`: value is not valid YAML ({exc.__class__.__name__})") from None
    return key, value


def parse_overrides(texts: list[str], problems: list[str]) -> dict[str, Any]:
    """Every ``--set`` text parsed; a bad one is appended to ``problems`` and skipped."""
    parsed: dict[str, Any] = {}
    for text in texts:
        try:
            key, value = parse_override(text)
        except ConfigError as exc:
            problems.extend(exc.problems)
            continue
        parsed[key] = value
    return parsed


def merge_overrides(data: dict[str, Any], overrides: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """Apply dotted-key overrides to plain data; returns the new data and any problems."""
    merged = copy.deepcopy(data) if data else {}
    problems: list[str] = []
    for dotted, value in overrides.items():
        parts = dotted.split(".")
        node: Any = merged
        for part in parts[:-1]:
            if not isinstance(node, dict):
                problems.append(f"`{dotted}`: `{part}` is not a section")
                break
            node = node.setdefault(part, {})
        else:
            if isinstance(node, dict):
                node[parts[-1]] = value
            else:
                problems.append(f"`{dotted}`: cannot set a key inside a non-mapping value")
    return merged, problems


def to_dict(obj: Any) -> dict[str, Any]:
    """A dataclass as plain, YAML- and pickle-friendly data (tuples become lists)."""

    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v) and not isinstance(v, type):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        return v

    result = plain(obj)
    assert isinstance(result, dict)
    return result


def to_yaml(obj: Any) -> str:
    return yaml.safe_dump(to_dict(obj), sort_keys=False, default_flow_style=None)
