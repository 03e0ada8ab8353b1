"""EC2's spot notices, read from the node's IMDSv2 (geotrain/site/preemption.py runs it).

Session token refreshed before its TTL runs out and re-fetched on 401;
``spot/instance-action`` is the notice (kind "preempt"), a rebalance
recommendation the weaker kind "rebalance".
"""

from __future__ import annotations

import json
import time

from geotrain.site.preemption import Notice, _Base, _parse_iso, _request


class AwsWatcher(_Base):
    """EC2 IMDSv2: spot instance-action and rebalance recommendation."""
    provider = "aws"

    def __init__(self, endpoint: str, token_ttl_s: int = 21600):
        super().__init__(endpoint)
        self.token_ttl_s = token_ttl_s
        self._token: str | None = None
        self._token_expires = 0.0  # monotonic

    def _fetch_token(self) -> str:
        status, _, body = _request("PUT", f"{self.endpoint}/latest/api/token",
                                   {"X-aws-ec2-metadata-token-ttl-seconds": str(self.token_ttl_s)})
        if status != 200:
            raise OSError(f"token request answered {status}")
        # Refresh a tenth of the TTL (at most a minute) before it runs out.
        self._token_expires = time.monotonic() + self.token_ttl_s - min(60.0, self.token_ttl_s / 10)
        self._token = body.decode().strip()
        return self._token

    def _get(self, path: str) -> tuple[int, bytes]:
        if self._token is None or time.monotonic() >= self._token_expires:
            self._fetch_token()
        url = f"{self.endpoint}{path}"
        status, _, body = _request("GET", url, {"X-aws-ec2-metadata-token": self._token})
        if status == 401:  # expired or revoked: a fresh token, then once more
            self._fetch_token()
            status, _, body = _request("GET", url, {"X-aws-ec2-metadata-token": self._token})
        return status, body

    def _check(self) -> Notice | None:
        status, body = self._get("/latest/meta-data/spot/instance-action")
        if status == 200:
            doc = json.loads(body)
            return Notice("aws", "preempt", _parse_iso(doc["time"]),
                          f"spot instance-action: {doc['action']} at {doc['time']}")
        if status != 404:
            raise OSError(f"instance-action answered {status}")
        status, body = self._get("/latest/meta-data/events/recommendations/rebalance")
        if status == 200:
            doc = json.loads(body)
            return Notice("aws", "rebalance", None, f"rebalance recommendation at {doc['noticeTime']}")
        if status != 404:
            raise OSError(f"rebalance answered {status}")
        return None
