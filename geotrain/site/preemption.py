"""Preemption watchers: learn from the cloud's metadata service that this VM is going away.

One watcher per provider, each a `poll()` that makes one bounded check of the
documented endpoint and returns a `Notice` or None:

- aws    IMDSv2 (session token, refreshed before its TTL runs out and re-fetched
         on 401): ``spot/instance-action`` → kind "preempt"; a rebalance
         recommendation → the weaker kind "rebalance".
- gcp    ``instance/preempted`` as a hanging GET (``wait_for_change`` +
         ``last_etag`` + ``timeout_sec``), so a change is seen at once.
- azure  Scheduled Events; only events naming this VM count. `acknowledge()`
         POSTs ``StartRequests`` once the site has drained.

`NoticeThread` runs a watcher in a daemon thread and calls back once; the site
agent starts one from its environment (`watch_from_env`):

    GEOTRAIN_PROVIDER           aws | gcp | azure (local: only with an endpoint)
    GEOTRAIN_METADATA_ENDPOINT  overrides the metadata address, e.g. a local
                                `NoticeServer`; with provider local/unset the
                                endpoint is read in the AWS IMDSv2 format
    GEOTRAIN_VM_NAME            Azure: this VM's name (else asked of IMDS)

Metadata requests never go through an HTTP proxy. A watcher never raises: an
unreachable or erroring metadata service is logged once and reads as "no
notice"; the thread backs off and keeps trying.
"""

from __future__ import annotations

import email.utils
import http.client
import json
import logging
import os
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from geotrain.errors import ProviderError

log = logging.getLogger("geotrain.site.preemption")

DEFAULT_ENDPOINTS = {"aws": "http://169.254.169.254", "gcp": "http://metadata.google.internal",
                     "azure": "http://169.254.169.254"}
GCE_NOTICE_S = 30.0      # GCE documents ~30 s between the preemption notice and the stop
AZURE_API = "2020-07-01"
REQUEST_TIMEOUT_S = 2.0
# Kinds that only warn; every other kind means the VM is about to go.
WARNINGS = frozenset({"rebalance", "freeze"})
_AZURE_KINDS = {"Preempt": "preempt", "Terminate": "terminate", "Reboot": "reboot",
                "Redeploy": "redeploy", "Freeze": "freeze"}
# Metadata endpoints are link-local: never ask an HTTP(S)_PROXY for them.
_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@dataclass(frozen=True)
class Notice:
    """What the metadata service announced."""
    provider: str
    kind: str                   # preempt | terminate | reboot | redeploy | freeze | rebalance
    deadline: float | None      # epoch seconds the VM is expected to go; None if not said
    detail: str                 # the provider's own words (action, event type, times)
    event_id: str | None = None  # Azure: the EventId to acknowledge

    @property
    def urgent(self) -> bool:
        """True when the site must drain now; False for a warning (rebalance, freeze)."""
        return self.kind not in WARNINGS


class Watcher(Protocol):
    provider: str
    interval_s: float  # pause between polls; 0 for a hanging GET

    def poll(self) -> Notice | None:
        """One check, bounded in time; never raises."""

    def acknowledge(self, notice: Notice) -> bool:
        """Tell the provider the VM may go now (Azure); False where there is nothing to tell."""


def _request(method: str, url: str, headers: dict[str, str], data: bytes | None = None,
             timeout: float = REQUEST_TIMEOUT_S) -> tuple[int, Mapping[str, str], bytes]:
    """(status, headers, body); HTTP error statuses are returned, transport errors raise OSError."""
    req = urllib.request.Request(url, data=data, headers=headers, method=method)
    try:
        with _opener.open(req, timeout=timeout) as resp:
            return resp.status, resp.headers, resp.read()
    except urllib.error.HTTPError as e:
        with e:
            return e.code, e.headers, e.read()
    except http.client.HTTPException as e:
        raise OSError(f"bad HTTP response: {e}") from e


class _Base:
    """Health bookkeeping shared by the watchers: log a failure once, a recovery once."""
    provider = ""
    interval_s = 0.5

    def __init__(self, endpoint: str):
        self.endpoint = endpoint.rstrip("/")
        self.healthy = True
        self.failures = 0  # consecutive failed polls

    def _failed(self, why: str) -> None:
        if self.healthy:
            log.warning("%s metadata service at %s unreachable (%s); retrying with backoff",
                        self.provider, self.endpoint, why)
        self.healthy, self.failures = False, self.failures + 1

    def _ok(self) -> None:
        if not self.healthy:
            log.info("%s metadata service at %s reachable again", self.provider, self.endpoint)
        self.healthy, self.failures = True, 0

    def poll(self) -> Notice | None:
        try:
            notice = self._check()
        except (OSError, ValueError, KeyError, TypeError) as e:
            self._failed(f"{type(e).__name__}: {e}")
            return None
        self._ok()
        return notice

    def _check(self) -> Notice | None:
        raise NotImplementedError

    def acknowledge(self, notice: Notice) -> bool:
        return False


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


