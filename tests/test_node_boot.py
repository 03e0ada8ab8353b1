"""The boot script on a stand-in node, without a cloud: what it refuses, and how it says so.

A node that cannot boot reports on its console in one `geotrain node: fatal:` line
(geotrain/site/node_info.py), which the controller reads through the provider's
console API. The whole boot on the AWS stand-in, to a trained run, is
tests/test_boot_aws.py.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
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


def _tiny_wheel(tmp_path: Path) -> Path:
    """A three-line distribution built with setuptools: what a lock adds beyond the image."""
    src = tmp_path / "tiny-src"
    (src / "gt_tiny").mkdir(parents=True)
    (src / "gt_tiny" / "__init__.py").write_text("ANSWER = 42\n")
    (src / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["setuptools"]\nbuild-backend = "setuptools.build_meta"\n'
        '[project]\nname = "gt-tiny"\nversion = "1.0"\n')
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps",
                    "--no-build-isolation", "--disable-pip-version-check", "--wheel-dir",
                    str(wheels), str(src)], check=True, timeout=120)
    (wheel,) = wheels.glob("gt_tiny-1.0-*.whl")
    return wheel


@pytest.mark.parametrize("tiny_hash_ok", [True, False], ids=["true-hash", "wrong-hash"])
def test_a_lock_installs_only_files_with_its_hashes(tmp_path, served, tiny_hash_ok):
    """With train.requirements_lock the node installs with --require-hashes. What the
    image already has at the pinned version pip uses as it is, unchecked: every pin of
    geotrain's here carries a made-up hash and the node still boots. What pip does
    download is checked: a tiny package (from a local --find-links folder, no index)
    installs with its true hash; with a wrong one the node prints one fatal line
    naming it and installs nothing, not even the geotrain wheel."""
    root, url = served
    tiny = _tiny_wheel(tmp_path)
    true = hashlib.sha256(tiny.read_bytes()).hexdigest()
    tiny_hash = true if tiny_hash_ok else hashlib.sha256(b"something else").hexdigest()
    lock = tmp_path / "lock.txt"
    lock.write_text("".join(f"{n}=={v} \\\n    --hash=sha256:{'0' * 64}\n"  # the image's: skipped
                            for n, v in bundle.pinned_versions().items())
                    + f"gt-tiny==1.0 \\\n    --hash=sha256:{tiny_hash}\n    # the user's own\n")
    wheel = bundle.build_wheel(tmp_path / "cache")
    req = bundle.write_requirements(tmp_path / "cache", lock)
    (root / wheel.name).write_bytes(wheel.path.read_bytes())
    (root / "requirements.txt").write_bytes(req.path.read_bytes())
    plan = _plan(url, wheel, req, wheel.sha256)
    plan = SitePlan(plan.run_id, plan.site, plan.provider, plan.store_url,
                    options=(*plan.options, ("requirements_hashes", "true")))
    env = {"PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(tiny.parent)}
    node = BootedNode(f"i-lock-{tiny_hash_ok}", bootstrap.render(plan, 0, "t" * 64),
                      tmp_path / "node", node_image(tmp_path / "image"), env=env)
    venv = tmp_path / "node" / "opt" / "geotrain"
    node.start()
    try:
        if tiny_hash_ok:
            wait_for(lambda: list(venv.glob(".installed-*")) or not node.running(), 150, every=0.2)
            console = node.console_text()
            installed = {p.name for p in venv.glob("lib/python*/site-packages/*")}
            assert fatal_line(console) is None and list(venv.glob(".installed-*")), console
            assert "gt_tiny" in installed and "geotrain" in installed, console
        else:
            why = wait_for(lambda: fatal_line(node.console_text()), 150, every=0.2)
            wait_for(lambda: not node.running(), 60, every=0.2)
            console = " ".join(node.console_text().split())
            assert why == ("installing the pinned requirements failed: ERROR: THESE PACKAGES DO "
                           "NOT MATCH THE HASHES FROM THE REQUIREMENTS FILE: gt-tiny==1.0"), console
            assert f"Expected sha256 {tiny_hash} Got {true}" in console, console
            installed = {p.name for p in venv.glob("lib/python*/site-packages/*")}
            assert "gt_tiny" not in installed and "geotrain" not in installed, installed
            assert not list(venv.glob(".installed-*"))
            assert node.proc.returncode != 0
    finally:
        node.stop()
    assert tagged_pids(f"i-lock-{tiny_hash_ok}") == []
