"""Reading this machine's processes from /proc: tags, liveness, start time.

The one place geotrain looks at other processes. The local provider finds a
site's processes by their environment tags (GEOTRAIN_RUN / GEOTRAIN_SITE /
GEOTRAIN_ROLE / GEOTRAIN_NODE_INDEX ...: the local equivalent of cloud tags),
the controller checks that a recorded pid is still the process it recorded,
and a multi-node site's agent reaps what its Ray left behind.

A pid alone never identifies a process: pids are recycled. A process is its pid
*and* its start time (`start_time`, clock ticks since boot, field 22 of
/proc/PID/stat), and `signal_if_same` signals a pid only while it is still the
process that started then. A zombie (exited, not yet reaped) is not alive.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path

TAG_PREFIX = "GEOTRAIN_"


def _stat(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name: [state, ppid, ...]."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (OSError, ValueError):
        return None
    fields = text.rsplit(")", 1)[-1].split()
    return fields if len(fields) > 19 else None


def environ(pid: int) -> dict[str, str]:
    """The environment PID started with ({} when gone or not readable: another user's)."""
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    out = {}
    for kv in raw.split(b"\0"):
        key, eq, value = kv.partition(b"=")
        if eq:
            out[key.decode(errors="replace")] = value.decode(errors="replace")
    return out


def tags(pid: int) -> dict[str, str]:
    """PID's geotrain tags: the GEOTRAIN_* entries of its environment."""
    return {k: v for k, v in environ(pid).items() if k.startswith(TAG_PREFIX)}


def tagged() -> Iterator[tuple[int, dict[str, str]]]:
    """(pid, tags) of every process on this machine, this one included, that carries a
    non-empty GEOTRAIN_RUN tag and whose environment is readable (our own). Zombies
    included: filter with `alive`."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            raw = Path(f"/proc/{entry}/environ").read_bytes()
        except OSError:
            continue
        if b"GEOTRAIN_RUN=" not in raw:  # cheap test before parsing
            continue
        found = _tags_of(raw)
        if found.get("GEOTRAIN_RUN"):
            yield int(entry), found


def _tags_of(raw: bytes) -> dict[str, str]:
    out = {}
    for kv in raw.split(b"\0"):
        key, eq, value = kv.partition(b"=")
        if eq and key.startswith(TAG_PREFIX.encode()):
            out[key.decode(errors="replace")] = value.decode(errors="replace")
    return out


def alive(pid: int | None) -> bool:
    """PID exists and is not a zombie. A process of another user whose /proc entry is
    hidden (hidepid) counts as alive when it exists."""
    if not pid or pid <= 0:  # 0 and negatives name process groups for os.kill: never
        return False
    stat = _stat(pid)
    if stat is not None:
        return stat[0] != "Z"
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def start_time(pid: int | None) -> int | None:
    """When PID started, in clock ticks since boot (None when it does not exist)."""
    if not pid or pid <= 0:
        return None
    stat = _stat(pid)
    try:
        return int(stat[19]) if stat else None
    except ValueError:
        return None


def parent(pid: int) -> int | None:
    stat = _stat(pid)
    try:
        return int(stat[1]) if stat else None
    except ValueError:
        return None


def ancestry(pid: int | None = None) -> set[int]:
    """PID (default: this process) and every ancestor of it below init."""
    out, pid = set(), pid or os.getpid()
    while pid and pid > 1 and pid not in out:
        out.add(pid)
        pid = parent(pid)
    return out


def cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


def same(pid: int | None, started: int | None) -> bool:
    """PID is alive and is the process that started at `started` (not a recycled pid)."""
    return started is not None and alive(pid) and start_time(pid) == started


def signal_if_same(pid: int, started: int, sig: int) -> bool:
    """Send `sig` to PID only if it is still the process that started at `started`;
    returns whether it was sent. Through a pidfd where the kernel has them, so a pid
    recycled between the check and the signal is never signalled."""
    if not same(pid, started):
        return False
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return False
    except (AttributeError, OSError):  # no pidfds here: check, then signal
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return False
        return True
    try:
        if not same(pid, started):  # the pidfd pins the process we checked from here on
            return False
        signal.pidfd_send_signal(fd, sig)
        return True
    except ProcessLookupError:
        return False
    finally:
        os.close(fd)
