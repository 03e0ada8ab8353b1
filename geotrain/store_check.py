"""Before a run is created: can this machine write under a store root?

`check_writable(root)` writes one small probe object under the root and deletes
it again, so a bucket, container or folder that cannot hold a run is refused
before anything is created, with one line naming the URL, what is wrong and
what to do (a missing bucket, no credentials, access denied, an unreachable
endpoint). `geotrain launch` calls it from `preflight` (geotrain/controller.py).
"""

from __future__ import annotations

import os
import uuid
from typing import Any

import fsspec

from geotrain.errors import StoreError
from geotrain.store import SCHEMES, join
from geotrain.store.objects import backend_options
from geotrain.store_retry import RetryPolicy, is_transient, retry

_CONTAINER = {"s3": "bucket", "gs": "bucket", "az": "container"}
_CREATE = {"s3": "`aws s3 mb s3://{b}`", "gs": "`gcloud storage buckets create gs://{b}`",
           "az": "`az storage container create --name {b}`"}
_CREDENTIALS = {"s3": "AWS_PROFILE or AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY",
                "gs": "GOOGLE_APPLICATION_CREDENTIALS or `gcloud auth application-default login`",
                "az": "AZURE_STORAGE_CONNECTION_STRING, or AZURE_STORAGE_ACCOUNT_NAME with a key, "
                      "SAS token or `az login`"}
_DENIED_NAMES = {"ClientAuthenticationError", "Forbidden", "AccessDenied"}
_NO_CREDENTIAL_NAMES = {"NoCredentialsError", "PartialCredentialsError", "DefaultCredentialsError",
                        "CredentialUnavailableError", "RefreshError"}
_MISSING_NAMES = {"ResourceNotFoundError", "NoSuchBucket", "ContainerNotFound"}


def _names(e: BaseException) -> set[str]:
    return {c.__name__ for c in type(e).__mro__}


def _endpoint(scheme: str) -> str:
    """Where this machine sends the store's requests, for a message (never a secret)."""
    if scheme == "s3":
        for name in ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"):
            if os.environ.get(name):
                return f"{os.environ[name]} (from {name})"
        return "AWS S3"
    if scheme == "gs":
        host = os.environ.get("STORAGE_EMULATOR_HOST")
        return f"{host} (from STORAGE_EMULATOR_HOST)" if host else "Google Cloud Storage"
    conn = os.environ.get("AZURE_STORAGE_CONNECTION_STRING", "")
    blob = dict(p.split("=", 1) for p in conn.split(";") if "=" in p).get("BlobEndpoint")
    if blob:
        return f"{blob} (from AZURE_STORAGE_CONNECTION_STRING)"
    account = os.environ.get("AZURE_STORAGE_ACCOUNT_NAME")
    endpoint = os.environ.get("AZURE_STORAGE_SERVICE_ENDPOINT")
    if endpoint:
        return f"{endpoint} (from AZURE_STORAGE_SERVICE_ENDPOINT)"
    return f"account {account}" if account else "Azure Blob Storage"


def _status(e: BaseException) -> int | None:
    code = getattr(e, "status_code", None) or getattr(e, "code", None)
    return code if isinstance(code, int) else None


def _refusal(root: str, scheme: str, e: BaseException) -> str:
    """One line: what is wrong with writing under `root`, and what to do about it."""
    names = _names(e)
    text = " ".join(str(e).split("RequestId:")[0].split())[:200].replace("[", "(").replace("]", ")")
    if scheme == "file":
        folder = root.split("://", 1)[-1]
        if isinstance(e, (NotADirectoryError, FileExistsError, IsADirectoryError)):
            return (f"store {root}: {folder} cannot be a folder (a file is in its way); "
                    "set store.url to a folder this machine can write")
        if isinstance(e, PermissionError):
            return (f"store {root}: this machine may not write in {folder}; "
                    "grant write access to it or set store.url to a folder you can write")
        return f"store {root}: cannot write there ({text}); set store.url to a folder this machine can write"
    bucket = root.split("://", 1)[1].split("/", 1)[0]
    kind = _CONTAINER[scheme]
    status = _status(e)
    if isinstance(e, FileNotFoundError) or names & _MISSING_NAMES or status == 404:
        return (f"store {root}: {kind} {bucket!r} does not exist at {_endpoint(scheme)}; "
                f"create it ({_CREATE[scheme].format(b=bucket)}) or set store.url to a {kind} you own")
    if names & _NO_CREDENTIAL_NAMES:
        return (f"store {root}: no credentials for {_endpoint(scheme)} on this machine; "
                f"set {_CREDENTIALS[scheme]}")
    if (isinstance(e, PermissionError) or names & _DENIED_NAMES or status in (401, 403)
            or text.startswith("Forbidden")):
        return (f"store {root}: writing to {kind} {bucket!r} was refused (access denied or bad "
                f"credentials: {text}); grant this machine's credentials write access to it "
                f"({_CREDENTIALS[scheme]}) or set store.url to a {kind} you can write")
    if is_transient(e):
        return (f"store {root}: cannot reach {_endpoint(scheme)} ({type(e).__name__}: {text}); "
                "check the endpoint and this machine's network")
    return (f"store {root}: cannot write there ({type(e).__name__}: {text}); check store.url and "
            f"this machine's credentials for it ({_CREDENTIALS[scheme]})")


def check_writable(root: str) -> None:
    """Before a run is created under the store root `root`: its bucket, container or
    folder exists and this machine may write there. Writes one small probe object
    and deletes it again (no fault plan, a short retry), so a store that cannot hold
    the run is refused before anything is created: a StoreError of one line naming
    the URL, what is wrong and what to do."""
    scheme = root.split("://", 1)[0] if "://" in root else "file"
    if scheme not in SCHEMES:
        raise StoreError(f"store: unsupported URL scheme {scheme!r} in {root!r}; valid: "
                         + ", ".join(f"{s}://" for s in SCHEMES))
    policy = RetryPolicy(attempts=2, base_delay=0.2, max_delay=1.0)
    # A fresh client (this environment, not a cached one) that gives up on an
    # unreachable endpoint in seconds rather than after the library's own retries.
    options: dict[str, Any] = {"skip_instance_cache": True}
    if scheme == "s3":
        options["config_kwargs"] = {"retries": {"max_attempts": 2}, "connect_timeout": 5}
    try:
        fs, base = fsspec.core.url_to_fs(root.rstrip("/"), **backend_options(scheme), **options)
        if scheme == "s3":
            fs.retries = 1  # s3fs's own loop around botocore's (a class attribute)
        path = join(base, f".geotrain-probe-{uuid.uuid4().hex[:12]}")

        def write() -> None:
            if scheme == "file":  # object stores have no folders (and s3fs would create the bucket)
                fs.makedirs(base, exist_ok=True)
            fs.pipe_file(path, b"geotrain store probe\n")

        retry(write, "write a probe object", policy=policy)
    except Exception as e:  # noqa: BLE001 - every failure becomes one line naming the URL
        cause = e.__cause__ if isinstance(e, StoreError) and e.__cause__ is not None else e
        raise StoreError(_refusal(root, scheme, cause)) from None
    try:
        fs.rm_file(path)
    except Exception:  # noqa: BLE001, S110 - a probe left behind is harmless; writing worked
        pass

