"""The records that cross the run store, typed and validated.

Everything read from the store is untrusted input: a record is parsed into one
of these models, and one that does not parse is treated as absent (the reader
logs why, once) — never a crash, never obeyed. Numbers must be finite, rounds
and counts non-negative integers, states one of `SiteState`, names safe store
key segments, addresses `IP:PORT`.

Heartbeats and liveness are handed to callers as validated dicts
(`model_dump(exclude_none=True)`), so their readers keep `.get(...)`; control
records (commands, the last round, a store switch, a head record) as the models.
"""

from __future__ import annotations

import ipaddress
import logging
import math
import re
from enum import Enum
from typing import Annotated, Any, Literal, TypeVar

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, Strict, ValidationError

log = logging.getLogger("geotrain.store")

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}(~[1-9][0-9]{0,8})?")


def _finite(v: float) -> float:
    if not math.isfinite(v):
        raise ValueError("must be finite")
    return v


def _name(v: str) -> str:
    if not _NAME.fullmatch(v):
        raise ValueError("is not a site name")
    return v


# Strict: a number must be a JSON number (not "3", not true).
Finite = Annotated[float, Strict(), AfterValidator(_finite)]
Count = Annotated[int, Strict(), Field(ge=0)]
Round = Annotated[int, Strict(), Field(ge=1)]
SiteName = Annotated[str, AfterValidator(_name)]


class SiteState(str, Enum):
    """What a site says it is doing (heartbeat and liveness)."""

    STARTING = "starting"
    RUNNING = "running"
    TRAINING = "training"
    SYNCING = "syncing"
    DRAINED = "drained"
    DONE = "done"
    STOPPED = "stopped"
    FAILED = "failed"
    PREEMPTING = "preempting"
    REPLACED = "replaced"  # written by the controller for a member it replaced

    @classmethod
    def active(cls) -> frozenset[SiteState]:
        """An agent in these states is up: a round waits for it."""
        return frozenset({cls.STARTING, cls.RUNNING, cls.TRAINING})

    @classmethod
    def terminal(cls) -> frozenset[SiteState]:
        """An agent in these states is leaving or gone: a site's other nodes leave too."""
        return frozenset({cls.DONE, cls.STOPPED, cls.FAILED, cls.PREEMPTING})


class Record(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True, strict=False)


class Liveness(Record):
    """`sites/<site>/alive`: the agent's (or DiLoCo's) beat, about every second."""

    site: SiteName
    state: SiteState
    at: Finite
    training_round: Count | None = None
    pid: Count | None = None
    replacement: Count | None = None


class Heartbeat(Liveness):
    """`sites/<site>/heartbeat`: the trainer's progress, and the agent's end state
    (what liveness says, and more)."""

    round: Count | None = None
    step: Count | None = None
    loss: Finite | None = None
    eval_loss: Finite | None = None
    tokens_per_s: Finite | None = None
    bytes_sent: Count | None = None
    bytes_received: Count | None = None
    wait_s: Finite | None = None
    first_step_at: Finite | None = None
    error: Annotated[str, Field(max_length=4000)] | None = None
    notice: Annotated[str, Field(max_length=100)] | None = None
    deadline: Finite | None = None


class Command(Record):
    """`sites/<site>/commands/<n>`: `stop` (signed by the controller) or `drain`
    (MAC'ed by the site's own agent), for one member, at a time."""

    command: Literal["stop", "drain"]
    site: SiteName
    at: Finite


class FinishRecord(Record):
    """`control/finish.json`: the run's last round, chosen by `geotrain finish`."""

    at_round: Round
    at: Finite


class SwitchRecord(Record):
    """`control/switch.json`: publish round `at_round` and later to the store at `to`."""

    model_config = ConfigDict(extra="ignore", frozen=True, populate_by_name=True)
    to: Annotated[str, Field(min_length=1, max_length=2000)]
    from_: Annotated[str, Field(alias="from", min_length=1, max_length=2000)]
    at_round: Round
    at: Finite


class SwitchReady(Record):
    """`control/switch_ready.json` in the new store: it holds every round before at_round."""

    at_round: Round
    at: Finite


class EvalRecord(Record):
    """`global/<round>/eval.json`: the eval of a committed round's global state, by the
    member that committed it (signed by it: geotrain/store/decisions.py)."""

    round: Count
    by: SiteName | None = None
    eval_loss: Finite | None = None


def _address(v: str) -> str:
    host, sep, port = v.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError("is not IP:PORT")
    ip = ipaddress.ip_address(host.strip("[]"))
    if not (ip.is_private or ip.is_loopback) or ip.is_unspecified or ip.is_multicast:
        raise ValueError(f"{ip} is not a private address")
    return v


class HeadRecord(Record):
    """`sites/<site>/head.json`: where a multi-node site's Ray head listens (a
    private address; never the token), MAC'ed with the site's secret."""

    site: SiteName
    address: Annotated[str, AfterValidator(_address)]
    state: Literal["up", "down"]
    at: Finite


R = TypeVar("R", bound=Record)
_reported: set[tuple[str, str]] = set()


def parse(model: type[R], raw: Any, where: str) -> R | None:
    """`raw` as a `model`, or None: when absent (`raw` None), or when it does not parse
    (logged once per place and reason)."""
    if raw is None:
        return None
    try:
        return model.model_validate(raw)
    except ValidationError as e:
        first = e.errors()[0]
        why = f"{'.'.join(str(x) for x in first['loc']) or 'record'}: {first['msg']}"
        report(where, why)
        return None


def report(where: str, why: str) -> None:
    """Log a record that was ignored, once per (where, why)."""
    if (where, why) not in _reported:
        _reported.add((where, why))
        log.warning("ignored %s from the run store: %s", where, why)


def as_dict(record: Record | None) -> dict | None:
    return None if record is None else record.model_dump(mode="json", exclude_none=True)
