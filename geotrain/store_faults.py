"""A run store that can be told to fail: fault injection for tests, demos and chaos runs.

A `FaultPlan` says how often and where the store's underlying fsspec file
system should fail; `FaultyFileSystem` wraps that file system and raises the
kinds of errors real backends raise (I/O errors, connection resets, timeouts,
botocore's endpoint errors) before the call (the request never arrived) or,
for a share `after` of the faults, after it (the request took effect but the
reply was lost). Nothing is ever half-written by an injected fault: a real
object-store PUT is atomic, and on `file://` the store writes temporaries.

Install a plan on one store, or on every store a process opens:

    RunStore(url, faults=FaultPlan(rate=0.3, seed=1, burst=2))
    GEOTRAIN_STORE_FAULTS="rate=0.3,seed=1,burst=2,ops=pipe_file+cat_file" geotrain launch ...

Site processes started by the local provider inherit the variable; a store's
`settings()` says where its plan came from, and the site agent records it in
its "starting" event.
"""

from __future__ import annotations

import errno
import random
import threading
from dataclasses import dataclass, field
from typing import Any

from geotrain.errors import StoreError

# The fsspec calls RunStore makes that can fail on a real backend.
DEFAULT_OPS = ("pipe_file", "cat_file", "exists", "ls", "find", "info", "mv", "link")


@dataclass(frozen=True)
class FaultPlan:
    """How a store should fail.

    rate   probability that a call to one of `ops` starts a fault (1.0: every call
           fails, a persistent outage)
    burst  a fault fails this call and the next burst-1 calls to `ops` too
    gap    after a burst at least this many calls succeed (the backend recovers).
           One store operation makes at most 3 calls, so with gap >= 3 a
           RetryPolicy with attempts > burst absorbs every burst.
    after  share of faults raised after the call took effect (a lost reply)
    seed   makes the sequence of faults repeatable (None: random)
    ops    the fsspec method names that may fail
    match  only calls whose path contains this string may fail ("" = any)
    """

    rate: float = 0.1
    burst: int = 1
    gap: int = 4
    after: float = 0.0
    seed: int | None = None
    ops: tuple[str, ...] = DEFAULT_OPS
    match: str = ""

    def __post_init__(self) -> None:
        if not (0.0 <= self.rate <= 1.0 and 0.0 <= self.after <= 1.0 and self.burst >= 1 and self.gap >= 0):
            raise StoreError(f"fault plan {self}: rate and after must be in [0, 1], burst >= 1, gap >= 0")
        unknown = set(self.ops) - set(DEFAULT_OPS) - {"rm_file", "makedirs"}
        if unknown:
            raise StoreError(f"fault plan: unknown ops {sorted(unknown)}; valid: "
                             + ", ".join((*DEFAULT_OPS, "rm_file", "makedirs")))

    @classmethod
    def parse(cls, text: str) -> FaultPlan:
        """Read "rate=0.2,seed=1,burst=3,after=0.5,ops=pipe_file+cat_file,match=global/"."""
        from geotrain.store_retry import parse_settings

        fields = parse_settings(text, "GEOTRAIN_STORE_FAULTS", {
            "rate": float, "burst": int, "gap": int, "after": float, "seed": int, "match": str,
            "ops": lambda v: tuple(o for o in v.split("+") if o)})
        return cls(**fields)


def _transient_error(rng: random.Random, op: str, path: str) -> Exception:
    kind = rng.randrange(4)
    where = f"injected fault in {op}({path})"
    if kind == 0:
        return OSError(errno.EIO, f"I/O error: {where}")
    if kind == 1:
        return ConnectionResetError(errno.ECONNRESET, f"connection reset by peer: {where}")
    if kind == 2:
        return TimeoutError(f"read timed out: {where}")
    try:
        from botocore.exceptions import EndpointConnectionError
    except ImportError:
        return ConnectionRefusedError(errno.ECONNREFUSED, f"connection refused: {where}")
    return EndpointConnectionError(endpoint_url=f"injected://{op}/{path}")


@dataclass
class FaultLog:
    """What a FaultyFileSystem did: calls seen and faults injected, by op."""

    calls: dict[str, int] = field(default_factory=dict)
    faults: list[tuple[str, str, str]] = field(default_factory=list)  # (op, path, before|after)


class FaultyFileSystem:
    """An fsspec file system that fails as its FaultPlan says; every other
    attribute is the wrapped file system's."""

    def __init__(self, fs: Any, plan: FaultPlan):
        self._fs, self.plan = fs, plan
        self._rng = random.Random(plan.seed)
        self._lock = threading.Lock()
        self._burst_left = 0
        self._gap_left = 0
        self.log = FaultLog()

    def __repr__(self) -> str:
        return f"FaultyFileSystem({self._fs!r}, {self.plan})"

    def _decide(self, op: str, path: str) -> str | None:
        """None (no fault this call), or when to raise: 'before' or 'after' the call."""
        with self._lock:
            self.log.calls[op] = self.log.calls.get(op, 0) + 1
            if self.plan.match and self.plan.match not in path:
                return None
            if self.plan.rate >= 1.0 or self._burst_left > 0:
                self._burst_left -= 1
            elif self._gap_left > 0:
                self._gap_left -= 1
                return None
            elif self._rng.random() < self.plan.rate:
                self._burst_left = self.plan.burst - 1
            else:
                return None
            if self._burst_left == 0:
                self._gap_left = self.plan.gap
            when = "after" if self._rng.random() < self.plan.after else "before"
            self.log.faults.append((op, path, when))
            return when

    def _error(self, op: str, path: str) -> Exception:
        with self._lock:
            return _transient_error(self._rng, op, path)

    def __getattr__(self, name: str) -> Any:
        target = getattr(self._fs, name)
        if name not in self.plan.ops or not callable(target):
            return target

        def call(*args: Any, **kwargs: Any) -> Any:
            path = str(args[0]) if args else str(kwargs.get("path", ""))
            when = self._decide(name, path)
            if when == "before":
                raise self._error(name, path)
            out = target(*args, **kwargs)
            if when == "after":
                raise self._error(name, path)
            return out

        return call
