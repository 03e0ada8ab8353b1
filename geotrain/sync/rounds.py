"""Rounds through the run store: publish a contribution, agree once on who is
in the round, reject what is bad, merge, commit.

A round r is a transaction in the store:

1. Each site that finishes its inner steps publishes its encoded
   pseudo-gradient to `rounds/r/<site>.bin` (+ its manifest, written last).
2. Whoever first sees that every live site has published (or that the wait
   for the missing ones is over) validates every contribution it can read —
   from a member of the run (the recipe's sites and their migrated members
   `name~k`), a sane manifest (tokens finite, > 0, at most what the site can
   train in a round), checksum, decodable within the model's size, exactly
   the tensor names, shapes and dtypes the round syncs (the model's, or its
   fragment's: geotrain/sync/fragments.py), finite, norm not far above the
   site's own recent norms (of the same fragment) nor the round's median (3+) — and
   creates `rounds/r/_members.json`, signed with its member key, with a
   conditional create. First valid writer wins (a forged record in that slot is
   passed over for the next: geotrain/store/decisions.py); every site then uses
   exactly that decision, so they merge the same inputs in the same order and
   end with bit-identical global parameters.
3. A contribution that arrives after its round was decided is *carried*: the
   decision of a later round includes it (with its own token count), so no
   work is dropped. A contribution is in at most one decision.
4. The decider commits `global/r` (model + outer momentum, deterministic
   manifest, COMMITTED last). If it dies first, any other site commits the
   same bytes later (`ensure_committed`), so committed rounds have no gaps.

Who is waited for: sites whose agent beat within `liveness_s` (see
`RunStore.alive`) and whose trainer is on round <= r, at most `window_s`;
and, only in the first round this site trains (a launch or a resume: sites
start together), sites still starting, at most `join_wait_s`.
"""

from __future__ import annotations

import logging
import math
import statistics
import time
from collections.abc import Callable, Iterable, Mapping

import torch

from geotrain.errors import StoreError
from geotrain.store import RunStore, sha256
from geotrain.store.decisions import SLOTS, SlotsTaken
from geotrain.store.records import SiteState
from geotrain.sync import compression
from geotrain.sync.entries import (  # noqa: F401 - importable from here as before
    _MEMBER, _SHA, MAX_TOKENS, TOKEN_SLACK, ContributionChanged, Entry, Rejected, SyncError,
    _number, member_base)
from geotrain.sync.fragments import Fragments
from geotrain.sync.norms import NORM_HISTORY, norm_history, norm_outlier, tensor_norm

Tensors = dict[str, torch.Tensor]
log = logging.getLogger("geotrain.sync")

ACTIVE = tuple(s.value for s in SiteState.active())
# A live decider gets this long to commit its round before another site does it too.
TAKEOVER_LIVE_S = 1800.0
# Polling while a round waits: every poll_s at first, then slower the longer the
# wait (x1.5 per poll after POLL_FAST_S, up to POLL_MAX_S), so that a site waiting
# minutes for a slow link's upload makes a few requests a second, not dozens.
POLL_FAST_S = 2.0
POLL_MAX_S = 1.0

