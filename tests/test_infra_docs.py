"""The recipe snippets in infra/*/README.md work exactly as written: every ```yaml block
that has `sites:` validates with geotrain.recipe and passes `geotrain launch`'s check that
each cloud node has a way to the run store."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from geotrain.checks import store_access
from geotrain.recipe import loads

pytestmark = pytest.mark.timeout(30)
ROOT = Path(__file__).resolve().parent.parent
BLOCK = re.compile(r"^```yaml\n(.*?)^```", re.M | re.S)


def snippets() -> list[tuple[str, str]]:
    found = []
    for readme in sorted(ROOT.glob("infra/*/README.md")):
        for i, m in enumerate(b for b in BLOCK.finditer(readme.read_text()) if "sites:" in b[1]):
            found.append((f"{readme.parent.name}-{i}", m[1]))
    return found


def test_every_cloud_readme_shows_a_recipe():
    assert {name.split("-")[0] for name, _ in snippets()} == {"aws", "gcp", "azure"}


@pytest.mark.parametrize("text", [t for _, t in snippets()], ids=[n for n, _ in snippets()])
def test_readme_recipe_snippets_validate_as_written(text):
    r = loads(text, source="README snippet", base_dir=ROOT)
    assert any(s.provider != "local" for s in r.sites)
    assert store_access(r) is None


def test_the_gcp_readme_binds_the_principal_set_that_federation_gives_aws_nodes():
    """infra/gcp/README.md's AWS-node steps, their shell variables filled as its recipe
    does, bind the member the stand-in GCP STS federates the instance profile's role to
    (tests/fakes/gcp_sts.py), through the pool and provider its recipe names."""
    from tests.fakes.gcp_sts import principal_set

    text = (ROOT / "infra/gcp/README.md").read_text()
    [member] = re.findall(r"^PS=(\S+)$", text, re.M)
    [provider] = re.findall(r"store_credentials: (//iam\.googleapis\.com/\S+)", text)
    number = provider.split("/")[4]
    assert f"workload-identity-pools create {provider.split('/')[8]} " in text
    assert f"providers create-aws {provider.split('/')[10]} " in text
    filled = member.replace("$N", number).replace("$AWS_ACCOUNT", "123456789012").replace(
        "$ROLE", "geotrain-node")
    assert filled == principal_set(provider, "arn:aws:sts::123456789012:assumed-role/geotrain-node")
    assert text.count("--member=$PS") == 2
