"""A hostile writer of the run store, through the CLI (issue 12).

While a two-site local run trains, a writer with nothing but access to the
run's prefix (what any node of any site has) does what it can:

- contributions to every open round from non-members and migrated-member
  names with NaN or 1e30 tokens, wrong shapes, unknown tensors, a
  decompression bomb, a top-k payload declaring a huge count, a 1e6x update
  (none signed by a member of the run's roster);
- a `stop` for both sites, unsigned; a `drain` MAC'ed with another site's
  secret; the last round set to 2 (`control/finish.json`), unsigned; a store
  switch to a store it controls, with that store marked ready; a head record
  for site a naming its own address; run.json replaced by a recipe of its own;
  a decision for every round, planted before the sites decide it, that leaves
  their work out, and a forged eval for every round.

The run must finish every round, with the loss of a clean run of the same
recipe (the same bits, since every forged thing is ignored), and its events
must say what was rejected and why.

    python -m pytest tests/test_hostile_control.py -q
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from geotrain.store import RunStore
from geotrain.store.control import ControlKey, SiteKey
from geotrain.store.decisions import slot_key
from geotrain.sync.diloco import decode
from tests.helpers import control_key_option, geotrain_home, tagged_processes, wait_for  # noqa: F401
from tests.test_chaos import PATIENCE_S, cli, status
from tests.test_hostile_contributions import hostile_contributions

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

ROUNDS = 8
RECIPE = f"""\
name: {{name}}
model: {{{{preset: tiny, n_layer: 2, d_model: 64, n_head: 4}}}}
train: {{{{rounds: {ROUNDS}, inner_steps: 20, batch_size: 4, seq_len: 64, lr: 3.0e-3, warmup_steps: 5}}}}
sites:
  - {{{{name: a, provider: local}}}}
  - {{{{name: b, provider: local}}}}
