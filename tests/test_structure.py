"""The one structurer: any frozen dataclass from plain data, every problem at once, each named by its path."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

import pytest

from sdf_ray.errors import ConfigError
from sdf_ray.structure import (
    STRUCTURE,
    Interval,
    NonEmpty,
    PositiveInt,
    Problem,
    Rule,
    convert,
    structure,
)


@dataclass(frozen=True, kw_only=True)
class Grid:
    resolution: Annotated[int, Interval(8, 1024)] = 256
    """Cells per axis."""
    margin: float = 0.1
    """Safety margin."""


@dataclass(frozen=True, kw_only=True)
class Section:
    num_iterations: PositiveInt = 800
    """Steps."""
    precision: Literal["fp32", "bf16"] = "fp32"
    """Choices are Literals."""
    name: Annotated[str, NonEmpty()] = "x"
    """Must not be empty."""
    betas: tuple[float, float] = (0.9, 0.999)
    """A fixed-length list."""
    clamp: float | None = None
    """Optional."""
    grid: Grid = field(default_factory=Grid)
    """A nested section."""
    tags: dict[str, int] = field(default_factory=dict)
    """A mapping of names to values."""
    even: Annotated[int, Rule(lambda n: n % 2 == 0, "must be even")] = 2
    """A rule of its own."""

    def validate(self) -> Iterator[tuple[str, str]]:
        if self.precision == "bf16" and self.clamp is None:
            yield "clamp", "must be set with bf16"


def test_a_standalone_section_with_defaults_and_values() -> None:
    assert structure(Section, {}) == Section()
    s = structure(Section, {"num_iterations": 5, "precision": "bf16", "clamp": 1, "betas": [0, 0.5],
                            "grid": {"resolution": 64}, "tags": {"a": 1}})
    assert s.clamp == 1.0 and isinstance(s.clamp, float) and s.betas == (0.0, 0.5)
    assert s.grid == Grid(resolution=64) and s.tags == {"a": 1}
    assert structure(Section, None) == Section()


def test_every_problem_at_once_with_paths() -> None:
    with pytest.raises(ConfigError) as info:
        structure(Section, {"num_iterations": 0, "precision": "fp16", "name": "", "betas": [1], "clamp": "x",
                            "grid": {"resolution": 4, "margn": 1}, "tags": {"a": "b"}, "even": 3,
                            "num_iteration": 1}, source="r.yaml")
    problems = info.value.problems
    assert problems == [
        "`num_iterations`: must be > 0, got 0",
        "`precision`: expected one of 'fp32' | 'bf16', got 'fp16'",
        "`name`: must not be empty",
        "`betas`: expected a list of 2 items, got 1",
        "`clamp`: expected float, got str 'x'",
        "`grid.resolution`: must be in [8, 1024], got 4",
        "`grid.margn`: unknown key, did you mean `grid.margin`?",
        "`tags.a`: expected int, got str 'b'",
        "`even`: must be even, got 3",
        "`num_iteration`: unknown key, did you mean `num_iterations`?",
    ]
    assert str(info.value).startswith("r.yaml: 10 problems: ")


def test_validate_runs_after_the_fields_and_problems_keep_their_path() -> None:
    problems: list[str] = []
    assert convert(Section, {"precision": "bf16"}, problems, "reconstruct") == Section(precision="bf16")
    assert problems == ["`reconstruct.clamp`: must be set with bf16"]
    p = problems[0]
    assert isinstance(p, Problem) and (p.path, p.message, p.kind) == ("reconstruct.clamp", "must be set with bf16",
                                                                      "value")


def test_bare_key_suggestions_and_missing_keys() -> None:
    @dataclass(frozen=True, kw_only=True)
    class Needs:
        step: int
        """Required."""

    problems: list[str] = []
    assert convert(Needs, {"stpe": 1}, problems, "inject", suggest_full_path=False) is None
    assert problems == ["`inject.stpe`: unknown key, did you mean `step`?", "`inject.step`: required key is missing"]
    assert [p.kind for p in problems if isinstance(p, Problem)] == ["unknown", "missing"]
    problems = []
    assert convert(Needs, [1], problems) is None
    assert problems == ["top level must be a mapping, got list [1]"]


def test_a_field_with_a_grammar_of_its_own() -> None:
    def split_words(value: Any, path: str, problems: list[str]) -> tuple[str, ...] | None:
        if not isinstance(value, str):
            problems.append(f"`{path}`: expected words")
            return None
        return tuple(value.split())

    @dataclass(frozen=True, kw_only=True)
    class Sentence:
        words: tuple[str, ...] = field(default=(), metadata={STRUCTURE: split_words})
        """Space-separated."""

    assert structure(Sentence, {"words": "a b"}).words == ("a", "b")
    with pytest.raises(ConfigError, match="`words`: expected words"):
        structure(Sentence, {"words": 3})
