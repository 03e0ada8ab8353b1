"""What a cloud node learns about itself from its provider's metadata service.

`private_ip()` answers the address the site's Ray binds to (`--host metadata` in
infra/boot.sh.tmpl): never a public one, and never guessed from the interfaces.
The endpoint is the provider's link-local default, or GEOTRAIN_METADATA_ENDPOINT
(as for the preemption watchers, geotrain/site/preemption.py).

A node that cannot report through the run store (its boot failed, or its identity
cannot read or write the store) says why on its serial console in one line that
starts with FATAL_PREFIX; the controller reads the console through the provider's
API and `fatal_line` takes that line out of it. The console is the node's text:
untrusted, so only the first such line is taken, printable characters only, bounded.
"""

from __future__ import annotations

import json
import os
import time
import re
from collections.abc import Mapping

from geotrain.errors import ProviderError
from geotrain.site.preemption import AZURE_API, DEFAULT_ENDPOINTS, _request


def _get(url: str, headers: dict[str, str]) -> str:
    status, _, body = _request("GET", url, headers)
    if status != 200:
        raise OSError(f"{url} answered {status}")
    return body.decode().strip()


def _ask(provider: str, endpoint: str) -> str:
    if provider == "aws":
        status, _, body = _request("PUT", f"{endpoint}/latest/api/token",
                                   {"X-aws-ec2-metadata-token-ttl-seconds": "60"})
        if status != 200:
            raise OSError(f"IMDSv2 token request answered {status}")
        return _get(f"{endpoint}/latest/meta-data/local-ipv4",
                    {"X-aws-ec2-metadata-token": body.decode().strip()})
    if provider == "gcp":
        return _get(f"{endpoint}/computeMetadata/v1/instance/network-interfaces/0/ip",
                    {"Metadata-Flavor": "Google"})
    if provider == "azure":
        doc = json.loads(_get(f"{endpoint}/metadata/instance?api-version={AZURE_API}",
                              {"Metadata": "true"}))
        return doc["network"]["interface"][0]["ipv4"]["ipAddress"][0]["privateIpAddress"]
    raise ProviderError(f"no metadata service for provider {provider!r}")


def private_ip(environ: Mapping[str, str] = os.environ, attempts: int = 10) -> str:
    """This node's private IPv4 address, from its cloud's metadata service."""
    provider = environ.get("GEOTRAIN_PROVIDER") or ""
    if provider not in DEFAULT_ENDPOINTS:
        raise ProviderError(f"--host metadata needs GEOTRAIN_PROVIDER aws, gcp or azure "
                            f"(got {provider!r})")
    endpoint = (environ.get("GEOTRAIN_METADATA_ENDPOINT") or DEFAULT_ENDPOINTS[provider]).rstrip("/")
    last: Exception | None = None
    for i in range(attempts):  # the metadata service can lag the first seconds of a boot
        try:
            return _ask(provider, endpoint)
        except (OSError, KeyError, IndexError, ValueError) as e:
            last = e
            time.sleep(min(5.0, 0.5 * 2 ** i))
    raise ProviderError(f"{provider} metadata service at {endpoint} gave no private address: {last}")


FATAL_PREFIX = "geotrain node: fatal: "
FATAL_MAX = 400
CONSOLE_MAX = 256 * 1024


def fatal_line(console: str | bytes | None) -> str | None:
    """The first fatal line a node printed on its console (the cause; a failed boot
    step's own line follows it), cleaned; None when there is none."""
    if not console:
        return None
    if isinstance(console, bytes):
        console = console[-CONSOLE_MAX:].decode("utf-8", errors="replace")
    found = None
    for line in console[-CONSOLE_MAX:].splitlines():
        at = line.find(FATAL_PREFIX)
        if at >= 0:
            found = line[at + len(FATAL_PREFIX):]
            break
    if found is None:
        return None
    clean = re.sub(r"\s+", " ", "".join(c if c.isprintable() else " " for c in found)).strip()
    return (clean[:FATAL_MAX] + ("…" if len(clean) > FATAL_MAX else "")) or "(no reason given)"
