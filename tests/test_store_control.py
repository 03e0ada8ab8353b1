"""What a writer of the run store cannot forge (geotrain/store/control.py,
geotrain/store/run.py, geotrain/store/records.py).

Three parties share one file:// store here, as they would share a bucket: the
operator (the run's control key with its private half), a node of site `a`
(the public half and a's secret) and an intruder (any other writer: a node of
site `b`, or anyone with write access to the run's prefix). What the
intruder writes is read as absent; what the operator and a's own nodes write
counts.

    python -m pytest tests/test_store_control.py -q
"""

import json
import time
from pathlib import Path

import pytest

from geotrain.errors import StoreError
from geotrain.state import StateDB
from geotrain.store import RunStore
from geotrain.store.control import ControlKey, ForgedRecord, SiteKey
from geotrain.store.records import Heartbeat, Liveness, parse

pytestmark = pytest.mark.timeout(30)


MEMBERS = {"a": ControlKey.generate(), "b": ControlKey.generate()}


@pytest.fixture
def parties(tmp_path: Path):
    url = "file://" + str(tmp_path / "run")
    key = ControlKey.generate()
    operator = RunStore(url, control=key, site_key=None, member_key=None)
    operator.write_roster({m: k.public_text() for m, k in MEMBERS.items()})
    public = ControlKey.from_public(key.public_text())
    node_a = RunStore(url, control=public, site_key=SiteKey("secret-of-a"), member_key=MEMBERS["a"])
    node_a2 = RunStore(url, control=public, site_key=SiteKey("secret-of-a"), member_key=MEMBERS["a"])
    # A node of site b: b's secret and b's member key.
    intruder = RunStore(url, control=public, site_key=SiteKey("secret-of-b"), member_key=MEMBERS["b"])
    return operator, node_a, node_a2, intruder


def test_a_signature_binds_key_kind_and_body():
    key = ControlKey.generate()
    rec = key.sign("stop", {"site": "a", "at": 1.0})
    public = ControlKey.from_public(key.public_text())
    assert public.open(rec, "stop") == {"site": "a", "at": 1.0}
    assert ControlKey.from_private(key.private_text()).public_text() == key.public_text()
    with pytest.raises(ForgedRecord, match="bad signature"):
        ControlKey.generate().open(rec, "stop")  # another run's key
    with pytest.raises(ForgedRecord, match="'finish'"):
        public.open(rec, "finish")  # moved to another kind
    with pytest.raises(ForgedRecord, match="bad signature"):
        public.open(dict(rec, body={"site": "b", "at": 1.0}), "stop")  # body changed
    with pytest.raises(ForgedRecord, match="unsigned"):
        public.open({k: v for k, v in rec.items() if k != "sig"}, "stop")
    with pytest.raises(ForgedRecord, match="base64"):
        public.open(dict(rec, sig="!!"), "stop")
    with pytest.raises(ForgedRecord):
        public.open([1, 2], "stop")
    with pytest.raises(ForgedRecord, match="only the operator"):
        public.sign("stop", {})  # a node holds no private half
    site = SiteKey("t")
    assert site.open(site.sign("head", {"x": 1}), "head") == {"x": 1}
    with pytest.raises(ForgedRecord, match="bad MAC"):
        SiteKey("u").open(site.sign("head", {"x": 1}), "head")


def test_run_json_counts_only_as_the_operator_signed_it(parties):
    operator, node, _, intruder = parties
    operator.write_run({"id": "r1", "recipe": {"sites": [{"name": "a"}]}})
    assert node.read_run()["id"] == "r1"
    with pytest.raises(ForgedRecord):
        intruder.write_run({"id": "r1", "recipe": {"train": {"entrypoint": "evil:main"}}})
    intruder.put_json("run.json", {"id": "r1", "recipe": {"train": {"entrypoint": "evil:main"}}})
    with pytest.raises(StoreError, match="not the one the operator launched"):
        node.read_run()
    # A reader without a key (a user's script, the operator's tools) trusts its store.
    assert RunStore(operator.url, control=None, site_key=None).read_run()["id"] == "r1"


