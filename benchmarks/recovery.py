"""Recovery benchmark: what losing a site costs with geotrain (replace that site,
the others go on) against what today's tools do (restart everything), and
what moving a site costs (make-before-break migration) — all in one run.

    python benchmarks/recovery.py [--sites 3] [--rounds 80] [--out benchmarks/out]

Scenarios, each on its own fresh run of the same small 3-site recipe:

- replace: kill -9 one site's agent mid-round. Figures: detection (kill ->
  `site-lost`), loss -> the replacement's first inner step, rounds lost
  (committed rounds must be 0..R with no gap), inner steps lost (what the
  killed site had trained since its last contribution), rounds the other
  sites committed while the lost one was away (they never stopped).
- restart (baseline): kill -9 the controller and every site, then
  `geotrain resume`: loss -> every site training again.
- migrate: `geotrain migrate --site a --to local:west`: time to join,
  total time, downtime (old member stopped before the new one trained).

Prints the figures, writes JSON and a PNG plot; compare the ratio, not the
seconds (shared, noisy machine).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

RECIPE = """\
name: recovery
model: {{preset: tiny, n_layer: 2, d_model: 64, n_head: 4}}
train: {{rounds: {rounds}, inner_steps: {h}, batch_size: 4, seq_len: 64, lr: 3.0e-3, warmup_steps: 5}}
sites:
{sites}
"""


class Run:
    def __init__(self, sites: int, rounds: int, h: int):
        self.home = Path(tempfile.mkdtemp(prefix="gt-recovery-"))
        self.env = dict(os.environ, GEOTRAIN_HOME=str(self.home))
        self.rounds, self.h = rounds, h
        names = "\n".join(f"  - {{name: {chr(ord('a') + i)}}}" for i in range(sites))
        path = self.home / "recipe.yaml"
        path.write_text(RECIPE.format(rounds=rounds, h=h, sites=names))
        self.id = json.loads(self.cli("launch", str(path), "--detach", "--json"))["run"]

    def cli(self, *args: str, timeout: float = 600) -> str:
        p = subprocess.run([sys.executable, "-m", "geotrain", *args], env=self.env,
                           capture_output=True, text=True, timeout=timeout)
        if p.returncode != 0:
            raise SystemExit(f"geotrain {' '.join(args)} failed:\n{p.stdout[-1500:]}{p.stderr[-1500:]}")
        return p.stdout

    def status(self) -> dict:
        return json.loads(self.cli("status", self.id, "--json"))

    def wait(self, pred, timeout: float = 600):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            s = self.status()
            if pred(s):
                return s
            time.sleep(0.5)
        raise SystemExit(f"{self.id}: timed out")

    def store(self):
        from geotrain.store import RunStore

        return RunStore(self.status()["store"])

    def finish(self) -> dict:
        s = self.wait(lambda s: s["state"] != "running")
        store = self.store()
        committed = store.committed_rounds()
        return {"run": self.id, "state": s["state"], "rounds_done": s["rounds_done"],
                "no_gap": committed == list(range(self.rounds + 1)),
                "rounds_lost": self.rounds + 1 - len(set(committed)), "eval_loss": s["eval_loss"]}


def replace_one(sites: int, rounds: int, h: int) -> dict:
    run = Run(sites, rounds, h)
    s = run.wait(lambda s: s["rounds_done"] >= 3)
    store = run.store()
    hb = store.heartbeat("a") or {}
    published = sum(store.contribution_meta(r, "a")["inner_steps"]
                    for r in store.rounds_started() if "a" in store.contributions(r))
    victim = next(x for x in s["sites"] if x["name"] == "a")["pid"]
    killed_at = time.time()
    os.kill(victim, signal.SIGKILL)
    committed_at_kill = len(store.committed_rounds()) - 1
    out = run.finish()
    events = [e for e in store.events([]) if e["source"] == "controller"]
    lost = next(e for e in events if e["kind"] == "site-lost")
    rejoined = next(e for e in events if e["kind"] == "site-rejoined")
    back_at = lost["at"] + rejoined["seconds"]
    commits_while_away = _commits_between(store, killed_at, back_at)
    return dict(out, scenario="replace", detection_s=lost["at"] - killed_at,
                loss_to_first_step_s=back_at - killed_at,
                # What the killed site trained since its last contribution: at most one
                # round (H inner steps); the heartbeat (<= 1 s old) gives a lower bound.
                inner_steps_lost_at_most=h, inner_steps_lost_seen=max(0, (hb.get("step") or 0) - published),
                rounds_committed_while_away=commits_while_away, committed_at_kill=committed_at_kill)


def _commits_between(store, t0: float, t1: float) -> int:
    """Rounds whose decision was made while the lost site was away."""
    n = 0
    for r in store.rounds_started():
        m = store.members(r)
        if m and t0 <= m.get("decided_at", 0) <= t1:
            n += 1
    return n


def restart_all(sites: int, rounds: int, h: int) -> dict:
    from providers import local

    run = Run(sites, rounds, h)
    s = run.wait(lambda s: s["rounds_done"] >= 3)
    killed_at = time.time()
    os.kill(s["controller_pid"], signal.SIGKILL)
    for pid in local.processes(run.id):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    run.cli("resume", run.id, "--detach", "--json")
    store = run.store()
    names = [x["name"] for x in s["sites"]]

    def all_back(_s) -> bool:
        beats = [store.heartbeat(n) or {} for n in names]
        return all((b.get("first_step_at") or 0) > killed_at for b in beats)
    run.wait(all_back)
    back_at = max(store.heartbeat(n)["first_step_at"] for n in names)
    out = run.finish()
    return dict(out, scenario="restart", loss_to_first_step_s=back_at - killed_at)


def migrate(sites: int, rounds: int, h: int) -> dict:
    run = Run(sites, rounds, h)
    run.wait(lambda s: s["rounds_done"] >= 3)
    moved = json.loads(run.cli("migrate", run.id, "--site", "a", "--to", "local:west", "--json"))
    out = run.finish()
    return dict(out, scenario="migrate", join_s=moved["join_s"], migration_s=moved["seconds"],
                downtime_s=moved["downtime_s"], overlap_s=moved["overlap_s"])


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    r = {x["scenario"]: x for x in results["scenarios"]}
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.6))
    labels = ["replace the\nlost site", "restart\neverything", "migrate\n(downtime)"]
    colors = ["tab:green", "tab:gray", "tab:blue"]
    values = [r["replace"]["loss_to_first_step_s"], r["restart"]["loss_to_first_step_s"],
              r["migrate"]["downtime_s"]]
    ax1.bar(labels, values, color=colors)
    ax1.set_ylabel("s until the lost work trains again")
    lost = [r["replace"]["site_seconds_lost"], r["restart"]["site_seconds_lost"], 0.0]
    ax2.bar(labels, lost, color=colors)
    ax2.set_ylabel("site-seconds of training lost")
    for ax, vals in ((ax1, values), (ax2, lost)):
        for i, v in enumerate(vals):
            ax.text(i, v, f"{v:.1f}", ha="center", va="bottom")
    fig.suptitle(f"{results['sites']} local sites: detection {r['replace']['detection_s']:.2f} s, "
                 "0 rounds lost in every scenario")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sites", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=80)
    ap.add_argument("--inner-steps", type=int, default=10)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/out")
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    scenarios = []
    for fn in (replace_one, restart_all, migrate):
        r = fn(a.sites, a.rounds, a.inner_steps)
        scenarios.append(r)
        print(json.dumps(r), flush=True)
    rep, res = scenarios[0], scenarios[1]
    # While one site is replaced the others train on; a restart stops every site.
    rep["site_seconds_lost"] = rep["loss_to_first_step_s"]
    res["site_seconds_lost"] = res["loss_to_first_step_s"] * a.sites
    results = {"sites": a.sites, "rounds": a.rounds, "inner_steps": a.inner_steps,
               "scenarios": scenarios,
               "ratio_restart_over_replace": res["site_seconds_lost"] / rep["site_seconds_lost"],
               "machine": {"cpus": os.cpu_count()}}
    print(f"replace one site: detected in {rep['detection_s']:.2f} s, training again after "
          f"{rep['loss_to_first_step_s']:.1f} s, {rep['rounds_lost']} rounds lost, "
          f"<= {rep['inner_steps_lost_at_most']} inner steps lost, others committed "
          f"{rep['rounds_committed_while_away']} rounds meanwhile; restart-everything baseline: "
          f"{res['loss_to_first_step_s']:.1f} s for every site; site-seconds lost "
          f"{rep['site_seconds_lost']:.0f} vs {res['site_seconds_lost']:.0f} "
          f"(x{results['ratio_restart_over_replace']:.2f}); "
          f"migration downtime {scenarios[2]['downtime_s']:.1f} s")
    (a.out / "recovery.json").write_text(json.dumps(results, indent=2))
    plot(results, a.out / "recovery.png")
    print(f"wrote {a.out / 'recovery.json'} and {a.out / 'recovery.png'}")


if __name__ == "__main__":
    main()
