"""What the operator's machine and a site's own nodes sign, so that no other
writer of the run store can forge it.

Every node of every site can write the run's prefix, so a record is believed
only when it carries a proof its reader can check:

- **The run's control key** (Ed25519). `launch` makes one per run; its private
  half stays on the operator's machine (the state db, owner-only) and its
  public half reaches nodes only in their boot data (`GEOTRAIN_CONTROL_KEY`,
  never through the store). What changes the run is signed with it: `run.json`
  (the recipe, hence the roster of sites), `stop`, the last round
  (`geotrain finish`) and a store switch (`geotrain migrate --store`).
- **A site's secret**: the nodes of one site share its Ray token
  (`RAY_AUTH_TOKEN`, in their boot data). What one node tells the others through
  the store — where the Ray head listens, the agent asking its trainer to drain
  — carries an HMAC under a key derived from it. Nodes of other sites, which
  never see the token, cannot forge those.

A signed record is an envelope `{"v": 1, "kind": K, "body": {...}, "sig": S}`;
the proof covers the canonical JSON of `v`, `kind` and `body`, so a record
cannot be moved to another kind. Each run has its own key, so nothing signed
for one run verifies in another; bodies carry their time or round, so a
replayed old record is recognised by whoever reads it (see geotrain/store/run.py).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from geotrain.errors import GeotrainError

CONTROL_KEY_ENV = "GEOTRAIN_CONTROL_KEY"  # base64 of the run's 32-byte Ed25519 public key
MEMBER_KEY_ENV = "GEOTRAIN_MEMBER_KEY"    # base64 of this member's Ed25519 private key (a secret)
SITE_SECRET_ENV = "RAY_AUTH_TOKEN"        # the site's Ray token: its nodes' shared secret
VERSION = 1


class ForgedRecord(GeotrainError):
    """A record's proof is missing, malformed or does not verify."""


def _canonical(kind: str, body: dict) -> bytes:
    return json.dumps({"v": VERSION, "kind": kind, "body": body}, sort_keys=True,
                      separators=(",", ":"), allow_nan=False).encode()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _unb64(text: Any, size: int | None, what: str) -> bytes:
    try:
        raw = base64.b64decode(text, validate=True) if isinstance(text, str) else None
    except ValueError:
        raw = None
    if raw is None or (size is not None and len(raw) != size):
        raise ForgedRecord(f"{what} is not base64 of {size} bytes" if size else f"{what} is not base64")
    return raw


def _envelope(record: Any, kind: str, proof: str) -> tuple[dict, bytes]:
    """(body, the proof's bytes) of an envelope of `kind`, or ForgedRecord."""
    if not isinstance(record, dict):
        raise ForgedRecord("not a signed record (a JSON object)")
    if record.get("v") != VERSION or record.get("kind") != kind:
        raise ForgedRecord(f"not a version-{VERSION} {kind!r} record")
    body = record.get("body")
    if not isinstance(body, dict):
        raise ForgedRecord("its body is not a JSON object")
    if proof not in record:
        raise ForgedRecord(f"unsigned (no {proof!r})")
    return body, _unb64(record[proof], None, proof)


class ControlKey:
    """An Ed25519 key: the run's control key (its private half on the operator's
    machine only) or a member's key (its private half on that member's nodes only,
    geotrain/store/roster.py). Signs with the private half, verifies with the public."""

    def __init__(self, public: Ed25519PublicKey, private: Ed25519PrivateKey | None = None):
        self.public, self.private = public, private

    @classmethod
    def generate(cls) -> ControlKey:
        private = Ed25519PrivateKey.generate()
        return cls(private.public_key(), private)

    @classmethod
    def from_private(cls, text: str) -> ControlKey:
        private = Ed25519PrivateKey.from_private_bytes(_unb64(text, 32, "control key"))
        return cls(private.public_key(), private)

    @classmethod
    def from_public(cls, text: str) -> ControlKey:
        return cls(Ed25519PublicKey.from_public_bytes(_unb64(text, 32, "control public key")))

    @classmethod
    def from_env(cls, name: str = CONTROL_KEY_ENV, private: bool = False) -> ControlKey | None:
        """The key a node was booted with (the run's public control key, or with
        `private` its member key), or None outside a site."""
        text = os.environ.get(name)
        if not text:
            return None
        return cls.from_private(text) if private else cls.from_public(text)

    def private_text(self) -> str:
        if self.private is None:
            raise ForgedRecord("this control key has no private half: only the operator's "
                               "machine signs")
        from cryptography.hazmat.primitives import serialization

        return _b64(self.private.private_bytes(serialization.Encoding.Raw,
                                               serialization.PrivateFormat.Raw,
                                               serialization.NoEncryption()))

    def public_text(self) -> str:
        from cryptography.hazmat.primitives import serialization

        return _b64(self.public.public_bytes(serialization.Encoding.Raw,
                                             serialization.PublicFormat.Raw))

    @property
    def can_sign(self) -> bool:
        return self.private is not None

    def sign(self, kind: str, body: dict) -> dict:
        if self.private is None:
            raise ForgedRecord(f"cannot sign a {kind!r} record: only the operator's machine "
                               "holds the run's control key")
        return {"v": VERSION, "kind": kind, "body": body,
                "sig": _b64(self.private.sign(_canonical(kind, body)))}

    def open(self, record: Any, kind: str) -> dict:
        """The body of a record of `kind` signed with this key, or ForgedRecord."""
        body, sig = _envelope(record, kind, "sig")
        try:
            self.public.verify(sig, _canonical(kind, body))
        except (InvalidSignature, ValueError):
            raise ForgedRecord(f"{kind!r} record: bad signature (not the run's control key)") from None
        return body


class SiteKey:
    """HMAC-SHA256 under a key derived from a site's shared secret (its Ray token)."""

    def __init__(self, secret: str):
        self._key = hmac.new(secret.encode(), b"geotrain site records v1", hashlib.sha256).digest()

    @classmethod
    def from_env(cls) -> SiteKey | None:
        secret = os.environ.get(SITE_SECRET_ENV)
        return cls(secret) if secret else None

    def _mac(self, kind: str, body: dict) -> bytes:
        return hmac.new(self._key, _canonical(kind, body), hashlib.sha256).digest()

    def sign(self, kind: str, body: dict) -> dict:
        return {"v": VERSION, "kind": kind, "body": body, "mac": _b64(self._mac(kind, body))}

    def open(self, record: Any, kind: str) -> dict:
        body, mac = _envelope(record, kind, "mac")
        if not hmac.compare_digest(mac, self._mac(kind, body)):
            raise ForgedRecord(f"{kind!r} record: bad MAC (not written by a node of this site)")
        return body


def unwrap(record: Any, kind: str) -> Any:
    """A record's body without checking its proof: for a reader that has no key
    (a user's own script, the operator's tools) and so trusts its store."""
    if isinstance(record, dict) and record.get("v") == VERSION and record.get("kind") == kind \
            and isinstance(record.get("body"), dict):
        return record["body"]
    return record
