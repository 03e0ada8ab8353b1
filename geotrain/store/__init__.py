"""The run store: the single source of truth of a run, on any fsspec backend.

- geotrain/store/objects.py — objects: atomic writes, first-writer-wins creates,
  listings, JSON, signed read URLs, retries, fault plans.
- geotrain/store/run.py — `RunStore`: the layout (every key is built there) and
  what each object means.
- geotrain/store/records.py — the typed, validated records that cross the store.
- geotrain/store/control.py — the proofs that make a record count: the run's
  control key and a site's own secret.
- geotrain/store/decisions.py — round decisions (a chain of slots) and evals,
  signed by the member that wrote them.

Run `python -m geotrain.store URL` to print a run store's summary.
"""

from geotrain.store.objects import (ENDPOINT_ENV, SCHEMES, ObjectStore, join,  # noqa: F401
                                    round_key, sha256)
from geotrain.store.roster import member_writes  # noqa: F401
from geotrain.store.run import RunStore, run_url  # noqa: F401
from geotrain.store_retry import RetryPolicy, is_transient, parse_settings, retry  # noqa: F401
