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
import time
from collections.abc import Callable
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
             src: RunStore | None = None, dst: RunStore | None = None) -> CopyReport:
    """Copy the run store at src_url to dst_url (see the module docstring).

    `src` / `dst` may be given as ready RunStores (e.g. with a fault plan);
    otherwise they are opened from the URLs with the environment's settings."""
    t0 = time.monotonic()
    src = src or RunStore(src_url)
    dst = dst or RunStore(dst_url)
    if src.url == dst.url:
        raise StoreError(f"store: cannot copy a run store onto itself ({src.url})")
    keys = src.keys()
    if not keys:
        raise StoreError(f"store: nothing to copy at {src.url} (no objects)")
    counts = {"copied": 0, "skipped": 0, "bytes": 0}

    def copy(key: str, data: bytes | None = None) -> None:
        data = src.get(key) if data is None else data
        try:
            same = dst.get(key) == data if dst.exists(key) else False
        except FileNotFoundError:
            same = False
        if not same:
            dst.put(key, data)
            counts["copied"] += 1
            counts["bytes"] += len(data)
        else:
            counts["skipped"] += 1
        if on_progress:
            on_progress(CopyProgress(key, len(data), not same))

    markers: list[tuple[str, bytes]] = []
    rejected: list[str] = []
    committed: list[int] = []
    contributions = 0
    vouched: set[str] = set()  # data objects already copied as part of a verified unit

    # 1. Committed global rounds, oldest first: data verified, marker held back.
    for r in src.committed_rounds():
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
            vouched.add(f"{base}/{name}")
        copy(f"{base}/manifest.json", manifest_raw)
        vouched |= {f"{base}/manifest.json", f"{base}/COMMITTED"}
        if ok:
            markers.append((f"{base}/COMMITTED", marker))
            committed.append(r)
        else:
            rejected.append(base)

    # 2. Contributions: payload verified against its manifest, manifest held back.
    for key in keys:
        parts = key.split("/")
        if not (parts[0] == "rounds" and len(parts) == 3 and parts[2].endswith(".json")
                and not parts[2].startswith("_")):  # _members.json is a decision, copied below
            continue
        raw = src.get(key)
        payload_key = key[:-5] + ".bin"
        try:
            digest = json.loads(raw)["sha256"]
            payload = src.get(payload_key)
        except (json.JSONDecodeError, KeyError, TypeError, FileNotFoundError):
            digest, payload = None, b""
        if digest is not None and sha256(payload) == digest:
            copy(payload_key, payload)
            markers.append((key, raw))
            contributions += 1
        else:
            rejected.append(key[:-5])
        vouched |= {key, payload_key}

    # 3. Everything else (run.json, heartbeats, events, results, uncommitted
    #    leftovers, final/ model), then the markers, final/summary.json last.
    for key in keys:
        if key not in vouched and not _is_marker(key):
            copy(key)
    for key, data in markers:
        copy(key, data)
    if "final/summary.json" in keys:  # the final model is vouched for by its summary
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
    return CopyReport(counts["copied"], counts["skipped"], counts["bytes"], tuple(committed),
                      contributions, tuple(rejected), time.monotonic() - t0)


if __name__ == "__main__":
    import sys
    from dataclasses import asdict

    print(json.dumps(asdict(copy_run(sys.argv[1], sys.argv[2])), indent=2))
