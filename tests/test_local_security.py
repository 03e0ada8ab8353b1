"""Local sites and the operator's machine (issue 12, "Local sites"): the /proc module
(geotrain.procs), controller pids checked with their start time, owner-only
GEOTRAIN_HOME / state.db / logs / site temp dirs, and the notice endpoint's secret."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from geotrain import procs
from geotrain.cleanup import abandoned
from geotrain.runs import controller_alive, down, prepare_resume, record_controller, status
from geotrain.errors import GeotrainError
from geotrain.site.notice_server import SECRET_ENV, SECRET_HEADER, NoticeServer
from geotrain.state import SCHEMA, StateDB
from providers import local
from tests.fake_controller import tiny_run
from tests.helpers import geotrain_cmd, geotrain_home, http, wait_for  # noqa: F401 - fixture


def mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def sleeper(**env: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"],
                            env=dict(os.environ, **env), stdin=subprocess.DEVNULL)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout=30)


def clock_tick() -> None:
    """Let at least two clock ticks pass, so a process started next has another start time."""
    time.sleep(3 / os.sysconf("SC_CLK_TCK"))


# -- geotrain.procs ------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_procs_reads_tags_liveness_zombies_and_start_time():
    proc = sleeper(GEOTRAIN_RUN="r-procs", GEOTRAIN_SITE="s1", GEOTRAIN_ROLE="agent",
                   NOT_A_TAG="x")
    try:
        # Popen returns once the exec began; the kernel shows the new environment a moment later.
        wait_for(lambda: procs.tags(proc.pid), 30, every=0.05)
        assert procs.tags(proc.pid) == {**{k: v for k, v in os.environ.items()
                                           if k.startswith("GEOTRAIN_")},
                                        "GEOTRAIN_RUN": "r-procs", "GEOTRAIN_SITE": "s1",
                                        "GEOTRAIN_ROLE": "agent"}
        assert procs.environ(proc.pid)["NOT_A_TAG"] == "x"
        found = dict(procs.tagged())
        assert found[proc.pid]["GEOTRAIN_SITE"] == "s1"
        assert procs.alive(proc.pid)
        started = procs.start_time(proc.pid)
        assert isinstance(started, int) and started > 0
        assert procs.same(proc.pid, started) and not procs.same(proc.pid, started + 1)
        assert os.getpid() in procs.ancestry() and procs.parent(proc.pid) == os.getpid()
        assert "time.sleep(120)" in " ".join(procs.cmdline(proc.pid))

        proc.kill()  # exited, not reaped yet: a zombie is not alive
        wait_for(lambda: not procs.alive(proc.pid), 30)
        assert procs.start_time(proc.pid) == started  # still the same (dead) process
        proc.wait(timeout=30)
        assert not procs.alive(proc.pid) and procs.start_time(proc.pid) is None
        assert procs.tags(proc.pid) == {} and proc.pid not in dict(procs.tagged())

        clock_tick()
        other = sleeper()
        try:
            assert procs.start_time(other.pid) > started  # a new process: another start time
        finally:
            stop(other)
    finally:
        stop(proc)
    for nothing in (None, 0, -1):  # never a process group
        assert not procs.alive(nothing) and procs.start_time(nothing) is None


@pytest.mark.timeout(60)
def test_signal_if_same_never_signals_another_start_time():
    proc = sleeper()
    try:
        started = procs.start_time(proc.pid)
        assert not procs.signal_if_same(proc.pid, started + 1, signal.SIGTERM)
        assert not procs.signal_if_same(proc.pid, started - 1, signal.SIGTERM)
        time.sleep(0.5)
        assert proc.poll() is None  # untouched
        assert procs.signal_if_same(proc.pid, started, signal.SIGTERM)
        assert proc.wait(timeout=30) == -signal.SIGTERM
        assert not procs.signal_if_same(proc.pid, started, signal.SIGTERM)  # gone: nothing sent
    finally:
        stop(proc)


# -- the controller's pid, with its start time ----------------------------------------------


@pytest.fixture
def run_id(geotrain_home: Path, tmp_path: Path) -> str:
    return tiny_run(geotrain_home, tmp_path, "sec", sites=("a",))


@pytest.mark.timeout(120)
def test_a_recycled_controller_pid_is_never_trusted_or_signalled(run_id, geotrain_home):
    db = StateDB(geotrain_home)
    proc = sleeper()  # stands for whatever process got the dead controller's pid
    try:
        started = procs.start_time(proc.pid)
        db.update_run(run_id, state="running", controller_pid=proc.pid, controller_started=started - 1)
        run = db.run(run_id)
        assert not controller_alive(run) and abandoned(run)
        assert status(run_id, geotrain_home)["controller_pid"] is None
        cli = subprocess.run(geotrain_cmd("status", run_id, "--json"), capture_output=True, text=True,
                             timeout=60, env=dict(os.environ, GEOTRAIN_HOME=str(geotrain_home)))
        assert cli.returncode == 0, cli.stderr
        assert json.loads(cli.stdout)["controller_pid"] is None
        assert prepare_resume(run_id, geotrain_home) == run_id  # not "still controlled"
        assert down(run_id, geotrain_home)["state"] == "stopped"
        time.sleep(0.5)
        assert proc.poll() is None  # down never signalled it

        # The same process recorded with its own start time is the controller.
        record_controller(db, run_id, proc.pid, state="running")
        assert db.run(run_id)["controller_started"] == started
        assert controller_alive(db.run(run_id)) and not abandoned(db.run(run_id))
        assert status(run_id, geotrain_home)["controller_pid"] == proc.pid
        with pytest.raises(GeotrainError, match=f"still controlled by pid {proc.pid}"):
            prepare_resume(run_id, geotrain_home)
        assert down(run_id, geotrain_home)["state"] == "stopped"
        assert proc.wait(timeout=30) == -signal.SIGTERM
    finally:
        stop(proc)


@pytest.mark.timeout(120)
def test_a_controller_pid_recorded_without_a_start_time_counts_only_if_it_is_geotrains(run_id, geotrain_home):
    """A row from a release that did not record start times: its pid is the controller
    only while that process's command line is a geotrain controller of this run (or a
    foreground `geotrain launch|resume`); any other process there is left alone."""
    db = StateDB(geotrain_home)
    other = sleeper()  # whatever got the dead controller's pid
    legacy = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)",
                               "-m", "geotrain.controller", run_id], stdin=subprocess.DEVNULL)
    try:
        db.update_run(run_id, state="running", controller_pid=other.pid, controller_started=None)
        assert not controller_alive(db.run(run_id)) and abandoned(db.run(run_id))
        assert prepare_resume(run_id, geotrain_home) == run_id
        assert down(run_id, geotrain_home)["state"] == "stopped"
        time.sleep(0.5)
        assert other.poll() is None  # never signalled

        db.update_run(run_id, state="running", controller_pid=legacy.pid, controller_started=None)
        assert controller_alive(db.run(run_id))
        with pytest.raises(GeotrainError, match=f"still controlled by pid {legacy.pid}"):
            prepare_resume(run_id, geotrain_home)
        assert not controller_alive(dict(db.run(run_id), id="someotherrun"))  # another run's
        assert down(run_id, geotrain_home)["state"] == "stopped"
        assert legacy.wait(timeout=30) == -signal.SIGTERM
    finally:
        stop(other)
        stop(legacy)


@pytest.mark.timeout(60)
def test_an_old_state_db_gets_the_start_time_column_and_owner_only_modes(tmp_path: Path):
    home = tmp_path / "old-home"
    home.mkdir(mode=0o755)
    os.chmod(home, 0o755)
    old_schema = SCHEMA  # the first release's tables, without any added column
    with sqlite3.connect(home / "state.db") as c:
        c.executescript(old_schema)
        c.execute("INSERT INTO runs (id, name, state, controller_pid) VALUES ('r1', 'old', 'running', 12345)")
    os.chmod(home / "state.db", 0o644)
    db = StateDB(home)
    assert "controller_started" in {r[1] for r in sqlite3.connect(home / "state.db")
                                    .execute("PRAGMA table_info(runs)")}
    row = db.run("r1")
    assert row["controller_pid"] == 12345 and row["controller_started"] is None
    assert mode(home) == 0o700 and mode(home / "state.db") == 0o600
    for extra in ("state.db-wal", "state.db-shm"):
        if (home / extra).exists():
            assert mode(home / extra) == 0o600
    StateDB(home)  # opening it again changes nothing
    assert db.run("r1")["controller_started"] is None


def test_opening_the_state_db_while_sqlite_removes_its_side_files_is_no_error(tmp_path: Path, monkeypatch):
    """SQLite deletes state.db-wal/-shm when the last connection closes, so a file seen
    a moment ago may be gone when its mode is checked: `geotrain status` beside a busy
    controller once died there (FileNotFoundError, exit 1)."""
    home = tmp_path / "home"
    StateDB(home)
    real_exists = Path.exists
    monkeypatch.setattr(Path, "exists", lambda self: self.name.endswith(("-wal", "-shm", "-journal"))
                        or real_exists(self))  # seen, then gone
    for name in ("state.db-wal", "state.db-shm", "state.db-journal"):
        (home / name).unlink(missing_ok=True)
    StateDB(home)


# -- the notice endpoint's secret --------------------------------------------------------------


@pytest.mark.timeout(60)
def test_notice_control_endpoints_need_the_secret():
    with NoticeServer("aws", control_secret="s3cret") as s:
        action = f"{s.url}/latest/meta-data/spot/instance-action"

        def served() -> int:
            token = http("PUT", f"{s.url}/latest/api/token",
                         {"X-aws-ec2-metadata-token-ttl-seconds": "60"})[2].decode()
            return http("GET", action, {"X-aws-ec2-metadata-token": token})[0]

        for headers in ({}, {SECRET_HEADER: ""}, {SECRET_HEADER: "wrong"}, {SECRET_HEADER: "s3cre"}):
            assert http("POST", f"{s.url}/_geotrain/preempt?in_s=10", headers)[0] == 403
            assert http("POST", f"{s.url}/_geotrain/rebalance", headers)[0] == 403
        assert served() == 404  # refused: no notice
        assert http("POST", f"{s.url}/_geotrain/preempt?in_s=10", {SECRET_HEADER: "s3cret"})[0] == 200
        assert served() == 200
        assert http("POST", f"{s.url}/_geotrain/clear", {"X-Geotrain-Secret": "nope"})[0] == 403
        assert served() == 200  # still there
    with NoticeServer("gcp") as s:  # no secret given: a random one, still required
        assert len(s.control_secret) >= 32
        assert http("POST", f"{s.url}/_geotrain/preempt")[0] == 403
        assert http("GET", f"{s.url}/computeMetadata/v1/instance/preempted",
                    {"Metadata-Flavor": "Google"})[2] == b"FALSE"


# -- a real local site, through the CLI ----------------------------------------------------------

SITE_RECIPE = """\
name: secure
model: {preset: tiny, n_layer: 1, d_model: 32, n_head: 2}
train: {rounds: 2, inner_steps: 1000000, batch_size: 2, seq_len: 16, lr: 4.0e-3, warmup_steps: 5}
sites:
  - {name: a, provider: local}
