"""Chaos with real local sites: kill -9 a site, the controller, or everything;
preempt a site; move a site and the store while the run goes on — and check that
nothing committed is lost.

Every test asserts the same invariants at the end: all configured rounds
complete; committed rounds are 0..R with no gap and no duplicate; at every
round every site that reported a hash reported the committed one; no process
of the run is left on the machine.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from geotrain.store import RunStore
from tests.helpers import geotrain_cmd, geotrain_home, tagged_processes, wait_for  # noqa: F401

pytestmark = [pytest.mark.slow, pytest.mark.timeout(480)]

ROUNDS = 10
RECIPE = f"""\
name: chaos
model: {{preset: tiny, n_layer: 2, d_model: 64, n_head: 4}}
train: {{rounds: {ROUNDS}, inner_steps: 10, batch_size: 4, seq_len: 64, lr: 3.0e-3, warmup_steps: 5}}
sites:
  - {{name: a, provider: local}}
  - {{name: b, provider: local}}
"""

# Runs that must outlive an event (a replacement's Ray start, a migration, a
# resume) are given far more rounds than any machine could train while the test
# waits, and are ended with `geotrain finish` once the event has happened: they
# last exactly as long as the test needs, on an idle machine as on a loaded one.
OPEN_ENDED = 100_000
# How long a test waits for something that takes seconds here (a site's Ray
# start, a round): generous, so only a real hang fails it.
PATIENCE_S = 300


def cli(home: Path, *args: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess:
    out = subprocess.run(geotrain_cmd(*args), capture_output=True, text=True, timeout=timeout,
                         env=dict(os.environ, GEOTRAIN_HOME=str(home)))
    if check and out.returncode != 0:
        raise AssertionError(f"geotrain {' '.join(args)} exited {out.returncode}:\n"
                             f"{out.stdout[-2000:]}{out.stderr[-4000:]}")
    return out


def status(home: Path, run: str) -> dict:
    return json.loads(cli(home, "status", run, "--json").stdout)


def launch_detached(tmp_path: Path, home: Path, rounds: int = ROUNDS, inner_steps: int = 10,
                    sync: str = "") -> str:
    """A detached 2-site run (OPEN_ENDED rounds: it runs until `finish_run`)."""
    recipe = tmp_path / "chaos.yaml"
    recipe.write_text(RECIPE.replace(f"rounds: {ROUNDS},", f"rounds: {rounds},")
                      .replace("inner_steps: 10,", f"inner_steps: {inner_steps},")
                      + (f"sync: {{{sync}}}\n" if sync else ""))
    return json.loads(cli(home, "launch", str(recipe), "--detach", "--json").stdout)["run"]


def finish_run(home: Path, run: str) -> int:
    """End an open-ended run at the next round boundary; returns its last round."""
    out = cli(home, "finish", run, "--no-wait", "--json", timeout=PATIENCE_S, check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    return json.loads(out.stdout)["at_round"]


def wait_event(store_of, kind: str, site: str | None = None, since: float = 0.0,
               timeout: float = PATIENCE_S) -> dict:
    """The first controller event of `kind` (for `site`) at or after `since`."""
    def found():
        store = store_of()
        return next((e for e in controller_events(store) if e["kind"] == kind and e["at"] >= since
                     and (site is None or e.get("site") == site)), None)
    return wait_for(found, timeout=timeout, every=0.5)


def committed(run_store: RunStore) -> int:
    return len(run_store.committed_rounds()) - 1


def assert_nothing_lost(home: Path, run: str, rounds: int = ROUNDS) -> RunStore:
    s = wait_for(lambda: (x := status(home, run))["state"] != "running" and x, timeout=PATIENCE_S, every=1)
    assert s["state"] == "succeeded", s
    store = RunStore(s["store"])
    assert store.committed_rounds() == list(range(rounds + 1))  # no gap, no duplicate
    for r in range(1, rounds + 1):
        manifest = store.global_manifest(r)
        results = store.results(r)
        assert results and {v["hash"] for v in results.values()} == {manifest["hash"]}, r
        assert store.members(r)["round"] == r
    final = store.read_final()
    assert final["rounds"] == rounds and final["hash"] == store.global_manifest(rounds)["hash"]
    wait_for(lambda: tagged_processes(run) == [], timeout=60)
    return store


def controller_events(store: RunStore) -> list[dict]:
    return [e for e in store.events([]) if e["source"] == "controller"]


def timeline(store: RunStore, sites: list[str]) -> str:
    """Every event of the run, in order, for a failure message."""
    events = sorted(store.events(sites), key=lambda e: e["at"])
    t0 = events[0]["at"] if events else 0
    return "\n".join(f"{e['at'] - t0:7.2f} {e['source']:>10} {e['kind']:<14} {e.get('message', '')[:90]}"
                     for e in events)


def test_a_site_killed_then_one_preempted_are_each_replaced_once(tmp_path: Path, geotrain_home: Path):
    # One run, two losses in turn (each its own replacement, the other site training on):
    # site a is killed -9 mid-round, then site b gets a preemption notice. The global state
    # is committed every 4th round only: each replacement starts from the newest one and
    # replays the rounds since from their contributions.
    from providers import local

    run = launch_detached(tmp_path, geotrain_home, rounds=OPEN_ENDED, inner_steps=30,
                          sync="state_every: 4")
    s = wait_for(lambda: (x := status(geotrain_home, run))["rounds_done"] >= 2 and x, timeout=PATIENCE_S)
    store = RunStore(s["store"])
    victim = next(site for site in s["sites"] if site["name"] == "a")["pid"]
    killed_at = time.time()
    os.kill(victim, signal.SIGKILL)
    killed = wait_event(lambda: store, "site-lost", "a", since=killed_at)
    rejoined = wait_event(lambda: store, "site-rejoined", "a", since=killed_at)

    noticed_at = time.time()
    # A notice period longer than any wait here: the site must act on the notice
    # itself (drain and leave), not be killed when the period runs out.
    local.preempt(run, "b", notice_s=PATIENCE_S)
    preempted = wait_event(lambda: store, "site-lost", "b", since=noticed_at)
    wait_event(lambda: store, "site-rejoined", "b", since=noticed_at)
    last = finish_run(geotrain_home, run)
    store = assert_nothing_lost(geotrain_home, run, rounds=last)
    # Both replacements trained to the end: their work is in the last round.
    assert {e["site"] for e in store.members(last)["accepted"] if e["round"] == last} == {"a", "b"}, \
        timeline(store, ["a", "b"])
    events = controller_events(store)
    for site in ("a", "b"):
        kinds = [e["kind"] for e in events if e.get("site") == site]
        assert kinds.count("site-lost") == kinds.count("site-replaced") == 1, timeline(store, ["a", "b"])
    # The kill was found from the dead process (the provider's view), not by waiting out
    # a timeout: far sooner than sync.boot_timeout_s (1800 s) or a round's window (600 s).
    assert killed["at"] - killed_at <= 60.0, "loss detected from a timeout, not from the dead node"
    assert killed["reason"] == "node gone", killed
    assert rejoined["seconds"] > 0
    # The preempted site said so and was declared lost from its notice, while the notice
    # period still ran, not from the kill at its end.
    assert any(e["kind"] == "preempting" and e["notice"] == "preempt" and e["at"] >= noticed_at
               for e in store.events(["b"]))
    assert preempted["reason"] == "preempted" and preempted["at"] - noticed_at < PATIENCE_S
    with_state = [r for r in store.committed_rounds() if "model.safetensors" in store.read_global(r)[0]]
    assert with_state == [r for r in range(last + 1) if r % 4 == 0 or r == last]
    print(f"\nkill: detection {killed['at'] - killed_at:.2f} s, loss -> replacement's first step "
          f"{rejoined['seconds']:.1f} s; notice -> declared lost {preempted['at'] - noticed_at:.2f} s; "
          f"finished at round {last}")


def test_kill_9_the_controller_then_everything_resuming_each_time(tmp_path: Path, geotrain_home: Path):
    run = launch_detached(tmp_path, geotrain_home, rounds=OPEN_ENDED)
    s = wait_for(lambda: (x := status(geotrain_home, run))["rounds_done"] >= 2 and x, timeout=PATIENCE_S)
    store = RunStore(s["store"])

    # 1. The controller alone dies. The sites do not need it: they go on meeting
    # through the store, and a resume adopts both, launching nothing.
    os.kill(s["controller_pid"], signal.SIGKILL)
    before = committed(store)
    wait_for(lambda: committed(store) > before, timeout=PATIENCE_S)
    resumed_at = time.time()
    out = cli(geotrain_home, "resume", run, "--detach", "--json", timeout=PATIENCE_S, check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    wait_event(lambda: store, "resumed", since=resumed_at)
    for site in ("a", "b"):
        wait_event(lambda: store, "site-adopted", site, since=resumed_at)

    # 2. Everything dies: the controller, every site's agent, Ray and workers (the
    # machine is gone). A resume launches both sites again, from the newest committed round.
    s = wait_for(lambda: (x := status(geotrain_home, run))["rounds_done"] >= before + 2 and x,
                 timeout=PATIENCE_S)
    os.kill(s["controller_pid"], signal.SIGKILL)
    for pid in tagged_processes(run):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    wait_for(lambda: tagged_processes(run) == [], timeout=PATIENCE_S)
    at_death, died_at = committed(store), time.time()
    out = cli(geotrain_home, "resume", run, "--detach", "--json", timeout=PATIENCE_S, check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    for site in ("a", "b"):
        wait_event(lambda: store, "site-launched", site, since=died_at)
    wait_for(lambda: committed(store) > at_death, timeout=PATIENCE_S)
    last = finish_run(geotrain_home, run)
    store = assert_nothing_lost(geotrain_home, run, rounds=last)

    events = controller_events(store)
    adopted = [e for e in events if resumed_at <= e["at"] < died_at]
    assert sorted(e["site"] for e in adopted if e["kind"] == "site-adopted") == ["a", "b"]
    assert not [e for e in adopted if e["kind"] in ("site-launched", "site-lost", "site-replaced")], \
        timeline(store, ["a", "b"])
    relaunched = [e for e in events if e["at"] >= died_at]
    assert "resumed" in [e["kind"] for e in relaunched]
    assert sorted(e["site"] for e in relaunched if e["kind"] == "site-launched") == ["a", "b"]
    assert not [e for e in relaunched if e["kind"] == "site-adopted"]
    assert at_death >= 4 and last > at_death


@pytest.mark.timeout(900)
def test_move_the_store_between_backends_then_migrate_a_site_while_the_run_goes_on(
        tmp_path: Path, geotrain_home: Path, store_urls):
    # Endpoints of moto S3 and Azurite are set in this process's environment, which the
    # detached controller and its sites inherit. First the store moves file -> s3 -> az
    # (each move copies the whole store while the run goes on: done early, while it is
    # small), then site a moves to another local region (make-before-break);
    # copying into and out of gs:// is tests/test_store_backends.py's, and a run on a gs://
    # store is tests/test_boot_gcp.py's.
    targets = [store_urls("s3"), store_urls("az")]
    run = launch_detached(tmp_path, geotrain_home, OPEN_ENDED, inner_steps=30)
    wait_for(lambda: status(geotrain_home, run)["rounds_done"] >= 2, timeout=PATIENCE_S)
    first = status(geotrain_home, run)["store"]
    moves = []
    for url in targets:
        out = cli(geotrain_home, "migrate", run, "--store", url, "--json", timeout=PATIENCE_S, check=False)
        assert out.returncode == 0, out.stdout + out.stderr
        moves.append(json.loads(out.stdout))
        assert status(geotrain_home, run)["store"] == url
    out = cli(geotrain_home, "migrate", run, "--site", "a", "--to", "local:west", "--json",
              timeout=PATIENCE_S * 2, check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    moved = json.loads(out.stdout)
    assert moved["kind"] == "site-migrated" and moved["member"] == "a~1"
    assert moved["downtime_s"] == 0.0 and moved["overlap_s"] > 0  # make-before-break

    last = finish_run(geotrain_home, run)
    store = assert_nothing_lost(geotrain_home, run, last)  # checked in the last store, az://
    assert store.url == targets[-1]

    joined = [r for r in range(1, last + 1)
              if any(e["site"] == "a~1" for e in store.members(r)["accepted"])]
    assert joined and joined[-1] == last  # the new member trained to the end
    left = [r for r in range(1, last + 1) if any(e["site"] == "a" for e in store.members(r)["accepted"])]
    assert left and max(left) < last  # the old member left, after the new one joined
    s = status(geotrain_home, run)
    assert next(x for x in s["sites"] if x["name"] == "a")["region"] == "west"

    ats = [m["at_round"] for m in moves]
    assert ats == sorted(ats) and all(1 < a <= last for a in ats)
    # Every old store is left intact, with every round it had committed.
    for old, move in zip([first, *targets[:-1]], moves):
        kept = RunStore(old).committed_rounds()
        assert kept == list(range(len(kept))) and len(kept) >= move["at_round"]
    print(f"\nmigration: joined after {moved['join_s']:.1f} s, done in {moved['seconds']:.1f} s, "
          f"downtime {moved['downtime_s']:.1f} s, overlap {moved['overlap_s']:.1f} s; store moves: "
          + ", ".join(f"{m['previous'].split(':')[0]}->{m['store'].split(':')[0]} "
                      f"at round {m['at_round']} in {m['seconds']:.1f} s" for m in moves))


def test_bursts_of_store_errors(tmp_path: Path, geotrain_home: Path, monkeypatch: pytest.MonkeyPatch):
    # Every store client of the run — controller, agents, trainers — inherits the plan:
    # 5 % of calls start a burst of up to 3 failures (errors real backends raise).
    monkeypatch.setenv("GEOTRAIN_STORE_FAULTS", "rate=0.05,burst=3,seed=11")
    run = launch_detached(tmp_path, geotrain_home)
    monkeypatch.delenv("GEOTRAIN_STORE_FAULTS")
    store = assert_nothing_lost(geotrain_home, run)
    done = [e for e in store.events(["a", "b"]) if e["kind"] == "done"]
    # Each site finished with faults injected into its store calls; a site lost to them
    # and replaced finishes once per incarnation, so there may be more than two.
    assert {e["source"] for e in done} == {"a", "b"}, done
    assert all(e["store_faults_injected"] > 0 for e in done), done
    starting = [e for e in store.events(["a", "b"]) if e["kind"] == "starting"]
    assert all(e["store_settings"]["faults"]["source"] == "GEOTRAIN_STORE_FAULTS" for e in starting)
