"""Objects in a run store on any fsspec backend: atomic writes, first-writer-wins
creates, listings, JSON and JSON-lines, signed read URLs, retries and fault plans.

A reader never sees a half-written object: on `file://` every write goes to a
temporary name and is renamed into place; on object stores a single PUT is
atomic. `create` writes an object only if it does not exist (first writer
wins). Retries live in geotrain/store_retry.py, fault injection in
geotrain/store_faults.py; docs/design.md says how each backend gets its
endpoint and credentials. What the objects mean is geotrain/store/run.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections.abc import Callable, Mapping
from dataclasses import asdict
from typing import TYPE_CHECKING, Any, TypeVar

import fsspec

from geotrain.errors import StoreError
from geotrain.store_retry import RetryPolicy, retry

if TYPE_CHECKING:
    from geotrain.store_faults import FaultPlan

T = TypeVar("T")

# gcsfs probes a hierarchical-namespace API on import unless told not to; on an
# emulator or an ordinary bucket every call would then wait out a long timeout.
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")

SCHEMES = ("file", "s3", "gs", "az")

# The environment variables each backend's own library reads for its endpoint
# and credentials (docs/design.md); only their names are ever reported.
ENDPOINT_ENV = {
    "s3": ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "AWS_PROFILE", "AWS_ACCESS_KEY_ID", "AWS_REGION",
           "AWS_DEFAULT_REGION"),
    "gs": ("STORAGE_EMULATOR_HOST", "GOOGLE_APPLICATION_CREDENTIALS", "GOOGLE_CLOUD_PROJECT"),
    "az": ("AZURE_STORAGE_CONNECTION_STRING", "AZURE_STORAGE_ACCOUNT_NAME", "AZURE_STORAGE_ACCOUNT_KEY",
           "AZURE_STORAGE_SAS_TOKEN", "AZURE_STORAGE_ANON", "AZURE_STORAGE_SERVICE_ENDPOINT",
           "AZURE_CLIENT_ID", "AZURE_TENANT_ID"),
}


def backend_options(scheme: str, environ: Mapping[str, str] = os.environ) -> dict[str, Any]:
    """fsspec options a backend's library does not take from the environment itself.

    az://: adlfs reads the account (AZURE_STORAGE_ACCOUNT_NAME) but not the blob
    endpoint, which it makes https://ACCOUNT.blob.core.windows.net. A blob endpoint in
    AZURE_STORAGE_SERVICE_ENDPOINT (the name the az CLI reads; a private endpoint, a
    sovereign cloud, a local stand-in) becomes its `account_host`, unless a connection
    string names the endpoint. It must be https: a token is never sent in the clear."""
    endpoint = environ.get("AZURE_STORAGE_SERVICE_ENDPOINT") or ""
    if scheme != "az" or not endpoint or environ.get("AZURE_STORAGE_CONNECTION_STRING"):
        return {}
    proto, _, host = endpoint.partition("://")
    if proto.lower() != "https" or not host.strip("/"):
        raise StoreError(f"store: AZURE_STORAGE_SERVICE_ENDPOINT {endpoint!r} is not an https:// "
                         "blob endpoint, e.g. https://ACCOUNT.blob.core.windows.net")
    return {"account_host": host.strip("/")}


def azure_account(fs: Any) -> str | None:
    """The storage account an adlfs file system uses (from its options, the
    environment or its connection string); None if it has none."""
    client = getattr(fs, "service_client", None)
    return getattr(fs, "account_name", None) or getattr(client, "account_name", None) or None


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def round_key(r: int) -> str:
    """Zero-padded so that listing order is numeric order."""
    return f"{r:06d}"


def join(root: str, *parts: str) -> str:
    return "/".join([root.rstrip("/"), *parts])


class ObjectStore:
    """One run's folder in object storage. `url` is the run's own root.

    Endpoints and credentials come from each library's own environment chain
    (docs/design.md, "Where a store's settings come from"), so
    `RunStore(url)` needs no arguments on a cloud node or against an emulator;
    `storage_options` are passed to fsspec for callers that want them.
    `faults` installs a fault plan (geotrain/store_faults.py); without it the
    plan comes from GEOTRAIN_STORE_FAULTS, if set. `retry_policy` likewise
    defaults to GEOTRAIN_STORE_RETRY, then to RetryPolicy().
    """

    def __init__(self, url: str, *, faults: FaultPlan | None = None,
                 retry_policy: RetryPolicy | None = None, **storage_options: Any):
        scheme = url.split("://", 1)[0] if "://" in url else "file"
        if scheme not in SCHEMES:
            raise StoreError(f"store: unsupported URL scheme {scheme!r} in {url!r}; valid: "
                             + ", ".join(f"{s}://" for s in SCHEMES))
        self.url = url.rstrip("/")
        self.scheme = scheme
        # Not fsspec's cached instance: it is keyed by arguments, not by the environment
        # each backend reads its endpoint and credentials from, so a store opened after
        # the environment changed would be handed one made under the old settings.
        self.fs, self.root = fsspec.core.url_to_fs(self.url, **{
            "skip_instance_cache": True, **backend_options(scheme), **storage_options})
        # An az:// URL names a container, not its account: a cloud node is told it.
        self.azure_account = azure_account(self.fs) if scheme == "az" else None
        self.local = scheme == "file"
        self._sources: dict[str, str] = {}
        if retry_policy is None and os.environ.get("GEOTRAIN_STORE_RETRY"):
            retry_policy = RetryPolicy.parse(os.environ["GEOTRAIN_STORE_RETRY"])
            self._sources["retry"] = "GEOTRAIN_STORE_RETRY"
        self.retry_policy = retry_policy or RetryPolicy()
        self._sources.setdefault("retry", "argument" if retry_policy else "default")
        if faults is None and os.environ.get("GEOTRAIN_STORE_FAULTS"):
            from geotrain.store_faults import FaultPlan

            faults = FaultPlan.parse(os.environ["GEOTRAIN_STORE_FAULTS"])
            self._sources["faults"] = "GEOTRAIN_STORE_FAULTS"
        self.faults = faults
        if faults is not None:
            from geotrain.store_faults import FaultyFileSystem

            self._sources.setdefault("faults", "argument")
            self.fs = FaultyFileSystem(self.fs, faults)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r})"

    def injected_faults(self) -> int | None:
        """How many faults a fault plan has injected into this object's calls (None: no plan)."""
        log = getattr(self.fs, "log", None)
        return len(log.faults) if self.faults is not None and log is not None else None

    def settings(self) -> dict[str, Any]:
        """Where this store's settings came from, for events and `status`:
        names of the environment variables in play, never their secret values."""
        out: dict[str, Any] = {"url": self.url,
                               "retry": dict(asdict(self.retry_policy), source=self._sources["retry"])}
        if self.faults is not None:
            out["faults"] = dict(asdict(self.faults), source=self._sources["faults"])
        env = [n for n in ENDPOINT_ENV.get(self.scheme, ()) if os.environ.get(n)]
        if env:
            out["environment"] = env
        return out

    # -- primitives -----------------------------------------------------------------

    def _path(self, key: str) -> str:
        return join(self.root, key)

    def _retry(self, fn: Callable[[], T], what: str) -> T:
        return retry(fn, what, policy=self.retry_policy)

    def _local_tmp(self, path: str) -> str:
        self.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        return f"{path}.tmp-{uuid.uuid4().hex[:8]}"

    def put(self, key: str, data: bytes) -> None:
        """Write one object so that readers see either nothing or all of it."""
        path = self._path(key)

        def write() -> None:
            if self.local:  # a whole temporary file, renamed into place
                tmp = self._local_tmp(path)
                self.fs.pipe_file(tmp, data)
                self.fs.mv(tmp, path)
            else:  # one PUT is atomic
                self.fs.pipe_file(path, data)

        self._retry(write, f"write {key}")

    def create(self, key: str, data: bytes) -> bool:
        """Write key only if it does not exist yet: first writer wins.

        Returns True if the object now holds `data` because this call wrote it,
        False if another writer's object was there first (it is left as is).
        Readers never see a partial object. If a retried attempt finds an
        object equal to `data`, it is taken as this call's own earlier attempt
        whose reply was lost; writers that must tell each other apart should
        put their identity in `data`.

        file://: a complete temporary file is hard-linked to the name (link()
        fails if the name exists), then the temporary name is removed.
        s3://: PutObject with If-None-Match: *; gs://: ifGenerationMatch=0;
        az://: If-None-Match: * (each through its fsspec `pipe_file(mode="create")`).
        """
        path = self._path(key)

        def attempt() -> bool:
            try:
                if self.local:
                    tmp = self._local_tmp(path)
                    self.fs.pipe_file(tmp, data)
                    try:
                        self.fs.link(tmp, path)
                    finally:
                        self.fs.rm_file(tmp)
                else:
                    self.fs.pipe_file(path, data, mode="create")
                return True
            except FileExistsError:
                try:
                    return self.fs.cat_file(path) == data
                except FileNotFoundError:  # removed since; never happens in a run store
                    return False

        return self._retry(attempt, f"create {key}")

    def get(self, key: str) -> bytes:
        return self._retry(lambda: self.fs.cat_file(self._path(key)), f"read {key}")

    def object_url(self, key: str) -> str:
        """The URL of one object, e.g. gs://bucket/runs/r1/_boot/..., for a reader with its
        own credentials."""
        return join(self.url, key)

    def sign(self, key: str, expires_s: int) -> str:
        """A URL that lets its holder GET this one object, and nothing else, for
        `expires_s` seconds (S3 presigned URL, GCS signed URL, Azure SAS), made with
        this machine's credentials; for a file:// store, the file's path."""
        if self.local:
            return self._path(key)
        try:
            return self.fs.sign(self._path(key), expiration=expires_s)
        except NotImplementedError as e:
            raise StoreError(f"store {self.url}: this backend cannot make signed URLs for cloud "
                             "nodes") from e
        except Exception as e:  # noqa: BLE001 - one line, named by the backend's own words
            raise StoreError(f"store {self.url}: could not sign a URL for {key} ({e}); the "
                             "credentials used here must be able to sign (a GCS service "
                             "account key or signBlob, an Azure account key or user "
                             "delegation)") from e

    def exists(self, key: str) -> bool:
        if not self.local:
            self.fs.invalidate_cache()
        return self._retry(lambda: self.fs.exists(self._path(key)), f"stat {key}")

    def listdir(self, key: str) -> list[str]:
        """Names (not paths) directly under key; empty if it does not exist."""
        path = self._path(key)
        if not self.local:
            self.fs.invalidate_cache()
        try:
            entries = self._retry(lambda: self.fs.ls(path, detail=False), f"list {key}")
        except FileNotFoundError:
            return []
        names = [e.rstrip("/").rsplit("/", 1)[-1] for e in entries]
        return sorted(n for n in names if ".tmp-" not in n and n)

    def keys(self, prefix: str = "") -> list[str]:
        """Every object key under prefix (recursively), sorted; temporaries hidden."""
        base = self._path(prefix) if prefix else self.root
        if not self.local:
            self.fs.invalidate_cache()
        try:
            paths = self._retry(lambda: self.fs.find(base), f"list {prefix or '/'} recursively")
        except FileNotFoundError:
            return []
        root = self.root.rstrip("/") + "/"
        out = []
        for p in paths:
            p = p.rstrip("/")
            if p.startswith(root) and ".tmp-" not in p.rsplit("/", 1)[-1]:
                out.append(p[len(root):])
        return sorted(out)

    def put_json(self, key: str, obj: Any) -> None:
        self.put(key, json.dumps(obj, sort_keys=True).encode())

    def get_json(self, key: str) -> Any:
        return json.loads(self.get(key))

    def append_jsonl(self, key: str, record: dict) -> None:
        """Append one line. Each jsonl file has exactly one writer (the controller
        or one site), so read-modify-write on object stores cannot lose a line."""
        line = (json.dumps(record, sort_keys=True) + "\n").encode()
        if self.local:
            path = self._path(key)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "ab") as f:  # O_APPEND: one small write is atomic
                f.write(line)
            return
        try:
            old = self.get(key)
        except FileNotFoundError:
            old = b""
        self.put(key, old + line)

    def read_jsonl(self, key: str) -> list[dict]:
        try:
            text = self.get(key).decode()
        except FileNotFoundError:
            return []
        # A line being appended right now may be incomplete; it is read next time.
        out = []
        for line in text.splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                pass
        return out
