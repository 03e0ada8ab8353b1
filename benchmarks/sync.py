"""Sync benchmark: DiLoCo with codecs against DDP — bytes between sites, held-out
loss, and compute utilisation over thin links.

    python benchmarks/sync.py [--quick] [--out benchmarks/out/sync.json]
        [--codecs none,int8,topk] [--H 10,50] [--mbit 10,100,1000] [--rtt-ms 50]
        [--torchft-python /path/to/venv/bin/python]

1. Loss and bytes. Every arm trains the same byte-level GPT from the same seed
   on the same per-site data shards and batch streams, for the same number of
   steps (so the same tokens), with the same inner AdamW and lr schedule, on
   `--sites` processes (one torch thread each). `ddp` all-reduces the flat
   fp32 gradient with torch.distributed gloo every step; its bytes are those
   of the ring all-reduce algorithm (2(N-1)/N · 4 · params per rank per step,
   each way). `diloco-<codec>-H<h>` runs geotrain's DiLoCo through a file://
   run store; its bytes are the payloads each site uploaded plus what it
   downloaded of the others'. Ratios are against `ddp` of the same run.
2. Utilisation. 3 sites, each in its own network namespace behind a link of
   10 / 100 / 1000 Mbit/s (tc tbf both ways), exchanging through a moto S3
   server in the root namespace (real boto/s3fs requests), and DDP with gloo
   over the same links. Latency is modelled (netem is unavailable): `--rtt-ms`
   per store request and (N-1)·RTT per all-reduce. Utilisation = compute time
   / wall time per site, DiLoCo with overlap off and on.
3. torchft 0.2.0's DiLoCo as a peer when `--torchft-python` names a Python that
   has it (see benchmarks/sync_torchft.py); otherwise the JSON says why not.

The 2-core machine is shared: compare arms by tokens and bytes, not seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks import sync_net  # noqa: E402
from benchmarks.sync_report import plot, print_arms, print_util  # noqa: E402

SITE = Path(__file__).with_name("sync_site.py")

# Training setups shared by every arm of a run. `full` is MACHINE-NOTES's
# reference scale; lr 6e-3 is the DP-tuned inner lr found there.
PRESETS = {
    "full": dict(model=dict(n_layer=4, n_head=4, d_model=128, context=128), batch=8, steps=1000,
                 warmup=50, eval_every=100, eval_batches=16, H=[10, 50], util_rounds=4,
                 util_ddp_steps=20),
    # Issue 13's regime: the full model for 3x the tokens (~15 per parameter with 4 sites),
    # H = 10, so every arm has 150 outer rounds.
    "long": dict(model=dict(n_layer=4, n_head=4, d_model=128, context=128), batch=8, steps=1500,
                 warmup=75, eval_every=50, eval_batches=16, H=[10], util_rounds=4,
                 util_ddp_steps=20),
    "quick": dict(model=dict(n_layer=2, n_head=2, d_model=64, context=64), batch=8, steps=240,
                  warmup=24, eval_every=60, eval_batches=8, H=[30], util_rounds=4,
                  util_ddp_steps=15),
    "tiny": dict(model=dict(n_layer=1, n_head=2, d_model=32, context=32), batch=4, steps=20,
                 warmup=2, eval_every=10, eval_batches=2, H=[5], util_rounds=2, util_ddp_steps=6,
                 max_bytes_per_site=200_000),
}
COMMON = dict(lr=6e-3, weight_decay=0.1, clip=1.0, min_lr_ratio=0.1, seed=0, eval_fraction=0.0175,
              outer_lr=0.7, outer_momentum=0.9, topk_fraction=0.01, value_bits=4)


def free_port(host: str = "127.0.0.1") -> int:
    import socket
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def prepare_store(url: str, spec: dict, storage_options: dict) -> None:
    """Round 0 (the seed's model) committed, and every site marked as starting."""
    from geotrain.store import RunStore
    from geotrain.sync.diloco import encode, model_params, params_hash
    from geotrain.train.model import GPTConfig, build

    store = RunStore(url, **storage_options)
    params = model_params(build(GPTConfig(**spec["model"]), seed=spec["seed"]))
    store.commit_global(0, {"model.safetensors": encode(params)}, {"hash": params_hash(params)})
    for i in range(spec["sites"]):
        store.alive(f"site{i}", "starting")


def run_sites(spec: dict, work: Path, wrap=lambda i, cmd: cmd, env_for=lambda i: {},
              timeout_s: float = 3600) -> tuple[list[dict], float]:
    """Start one process per site, wait for all; (their results, wall seconds)."""
    spec_path = work / f"{spec['name']}.spec.json"
    spec_path.write_text(json.dumps(spec))
    procs = []
    t0 = time.monotonic()
    for i in range(spec["sites"]):
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONFAULTHANDLER="1", PYTHONPATH=str(ROOT), **env_for(i))
        cmd = wrap(i, [sys.executable, str(SITE), str(spec_path), str(i),
                       str(work / f"{spec['name']}.{i}.json")])
        log = open(work / f"{spec['name']}.{i}.log", "w")
        procs.append((subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT), log))
    try:
        for i, (p, log) in enumerate(procs):
            left = timeout_s - (time.monotonic() - t0)
            if p.wait(timeout=max(1.0, left)) != 0:
                tail = (work / f"{spec['name']}.{i}.log").read_text()[-3000:]
                raise RuntimeError(f"{spec['name']}: site {i} exited with {p.returncode}:\n{tail}")
    finally:
        for p, log in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
            log.close()
    wall = time.monotonic() - t0
    return [json.loads((work / f"{spec['name']}.{i}.json").read_text())
            for i in range(spec["sites"])], wall


