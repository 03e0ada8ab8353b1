"""A two-node site from the cloud boot script, on this machine.

The boot script is rendered for each cloud provider (it must render and quote
every value). Then the *Ray/agent steps* of one rendered script run for node 0
and node 1 as real processes: the script is run by bash as rendered, except for
exactly four edits that a cloud node needs and this machine can not do — no
tee into /var/log, no venv/pip install (the test's interpreter stands in for
/opt/geotrain/bin/python, also in the exec line), and PRIVATE_IP=127.0.0.1
instead of `hostname -I`. Each edit must match exactly once, so a changed
template fails here rather than being silently skipped. The node processes
carry RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 so that Ray keeps 127.0.0.1.
"""

from __future__ import annotations

import os
import re
import secrets
import shlex
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from geotrain import bootstrap, recipe, runs
from geotrain import procs as procs_mod
from geotrain.site.cluster import RayPorts
from geotrain.store import RunStore, run_url
from providers import SitePlan
from tests.helpers import (control_key_option, geotrain_home, listening_sockets,  # noqa: F401
                           member_key_of, tagged_processes, wait_for)

RECIPE = """\
name: multinode
model: {preset: tiny, n_layer: 2, d_model: 64, n_head: 4}
train: {rounds: 2, inner_steps: 8, batch_size: 4, seq_len: 64, lr: 4.0e-3, warmup_steps: 2}
# Rounds by wall time: the site trains for 16 s after its group forms, on any
# machine, so its ports are all still open when the test looks at them.
sync: {round_seconds: 8}
sites:
  - {name: a, provider: local, nodes: 2, workers: 1}
"""


def plan_for(provider: str, store_url: str, run_id: str, ray_port: int,
             *extra: tuple[str, str], member_key: str | None = None) -> SitePlan:
    return SitePlan(run_id, "a", provider, store_url, nodes=2, workers=1,
                    options=(("ray_port", str(ray_port)), *extra), member_key=member_key)


@pytest.mark.parametrize("provider", ["aws", "gcp", "azure"])
def test_boot_script_renders_and_quotes(provider: str):
    token = secrets.token_hex(32)
    evil = "file:///tmp/x'; touch /tmp/pwned; echo '"
    plan = SitePlan("run-1", "a", provider, evil, nodes=2, workers=1,
                    options=(("ray_port", "7000"), ("wheel_url", evil), ("wheel_sha256", "ab" * 32),
                             ("wheel_name", "geotrain-0.1.0-py3-none-any.whl"),
                             ("requirements_url", evil), ("requirements_sha256", "cd" * 32)))
    for i in (0, 1):
        script = bootstrap.render(plan, i, token)
        assert not re.search(r"\$\{?[a-z_]", script)  # every template value substituted
        assert f"WHEEL_URL={shlex.quote(evil)}\n" in script and "CODE_URL=''\n" in script
        assert f"export GEOTRAIN_NODE_INDEX={i}\n" in script and "export GEOTRAIN_NODES=2\n" in script
        assert f"export GEOTRAIN_PROVIDER={provider}\n" in script and "RAY_PORT=7000\n" in script
        assert f"STORE={shlex.quote(evil)}\n" in script  # one shell word, nothing runs
        assert '--host metadata --node-index "$GEOTRAIN_NODE_INDEX"' in script
        assert '--nodes "$GEOTRAIN_NODES" --ray-port "$RAY_PORT"' in script
        out = subprocess.run(["bash", "-n"], input=script, text=True, capture_output=True)
        assert out.returncode == 0, out.stderr
    with pytest.raises(ValueError):
        bootstrap.render(plan, 2, token)


def free_base_port() -> int:
    """A base port whose two nodes' port blocks (RayPorts) are all free now."""
    for _ in range(200):
        base = 20000 + 100 * secrets.randbelow(100)
        ports = [p for i in (0, 1) for p in range(base + 100 * i, base + 100 * i + 100)]
        try:
            for p in ports:
                with socket.socket() as s:
                    s.bind(("127.0.0.1", p))
        except OSError:
            continue
        return base
    raise RuntimeError("no free port block")


def runnable(script: str, python: str) -> str:
    """The rendered script with only the steps a cloud node needs replaced: no
    install (tests/test_boot_aws.py boots the whole script), the private address given."""
    edits = [(r'^exec > >\(tee -a "\$ROOT/var/log/geotrain-boot\.log"\) 2>&1\n', ""),
             (r'^mkdir -p "\$ROOT/var/log" "\$ROOT/opt"\n', ""),
             (r'^if \[ ! -f "\$MARK" \]; then\n(.*\n)*?fi\n', ""),
             (r"--host metadata ", "--host 127.0.0.1 "),
             (r'^exec "\$VENV/bin/python" ', f"exec {shlex.quote(python)} ")]
    for pattern, repl in edits:
        script, n = re.subn(pattern, repl, script, flags=re.M)
        assert n == 1, f"boot template changed: {pattern!r} matched {n} times"
    return script


