"""A run store that does not exist or cannot be written is refused by `geotrain launch`
before anything is created: one line naming the URL and what to do, exit 1, no
traceback, `--json` gives {"error": ...}, and the state db holds no run.

Against the real emulators (moto S3, gcp-storage-emulator, Azurite; tests/conftest.py,
tests/emulators.py), the CLI run as a subprocess as a user would.
"""

from __future__ import annotations

import json
import os
import subprocess
import uuid
from pathlib import Path

import pytest

from geotrain.errors import StoreError
from geotrain.store import RunStore
from geotrain.store_check import check_writable
from tests.helpers import geotrain_cmd, geotrain_home  # noqa: F401

pytestmark = pytest.mark.timeout(180)

RECIPE = """\
name: pf
store: {{url: "{url}"}}
sites: [{{name: a, provider: local}}]
"""


def cli(env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(geotrain_cmd(*args), capture_output=True, text=True, timeout=120, env=env)


def unwritable(scheme: str, request, tmp_path: Path, env: dict) -> tuple[str, str]:
    """(store root URL that cannot hold a run, a phrase its refusal must contain)."""
    missing = f"geotrain-missing-{uuid.uuid4().hex[:8]}"
    if scheme == "s3":
        endpoint, _ = request.getfixturevalue("moto_s3")
        env.update(AWS_ENDPOINT_URL_S3=endpoint, AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
                   AWS_DEFAULT_REGION="us-east-1", NO_PROXY="127.0.0.1,localhost")
        return f"s3://{missing}/runs", f"bucket '{missing}' does not exist"
    if scheme in ("gs", "az"):
        emulator = request.getfixturevalue({"gs": "gcs_emulator", "az": "azurite"}[scheme])
        env.update(emulator.env)
        kind = "bucket" if scheme == "gs" else "container"
        return f"{scheme}://{missing}/runs", f"{kind} '{missing}' does not exist"
    blocker = tmp_path / "not-a-folder"  # tests run as root: a file in the way, not a mode
    blocker.write_text("x")
    return f"file://{blocker}/runs", "a file is in its way"


@pytest.mark.parametrize("scheme", ["s3", "gs", "az", "file"])
def test_launch_refuses_a_store_it_cannot_write_before_creating_anything(scheme, request, tmp_path: Path,
                                                                         geotrain_home: Path):
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("AWS_", "GOOGLE_", "AZURE_", "STORAGE_EMULATOR", "GEOTRAIN_"))}
    env.update(GEOTRAIN_HOME=str(geotrain_home), COLUMNS="80")
    url, why = unwritable(scheme, request, tmp_path, env)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPE.format(url=url))

    p = cli(env, "launch", str(recipe))
    assert p.returncode == 1, p.stdout + p.stderr
    assert "Traceback" not in p.stdout + p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1, p.stderr
    assert f"store {url}:" in lines[0] and why in lines[0], lines[0]
    assert "create it" in lines[0] or "set store.url" in lines[0]

    p = cli(env, "launch", str(recipe), "--json")
    assert p.returncode == 1 and "Traceback" not in p.stdout + p.stderr
    error = json.loads(p.stdout)["error"]
    assert error["error"] == "StoreError" and url in error["message"] and why in error["message"]

    runs = cli(env, "status", "--json")
    assert runs.returncode == 0 and json.loads(runs.stdout) == []  # no run row
    assert not (geotrain_home / "runs").exists() and not (geotrain_home / "logs").exists()
    if scheme == "s3":  # the check did not create the bucket either
        import boto3
        from botocore.exceptions import ClientError

        s3 = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL_S3"], region_name="us-east-1",
                          aws_access_key_id="testing", aws_secret_access_key="testing")
        with pytest.raises(ClientError):
            s3.head_bucket(Bucket=url.split("/")[2])


def test_a_writable_store_passes_and_keeps_no_probe(backend_url):
    check_writable(backend_url)
    assert RunStore(backend_url).keys() == []


@pytest.mark.parametrize("error, phrase", [
    (PermissionError("Access Denied"), "refused (access denied or bad credentials"),
    (type("NoCredentialsError", (Exception,), {})("Unable to locate credentials"), "no credentials"),
])
def test_denied_and_no_credentials_say_what_to_do(monkeypatch, error, phrase):
    from geotrain import store_check

    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr(store_check.fsspec.core, "url_to_fs", fail)
    with pytest.raises(StoreError) as e:
        check_writable("s3://team-bucket/runs")
    line = str(e.value)
    assert "\n" not in line and line.startswith("store s3://team-bucket/runs:") and phrase in line
    assert "AWS_PROFILE" in line  # the action names the credentials boto reads