def _parse_iso(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def watcher_for(provider: str, endpoint: str | None = None, vm_name: str | None = None) -> Watcher | None:
    """The watcher for a provider; None for `local` without an endpoint (nothing to watch).

    `local` with an endpoint reads it in the AWS IMDSv2 format: run the local
    provider's `NoticeServer("aws")` there."""
    if provider == "local":
        return AwsWatcher(endpoint) if endpoint else None
    if provider not in DEFAULT_ENDPOINTS:
        raise ProviderError(f"no preemption watcher for provider {provider!r}; "
                            f"valid: local, {', '.join(DEFAULT_ENDPOINTS)}")
    endpoint = endpoint or DEFAULT_ENDPOINTS[provider]
    if provider == "aws":
        return AwsWatcher(endpoint)
    if provider == "gcp":
        return GceWatcher(endpoint)
    return AzureWatcher(endpoint, vm_name)


class NoticeThread:
    """Runs a watcher in a daemon thread.

    `on_notice` is called exactly once with the first urgent notice, after
    which the thread ends; `fired` is set just before (the hook a trainer or
    agent loop reads). A warning (rebalance, freeze) is passed to `on_notice`
    once per distinct warning and watching goes on.
    """

    def __init__(self, watcher: Watcher, on_notice: Callable[[Notice], None] | None = None,
                 max_backoff_s: float = 4.0):
        self.watcher, self.on_notice, self.max_backoff_s = watcher, on_notice, max_backoff_s
        self.fired = threading.Event()
        self.notice: Notice | None = None
        self.warnings: list[Notice] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"notice-{watcher.provider}", daemon=True)

    def start(self) -> NoticeThread:
        self._thread.start()
        return self

    def stop(self, timeout: float = 2.0) -> None:
        """Ask the thread to end; a hanging GET in flight is left to finish on its own."""
        self._stop.set()
        self._thread.join(timeout)

    def acknowledge(self) -> bool:
        """Tell the provider the site has drained (Azure StartRequests); see Watcher.acknowledge."""
        return self.watcher.acknowledge(self.notice) if self.notice else False

    def _call(self, notice: Notice) -> None:
        if self.on_notice is None:
            return
        try:
            self.on_notice(notice)
        except Exception:  # noqa: BLE001 - a failing callback must not end the watch
            log.exception("preemption callback failed for %s", notice)

    def _run(self) -> None:
        seen: set[tuple[str, str]] = set()
        while not self._stop.is_set():
            try:
                notice = self.watcher.poll()
            except Exception:  # noqa: BLE001 - poll() should not raise; never let it end the watch
                log.exception("%s watcher raised", self.watcher.provider)
                notice = None
            if notice is not None and not self._stop.is_set():
                if notice.urgent:
                    self.notice = notice
                    self.fired.set()
                    self._call(notice)
                    return
                if (notice.kind, notice.detail) not in seen:
                    seen.add((notice.kind, notice.detail))
                    self.warnings.append(notice)
                    self._call(notice)
            failures = getattr(self.watcher, "failures", 0)
            delay = self.watcher.interval_s
            if failures:
                delay = min(self.max_backoff_s, max(delay, 0.25) * 2 ** (failures - 1))
            self._stop.wait(delay)


def watch_from_env(on_notice: Callable[[Notice], None] | None = None,
                   environ: Mapping[str, str] = os.environ) -> NoticeThread | None:
    """Start a NoticeThread as the environment says (see the module docstring); None if it says nothing."""
    provider = environ.get("GEOTRAIN_PROVIDER") or "local"
    endpoint = environ.get("GEOTRAIN_METADATA_ENDPOINT") or None
    watcher = watcher_for(provider, endpoint, environ.get("GEOTRAIN_VM_NAME") or None)
    if watcher is None:
        return None
    log.info("watching %s for preemption notices", getattr(watcher, "endpoint", provider))
    return NoticeThread(watcher, on_notice).start()
