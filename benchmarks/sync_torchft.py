"""torchft 0.2.0's DiLoCo as a peer arm of the sync benchmark (benchmarks/sync.py).

torchft is not a geotrain dependency: it runs from a throwaway venv whose Python
is given as `--torchft-python`, e.g.

    python3 -m venv /tmp/tft && PIP_FIND_LINKS=/opt/wheels /tmp/tft/bin/pip install \
        torchft==0.2.0 torch==2.13.0

`run_peer()` (called from sync.py) starts a torchft Lighthouse and one process
per site with that Python; each site trains the same GPT on the same shard,
batch stream and lr schedule as the other arms, wrapped in
`torchft.local_sgd.DiLoCo` (Manager + ProcessGroupGloo, outer Nesterov SGD
0.7/0.9, sync every H steps). torchft all-reduces fp32 pseudo-gradients, so
its bytes per site are the ring all-reduce's, per round, each way (computed
from the algorithm like DDP's). If anything fails, the JSON records why.

    python benchmarks/sync_torchft.py lighthouse ADDR_FILE SITES
    python benchmarks/sync_torchft.py site SPEC.json INDEX RESULT.json LIGHTHOUSE_ADDR
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_peer(python: str, setup: dict, work: Path, timeout_s: float = 1800) -> dict:
    """The torchft arm's summary {status, why?, arm?} (never raises)."""
    n = setup["sites"]
    ours = subprocess.run([sys.executable, "-c", "import pydantic, sys; print(pydantic.__file__.rsplit('/pydantic/', 1)[0])"],
                          capture_output=True, text=True).stdout.strip()
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONFAULTHANDLER="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), ours]))
    probe = subprocess.run([python, "-c", "import torchft, torch; print(torch.__version__)"],
                           capture_output=True, text=True, env=env)
    if probe.returncode != 0:
        return {"status": "failed", "why": f"cannot import torchft with {python}: "
                f"{probe.stderr.strip()[-500:]}"}
    addr_file = work / "lighthouse.addr"
    me = str(Path(__file__).resolve())
    lighthouse = subprocess.Popen([python, me, "lighthouse", str(addr_file), str(n)], env=env,
                                  stdout=open(work / "lighthouse.log", "w"), stderr=subprocess.STDOUT)
    procs = []
    try:
        deadline = time.monotonic() + 60
        while not addr_file.exists() or not addr_file.read_text().strip():
            if lighthouse.poll() is not None or time.monotonic() > deadline:
                return {"status": "failed", "why": "lighthouse did not start: "
                        + (work / "lighthouse.log").read_text()[-800:]}
            time.sleep(0.2)
        addr = addr_file.read_text().strip()
        spec = dict(setup, name="torchft", kind="torchft")
        (work / "torchft.spec.json").write_text(json.dumps(spec))
        t0 = time.monotonic()
        for i in range(n):
            log = open(work / f"torchft.{i}.log", "w")
            procs.append(subprocess.Popen([python, me, "site", str(work / "torchft.spec.json"), str(i),
                                           str(work / f"torchft.{i}.json"), addr],
                                          env=env, stdout=log, stderr=subprocess.STDOUT))
        for i, p in enumerate(procs):
            try:
                code = p.wait(timeout=max(1.0, timeout_s - (time.monotonic() - t0)))
            except subprocess.TimeoutExpired:
                return {"status": "failed", "why": f"site {i} did not finish in {timeout_s} s: "
                        + (work / f"torchft.{i}.log").read_text()[-1500:]}
            if code != 0:
                return {"status": "failed", "why": f"site {i} exited with {code}: "
                        + (work / f"torchft.{i}.log").read_text()[-1500:]}
        results = [json.loads((work / f"torchft.{i}.json").read_text()) for i in range(n)]
    finally:
        for p in [*procs, lighthouse]:
            if p.poll() is None:
                p.kill()
                p.wait()
    first = results[0]
    arm = {"name": f"torchft-diloco-H{setup['H']}", "sites": n,
           "bytes_per_site": sum(r["bytes_sent"] + r["bytes_received"] for r in results) / n,
           "bytes_sent_per_site": sum(r["bytes_sent"] for r in results) / n,
           "eval_loss": first["eval_loss"], "tokens": first["tokens"],
           "wall_s": max(r["wall_s"] for r in results), "compute_s": first["compute_s"],
           "params": first["params"], "curve": first["curve"], "codec": "fp32 all-reduce",
           "H": setup["H"]}
    return {"status": "ran", "torch": probe.stdout.strip(), "arm": arm}