"""


def site_temp_dirs(run_id: str) -> list[Path]:
    base = local.TEMP_ROOT / f"gt-{os.getuid()}"
    out = []
    for d in base.iterdir() if base.is_dir() else []:
        try:
            if json.loads((d / local.TEMP_MARKER).read_text())["run"] == run_id:
                out.append(d)
        except (OSError, ValueError, KeyError):
            pass
    return out


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_local_site_files_are_owner_only_and_its_notice_endpoint_needs_the_secret(tmp_path: Path):
    home = tmp_path / "home"  # made by the CLI, under a umask that leaves files world-readable
    env = dict(os.environ, GEOTRAIN_HOME=str(home))
    env.pop("GEOTRAIN_PROVIDER", None)
    recipe = tmp_path / "secure.yaml"
    recipe.write_text(SITE_RECIPE)

    def cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        p = subprocess.run(geotrain_cmd(*args), capture_output=True, text=True, timeout=timeout,
                           env=env, umask=0o022)
        assert p.returncode == 0, (args, p.stdout[-2000:], p.stderr[-2000:])
        return p

    run_id = json.loads(cli("launch", str(recipe), "--detach", "--json").stdout)["run"]
    db = StateDB(home)
    controller = db.run(run_id)
    try:
        assert controller["controller_started"] == procs.start_time(controller["controller_pid"])

        def agent_with_ray() -> int | None:
            for node in local.query(run_id, "a"):
                temp = procs.tags(node.pid).get("GEOTRAIN_TEMP_DIR")
                if temp and (Path(temp) / "session_latest" / "sockets" / "raylet").exists():
                    return node.pid
            return None

        agent = wait_for(agent_with_ray, 240)
        tags = procs.tags(agent)
        temp = Path(tags["GEOTRAIN_TEMP_DIR"])
        # Owner-only: the home, the db, the logs, the site's temp dir and the dir above it.
        assert mode(home) == 0o700 and mode(home / "state.db") == 0o600
        logs = home / "logs" / run_id
        assert mode(logs) == 0o700
        assert mode(logs / "controller.log") == 0o600 and mode(logs / "a.log") == 0o600
        # Ray makes its temp dir 0777 (try_make_directory_shared); the owner-only directory
        # above it is what keeps other users out, so that is what must hold.
        base = temp.parent
        assert base == local.TEMP_ROOT / f"gt-{os.getuid()}" and not base.is_symlink()
        assert mode(base) == 0o700 and base.stat().st_uid == os.getuid()
        assert mode(temp / local.TEMP_MARKER) == 0o600
        # Short: /tmp/gt-<uid>/ and mkdtemp's 8 random characters; Ray's unix sockets in it
        # stay under the ~107-character limit.
        assert len(str(temp)) == len(f"/tmp/gt-{os.getuid()}/") + 8
        sockets = list((temp / "session_latest" / "sockets").iterdir())
        assert sockets and all(len(str(p.resolve())) < 100 for p in sockets), sockets

        # The site's notice endpoint: no secret or a wrong one → 403, and no notice is served.
        endpoint = tags["GEOTRAIN_METADATA_ENDPOINT"]
        secret = tags[SECRET_ENV]
        assert len(secret) >= 32
        for headers in ({}, {SECRET_HEADER: "0" * len(secret)}):
            assert http("POST", f"{endpoint}/_geotrain/preempt?in_s=5", headers)[0] == 403
        token = http("PUT", f"{endpoint}/latest/api/token",
                     {"X-aws-ec2-metadata-token-ttl-seconds": "60"})[2].decode()
        action = f"{endpoint}/latest/meta-data/spot/instance-action"
        assert http("GET", action, {"X-aws-ec2-metadata-token": token})[0] == 404
        # The site's own secret is the one its endpoint takes (clear: nothing to drain).
        assert http("POST", f"{endpoint}/_geotrain/clear", {SECRET_HEADER: secret})[0] == 200
        assert http("GET", action, {"X-aws-ec2-metadata-token": token})[0] == 404
        assert secret not in (logs / "a.log").read_text(errors="replace")

        # The agent is killed outright: it cannot remove its temp dir; terminate must.
        os.kill(agent, signal.SIGKILL)
        cli("down", run_id, timeout=180)
        assert not temp.exists() and site_temp_dirs(run_id) == []
        assert local.processes(run_id) == []
        assert not controller_alive(db.run(run_id))
    finally:
        row = db.run(run_id)
        if row["controller_started"] is not None:
            procs.signal_if_same(row["controller_pid"], row["controller_started"], signal.SIGKILL)
        local.terminate(local.query(run_id))
