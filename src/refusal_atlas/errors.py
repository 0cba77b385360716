"""One exception type for every user-facing error: the CLI prints it as one line and exits 1."""

from __future__ import annotations


class AtlasError(Exception):
    """A problem the user can fix; the message names the file/line/row and what to do."""

    def __init__(self, message: str, *, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class ValidationErrors(AtlasError):
    """Several located problems (e.g. `path:line: message`), printed one per line."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))
