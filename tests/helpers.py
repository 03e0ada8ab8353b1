"""Shared test helpers: run the CLI as a user would, wait for conditions,
find what a run left running."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pytest

from providers import local

T = TypeVar("T")


def geotrain_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "geotrain", *args]


def wait_for(predicate: Callable[[], T], timeout: float, every: float = 0.25) -> T:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise TimeoutError(f"condition not met within {timeout} s")


def tagged_processes(run_id: str) -> list[int]:
    """Live processes on this machine tagged with the run (agents, Ray, workers)."""
    return local.processes(run_id)


@pytest.fixture
def geotrain_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "home"
    monkeypatch.setenv("GEOTRAIN_HOME", str(home))
    return home
