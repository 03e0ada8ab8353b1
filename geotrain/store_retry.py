"""Retries for run-store calls: which failures are transient, and how hard to try.

`retry(fn, what, policy=...)` is the one loop every RunStore call goes
through (geotrain/store/objects.py). `RetryPolicy` is set per store from Python or
from GEOTRAIN_STORE_RETRY; docs/design.md ("Retries") says what is retried.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from geotrain.errors import StoreError

T = TypeVar("T")


@dataclass(frozen=True)
class RetryPolicy:
    """How hard a store call tries before it gives up with a StoreError.

    The delays double from base_delay up to max_delay, each scaled by a random
    factor in [0.5, 1] so that sites retrying together spread out. The default
    rides out about 6 s of consecutive failures of one call (5 waits).
    Set from Python (`RunStore(url, retry_policy=...)`) or from the environment:
    GEOTRAIN_STORE_RETRY="attempts=8,base_delay=0.1,max_delay=5".
    """

    attempts: int = 6
    base_delay: float = 0.2
    max_delay: float = 5.0

    @classmethod
    def parse(cls, text: str) -> RetryPolicy:
        fields = parse_settings(text, "GEOTRAIN_STORE_RETRY", {"attempts": int, "base_delay": float,
                                                                "max_delay": float})
        policy = cls(**fields)
        if policy.attempts < 1 or policy.base_delay < 0 or policy.max_delay < 0:
            raise StoreError(f"GEOTRAIN_STORE_RETRY={text!r}: attempts must be >= 1 and delays >= 0")
        return policy

    def delay(self, attempt: int) -> float:
        return min(self.max_delay, self.base_delay * 2**attempt) * random.uniform(0.5, 1.0)


def parse_settings(text: str, source: str, types: dict[str, Callable[[str], Any]]) -> dict[str, Any]:
    """Parse "a=1,b=2" into typed fields; a StoreError names what would be valid."""
    out: dict[str, Any] = {}
    for item in filter(None, (i.strip() for i in text.split(","))):
        name, sep, value = item.partition("=")
        name = name.strip()
        if not sep or name not in types:
            raise StoreError(f"{source}={text!r}: cannot read {item!r}; valid: "
                             + ", ".join(f"{n}=..." for n in types))
        try:
            out[name] = types[name](value.strip())
        except ValueError:
            raise StoreError(f"{source}={text!r}: {name} must be a {types[name].__name__}, "
                             f"not {value.strip()!r}") from None
    return out


# Exceptions the storage libraries raise for a failure that may pass on retry,
# by class name anywhere in the exception's MRO (their modules are imported
# only when that backend is used, so they are matched by name, not by class).
_TRANSIENT_NAMES = {
    "EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError",  # botocore
    "ConnectionClosedError", "HTTPClientError", "ResponseStreamingError",
    "ServiceRequestError", "ServiceResponseError",  # azure-core
}
_NOT_TRANSIENT = (FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError,
                  NotADirectoryError)


def is_access_denied(e: BaseException) -> bool:
    """True for a refusal of this identity: PermissionError (s3fs, adlfs, local
    files), gcsfs's 403 (a plain `OSError("Forbidden: ...")`), or a 401/403
    HTTP error of any library."""
    if isinstance(e, PermissionError):
        return True
    if type(e) is OSError and str(e).startswith("Forbidden:"):
        return True
    code = getattr(e, "code", None) or getattr(e, "status_code", None)
    return code in (401, 403) and "Invalid Credentials" not in str(e)  # gcsfs renews those


def is_transient(e: BaseException) -> bool:
    """True for a storage failure worth retrying: I/O, connection and timeout
    errors, and the libraries' own network errors and 429/5xx answers."""
    if isinstance(e, _NOT_TRANSIENT) or is_access_denied(e):
        return False
    if isinstance(e, (OSError, TimeoutError, ConnectionError)):
        return True
    for cls in type(e).__mro__:
        if cls.__name__ in _TRANSIENT_NAMES or cls.__module__.startswith("aiohttp"):
            return True
    code = getattr(e, "code", None) or getattr(e, "status_code", None)  # gcsfs HttpError, azure-core
    return isinstance(code, int) and (code == 429 or code >= 500)


def retry(fn: Callable[[], T], what: str, attempts: int | None = None, base_delay: float | None = None,
          policy: RetryPolicy | None = None) -> T:
    """Call fn, retrying transient storage failures with exponential backoff.

    A missing object is an answer, not a failure, so FileNotFoundError passes
    straight through, as does FileExistsError (a conditional create that lost);
    access denied is a StoreError at once; other transient failures are
    retried, and a StoreError naming `what` is raised when they persist.
    """
    policy = policy or RetryPolicy()
    if attempts is not None or base_delay is not None:
        policy = RetryPolicy(attempts if attempts is not None else policy.attempts,
                             base_delay if base_delay is not None else policy.base_delay, policy.max_delay)
    for i in range(policy.attempts):
        try:
            return fn()
        except (FileNotFoundError, FileExistsError):
            raise
        except Exception as e:  # noqa: BLE001 - classified just below
            if is_access_denied(e):
                first = " ".join(str(e).split())[:500]
                raise StoreError(f"store: {what} was refused (access denied): {first}") from e
            if not is_transient(e):
                raise
            if i == policy.attempts - 1:
                raise StoreError(f"store: {what} failed after {policy.attempts} attempts: "
                                 f"{type(e).__name__}: {e}") from e
            time.sleep(policy.delay(i))
    raise AssertionError("unreachable")
