"""A store that can be told to fail (geotrain/store_faults.py): retries absorb
bursts, persistent failures become StoreErrors naming the key, and a commit
interrupted by failures leaves either a valid round or no visible round.

    python -m pytest tests/test_store_faults.py -q
"""

import errno

import pytest

from geotrain.errors import StoreError
from geotrain.store import RetryPolicy, RunStore, is_transient, retry, round_key
from geotrain.store_faults import FaultPlan, FaultyFileSystem

pytestmark = pytest.mark.timeout(60)
FAST = RetryPolicy(attempts=6, base_delay=0.001, max_delay=0.01)


def model_bytes(r: int, n: int = 2048) -> bytes:
    return bytes((r * 13 + i) % 241 for i in range(n))


def commit(store: RunStore, r: int) -> None:
    store.commit_global(r, {"model.safetensors": model_bytes(r), "outer.safetensors": model_bytes(r + 7)},
                        {"hash": f"h{r}"})


def test_injected_errors_are_the_kinds_backends_raise():
    store_fs = FaultyFileSystem(object(), FaultPlan(rate=1.0, seed=3))
    kinds = {type(store_fs._error("pipe_file", f"p{i}")).__name__ for i in range(64)}
    assert kinds == {"OSError", "ConnectionResetError", "TimeoutError", "EndpointConnectionError"}
    for i in range(16):
        assert is_transient(store_fs._error("cat_file", f"p{i}"))
    assert not is_transient(FileNotFoundError("x")) and not is_transient(ValueError("x"))
    assert is_transient(type("HttpError", (Exception,), {"code": 503})())  # gcsfs-style 5xx
    assert not is_transient(type("HttpError", (Exception,), {"code": 400})())


def test_a_refusal_is_access_denied_at_once_on_every_backend():
    """gcsfs turns GCS's 403 into a plain OSError("Forbidden: ..."); azure-core and
    gcsfs carry 401/403 as a status code; s3fs raises PermissionError. None is
    retried; each is a StoreError saying access was denied, with the store's words."""
    calls = []
    refusals = [OSError("Forbidden: b/runs/x/run.json\nnode@p.iam lacks storage.objects.get"),
                type("HttpResponseError", (Exception,), {"status_code": 403})("AuthorizationFailure"),
                PermissionError("Access Denied")]
    for refusal in refusals:
        assert not is_transient(refusal)

        def refuse(refusal=refusal):
            calls.append(1)
            raise refusal
        calls.clear()
        with pytest.raises(StoreError, match=r"run\.json was refused \(access denied\)") as e:
            retry(refuse, "reading run.json", policy=FAST)
        assert len(calls) == 1 and str(refusal).split()[0] in str(e.value)
    # An expired gcsfs token is renewed by gcsfs itself, and other OSErrors stay transient.
    assert is_transient(OSError("connection reset"))
    assert not is_transient(type("HttpError", (Exception,), {"code": 401})("Invalid Credentials"))


@pytest.mark.parametrize("scheme", ["file", "s3"])
def test_bursts_are_absorbed(store_urls, scheme):
    plan = FaultPlan(rate=0.3, burst=3, seed=7, after=0.3)
    store = RunStore(store_urls(scheme), faults=plan, retry_policy=FAST)
    for r in range(4):
        commit(store, r)
        store.put_contribution(r, "a", model_bytes(r)[:100], {"tokens": 1})
        store.event("a", "round", round=r)
    assert store.fs.log.faults, "no fault was injected; the test exercised nothing"
    assert any(when == "after" for _, _, when in store.fs.log.faults)
    clean = RunStore(store.url)
    assert clean.committed_rounds() == [0, 1, 2, 3]
    assert clean.read_global(3)[0]["model.safetensors"] == model_bytes(3)
    assert clean.read_contribution(2, "a")[0] == model_bytes(2)[:100]
    # an append whose reply was lost is retried as a whole read-modify-write; never a torn line
    rounds = [e["round"] for e in clean.read_jsonl("sites/a/events.jsonl")]
    assert sorted(set(rounds)) == [0, 1, 2, 3]


def test_persistent_failure_is_a_store_error_naming_the_key(tmp_path):
    store = RunStore("file://" + str(tmp_path / "run"), faults=FaultPlan(rate=1.0, ops=("cat_file",)),
                     retry_policy=RetryPolicy(attempts=3, base_delay=0.001))
    store.put("sites/a/heartbeat", b"{}")
    with pytest.raises(StoreError, match=r"read sites/a/heartbeat failed after 3 attempts"):
        store.get("sites/a/heartbeat")
    assert store.fs.log.calls["cat_file"] == 3


