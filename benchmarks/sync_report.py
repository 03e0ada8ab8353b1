"""Figures of the sync benchmark (benchmarks/sync.py): printed tables and PNG plots
(loss vs tokens, loss vs bytes, utilisation vs bandwidth)."""

from __future__ import annotations

from pathlib import Path


def print_arms(arms: list[dict]) -> None:
    print(f"{'arm':<22} {'eval loss':>9} {'vs ddp':>8} {'bytes/site':>14} {'ddp ÷ arm':>10} "
          f"{'(payload)':>10} {'(sent only)':>11} {'wall s':>7} {'of it commits':>14}")
    for a in arms:
        print(f"{a['name']:<22} {a['eval_loss']:>9.4f} {a['loss_gap_vs_ddp']:>+8.2%} "
              f"{a['bytes_per_site']:>14,.0f} {a['bytes_ratio_vs_ddp']:>10,.1f} "
              f"{a.get('payload_ratio_vs_ddp', a['bytes_ratio_vs_ddp']):>10,.1f} "
              f"{a['sent_ratio_vs_ddp']:>11,.1f} {a['wall_s']:>7.0f} "
              f"{a.get('commit_bytes_per_site', 0):>14,.0f}", flush=True)


def print_util(row: dict) -> None:
    link = f"{row['mbit']:>6g} Mbit/s" if row["mbit"] else "  no link  "
    wire = f"{row['wire_bytes_per_site']:,.0f}" if row["wire_bytes_per_site"] else "-"
    print(f"  {link}  {row['arm']:<26} utilisation {row['utilization']:6.1%} "
          f"(min {row['utilization_min']:.1%}; {row['utilization_with_drain']:.1%} with the last "
          f"merge), {wire} B/site on the wire, "
          f"{row['wall_s']:.0f} s", flush=True)


def plot(results: dict, out_dir: Path, stem: str = "sync") -> list[Path]:
    """Write the three PNGs next to the JSON; returns their paths (none without matplotlib)."""
    try:
        import matplotlib
    except ImportError:
        print("plots skipped: matplotlib is not installed (pip install -e '.[bench]')")
        return []
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    arms = [a for a in results["arms"] if a.get("curve")]
    for x_key, x_label, name, log in (("tokens", "tokens (all sites)", "loss_tokens", False),
                                      ("bytes", "bytes sent + received per site", "loss_bytes", True)):
        fig, ax = plt.subplots(figsize=(6.4, 4))
        for a in arms:
            pts = [(p[x_key], p["eval_loss"]) for p in a["curve"] if p[x_key] > 0 or not log]
            if pts:
                ax.plot(*zip(*pts), marker="o", ms=3, label=a["name"],
                        lw=2.5 if a["name"] == "ddp" else 1.2)
        if log:
            ax.set_xscale("log")
        ax.set_xlabel(x_label)
        ax.set_ylabel("held-out loss (nats/byte)")
        ax.set_title(f"{arms[0]['sites'] if arms else '?'} sites, {results['preset']} setup")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        paths.append(out_dir / f"{stem}_{name}.png")
        fig.savefig(paths[-1], dpi=120)
        plt.close(fig)
    if results["utilization"]:
        fig, ax = plt.subplots(figsize=(6.4, 4))
        for arm in sorted({r["arm"] for r in results["utilization"]}):
            rows = sorted((r for r in results["utilization"] if r["arm"] == arm), key=lambda r: r["mbit"])
            ax.plot([r["mbit"] for r in rows], [100 * r["utilization"] for r in rows], marker="o", label=arm)
        ax.axhline(97, ls="--", c="grey", lw=0.8, label="goal 97 %")
        ax.set_xscale("log")
        ax.set_xlabel("link rate per site (Mbit/s)")
        ax.set_ylabel("compute utilisation (%)")
        ax.set_ylim(0, 105)
        s = results["utilization_setup"]
        ax.set_title(f"3 sites, RTT {s['rtt_ms']:g} ms (modelled)")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        paths.append(out_dir / f"{stem}_util.png")
        fig.savefig(paths[-1], dpi=120)
        plt.close(fig)
    for p in paths:
        print(f"wrote {p}")
    return paths