def train_setup(setup: dict) -> dict:
    """What every site process needs from a preset (not the benchmark's own knobs)."""
    return dict(COMMON, **{k: v for k, v in setup.items()
                           if k not in ("H", "util_rounds", "util_ddp_steps")})


def schedule(value: str) -> str:
    """An outer lr schedule's name, checked now rather than in every site process."""
    from geotrain.sync.schedule import SCHEDULES
    if value not in SCHEDULES:
        raise SystemExit(f"outer lr schedule {value!r}; valid: {', '.join(SCHEDULES)}")
    return value


# Per-arm settings after the codec: "int8:olr=0.9:om=0.8", "topk@0.03:om=0:ed=0.95",
# "none:olr=1:om=0:olrs=cosine:olrmin=0.1:olrw=2" (the recipe's outer_lr_* fields),
# "int8:fr=4" (sync.fragments: each round syncs a quarter of the model).
ARM_KNOBS = {"olr": ("outer_lr", float), "om": ("outer_momentum", float), "ilr": ("lr", float),
             "ed": ("error_decay", float), "bits": ("value_bits", int), "se": ("state_every", int),
             "ch": ("topk_chunk", int), "opt": ("optimizer", str), "mlr": ("muon_lr", float),
             "olrs": ("outer_lr_schedule", schedule), "olrmin": ("outer_lr_min_ratio", float),
             "olrw": ("outer_lr_warmup", int), "fr": ("fragments", int)}


def parse_arm(text: str) -> tuple[str, str, dict]:
    """'topk@0.03:om=0:ed=0.95' -> ('topk', '0.03:om=0:ed=0.95', {settings})."""
    head, *knobs = text.split(":")
    codec, _, frac = head.partition("@")
    extra = {"topk_fraction": float(frac)} if frac else {}
    for k in knobs:
        key, _, value = k.partition("=")
        if key not in ARM_KNOBS or not value:
            raise SystemExit(f"arm {text!r}: setting {k!r}; valid: "
                             + ", ".join(f"{n}=<{t.__name__}> ({f})" for n, (f, t) in ARM_KNOBS.items()))
        field, kind = ARM_KNOBS[key]
        extra[field] = kind(value)
    return codec, text[len(codec):].lstrip("@"), extra


def arm_specs(setup: dict, sites: int, codecs: list[str], hs: list[int],
              ddp_optimizer: str = "adamw") -> list[dict]:
    base = dict(train_setup(setup), sites=sites)
    specs = [dict(base, name="ddp", kind="ddp", optimizer=ddp_optimizer)]
    for h in hs:
        if setup["steps"] % h:
            raise SystemExit(f"--H {h} does not divide the {setup['steps']} steps")
        for c in codecs:  # "topk@0.1": top-k keeping 10 %; ":olr=…" etc. per-arm settings
            codec, tag, extra = parse_arm(c)
            tag = tag.replace(":", ",")  # names become file names and store URLs
            specs.append(dict(base, name=f"diloco-{codec}{tag}-H{h}", kind="diloco", codec=codec,
                              H=h, **extra))
    return specs