def test_lost_reply_on_create_still_reports_the_win(store_urls):
    # the create lands but its reply is lost: the retry finds its own object, reports the win
    for scheme, op in (("file", "link"), ("s3", "pipe_file")):
        plan = FaultPlan(rate=0.99, burst=1, gap=100, after=1.0, ops=(op,), match="members", seed=1)
        store = RunStore(store_urls(scheme), retry_policy=FAST)
        faulty = RunStore(store.url, faults=plan, retry_policy=FAST)
        assert faulty.create("rounds/000001/members", b"site a") is True
        assert [(o, when) for o, _, when in faulty.fs.log.faults] == [(op, "after")]
        assert faulty.fs.log.calls[op] == 2  # the lost one and the retry that found it
        assert store.create("rounds/000001/members", b"site b") is False
        assert store.listdir("rounds/000001") == ["members"]


@pytest.mark.parametrize("scheme", ["file", "s3", "az"])
def test_commit_under_faults_is_all_or_nothing(store_urls, scheme):
    """Many commits, each hit by faults that retries cannot always absorb: afterwards
    every round is either committed and valid, or not visible at all."""
    url = store_urls(scheme)
    clean = RunStore(url)
    commit(clean, 0)
    outcomes = {}
    for r in range(1, 13):
        plan = FaultPlan(rate=0.15, burst=2, seed=r, after=0.5, ops=("pipe_file", "mv", "cat_file"))
        faulty = RunStore(url, faults=plan, retry_policy=RetryPolicy(attempts=2, base_delay=0.001))
        try:
            commit(faulty, r)
            outcomes[r] = "committed"
        except StoreError as e:
            assert "failed after 2 attempts" in str(e) and f"global/{round_key(r)}/" in str(e)
            outcomes[r] = "failed"
    assert set(outcomes.values()) == {"committed", "failed"}, outcomes  # both paths exercised
    visible = clean.committed_rounds()
    for r, outcome in outcomes.items():
        if outcome == "committed":
            assert r in visible
        if r in visible:  # a failed commit may still have landed its marker (lost reply)
            files, manifest = clean.read_global(r)
            assert files["model.safetensors"] == model_bytes(r) and manifest["round"] == r
        else:
            with pytest.raises(StoreError, match="not committed"):
                clean.read_global(r)
    assert clean.latest_global() == max(visible)


def test_fault_plan_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("GEOTRAIN_STORE_FAULTS", "rate=0.5,seed=4,burst=2,ops=pipe_file+cat_file")
    monkeypatch.setenv("GEOTRAIN_STORE_RETRY", "attempts=9,base_delay=0.001")
    store = RunStore("file://" + str(tmp_path / "run"))
    assert store.faults == FaultPlan(rate=0.5, seed=4, burst=2, ops=("pipe_file", "cat_file"))
    settings = store.settings()
    assert settings["faults"]["source"] == "GEOTRAIN_STORE_FAULTS"
    assert settings["retry"] == {"attempts": 9, "base_delay": 0.001, "max_delay": 5.0,
                                 "source": "GEOTRAIN_STORE_RETRY"}
    for i in range(20):
        store.put(f"k{i}", b"v")
        assert store.get(f"k{i}") == b"v"
    assert store.fs.log.faults


@pytest.mark.parametrize("text, message", [
    ("rate=2", "rate and after must be in"),
    ("rate=0.1,bogus=1", "valid: rate=..., burst=..."),
    ("burst=x", "burst must be a int"),
    ("ops=pipe_file+teleport", "unknown ops"),
])
def test_bad_fault_plan_says_what_is_valid(tmp_path, monkeypatch, text, message):
    monkeypatch.setenv("GEOTRAIN_STORE_FAULTS", text)
    with pytest.raises(StoreError, match=message):
        RunStore("file://" + str(tmp_path))


def test_retry_passes_answers_through_and_refuses_denied_access():
    calls = []

    def denied():
        calls.append(1)
        raise PermissionError(errno.EACCES, "Access Denied")

    with pytest.raises(StoreError, match="refused"):
        retry(denied, "write x", policy=FAST)
    assert len(calls) == 1  # not retried
    with pytest.raises(FileNotFoundError):
        retry(lambda: (_ for _ in ()).throw(FileNotFoundError("x")), "read x", policy=FAST)


def test_a_sites_last_liveness_write_outlasts_a_burst_of_store_errors(tmp_path):
    # Periodic beats may be lost (the next one follows); the last, `done`, has nothing
    # after it, and a controller that reads a stale `running` would replace a finished
    # site. Here every write of the beat fails 4 times in a row, each a whole store call.
    from geotrain.site.agent import Liveness

    plan = FaultPlan(rate=0.999, burst=4, gap=100, seed=1, ops=("pipe_file",), match="sites/a/alive")
    store = RunStore("file://" + str(tmp_path / "run"), faults=plan,
                     retry_policy=RetryPolicy(attempts=1, base_delay=0.0))
    beats = Liveness(store, "a", every_s=3600).start()  # its first beat is lost
    beats.stop("done", patience_s=60)
    assert store.injected_faults() == 4
    assert RunStore("file://" + str(tmp_path / "run")).liveness()["a"]["state"] == "done"
