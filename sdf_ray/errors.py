"""User-facing error types and the exit codes of every ``sdf-ray`` command.

A ``UserError`` prints as one line and exits with ``EXIT_USER``; anything else is a bug (a traceback, exit 1).
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILED = 1
"""A failed run, or a bug (with a traceback)."""
EXIT_USER = 2
"""A ``UserError``: one line, no traceback."""
EXIT_DIVERGED = 3
"""Training diverged (the guard gave up), or every trial of a sweep did."""
EXIT_INTERRUPTED = 130
"""Ctrl-C, or a sweep interrupted with trials unfinished (re-run the command to resume)."""


def first_line(exc: BaseException) -> str:
    """An exception's first non-empty line (or its type name): Ray's errors span many lines."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def cause_line(exc: BaseException) -> str:
    """What went wrong at the bottom of a chain of Ray task errors (``RayTaskError.cause``, nested when a failed
    task's output was another task's argument), as ``Type: first line``; the first line of a RayTaskError
    itself only names the task and its process."""
    root, seen = exc, set()
    while isinstance(getattr(root, "cause", None), BaseException) and id(root) not in seen:
        seen.add(id(root))
        root = root.cause  # type: ignore[attr-defined]
    if root is exc:
        return first_line(exc)
    name = type(root).__name__
    if name.startswith("RayTaskError(") and name.endswith(")"):
        name = name[len("RayTaskError("):-1]
    message = str(root).strip()
    return f"{name}: {message.splitlines()[0]}" if message else name


class UserError(Exception):
    """A problem the user can fix (bad config, bad data, bad arguments): exit code 2, no traceback."""


class ConfigError(UserError):
    """One or more problems in a training or search config; ``problems`` lists them all."""

    def __init__(self, problems: list[str] | str, source: str | None = None) -> None:
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        self.source = source
        where = f"{source}: " if source else ""
        if len(self.problems) == 1:
            message = f"{where}{self.problems[0]}"
        else:
            message = f"{where}{len(self.problems)} problems: " + "; ".join(self.problems)
        super().__init__(message)


class DataError(UserError):
    """A dataset that is missing, corrupt, or disagrees with its manifest."""


class ClusterError(UserError):
    """The Ray cluster cannot run what was asked (unreachable, too small, no token)."""

