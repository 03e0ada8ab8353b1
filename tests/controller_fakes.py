"""The faked clouds and controller that the controller-path tests share
(tests/test_controller_paths.py, tests/test_controller_migrate.py).

Providers are faked (`Cloud`: which nodes each one holds, every terminate call); a
`Faked` controller (tests/fake_controller.py `Ticked`) records its launches and
answers them from `Cloud`. The fixtures give a small run (`run_id`), its controller
(`ctl`), that controller with both sites launched (`launched`) and a live process to
stand for another controller (`live_pid`); `cli` and `one_line_error` run `geotrain`
and check a user's mistake is one line. A test module uses a fixture by importing it,
with tests.helpers' `geotrain_home`, which `run_id` and `ctl` need.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

import geotrain.controller as controller_mod
import providers
from geotrain.recipe import Placement
from providers import Node
from tests.fake_controller import Ticked, tiny_run
from tests.helpers import geotrain_cmd


class Cloud:
    """Every provider at once, faked: the nodes each holds, each terminate call."""

    def __init__(self):
        self.held: list[Node] = []
        self.terminated: list[tuple[str, str, str]] = []  # (provider, member, instance id)

    def get(self, name: str):
        if name not in providers.PROVIDERS:
            raise ValueError(f"unknown provider {name!r}")
        cloud = self

        class Provider:
            @staticmethod
            def query(run_id, site=None, regions=None):
                return [n for n in cloud.held if n.provider == name and n.run_id == run_id
                        and (site is None or n.site == site)]

            @staticmethod
            def terminate(nodes):
                for n in nodes:
                    cloud.terminated.append((name, n.site, n.instance_id))
                gone = {n.instance_id for n in nodes}
                cloud.held = [n for n in cloud.held if n.instance_id not in gone]
                return nodes
        return Provider

    def holds(self, member: str) -> list[str]:
        return [n.instance_id for n in self.held if n.site == member]


class Faked(Ticked):
    """A controller whose launches are recorded and answered by `Cloud`."""

    def __init__(self, run_id: str, home: Path, cloud: Cloud):
        super().__init__(run_id, home)
        self.cloud = cloud
        self.launches: list[tuple[str, str, str, str | None]] = []  # (site, member, provider, region)
        self.dead_on_launch: set[str] = set()  # sites whose node is gone as soon as launched

    def _launch_spec(self, name, spec):
        self.launches.append((name, spec.name, spec.provider, spec.region))
        row = self.db.add_node(self.run_id, spec.name, spec.provider, spec.region)
        node = Node(self.run_id, spec.name, spec.provider, f"{spec.provider}-{row}", "running",
                    pid=100000 + row, region=spec.region)
        self.db.update_node(row, instance_id=node.instance_id, state="running")
        if name not in self.dead_on_launch:
            self.cloud.held.append(node)
        return [node], Placement(provider=spec.provider, region=spec.region,
                                 instance_type=spec.instance_type, spot=spec.spot)

    def step(self) -> None:
        """What one tick of `watch` does for migrations."""
        self._poll_requests()
        self._advance_migrations()
        self._advance_store_migration()

    def events(self, kind: str | None = None) -> list[dict]:
        return [e for e in self.store.events([]) if kind is None or e["kind"] == kind]

    def node_rows(self, member: str) -> list[str]:
        return [r["state"] for r in self.db.nodes(self.run_id) if r["site"] == member]


@pytest.fixture
def cloud(monkeypatch: pytest.MonkeyPatch) -> Cloud:
    c = Cloud()
    monkeypatch.setattr(providers, "get", c.get)
    monkeypatch.setattr(controller_mod, "POLL_S", 0.01)
    return c


@pytest.fixture
def run_id(geotrain_home: Path, tmp_path: Path) -> str:
    return tiny_run(geotrain_home, tmp_path, "paths", liveness_timeout_s=60, boot_timeout_s=600)


@pytest.fixture
def ctl(run_id: str, geotrain_home: Path, cloud: Cloud) -> Faked:
    return Faked(run_id, geotrain_home, cloud)


@pytest.fixture
def launched(ctl: Faked) -> Faked:
    """Both sites launched, their nodes up."""
    ctl.provision()
    assert [x[:2] for x in ctl.launches] == [("a", "a"), ("b", "b")]
    return ctl


@pytest.fixture
def live_pid():
    """A real process that is not this one, to stand for a live controller."""
    proc = subprocess.Popen(["sleep", "60"])
    try:
        yield proc.pid
    finally:
        proc.kill()
        proc.wait(timeout=10)


def cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(geotrain_cmd(*args), capture_output=True, text=True, timeout=timeout)


def one_line_error(p: subprocess.CompletedProcess) -> str:
    """A user's mistake: exit 1, one line on stderr, no traceback."""
    assert p.returncode == 1, (p.returncode, p.stdout, p.stderr)
    assert "Traceback" not in p.stdout + p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), p.stderr
    return lines[0]
