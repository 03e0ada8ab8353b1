"""The provider contract (providers/__init__.py `Provider`), checked on every provider,
`local` included: the same functions with the same signatures, capabilities that say
what the module really has, a `check()` that never raises and never shows a secret
(run with every cloud endpoint pointed at 127.0.0.1:9, so nothing reaches a cloud),
and a `terminate([])` that calls nothing.

Launching through the local provider is covered by tests/test_local_run.py.
"""

from __future__ import annotations

import importlib
import inspect
import json
import subprocess
import sys
import types
from dataclasses import fields
from pathlib import Path

import pytest

import providers
from providers import Capabilities, Console, CredentialCheck, FaultSeams, Provider, RunResources

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parents[1]
DEAD = "127.0.0.1:9"  # the discard port: nothing listens, every connection is refused at once
SECRETS = {
    "AWS_SECRET_ACCESS_KEY": "contract-aws-secret-key-0123456789abcdef",
    "AWS_SESSION_TOKEN": "contract-aws-session-token-0123456789abcdef",
    "IDENTITY_HEADER": "contract-azure-identity-header-0123456789",
    "client_secret": "contract-gcp-client-secret-0123456789",
    "refresh_token": "contract-gcp-refresh-token-0123456789",
}


def members(protocol: type) -> list[str]:
    """The functions a protocol declares."""
    return [n for n, v in vars(protocol).items() if inspect.isfunction(v) and not n.startswith("_")]


def shape(fn, is_method: bool = False) -> tuple:
    """(name, kind, default, annotation) of each parameter, and the return annotation."""
    sig = inspect.signature(fn)
    params = list(sig.parameters.values())[1 if is_method else 0:]
    return [(p.name, p.kind, p.default, p.annotation) for p in params], sig.return_annotation


def assert_implements(module: types.ModuleType, protocol: type) -> None:
    for name in members(protocol):
        assert inspect.isfunction(getattr(module, name, None)), f"{module.__name__} has no {name}()"
        assert shape(getattr(module, name)) == shape(getattr(protocol, name), is_method=True), \
            f"{module.__name__}.{name} differs from {protocol.__name__}.{name}"
    assert isinstance(module, protocol)


@pytest.mark.parametrize("name", providers.PROVIDERS)
def test_module_implements_the_protocol(name: str):
    module = importlib.import_module(f"providers.{name}")
    assert providers.get(name) is module
    assert members(Provider) == ["capabilities", "check", "launch", "query", "terminate",
                                 "open_ports", "query_all"]
    assert_implements(module, Provider)
    assert "providers/__init__.py" in module.__doc__  # says where the contract is documented


def test_get_refuses_an_unknown_name():
    for ask in (providers.get, providers.capabilities_of):
        with pytest.raises(ValueError, match="valid: local, aws, gcp, azure"):
            ask("nope")


@pytest.mark.parametrize("name", providers.PROVIDERS)
def test_capabilities_say_what_the_module_has(name: str):
    module = providers.get(name)
    caps = module.capabilities()
    assert isinstance(caps, Capabilities) and providers.capabilities_of(name) == caps
    assert all(isinstance(getattr(caps, f.name), bool) for f in fields(caps)), caps
    # A flag is true exactly when the module has the functions it stands for, as declared.
    assert caps.console == hasattr(module, "console")
    if caps.console:
        assert_implements(module, Console)
    assert caps.fault_seams == any(hasattr(module, f) for f in members(FaultSeams))
    if caps.fault_seams:
        assert_implements(module, FaultSeams)
    assert caps.run_resources == any(hasattr(module, f) for f in members(RunResources))
    if caps.run_resources:
        assert_implements(module, RunResources)


def test_the_capabilities_of_each_provider():
    caps = {name: providers.capabilities_of(name) for name in providers.PROVIDERS}
    assert [n for n, c in caps.items() if c.runs_here] == ["local"]
    assert [n for n, c in caps.items() if c.fault_seams] == ["local"]
    assert [n for n, c in caps.items() if c.console] == ["aws", "gcp", "azure"]
    assert [n for n, c in caps.items() if c.run_resources] == ["aws", "gcp"]
    assert all(c.spot and c.multi_node and c.preemption_notice and c.gpus
               for n, c in caps.items() if n != "local")


# -- check(): never raises, never a secret, nothing reaches a cloud ---------------------------

CHECK = ("import dataclasses, json, sys, providers; c = providers.get(sys.argv[1]).check(); "
         "print(json.dumps({'is_check': isinstance(c, providers.CredentialCheck), "
         "**dataclasses.asdict(c)}))")


