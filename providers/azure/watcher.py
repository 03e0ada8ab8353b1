"""Azure's Scheduled Events for this VM, read from IMDS (geotrain/site/preemption.py
runs it). Only events naming this VM count; `acknowledge()` POSTs ``StartRequests``
once the site has drained.
"""

from __future__ import annotations

import email.utils
import json
import logging
import time

from geotrain.site.preemption import AZURE_API, Notice, _Base, _request

log = logging.getLogger("geotrain.site.preemption")
_AZURE_KINDS = {"Preempt": "preempt", "Terminate": "terminate", "Reboot": "reboot",
                "Redeploy": "redeploy", "Freeze": "freeze"}


class AzureWatcher(_Base):
    """Azure Scheduled Events for this VM."""
    provider = "azure"
    _ORDER = ("preempt", "terminate", "redeploy", "reboot", "freeze")  # most urgent first

    def __init__(self, endpoint: str, vm_name: str | None = None):
        super().__init__(endpoint)
        self.vm_name = vm_name

    def _url(self, path: str, **params: str) -> str:
        query = "&".join(f"{k}={v}" for k, v in {"api-version": AZURE_API, **params}.items())
        return f"{self.endpoint}{path}?{query}"

    def _check(self) -> Notice | None:
        if self.vm_name is None:
            status, _, body = _request("GET", self._url("/metadata/instance/compute/name", format="text"),
                                       {"Metadata": "true"})
            if status != 200:
                raise OSError(f"compute/name answered {status}")
            self.vm_name = body.decode().strip()
        status, _, body = _request("GET", self._url("/metadata/scheduledevents"), {"Metadata": "true"})
        if status != 200:
            raise OSError(f"scheduledevents answered {status}")
        ours = []
        for ev in json.loads(body).get("Events", []):
            kind = _AZURE_KINDS.get(ev.get("EventType"))
            if kind and self.vm_name in ev.get("Resources", []):
                ours.append((self._ORDER.index(kind), kind, ev))
        if not ours:
            return None
        _, kind, ev = min(ours, key=lambda o: o[0])
        not_before = ev.get("NotBefore") or ""
        deadline = email.utils.parsedate_to_datetime(not_before).timestamp() if not_before else time.time()
        return Notice("azure", kind, deadline,
                      f"{ev['EventType']} {ev.get('EventStatus', '')} not before {not_before or 'now'}",
                      event_id=ev["EventId"])

    def acknowledge(self, notice: Notice) -> bool:
        if not notice.event_id:
            return False
        body = json.dumps({"StartRequests": [{"EventId": notice.event_id}]}).encode()
        try:
            status, _, _ = _request("POST", self._url("/metadata/scheduledevents"),
                                    {"Metadata": "true", "Content-Type": "application/json"}, data=body)
        except OSError as e:
            log.warning("could not acknowledge Azure event %s: %s", notice.event_id, e)
            return False
        return status == 200
