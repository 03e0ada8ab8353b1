"""GCE's preemption notice, read from the node's metadata server
(geotrain/site/preemption.py runs it): ``instance/preempted`` as a hanging GET
(``wait_for_change`` + ``last_etag`` + ``timeout_sec``), so a change is seen at once.
"""

from __future__ import annotations

import time

from geotrain.site.preemption import GCE_NOTICE_S, REQUEST_TIMEOUT_S, Notice, _Base, _request


class GceWatcher(_Base):
    """GCE metadata `instance/preempted`, watched with a hanging GET."""
    provider = "gcp"
    interval_s = 0.0

    def __init__(self, endpoint: str, wait_s: float = 30.0):
        super().__init__(endpoint)
        self.wait_s = wait_s
        self._etag: str | None = None

    def _check(self) -> Notice | None:
        url = f"{self.endpoint}/computeMetadata/v1/instance/preempted"
        timeout = REQUEST_TIMEOUT_S
        if self._etag is not None:  # the first read is plain; after it, wait for a change
            wait = max(1, round(self.wait_s))
            url += f"?wait_for_change=true&last_etag={self._etag}&timeout_sec={wait}"
            timeout += self.wait_s
        status, headers, body = _request("GET", url, {"Metadata-Flavor": "Google"}, timeout=timeout)
        if status != 200:
            raise OSError(f"preempted answered {status}")
        self._etag = headers.get("ETag") or self._etag
        if body.decode().strip().upper() == "TRUE":
            return Notice("gcp", "preempt", time.time() + GCE_NOTICE_S, "instance/preempted is TRUE")
        return None
