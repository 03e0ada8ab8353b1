"""Utilisation at a realistic link ratio: what share of a round a real model's
exchange would take, measured with a small model on a link scaled down to it.

    python benchmarks/sync_scaled.py [--target-params 1e9] [--mbit 100] [--step-s 1]
        [--arms defaults,int8-overlap,winner,winner-overlap] [--out PATH]

benchmarks/sync.py measures utilisation with its 0.84 M-parameter model on real
10-1000 Mbit/s links, so a payload is ~1000x smaller than a 1 B-parameter
model's and the link is almost never the limit. Here every byte is scaled
instead: the benchmark model's payload is `P / target` of the target model's
with the same codec (every codec's bytes are proportional to the parameter
count), so a link of `mbit * P / target` moves it in the time the target's
would take on `mbit`. Inner steps are padded to `--step-s` (a modelled
accelerator: about 1 s per step for a 1 B model on one GPU), so the exchange
takes the share of a round it would take at the target's scale.

What is real: 3 site processes, each in its own network namespace behind a
`tc tbf` link of the scaled rate both ways; geotrain's DiLoCo, codecs and
RoundExchange; a moto S3 server reached through s3fs/botocore; the global-state
commits. What is modelled: the step time (sleep), and latency (one `--rtt-ms`
per store request, as in sync.py). What does not scale: request headers,
liveness beats and polling, which are a larger share of a scaled-down link than
of a real one (the JSON gives wire bytes beside payload bytes), and the CPU
time to encode and decode, which is this CPU's for the small model.

DDP is not run at this scale (one fp32 all-reduce of a 1 B model per step over
100 Mbit/s takes minutes); its row is computed from the ring all-reduce's bytes
and marked so.

Utilisation = compute time / wall time per site (compute counts the padded
step), averaged over the sites; "steady" leaves out the drain after the last
inner step (the last merge and its commit), "with drain" keeps it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks import sync_net  # noqa: E402
from benchmarks.sync import COMMON, parse_arm, prepare_store, run_sites, util_row  # noqa: E402

SITES = 3
# The benchmark model: big enough that liveness and request headers are a small
# share of the scaled link, small enough that a step's real compute is well
# under a second on this CPU with three sites on two cores.
MODEL = dict(n_layer=4, n_head=6, d_model=384, context=128)
BATCH = 2

# name -> (codec with sync.py's arm knobs, H, overlap, rounds measured).
# `defaults` is the recipe's defaults (no codec, H = 50, outer Nesterov 0.7/0.9,
# the global state committed every round); `int8-overlap` is the arm behind
# docs/benchmarks.md's 97.7 % at 100 Mbit/s; `winner` is issue 13's best arm at
# >= 1000x (top-k 1 % in chunks of 256, 2-bit values, error feedback 0.95, outer
# lr 2 without momentum, the state committed only at the end). Its inner optimizer
# there is Muon; here AdamW, because the step time is modelled and Muon's
# Newton-Schulz costs this CPU more than the 1 s it models (bytes are the same).
ARMS = {
    "defaults": ("none", 50, False, 1),
    "int8-overlap": ("int8", 50, True, 2),
    "winner": ("topk@0.01:ch=256:bits=2:olr=2:om=0:ed=0.95:se=150", 10, False, 12),
    "winner-overlap": ("topk@0.01:ch=256:bits=2:olr=2:om=0:ed=0.95:se=150", 10, True, 12),
    "winner-se1-overlap": ("topk@0.01:ch=256:bits=2:olr=2:om=0:ed=0.95:se=1", 10, True, 3),
}


def params_of(model: dict) -> int:
    from geotrain.train.model import GPTConfig, build
    return sum(p.numel() for p in build(GPTConfig(**model), seed=0).parameters())


def ddp_row(target: float, mbit: float, step_s: float) -> dict:
    """DDP at the target's scale, computed: a ring all-reduce of fp32 gradients per
    step sends (and receives) 2(N-1)/N * 4 bytes per parameter on each site's link."""
    per_step = 2 * (SITES - 1) / SITES * 4 * target
    comm_s = per_step * 8 / (mbit * 1e6)
    return {"arm": "ddp", "computed": True, "utilization": step_s / (step_s + comm_s),
            "comm_s_per_step": comm_s, "bytes_per_step_each_way": per_step}