def run_arm(spec: dict, work: Path) -> dict:
    if spec["kind"] == "ddp":
        spec = dict(spec, init_method=f"tcp://127.0.0.1:{free_port()}")
    else:
        url = "file://" + str(work / "stores" / spec["name"])
        spec = dict(spec, store_url=url)
        prepare_store(url, spec, {})
    results, proc_wall = run_sites(spec, work)
    first = results[0]
    payload = sum(r["bytes_sent"] + r["bytes_received"] for r in results) / len(results)
    arm = {"name": spec["name"], "sites": spec["sites"],
           "bytes_per_site": payload, "payload_bytes_per_site": payload,
           "bytes_sent_per_site": sum(r["bytes_sent"] for r in results) / len(results),
           "eval_loss": first["eval_loss"], "tokens": first["tokens"],
           "wall_s": max(r["wall_s"] for r in results), "process_wall_s": proc_wall,
           "compute_s": sum(r["compute_s"] for r in results) / len(results),
           "params": first["params"], "curve": first["curve"],
           "codec": spec.get("codec"), "H": spec.get("H"),
           "optimizer": spec.get("optimizer", "adamw")}
    if spec["kind"] == "diloco":
        hashes = {r["hash"] for r in results}
        arm["bit_identical_sites"] = len(hashes) == 1
        # Not in DiLoCo.bytes_sent: the global state (model + outer momentum, fp32)
        # that the round's decider commits to the store every round.
        arm["commit_bytes_per_site"] = commit_bytes(work / "stores" / spec["name"]) / spec["sites"]
        arm["bytes_per_site"] = payload + arm["commit_bytes_per_site"]
    return arm


SCHEMA = 2  # 2: bytes_per_site counts the global-state commits (1: payloads only)


def upgrade(doc: dict) -> dict:
    """A result written before SCHEMA 2 (bytes_per_site = payloads only, the commits in
    commit_bytes_per_site beside it), in SCHEMA 2's terms: the same run's own figures,
    added up; nothing measured again. Ratios are recomputed."""
    if doc.get("schema", 1) >= SCHEMA:
        return doc
    for a in doc["arms"]:
        a.setdefault("payload_bytes_per_site", a["bytes_per_site"])
        a["bytes_per_site"] = a["payload_bytes_per_site"] + a.get("commit_bytes_per_site", 0)
    if any(a["name"] == "ddp" for a in doc["arms"]):
        add_ratios(doc["arms"])
    return dict(doc, schema=SCHEMA)


def commit_bytes(store_dir: Path) -> int:
    """Bytes of every committed global round after round 0 in a file:// store."""
    rounds = [d for d in (store_dir / "global").iterdir() if d.is_dir() and int(d.name) > 0]
    return sum(f.stat().st_size for d in rounds for f in d.iterdir() if f.is_file())


def add_ratios(arms: list[dict]) -> None:
    ddp = next(a for a in arms if a["name"] == "ddp")
    for a in arms:
        # With the commits (bytes_per_site) and without (payloads up and down only).
        a["bytes_ratio_vs_ddp"] = ddp["bytes_per_site"] / max(a["bytes_per_site"], 1)
        a["payload_ratio_vs_ddp"] = (ddp.get("payload_bytes_per_site", ddp["bytes_per_site"])
                                     / max(a.get("payload_bytes_per_site", a["bytes_per_site"]), 1))
        a["sent_ratio_vs_ddp"] = ddp["bytes_sent_per_site"] / max(a["bytes_sent_per_site"], 1)
        a["loss_gap_vs_ddp"] = a["eval_loss"] / ddp["eval_loss"] - 1


