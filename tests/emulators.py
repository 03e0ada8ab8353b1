"""Object-store emulators for the tests: gcp-storage-emulator (GCS) and Azurite (Azure Blob).

Each is started once per test session on a free 127.0.0.1 port and stopped
through its own process handle. A test reaches them the way a site reaches a
real cloud: through each library's own environment variables
(`STORAGE_EMULATOR_HOST`, `AZURE_STORAGE_CONNECTION_STRING`), which
`env_for(...)` returns and the test sets for its own duration only.

Azurite is a Node package: `.ci/run` installs it into `.ci/node_modules`
(`GEOTRAIN_AZURITE` may name another `azurite-blob`). If an emulator is
missing the tests that need it skip, saying how to install it, except in CI
(`CI` or `GEOTRAIN_REQUIRE_EMULATORS` set), where they fail instead.
"""

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
AZURITE_VERSION = "3.37.0"  # what .ci/run installs
# The well-known development account every Azure Storage emulator accepts
# (documented by Microsoft; not a secret).
AZURITE_ACCOUNT = "devstoreaccount1"
AZURITE_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="


def emulators_required() -> bool:
    return any(os.environ.get(v, "").lower() not in ("", "0", "false")
               for v in ("CI", "GEOTRAIN_REQUIRE_EMULATORS"))


def missing(what: str, how: str) -> None:
    """Skip (locally) or fail (in CI) a test whose emulator is not installed."""
    message = f"{what} is not installed: {how}"
    if emulators_required():
        pytest.fail(f"{message} (CI requires every emulator)", pytrace=False)
    pytest.skip(message)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(name: str, port: int, proc: subprocess.Popen, timeout_s: float = 60.0) -> float:
    """Seconds until the port answers; raises if the process dies or never answers."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited early with code {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return time.monotonic() - t0
        except OSError:
            time.sleep(0.02)
    raise RuntimeError(f"{name} did not answer on port {port} within {timeout_s} s")


def server_env(**extra: str) -> dict[str, str]:
    """The environment of a session-long server (an emulator, moto): this process's, less
    every GEOTRAIN_* variable. A session fixture starts its server while some test runs,
    and that test's GEOTRAIN_HOME (or a run's tags) in the server's environment would make
    the server one of that test's processes: the `geotrain_home` teardown kills what
    runs under its home, and a server killed there fails every later test that uses it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GEOTRAIN_")}
    return dict(env, **extra)


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@dataclass(frozen=True)
class Emulator:
    """A running emulator: its endpoint, one empty bucket/container, the
    environment a client needs to reach it, and how long it took to start."""

    endpoint: str
    bucket: str
    env: dict[str, str]
    started_in_s: float


def start_gcs(preconditions: bool = True):
    """A generator yielding a running gcp-storage-emulator (see tests/gcs_emulator.py)."""
    exe = Path(sys.executable).with_name("gcp-storage-emulator")
    if not exe.exists():
        missing("gcp-storage-emulator", "pip install -e '.[test]'")
    port = free_port()
    args = ["start", "--host", "127.0.0.1", "--port", str(port), "--in-memory", "--quiet"]
    cmd = [sys.executable, "-m", "tests.gcs_emulator", *args] if preconditions else [str(exe), *args]
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=server_env())
    try:
        wait_for_port("gcp-storage-emulator", port, proc)
        import gcsfs

        endpoint = f"http://127.0.0.1:{port}"
        bucket = f"geotrain-test-{uuid.uuid4().hex[:8]}"
        gcsfs.GCSFileSystem(endpoint_url=endpoint, token="anon", skip_instance_cache=True).mkdir(bucket)
        yield Emulator(endpoint, bucket, {"STORAGE_EMULATOR_HOST": endpoint}, time.monotonic() - t0)
    finally:
        stop(proc)


def azurite_binary() -> str | None:
    for candidate in (os.environ.get("GEOTRAIN_AZURITE"), str(ROOT / ".ci/node_modules/.bin/azurite-blob"),
                      shutil.which("azurite-blob")):
        if candidate and Path(candidate).exists():
            return candidate
    return None


def azurite_connection_string(endpoint: str) -> str:
    return (f"DefaultEndpointsProtocol=http;AccountName={AZURITE_ACCOUNT};AccountKey={AZURITE_KEY};"
            f"BlobEndpoint={endpoint}/{AZURITE_ACCOUNT};")


def start_azurite():
    exe = azurite_binary()
    if exe is None:
        missing("Azurite", f"npm install --prefix .ci --no-save azurite@{AZURITE_VERSION} "
                           "(or set GEOTRAIN_AZURITE to an azurite-blob)")
    port = free_port()
    data = tempfile.mkdtemp(prefix="gt-azurite-")
    t0 = time.monotonic()
    proc = subprocess.Popen([exe, "--blobHost", "127.0.0.1", "--blobPort", str(port), "--location", data,
                             "--skipApiVersionCheck", "--loose", "--disableTelemetry"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=server_env())
    try:
        wait_for_port("azurite-blob", port, proc)
        from azure.storage.blob import BlobServiceClient

        endpoint = f"http://127.0.0.1:{port}"
        conn = azurite_connection_string(endpoint)
        container = f"geotrain-test-{uuid.uuid4().hex[:8]}"
        BlobServiceClient.from_connection_string(conn).create_container(container)
        yield Emulator(endpoint, container, {"AZURE_STORAGE_CONNECTION_STRING": conn}, time.monotonic() - t0)
    finally:
        stop(proc)
        shutil.rmtree(data, ignore_errors=True)


@pytest.fixture(scope="session")
def gcs_emulator():
    """gcp-storage-emulator (with GCS's ifGenerationMatch check) and one empty bucket."""
    yield from start_gcs(preconditions=True)


@pytest.fixture(scope="session")
def azurite():
    """Azurite's blob service and one empty container."""
    yield from start_azurite()


BACKENDS = ("file", "s3", "gs", "az")


@pytest.fixture
def store_urls(request, tmp_path, monkeypatch):
    """make(scheme) -> a fresh, empty run-store URL on that backend.

    The backend's emulator is started (once per session) on first use and its
    environment is set for this test only, so `RunStore(url)` needs no
    arguments, exactly as on a cloud node."""

    def make(scheme: str) -> str:
        name = f"run-{uuid.uuid4().hex[:8]}"
        if scheme == "file":
            return "file://" + str(tmp_path / name)
        if scheme == "s3":
            endpoint, bucket = request.getfixturevalue("moto_s3")
            monkeypatch.setenv("AWS_ENDPOINT_URL_S3", endpoint)
            return f"s3://{bucket}/{name}"
        emulator = request.getfixturevalue({"gs": "gcs_emulator", "az": "azurite"}[scheme])
        for k, v in emulator.env.items():
            monkeypatch.setenv(k, v)
        return f"{scheme}://{emulator.bucket}/{name}"

    return make


@pytest.fixture(params=BACKENDS)
def backend_url(request, store_urls):
    """A fresh run-store URL on each backend in turn (file, s3, gs, az)."""
    return store_urls(request.param)
