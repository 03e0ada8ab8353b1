"""Launch benchmark: how long from `geotrain launch` to every site's first inner
step, how long the whole run takes, and where the loss ends — against the bare
cost of the same machinery measured in the same run.

    python benchmarks/launch.py [--recipe recipes/local.yaml] [--repeat 2] [--out benchmarks/out]

The baseline starts as many plain processes as the recipe has sites, all at
once, each importing torch and Ray, starting a local Ray cluster and calling
one actor method: the unavoidable part of a site's start on this machine.
The ratio geotrain ÷ baseline is what our own start-up adds (run store, model
init, data shard, gloo group, the first step). Figures are printed and saved
as JSON and a PNG plot; the machines are shared, so compare ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

BARE_SITE = """
import os, sys, time, tempfile
t0 = float(sys.argv[1])
import torch, ray
ray.init(address="local", num_cpus=1, include_dashboard=False, object_store_memory=80 * 2**20,
         _temp_dir=tempfile.mkdtemp(prefix="gt-bench-"))
@ray.remote
class A:
    def ping(self):
        import torch
        return 1
ray.get(A.remote().ping.remote())
print(time.time() - t0, flush=True)
ray.shutdown()
"""


def bare_start(n_sites: int) -> float:
    """Seconds until the slowest of n bare sites has answered from an actor."""
    t0 = time.time()
    env = dict(os.environ, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
    procs = [subprocess.Popen([sys.executable, "-c", BARE_SITE, str(t0)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
             for _ in range(n_sites)]
    return max(float(p.communicate(timeout=300)[0].strip().splitlines()[-1]) for p in procs)


def geotrain_run(recipe: Path) -> dict:
    home = tempfile.mkdtemp(prefix="gt-bench-home-")
    env = dict(os.environ, GEOTRAIN_HOME=home)
    t0 = time.time()
    p = subprocess.run([sys.executable, "-m", "geotrain", "launch", str(recipe), "--json"],
                       env=env, capture_output=True, text=True, timeout=1800)
    wall = time.time() - t0
    if p.returncode != 0:
        raise SystemExit(f"geotrain launch failed:\n{p.stderr[-2000:]}")
    s = json.loads(p.stdout)
    ts = {k: datetime.fromisoformat(s[k]).timestamp() for k in ("started_at", "first_step_at", "finished_at")}
    return {"run": s["id"], "first_step_s": ts["first_step_at"] - ts["started_at"],
            "run_s": ts["finished_at"] - ts["started_at"], "cli_wall_s": wall,
            "eval_loss": s["eval_loss"], "rounds": s["rounds_done"], "sites": len(s["sites"])}


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = results["runs"]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    labels = [f"#{i + 1}" for i in range(len(runs))]
    x = range(len(runs))
    ax.bar([i - 0.2 for i in x], [r["baseline_s"] for r in runs], 0.4, label="bare: torch + Ray + 1 actor")
    ax.bar([i + 0.2 for i in x], [r["first_step_s"] for r in runs], 0.4, label="geotrain: launch → first step")
    ax.set_xticks(list(x), labels)
    ax.set_ylabel("seconds (slowest site)")
    ax.set_title(f"start-up, {runs[0]['sites']} local sites")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", type=Path, default=ROOT / "recipes/local.yaml")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/out")
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    runs = []
    for i in range(a.repeat):
        r = geotrain_run(a.recipe)
        r["baseline_s"] = bare_start(r["sites"])
        r["ratio"] = r["first_step_s"] / r["baseline_s"]
        runs.append(r)
        print(f"#{i + 1}: launch→first step {r['first_step_s']:.1f} s (bare {r['baseline_s']:.1f} s, "
              f"×{r['ratio']:.2f}); run {r['run_s']:.0f} s; eval loss {r['eval_loss']:.3f} "
              f"after {r['rounds']} rounds", flush=True)
    results = {"recipe": str(a.recipe), "runs": runs, "machine": {"cpus": os.cpu_count()}}
    (a.out / "launch.json").write_text(json.dumps(results, indent=2))
    plot(results, a.out / "launch.png")
    print(f"wrote {a.out / 'launch.json'} and {a.out / 'launch.png'}")


if __name__ == "__main__":
    main()
