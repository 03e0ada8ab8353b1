"""The run store across backends: conditional create under races, settings from
the environment, and copying a whole run store from one backend to another.

Every backend is real on the wire: file://, moto S3, gcp-storage-emulator
(with GCS's precondition check, see tests/gcs_emulator.py) and Azurite.

    python -m pytest tests/test_store_backends.py -q
"""

import json
import os
import subprocess
import sys
import threading

import pytest

from geotrain.errors import StoreError
from geotrain.store import RetryPolicy, RunStore, round_key, sha256
from geotrain.store_copy import CopyProgress, copy_run
from tests.emulators import free_port, start_gcs

pytestmark = pytest.mark.timeout(90)


# ---- conditional create --------------------------------------------------------------

def test_create_writes_once_and_never_overwrites(backend_url):
    store = RunStore(backend_url)
    assert store.create("rounds/000001/members", b'{"by": "a"}') is True
    assert store.create("rounds/000001/members", b'{"by": "b"}') is False
    assert store.get("rounds/000001/members") == b'{"by": "a"}'
    # the same bytes again: taken as this writer's own earlier attempt (a lost reply)
    assert store.create("rounds/000001/members", b'{"by": "a"}') is True
    assert store.listdir("rounds/000001") == ["members"]


def race(store: RunStore, key: str, data, n: int = 8) -> list[int]:
    """`n` threads, released at once, each creating `key` with `data(i)`; the winners."""
    barrier, wins = threading.Barrier(n), []

    def writer(i: int) -> None:
        barrier.wait()
        if store.create(key, data(i)):
            wins.append(i)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return wins


def test_racing_threads_exactly_one_wins(backend_url):
    store = RunStore(backend_url)
    for trial in range(3):
        key = f"race/{trial}"
        wins = race(store, key, lambda i: f"writer-{i}".encode() * 1000)
        assert len(wins) == 1, f"trial {trial}: winners {wins}"
        assert store.get(key) == f"writer-{wins[0]}".encode() * 1000


RACER = """
import sys
from geotrain.store import RunStore
store = RunStore(sys.argv[1])
i = int(sys.argv[2])
store.exists("warm-up")  # connect before the start line
print("ready", flush=True)
sys.stdin.readline()  # the start line: every racer is connected and waiting
print("won" if store.create("race/processes", f"process-{i}".encode()) else "lost", flush=True)
"""


