"""Whether this machine can use each provider: `geotrain check` and the launch preflight.

`check_providers()` imports each provider module lazily and calls its `check()`. It never
raises: a provider module that does not exist yet is "not implemented", and a `check()`
that raises is reported with the exception's type and a message from which anything that
looks like a key or token has been cut (a provider's `check()` must never include a
secret; this is the second fence).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import providers

# Long runs of key-like characters (access keys, SAS tokens, bearer tokens, client secrets).
SECRETISH = re.compile(r"[A-Za-z0-9+/=_\-]{20,}")


@dataclass(frozen=True)
class ProviderCheck:
    provider: str
    implemented: bool
    ok: bool
    detail: str


def redact(text: str) -> str:
    return SECRETISH.sub("[redacted]", text)


def check_one(name: str) -> ProviderCheck:
    try:
        module = providers.get(name)
    except ModuleNotFoundError as e:
        if e.name == f"providers.{name}":
            return ProviderCheck(name, False, False, "not implemented")
        return ProviderCheck(name, True, False, f"cannot import: missing module {e.name}")
    except Exception as e:  # noqa: BLE001 - an import that fails is a result, not a crash
        return ProviderCheck(name, True, False, f"cannot import: {type(e).__name__}: "
                             f"{redact(str(e))[:200]}")
    try:
        result = module.check()
    except Exception as e:  # noqa: BLE001 - check() must not raise; report it if it does
        return ProviderCheck(name, True, False, f"check() raised {type(e).__name__}: "
                             f"{redact(str(e))[:200]}")
    return ProviderCheck(name, True, bool(result.ok), redact(str(result.detail))[:500])


def check_providers(names: tuple[str, ...] | None = None) -> list[ProviderCheck]:
    """One ProviderCheck per provider (all of them by default), in order."""
    return [check_one(n) for n in (names or providers.PROVIDERS)]
