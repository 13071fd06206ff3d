"""One exception type for every user-facing failure.

The CLI prints ``str(error)`` as a single line and exits non-zero, so every message names the problem
and, after ``Fix:``, what the user can do about it.
"""

from __future__ import annotations


class OnnxqError(Exception):
    """A problem with the user's input or environment, reported as one line."""

    def __init__(self, problem: str, fix: str = "") -> None:
        self.problem = problem.rstrip(".")
        self.fix = fix.rstrip(".")
        super().__init__(self.problem + (f". Fix: {self.fix}." if self.fix else "."))
