"""Tests of the run store (geotrain/store/) on every backend: file://, S3 (a
moto server), GCS (gcp-storage-emulator) and Azure Blob (Azurite).

The core tests run once per backend, each store built with `RunStore(url)`
alone (the emulators are reached through the libraries' own environment
variables, see tests/emulators.py); crash and corruption tests write the
leftovers a crashed or faulty writer would leave and check that no reader
ever takes them for committed state.

    python -m pytest tests/test_store.py -q
"""

import json
import os
import threading
from pathlib import Path

import pytest

from geotrain.errors import StoreError
from geotrain.store import RunStore, round_key, sha256
from tests.helpers import wait_for

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
def store(backend_url):
    return RunStore(backend_url)


@pytest.fixture
def local(tmp_path):
    return RunStore("file://" + str(tmp_path / "run"))


def raw_write(store: RunStore, key: str, data: bytes) -> None:
    """Write bytes behind the store's back: a crashed writer, a faulty disk or bucket."""
    path = f"{store.root}/{key}"
    if store.local:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_bytes(data)
    else:
        store.fs.pipe_file(path, data)


def model_bytes(r: int, n: int = 4096) -> bytes:
    return bytes((r * 31 + i) % 251 for i in range(n))


def commit(store: RunStore, r: int) -> None:
    store.commit_global(r, {"model.safetensors": model_bytes(r), "outer.safetensors": model_bytes(r + 100)},
                        {"hash": f"h{r}"})


# ---- primitives -----------------------------------------------------------

def test_put_get_exists_listdir(store):
    assert not store.exists("a/x.bin")
    assert store.listdir("a") == []
    store.put("a/x.bin", b"\x00\x01payload")
    store.put("a/y.json", b"{}")
    store.put("a/sub/z", b"z")
    assert store.get("a/x.bin") == b"\x00\x01payload"
    assert store.exists("a/x.bin") and store.exists("a/y.json")
    assert store.listdir("a") == ["sub", "x.bin", "y.json"]
    assert store.listdir("a/sub") == ["z"]
    store.put("a/x.bin", b"overwritten")
    assert store.get("a/x.bin") == b"overwritten"
    with pytest.raises(FileNotFoundError):
        store.get("a/missing")
    store.put_json("a/obj.json", {"b": 1, "a": [1, 2]})
    assert store.get_json("a/obj.json") == {"a": [1, 2], "b": 1}


def test_listdir_hides_temporary_files(store):
    store.put("d/real", b"1")
    raw_write(store, "d/real.tmp-1a2b3c4d", b"half")
    raw_write(store, "d/other.tmp-deadbeef", b"half")
    assert store.listdir("d") == ["real"]
    if store.local:  # the store's own writes leave no temporaries behind
        assert sorted(p.name for p in Path(store.root, "d").iterdir()) == \
            ["other.tmp-deadbeef", "real", "real.tmp-1a2b3c4d"]


def test_commit_latest_read_global(store):
    assert store.latest_global() is None
    assert store.committed_rounds() == []
    for r in (0, 1, 2):
        commit(store, r)
    assert store.committed_rounds() == [0, 1, 2]
    assert store.latest_global() == 2
    files, manifest = store.read_global(1)
    assert files == {"model.safetensors": model_bytes(1), "outer.safetensors": model_bytes(101)}
    assert manifest["round"] == 1 and manifest["hash"] == "h1"
    assert manifest["files"]["model.safetensors"] == sha256(model_bytes(1))
    assert store.global_manifest(2)["hash"] == "h2"
    with pytest.raises(StoreError, match="not committed"):
        store.read_global(3)


def test_contributions(store):
    assert store.contributions(1) == []
    m = store.put_contribution(1, "b", b"delta-b", {"tokens": 30, "inner_steps": 5})
    store.put_contribution(1, "a", b"delta-a", {"tokens": 10, "inner_steps": 5})
    assert m == {"tokens": 30, "inner_steps": 5, "round": 1, "site": "b",
                 "sha256": sha256(b"delta-b"), "bytes": 7}
    assert store.contributions(1) == ["a", "b"]
    assert store.contributions(2) == []
    payload, manifest = store.read_contribution(1, "b")
    assert payload == b"delta-b" and manifest["tokens"] == 30
    store.put_result(1, "a", {"hash": "x"})
    store.put_result(1, "b", {"hash": "x"})
    assert store.results(1) == {"a": {"hash": "x", "site": "a", "round": 1},
                                "b": {"hash": "x", "site": "b", "round": 1}}
    # results/ is a folder under the round, not a contribution
    assert store.contributions(1) == ["a", "b"]