def util_specs(base: dict, setup: dict, codec: str, h: int, ddp_init: str, store: str,
               opts: dict) -> list[dict]:
    """DDP, and DiLoCo with overlap off and on, for one utilisation measurement."""
    specs = [dict(base, name="ddp-util", arm="ddp", kind="ddp", steps=setup["util_ddp_steps"],
                  init_method=ddp_init)]
    for overlap in (False, True):
        tag = f"diloco-{codec}-H{h}" + ("-overlap" if overlap else "")
        specs.append(dict(base, name=f"{tag}-util", arm=tag, kind="diloco", codec=codec, H=h,
                          overlap=overlap, steps=h * setup["util_rounds"],
                          store_url=f"{store}/{tag}-{time.time_ns()}", storage_options=opts))
    return specs


def util_row(mbit: float | None, spec: dict, results: list[dict], wire: list[int] | None) -> dict:
    n = len(results)
    utils = [r["compute_s"] / r["loop_s"] for r in results]
    drained = [r["compute_s"] / r["wall_s"] for r in results]
    return {"mbit": mbit, "arm": spec["arm"], "utilization": sum(utils) / n,
            "utilization_min": min(utils), "utilization_with_drain": sum(drained) / n,
            "steps": spec["steps"], "wall_s": max(r["wall_s"] for r in results),
            "wire_bytes_per_site": sum(wire) / n if wire else None,
            "payload_bytes_per_site": sum(r["bytes_sent"] + r["bytes_received"] for r in results) / n}


