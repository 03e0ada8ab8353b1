"""Codec benchmark: bytes on the wire per parameter, and encode/decode time.

    python benchmarks/codecs.py [--values 10000000] [--repeat 5] [--out benchmarks/out]

For each codec at its default settings (plus top-k with 8-bit values) it
measures, on this machine's CPU:

- the exact payload size (`len(payload)`) for one 10 M-value tensor and for
  the parameters of the built-in GPT presets `tiny` and `small` (their small
  tensors, LayerNorm gains and biases, travel dense under top-k), as bytes
  per parameter and as fp32 ÷ codec;
- encode and decode wall time for the 10 M-value tensor (best of
  --repeat), with error feedback as the codec defaults, at the default torch
  thread count and on one thread.

The baseline measured in the same run is a bare memory pass: a clone of the
tensor's 40 MB of fp32 (`copy_ms`). Machines are shared; compare ratios to it.
Prints a table, writes JSON and (with the `bench` extra) a PNG under --out.
"""

from __future__ import annotations

import argparse
import json
import time
from datetime import datetime
from pathlib import Path

import torch

from geotrain.sync.compression import decode, make_codec, payload_info
from geotrain.train.model import GPT, config_for

ARMS = [("none", {}), ("int8", {}), ("int4", {}), ("topk", {}), ("topk", {"value_bits": 8})]


def _label(name: str, kw: dict) -> str:
    return name + ("-8bit" if kw.get("value_bits") == 8 else "")


def _best_ms(fn, repeat: int) -> float:
    """Best of `repeat`: on a shared machine the minimum is the least disturbed."""
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return min(times)


def time_arm(name: str, kw: dict, x: dict, repeat: int) -> dict:
    codec = make_codec(name, **kw)
    payload = codec.encode(x)                    # warm up; fills the residual
    enc = _best_ms(lambda: codec.encode(x), repeat)
    dec = _best_ms(lambda: decode(payload), repeat)
    return {"encode_ms": round(enc, 1), "decode_ms": round(dec, 1)}


def model_bytes(preset: str) -> dict:
    model = GPT(config_for(preset, context=256))
    params = {n: torch.randn_like(p.detach()) * 1e-3 for n, p in model.named_parameters()}
    n = sum(p.numel() for p in params.values())
    out = {"params": n, "tensors": len(params)}
    for name, kw in ARMS:
        p = make_codec(name, **kw).encode(params)
        info = payload_info(p)
        out[_label(name, kw)] = {"bytes": len(p), "header_bytes": info.header_bytes,
                                 "bytes_per_param": len(p) / n, "vs_fp32": 4 * n / len(p)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--values", type=int, default=10_000_000)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--out", default="benchmarks/out")
    args = ap.parse_args()
    torch.manual_seed(0)
    x = {"w": torch.randn(args.values) * 1e-3}
    threads = torch.get_num_threads()
    result = {"when": datetime.now().isoformat(timespec="seconds"), "values": args.values,
              "threads": threads, "copy_ms": round(_best_ms(lambda: x["w"].clone(), args.repeat), 1),
              "arms": {}, "models": {}}
    for name, kw in ARMS:
        p = make_codec(name, **kw).encode(x)
        arm = {"bytes": len(p), "bytes_per_param": len(p) / args.values,
               "vs_fp32": 4 * args.values / len(p), **time_arm(name, kw, x, args.repeat)}
        torch.set_num_threads(1)
        one = time_arm(name, kw, x, args.repeat)
        torch.set_num_threads(threads)
        arm.update({"encode_ms_1thread": one["encode_ms"], "decode_ms_1thread": one["decode_ms"]})
        result["arms"][_label(name, kw)] = arm
    for preset in ("tiny", "small"):
        result["models"][preset] = model_bytes(preset)

    print(f"{args.values:,} values, {threads} threads; a 40 MB clone takes {result['copy_ms']} ms")
    print(f"{'codec':<11}{'B/param':>9}{'fp32 ÷':>9}{'enc ms':>9}{'dec ms':>9}"
          f"{'enc 1t':>9}{'dec 1t':>9}")
    for label, a in result["arms"].items():
        print(f"{label:<11}{a['bytes_per_param']:>9.4f}{a['vs_fp32']:>9.1f}{a['encode_ms']:>9.0f}"
              f"{a['decode_ms']:>9.0f}{a['encode_ms_1thread']:>9.0f}{a['decode_ms_1thread']:>9.0f}")
    for preset, m in result["models"].items():
        cells = ", ".join(f"{k} {v['bytes_per_param']:.4f} B/param (×{v['vs_fp32']:.0f}, "
                          f"header {v['header_bytes']} B)"
                          for k, v in m.items() if isinstance(v, dict))
        print(f"GPT {preset} ({m['params']:,} params, {m['tensors']} tensors): {cells}")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "codecs.json").write_text(json.dumps(result, indent=2))
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(no matplotlib: install the bench extra for the plot)")
        return
    labels = list(result["arms"])
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.6))
    a1.bar(labels, [result["arms"][k]["bytes_per_param"] for k in labels])
    a1.set_yscale("log")
    a1.set_ylabel("bytes per parameter (log)")
    a1.set_title("wire size")
    w = 0.38
    pos = range(len(labels))
    a2.bar([i - w / 2 for i in pos], [result["arms"][k]["encode_ms"] for k in labels], w, label="encode")
    a2.bar([i + w / 2 for i in pos], [result["arms"][k]["decode_ms"] for k in labels], w, label="decode")
    a2.axhline(result["copy_ms"], color="grey", ls="--", label="40 MB clone")
    a2.set_xticks(list(pos), labels)
    a2.set_ylabel(f"ms for {args.values / 1e6:g} M values")
    a2.legend()
    a2.set_title("time")
    fig.tight_layout()
    fig.savefig(out / "codecs.png", dpi=110)
    print(f"wrote {out / 'codecs.json'} and {out / 'codecs.png'}")


if __name__ == "__main__":
    main()