def test_stop_only_from_the_controller_and_drain_only_from_the_site(parties):
    operator, node, node2, intruder = parties
    t0 = time.time()
    with pytest.raises(ForgedRecord):
        intruder.send_command("a", "stop")  # a node cannot sign for the controller
    # Written by hand: unsigned, and a drain MAC'ed with another site's secret.
    intruder.put_json(f"sites/a/commands/{time.time_ns()}-stop",
                      {"command": "stop", "site": "a", "at": time.time()})
    intruder.send_command("a", "drain")
    # A stop signed for b, copied under a's commands, names b: not a's.
    operator.send_command("b", "stop")
    for name in intruder.listdir("sites/b/commands"):
        intruder.put(f"sites/a/commands/{name}", intruder.get(f"sites/b/commands/{name}"))
    assert node.commands("a") == []
    assert not node.commanded("a", "stop", since=t0)

    node.send_command("a", "drain")  # the agent asks its trainer (another node of a)
    operator.send_command("a", "stop")
    assert [c.command for c in node2.commands("a")] == ["drain", "stop"]
    assert node2.commanded("a", "stop", since=t0)
    # An old stop (an earlier incarnation's) does not stop a site started after it.
    assert not node2.commanded("a", "stop", since=time.time() + 1)


def test_finish_only_as_the_operator_signed_it(parties):
    operator, node, _, intruder = parties
    intruder.put_json("control/finish.json", {"at_round": 2, "at": time.time()})
    assert node.finish_round() is None
    with pytest.raises(ForgedRecord):
        intruder.request_finish(2)
    operator.request_finish(7)
    assert node.finish_round() == 7
    raw = json.loads(node.get("control/finish.json"))
    raw["body"]["at_round"] = 2  # tampered
    intruder.put_json("control/finish.json", raw)
    assert node.finish_round() is None


def test_switch_only_signed_from_this_store_and_not_stale(parties, tmp_path: Path):
    operator, node, _, intruder = parties
    new_url = "file://" + str(tmp_path / "new")
    intruder.put_json("control/switch.json", {"to": "file:///evil", "from": node.url,
                                              "at_round": 3, "at": time.time()})
    assert node.switch_request() is None
    assert not node.follow_switch()

    operator.request_switch(new_url, 3)
    req = node.switch_request()
    assert (req.to, req.from_, req.at_round) == (new_url, node.url, 3)
    # The new store is not ready until the operator says so, and only the operator can.
    assert not node.follow_switch()
    new_by_intruder = RunStore(new_url, control=intruder.control, site_key=None, member_key=None)
    new_by_intruder.put_json("control/switch_ready.json", {"at_round": 3, "at": time.time()})
    assert not node.follow_switch()
    RunStore(new_url, control=operator.control, site_key=None, member_key=None).mark_switch_ready(3)
    assert not node.follow_switch(before_round=2)  # only before publishing round 3
    assert node.follow_switch(before_round=3)
    assert node.url == new_url and node.control is not None

    # Replayed elsewhere: the signed record names the store it moves from.
    other = RunStore("file://" + str(tmp_path / "other"), control=node.control, site_key=None,
                     member_key=None)
    other.put("control/switch.json", intruder.get("control/switch.json"))
    assert other.switch_request() is None
    # Replayed later in the old store: it already committed the round the switch named.
    operator.commit_global(3, {}, {"hash": "h"})
    assert RunStore(operator.url, control=node.control, site_key=None,
                    member_key=None).switch_request() is None


def test_head_record_only_from_the_site_and_private(parties):
    operator, node, node2, intruder = parties
    intruder.put_head("a", "10.0.0.66:6379", "up")  # b's secret
    intruder.put_json("sites/a/head.json", {"site": "a", "address": "10.0.0.66:6379",
                                            "state": "up", "at": time.time()})
    assert node2.head("a") is None
    node.put_head("a", "10.0.0.5:6379", "up")
    head = node2.head("a")
    assert (head.address, head.state) == ("10.0.0.5:6379", "up")
    node.put_head("a", "35.186.0.9:6379", "up")  # a public address: never joined
    assert node2.head("a") is None
    node.put_head("b", "10.0.0.7:6379", "up")  # a record for another site, copied over
    intruder.put("sites/a/head.json", intruder.get("sites/b/head.json"))
    assert node2.head("a") is None


