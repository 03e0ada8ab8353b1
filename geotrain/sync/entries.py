"""What a round's decision is made of, and the errors of a round: the accepted
entries, member names, the bounds on what a contribution may claim
(geotrain/sync/rounds.py checks contributions with them)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from geotrain.errors import GeotrainError

# Tokens a contribution may claim, whatever else is known: 1e15 is ~70x the
# largest published pre-training corpus (~1.5e13 tokens), so no honest site
# trains that much in one round, while every real count is far below it; with
# the sites' float64 weights w/W it keeps a forged count from turning into
# inf/NaN. When a site's steps per round are known (RoundExchange's
# `max_tokens`, from the recipe) the bound is much tighter.
MAX_TOKENS = 1e15
# Slack on "what a site could have trained in a round": steps x tokens per step
# is exact for the built-in trainer; x2 leaves room for a caller that counts a
# round's last partial step or a few extra tokens, and still keeps one member
# from outweighing the others by more than 2x its real share.
TOKEN_SLACK = 2.0
_MEMBER = re.compile(r"(?P<base>[^~/]+)(?:~(?P<gen>[1-9][0-9]{0,8}))?")
_SHA = re.compile(r"[0-9a-f]{64}")


class Rejected(Exception):
    """A contribution fails a check; its message is the reason recorded."""


def member_base(name: str) -> str:
    """The site a member name stands for: 'a' for 'a' and for 'a~2' (a migrated site)."""
    m = _MEMBER.fullmatch(name)
    return m["base"] if m else name


def _number(meta: dict, key: str) -> float:
    v = meta.get(key)
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise Rejected(f"manifest {key!r} is {v!r:.40}, not a number")
    try:
        return float(v)
    except OverflowError:  # an int too large for a float
        raise Rejected(f"manifest {key!r} is out of range") from None


class SyncError(GeotrainError):
    """A round could not complete (nobody decided it in time, or we were stopped)."""


class ContributionChanged(SyncError):
    """The store no longer holds the bytes a round's decision accepted (the
    payload was rewritten, corrupted or removed after the decision)."""


@dataclass(frozen=True)
class Entry:
    """One accepted contribution in a round's decision."""

    site: str
    round: int  # the round it was published to (< the decision's round when carried)
    sha256: str
    tokens: float

    @classmethod
    def of(cls, d: dict) -> Entry:
        """An accepted entry as a decision holds it; ValueError if it is not one (a
        decision is signed by a member, not written by us: it is checked like any
        record read from the store)."""
        try:
            e = cls(d["site"], int(d["round"]), d["sha256"], float(d["tokens"]))
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"accepted entry {str(d)[:120]} is malformed ({err!r})") from None
        if not isinstance(e.site, str) or not isinstance(e.sha256, str):
            raise ValueError(f"accepted entry {str(d)[:120]} is malformed")
        return e
