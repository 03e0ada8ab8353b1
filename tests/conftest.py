"""Shared fixtures: a local S3 emulator (moto server, its conditional writes made
atomic as S3's: tests/atomic_moto.py) for the whole session;
GCS and Azure Blob emulators and the per-backend store URLs live in tests/emulators.py.

The server is started once, on a free port bound to 127.0.0.1, with dummy
credentials in the environment, and stopped through its own process handle.
"""

import os
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from tests.emulators import azurite, backend_url, gcs_emulator, missing, server_env, stop, store_urls  # noqa: F401 - fixtures

MOTO_SERVER = Path(sys.executable).with_name("moto_server")
# moto's server with S3's conditional writes atomic (tests/atomic_moto.py): run as
# MOTO_CMD + ["-H", host, "-p", port].
MOTO_CMD = [sys.executable, str(Path(__file__).with_name("atomic_moto.py"))]


def require_moto() -> None:
    """Skip (locally) or fail (in CI) when moto's server is not installed, as for
    every other emulator (tests/emulators.missing)."""
    if not MOTO_SERVER.exists():
        missing(f"moto_server (expected at {MOTO_SERVER})", "pip install -e '.[test]'")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, proc: subprocess.Popen, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"moto_server exited early with code {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"moto_server did not answer on port {port} within {timeout_s} s")


@pytest.fixture(scope="session", autouse=True)
def shared_bundle_cache(tmp_path_factory):
    """One cache of node bundles (the geotrain wheel, requirements) for the whole session:
    every test has its own GEOTRAIN_HOME, and each cloud launch would otherwise build the
    same wheel again. The CLI processes the tests start inherit it."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GEOTRAIN_BUNDLE_CACHE", str(tmp_path_factory.mktemp("bundles")))
        yield


@pytest.fixture(scope="session")
def moto_s3():
    """(endpoint_url, bucket) of a running moto server with one empty bucket."""
    require_moto()
    import boto3

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AWS_ACCESS_KEY_ID", "testing")
        mp.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        mp.setenv("AWS_SESSION_TOKEN", "testing")
        mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
        mp.delenv("AWS_PROFILE", raising=False)
        mp.setenv("NO_PROXY", "127.0.0.1,localhost")
        proc = subprocess.Popen([*MOTO_CMD, "-H", "127.0.0.1", "-p", str(port)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                env=server_env())
        try:
            wait_for_port(port, proc)
            bucket = f"geotrain-test-{uuid.uuid4().hex[:8]}"
            boto3.client("s3", endpoint_url=url, region_name="us-east-1").create_bucket(Bucket=bucket)
            yield url, bucket
        finally:
            stop(proc)


AWS_AMIS = Path(__file__).resolve().parent / "fakes" / "aws_amis.json"


@pytest.fixture(scope="session")
def moto_server():
    """Endpoint URL of a moto server for EC2/IAM/STS tests, its images loaded
    from tests/fakes/aws_amis.json (Deep Learning AMIs as AWS names them).
    Tests reset it with `POST <url>/moto-api/reset`."""
    require_moto()
    port = free_port()
    env = server_env(MOTO_AMIS_PATH=str(AWS_AMIS), NO_PROXY="127.0.0.1,localhost")
    proc = subprocess.Popen([*MOTO_CMD, "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    try:
        wait_for_port(port, proc)
        yield f"http://127.0.0.1:{port}"
    finally:
        stop(proc)


HEAVY_MODULES = ("test_boot_", "test_cloud_")


def pytest_collection_modifyitems(config, items):
    """The heavy tests (marked `slow`: real local sites, Ray clusters; and every test that
    boots or launches on the stand-in clouds) share one xdist group, so that under
    `-n 2 --dist loadgroup` (pyproject.toml) they run one at a time on one worker while
    the other runs the light tests beside them: never two clusters of sites at once on
    a 2-core machine. Without xdist the mark does nothing."""
    for item in items:
        if item.get_closest_marker("slow") or item.module.__name__.rpartition(".")[2].startswith(HEAVY_MODULES):
            item.add_marker(pytest.mark.xdist_group("heavy"))
