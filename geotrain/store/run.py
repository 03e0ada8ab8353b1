"""The run store: what a run's objects mean, and who may have written them.

Every path inside a run store is built here and nowhere else. The layout
(see shared/DESIGN.md):

    <run>/run.json                     recipe as resolved, run id, created, version (signed)
    <run>/_boot/<sha256>/<name>        what a cloud node installs (geotrain/bundle.py)
    <run>/control/finish.json          the run's last round, asked by `geotrain finish` (signed)
    <run>/control/switch.json          move to another store from a round on (signed)
    <run>/control/switch_ready.json    in the new store: it holds every earlier round (signed)
    <run>/control/roster.json          every member's public key (signed; geotrain/store/roster.py)
    <run>/global/<round>/              model.safetensors, outer.safetensors (every
                                       sync.state_every rounds and the last; between,
                                       only the hash), manifest.json, then COMMITTED (last)
    <run>/rounds/<round>/<site>.bin    a site's encoded pseudo-gradient
    <run>/rounds/<round>/<site>.json   its manifest (sha256, tokens, steps, codec), written after the payload
    <run>/rounds/<round>/results/<site>.json   the global hash the site ended the round with
    <run>/rounds/<round>/_members.json who is in the round, signed by its decider: created
                                       once; if a forged record holds it, _members.1.json,
                                       ... (the first valid one stands; geotrain/store/decisions.py)
    <run>/global/<round>/eval.json     the committer's eval of that global state (signed)
    <run>/sites/<site>/heartbeat       last beat: step, round, loss, tokens/s, state
    <run>/sites/<site>/alive           liveness, every ~1 s: state, pid, time
    <run>/sites/<site>/head.json       a multi-node site's Ray head: private IP:port, state
                                       (never the token; MAC'ed with the site's secret)
    <run>/sites/<site>/commands/<n>    stop (signed by the controller), drain (MAC'ed by the agent)
    <run>/sites/<site>/events.jsonl    what the site did (one writer per file)
    <run>/events.jsonl                 what the controller did
    <run>/final/                       model.safetensors + summary.json at the end

A node may write only `member_writes(member)` (roster.py) where its cloud grants that
(aws.run_role, azure.store_scope), all of it otherwise; either way, what is read is untrusted:
records are parsed into the typed models of geotrain/store/records.py (one
that does not parse is absent), and what changes the run counts only with the
proof of geotrain/store/control.py — the run's control key (on a node: its
public half, from the boot data) or the site's own secret; what a member says
of itself (heartbeat, liveness, manifests, results) and what it decides or
evaluates for a round (decisions, evals) only with its own key. A reader with no
key (a user's own script, the operator's tools) trusts its store.

Multi-object units (a global round, a contribution) are written data first
and marker last, and every payload is checked against the sha256 in its
manifest before anyone uses it. Copying a whole store to another backend is
geotrain/store_copy.py.

Run with `python -m geotrain.store URL` to print a run store's summary.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

from geotrain.errors import StoreError
from geotrain.store import records
from geotrain.store import roster
from geotrain.store.control import MEMBER_KEY_ENV, ControlKey, ForgedRecord, SiteKey, unwrap
from geotrain.store.decisions import Decisions
from geotrain.store.objects import ObjectStore, join, round_key, sha256
from geotrain.store.records import (Command, FinishRecord, HeadRecord, Heartbeat, Liveness,
                                    SwitchReady, SwitchRecord)
from geotrain.store.roster import Roster

_ENV = object()  # RunStore's default for keys: the node's own, from its environment


class RunStore(ObjectStore):
    """One run's folder in object storage. `url` is the run's own root.

    `control`: the run's control key — with its private half on the operator's
    machine (signs), its public half on a node (verifies); by default the
    node's, from GEOTRAIN_CONTROL_KEY. `site_key`: the site's secret, by
    default from RAY_AUTH_TOKEN. Without a control key nothing is verified.
    Other arguments: see ObjectStore.
    """

    def __init__(self, url: str, *, control: ControlKey | None | object = _ENV,
                 site_key: SiteKey | None | object = _ENV,
                 member_key: ControlKey | None | object = _ENV, **kwargs: Any):
        super().__init__(url, **kwargs)
        self._kwargs = kwargs
        self.control = ControlKey.from_env() if control is _ENV else control
        self.site_key = SiteKey.from_env() if site_key is _ENV else site_key
        self.member_key = ControlKey.from_env(MEMBER_KEY_ENV, private=True) \
            if member_key is _ENV else member_key
        self.roster = Roster(self)
        self.decisions = Decisions(self)

    def _keys(self) -> dict[str, Any]:
        return {"control": self.control, "site_key": self.site_key, "member_key": self.member_key}

    def _by_member(self, kind: str, body: dict, signer: ControlKey | None = None) -> dict:
        """`body` signed with this node's member key (or `signer`'s); plain without one."""
        signer = signer or self.member_key
        return body if signer is None else signer.sign(kind, body)

    def _from_member(self, raw: Any, kind: str, member: str, where: str) -> Any:
        """The body of a record `member` signed (roster.py); a reader without the run's
        control key trusts its store and takes any record as it is."""
        if self.control is None:
            return unwrap(raw, kind)
        return self.roster.open(raw, kind, member, where)

    def write_roster(self, members: dict[str, str]) -> None:
        """The run's members and their public keys (the controller, signed)."""
        self.put_json(roster.KEY, self._signed("roster", {"members": members, "at": time.time()}))

    def _opened(self, key: str, kind: str, by: str = "control") -> Any:
        """The body of a signed record at `key`, None if absent; a record whose proof does
        not verify (or that is not JSON) is reported and treated as absent."""
        try:
            raw = self.get_json(key)
        except FileNotFoundError:
            return None
        except (json.JSONDecodeError, UnicodeDecodeError):
            records.report(key, "not JSON")
            return None
        signer = self.control if by == "control" else self.site_key
        if signer is None:
            return unwrap(raw, kind)
        try:
            return signer.open(raw, kind)
        except ForgedRecord as e:
            records.report(key, str(e))
            return None

    def _signed(self, kind: str, body: dict, by: str = "control") -> dict:
        """`body` signed for the store: with the run's control key on the operator's
        machine, with the site's secret on a node (or plain, for a keyless caller)."""
        signer = self.control if by == "control" else self.site_key
        return body if signer is None else signer.sign(kind, body)

    # -- run ----------------------------------------------------------------------------

    def write_run(self, info: dict) -> None:
        """run.json, signed with the run's control key: the recipe it holds is the
        run's roster, data and code, which every site obeys."""
        self.put_json("run.json", self._signed("run", info))

    def read_run(self) -> dict:
        try:
            raw = self.get_json("run.json")
        except FileNotFoundError:
            raise StoreError(f"store: no run at {self.url} (run.json missing)") from None
        if self.control is None:
            return unwrap(raw, "run")
        try:
            return self.control.open(raw, "run")
        except ForgedRecord as e:
            raise StoreError(f"store: run.json at {self.url} is not the one the operator "
                             f"launched ({e})") from None

    # -- global state: one folder per committed round ------------------------------------

    def commit_global(self, r: int, files: dict[str, bytes], manifest: dict) -> None:
        """Write round r's global state; COMMITTED is written last, so a reader that
        sees it sees every file, each checked against the manifest's sha256."""
        base = f"global/{round_key(r)}"
        for name, data in files.items():
            self.put(f"{base}/{name}", data)
        full = dict(manifest, round=r, files={n: sha256(d) for n, d in files.items()})
        self.put_json(f"{base}/manifest.json", full)
        self.put_json(f"{base}/COMMITTED", {"round": r, "manifest_sha256":
                                            sha256(json.dumps(full, sort_keys=True).encode())})

    def is_committed(self, r: int) -> bool:
        return self.exists(f"global/{round_key(r)}/COMMITTED")

    def committed_rounds(self) -> list[int]:
        rounds = []
        for name in self.listdir("global"):
            if name.isdigit() and self.exists(f"global/{name}/COMMITTED"):
                rounds.append(int(name))
        return sorted(rounds)

    def latest_global(self) -> int | None:
        # Newest first: stop at the first committed one instead of probing all.
        for name in reversed(self.listdir("global")):
            if name.isdigit() and self.exists(f"global/{name}/COMMITTED"):
                return int(name)
        return None

    def latest_state(self) -> int | None:
        """The newest committed round that holds the global state itself (with
        `sync.state_every` > 1 the rounds between hold only their hash)."""
        for name in reversed(self.listdir("global")):
            if name.isdigit() and self.exists(f"global/{name}/COMMITTED") and \
                    "model.safetensors" in self.global_manifest(int(name)).get("files", {}):
                return int(name)
        return None

    def read_global(self, r: int) -> tuple[dict[str, bytes], dict]:
        base = f"global/{round_key(r)}"
        if not self.exists(f"{base}/COMMITTED"):
            raise StoreError(f"store: global round {r} is not committed")
        raw = self.get(f"{base}/manifest.json")
        try:
            expected = self.get_json(f"{base}/COMMITTED")["manifest_sha256"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise StoreError(f"store: corrupt marker global/{round_key(r)}/COMMITTED") from None
        if sha256(raw) != expected:
            raise StoreError(f"store: checksum mismatch in global/{round_key(r)}/manifest.json")
        manifest = json.loads(raw)
        files = {}
        for name, digest in manifest["files"].items():
            data = self.get(f"{base}/{name}")
            if sha256(data) != digest:
                raise StoreError(f"store: checksum mismatch in global/{round_key(r)}/{name}")
            files[name] = data
        return files, manifest

    def global_manifest(self, r: int) -> dict:
        return self.get_json(f"global/{round_key(r)}/manifest.json")

    # -- contributions -----------------------------------------------------------------

    def put_contribution(self, r: int, site: str, payload: bytes, meta: dict) -> dict:
        base = f"rounds/{round_key(r)}/{site}"
        self.put(f"{base}.bin", payload)
        manifest = dict(meta, round=r, site=site, sha256=sha256(payload), bytes=len(payload))
        # The marker (the payload is complete), signed with the member's key.
        self.put_json(f"{base}.json", self._by_member("contribution", manifest))
        return manifest

    def contributions(self, r: int) -> list[str]:
        """Sites whose contribution to round r is complete (manifest present)."""
        names = self.listdir(f"rounds/{round_key(r)}")
        return [n[:-5] for n in names if n.endswith(".json") and not n.startswith("_")]

    def read_contribution(self, r: int, site: str) -> tuple[bytes, dict]:
        manifest = self.contribution_meta(r, site)
        payload = self.contribution_payload(r, site)
        if not isinstance(manifest, dict) or sha256(payload) != manifest.get("sha256"):
            raise StoreError(f"store: checksum mismatch in contribution of {site} to round {r}")
        return payload, manifest

    def contribution_meta(self, r: int, site: str) -> Any:
        """A contribution's manifest, signed by the member it names, for this round and
        member (StoreError if not); what it holds is the reader's to check (rounds.py)."""
        key = f"rounds/{round_key(r)}/{site}.json"
        body = self._from_member(self.get_json(key), "contribution", site, key)
        if body is None or (isinstance(body, dict) and (body.get("site", site) != site
                                                        or body.get("round", r) != r)):
            raise StoreError(f"store: the manifest {key} is not signed by {site} for round {r}")
        return body

    def contribution_payload(self, r: int, site: str) -> bytes:
        """The payload as stored now (checked by whoever uses it against a sha256)."""
        return self.get(f"rounds/{round_key(r)}/{site}.bin")

    def claim_round_zero(self, site: str) -> bool:
        """Whether `site` is the one to commit round 0 of a run whose model only the
        sites can build (a user's entrypoint): the first to claim it."""
        return self.create(f"global/{round_key(0)}/_claim", site.encode())

    def decide_members(self, r: int, decision: dict) -> tuple[dict, bool]:
        """Record who is in round r, signed by this member (`decided_by`), in the first
        free decision slot: the first valid decision stands. Returns the decision
        that stands (this one or an earlier one) and whether this call made it;
        decisions.SlotsTaken if forged records fill every slot (geotrain/store/decisions.py)."""
        return self.decisions.decide(r, decision)

    def members(self, r: int) -> dict | None:
        """Round r's membership decision (the first valid one), or None while it is open."""
        return self.decisions.read(r)[0]

    def rejected_decisions(self, r: int) -> dict[int, str]:
        """Round r's decision slots seen holding an invalid record so far, with why."""
        return self.decisions.rejected(r)

    def rounds_started(self) -> list[int]:
        return [int(n) for n in self.listdir("rounds") if n.isdigit()]

    def put_eval(self, r: int, record: dict) -> None:
        """The committer's eval of round r (`by`: that member), signed with its key."""
        self.decisions.put_eval(r, record)

    def read_eval(self, r: int) -> dict | None:
        """Round r's eval, if valid and signed by the member it names; else None."""
        return self.decisions.read_eval(r)

    def put_result(self, r: int, site: str, result: dict) -> None:
        self.put_json(f"rounds/{round_key(r)}/results/{site}.json",
                      self._by_member("result", dict(result, site=site, round=r)))

    def results(self, r: int) -> dict[str, dict]:
        """The hash each member says it ended round r with: signed by that member."""
        base, out = f"rounds/{round_key(r)}/results", {}
        for n in self.listdir(base):
            if n.endswith(".json"):
                key = f"{base}/{n}"
                v = self._from_member(self._json_or_none(key), "result", n[:-5], key)
                if isinstance(v, dict) and v.get("site", n[:-5]) == n[:-5] and v.get("round", r) == r:
                    out[n[:-5]] = v
        return out

    # -- sites: heartbeats, liveness, commands, events -----------------------------------

    def beat(self, site: str, beat: dict, signer: ControlKey | None = None) -> None:
        """The site's heartbeat, signed with its member key (`signer`: the controller
        marking a member it replaced, with that member's key)."""
        self.put_json(f"sites/{site}/heartbeat",
                      self._by_member("heartbeat", dict(beat, site=site, at=time.time()), signer))

    def heartbeat(self, site: str) -> dict | None:
        """A site's last heartbeat, signed by it and validated (records.Heartbeat), or None."""
        key = f"sites/{site}/heartbeat"
        raw = self._json_or_none(key)
        body = None if raw is None else self._from_member(raw, "heartbeat", site, key)
        return records.as_dict(records.parse(Heartbeat, body, key))

    def alive(self, site: str, state: str, signer: ControlKey | None = None, **info: Any) -> None:
        """Liveness, written every second or so by a site's agent (and by DiLoCo
        when it runs outside an agent): who is there and in what state. Signed as beat()."""
        self.put_json(f"sites/{site}/alive", self._by_member(
            "alive", dict(info, site=site, state=state, at=time.time()), signer))

    def liveness(self) -> dict[str, dict]:
        """Every site's last liveness record (age = time.time() - record['at']),
        validated (records.Liveness) and under the name it was written for."""
        out = {}
        for name in self.listdir("sites"):
            key = f"sites/{name}/alive"
            raw = self._json_or_none(key)
            body = None if raw is None else self._from_member(raw, "alive", name, key)
            rec = records.parse(Liveness, body, key)
            if rec is not None and rec.site == name:
                out[name] = records.as_dict(rec)
        return out

    def _json_or_none(self, key: str) -> Any:
        try:
            return self.get_json(key)
        except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
            return None

    def put_head(self, site: str, address: str, state: str) -> None:
        """Where a multi-node site's Ray head listens (private `IP:PORT`) and whether
        it is up, for the site's other nodes, MAC'ed with the site's secret; never
        the cluster token."""
        self.put_json(f"sites/{site}/head.json", self._signed(
            "head", {"site": site, "address": address, "state": state, "at": time.time()},
            by="site"))

    def head(self, site: str) -> HeadRecord | None:
        """The site's head record if a node of this site wrote it and it names a
        private address; else None (reported)."""
        key = f"sites/{site}/head.json"
        rec = records.parse(HeadRecord, self._opened(key, "head", by="site"), key)
        return rec if rec is None or rec.site == site else None

    def send_command(self, site: str, command: str) -> None:
        """Tell a member to `stop` (the controller: signed with the run's control key)
        or its trainer to `drain` (the site's agent: MAC'ed with the site's secret)."""
        body = {"command": command, "site": site, "at": time.time()}
        by = "site" if command == "drain" else "control"
        self.put_json(f"sites/{site}/commands/{time.time_ns()}-{command}",
                      self._signed("command", body, by=by))

    def commands(self, site: str) -> list[Command]:
        """The commands for `site` whose proof verifies (stop: the run's control key;
        drain: the site's own secret), oldest first; anything else is ignored."""
        base, out = f"sites/{site}/commands", []
        for name in self.listdir(base):
            key = f"{base}/{name}"
            by = "site" if name.endswith("-drain") else "control"
            cmd = records.parse(Command, self._opened(key, "command", by=by), key)
            if cmd is None or cmd.site != site:
                continue
            if (cmd.command == "drain") != (by == "site"):
                records.report(key, f"{cmd.command!r} under the name {name!r}")
                continue
            out.append(cmd)
        return sorted(out, key=lambda c: c.at)

    def commanded(self, site: str, command: str, since: float) -> bool:
        """Whether `site` was told `command` at or after `since` (an earlier one was for
        an earlier incarnation)."""
        return any(c.command == command and c.at >= since for c in self.commands(site))

    # -- ending a run early (geotrain finish) ---------------------------------------------

    def request_finish(self, at_round: int) -> None:
        """Ask every site to make `at_round` the run's last round (the controller, signed)."""
        self.put_json("control/finish.json", self._signed(
            "finish", {"at_round": at_round, "at": time.time()}))

    def finish_round(self) -> int | None:
        """The round the controller asked the run to end at, or None. A record
        that does not verify or parse is no request."""
        rec = records.parse(FinishRecord, self._opened("control/finish.json", "finish"),
                            "control/finish.json")
        return None if rec is None else rec.at_round

    # -- moving a live run to another backend (geotrain/migrate.py) ----------------------

    def switch(self, url: str) -> None:
        """Point this object at another copy of the run store, in place, so every
        component of a process that shares it follows at once."""
        self.__init__(url, **self._keys(), **self._kwargs)

    def request_switch(self, to: str, at_round: int) -> None:
        """Ask every site to publish round `at_round` and later to the store at `to`."""
        self.put_json("control/switch.json", self._signed(
            "switch", {"to": to, "from": self.url, "at_round": at_round, "at": time.time()}))

    def switch_request(self) -> SwitchRecord | None:
        """A signed request to move from this store, still current: an old request
        replayed here (from another store, or for a round this store is already
        past: a legitimate one names a round after every committed one) is ignored."""
        key = "control/switch.json"
        req = records.parse(SwitchRecord, self._opened(key, "switch"), key)
        if req is None or req.to == self.url:
            return None
        if req.from_ != self.url:
            records.report(key, f"a switch from {req.from_}, not from this store")
            return None
        latest = self.latest_global()
        if latest is not None and latest >= req.at_round:
            records.report(key, f"a switch at round {req.at_round}, which this store has "
                           f"already committed")
            return None
        return req

    def mark_switch_ready(self, at_round: int) -> None:
        """Written in the new store once it holds every round before at_round."""
        self.put_json("control/switch_ready.json", self._signed(
            "switch_ready", {"at_round": at_round, "at": time.time()}))

    def switch_ready(self, at_round: int) -> bool:
        key = "control/switch_ready.json"
        rec = records.parse(SwitchReady, self._opened(key, "switch_ready"), key)
        return rec is not None and rec.at_round >= at_round

    def follow_switch(self, before_round: int | None = None, wait: bool = False,
                      should_stop: Callable[[], bool] = lambda: False) -> bool:
        """Move to the new store if a switch was requested and it is ready: at
        once (`before_round` None), or before publishing `before_round` >= its
        at_round, waiting for the new store to be ready when `wait`. True if moved."""
        req = self.switch_request()
        if not req or (before_round is not None and before_round < req.at_round):
            return False
        target = RunStore(req.to, **self._keys(), **self._kwargs)
        while not target.switch_ready(req.at_round):
            if not wait or should_stop():
                return False
            time.sleep(0.2)
        self.switch(req.to)
        return True

    def event(self, source: str, kind: str, message: str = "", **data: Any) -> dict:
        """Record an event; source is 'controller' or a site name."""
        record = {"at": time.time(), "source": source, "kind": kind, "message": message, **data}
        key = "events.jsonl" if source == "controller" else f"sites/{source}/events.jsonl"
        self.append_jsonl(key, record)
        return record

    def events(self, sites: list[str]) -> list[dict]:
        out = self.read_jsonl("events.jsonl")
        for s in sites:
            out += self.read_jsonl(f"sites/{s}/events.jsonl")
        return sorted(out, key=lambda e: e["at"])

    # -- the end -------------------------------------------------------------------------

    def write_final(self, model: bytes, summary: dict) -> None:
        self.put("final/model.safetensors", model)
        self.put_json("final/summary.json", dict(summary, model_sha256=sha256(model)))

    def final_model_url(self) -> str:
        return join(self.url, "final/model.safetensors")

    def read_final(self) -> dict | None:
        try:
            return self.get_json("final/summary.json")
        except FileNotFoundError:
            return None


def run_url(root: str, run_id: str) -> str:
    """The URL of a run's store under a store root."""
    return join(root, run_id)