def scrubbed_env(tmp: Path, credentials: bool) -> dict[str, str]:
    """An environment built from nothing: no cloud credential of this machine, no config
    file in a home directory, every endpoint (APIs, token and metadata services) dead;
    with `credentials`, dummy ones for each cloud (the secrets in SECRETS)."""
    env = {
        "PATH": str(Path(sys.executable).parent), "HOME": str(tmp), "LANG": "C.UTF-8",
        "PYTHONPATH": str(ROOT), "GEOTRAIN_HOME": str(tmp / "home"),
        # aws (boto3): the API, the config files, the instance metadata service
        "AWS_ENDPOINT_URL": f"http://{DEAD}", "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_CONFIG_FILE": str(tmp / "aws-config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp / "aws-credentials"),
        # gcp (google-auth): the API, gcloud's ADC file, the metadata server
        "GEOTRAIN_GCE_ENDPOINT": f"http://{DEAD}", "CLOUDSDK_CONFIG": str(tmp / "gcloud"),
        "GCE_METADATA_HOST": DEAD, "GCE_METADATA_IP": DEAD, "NO_GCE_CHECK": "true",
        # azure (DefaultAzureCredential): ARM, the managed-identity endpoints, the az CLI's files
        "GEOTRAIN_ARM_ENDPOINT": f"https://{DEAD}", "AZURE_CONFIG_DIR": str(tmp / "azure"),
        "IDENTITY_ENDPOINT": f"http://{DEAD}/msi/token",
        "IDENTITY_HEADER": SECRETS["IDENTITY_HEADER"],
        "AZURE_POD_IDENTITY_AUTHORITY_HOST": f"http://{DEAD}",
        "AZURE_AUTHORITY_HOST": f"https://{DEAD}",
    }
    if credentials:
        adc = tmp / "adc.json"
        adc.write_text(json.dumps({"type": "authorized_user",
                                   "client_id": "contract.apps.googleusercontent.com",
                                   "client_secret": SECRETS["client_secret"],
                                   "refresh_token": SECRETS["refresh_token"]}))
        env.update(AWS_ACCESS_KEY_ID="AKIACONTRACTTEST0001", AWS_DEFAULT_REGION="us-east-1",
                   AWS_SECRET_ACCESS_KEY=SECRETS["AWS_SECRET_ACCESS_KEY"],
                   AWS_SESSION_TOKEN=SECRETS["AWS_SESSION_TOKEN"],
                   GOOGLE_APPLICATION_CREDENTIALS=str(adc), GOOGLE_CLOUD_PROJECT="geotrain-contract",
                   AZURE_SUBSCRIPTION_ID="00000000-0000-0000-0000-0000000000cc")
    return env


@pytest.mark.parametrize("credentials", [False, True], ids=["none", "dummy"])
@pytest.mark.parametrize("name", providers.PROVIDERS)
def test_check_never_raises_nor_shows_a_secret(name: str, credentials: bool, tmp_path: Path):
    p = subprocess.run([sys.executable, "-c", CHECK, name], env=scrubbed_env(tmp_path, credentials),
                       cwd=ROOT, capture_output=True, text=True, timeout=90)
    assert p.returncode == 0, p.stderr
    result = json.loads(p.stdout)
    assert result.pop("is_check") and result["provider"] == name, result
    assert isinstance(result["ok"], bool) and result["detail"], result
    for secret in SECRETS.values():
        assert secret not in p.stdout and secret not in p.stderr
    if name != "local":
        assert DEAD in result["detail"], result  # it says where it looked: the dead endpoint
        if not credentials:
            assert not result["ok"], result
    else:
        assert result["ok"], result


# -- terminate([]) ---------------------------------------------------------------------------

@pytest.mark.parametrize("name", providers.PROVIDERS)
def test_terminate_nothing_calls_nothing(name: str, monkeypatch: pytest.MonkeyPatch):
    module = providers.get(name)

    def refuse(*args, **kwargs):
        raise AssertionError(f"terminate([]) called into {name}")

    class Refused(types.ModuleType):
        def __getattr__(self, attr):
            raise AssertionError(f"terminate([]) used {self.__name__}.{attr}")

    for attr, value in list(vars(module).items()):
        if attr == "terminate" or attr.startswith("__"):
            continue
        if inspect.isfunction(value) and value.__module__ == module.__name__ or \
                inspect.isclass(value) and value.__module__ == module.__name__:
            monkeypatch.setattr(module, attr, refuse)  # its clients, queries, helpers
        elif isinstance(value, types.ModuleType) and value.__name__.startswith("geotrain."):
            monkeypatch.setattr(module, attr, Refused(value.__name__))  # e.g. geotrain.procs
    assert module.terminate([]) == []


# -- a cheap round through the local provider ------------------------------------------------

def test_local_holds_nothing_for_an_unknown_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("GEOTRAIN_HOME", str(tmp_path))
    local = providers.get("local")
    assert local.query("contract-no-such-run") == []
    assert local.query("contract-no-such-run", "a", regions=["local"]) == []
    assert local.query_all() == []  # a fresh home started nothing
    assert local.processes("contract-no-such-run") == []
    plan = providers.SitePlan(run_id="contract-no-such-run", site="a", provider="local",
                              store_url=f"file://{tmp_path}/store")
    assert local.open_ports(plan) is None
    check = local.check()
    assert isinstance(check, CredentialCheck) and check.ok and check.provider == "local"
