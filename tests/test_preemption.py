"""Preemption watchers against the library's own notice server (the fault seam),
over real HTTP on 127.0.0.1: formats, handshakes, error codes, latency, retries,
and a real site agent that drains on a notice."""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from pathlib import Path

import pytest

from geotrain.errors import ProviderError
from geotrain.site.notice_server import NoticeServer
from geotrain.site.preemption import Notice, NoticeThread, watch_from_env, watcher_for
from providers.aws import watcher as aws_watcher
from providers.aws.watcher import AwsWatcher
from providers.azure.watcher import AzureWatcher
from providers.gcp.watcher import GceWatcher
from tests.helpers import control_key_option, geotrain_home, http, member_key_of, wait_for  # noqa: F401

PROVIDERS = ["aws", "gcp", "azure"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def server(request):
    s = NoticeServer(request.param)
    s.start()
    yield s
    s.stop()


def watcher(s: NoticeServer):
    w = watcher_for(s.provider, s.url)
    if isinstance(w, GceWatcher):
        w.wait_s = 2.0  # keep hanging GETs short so tests end promptly
    return w


# -- each watcher: nothing, then a notice -------------------------------------------------

@pytest.mark.parametrize("server", PROVIDERS, indirect=True)
def test_no_notice_then_preempt(server: NoticeServer):
    w = watcher(server)
    assert w.poll() is None
    before = time.time()
    server.preempt(in_s=30)
    n = w.poll()
    after = time.time()
    assert isinstance(n, Notice) and n.provider == server.provider
    assert n.kind == "preempt" and n.urgent
    # 30 s from the preempt() call, bracketed by clock readings taken around it: AWS
    # and Azure state the time to the second (rounded down); GCE documents ~30 s of
    # notice, counted from when the watcher saw it.
    assert before + 29 <= n.deadline <= after + 30
    server.clear()
    assert w.poll() is None


@pytest.mark.parametrize("server", ["aws"], indirect=True)
def test_aws_rebalance_is_a_weaker_notice_and_instance_action_wins(server: NoticeServer):
    w = watcher(server)
    server.rebalance()
    n = w.poll()
    assert n.kind == "rebalance" and not n.urgent and n.deadline is None
    server.preempt(in_s=120, action="stop")
    n = w.poll()
    assert n.kind == "preempt" and "stop" in n.detail


@pytest.mark.parametrize("server", ["aws"], indirect=True)
def test_aws_token_handshake_is_enforced(server: NoticeServer):
    action = f"{server.url}/latest/meta-data/spot/instance-action"
    assert http("GET", action)[0] == 401
    assert http("GET", action, {"X-aws-ec2-metadata-token": "made-up"})[0] == 401
    token_url = f"{server.url}/latest/api/token"
    assert http("PUT", token_url)[0] == 400                      # no TTL header
    assert http("PUT", token_url, {"X-aws-ec2-metadata-token-ttl-seconds": "21601"})[0] == 400
    assert http("PUT", token_url, {"X-aws-ec2-metadata-token-ttl-seconds": "60",
                                   "X-Forwarded-For": "10.0.0.1"})[0] == 403
    status, headers, token = http("PUT", token_url, {"X-aws-ec2-metadata-token-ttl-seconds": "60"})
    assert status == 200 and headers["X-aws-ec2-metadata-token-ttl-seconds"] == "60"
    assert http("GET", action, {"X-aws-ec2-metadata-token": token.decode()})[0] == 404
    server.preempt(in_s=30)
    status, _, body = http("GET", action, {"X-aws-ec2-metadata-token": token.decode()})
    assert status == 200 and json.loads(body)["action"] == "terminate"


class WatcherClock:
    """time for providers/aws/watcher.py: monotonic() stands still (at the real
    reading when it was made) and moves only when told to; everything else is the
    real clock."""

    def __init__(self):
        self.now = time.monotonic()

    def advance(self, seconds: float) -> None:
        self.now += seconds

    def monotonic(self) -> float:
        return self.now

    def __getattr__(self, name):
        return getattr(time, name)


@pytest.mark.parametrize("server", ["aws"], indirect=True)
def test_aws_token_refetched_on_401_and_refreshed_before_ttl(server: NoticeServer, monkeypatch):
    w = watcher(server)
    assert w.poll() is None and server.requests["PUT /latest/api/token"] == 1
    server.expire_tokens()                      # the server forgets: next GET answers 401
    server.preempt(in_s=30)
    assert w.poll().kind == "preempt" and w.healthy
    assert server.requests["PUT /latest/api/token"] == 2

    with NoticeServer("aws") as s2:             # refreshed before the TTL runs out
        clock = WatcherClock()
        monkeypatch.setattr(aws_watcher, "time", clock)
        # A 600 s TTL: the server never expires it during the test; the watcher's
        # own clock is moved past its refresh point (a tenth of the TTL before the end).
        w2 = AwsWatcher(s2.url, token_ttl_s=600)
        assert w2.poll() is None and s2.requests["PUT /latest/api/token"] == 1
        clock.advance(539)                       # still 1 s before the refresh point
        assert w2.poll() is None and s2.requests["PUT /latest/api/token"] == 1
        clock.advance(2)                         # past it, the server's token still valid
        assert w2.poll() is None
        assert s2.requests["PUT /latest/api/token"] == 2
        # No GET was spent on a 401: three polls, one instance-action GET each.
        assert s2.requests["GET /latest/meta-data/spot/instance-action"] == 3


@pytest.mark.parametrize("server", ["gcp"], indirect=True)
def test_gce_needs_the_header_and_serves_etags(server: NoticeServer):
    url = f"{server.url}/computeMetadata/v1/instance/preempted"
    assert http("GET", url)[0] == 403
    assert http("GET", url, {"Metadata-Flavor": "Google", "X-Forwarded-For": "1.2.3.4"})[0] == 403
    status, headers, body = http("GET", url, {"Metadata-Flavor": "Google"})
    assert status == 200 and body == b"FALSE" and headers["Metadata-Flavor"] == "Google"
    etag = headers["ETag"]
    # A stale etag returns at once: asked to wait up to an hour, it answers within
    # the request's 60 s timeout (a hang would time out and fail the test).
    assert http("GET", f"{url}?wait_for_change=true&last_etag=stale&timeout_sec=3600",
                {"Metadata-Flavor": "Google"}, timeout=60)[2] == b"FALSE"
    # The current one hangs until timeout_sec (never less), then answers with no
    # change — not at the server's own limit of an hour (the 60 s request timeout).
    t0 = time.monotonic()
    status, headers, body = http("GET", f"{url}?wait_for_change=true&last_etag={etag}&timeout_sec=1",
                                 {"Metadata-Flavor": "Google"}, timeout=60)
    assert time.monotonic() - t0 >= 0.9 and body == b"FALSE" and headers["ETag"] == etag


@pytest.mark.parametrize("server", ["gcp"], indirect=True)
def test_gce_hanging_get_returns_promptly_on_change(server: NoticeServer):
    w = GceWatcher(server.url, wait_s=60)
    assert w.poll() is None                     # the plain first read: FALSE, and its etag
    key = "GET /computeMetadata/v1/instance/preempted"
    fired_at = []

    def preempt_once_the_get_hangs():
        wait_for(lambda: server.requests.get(key, 0) >= 2, 60, every=0.01)
        fired_at.append(time.monotonic())
        server.preempt()

    preempter = threading.Thread(target=preempt_once_the_get_hangs)
    preempter.start()
    n = w.poll()                                 # hangs until the change
    seen = time.monotonic()
    preempter.join(60)
    assert n is not None and n.kind == "preempt"
    # It returned on the change, not at the end of its 60 s wait.
    assert seen - fired_at[0] < 30
    assert server.requests[key] == 2  # not a busy poll


@pytest.mark.parametrize("server", ["azure"], indirect=True)
def test_azure_headers_other_vms_and_acknowledgement(server: NoticeServer):
    url = f"{server.url}/metadata/scheduledevents"
    assert http("GET", f"{url}?api-version=2020-07-01")[0] == 400
    assert http("GET", url, {"Metadata": "true"})[0] == 400     # no api-version
    status, _, body = http("GET", f"{url}?api-version=2020-07-01", {"Metadata": "true"})
    assert status == 200 and json.loads(body)["Events"] == []

    w = AzureWatcher(server.url)                 # the VM's name comes from IMDS
    assert w.poll() is None and w.vm_name == server.vm_name
    server.preempt(in_s=30, resources=["someone-else"])
    assert w.poll() is None
    server.preempt(in_s=60, resources=["someone-else", server.vm_name], event_type="Freeze")
    n = w.poll()
    assert n.kind == "freeze" and not n.urgent
    server.preempt(in_s=30)
    n = w.poll()
    assert n.kind == "preempt" and n.urgent and n.event_id
    doc = json.loads(http("GET", f"{url}?api-version=2020-07-01", {"Metadata": "true"})[2])
    ours = next(e for e in doc["Events"] if e["EventId"] == n.event_id)
    assert ours["EventType"] == "Preempt" and ours["Resources"] == [server.vm_name]
    assert ours["NotBefore"].endswith("GMT")    # RFC 1123, as documented

    assert w.acknowledge(n)
    assert server.acknowledged == [n.event_id]
    doc2 = json.loads(http("GET", f"{url}?api-version=2020-07-01", {"Metadata": "true"})[2])
    assert doc2["DocumentIncarnation"] > doc["DocumentIncarnation"]
    assert next(e for e in doc2["Events"] if e["EventId"] == n.event_id)["EventStatus"] == "Started"
    assert http("POST", f"{url}?api-version=2020-07-01", {"Metadata": "true"},
                json.dumps({"StartRequests": [{"EventId": "nope"}]}).encode())[0] == 400


# -- an unreachable metadata service ------------------------------------------------------

@pytest.mark.parametrize("provider", PROVIDERS)
def test_unreachable_reads_as_no_notice_logs_once_and_recovers(provider, caplog):
    port = free_port()
    w = watcher_for(provider, f"http://127.0.0.1:{port}", vm_name="geotrain-vm")
    with caplog.at_level(logging.INFO, logger="geotrain.site.preemption"):
        for _ in range(3):
            assert w.poll() is None
        assert not w.healthy and w.failures == 3
        with NoticeServer(provider, port=port) as s:
            s.preempt(in_s=30)
            n = w.poll()
    assert n is not None and n.kind == "preempt" and w.healthy
    messages = [r.getMessage() for r in caplog.records]
    assert sum("unreachable" in m for m in messages) == 1
    assert sum("reachable again" in m for m in messages) == 1


@pytest.mark.timeout(60)
def test_notice_thread_retries_until_the_service_comes_up():
    port = free_port()
    got: list[Notice] = []
    t = NoticeThread(AwsWatcher(f"http://127.0.0.1:{port}"), got.append).start()
    try:
        wait_for(lambda: t.watcher.failures >= 3, 60)  # a few failed polls, backing off
        assert not got and t._thread.is_alive()
        with NoticeServer("aws", port=port) as s:
            s.preempt(in_s=30)
            assert t.fired.wait(60)
    finally:
        t.stop()
    assert [n.kind for n in got] == ["preempt"]


# -- NoticeThread: exactly once, and how fast --------------------------------------------

LATENCY: dict[str, float] = {}
# The request each provider's watcher makes once per poll (GCE: a hanging GET).
POLLED = {"aws": "GET /latest/meta-data/spot/instance-action",
          "gcp": "GET /computeMetadata/v1/instance/preempted",
          "azure": "GET /metadata/scheduledevents"}


@pytest.mark.parametrize("server", PROVIDERS, indirect=True)
def test_notice_thread_calls_back_exactly_once(server: NoticeServer):
    calls: list[tuple[float, Notice]] = []
    t = NoticeThread(watcher(server), lambda n: calls.append((time.monotonic(), n))).start()
    try:
        # A few empty polls (or, on GCE, the plain read and a hanging GET).
        wait_for(lambda: server.requests.get(POLLED[server.provider], 0) >= 2, 60, every=0.05)
        assert not calls
        t0 = time.monotonic()
        server.preempt(in_s=30)
        assert t.fired.wait(60)
        t._thread.join(60)                       # the notice stays up; the thread is done with it
    finally:
        t.stop()
    assert len(calls) == 1 and calls[0][1].kind == "preempt" and t.notice == calls[0][1]
    assert not t._thread.is_alive()
    LATENCY[server.provider] = calls[0][0] - t0
    # How fast is benchmarks/preemption_latency.py's question; here: seen while most
    # of the 30 s notice is left to drain in.
    print(f"\n{server.provider}: notice seen {LATENCY[server.provider] * 1000:.0f} ms after preempt()")
    assert LATENCY[server.provider] < 15


@pytest.mark.parametrize("server", ["aws"], indirect=True)
def test_notice_thread_passes_a_warning_once_and_keeps_watching(server: NoticeServer):
    calls: list[Notice] = []
    t = NoticeThread(watcher(server), calls.append).start()
    key = "GET /latest/meta-data/events/recommendations/rebalance"
    try:
        server.rebalance()
        wait_for(lambda: calls, 60, every=0.05)
        seen_at = server.requests[key]
        wait_for(lambda: server.requests[key] >= seen_at + 2, 60, every=0.05)  # seen twice more
        assert [n.kind for n in calls] == ["rebalance"] and not t.fired.is_set()
        server.preempt(in_s=30)
        assert t.fired.wait(60)
    finally:
        t.stop()
    assert [n.kind for n in calls] == ["rebalance", "preempt"]


@pytest.mark.parametrize("server", ["azure"], indirect=True)
def test_notice_thread_acknowledges_on_request(server: NoticeServer):
    t = NoticeThread(watcher(server)).start()
    try:
        server.preempt(in_s=30)
        assert t.fired.wait(60)
    finally:
        t.stop()
    assert t.acknowledge() and server.acknowledged == [t.notice.event_id]


# -- choosing a watcher --------------------------------------------------------------------

def test_watcher_for_and_the_environment():
    assert watcher_for("local") is None
    assert isinstance(watcher_for("local", "http://127.0.0.1:1"), AwsWatcher)
    assert watcher_for("aws").endpoint == "http://169.254.169.254"
    assert watcher_for("gcp").endpoint == "http://metadata.google.internal"
    az = watcher_for("azure", vm_name="vm-1")
    assert az.endpoint == "http://169.254.169.254" and az.vm_name == "vm-1"
    with pytest.raises(ProviderError, match="valid: local, aws, gcp, azure"):
        watcher_for("oracle")
    assert watch_from_env(environ={}) is None
    assert watch_from_env(environ={"GEOTRAIN_PROVIDER": "local"}) is None
    with NoticeServer("gcp") as s:
        t = watch_from_env(environ={"GEOTRAIN_PROVIDER": "gcp", "GEOTRAIN_METADATA_ENDPOINT": s.url})
        try:
            assert isinstance(t.watcher, GceWatcher) and t.watcher.endpoint == s.url
            s.preempt()
            assert t.fired.wait(60)
        finally:
            t.watcher.wait_s = 1
            t.stop()


def test_notice_server_rejects_unknown_provider_and_serves_control_endpoints():
    with pytest.raises(ValueError, match="valid: aws, gcp, azure"):
        NoticeServer("oracle")
    with NoticeServer("gcp") as s:
        secret = {"X-Geotrain-Secret": s.control_secret}
        assert http("POST", f"{s.url}/_geotrain/rebalance", secret)[0] == 400
        assert http("POST", f"{s.url}/_geotrain/preempt?in_s=10", secret)[0] == 200
        assert http("GET", f"{s.url}/computeMetadata/v1/instance/preempted",
                    {"Metadata-Flavor": "Google"})[2] == b"TRUE"


# -- a real site agent drains on a notice ------------------------------------------------

AGENT_RECIPE = """\
name: preempt
model: {preset: tiny, n_layer: 2, d_model: 64, n_head: 4}
train: {rounds: 2, inner_steps: 1000000, batch_size: 4, seq_len: 64, lr: 4.0e-3, warmup_steps: 5}
sites:
  - {name: a, provider: local}
"""


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_site_agent_marks_itself_preempting_and_leaves(tmp_path, geotrain_home, monkeypatch):
    from geotrain import recipe, runs
    from providers import SitePlan, local
    from geotrain.store import RunStore, run_url

    path = tmp_path / "preempt.yaml"
    path.write_text(AGENT_RECIPE)
    r = recipe.load(path)
    run_id = runs.create_run(r, str(path), geotrain_home)
    store_url = run_url(r.store_root(), run_id)
    store = RunStore(store_url)
    # The local provider serves each site's own metadata endpoint (IMDSv2 format);
    # local.preempt announces a notice there, and the agent's real watcher sees it.
    monkeypatch.delenv("GEOTRAIN_PROVIDER", raising=False)
    nodes = local.launch(SitePlan(run_id, "a", "local", store_url,
                                  options=(("log_dir", str(tmp_path / "logs")),
                                           control_key_option(geotrain_home, run_id)),
                                  member_key=member_key_of(geotrain_home, run_id, "a")))
    try:
        wait_for(lambda: (store.heartbeat("a") or {}).get("state") == "training", 120)
        from geotrain import procs

        temp = Path(procs.tags(nodes[0].pid)["GEOTRAIN_TEMP_DIR"])  # mkdtemp'ed
        assert temp.is_dir() and temp.parent.stat().st_mode & 0o077 == 0  # under an owner-only dir
        t0 = time.time()
        local.preempt(run_id, "a", notice_s=30)  # with the site's notice secret
        t1 = time.time()
        hb = wait_for(lambda: (b := store.heartbeat("a")) and b["state"] == "preempting" and b, 60)
        print(f"\nagent: 'preempting' heartbeat {hb['at'] - t0:.2f} s after preempt()")
        # 30 s after the notice was posted, to the second (the IMDS format rounds down).
        assert hb["notice"] == "preempt" and t0 + 29 <= hb["deadline"] <= t1 + 30
        proc = local._children[nodes[0].pid]
        assert proc.wait(timeout=90) == 0
        assert not temp.exists()  # the agent removed its temp dir as it left
    finally:
        local.terminate(nodes)
    events = [e for e in store.events(["a"]) if e["kind"] == "preempting"]
    assert len(events) == 1 and events[0]["provider"] == "aws" and events[0]["notice"] == "preempt"
    # It published what it could: round 1 so far, fewer than its inner steps (a
    # million: no machine ends that round while this test runs).
    assert store.contributions(1) == ["a"]
    partial = store.contribution_meta(1, "a")
    assert 0 < partial["inner_steps"] < 1000000 and partial["tokens"] == partial["inner_steps"] * 4 * 64
    assert local.processes(run_id) == []
