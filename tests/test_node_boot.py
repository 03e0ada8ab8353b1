"""The boot script on a stand-in node, without a cloud: what it refuses, and how it says so.

A node that cannot boot reports on its console in one `geotrain node: fatal:` line
(geotrain/site/node_info.py), which the controller reads through the provider's
console API. The whole boot on the AWS stand-in, to a trained run, is
tests/test_boot_aws.py.
"""

from __future__ import annotations

import hashlib
import threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from geotrain import bootstrap, bundle
from geotrain.site.node_info import FATAL_MAX, fatal_line
from providers import SitePlan
from tests.fakes.node import BootedNode, node_image, tagged_pids
from tests.helpers import wait_for

pytestmark = pytest.mark.timeout(180)


def test_fatal_line_is_the_first_cleaned_and_bounded():
    console = ("cloud-init: starting\n"
               "geotrain node: fatal: wheel has sha256 00, expected 11: refusing it\x1b[31m\n"
               "geotrain node: fatal: boot step failed (exit 1, line 80): fetch ...\n")
    assert fatal_line(console) == "wheel has sha256 00, expected 11: refusing it [31m"
    assert fatal_line("all well\n") is None and fatal_line(None) is None
    long = fatal_line(b"x geotrain node: fatal: " + b"a" * 5000)
    assert len(long) == FATAL_MAX + 1 and long.endswith("…")
    assert fatal_line("geotrain node: fatal:    \n") == "(no reason given)"


@pytest.fixture
def served(tmp_path):
    """A directory served over HTTP on 127.0.0.1 (the run store's signed URLs, here)."""
    root = tmp_path / "www"
    root.mkdir()
    server = ThreadingHTTPServer(("127.0.0.1", 0),
                                 partial(SimpleHTTPRequestHandler, directory=str(root)))
    server.RequestHandlerClass.log_message = lambda *a: None
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield root, f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()


def _plan(url: str, wheel: bundle.Artifact, req: bundle.Artifact, wheel_sha: str) -> SitePlan:
    return SitePlan("run-1", "a", "aws", "s3://b/runs/run-1", options=(
        ("wheel_url", f"{url}/{wheel.name}"), ("wheel_sha256", wheel_sha),
        ("wheel_name", wheel.name), ("requirements_url", f"{url}/requirements.txt"),
        ("requirements_sha256", req.sha256)))


def test_a_tampered_wheel_is_refused_and_the_console_says_why(tmp_path, served):
    """The store (or anyone between) serves bytes that are not what the operator
    built: the node installs nothing and prints one fatal line, then stops."""
    root, url = served
    wheel = bundle.build_wheel(tmp_path / "cache")
    req = bundle.write_requirements(tmp_path / "cache")
    (root / wheel.name).write_bytes(wheel.path.read_bytes() + b"tampered")
    (root / "requirements.txt").write_bytes(req.path.read_bytes())
    script = bootstrap.render(_plan(url, wheel, req, wheel.sha256), 0, "t" * 64)
    node = BootedNode("i-tampered", script, tmp_path / "node", node_image(tmp_path / "image"))
    node.start()
    try:
        wait_for(lambda: not node.running(), 120, every=0.2)
        assert node.proc.returncode != 0
        why = fatal_line(node.console_text())
        bad = hashlib.sha256(wheel.path.read_bytes() + b"tampered").hexdigest()
        assert why == f"{wheel.name} has sha256 {bad}, expected {wheel.sha256}: refusing it", \
            node.console_text()
        assert not (tmp_path / "node" / "opt" / "geotrain" / "bin").exists()  # no venv, no install
        assert not list((tmp_path / "node" / "opt" / "geotrain-boot").glob("*.whl"))
    finally:
        node.stop()
    assert tagged_pids("i-tampered") == []


def test_an_unreachable_store_is_a_fatal_line_not_a_hang(tmp_path, served, monkeypatch):
    root, url = served
    wheel = bundle.build_wheel(tmp_path / "cache")
    req = bundle.write_requirements(tmp_path / "cache")
    # Nothing is served under these names: every fetch gets a 404 (the retries back off).
    script = bootstrap.render(_plan(url + "/gone", wheel, req, wheel.sha256), 0, "t" * 64)
    script = script.replace("attempt < 6", "attempt < 2")  # two tries, not six, for the test
    node = BootedNode("i-unreachable", script, tmp_path / "node", node_image(tmp_path / "image"))
    node.start()
    try:
        wait_for(lambda: not node.running(), 120, every=0.2)
        why = fatal_line(node.console_text())
        assert why and why.startswith(f"could not fetch {wheel.name} from the run store"), \
            node.console_text()
    finally:
        node.stop()


SCOPE = ("/subscriptions/0000/resourceGroups/store/providers/Microsoft.Storage/storageAccounts/"
         "acct/blobServices/default/containers/runs")


def test_a_role_granted_at_launch_is_waited_for_other_refusals_are_final(tmp_path, served):
    """An Azure VM whose own identity launch grants the store right after creating it
    is refused until the assignment applies (minutes on Azure): its fetch keeps asking,
    saying why, and boots once the store lets it in. Everywhere else a refusal is final
    at once, so a node without access is reported, not left retrying."""
    from providers.azure.options import AzureOptions

    root, url = served
    wheel = bundle.build_wheel(tmp_path / "cache")
    req = bundle.write_requirements(tmp_path / "cache")
    (root / wheel.name).write_bytes(wheel.path.read_bytes())
    (root / "requirements.txt").write_bytes(req.path.read_bytes())
    refusals = {"left": 2}

    class Refusing(SimpleHTTPRequestHandler):
        def do_GET(self):  # the first two requests: Azure's 403 for a role not yet applied
            if refusals["left"] > 0:
                refusals["left"] -= 1
                body = (b"<?xml version=\"1.0\"?><Error><Code>AuthorizationPermissionMismatch"
                        b"</Code><Message>This request is not authorized.</Message></Error>")
                self.send_response(403)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
                return
            super().do_GET()

        def log_message(self, *a):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(Refusing, directory=str(root)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    here = f"http://127.0.0.1:{server.server_port}"
    plan = _plan(here, wheel, req, wheel.sha256)
    azure = SitePlan("run-1", "a", "azure", "az://runs/run-1", options=plan.options,
                     provider_options=AzureOptions(identity="system", store_scope=SCOPE))
    assert bootstrap.access_grace_s(azure) == bootstrap.ROLE_APPLY_S
    assert bootstrap.access_grace_s(plan) == 0   # AWS: a refusal is final
    assert bootstrap.access_grace_s(SitePlan("run-1", "a", "azure", "az://runs/run-1", options=(
        ("wheel_url", here),), provider_options=AzureOptions(identity="system"))) == 0
    script = bootstrap.render(azure, 0, "t" * 64).replace("time.sleep(15)", "time.sleep(0.2)")
    node = BootedNode("i-role", script, tmp_path / "node", node_image(tmp_path / "image"))
    node.start()
    try:
        wait_for(lambda: "verified" in node.console_text() or not node.running(), 120, every=0.2)
        console = node.console_text()
        assert f"{wheel.name} verified" in console, console
        assert console.count("can take minutes to apply: retrying") == 2, console
        assert "AuthorizationPermissionMismatch" in console and fatal_line(console) is None
    finally:
        node.stop()
        server.shutdown()
        server.server_close()
    assert tagged_pids("i-role") == []