def lighthouse_main(addr_file: str, n: int) -> None:
    from torchft._torchft import LighthouseServer

    server = LighthouseServer(bind="[::]:0", min_replicas=n, join_timeout_ms=60_000)
    Path(addr_file).write_text(server.address())
    while True:
        time.sleep(3600)


def site_main(spec_path: str, index: int, out_path: str, lighthouse: str) -> None:
    from datetime import timedelta

    import torch
    import torch.distributed as dist
    from torchft.local_sgd import DiLoCo
    from torchft.manager import Manager
    from torchft.process_group import ProcessGroupGloo

    from geotrain.train import data as D
    from geotrain.train.model import GPTConfig, build, configure_optimizer, lr_at
    from geotrain.train.trainer import evaluate

    spec = json.loads(Path(spec_path).read_text())
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    n, steps, seed, m = spec["sites"], spec["steps"], spec["seed"], spec["model"]
    cfg = GPTConfig(n_layer=m["n_layer"], n_head=m["n_head"], d_model=m["d_model"], context=m["context"])
    train_files, eval_files = D.split(D.stdlib_files(), spec["eval_fraction"], seed)
    data = D.load_bytes(D.shard(train_files, index, n), max_bytes=spec.get("max_bytes_per_site"))
    batches = D.Batches(data, spec["batch"], cfg.context, seed=seed * 1000 + index + 1)
    model = build(cfg, seed=seed)
    inner = configure_optimizer(model, spec["lr"], spec["weight_decay"], (0.9, 0.95))
    outer = torch.optim.SGD(model.parameters(), lr=spec["outer_lr"], momentum=spec["outer_momentum"],
                            nesterov=True)
    numel = sum(p.numel() for p in model.parameters())
    evals = None
    if index == 0 and spec["eval_batches"]:
        need = spec["eval_batches"] * spec["batch"] * (cfg.context + 1) * 4
        evals = D.eval_batches(D.load_bytes(eval_files, max_bytes=need), spec["batch"],
                               cfg.context, spec["eval_batches"])
    store = dist.TCPStore("localhost", 0, is_master=True, wait_for_workers=False)
    manager = Manager(
        pg=ProcessGroupGloo(timeout=timedelta(seconds=120)), min_replica_size=n,
        use_async_quorum=False, load_state_dict=lambda sd: model.load_state_dict(sd["model"]),
        state_dict=lambda: {"model": model.state_dict()}, replica_id=f"site{index}",
        store_addr="localhost", store_port=store.port, rank=0, world_size=1,
        lighthouse_addr=lighthouse, timeout=timedelta(seconds=120),
        quorum_timeout=timedelta(seconds=120), connect_timeout=timedelta(seconds=60))
    tokens_per_step = spec["batch"] * cfg.context * n
    ring = int(2 * (n - 1) / n * 4 * numel)
    out = {"site": index, "params": numel, "compute_s": 0.0, "curve": []}
    rounds = 0
    t_start = time.perf_counter()
    with DiLoCo(manager, [model], inner, outer, sync_every=spec["H"], pin_memory=False):
        for step in range(steps):
            for g in inner.param_groups:
                g["lr"] = lr_at(step, spec["lr"], spec["warmup"], steps, spec["min_lr_ratio"])
            t0 = time.perf_counter()
            x, y = batches.next()
            _, loss = model(x, y)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), spec["clip"])
            out["compute_s"] += time.perf_counter() - t0
            inner.step()   # DiLoCo's hook syncs every H steps
            inner.zero_grad(set_to_none=True)
            if (step + 1) % spec["H"] == 0:
                rounds += 1
                if evals is not None and ((step + 1) % spec["eval_every"] == 0 or step == steps - 1):
                    out["curve"].append({"tokens": (step + 1) * tokens_per_step,
                                         "bytes": 2 * rounds * ring, "eval_loss": evaluate(model, evals)})
    out.update(wall_s=time.perf_counter() - t_start, tokens=steps * tokens_per_step,
               bytes_sent=rounds * ring, bytes_received=rounds * ring, rounds=rounds,
               manager_step=manager.current_step(),
               eval_loss=out["curve"][-1]["eval_loss"] if out["curve"] else None)
    Path(out_path).write_text(json.dumps(out))
    sys.stdout.flush()
    manager.shutdown(wait=False)
    os._exit(0)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    if sys.argv[1] == "lighthouse":
        lighthouse_main(sys.argv[2], int(sys.argv[3]))
    else:
        site_main(sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5])