# ---- atomicity: crashes and corruption ------------------------------------

def test_half_written_round_is_never_read(store):
    commit(store, 0)
    commit(store, 1)
    # A leader that crashed after the data and manifest, before COMMITTED.
    files = {"model.safetensors": model_bytes(2)}
    base = f"global/{round_key(2)}"
    store.put(f"{base}/model.safetensors", files["model.safetensors"])
    store.put_json(f"{base}/manifest.json",
                   {"hash": "h2", "round": 2, "files": {n: sha256(d) for n, d in files.items()}})
    assert store.latest_global() == 1
    assert store.committed_rounds() == [0, 1]
    with pytest.raises(StoreError, match="round 2 is not committed"):
        store.read_global(2)
    # once the marker lands, the round is there
    commit(store, 2)
    assert store.latest_global() == 2 and store.read_global(2)[1]["hash"] == "h2"


def test_contribution_without_manifest_is_not_listed(store):
    store.put_contribution(3, "a", b"complete", {"tokens": 1})
    store.put(f"rounds/{round_key(3)}/b.bin", b"payload of a site that crashed before its manifest")
    raw_write(store, f"rounds/{round_key(3)}/c.json.tmp-0badc0de", b'{"tokens": 1')
    assert store.contributions(3) == ["a"]


def test_leftover_temporary_file_is_ignored(store):
    commit(store, 0)
    base = f"global/{round_key(1)}"
    raw_write(store, f"{base}/model.safetensors.tmp-1234abcd", model_bytes(1)[:100])
    raw_write(store, f"{base}/COMMITTED.tmp-1234abcd", b'{"round": 1')
    assert store.latest_global() == 0
    assert store.committed_rounds() == [0]
    with pytest.raises(StoreError):
        store.read_global(1)


