"""The one error every input problem becomes: ``FILE: field.path: reason``."""

from __future__ import annotations


class ScenarioError(Exception):
    """A scenario problem located by file and dotted field path; printed as one line."""

    def __init__(self, path: str, reason: str, file: str | None = None) -> None:
        self.path, self.reason, self.file = path, reason, file
        super().__init__(str(self))

    def __str__(self) -> str:
        where = f"{self.file}: " if self.file else ""
        return f"{where}{self.path or '(top level)'}: {self.reason}"
