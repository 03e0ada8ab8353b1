"""Preemption detection latency: `NoticeServer.preempt()` → the `NoticeThread`
callback, per provider, with the notice landing at a random point of the poll
cycle (a fresh server and thread per trial).

    python benchmarks/preemption_latency.py [--trials 20]

AWS and Azure poll every 0.5 s, so the latency is up to one interval plus a
request; GCE's hanging GET returns as the value changes.
"""

from __future__ import annotations

import argparse
import random
import statistics
import threading
import time

from geotrain.site.notice_server import PROVIDERS, NoticeServer
from geotrain.site.preemption import NoticeThread, watcher_for
from providers.gcp.watcher import GceWatcher


def trial(provider: str, rng: random.Random) -> float:
    with NoticeServer(provider) as server:
        watcher = watcher_for(provider, server.url)
        if isinstance(watcher, GceWatcher):
            watcher.wait_s = 5  # short hanging GETs, so the thread ends with the trial
        seen: list[float] = []
        got = threading.Event()
        thread = NoticeThread(watcher, lambda n: (seen.append(time.monotonic()), got.set())).start()
        time.sleep(0.3 + rng.random())
        t0 = time.monotonic()
        server.preempt(in_s=30)
        if not got.wait(10):
            raise RuntimeError(f"{provider}: no notice within 10 s")
        thread.stop()
        return seen[0] - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trials", type=int, default=20)
    a = p.parse_args()
    rng = random.Random(0)
    for provider in PROVIDERS:
        lat = sorted(trial(provider, rng) for _ in range(a.trials))
        p90 = lat[min(len(lat) - 1, int(0.9 * len(lat)))]
        print(f"{provider:6s} n={len(lat)}  median {statistics.median(lat) * 1000:4.0f} ms  "
              f"p90 {p90 * 1000:4.0f} ms  max {lat[-1] * 1000:4.0f} ms")


if __name__ == "__main__":
    main()