"""


def launch(tmp_path: Path, home: Path, name: str) -> str:
    recipe = tmp_path / f"{name}.yaml"
    recipe.write_text(RECIPE.format(name=name))
    return json.loads(cli(home, "launch", str(recipe), "--detach", "--json").stdout)["run"]


def finished(home: Path, run: str) -> dict:
    return wait_for(lambda: (x := status(home, run))["state"] != "running" and x,
                    timeout=PATIENCE_S, every=1)


def forge_control(store: RunStore, evil_url: str) -> None:
    """Every control record a writer of the store can forge."""
    # It holds no control key, and a site secret that is not a's: what it signs verifies nowhere.
    forger = RunStore(store.url, control=None, site_key=SiteKey("not-a's-secret"))
    now = time.time()
    for site in ("a", "b"):
        forger.put_json(f"sites/{site}/commands/{time.time_ns()}-stop",
                        {"command": "stop", "site": site, "at": now})
    forger.send_command("a", "drain")
    forger.request_finish(2)
    forger.request_switch(evil_url, 2)
    RunStore(evil_url, control=None, site_key=None).mark_switch_ready(2)
    forger.put_head("a", "10.9.9.9:6379", "up")
    info = json.loads(store.get("run.json"))
    info["body"]["recipe"]["train"]["entrypoint"] = "evil:main"
    forger.put_json("run.json", info)


def intrude(store: RunStore, evil_url: str, stop: threading.Event, did: dict) -> None:
    """Bad contributions into each open round from the start; the forged control
    records once both sites train (a record older than a site's start is ignored
    whatever its signature, so they come after). `did` says what it got to do."""
    try:
        bad = hostile_contributions(decode(store.read_global(0)[0]["model.safetensors"]))
        for q in range(1, ROUNDS + 1):  # unsigned decisions that drop both sites' work
            drop = [{"site": s, "round": q, "reason": "forged"} for s in ("a", "b")]
            did.setdefault("planted", []).append(q) if store.create(slot_key(q, 0), json.dumps(
                {"round": q, "accepted": [], "rejected": drop, "decided_by": "a"}).encode()) else None
        r = 1
        while r <= ROUNDS and not stop.is_set():
            if "forged_at" not in did and all((store.heartbeat(s) or {}).get("state") == "training"
                                              for s in ("a", "b")):
                forge_control(store, evil_url)
                did["forged_at"] = time.time()
            if r == 1 or store.members(r - 1) is not None:
                for name, (payload, meta) in bad.items():
                    store.put_contribution(r, name, payload, dict(meta, published_at=time.time()))
                store.put_eval(r - 1, {"eval_loss": 0.001, "by": "a"})
                did["rounds"] = r
                r += 1
            time.sleep(0.05)
    except Exception as e:  # noqa: BLE001 - the test says what stopped the intruder
        did["error"] = repr(e)


def test_a_hostile_writer_changes_nothing(tmp_path: Path, geotrain_home: Path):
    clean = finished(geotrain_home, launch(tmp_path, geotrain_home, "clean"))
    assert clean["state"] == "succeeded", clean

    run = launch(tmp_path, geotrain_home, "hostile")
    # Read as a site reads it (with the run's public control key); written as a forger.
    public = ControlKey.from_public(control_key_option(geotrain_home, run)[1])
    store = RunStore(status(geotrain_home, run)["store"], control=public, site_key=None,
                     member_key=None)
    evil_url = "file://" + str(tmp_path / "evil-store")
    done, did = threading.Event(), {}
    thread = threading.Thread(target=intrude, args=(store, evil_url, done, did), daemon=True)
    thread.start()
    try:
        s = finished(geotrain_home, run)
    finally:
        done.set()
        thread.join(30)

    assert "error" not in did and "forged_at" in did, did  # the intruder did all it meant to
    events = store.events(["a", "b"])
    timeline = "\n".join(f"{e['source']:>10} {e['kind']:<14} {e.get('message', '')[:100]}"
                         for e in events)
    assert s["state"] == "succeeded", timeline
    assert s["rounds_done"] == s["rounds_total"] == ROUNDS, timeline  # not ended at round 2
    assert s["store"] == store.url  # not moved
    assert store.committed_rounds() == list(range(ROUNDS + 1))
    assert not RunStore(evil_url).rounds_started()  # nothing was published to the forger's store
    # Neither site was stopped, drained or replaced; both trained every round.
    assert not [e for e in events if e["kind"] in ("stopped", "preempting", "site-replaced",
                                                   "site-lost", "failed")], timeline
    for r in range(1, ROUNDS + 1):
        assert sorted(e["site"] for e in store.members(r)["accepted"]) == ["a", "b"], r
        hashes = {v["hash"] for v in store.results(r).values()}
        assert hashes == {store.global_manifest(r)["hash"]}, r
    # The forged run.json was put back by the controller.
    assert any(e["kind"] == "restored" and e["source"] == "controller" for e in events), timeline
    assert "evil:main" not in store.get("run.json").decode()
    # Every bad contribution was rejected, with its reason, in the events.
    rejected = {e["site"]: e["reason"] for e in events if e["kind"] == "rejected"}
    assert set(rejected) == {"mallory", "a~7", "b~7", "a~8", "a~9", "b~8", "b~9", "b~6"}, rejected
    assert "not a site of this run" in rejected["mallory"]
    # Migrated-member names the run never had: nobody on the roster signed them (what each
    # payload would fail next, a bomb, a shape, NaN tokens, is tests/test_hostile_contributions.py).
    assert all("not signed by" in rejected[n] for n in rejected if n != "mallory"), rejected
    # Each planted decision was passed over (reported) and the sites decided in the next slot.
    passed = {e["round"] for e in events if e["kind"] == "rejected-decision" and e["slot"] == 0}
    assert did["planted"] and set(did["planted"]) <= passed, (did["planted"], timeline)
    assert all(h["eval_loss"] != 0.001 for h in store.read_final()["history"])  # no forged eval
    # The loss of a clean run of the same recipe: nothing forged changed a bit.
    assert s["eval_loss"] == pytest.approx(clean["eval_loss"], rel=0.02)
    wait_for(lambda: tagged_processes(run) == [], timeout=60)
