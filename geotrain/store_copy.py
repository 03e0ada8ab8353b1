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
manifest is copied without its marker and reported in `rejected`, so it is
invisible at the destination as it should have been at the source.

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
    rejected: tuple[str, ...]  # units whose data did not match their manifest, copied unmarked
    seconds: float


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
    keys = src.keys()
    if not keys:
        raise StoreError(f"store: nothing to copy at {src.url} (no objects)")
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

    def global_round(r: int) -> tuple[int, str, bytes | None, set[str]]:
        """Verify and copy a committed round's data; its marker is held back."""
        base = f"global/{round_key(r)}"
        marker = src.get(f"{base}/COMMITTED")
        manifest_raw = src.get(f"{base}/manifest.json")
        try:
            ok = json.loads(marker)["manifest_sha256"] == sha256(manifest_raw)
            files = json.loads(manifest_raw)["files"]
        except (json.JSONDecodeError, KeyError, TypeError):
            ok, files = False, {}
        for name, digest in files.items():
            data = src.get(f"{base}/{name}")
            ok = ok and sha256(data) == digest
            copy(f"{base}/{name}", data)
        copy(f"{base}/manifest.json", manifest_raw)
        vouched = {f"{base}/{name}" for name in files} | {f"{base}/manifest.json", f"{base}/COMMITTED"}
        return r, base, marker if ok else None, vouched

    def contribution(key: str) -> tuple[str, bytes | None]:
        """Verify and copy a contribution's payload; its manifest is held back."""
        raw = src.get(key)
        try:
            digest = json.loads(raw)["sha256"]
            payload = src.get(key[:-5] + ".bin")
        except (json.JSONDecodeError, KeyError, TypeError, FileNotFoundError):
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
        for r, base, marker, handled in pool.map(global_round, src.committed_rounds()):
            vouched |= handled
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
        #    uncommitted leftovers, final/ model), then the markers.
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
        except (json.JSONDecodeError, AttributeError, FileNotFoundError):
            digest, model = None, b""
        if digest is not None and sha256(model) == digest:
            copy("final/summary.json", summary)
        else:
            rejected.append("final")
    contributions = sum(1 for k, _ in markers if not k.startswith("global/"))
    return CopyReport(counts["copied"], counts["skipped"], counts["bytes"], tuple(sorted(committed)),
                      contributions, tuple(sorted(rejected)), time.monotonic() - t0)


def _is_contribution(key: str) -> bool:
    parts = key.split("/")
    return (parts[0] == "rounds" and len(parts) == 3 and parts[2].endswith(".json")
            and not parts[2].startswith("_"))  # _members.json is a decision, copied as data


if __name__ == "__main__":
    import sys
    from dataclasses import asdict

    print(json.dumps(asdict(copy_run(sys.argv[1], sys.argv[2])), indent=2))
