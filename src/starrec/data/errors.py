"""One error type for bad input, always naming where the problem is."""

from __future__ import annotations

from pathlib import Path


class DataError(ValueError):
    """Input data that cannot be used as it is.

    The message names the file, the line (1-based, as an editor shows it) or column, and
    what was expected, so a user can fix the file without reading our code.
    """

    def __init__(
        self,
        message: str,
        *,
        path: str | Path | None = None,
        line: int | None = None,
        column: str | None = None,
    ) -> None:
        self.path = str(path) if path is not None else None
        self.line = line
        self.column = column
        where = []
        if self.path:
            where.append(self.path)
        if line is not None:
            where.append(f"line {line}")
        if column is not None:
            where.append(f"column '{column}'")
        super().__init__(f"{': '.join(where)}: {message}" if where else message)


class LeakError(DataError):
    """Data meant for fitting or evidence holds a task's target or what came after it.

    Raised before a model is fit or a store is built, because a number measured on leaked
    data looks better than it is and nothing downstream could tell (DESIGN.md 3.3).
    """