def spec_for(name: str, rtt_s: float, step_s: float, store: str, opts: dict) -> dict:
    codec_text, h, overlap, rounds = ARMS[name]
    codec, _, extra = parse_arm(codec_text)
    return dict(COMMON, model=MODEL, batch=BATCH, steps=h * rounds, warmup=h, eval_every=10**9,
                eval_batches=0, sites=SITES, name=f"{name}-util", arm=name, kind="diloco",
                codec=codec, H=h, overlap=overlap, rtt_s=rtt_s, step_s=step_s,
                store_url=f"{store}/{name}-{time.time_ns()}", storage_options=opts,
                **extra)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target-params", type=float, default=1e9)
    ap.add_argument("--mbit", type=float, default=100.0, help="the target's link, Mbit/s")
    ap.add_argument("--step-s", type=float, default=1.0, help="modelled inner step time")
    ap.add_argument("--rtt-ms", type=float, default=50.0)
    ap.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated, of {', '.join(ARMS)}")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/out/sync-scaled.json")
    a = ap.parse_args(argv)
    names = [n for n in a.arms.split(",") if n]
    unknown = [n for n in names if n not in ARMS]
    if unknown:
        raise SystemExit(f"unknown arm(s) {unknown}; valid: {', '.join(ARMS)}")
    why = sync_net.unavailable_reason()
    if why:
        raise SystemExit(f"thin links cannot be built here: {why}")
    params = params_of(MODEL)
    scale = params / a.target_params
    link = a.mbit * scale
    print(f"model {params:,} params = {scale:.3g} of {a.target_params:.3g}: link {a.mbit:g} Mbit/s "
          f"-> {link * 1000:.1f} kbit/s, steps padded to {a.step_s:g} s", flush=True)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    creds = dict(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
                 AWS_DEFAULT_REGION="us-east-1")
    os.environ.update(creds)
    rows, t0 = [], time.monotonic()
    with tempfile.TemporaryDirectory(prefix="gt-bench-scaled-") as tmp, \
            sync_net.Links(SITES, link) as links:
        work = Path(tmp)
        moto, endpoint = sync_net.start_moto(links.hub_ip)
        try:
            import boto3
            boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="bench")
            opts = {"client_kwargs": {"endpoint_url": endpoint}}
            env = lambda i: dict(creds, AWS_ENDPOINT_URL=endpoint,  # noqa: E731
                                 GLOO_SOCKET_IFNAME=links.site_dev(i))
            for name in names:
                spec = spec_for(name, a.rtt_ms / 1000, a.step_s, "s3://bench", opts)
                prepare_store(spec["store_url"], spec, opts)
                before = [links.wire_bytes(i) for i in range(SITES)]
                results, _ = run_sites(spec, work, wrap=links.wrap, env_for=env, timeout_s=4 * 3600)
                wire = [links.wire_bytes(i) - b for i, b in zip(range(SITES), before)]
                row = dict(util_row(link, spec, results, wire), codec=ARMS[name][0], H=spec["H"],
                           overlap=spec["overlap"], rounds=spec["steps"] // spec["H"],
                           wait_s=[r.get("wait_s") for r in results],
                           overrun_steps=sum(r.get("overrun_steps", 0) for r in results))
                rows.append(row)
                print(f"  {name:<20} utilisation {row['utilization']:6.1%} (min "
                      f"{row['utilization_min']:.1%}; {row['utilization_with_drain']:.1%} with the "
                      f"drain), wire {row['wire_bytes_per_site']:,.0f} B/site, payload "
                      f"{row['payload_bytes_per_site']:,.0f} B/site, {row['wall_s']:.0f} s, "
                      f"{row['overrun_steps']} steps over {a.step_s:g} s", flush=True)
                a.out.write_text(json.dumps(_results(a, params, scale, link, rows, t0), indent=2))
        finally:
            moto.kill()
            moto.wait()
    results = _results(a, params, scale, link, rows, t0)
    a.out.write_text(json.dumps(results, indent=2))
    print(f"wrote {a.out}; total {results['total_s']:.0f} s")
    return results


def _results(a, params: int, scale: float, link: float, rows: list[dict], t0: float) -> dict:
    return {"target_params": a.target_params, "target_mbit": a.mbit, "bench_params": params,
            "scale": scale, "link_mbit": link, "step_s": a.step_s, "rtt_ms": a.rtt_ms,
            "sites": SITES, "model": MODEL, "batch": BATCH, "arms": rows,
            "ddp": ddp_row(a.target_params, a.mbit, a.step_s),
            "total_s": time.monotonic() - t0, "machine": {"cpus": os.cpu_count()}}


if __name__ == "__main__":
    main()