def utilization(setup: dict, mbits: list[float], codec: str, h: int, rtt_s: float,
                work: Path) -> tuple[list[dict], list[dict], str | None]:
    """(rows over thin links, reference rows on this machine without links or
    latency, why the links were skipped or None)."""
    n = 3
    base = dict(train_setup(setup), sites=n, eval_batches=0)
    reference = []
    for spec in util_specs(base, setup, codec, h, f"tcp://127.0.0.1:{free_port()}",
                           "file://" + str(work / "stores"), {}):
        if spec["kind"] == "diloco":
            prepare_store(spec["store_url"], spec, {})
        reference.append(util_row(None, spec, run_sites(spec, work)[0], None))
        print_util(reference[-1])
    why = sync_net.unavailable_reason()
    if why:
        print(f"utilisation over links skipped: {why}", flush=True)
        return [], reference, why
    rows = []
    creds = dict(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
                 AWS_DEFAULT_REGION="us-east-1")
    os.environ.update(creds)
    base = dict(base, rtt_s=rtt_s)
    for mbit in mbits:
        with sync_net.Links(n, mbit) as links:
            moto, endpoint = sync_net.start_moto(links.hub_ip)
            try:
                import boto3
                boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="bench")
                env = lambda i: dict(creds, AWS_ENDPOINT_URL=endpoint,  # noqa: E731
                                     GLOO_SOCKET_IFNAME=links.site_dev(i))
                opts = {"client_kwargs": {"endpoint_url": endpoint}}
                for spec in util_specs(base, setup, codec, h, f"tcp://{links.site_ip(0)}:29511",
                                       "s3://bench", opts):
                    if spec["kind"] == "diloco":
                        prepare_store(spec["store_url"], spec, opts)
                    before = [links.wire_bytes(i) for i in range(n)]
                    results, _ = run_sites(spec, work, wrap=links.wrap, env_for=env)
                    wire = [links.wire_bytes(i) - b for i, b in zip(range(n), before)]
                    rows.append(util_row(mbit, spec, results, wire))
                    print_util(rows[-1])
            finally:
                moto.kill()
                moto.wait()
    return rows, reference, None


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small model, short run (<= 8 min)")
    ap.add_argument("--preset", choices=sorted(PRESETS), help="training setup (default full, or quick)")
    ap.add_argument("--sites", type=int, default=4)
    ap.add_argument("--codecs", default="none,int8,topk",
                    help="DiLoCo arms, comma-separated: a codec, topk@F keeps the fraction F, "
                         "then optional :olr=, :om= (outer lr, momentum), :olrs= (outer lr "
                         "schedule: constant, cosine), :olrmin= (cosine's floor as a share of "
                         "olr), :olrw= (outer warmup rounds), :ilr= (inner lr), "
                         ":ed= (error-feedback decay), :bits= (top-k value bits), "
                         ":se= (commit the global state every se rounds)")
    ap.add_argument("--H", default=None, help="inner steps per round, comma-separated")
    ap.add_argument("--steps", type=int, help="override the preset's steps")
    ap.add_argument("--mbit", default="10,100,1000", help="link rates for utilisation ('' skips)")
    ap.add_argument("--rtt-ms", type=float, default=50.0, help="modelled round trip per request")
    ap.add_argument("--util-codec", default="int8")
    ap.add_argument("--topk-fraction", type=float, default=COMMON["topk_fraction"])
    ap.add_argument("--value-bits", type=int, default=COMMON["value_bits"], help="top-k value bits")
    ap.add_argument("--ddp-optimizer", choices=("adamw", "muon"), default="adamw",
                    help="the ddp arm's optimizer (muon: Muon for hidden matrices at its "
                    "default lr, AdamW at the preset's lr for the rest)")
    ap.add_argument("--ddp-from", type=Path, help="take the ddp arm from an earlier run's JSON "
                    "(same preset and steps) instead of running it again: for sweeps")
    ap.add_argument("--torchft-python", help="a Python with torchft==0.2.0 installed")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/out/sync.json")
    ap.add_argument("--no-plots", action="store_true")
    ap.add_argument("--upgrade", type=Path, nargs="+", metavar="JSON",
                    help="rewrite earlier results in place in the current schema (upgrade()) and exit")
    a = ap.parse_args(argv)
    if a.upgrade:
        for path in a.upgrade:
            path.write_text(json.dumps(upgrade(json.loads(path.read_text())), indent=2))
            print(f"upgraded {path}")
        return {}
    preset = a.preset or ("quick" if a.quick else "full")
    setup = dict(PRESETS[preset], topk_fraction=a.topk_fraction, value_bits=a.value_bits)
    if a.steps:
        setup["steps"] = a.steps
    hs = [int(h) for h in a.H.split(",")] if a.H else setup["H"]
    codecs = [c for c in a.codecs.split(",") if c]
    a.out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="gt-bench-sync-") as tmp:
        work = Path(tmp)
        arms = []
        for spec in arm_specs(setup, a.sites, codecs, hs, a.ddp_optimizer):
            if a.ddp_from and spec["kind"] == "ddp":  # a sweep against an earlier run's DDP
                arms.append(next(x for x in upgrade(json.loads(a.ddp_from.read_text()))["arms"]
                                 if x["name"] == "ddp"))
                continue
            arms.append(run_arm(spec, work))
            print(f"  {arms[-1]['name']}: loss {arms[-1]['eval_loss']:.4f}, "
                  f"{arms[-1]['bytes_per_site']:,.0f} B/site, {arms[-1]['wall_s']:.0f} s", flush=True)
        add_ratios(arms)
        mbits = [float(m) for m in a.mbit.split(",") if m]
        util_h = max(hs)
        util, util_ref, util_skipped = utilization(
            setup, mbits, a.util_codec, util_h, a.rtt_ms / 1000, work) if mbits else (
            [], [], "no --mbit given")
        if a.torchft_python:
            from benchmarks.sync_torchft import run_peer
            torchft = run_peer(a.torchft_python, dict(train_setup(setup), sites=a.sites, H=util_h), work)
        else:
            torchft = {"status": "skipped", "why": "no --torchft-python given"}
        if torchft.get("arm"):
            arms.append(torchft["arm"])
            add_ratios(arms)
        else:
            print(f"torchft: {torchft['status']}: {torchft['why']}")
    print_arms(arms)
    results = {"schema": SCHEMA, "preset": preset, "setup": dict(COMMON, **setup), "arms": arms,
               "utilization": util, "utilization_skipped": util_skipped,
               "utilization_reference": util_ref,
               "utilization_setup": {"sites": 3, "codec": a.util_codec, "H": util_h,
                                     "rtt_ms": a.rtt_ms, "latency": "modelled: one RTT per store "
                                     "request, (N-1) RTT per gloo all-reduce"},
               "torchft": {k: v for k, v in torchft.items() if k != "arm"},
               "total_s": time.monotonic() - t0, "machine": {"cpus": os.cpu_count()}}
    a.out.write_text(json.dumps(results, indent=2))
    print(f"wrote {a.out}")
    if not a.no_plots:
        plot(results, a.out.parent, a.out.stem)
    print(f"total {results['total_s']:.0f} s")
    return results


if __name__ == "__main__":
    main()
