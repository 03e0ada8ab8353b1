"""Round decisions and eval records, each signed by the member that wrote it.

A round's decision (who is in it, what was rejected, the norm history) is what
every site merges by, so a writer without a member's key must not be able to
place one. The decision is signed with the deciding member's key and names that
member in `decided_by`; a reader believes it only when that member is on the
run's signed roster (geotrain/store/roster.py), its signature verifies, and it
is for the round read. The eval record of a committed round (`by`: the member
that committed and evaluated it) is signed and read the same way.

Decisions are created, never overwritten (first writer wins), so a forger could
take the slot before the sites get there. A round therefore has a short chain of
slots, `_members.json`, `_members.1.json`, ... `_members.{SLOTS-1}.json`, and
the decision that stands is the first slot, in that order, holding a valid one:
a site that finds a forged record in a slot passes it over (a `rejected-decision`
event, geotrain/sync/rounds.py) and creates its decision in the next free slot.
Every site applies the same rule to the same records, so all settle on the same
slot. If a forger fills every slot, the round cannot be decided: `SlotsTaken`.

A reader without the run's control key (a user's own script, tests that run
sites in threads) trusts its store and takes plain records as they are.
"""

from __future__ import annotations

import json
from typing import Any

from geotrain.errors import StoreError
from geotrain.store import records
from geotrain.store.control import ForgedRecord, unwrap
from geotrain.store.objects import round_key
from geotrain.store.records import EvalRecord

SLOTS = 8  # decision slots per round: _members.json, then _members.1.json ... _members.7.json


class SlotsTaken(StoreError):
    """Every decision slot of a round holds a record that is not a valid decision."""


def slot_key(r: int, slot: int) -> str:
    name = "_members.json" if slot == 0 else f"_members.{slot}.json"
    return f"rounds/{round_key(r)}/{name}"


def _entries_problem(body: dict, field: str) -> str | None:
    entries = body.get(field, [])
    if not isinstance(entries, list):
        return f"{field!r} is not a list"
    for e in entries:
        if not isinstance(e, dict) or not isinstance(e.get("site"), str) \
                or isinstance(e.get("round"), bool) or not isinstance(e.get("round"), int) \
                or e["round"] < 0:
            return f"{field!r} holds an entry without a site name and a round: {e!r:.80}"
    return None


def _shape_problem(body: Any, r: int) -> str | None:
    """Why a decision's body cannot be round r's, or None."""
    if not isinstance(body, dict):
        return "not a JSON object"
    if isinstance(body.get("round"), bool) or body.get("round") != r:
        return f"it is for round {body.get('round')!r:.40}, not {r}"
    if not isinstance(body.get("decided_by"), str):
        return "it names no decider ('decided_by')"
    at = body.get("decided_at", 0.0)
    if isinstance(at, bool) or not isinstance(at, (int, float)) or not -1e18 < at < 1e18:
        return f"'decided_at' is {at!r:.40}, not a time"
    return _entries_problem(body, "accepted") or _entries_problem(body, "rejected")


def _claimed(raw: Any, field: str) -> str | None:
    """Who a signed envelope's body says wrote it (checked by the signature after)."""
    body = raw.get("body") if isinstance(raw, dict) else None
    who = body.get(field) if isinstance(body, dict) else None
    return who if isinstance(who, str) else None