@pytest.mark.parametrize("name", ["model.safetensors", "outer.safetensors", "manifest.json"])
def test_corrupt_committed_file_fails_checksum(store, name):
    commit(store, 0)
    key = f"global/{round_key(0)}/{name}"
    data = bytearray(store.get(key))
    data[len(data) // 2] ^= 0x01  # one flipped bit, the file keeps its size
    raw_write(store, key, bytes(data))
    with pytest.raises(StoreError, match="checksum mismatch"):
        store.read_global(0)


def test_corrupt_commit_marker_is_a_store_error(store):
    commit(store, 0)
    raw_write(store, f"global/{round_key(0)}/COMMITTED", b'{"round": 0, "manifest_sha')
    with pytest.raises(StoreError, match="corrupt marker"):
        store.read_global(0)


def test_corrupt_contribution_fails_checksum(store):
    store.put_contribution(1, "a", b"0123456789", {"tokens": 1})
    raw_write(store, f"rounds/{round_key(1)}/a.bin", b"0123456780")
    with pytest.raises(StoreError, match="checksum mismatch in contribution of a"):
        store.read_contribution(1, "a")


def test_concurrent_reader_never_sees_uncommitted_round(local):
    commit(local, 0)
    abort = threading.Event()
    errors: list[BaseException] = []
    seen: list[int] = []

    def reader() -> None:  # reads until it has seen the last round
        try:
            while not abort.is_set() and (not seen or seen[-1] < 20):
                r = local.latest_global()
                files, manifest = local.read_global(r)
                assert manifest["round"] == r
                assert files["model.safetensors"] == model_bytes(r)
                assert not seen or r >= seen[-1], f"went back from round {seen[-1]} to {r}"
                seen.append(r)
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            errors.append(e)

    t = threading.Thread(target=reader)
    t.start()
    try:
        for r in range(1, 21):
            commit(local, r)
            # The reader reads again before the next commit, so its reads overlap the
            # commits on any machine (a fast writer could otherwise finish before a
            # starved reader looked twice, and no race would be exercised).
            n = len(seen)
            wait_for(lambda: len(seen) > n or errors, 20, every=0.001)
    except BaseException:
        abort.set()
        raise
    finally:
        t.join(10)
    abort.set()
    assert not errors, errors[0]
    assert seen and seen[-1] == 20
    assert len(set(seen)) >= 3, f"the reader only saw rounds {sorted(set(seen))}; no race was exercised"


# ---- events, heartbeats, commands ------------------------------------------

def test_events_are_merged_in_time_order(store):
    emitted = [("controller", "launch"), ("a", "start"), ("controller", "sync"),
               ("b", "start"), ("a", "round"), ("controller", "done")]
    for source, kind in emitted:
        store.event(source, kind, f"{source} {kind}", n=len(kind))
        # time.time() resolves well below this, so every event gets its own instant
        threading.Event().wait(0.002)
    events = store.events(["a", "b"])
    assert [(e["source"], e["kind"]) for e in events] == emitted
    assert [e["at"] for e in events] == sorted(e["at"] for e in events)
    assert events[1]["message"] == "a start" and events[1]["n"] == 5
    assert [e["kind"] for e in store.read_jsonl("sites/a/events.jsonl")] == ["start", "round"]
    assert store.events([]) == [e for e in events if e["source"] == "controller"]


def test_append_jsonl_from_two_threads_loses_nothing(store):
    n = 300 if store.local else 15  # on S3 each append is a read-modify-write

    def writer(key: str) -> None:
        for i in range(n):
            store.append_jsonl(key, {"i": i, "pad": "x" * 200})

    threads = [threading.Thread(target=writer, args=(k,)) for k in ("sites/a/events.jsonl", "events.jsonl")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    for key in ("sites/a/events.jsonl", "events.jsonl"):
        assert [rec["i"] for rec in store.read_jsonl(key)] == list(range(n))


def test_read_jsonl_skips_a_line_being_written(local):
    local.append_jsonl("log.jsonl", {"i": 0})
    raw_write(local, "log.jsonl", local.get("log.jsonl") + b'{"i": 1, "par')
    assert local.read_jsonl("log.jsonl") == [{"i": 0}]
    assert local.read_jsonl("missing.jsonl") == []


def test_heartbeat_and_commands_round_trip(store):
    assert store.heartbeat("a") is None
    store.beat("a", {"step": 7, "round": 2, "loss": 1.5, "state": "training"})
    hb = store.heartbeat("a")
    assert {k: hb[k] for k in ("step", "round", "loss", "state", "site")} == \
        {"step": 7, "round": 2, "loss": 1.5, "state": "training", "site": "a"}
    assert isinstance(hb["at"], float)
    assert store.heartbeat("b") is None

    assert store.commands("a") == []
    store.send_command("a", "drain")
    store.send_command("a", "stop")
    cmds = store.commands("a")
    assert [(c.command, c.site) for c in cmds] == [("drain", "a"), ("stop", "a")]
    assert store.commanded("a", "stop", since=cmds[1].at)
    assert not store.commanded("a", "stop", since=cmds[1].at + 1)
    assert store.commands("b") == []


def test_run_info_and_final(store):
    with pytest.raises(StoreError, match="run.json missing"):
        store.read_run()
    store.write_run({"id": "r1", "version": 1})
    assert store.read_run() == {"id": "r1", "version": 1}
    assert store.read_final() is None
    store.write_final(b"weights", {"rounds": 3})
    assert store.read_final() == {"rounds": 3, "model_sha256": sha256(b"weights")}
    assert store.get("final/model.safetensors") == b"weights"


def test_unsupported_scheme_lists_valid_ones():
    with pytest.raises(StoreError) as e:
        RunStore("ftp://host/run")
    msg = str(e.value)
    assert "'ftp'" in msg and "ftp://host/run" in msg
    for scheme in ("file://", "s3://", "gs://", "az://"):
        assert scheme in msg


def test_plain_path_is_a_local_store(tmp_path):
    s = RunStore(str(tmp_path / "plain"))
    assert s.local
    s.put_json("x.json", [1])
    assert json.loads((tmp_path / "plain" / "x.json").read_bytes()) == [1]


def test_session_servers_start_without_the_running_tests_geotrain_variables(monkeypatch):
    """An emulator started lazily inside a test (store_urls) must not carry that test's
    GEOTRAIN_HOME, or the geotrain_home teardown kills it as one of the test's processes
    and every later test of the session that uses it fails (seen under xdist)."""
    from tests.emulators import server_env

    monkeypatch.setenv("GEOTRAIN_HOME", "/tmp/some-test-home")
    monkeypatch.setenv("GEOTRAIN_RUN", "r1")
    env = server_env(EXTRA="1")
    assert not [k for k in env if k.startswith("GEOTRAIN_")] and env["EXTRA"] == "1"
    assert env["PATH"] == os.environ["PATH"]
