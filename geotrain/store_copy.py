"""Copy a whole run store to another place, on any backend (`s3://` → `gs://`, …).

    report = copy_run("s3://old/runs/r1", "gs://new/runs/r1")

Every object is read once from the source and written through the
destination's RunStore (so the destination's atomic writes apply). Every
file of a committed global round is checked against its manifest (and the
manifest against its COMMITTED marker), every contribution payload against
its manifest, before it is written. Markers — a round's `COMMITTED`, a
contribution's `<site>.json`, `final/summary.json` — are written only after
all the data they vouch for, so the destination is a valid run store at
every instant: a reader there sees a round, a contribution or the final
model only once all of it is in place. A unit whose data does not match its
manifest is not copied at all (neither its data nor its marker) and is
reported in `rejected`, so it is absent at the destination as it was
invisible at the source.

Nothing read from the source is trusted as a path: a listed key or a file
name from a manifest with an empty, `.` or `..` segment, a leading `/`, a
backslash or a NUL is refused — never read, never written — and reported in
`rejected` as `unsafe key <key>` (a round whose manifest names one is
rejected whole). So no key can reach outside the destination's run folder
(on file://, outside its directory).

An object already at the destination with the same sha256 is skipped, so an
interrupted copy is resumed by running it again. The source is only read.

    python -m geotrain.store_copy SRC_URL DST_URL
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from geotrain.errors import StoreError
from geotrain.store.control import unwrap
from geotrain.store import RunStore, round_key, sha256


@dataclass(frozen=True)
class CopyProgress:
    """One object handled: key, its size, and whether it was copied or skipped."""

    key: str
    bytes: int
    copied: bool


@dataclass(frozen=True)
class CopyReport:
    objects_copied: int
    objects_skipped: int
    bytes_copied: int
    committed_rounds: tuple[int, ...]  # verified and marked at the destination
    contributions: int  # verified and marked at the destination
    rejected: tuple[str, ...]  # units that did not verify (not copied), and `unsafe key <key>`s
    seconds: float


def safe_key(key: object) -> bool:
    """A relative key of plain segments: none empty, `.` or `..`; not absolute;
    no backslash (a separator on some systems) or NUL."""
    if not isinstance(key, str) or not key or key.startswith("/") or "\\" in key or "\x00" in key:
        return False
    return all(part not in ("", ".", "..") for part in key.split("/"))


def _safe_file_name(name: object) -> bool:
    """A file of a committed round, as its manifest names it: one plain segment,
    and not the round's own manifest or marker."""
    return safe_key(name) and "/" not in name and name not in ("manifest.json", "COMMITTED")


def unsafe(key: object) -> str:
    return f"unsafe key {key!r}"


def _is_marker(key: str) -> bool:
    parts = key.split("/")
    if parts[0] == "global" and len(parts) == 3:
        return parts[2] == "COMMITTED"
    if parts[0] == "rounds" and len(parts) == 3:  # a contribution's manifest, not _members.json
        return parts[2].endswith(".json") and not parts[2].startswith("_")
    return key == "final/summary.json"