def test_racing_processes_exactly_one_wins(backend_url):
    n = 4
    procs = [subprocess.Popen([sys.executable, "-c", RACER, backend_url, str(i)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=dict(os.environ))
             for i in range(n)]
    try:
        for p in procs:  # wait until every racer is connected, however long that takes
            assert p.stdout.readline().strip() == "ready", p.stderr.read()
        for p in procs:
            p.stdin.write("go\n")
            p.stdin.flush()
        outs = []
        for p in procs:
            out, err = p.communicate(timeout=60)
            assert p.returncode == 0, err
            outs.append(out.strip())
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert sorted(outs) == ["lost"] * (n - 1) + ["won"], outs
    winner = outs.index("won")
    assert RunStore(backend_url).get("race/processes") == f"process-{winner}".encode()


def test_the_s3_emulator_checks_and_writes_as_one():
    """tests/atomic_moto.py, which every S3 test runs: with each object write paused
    50 ms between moto's If-None-Match check and its insert (plain moto 5.2 then gave
    several winners in each of 20 races of 8 writers), every race of racing
    creates through the run store still has exactly one winner."""
    from tests.conftest import MOTO_CMD, require_moto, wait_for_port
    from tests.emulators import server_env, stop

    require_moto()
    import boto3

    port = free_port()
    creds = dict(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
                 AWS_DEFAULT_REGION="us-east-1")
    proc = subprocess.Popen([*MOTO_CMD, "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=server_env(MOTO_WRITE_DELAY_S="0.05", **creds))
    try:
        wait_for_port(port, proc)
        url = f"http://127.0.0.1:{port}"
        boto3.client("s3", endpoint_url=url, region_name="us-east-1", aws_access_key_id="testing",
                     aws_secret_access_key="testing").create_bucket(Bucket="atomic-race")
        store = RunStore("s3://atomic-race/run", endpoint_url=url, key="testing", secret="testing")
        for trial in range(5):
            wins = race(store, f"race/{trial}", lambda i: f"writer-{i}".encode())
            assert len(wins) == 1, f"trial {trial}: winners {wins}"
    finally:
        stop(proc)


def test_plain_gcs_emulator_ignores_the_precondition(monkeypatch):
    """Recorded, not wished for: the stock emulator lets a second create through,
    which is why the gs:// tests run it behind tests/gcs_emulator.py."""
    gen = start_gcs(preconditions=False)
    emulator = next(gen)
    try:
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", emulator.endpoint)
        store = RunStore(f"gs://{emulator.bucket}/plain", skip_instance_cache=True)
        assert store.create("k", b"first") is True
        assert store.create("k", b"second") is True  # real GCS: 412, so False
        assert store.get("k") == b"second"
    finally:
        gen.close()


# ---- settings from the environment -------------------------------------------------------

def test_settings_name_the_environment_never_its_secrets(store_urls):
    for scheme in ("s3", "gs", "az"):
        store = RunStore(store_urls(scheme))
        text = json.dumps(store.settings())
        assert store.settings()["retry"]["source"] == "default"
        assert "faults" not in store.settings()
        assert store.settings()["environment"], scheme
        assert "AccountKey" not in text and "Eby8vdM02" not in text and "testing" not in text


# ---- copy between backends ----------------------------------------------------------------

def model_bytes(r: int, n: int = 3000) -> bytes:
    return bytes((r * 37 + i) % 253 for i in range(n))


def populate(store: RunStore) -> None:
    """A small but complete run, written through the real RunStore API."""
    store.write_run({"id": "r1", "version": "0.1.0"})
    store.event("controller", "launch", "launched")
    for r in range(3):
        store.commit_global(r, {"model.safetensors": model_bytes(r), "outer.safetensors": model_bytes(r + 50)},
                            {"hash": f"h{r}", "members": ["a", "b"]})
        for site in ("a", "b"):
            store.put_contribution(r + 1, site, model_bytes(r + 10 * ord(site))[:500],
                                   {"tokens": 100, "inner_steps": 5, "codec": "none"})
            store.put_result(r + 1, site, {"hash": f"h{r + 1}"})
            store.event(site, "round", f"round {r + 1}", round=r + 1)
            store.beat(site, {"state": "training", "round": r + 1})
        store.decide_members(r + 1, {"accepted": [{"site": "a", "round": r + 1}], "decided_by": "a"})
    store.send_command("a", "stop")
    # a round a crashed leader left half-written: data, no marker
    store.put(f"global/{round_key(3)}/model.safetensors", model_bytes(3))
    store.write_final(model_bytes(2), {"rounds": 3})


def snapshot(store: RunStore) -> dict[str, str]:
    return {k: sha256(store.get(k)) for k in store.keys()}


def assert_same_run(src: RunStore, dst: RunStore) -> None:
    assert snapshot(dst) == snapshot(src)
    assert dst.committed_rounds() == [0, 1, 2] and dst.latest_global() == 2
    for r in (0, 1, 2):
        assert dst.read_global(r) == src.read_global(r)
    assert dst.contributions(2) == ["a", "b"]
    assert dst.read_contribution(2, "b") == src.read_contribution(2, "b")
    assert [dst.members(r) for r in (1, 2, 3)] == [src.members(r) for r in (1, 2, 3)] != [None] * 3
    assert dst.events(["a", "b"]) == src.events(["a", "b"])
    assert dst.read_final() == src.read_final() and dst.read_run() == src.read_run()


@pytest.mark.timeout(120)
def test_copy_file_to_s3_to_gs_to_az(store_urls):
    src = RunStore(store_urls("file"))
    populate(src)
    before = snapshot(src)
    chain = [src.url] + [store_urls(s) for s in ("s3", "gs", "az")]
    for a, b in zip(chain, chain[1:]):
        report = copy_run(a, b)
        assert report.committed_rounds == (0, 1, 2) and report.contributions == 6
        assert report.rejected == () and report.objects_skipped == 0
        assert report.objects_copied == len(before) and report.bytes_copied > 3 * 2 * 3000
        assert_same_run(RunStore(a), RunStore(b))
    assert snapshot(src) == before  # the source is only read
    again = copy_run(chain[-2], chain[-1])  # resuming a finished copy copies nothing
    assert again.objects_copied == 0 and again.objects_skipped == len(before)


def test_destination_is_valid_at_every_instant(store_urls):
    src = RunStore(store_urls("file"))
    populate(src)
    dst = RunStore(store_urls("s3"))
    seen: list[CopyProgress] = []

    def check(p: CopyProgress) -> None:
        seen.append(p)
        for r in dst.committed_rounds():
            dst.read_global(r)  # raises if a marked round is missing or corrupt data
        for r in range(1, 4):
            for site in dst.contributions(r):
                dst.read_contribution(r, site)
        if dst.read_final() is not None:
            assert sha256(dst.get("final/model.safetensors")) == dst.read_final()["model_sha256"]

    copy_run(src.url, dst.url, on_progress=check)
    assert [p.key for p in seen if p.key.endswith("COMMITTED")] == \
        [f"global/{round_key(r)}/COMMITTED" for r in range(3)]
    assert seen[-1].key == "final/summary.json"
    assert all(p.copied for p in seen)


def test_interrupted_copy_resumes_and_corrupt_units_stay_invisible(store_urls):
    src = RunStore(store_urls("file"))
    populate(src)
    # corrupt round 1's model and site b's round-2 payload at the source
    src.put(f"global/{round_key(1)}/model.safetensors", b"bit rot")
    src.put(f"rounds/{round_key(2)}/b.bin", b"bit rot")
    dst_url = store_urls("az")
    calls = []

    def crash_after_five(p: CopyProgress) -> None:
        calls.append(p.key)
        if len(calls) == 5:
            raise KeyboardInterrupt("copy interrupted")

    with pytest.raises(KeyboardInterrupt):
        copy_run(src.url, dst_url, on_progress=crash_after_five)
    dst = RunStore(dst_url)
    assert dst.committed_rounds() == []  # data first: no marker yet
    report = copy_run(src.url, dst_url)
    # What landed before the interruption is skipped (copies run in parallel, so
    # at least the 5 reported ones), and nothing is copied twice.
    assert report.objects_skipped >= 5
    fresh = copy_run(src.url, store_urls("file"))  # the same copy, never interrupted
    assert report.objects_skipped + report.objects_copied == fresh.objects_copied
    assert report.committed_rounds == (0, 2)
    assert set(report.rejected) == {f"global/{round_key(1)}", f"rounds/{round_key(2)}/b"}
    assert dst.committed_rounds() == [0, 2] and dst.contributions(2) == ["a"]
    with pytest.raises(StoreError, match="not committed"):
        dst.read_global(1)


def test_copy_refuses_nothing_and_itself(tmp_path):
    with pytest.raises(StoreError, match="nothing to copy"):
        copy_run("file://" + str(tmp_path / "empty"), "file://" + str(tmp_path / "dst"))
    with pytest.raises(StoreError, match="onto itself"):
        copy_run("file://" + str(tmp_path / "x"), "file://" + str(tmp_path / "x"))


def _files_under(path) -> set[str]:
    return {str(p.relative_to(path)) for p in path.rglob("*") if p.is_file()}


def test_copy_never_writes_outside_the_destination_for_a_manifests_file_name(tmp_path):
    """A committed round whose manifest names `../escape`: the round is refused
    whole (reported), nothing is read or written outside either run folder."""
    src = RunStore(f"file://{tmp_path / 'src' / 'run'}")
    populate(src)
    base = f"global/{round_key(1)}"
    bad = {"../escape": sha256(b"planted"), "../../../escape": sha256(b"planted"),
           "model.safetensors": sha256(src.get(f"{base}/model.safetensors"))}
    manifest = dict(src.global_manifest(1), files=bad)
    src.put_json(f"{base}/manifest.json", manifest)  # marker re-signed: only the names are wrong
    src.put_json(f"{base}/COMMITTED", {"round": 1, "manifest_sha256":
                                       sha256(json.dumps(manifest, sort_keys=True).encode())})
    (tmp_path / "src" / "escape").write_bytes(b"planted")  # what an unchecked copy reads, writes outside
    dst_root = tmp_path / "dst" / "run"
    report = copy_run(src.url, f"file://{dst_root}")
    assert _files_under(tmp_path / "dst") == {f"run/{k}" for k in RunStore(f"file://{dst_root}").keys()}
    assert not (tmp_path / "dst" / "escape").exists()
    assert report.committed_rounds == (0, 2)
    assert f"global/{round_key(1)}" in report.rejected
    assert f"unsafe key 'global/{round_key(1)}/../escape'" in report.rejected
    assert f"unsafe key 'global/{round_key(1)}/../../../escape'" in report.rejected
    dst = RunStore(f"file://{dst_root}")
    assert dst.committed_rounds() == [0, 2] and not dst.exists(f"{base}/manifest.json")
    assert not dst.exists(f"{base}/model.safetensors")  # an unverified unit: none of it


def test_copy_refuses_unsafe_listed_keys_and_reports_them(tmp_path):
    unsafe_keys = ["../outside", "sites//a/heartbeat", "sites/./a", "/etc/passwd", "sites\\..\\x",
                   "sites/a/..", "."]
    read: list[str] = []

    class Hostile(RunStore):
        """A backend whose listing holds keys no run store writes (as S3 allows)."""

        def keys(self, prefix: str = "") -> list[str]:
            return sorted(super().keys(prefix) + unsafe_keys)

        def get(self, key: str) -> bytes:
            read.append(key)
            return super().get(key)

    src_url = f"file://{tmp_path / 'src' / 'run'}"
    populate(RunStore(src_url))
    dst_root = tmp_path / "dst" / "run"
    report = copy_run(src_url, f"file://{dst_root}", src=Hostile(src_url))
    assert sorted(x for x in report.rejected if x.startswith("unsafe key")) == \
        sorted(f"unsafe key {k!r}" for k in unsafe_keys)
    assert not set(read) & set(unsafe_keys)  # never even read
    assert report.committed_rounds == (0, 1, 2) and report.contributions == 6
    assert _files_under(tmp_path / "dst") == {f"run/{k}" for k in RunStore(f"file://{dst_root}").keys()}
    assert not (tmp_path / "dst" / "outside").exists()


def test_copy_leaves_out_every_part_of_an_unverified_unit(tmp_path):
    src = RunStore(f"file://{tmp_path / 'src'}")
    populate(src)
    src.put(f"global/{round_key(1)}/model.safetensors", b"bit rot")  # outer.safetensors still fine
    src.put("final/model.safetensors", b"bit rot")
    dst = RunStore(f"file://{tmp_path / 'dst'}")
    report = copy_run(src.url, dst.url)
    assert set(report.rejected) == {f"global/{round_key(1)}", "final"}
    assert not [k for k in dst.keys() if k.startswith(f"global/{round_key(1)}/")
                and k != f"global/{round_key(1)}/eval.json"]
    assert not dst.exists("final/model.safetensors") and not dst.exists("final/summary.json")
    assert dst.committed_rounds() == [0, 2]


def test_missing_emulator_skips_locally_and_fails_in_ci(monkeypatch):
    from tests import emulators

    monkeypatch.delenv("CI", raising=False)
    monkeypatch.delenv("GEOTRAIN_REQUIRE_EMULATORS", raising=False)
    with pytest.raises(pytest.skip.Exception, match="Azurite is not installed: npm install"):
        emulators.missing("Azurite", "npm install ...")
    monkeypatch.setenv("GEOTRAIN_REQUIRE_EMULATORS", "1")
    with pytest.raises(pytest.fail.Exception, match="CI requires every emulator"):
        emulators.missing("Azurite", "npm install ...")
    monkeypatch.setenv("GEOTRAIN_REQUIRE_EMULATORS", "0")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception):
        emulators.missing("gcp-storage-emulator", "pip install -e '.[test]'")


def test_missing_moto_goes_through_the_same_guard(monkeypatch, tmp_path):
    from tests import conftest

    monkeypatch.setattr(conftest, "MOTO_SERVER", tmp_path / "no-moto_server")
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.setenv("GEOTRAIN_REQUIRE_EMULATORS", "0")
    with pytest.raises(pytest.skip.Exception, match="moto_server .* is not installed"):
        conftest.require_moto()
    monkeypatch.setenv("GEOTRAIN_REQUIRE_EMULATORS", "1")
    with pytest.raises(pytest.fail.Exception, match="CI requires every emulator"):
        conftest.require_moto()


def test_a_store_opened_after_its_environment_changed_uses_the_new_settings(store_urls, monkeypatch):
    # fsspec caches file systems by their arguments; the endpoint is in the environment.
    url = store_urls("s3")
    RunStore(url).put("k", b"v")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", f"http://127.0.0.1:{free_port()}")  # nothing there
    with pytest.raises(StoreError):
        RunStore(url, retry_policy=RetryPolicy(attempts=1)).get("k")