@pytest.mark.parametrize("record", [
    {"site": "a", "state": "training", "at": float("nan")},
    {"site": "a", "state": "dancing", "at": 1.0},
    {"site": "a", "state": "training", "at": "1"},
    {"site": "a", "state": "training", "at": 1.0, "round": -1, "training_round": -1},
    {"site": "a", "state": "training", "at": 1.0, "step": True, "pid": True},
    {"site": "../x", "state": "training", "at": 1.0},
    [1, 2, 3],
])
def test_a_malformed_beat_is_absent(parties, record):
    operator, node, _, intruder = parties
    assert parse(Heartbeat, record, "test") is None
    assert parse(Liveness, record, "test") is None
    intruder.put("sites/a/heartbeat", json.dumps(record).encode())
    intruder.put("sites/a/alive", json.dumps(record).encode())
    assert node.heartbeat("a") is None
    assert "a" not in node.liveness()


def test_liveness_is_kept_under_the_name_it_was_written_for(parties):
    _, node, _, intruder = parties
    node.alive("a", "running", pid=1)
    intruder.put("sites/c/alive", intruder.get("sites/a/alive"))  # copied under another name
    intruder.put("sites/b/alive", intruder.get("sites/a/alive"))  # a's record as b's
    assert set(node.liveness()) == {"a"}


def test_a_member_speaks_only_for_itself(parties):
    """Heartbeats, liveness, contribution manifests and results count only when signed
    with the key of the member they name (the roster), whoever else writes them."""
    operator, node, node2, intruder = parties  # intruder: a node of b, with b's key
    node.beat("a", {"state": "training", "round": 3})
    node.alive("a", "training", training_round=4)
    node.put_contribution(4, "a", b"payload", {"tokens": 64})
    node.put_result(3, "a", {"hash": "a" * 64})
    assert node2.heartbeat("a")["round"] == 3 and node2.liveness()["a"]["training_round"] == 4
    assert node2.contribution_meta(4, "a")["tokens"] == 64
    assert node2.results(3)["a"]["hash"] == "a" * 64
    assert operator.heartbeat("a")["state"] == "training"  # the controller checks them too

    # b's node speaking for a: signed with b's key, so none of it is a's.
    intruder.beat("a", {"state": "failed", "error": "forged"})
    intruder.alive("a", "done")
    intruder.put_contribution(4, "a", b"poison", {"tokens": 64})
    intruder.put_result(3, "a", {"hash": "0" * 64})
    assert node2.heartbeat("a") is None and "a" not in node2.liveness()
    with pytest.raises(StoreError, match="not signed by a"):
        node2.contribution_meta(4, "a")
    assert "a" not in node2.results(3)
    # b speaking for itself counts; a name not on the roster never does, nor a forged roster.
    intruder.beat("b", {"state": "training"})
    assert node2.heartbeat("b")["state"] == "training"
    mallory = ControlKey.generate()
    forger = RunStore(node.url, control=node.control, site_key=None, member_key=mallory)
    forger.put_json("control/roster.json", {"members": {"mallory": mallory.public_text()}})
    forger.beat("mallory", {"state": "training"})
    assert node2.heartbeat("mallory") is None
    # The controller marks a member it replaced with that member's key.
    operator.beat("a", {"state": "replaced", "replacement": 1}, signer=MEMBERS["a"])
    assert node2.heartbeat("a")["state"] == "replaced"
    # A reader without the run's control key (a user's own script) trusts its store.
    keyless = RunStore(node.url, control=None, site_key=None, member_key=None)
    assert keyless.heartbeat("a")["state"] == "replaced" and keyless.results(3)["a"]


def test_cli_requests_reach_the_controller_once_through_the_state_db(tmp_path: Path):
    db = StateDB(tmp_path / "home")
    at = db.add_request("r1", "migrate-site", target="a", to="local")
    db.add_request("r2", "finish")
    assert db.take_requests("r1") == [{"kind": "migrate-site", "target": "a", "to": "local",
                                       "at": at}]
    assert db.take_requests("r1") == []
    assert [r["kind"] for r in db.take_requests("r2")] == ["finish"]
    assert (tmp_path / "home" / "state.db").stat().st_mode & 0o077 == 0
