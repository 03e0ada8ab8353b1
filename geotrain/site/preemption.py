"""Preemption watchers: learn from the cloud's metadata service that this VM is going away.

One watcher per provider, in its provider's package (providers/<cloud>/watcher.py),
each a `poll()` that makes one bounded check of the documented endpoint and
returns a `Notice` or None:

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

import http.client
import logging
import os
import threading
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


def _parse_iso(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def watcher_for(provider: str, endpoint: str | None = None, vm_name: str | None = None) -> Watcher | None:
    """The watcher for a provider; None for `local` without an endpoint (nothing to watch).

    `local` with an endpoint reads it in the AWS IMDSv2 format: run the local
    provider's `NoticeServer("aws")` there."""
    from providers.aws.watcher import AwsWatcher  # each cloud's watcher lives with its provider

    if provider == "local":
        return AwsWatcher(endpoint) if endpoint else None
    if provider not in DEFAULT_ENDPOINTS:
        raise ProviderError(f"no preemption watcher for provider {provider!r}; "
                            f"valid: local, {', '.join(DEFAULT_ENDPOINTS)}")
    endpoint = endpoint or DEFAULT_ENDPOINTS[provider]
    if provider == "aws":
        return AwsWatcher(endpoint)
    if provider == "gcp":
        from providers.gcp.watcher import GceWatcher

        return GceWatcher(endpoint)
    from providers.azure.watcher import AzureWatcher

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
