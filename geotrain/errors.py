"""Errors a user can fix.

Every one derives from `GeotrainError`; the CLI prints `str(e)` as one red line
and exits 1, never a traceback, and `--json` prints `e.to_dict()`. Anything
else that escapes is a bug in geotrain.

Each class passes all of its constructor arguments to `Exception.__init__`, so
the errors survive pickling (Ray ships exceptions between processes).
"""

from __future__ import annotations


class GeotrainError(Exception):
    """Base of errors a user can fix.

    The CLI prints str(e) as one red line and exits 1, never a traceback.
    """

    def to_dict(self) -> dict:
        return {"error": type(self).__name__, "message": str(self)}


class RecipeError(GeotrainError):
    """A recipe that cannot be read or is not valid: where, which field, what would be valid."""

    def __init__(self, file: str, line: int | None, field: str, message: str):
        super().__init__(file, line, field, message)
        self.file, self.line, self.field, self.message = file, line, field, message

    def __str__(self) -> str:
        where = self.file if self.line is None else f"{self.file}:{self.line}"
        field = f"{self.field}: " if self.field else ""
        return f"{where}: {field}{self.message}"

    def to_dict(self) -> dict:
        return {"error": "RecipeError", "file": self.file, "line": self.line,
                "field": self.field, "message": self.message}


class StoreError(GeotrainError):
    """The run store cannot be reached, or holds something missing or corrupt."""


class ProviderError(GeotrainError):
    """A provider refused or failed a request (credentials, quota, API errors)."""


class CapacityError(ProviderError):
    """No candidate had capacity; `tried` names the candidates already tried, in order."""

    def __init__(self, message: str, tried: list[str] | None = None):
        super().__init__(message, tried)
        self.message, self.tried = message, list(tried or [])

    def __str__(self) -> str:
        return f"{self.message} (tried: {', '.join(self.tried)})" if self.tried else self.message

    def to_dict(self) -> dict:
        return {**super().to_dict(), "tried": self.tried}


class RunNotFound(GeotrainError):
    """No run with the given id in the state db or the run store."""