def store_objects(store: RunStore) -> list[bytes]:
    root = Path(store.root)
    return [p.read_bytes() for p in root.rglob("*") if p.is_file()]


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_two_node_site_from_boot_script(tmp_path: Path, geotrain_home: Path):
    path = tmp_path / "multinode.yaml"
    path.write_text(RECIPE)
    r = recipe.load(path)
    run_id = runs.create_run(r, str(path), geotrain_home)
    store_url = run_url(r.store_root(), run_id)
    store = RunStore(store_url)
    token = secrets.token_hex(32)
    base = free_base_port()
    plan = plan_for("aws", store_url, run_id, base, control_key_option(geotrain_home, run_id),
                    member_key=member_key_of(geotrain_home, run_id, "a"))

    env = dict(os.environ, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", PYTHONPATH=str(Path.cwd()))
    for name in ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_MODE", "GLOO_SOCKET_IFNAME"):
        env.pop(name, None)
    procs: list[subprocess.Popen] = []
    # The node's instance metadata stand-in, so the agent's AWS watcher has an endpoint.
    notice = subprocess.Popen([sys.executable, "-m", "geotrain.site.notice_server", "--provider",
                               "aws", "--port", "0"], stdout=subprocess.PIPE, env=env,
                              start_new_session=True)
    procs.append(notice)
    env["GEOTRAIN_METADATA_ENDPOINT"] = notice.stdout.readline().decode().strip()
    logs = [tmp_path / f"node{i}.log" for i in (0, 1)]
    try:
        for i in (1, 0):  # node 1 boots first and waits for the head's record
            script = runnable(bootstrap.render(plan, i, token), sys.executable)
            with open(logs[i], "wb") as log:
                procs.append(subprocess.Popen(["bash", "-c", script], env=env, stdout=log,
                                              stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                              start_new_session=True))
        group = wait_for(lambda: next((e for e in store.events(["a"]) if e["kind"] == "group"), None), 150)
        head = store.head("a")
        assert head.address == f"127.0.0.1:{base}" and head.state == "up"
        # Both nodes in one Ray cluster, one gloo rank on each.
        assert group["world"] == 2 and group["nodes"] == 2
        assert sorted(p["rank"] for p in group["ranks"]) == [0, 1]
        assert len({p["node_id"] for p in group["ranks"]}) == 2

        # Every port of the site (Ray's, the TCPStore's, gloo's) is on loopback only.
        pids = tagged_processes(run_id)
        socks = wait_for(lambda: listening_sockets(pids), 60)
        assert {a for _, a, _ in socks} == {"127.0.0.1"}, socks
        ports = {p for _, _, p in socks}
        n0, n1 = RayPorts.for_node(base, 0), RayPorts.for_node(base, 1)
        assert {n0.gcs, n0.node_manager, n0.object_manager, n1.node_manager, n1.object_manager} <= ports
        assert ports - set(range(base, base + 200)), "the TCPStore/gloo ports are listed too"

        done = wait_for(lambda: next((e for e in store.events(["a"]) if e["kind"] in ("done", "failed")),
                                     None), 150)
        assert done["kind"] == "done", done
        assert done["ranks_done"] == 2 and done["round"] == 2
        assert store.committed_rounds() == [0, 1, 2]
        for p in procs[1:]:
            assert p.wait(timeout=60) == 0
        assert store.head("a").state == "down"
        # Ray's processes end after their agent (it signals them, then exits); on a busy
        # 2-core machine that can take a while, so the wait is a hang detector.
        try:
            wait_for(lambda: tagged_processes(run_id) == [], 120)
        except TimeoutError:
            left = {pid: procs_mod.cmdline(pid) for pid in tagged_processes(run_id)}
            raise AssertionError(f"processes of the site outlived its agents: {left}") from None

        secret = token.encode()
        assert not any(secret in data for data in store_objects(store))
        for log in logs:
            assert secret not in log.read_bytes()
        assert b"node 1 left: " in logs[1].read_bytes()
    finally:
        for p in procs:  # our own process groups, by pid
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        for pid in tagged_processes(run_id):  # anything of this run that outlived its group
            os.kill(pid, signal.SIGKILL)
        assert wait_for(lambda: tagged_processes(run_id) == [], 30)  # SIGKILLed: gone once reaped
