"""One site of the sync benchmark (benchmarks/sync.py starts one process per site).

    python benchmarks/sync_site.py SPEC.json SITE_INDEX RESULT.json

The spec (written by sync.py) says the arm — `ddp` (torch.distributed gloo
all-reduce of the flat gradient every step) or `diloco` (geotrain's DiLoCo
through a RunStore with a codec every H steps) — and the training setup, which
is the same for every arm: model, data shard, batch stream, lr schedule, steps.

Every site counts what it computes (forward, backward, clip, inner optimizer
step) apart from everything else, so `compute_s / wall_s` is its utilisation.
With `step_s` each inner step is padded (slept) to last that long and counts as
compute: a modelled accelerator, for utilisation at a large model's step time
(benchmarks/sync_scaled.py).
Latency is modelled, not emulated (netem is unavailable here): a store request
waits `rtt_s` before it is sent (one round trip per request), and a DDP
all-reduce waits (N-1)·rtt_s after it returns (a ring all-reduce is 2(N-1)
sequential hops of one one-way delay each).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from geotrain.store import RunStore
from geotrain.sync.compression import make_codec
from geotrain.sync.diloco import DiLoCo, RoundExchange
from geotrain.sync.schedule import OuterLR
from geotrain.train import data as D
from geotrain.train.model import GPTConfig, build, configure_optimizer, lr_at
from geotrain.train.muon import configure_muon
from geotrain.train.trainer import evaluate


class DelayedStore(RunStore):
    """A RunStore whose every request first waits one round trip."""

    def __init__(self, url: str, rtt_s: float, **storage_options):
        super().__init__(url, **storage_options)
        self.rtt_s = rtt_s

    def _wait(self) -> None:
        if self.rtt_s:
            time.sleep(self.rtt_s)

    def put(self, key, data):
        self._wait()
        return super().put(key, data)

    def create(self, key, data):
        self._wait()
        return super().create(key, data)

    def get(self, key):
        self._wait()
        return super().get(key)

    def exists(self, key):
        self._wait()
        return super().exists(key)

    def listdir(self, key):
        self._wait()
        return super().listdir(key)


def ring_allreduce_bytes(numel: int, world: int) -> int:
    """Bytes one rank sends (and receives) in a ring all-reduce of `numel` fp32
    values: reduce-scatter then all-gather, each (N-1) chunks of numel/N."""
    return int(2 * (world - 1) / world * 4 * numel)


def store_for(spec: dict) -> RunStore:
    return DelayedStore(spec["store_url"], spec.get("rtt_s", 0.0), **spec.get("storage_options", {}))


def wait_for_all(store: RunStore, site: str, n: int, timeout_s: float = 300.0) -> None:
    """A start barrier through the store, so that no round starts before every
    site has loaded its data (a slow loader must not be left out of round 1)."""
    store.put_json(f"bench/ready/{site}", {"at": time.time()})
    deadline = time.monotonic() + timeout_s
    while len(store.listdir("bench/ready")) < n:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{site}: not every site was ready within {timeout_s} s")
        time.sleep(0.05)


def run(spec: dict, index: int) -> dict:
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    n, steps, seed = spec["sites"], spec["steps"], spec["seed"]
    m = spec["model"]
    cfg = GPTConfig(n_layer=m["n_layer"], n_head=m["n_head"], d_model=m["d_model"], context=m["context"])
    train_files, eval_files = D.split(D.stdlib_files(), spec["eval_fraction"], seed)
    data = D.load_bytes(D.shard(train_files, index, n), max_bytes=spec.get("max_bytes_per_site"))
    batches = D.Batches(data, spec["batch"], cfg.context, seed=seed * 1000 + index + 1)
    model = build(cfg, seed=seed)
    if spec.get("optimizer", "adamw") == "muon":  # Muon for hidden matrices, AdamW for the rest
        opt = configure_muon(model, muon_lr=spec.get("muon_lr", 0.02), adamw_lr=spec["lr"],
                             weight_decay=spec["weight_decay"], betas=(0.9, 0.95))
    else:
        opt = configure_optimizer(model, spec["lr"], spec["weight_decay"], (0.9, 0.95))
    numel = sum(p.numel() for p in model.parameters())
    evals = None
    if index == 0 and spec["eval_batches"]:
        need = spec["eval_batches"] * spec["batch"] * (cfg.context + 1) * 4
        evals = D.eval_batches(D.load_bytes(eval_files, max_bytes=need), spec["batch"],
                               cfg.context, spec["eval_batches"])
    tokens_per_step = spec["batch"] * cfg.context * n   # every site's, i.e. global
    rtt = spec.get("rtt_s", 0.0)
    step_s = spec.get("step_s", 0.0)  # pad each inner step to this long (0: as measured)
    out = {"site": index, "params": numel, "compute_s": 0.0, "bytes_sent": 0, "bytes_received": 0,
           "curve": [], "overrun_steps": 0}

    diloco = None
    if spec["kind"] == "ddp":
        dist.init_process_group("gloo", init_method=spec["init_method"], rank=index, world_size=n)
        dist.barrier()
    else:
        store = store_for(spec)
        site = f"site{index}"
        exchange = RoundExchange(store, site, codec=make_codec(
            spec["codec"], topk_fraction=spec.get("topk_fraction", 0.01),
            chunk=spec.get("topk_chunk", 4096), value_bits=spec.get("value_bits", 4),
            error_decay=spec.get("error_decay", 1.0)),
            liveness_s=30.0, state_every=spec.get("state_every", 1), final_round=steps // spec["H"])
        outer_lr = OuterLR(spec["outer_lr"], steps // spec["H"],
                           spec.get("outer_lr_schedule", "constant"),
                           spec.get("outer_lr_warmup", 0), spec.get("outer_lr_min_ratio", 0.1))
        diloco = DiLoCo(model, opt, exchange, inner_steps=spec["H"], outer_lr=outer_lr,
                        outer_momentum=spec["outer_momentum"], overlap=spec.get("overlap", False),
                        fragments=spec.get("fragments", 1))
        wait_for_all(store, site, n)
        diloco.__enter__()

    def record(step: int, sent: int, received: int) -> None:
        if evals is not None:
            out["curve"].append({"tokens": (step + 1) * tokens_per_step, "bytes": sent + received,
                                 "eval_loss": evaluate(model, evals)})

    eval_every, next_eval = spec["eval_every"], spec["eval_every"]
    grads = [p for p in model.parameters()]
    t_start = time.perf_counter()
    try:
        for step in range(steps):
            for g in opt.param_groups:  # each group from its own peak (Muon's differs)
                g["lr"] = lr_at(step, g.setdefault("base_lr", g["lr"]), spec["warmup"], steps,
                                spec["min_lr_ratio"])
            t0 = time.perf_counter()
            x, y = batches.next()
            _, loss = model(x, y)
            loss.backward()
            step_compute = time.perf_counter() - t0
            if diloco is None:
                flat = torch.cat([p.grad.reshape(-1) for p in grads])
                dist.all_reduce(flat)
                if rtt:
                    time.sleep((n - 1) * rtt)
                flat /= n
                off = 0
                for p in grads:
                    p.grad.copy_(flat[off:off + p.numel()].view_as(p.grad))
                    off += p.numel()
                out["bytes_sent"] += ring_allreduce_bytes(numel, n)
                out["bytes_received"] += ring_allreduce_bytes(numel, n)
            t0 = time.perf_counter()
            torch.nn.utils.clip_grad_norm_(model.parameters(), spec["clip"])
            opt.step()
            opt.zero_grad(set_to_none=True)
            step_compute += time.perf_counter() - t0
            if step_s and step_compute > step_s:
                out["overrun_steps"] += 1   # the CPU was slower than the modelled step
            elif step_s:
                # A modelled accelerator: the step lasts step_s, as a large model's would.
                time.sleep(step_s - step_compute)
                step_compute = step_s
            out["compute_s"] += step_compute
            if not math.isfinite(loss.item()):
                raise FloatingPointError(f"site {index}: non-finite loss at step {step}")
            if diloco is None:
                if (step + 1) >= next_eval or step == steps - 1:
                    record(step, out["bytes_sent"], out["bytes_received"])
                    next_eval += eval_every
            elif diloco.step(tokens=tokens_per_step // n) is not None:
                if (step + 1) >= next_eval and step < steps - 1:
                    record(step, diloco.bytes_sent, diloco.bytes_received)
                    next_eval += eval_every
        out["loop_s"] = time.perf_counter() - t_start  # before the last merge drains
        if diloco is not None:
            diloco.finish()
            out.update(bytes_sent=diloco.bytes_sent, bytes_received=diloco.bytes_received,
                       rounds=diloco.round, wait_s=diloco.wait_s,
                       hash=diloco.history[-1].hash if diloco.history else None)
            record(steps - 1, diloco.bytes_sent, diloco.bytes_received)
    finally:
        if diloco is not None:
            diloco.__exit__(None, None, None)
        if dist.is_initialized():
            dist.destroy_process_group()
    out["wall_s"] = time.perf_counter() - t_start
    out["tokens"] = steps * tokens_per_step
    out["eval_loss"] = out["curve"][-1]["eval_loss"] if out["curve"] else None
    return out


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    result = run(spec, int(sys.argv[2]))
    Path(sys.argv[3]).write_text(json.dumps(result))
    sys.stdout.flush()
    # Everything is closed and written; skip interpreter teardown, where a
    # daemon thread still unwinding once aborted the process (SIGABRT,
    # "terminate called without an active exception") after its work was done.
    os._exit(0)


if __name__ == "__main__":
    main()
