"""The run store: the single source of truth of a run, on any fsspec backend.

Every path inside a run store is built here and nowhere else. The layout
(see shared/DESIGN.md):

    <run>/run.json                     recipe as resolved, run id, created, version
    <run>/global/<round>/              model.safetensors, outer.safetensors (every
                                       sync.state_every rounds and the last; between,
                                       only the hash), manifest.json, then COMMITTED (last)
    <run>/rounds/<round>/<site>.bin    a site's encoded pseudo-gradient
    <run>/rounds/<round>/<site>.json   its manifest (sha256, tokens, steps, codec), written after the payload
    <run>/rounds/<round>/results/<site>.json   the global hash the site ended the round with
    <run>/rounds/<round>/_members.json who is in the round: created once, first writer wins
    <run>/global/<round>/eval.json     the committer's eval of that global state
    <run>/sites/<site>/heartbeat       last beat: step, round, loss, tokens/s, state
    <run>/sites/<site>/alive           liveness, every ~1 s: state, pid, time
    <run>/sites/<site>/head.json       a multi-node site's Ray head: private IP:port, state (never the token)
    <run>/sites/<site>/commands/<n>    drain / stop, written by the controller
    <run>/sites/<site>/events.jsonl    what the site did (one writer per file)
    <run>/events.jsonl                 what the controller did
    <run>/final/                       model.safetensors + summary.json at the end

A reader never sees a half-written object: on `file://` every write goes to a
temporary name and is renamed into place; on object stores a single PUT is
atomic. Multi-object units (a global round, a contribution) are written data
first and marker last, and every payload is checked against the sha256 in its
manifest before anyone uses it.

`create` writes an object only if it does not exist (first writer wins).
Retries live in geotrain/store_retry.py, copying a whole store to another
backend in geotrain/store_copy.py, fault injection in geotrain/store_faults.py;
docs/design.md says how each backend gets its endpoint and credentials.

Run with `python -m geotrain.store URL` to print a run store's summary.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict
from typing import TYPE_CHECKING, Any, TypeVar

import fsspec

from geotrain.errors import StoreError
from geotrain.store_retry import RetryPolicy, is_transient, parse_settings, retry  # noqa: F401 - re-exported

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
           "AZURE_STORAGE_SAS_TOKEN", "AZURE_STORAGE_ANON", "AZURE_CLIENT_ID", "AZURE_TENANT_ID"),
}


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def round_key(r: int) -> str:
    """Zero-padded so that listing order is numeric order."""
    return f"{r:06d}"


def join(root: str, *parts: str) -> str:
    return "/".join([root.rstrip("/"), *parts])


class RunStore:
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
        self.fs, self.root = fsspec.core.url_to_fs(self.url, **storage_options)
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
        return f"RunStore({self.url!r})"

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

    # -- run ----------------------------------------------------------------------------

    def write_run(self, info: dict) -> None:
        self.put_json("run.json", info)

    def read_run(self) -> dict:
        try:
            return self.get_json("run.json")
        except FileNotFoundError:
            raise StoreError(f"store: no run at {self.url} (run.json missing)") from None

    # -- global state: one folder per committed round ------------------------------------

    def commit_global(self, r: int, files: dict[str, bytes], manifest: dict) -> None:
        """Write round r's global state; COMMITTED is written last, so a reader that
        sees it sees every file, each checked against the manifest's sha256."""
        base = f"global/{round_key(r)}"
        for name, data in files.items():
            self.put(f"{base}/{name}", data)
        full = dict(manifest, round=r, files={n: sha256(d) for n, d in files.items()})
        self.put_json(f"{base}/manifest.json", full)
        self.put_json(f"{base}/COMMITTED", {"round": r, "manifest_sha256":
                                            sha256(json.dumps(full, sort_keys=True).encode())})

    def is_committed(self, r: int) -> bool:
        return self.exists(f"global/{round_key(r)}/COMMITTED")

    def committed_rounds(self) -> list[int]:
        rounds = []
        for name in self.listdir("global"):
            if name.isdigit() and self.exists(f"global/{name}/COMMITTED"):
                rounds.append(int(name))
        return sorted(rounds)

    def latest_global(self) -> int | None:
        # Newest first: stop at the first committed one instead of probing all.
        for name in reversed(self.listdir("global")):
            if name.isdigit() and self.exists(f"global/{name}/COMMITTED"):
                return int(name)
        return None

    def latest_state(self) -> int | None:
        """The newest committed round that holds the global state itself (with
        `sync.state_every` > 1 the rounds between hold only their hash)."""
        for name in reversed(self.listdir("global")):
            if name.isdigit() and self.exists(f"global/{name}/COMMITTED") and \
                    "model.safetensors" in self.global_manifest(int(name)).get("files", {}):
                return int(name)
        return None

    def read_global(self, r: int) -> tuple[dict[str, bytes], dict]:
        base = f"global/{round_key(r)}"
        if not self.exists(f"{base}/COMMITTED"):
            raise StoreError(f"store: global round {r} is not committed")
        raw = self.get(f"{base}/manifest.json")
        try:
            expected = self.get_json(f"{base}/COMMITTED")["manifest_sha256"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise StoreError(f"store: corrupt marker global/{round_key(r)}/COMMITTED") from None
        if sha256(raw) != expected:
            raise StoreError(f"store: checksum mismatch in global/{round_key(r)}/manifest.json")
        manifest = json.loads(raw)
        files = {}
        for name, digest in manifest["files"].items():
            data = self.get(f"{base}/{name}")
            if sha256(data) != digest:
                raise StoreError(f"store: checksum mismatch in global/{round_key(r)}/{name}")
            files[name] = data
        return files, manifest

    def global_manifest(self, r: int) -> dict:
        return self.get_json(f"global/{round_key(r)}/manifest.json")

    # -- contributions -----------------------------------------------------------------

    def put_contribution(self, r: int, site: str, payload: bytes, meta: dict) -> dict:
        base = f"rounds/{round_key(r)}/{site}"
        self.put(f"{base}.bin", payload)
        manifest = dict(meta, round=r, site=site, sha256=sha256(payload), bytes=len(payload))
        self.put_json(f"{base}.json", manifest)  # the marker: payload is complete
        return manifest

    def contributions(self, r: int) -> list[str]:
        """Sites whose contribution to round r is complete (manifest present)."""
        names = self.listdir(f"rounds/{round_key(r)}")
        return [n[:-5] for n in names if n.endswith(".json") and not n.startswith("_")]

    def read_contribution(self, r: int, site: str) -> tuple[bytes, dict]:
        base = f"rounds/{round_key(r)}/{site}"
        manifest = self.get_json(f"{base}.json")
        payload = self.get(f"{base}.bin")
        if sha256(payload) != manifest["sha256"]:
            raise StoreError(f"store: checksum mismatch in contribution of {site} to round {r}")
        return payload, manifest

    def contribution_meta(self, r: int, site: str) -> dict:
        return self.get_json(f"rounds/{round_key(r)}/{site}.json")

    def decide_members(self, r: int, decision: dict) -> tuple[dict, bool]:
        """Record who is in round r, once: the first writer wins. Returns the
        decision that stands (this one or the earlier one) and whether this
        call made it."""
        key = f"rounds/{round_key(r)}/_members.json"
        decision = dict(decision, round=r)
        won = self.create(key, json.dumps(decision, sort_keys=True).encode())
        return (decision if won else self.get_json(key)), won

    def members(self, r: int) -> dict | None:
        """Round r's membership decision, or None while it is open."""
        try:
            return self.get_json(f"rounds/{round_key(r)}/_members.json")
        except FileNotFoundError:
            return None

    def rounds_started(self) -> list[int]:
        return [int(n) for n in self.listdir("rounds") if n.isdigit()]

    def put_eval(self, r: int, record: dict) -> None:
        self.put_json(f"global/{round_key(r)}/eval.json", dict(record, round=r))

    def read_eval(self, r: int) -> dict | None:
        try:
            return self.get_json(f"global/{round_key(r)}/eval.json")
        except FileNotFoundError:
            return None

    def put_result(self, r: int, site: str, result: dict) -> None:
        self.put_json(f"rounds/{round_key(r)}/results/{site}.json", dict(result, site=site, round=r))

    def results(self, r: int) -> dict[str, dict]:
        base = f"rounds/{round_key(r)}/results"
        return {n[:-5]: self.get_json(f"{base}/{n}") for n in self.listdir(base) if n.endswith(".json")}

    # -- sites: heartbeats, commands, events ------------------------------------------

    def beat(self, site: str, beat: dict) -> None:
        self.put_json(f"sites/{site}/heartbeat", dict(beat, site=site, at=time.time()))

    def heartbeat(self, site: str) -> dict | None:
        try:
            return self.get_json(f"sites/{site}/heartbeat")
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    # -- ending a run early (geotrain finish) ---------------------------------------------

    def request_finish(self, at_round: int) -> None:
        """Ask every site to make `at_round` the run's last round (written by the controller)."""
        self.put_json("_finish.json", {"at_round": at_round, "at": time.time()})

    def finish_round(self) -> int | None:
        """The round the controller asked the run to end at, or None. A record
        that does not parse, or names no round >= 1, is no request."""
        try:
            value = self.get_json("_finish.json").get("at_round")
        except (FileNotFoundError, json.JSONDecodeError, AttributeError):
            return None
        return value if type(value) is int and value >= 1 else None

    # -- moving a live run to another backend (geotrain/migrate.py) ----------------------

    def switch(self, url: str) -> None:
        """Point this object at another copy of the run store, in place, so every
        component of a process that shares it follows at once."""
        self.__init__(url, faults=self.faults, retry_policy=self.retry_policy)

    def request_switch(self, to: str, at_round: int) -> None:
        """Ask every site to publish round `at_round` and later to the store at `to`."""
        self.put_json("_switch.json", {"to": to, "at_round": at_round, "at": time.time()})

    def switch_request(self) -> dict | None:
        try:
            req = self.get_json("_switch.json")
        except FileNotFoundError:
            return None
        return req if req.get("to") != self.url else None

    def mark_switch_ready(self, at_round: int) -> None:
        """Written in the new store once it holds every round before at_round."""
        self.put_json("_switch_ready.json", {"at_round": at_round, "at": time.time()})

    def switch_ready(self, at_round: int) -> bool:
        try:
            return self.get_json("_switch_ready.json")["at_round"] >= at_round
        except FileNotFoundError:
            return False

    def follow_switch(self, before_round: int | None = None, wait: bool = False,
                      should_stop: Callable[[], bool] = lambda: False) -> bool:
        """Move to the new store if a switch was requested and it is ready: at
        once (`before_round` None), or before publishing `before_round` >= its
        at_round, waiting for the new store to be ready when `wait`. True if moved."""
        req = self.switch_request()
        if not req or (before_round is not None and before_round < req["at_round"]):
            return False
        target = RunStore(req["to"])
        while not target.switch_ready(req["at_round"]):
            if not wait or should_stop():
                return False
            time.sleep(0.2)
        self.switch(req["to"])
        return True

    def alive(self, site: str, state: str, **info: Any) -> None:
        """Liveness, written every second or so by a site's agent (and by DiLoCo
        when it runs outside an agent): who is there and in what state."""
        self.put_json(f"sites/{site}/alive", dict(info, site=site, state=state, at=time.time()))

    def liveness(self) -> dict[str, dict]:
        """Every site's last liveness record (age = time.time() - record['at'])."""
        out = {}
        for name in self.listdir("sites"):
            try:
                out[name] = self.get_json(f"sites/{name}/alive")
            except (FileNotFoundError, json.JSONDecodeError):
                pass
        return out

    def put_head(self, site: str, record: dict) -> None:
        """Where a multi-node site's Ray head listens (private `IP:PORT`) and
        whether it is up, for the site's other nodes; never the cluster token."""
        self.put_json(f"sites/{site}/head.json", dict(record, site=site, at=time.time()))

    def head(self, site: str) -> dict | None:
        try:
            return self.get_json(f"sites/{site}/head.json")
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def send_command(self, site: str, command: str, **args: Any) -> None:
        name = f"{time.time_ns()}-{command}"
        self.put_json(f"sites/{site}/commands/{name}", dict(args, command=command, at=time.time()))

    def commands(self, site: str) -> list[dict]:
        base = f"sites/{site}/commands"
        return [self.get_json(f"{base}/{n}") for n in self.listdir(base)]

    def event(self, source: str, kind: str, message: str = "", **data: Any) -> dict:
        """Record an event; source is 'controller' or a site name."""
        record = {"at": time.time(), "source": source, "kind": kind, "message": message, **data}
        key = "events.jsonl" if source == "controller" else f"sites/{source}/events.jsonl"
        self.append_jsonl(key, record)
        return record

    def events(self, sites: list[str]) -> list[dict]:
        out = self.read_jsonl("events.jsonl")
        for s in sites:
            out += self.read_jsonl(f"sites/{s}/events.jsonl")
        return sorted(out, key=lambda e: e["at"])

    # -- the end -------------------------------------------------------------------------

    def write_final(self, model: bytes, summary: dict) -> None:
        self.put("final/model.safetensors", model)
        self.put_json("final/summary.json", dict(summary, model_sha256=sha256(model)))

    def final_model_url(self) -> str:
        return join(self.url, "final/model.safetensors")

    def read_final(self) -> dict | None:
        try:
            return self.get_json("final/summary.json")
        except FileNotFoundError:
            return None


def run_url(root: str, run_id: str) -> str:
    """The URL of a run's store under a store root."""
    return join(root, run_id)


if __name__ == "__main__":
    import sys

    s = RunStore(sys.argv[1])
    info = s.read_run()
    print(json.dumps({"run": info.get("id"), "committed": s.committed_rounds(),
                      "final": s.read_final()}, indent=2))