def copy_run(src_url: str, dst_url: str, *, on_progress: Callable[[CopyProgress], None] | None = None,
             src: RunStore | None = None, dst: RunStore | None = None, workers: int = 16) -> CopyReport:
    """Copy the run store at src_url to dst_url (see the module docstring).

    `src` / `dst` may be given as ready RunStores (e.g. with a fault plan);
    otherwise they are opened from the URLs with the environment's settings.
    Objects are read, verified and written by `workers` threads (object stores
    reward many requests in flight); markers still go only after all data."""
    t0 = time.monotonic()
    src = src or RunStore(src_url)
    dst = dst or RunStore(dst_url)
    if src.url == dst.url:
        raise StoreError(f"store: cannot copy a run store onto itself ({src.url})")
    listed = src.keys()
    if not listed:
        raise StoreError(f"store: nothing to copy at {src.url} (no objects)")
    keys = [k for k in listed if safe_key(k)]
    refused = [unsafe(k) for k in listed if not safe_key(k)]
    counts = {"copied": 0, "skipped": 0, "bytes": 0}
    lock = threading.Lock()

    def copy(key: str, data: bytes | None = None) -> None:
        data = src.get(key) if data is None else data
        try:
            same = dst.get(key) == data if dst.exists(key) else False
        except FileNotFoundError:
            same = False
        if not same:
            dst.put(key, data)
        with lock:
            counts["copied" if not same else "skipped"] += 1
            counts["bytes"] += len(data) if not same else 0
            if on_progress:
                on_progress(CopyProgress(key, len(data), not same))

    def global_round(r: int) -> tuple[int, str, bytes | None, set[str], list[str]]:
        """Verify a committed round's data, then copy it — all of it, or nothing
        if any of it does not verify; its marker is held back."""
        base = f"global/{round_key(r)}"
        marker = src.get(f"{base}/COMMITTED")
        manifest_raw = src.get(f"{base}/manifest.json")
        try:
            ok = json.loads(marker)["manifest_sha256"] == sha256(manifest_raw)
            files = json.loads(manifest_raw)["files"]
            files = files if isinstance(files, dict) else {}
        except (ValueError, KeyError, TypeError):  # ValueError: not JSON, not UTF-8
            ok, files = False, {}
        bad = [unsafe(f"{base}/{name}") for name in files if not _safe_file_name(name)]
        ok = ok and not bad
        data: dict[str, bytes] = {}
        for name, digest in files.items() if ok else ():
            try:
                data[name] = src.get(f"{base}/{name}")
            except FileNotFoundError:
                ok = False
                break
            if sha256(data[name]) != digest:
                ok = False
                break
        if ok:
            for name, blob in data.items():
                copy(f"{base}/{name}", blob)
            copy(f"{base}/manifest.json", manifest_raw)
        vouched = {f"{base}/{name}" for name in files if _safe_file_name(name)} \
            | {f"{base}/manifest.json", f"{base}/COMMITTED"}
        return r, base, marker if ok else None, vouched, bad

    def contribution(key: str) -> tuple[str, bytes | None]:
        """Verify and copy a contribution's payload; its manifest is held back."""
        raw = src.get(key)
        try:
            digest = unwrap(json.loads(raw), "contribution")["sha256"]  # signed by its member
            payload = src.get(key[:-5] + ".bin")
        except (ValueError, KeyError, TypeError, FileNotFoundError):  # ValueError: not JSON, not UTF-8
            digest, payload = None, b""
        if digest is not None and sha256(payload) == digest:
            copy(key[:-5] + ".bin", payload)
            return key, raw
        return key, None

    markers: list[tuple[str, bytes]] = []
    rejected: list[str] = []
    committed: list[int] = []
    vouched: set[str] = set()  # objects handled as part of a verified unit
    contribution_keys = [k for k in keys if _is_contribution(k)]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        # 1. Committed global rounds and 2. contributions: data verified and
        #    copied, markers held back.
        for r, base, marker, handled, bad in pool.map(global_round, src.committed_rounds()):
            vouched |= handled
            refused += bad
            if marker is not None:
                markers.append((f"{base}/COMMITTED", marker))
                committed.append(r)
            else:
                rejected.append(base)
        for key, raw in pool.map(contribution, contribution_keys):
            vouched |= {key, key[:-5] + ".bin"}
            if raw is not None:
                markers.append((key, raw))
            else:
                rejected.append(key[:-5])
        # 3. Everything else (run.json, heartbeats, events, results, decisions,
        #    uncommitted leftovers), then the markers. The final model is vouched
        #    for by its summary: both are copied last, below, once they verify.
        vouched.add("final/model.safetensors")
        list(pool.map(copy, [k for k in keys if k not in vouched and not _is_marker(k)]))
        # Rounds are marked oldest first (a reader never sees a gap), contributions in parallel.
        for key, data in sorted(m for m in markers if m[0].startswith("global/")):
            copy(key, data)
        list(pool.map(lambda m: copy(*m), [m for m in markers if not m[0].startswith("global/")]))
    if "final/summary.json" in keys:  # the final model is vouched for by its summary, last
        summary = src.get("final/summary.json")
        try:
            digest = json.loads(summary).get("model_sha256")
            model = src.get("final/model.safetensors")
        except (ValueError, AttributeError, FileNotFoundError):
            digest, model = None, b""
        if digest is not None and sha256(model) == digest:
            copy("final/model.safetensors", model)
            copy("final/summary.json", summary)
        else:
            rejected.append("final")
    contributions = sum(1 for k, _ in markers if not k.startswith("global/"))
    return CopyReport(counts["copied"], counts["skipped"], counts["bytes"], tuple(sorted(committed)),
                      contributions, tuple(sorted(rejected + refused)), time.monotonic() - t0)


def _is_contribution(key: str) -> bool:
    parts = key.split("/")
    return (parts[0] == "rounds" and len(parts) == 3 and parts[2].endswith(".json")
            and not parts[2].startswith("_"))  # _members.json is a decision, copied as data


if __name__ == "__main__":
    import sys
    from dataclasses import asdict

    print(json.dumps(asdict(copy_run(sys.argv[1], sys.argv[2])), indent=2))
