"""Which committed global state a joining site starts from.

A site that starts (a launch, a resume, a replacement, a migrated member)
takes the newest committed round that holds the global state and replays the
rounds decided since. The commit is store content like any other, so before
adopting it the site checks it:

- the model's own hash (`params_hash`) equals the hash its manifest records;
- it equals what the sites that merged that round say they ended it with
  (`rounds/<r>/results/<site>.json`, members of the run only): the hash most
  of them report, if any reported.

A commit that fails is reported (a `rejected-state` event) and the next older
one is tried; the rounds between are then replayed from their decisions and
contributions, each re-checked as any merge is. Round 0, which no site merges,
must have the hash the signed run.json names (the built-in trainer's model; a
user's entrypoint commits its own round 0, which has only its manifest). What this does not stop: a writer who rewrites
a commit *and* every site's result for it (results are not signed per site;
docs/security.md).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Iterator

from geotrain.errors import StoreError

_HASH = re.compile(r"[0-9a-f]{64}")


def state_problem(store, r: int, digest: str, manifest: dict,
                  is_member: Callable[[str], bool], initial_hash: str | None = None) -> str | None:
    """Why the state committed for round r (whose params hash to `digest`) must not be
    adopted, or None. `initial_hash`: round 0's hash as the signed run.json gives it."""
    if r == 0 and initial_hash is not None and digest != initial_hash:
        return f"its model hashes to {digest[:12]}, not to the {initial_hash[:12]} the run was " \
               "launched with (run.json)"
    if manifest.get("hash") != digest:
        return f"its model hashes to {digest[:12]}, not to the {str(manifest.get('hash'))[:12]} " \
               "its manifest records"
    try:
        results = store.results(r)
    except (StoreError, OSError, ValueError):
        results = {}
    votes = Counter(v["hash"] for s, v in results.items()
                    if is_member(s) and isinstance(v, dict) and isinstance(v.get("hash"), str)
                    and _HASH.fullmatch(v["hash"]))
    if not votes:
        return None
    (top, n), *rest = votes.most_common()
    if top != digest or (rest and rest[0][1] == n):
        return (f"the sites that merged round {r} ended it with {top[:12]} "
                f"({n} of {sum(votes.values())}), not with its {digest[:12]}")
    return None


def states_newest_first(store) -> Iterator[int]:
    """Committed rounds that hold the global state, newest first (read lazily)."""
    for name in reversed(store.listdir("global")):
        if not name.isdigit() or not store.is_committed(int(name)):
            continue
        try:
            files = store.global_manifest(int(name)).get("files") or {}
        except (StoreError, OSError, ValueError, AttributeError):
            continue
        if "model.safetensors" in files:
            yield int(name)
