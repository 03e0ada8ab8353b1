"""The run's members and their public keys: `control/roster.json`, signed with the
run's control key, which the controller rewrites whenever a member joins (a
launch, a migrated member `name~k`).

Each member (a recipe site, or a migrated one) has its own Ed25519 key, made by
the controller; its private half reaches only that member's nodes, in their
boot data (`GEOTRAIN_MEMBER_KEY`). What a member says about itself — its
heartbeat and liveness, its contributions' manifests, the hash it ended a
round with — counts only when signed with its key, so no other writer of the
store can speak for it (geotrain/store/control.py has the envelope).

A reader keeps the last roster that verified; it reads the store again only
when it meets a member it does not know (at most every REFRESH_S), so a roster
later removed or overwritten by a forger changes nothing it already knows.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from geotrain.errors import StoreError
from geotrain.store import records
from geotrain.store.control import ControlKey, ForgedRecord

KEY = "control/roster.json"
REFRESH_S = 2.0


class Roster:
    def __init__(self, store) -> None:
        self.store = store
        self._keys: dict[str, ControlKey] = {}
        self._read_at = -REFRESH_S
        self._lock = threading.Lock()

    def key(self, member: str, fresh: bool = False) -> ControlKey | None:
        """`member`'s public key, None if not on the roster; `fresh`: for a member not
        known yet, read the roster again now, not at most every REFRESH_S."""
        with self._lock:
            if member not in self._keys and (fresh or time.monotonic() - self._read_at >= REFRESH_S):
                self._read_at = time.monotonic()
                body = self.store._opened(KEY, "roster")
                members = body.get("members") if isinstance(body, dict) else None
                if isinstance(members, dict):
                    for name, text in members.items():
                        try:
                            self._keys.setdefault(name, ControlKey.from_public(text))
                        except (ForgedRecord, ValueError, TypeError):
                            records.report(KEY, f"{name!r} has no valid key")
            return self._keys.get(member)

    def open(self, raw: Any, kind: str, member: str, where: str) -> Any:
        """The body of `raw` if `member` signed it as a `kind` record; else None (reported)."""
        key = self.key(member)
        if key is None:
            records.report(where, f"{member!r} is not on the run's roster")
            return None
        try:
            return key.open(raw, kind)
        except ForgedRecord as e:
            records.report(where, f"not signed by {member}: {e}")
            return None


def member_writes(member: str) -> tuple[str, ...]:
    """The keys a run's member (its nodes) writes, as patterns relative to the run's
    folder, `*` for any characters: its own records and contributions, and what any
    member may decide or commit (a round's decision slots, the global state and its
    eval: each signed or checked against signed hashes). Never another member's
    records, nor what only the operator's machine writes (run.json, _boot/, control/,
    final/, the controller's events). A cloud that can scope a node's writes by key
    (providers/aws/iam.py, providers/azure/network.py) grants exactly these."""
    if not member or any(c in member for c in "*?/'\\"):
        raise StoreError(f"store: cannot scope writes to the member name {member!r}")
    return (f"sites/{member}/*",  # heartbeat, liveness, head record, events, own commands
            f"rounds/*/{member}.json", f"rounds/*/{member}.bin",  # its contribution
            f"rounds/*/results/{member}.json",  # the hash it ended a round with
            "rounds/*/_members*.json",  # a round's decision slots (signed by the decider)
            "global/*")  # committed state, eval, the round-0 claim
