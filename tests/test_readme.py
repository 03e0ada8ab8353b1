"""The README's two commands are the ones CI and users run."""

import re
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(10)
ROOT = Path(__file__).resolve().parent.parent


def readme_commands() -> list[str]:
    return re.findall(r"```bash\n(.+?)\n```", (ROOT / "README.md").read_text())


def test_ci_runs_the_readme_test_command():
    demo, test = readme_commands()[:2]
    ci_lines = (ROOT / ".ci/run").read_text().strip().splitlines()
    assert ci_lines[-1] == test
    assert "pytest" in test and "'.[test]'" in test


def test_demo_command_runs_the_local_recipe():
    demo = readme_commands()[0]
    assert demo.endswith("geotrain launch recipes/local.yaml")
    assert (ROOT / "recipes/local.yaml").exists()