class RoundExchange:
    """The store side of rounds for one site (used by rank 0 of the site only)."""

    def __init__(self, store: RunStore, site: str, *, codec: compression.Codec | None = None,
                 window_s: float = 600.0, join_wait_s: float = 60.0, liveness_s: float = 4.0,
                 reject_norm_factor: float = 10.0, lookback: int = 3, poll_s: float = 0.05,
                 takeover_s: float = 10.0, state_every: int = 1, final_round: int | None = None,
                 roster: Iterable[str] | None = None, max_tokens: Mapping[str, float] | None = None,
                 initial_hash: str | None = None):
        self.store, self.site = store, site
        self.initial_hash = initial_hash  # round 0's, from the signed run.json (joining.py)
        # The run's sites (the recipe's names): only they and their migrated
        # members `name~k` (k >= 1) may contribute; None: anyone (a user's script).
        self.roster = None if roster is None else frozenset(roster)
        # Per site (base name): the most tokens it could train in one round.
        self.max_tokens = dict(max_tokens or {})
        # The model's tensors, name -> (shape, dtype), set by DiLoCo (`expect`):
        # a contribution must decode to exactly these.
        self.spec: dict[str, tuple[tuple[int, ...], torch.dtype]] | None = None
        self.fragments: Fragments | None = None  # which of them round r syncs (`expect`)
        # Which rounds commit the full global state; the same on every site, so a
        # takeover commits the same bytes as the decider would have.
        self.state_every, self.final_round = state_every, final_round
        self.codec = codec or compression.make_codec("none")
        self.window_s, self.join_wait_s, self.liveness_s = window_s, join_wait_s, liveness_s
        self.reject_norm_factor, self.lookback, self.poll_s = reject_norm_factor, lookback, poll_s
        self.takeover_s = takeover_s
        self._liveness_read: tuple[float, dict] = (float("-inf"), {})
        # What this site read while deciding: (sha256, decoded) by (round, site).
        self._decoded: dict[tuple[int, str], tuple[str, Tensors]] = {}
        self._read_for: dict[int, int] = {}  # bytes the decider downloaded deciding round r
        # The first round this site trains: only then does it wait for sites still
        # starting (a launch or a resume); later, a starting site (a replacement)
        # joins the first open round and nobody waits for it.
        self.joined_round = 1
        self._passed: set[tuple[int, int]] = set()  # (round, slot) of forged decisions reported

    # -- checking contributions ----------------------------------------------------------

    def expect(self, spec: Mapping[str, tuple[tuple[int, ...], torch.dtype]],
               fragments: Fragments | None = None) -> None:
        """The model's tensors (name -> (shape, dtype) of the decoded
        pseudo-gradient) and, with fragment sync, which of them each round syncs:
        contributions with other names, shapes or dtypes are rejected, and
        decoding is bounded by them."""
        self.spec = {n: (tuple(int(d) for d in s), dt) for n, (s, dt) in spec.items()}
        self.fragments = fragments if fragments is not None and fragments.count > 1 else None

    def _spec(self, r: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]] | None:
        """The tensors a contribution to round r must hold."""
        if self.spec is None or self.fragments is None:
            return self.spec
        names = self.fragments.names(r)
        return {n: v for n, v in self.spec.items() if n in names}

    def _norm_key(self, site: str, r: int) -> str:
        base = member_base(site)
        return base if self.fragments is None else self.fragments.norm_key(base, r)

    def is_member(self, name: str) -> bool:
        """Whether `name` may contribute: a site of the run or a migrated member of one."""
        if self.roster is None:
            return True
        m = _MEMBER.fullmatch(name)
        return m is not None and m["base"] in self.roster

    def _check_meta(self, site: str, meta) -> tuple[float, str]:
        """(tokens, sha256) of a manifest, or Rejected: tokens must be finite,
        > 0 and at most what the site could have trained in a round."""
        if not isinstance(meta, dict):
            raise Rejected("manifest is not a JSON object")
        sha = meta.get("sha256")
        if not isinstance(sha, str) or not _SHA.fullmatch(sha):
            raise Rejected("manifest has no valid sha256")
        tokens = _number(meta, "tokens")
        cap = min(MAX_TOKENS, self.max_tokens.get(member_base(site), MAX_TOKENS))
        if not math.isfinite(tokens) or tokens <= 0:
            raise Rejected(f"tokens {tokens!r} is not a finite number > 0")
        if tokens > cap:
            raise Rejected(f"tokens {tokens:.4g} > {cap:.4g}, the most {member_base(site)} "
                           f"can train in a round")
        return tokens, sha

    def _check_tensors(self, delta: Tensors, r: int) -> None:
        """The decoded tensors are exactly those round r syncs (names, shapes, dtypes)."""
        spec = self._spec(r)
        if spec is None:
            return
        missing, extra = sorted(spec.keys() - delta.keys()), sorted(delta.keys() - spec.keys())
        if missing or extra:
            what = "the model's" if self.fragments is None else \
                f"round {r}'s, {self.fragments.describe(r)}"
            raise Rejected(f"tensors differ from {what}: missing {missing[:3]}, unknown {extra[:3]}")
        for n in sorted(delta):
            shape, dtype = spec[n]
            if tuple(delta[n].shape) != shape or delta[n].dtype != dtype:
                raise Rejected(f"tensor {n!r} is {list(delta[n].shape)} {delta[n].dtype}; the "
                               f"model's is {list(shape)} {dtype}")

    def _decode(self, payload: bytes, r: int) -> Tensors:
        """Decode a contribution to round r bounded by the tensors it must hold;
        CodecError or Rejected if it does not fit."""
        spec = self._spec(r)
        shapes = None if spec is None else {n: s for n, (s, _) in spec.items()}
        try:
            delta = compression.decode(payload, shapes)
        except compression.CodecError as e:
            if self.fragments is None:
                raise
            raise Rejected(f"{e} (round {r} syncs {self.fragments.describe(r)})") from None
        self._check_tensors(delta, r)
        return delta

    # -- publishing ----------------------------------------------------------------------

    def publish(self, r: int, delta: Tensors, tokens: float, steps: int, base_round: int) -> int:
        """Encode and publish this site's contribution to round r; returns bytes written."""
        return self.upload(r, self.codec.encode(delta), tokens, steps, base_round)

    def upload(self, r: int, payload: bytes, tokens: float, steps: int, base_round: int) -> int:
        """Publish an encoded contribution (`codec.encode`, called in round order) to round r."""
        self.store.put_contribution(r, self.site, payload, {
            "tokens": tokens, "inner_steps": steps, "codec": self.codec.name,
            "base_round": base_round, "published_at": time.time()})
        return len(payload)

    def first_open_round(self, r: int) -> int:
        """r, or the first round after r that is not decided yet."""
        while self.store.members(r) is not None:
            r += 1
        return r

    # -- deciding ------------------------------------------------------------------------

    def _waiting_for(self, r: int, present: set[str], first_at: float) -> list[str]:
        """Sites we still wait for in round r (empty: decide now)."""
        now, waited = time.time(), time.time() - first_at
        out = []
        for site, alive in self.store.liveness().items():
            if site in present or now - alive.get("at", 0) > self.liveness_s:
                continue
            if alive.get("state") not in ACTIVE:
                continue
            training_round = alive.get("training_round")
            if training_round is None:
                hb = self.store.heartbeat(site) or {}
                if hb.get("state") in ("training", "syncing"):
                    training_round = hb.get("training_round")
                elif hb.get("state") not in (None, "starting"):
                    continue  # done, stopped, failed, preempting: not coming
            if training_round is not None:
                if training_round <= r and waited < self.window_s:
                    out.append(site)
            elif r <= self.joined_round and waited < self.join_wait_s:  # starting together
                out.append(site)
        return sorted(out)

    def decide(self, r: int, should_stop: Callable[[], bool] = lambda: False,
               tick: Callable[[], None] = lambda: None) -> tuple[dict, bool]:
        """Wait until round r's membership is decided (deciding it ourselves if we
        get there first). Returns (decision, whether we made it). `tick` is
        called about once a second while waiting."""
        last_tick = started = time.monotonic()
        poll = self.poll_s
        published_at: dict[str, float] = {}  # a manifest never changes once written: read it once
        while True:
            decision = self.store.members(r)
            self._passed_over(r)
            if decision is not None:
                return decision, False
            present = set(self.store.contributions(r))
            # Only the run's members start the round's clock (anyone else's files
            # are rejected in the decision, once members have published).
            members = {s for s in present if self.is_member(s)}
            if members:
                for s in members - published_at.keys():
                    published_at[s] = self._published_at(r, s)
                first_at = min(published_at.values())
                waiting = self._waiting_for(r, present, first_at)
                if not waiting:
                    return self._make_decision(r, present)
            if should_stop():
                raise SyncError(f"round {r}: stopped while waiting for the other sites")
            if time.monotonic() - last_tick > 1.0:
                tick()
                last_tick = time.monotonic()
            time.sleep(poll)
            if time.monotonic() - started > POLL_FAST_S:
                poll = min(max(poll, self.poll_s) * 1.5, max(POLL_MAX_S, self.poll_s))

    def _passed_over(self, r: int) -> None:
        """Report, once each, round r's decision slots that hold a forged record (the
        sites decide in the next free one); SyncError once every slot does."""
        bad = self.store.rejected_decisions(r)
        for slot, why in sorted(bad.items()):
            if (r, slot) not in self._passed:
                self._passed.add((r, slot))
                self.store.event(self.site, "rejected-decision", f"round {r}: passed over the "
                                 f"record in decision slot {slot}: {why}", round=r, slot=slot,
                                 reason=why[:300])
        if len(bad) >= SLOTS:
            raise SyncError(f"round {r}: all {SLOTS} decision slots hold records that are not "
                            f"decisions signed by a member of the run (see the rejected-decision "
                            f"events), so the sites cannot agree on this round")

    def _published_at(self, r: int, site: str) -> float:
        """When a contribution says it was published: a finite number, not in the
        future (else now, when we first saw it)."""
        now = time.time()
        try:
            v = self.store.contribution_meta(r, site).get("published_at")
        except (OSError, ValueError, AttributeError, StoreError):
            return now
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            return now
        return min(float(v), now)

    def _carried(self, r: int) -> list[tuple[int, str]]:
        """Contributions to earlier rounds that no decision has included yet."""
        out, decided = [], set()
        lo = max(1, r - self.lookback)
        for q in range(lo, r):
            m = self.store.members(q) or {}
            for e in m.get("accepted", []) + m.get("rejected", []):
                decided.add((int(e["round"]), e["site"]))
        # (A contribution to an earlier round that is not in the decisions looked
        # at is carried; its checks are the same as for this round's.)
        for q in range(lo, r):
            out += [(q, s) for s in self.store.contributions(q) if (q, s) not in decided]
        return out

    def _make_decision(self, r: int, present: set[str]) -> tuple[dict, bool]:
        candidates = self._carried(r) + [(r, s) for s in sorted(present)]
        accepted, rejected, norms = [], [], {}
        # Each site's own recent norms: a sudden jump is an outlier even with two
        # sites (the round's median below needs 3+). See _norm_outlier.
        history = norm_history(self.store, r, self.lookback)
        self._read_for[r] = 0
        for q, site in candidates:
            try:
                if not self.is_member(site):
                    raise Rejected(f"{site!r} is not a site of this run")
                tokens, sha = self._check_meta(site, self.store.contribution_meta(q, site))
                payload = self.store.contribution_payload(q, site)
                self._read_for[r] += len(payload) if site != self.site else 0
                if sha256(payload) != sha:
                    raise Rejected("checksum mismatch: the payload is not the one its manifest names")
                delta = self._decode(payload, q)
                if not all(torch.isfinite(t).all() for t in delta.values()):
                    raise Rejected("non-finite values")
                norm = tensor_norm(delta)
                if not math.isfinite(norm):
                    raise Rejected("non-finite norm")
                why = norm_outlier(norm, tokens, history.get(self._norm_key(site, q), []),
                                   self.reject_norm_factor)
                if why:
                    raise Rejected(f"{why} from {member_base(site)}")
            except (Rejected, StoreError, compression.CodecError, OSError, ValueError) as e:
                rejected.append({"site": site, "round": q, "reason": str(e)[:300]})
                continue
            norms[(q, site)] = norm
            self._decoded[(q, site)] = (sha, delta)
            accepted.append({"site": site, "round": q, "sha256": sha,
                             "tokens": tokens, "norm": norm})
        if len(accepted) >= 3:
            median = statistics.median(norms.values())
            keep = []
            for e in accepted:
                if median > 0 and e["norm"] > self.reject_norm_factor * median:
                    rejected.append({"site": e["site"], "round": e["round"], "reason":
                                     f"norm {e['norm']:.3g} > {self.reject_norm_factor:g} x "
                                     f"median {median:.3g}"})
                else:
                    keep.append(e)
            accepted = keep
        for e in sorted(accepted, key=lambda e: (e["round"], e["site"])):
            key = self._norm_key(e["site"], e["round"])
            history[key] = (history.get(key, []) + [[e["norm"], e["tokens"]]])[-NORM_HISTORY:]
        decision = {"accepted": accepted, "rejected": rejected, "decided_by": self.site,
                    "decided_at": time.time(), "norms": history}
        try:
            decision, won = self.store.decide_members(r, decision)
        except SlotsTaken as e:
            self._passed_over(r)
            raise SyncError(str(e)) from None
        self._passed_over(r)
        if won:
            for e in rejected:
                self.store.event(self.site, "rejected", f"round {r}: rejected the contribution "
                                 f"of {e['site']} (round {e['round']}): {e['reason']}", **e)
            carried = [e for e in accepted if e["round"] != r]
            if carried:
                self.store.event(self.site, "carried", f"round {r}: carried "
                                 + ", ".join(f"{e['site']}@{e['round']}" for e in carried),
                                 round=r, carried=carried)
        return decision, won

    # -- merging -------------------------------------------------------------------------

    def gather(self, decision: dict) -> tuple[list[tuple[Entry, Tensors]], int]:
        """The accepted contributions of a decision, decoded, in canonical order,
        with the bytes downloaded for them. Only the bytes the decision accepted
        (its sha256) are merged, whatever the manifest says now (tokens come from
        the decision); ContributionChanged if the store no longer holds them."""
        parts, received = [], self._read_for.pop(decision["round"], 0)
        entries = []
        for d in decision["accepted"]:
            try:
                entries.append(Entry.of(d))
            except ValueError as err:  # every site skips the same entry: they still agree
                self.store.event(self.site, "rejected", f"round {decision['round']}: skipped an "
                                 f"accepted entry of the decision: {err}", round=decision["round"],
                                 reason=str(err)[:300], at_merge=True)
        for e in sorted(entries, key=lambda e: (e.round, e.site)):
            # What we read while deciding counts only if it is what was accepted (a
            # site that lost the race to decide may have read other bytes).
            sha, delta = self._decoded.pop((e.round, e.site), (None, None))
            try:
                # The decider checked these already; checked again (the same
                # deterministic checks on the same bytes, so every site skips the
                # same entries) so that no decision can feed the outer step a
                # contribution that fails them.
                if not self.is_member(e.site):
                    raise Rejected(f"{e.site!r} is not a site of this run")
                self._check_meta(e.site, {"sha256": e.sha256, "tokens": e.tokens})
                if sha != e.sha256:
                    try:
                        payload = self.store.contribution_payload(e.round, e.site)
                    except FileNotFoundError:
                        payload = b""
                    if sha256(payload) != e.sha256:
                        raise ContributionChanged(f"round {decision['round']}: the contribution of "
                                                  f"{e.site} (round {e.round}) changed after it was "
                                                  f"accepted")
                    received += len(payload) if e.site != self.site else 0
                    delta = self._decode(payload, e.round)
                    if not all(torch.isfinite(t).all() for t in delta.values()):
                        raise Rejected("non-finite values")
            except (Rejected, compression.CodecError) as err:
                self.store.event(self.site, "rejected", f"round {decision['round']}: skipped the "
                                 f"accepted contribution of {e.site} (round {e.round}): {err}",
                                 site=e.site, round=e.round, reason=str(err)[:300], at_merge=True)
                continue
            parts.append((e, delta))
        return parts, received

    # -- committing ----------------------------------------------------------------------

    def commit(self, r: int, params: Tensors, momentum: Tensors, hash_: str, decision: dict) -> None:
        """Commit global round r. Deterministic bytes: two sites committing the same
        round write identical objects, so a takeover can never corrupt a round."""
        from geotrain.sync.diloco import encode

        files = {}
        if self.commits_state(r):
            if params is None:  # geotrain/sync/commits.py keeps the state such a round needs
                raise SyncError(f"round {r}: its commit needs the global state, which was not kept")
            files["model.safetensors"] = encode(params)
            if momentum:
                files["outer.safetensors"] = encode(momentum)
        members = [e["site"] if e["round"] == r else f"{e['site']}@{e['round']}"
                   for e in decision["accepted"]]
        self.store.commit_global(r, files, {"hash": hash_, "members": members})

    def _live(self, site) -> bool:
        """Whether `site` beat within liveness_s in a state that is still at work."""
        now = time.monotonic()
        if now - self._liveness_read[0] > 2.0:  # the committer asks often: read every 2 s
            self._liveness_read = (now, self.store.liveness())
        alive = self._liveness_read[1].get(site) if isinstance(site, str) else None
        return bool(alive) and time.time() - alive.get("at", 0) <= self.liveness_s \
            and alive.get("state") in ACTIVE

    def commits_state(self, r: int) -> bool:
        """Whether round r's commit holds the global state, or only its hash and
        decision (a reader replays it from the newest round that does)."""
        return self.keeps_state(r, self.last_round())

    def keeps_state(self, r: int, last: int | None) -> bool:
        """commits_state, given the run's last round (one store read serves many rounds)."""
        return r % self.state_every == 0 or (last is not None and r >= last)

    def last_round(self) -> int | None:
        """The run's last round: the recipe's (`final_round`), or an earlier one
        the controller asked for (`geotrain finish`), the same for every site."""
        asked = self.store.finish_round()
        if asked is None:
            return self.final_round
        return asked if self.final_round is None else min(asked, self.final_round)

    def ensure_committed(self, r: int, params: Tensors, momentum: Tensors, hash_: str,
                         decision: dict, decided_by_me: bool) -> bool:
        """Commit round r if we decided it, or if its decider has not committed it
        within takeover_s and is no longer live (or, live, not within
        TAKEOVER_LIVE_S: a large state takes minutes to upload, and every site
        uploading the same bytes beside it would only slow it); True if this
        call committed it."""
        if self.store.is_committed(r):
            return False
        if not decided_by_me:
            age = time.time() - decision.get("decided_at", 0)
            if age < self.takeover_s or (age < TAKEOVER_LIVE_S
                                         and self._live(decision.get("decided_by"))):
                return False
        self.commit(r, params, momentum, hash_, decision)
        if not decided_by_me:
            self.store.event(self.site, "takeover", f"committed round {r} for "
                             f"{decision.get('decided_by')}", round=r)
        return True