class Decisions:
    """The decisions and evals of one RunStore (`store.decisions`)."""

    def __init__(self, store) -> None:
        self.store = store
        # round -> slot -> why its record is not a valid decision. A verdict never
        # changes (a forged record can never become valid; a slot is never rewritten
        # by a site), so each slot is read, checked and reported once.
        self._invalid: dict[int, dict[int, str]] = {}

    def _signed_by(self, raw: Any, kind: str, field: str) -> tuple[Any, str | None]:
        """(body, None) if the member the body names in `field` signed `raw` as a `kind`
        record, else (None, why). Without a control key: the record as it is."""
        if self.store.control is None:
            return unwrap(raw, kind), None
        who = _claimed(raw, field)
        if who is None:
            return None, f"not a {kind} signed by a member (no signed {field!r})"
        # Read the roster again at once for a signer not known yet: a migrated member
        # is on it before it writes anything, and every site must judge alike.
        key = self.store.roster.key(who, fresh=True)
        if key is None:
            return None, f"{who!r}, who it says signed it, is not on the run's roster"
        try:
            return key.open(raw, kind), None
        except ForgedRecord as e:
            return None, f"not signed by {who}: {e}"

    def _check(self, raw: Any, r: int) -> tuple[dict | None, str | None]:
        body, why = self._signed_by(raw, "decision", "decided_by")
        why = why or _shape_problem(body, r)
        return (None, why) if why else (body, None)

    def read(self, r: int) -> tuple[dict | None, int | None]:
        """(the decision that stands for round r, or None while it is open; the first
        slot not taken yet, None if every slot is taken)."""
        invalid = self._invalid.get(r, {})
        for slot in range(SLOTS):
            if slot in invalid:
                continue
            key = slot_key(r, slot)
            try:
                raw = self.store.get_json(key)
            except FileNotFoundError:
                return None, slot
            except (json.JSONDecodeError, UnicodeDecodeError):
                body, why = None, "not JSON"
            else:
                body, why = self._check(raw, r)
            if body is not None:
                return body, slot
            self._invalid.setdefault(r, {})[slot] = why
            records.report(key, why)
        return None, None

    def rejected(self, r: int) -> dict[int, str]:
        """The slots of round r found holding an invalid record so far, with why."""
        return dict(self._invalid.get(r, {}))

    def decide(self, r: int, decision: dict) -> tuple[dict, bool]:
        """Record round r's decision, signed with this node's member key, in the first
        free slot, unless a valid one stands already. Returns the decision that stands
        and whether this call made it; SlotsTaken if every slot holds a forged record."""
        decision = dict(decision, round=r)
        record = self.store._by_member("decision", decision)
        _, why = self._check(record, r)
        if why:  # it would count for nobody: write nothing that would take a slot
            raise StoreError(f"store: this node's decision for round {r} would not count: {why}")
        data = json.dumps(record, sort_keys=True).encode()
        while True:
            standing, free = self.read(r)
            if standing is not None:
                return standing, False
            if free is None:
                reasons = "; ".join(f"slot {s}: {w}" for s, w in sorted(self.rejected(r).items()))
                raise SlotsTaken(f"round {r} cannot be decided: all {SLOTS} decision slots "
                                 f"(rounds/{round_key(r)}/_members*.json) hold records that are "
                                 f"not decisions signed by a member of the run ({reasons[:600]})")
            if self.store.create(slot_key(r, free), data):
                return decision, True

    # -- evals -----------------------------------------------------------------------------

    def put_eval(self, r: int, record: dict) -> None:
        """The committer's eval of round r's global state; `record["by"]` names it."""
        self.store.put_json(f"global/{round_key(r)}/eval.json",
                            self.store._by_member("eval", dict(record, round=r)))

    def read_eval(self, r: int) -> dict | None:
        """Round r's eval, validated (records.EvalRecord) and, with a control key, signed
        by the member named in `by`; None if absent or not (reported)."""
        key = f"global/{round_key(r)}/eval.json"
        try:
            raw = self.store.get_json(key)
        except FileNotFoundError:
            return None
        except (json.JSONDecodeError, UnicodeDecodeError):
            records.report(key, "not JSON")
            return None
        body, why = self._signed_by(raw, "eval", "by")
        if why:
            records.report(key, why)
            return None
        rec = records.parse(EvalRecord, body, key)
        if rec is not None and rec.round != r:
            records.report(key, f"an eval of round {rec.round}, read as round {r}'s")
            return None
        return records.as_dict(rec)
