"""Training-speed benchmark: tokens/s, model FLOPs utilisation, peak memory and
the share of a DiLoCo round spent outside inner steps, per preset and precision.

    python benchmarks/train.py --out PATH [--presets tiny,small] [--precisions fp32,bf16]
                               [--steps 20] [--rounds 3] [--inner-steps 10] [--compile]

It runs on the device present: CUDA when there is one (every preset that fits,
bf16/fp16/fp32), else the CPU (`tiny` and `small`, a few minutes). Each row
trains the built-in GPT through the trainer's own step (`trainer.inner_step`),
so what it measures is what a site runs:

- **tokens/s** over `--steps` timed steps after warm-up, synchronising the
  device only at both ends of the timed span;
- **MFU**: tokens/s × FLOPs per token ÷ the device's peak. FLOPs per token is
  6·N + 12·L·d·T for a forward and backward pass (N: parameters that do matmul
  work, the tied output head counted, position embeddings not; L layers, d
  width, T sequence length). The peak is stated in the output: a GPU's is its
  datasheet's dense figure for the precision (`PEAK_TFLOPS`); a CPU has no
  such figure, so its peak is a square fp32 matmul measured in the same run
  (the baseline), and its MFU is a ratio to that;
- **peak memory**: `torch.cuda.max_memory_allocated` on a GPU; on the CPU the
  peak RSS of the process (each row runs in a process of its own, so this is
  the row's: the model, optimizer, activations and DiLoCo's copies, and
  Python and torch themselves);
- **outside share**: one site's DiLoCo through a `file://` run store for
  `--rounds` rounds of `--inner-steps` steps; the share of the wall time not
  spent in inner steps (copying the model out, computing and encoding the
  pseudo-gradient, the store, the outer step, loading the result).

With `--compile` each row's forward runs through `torch.compile` (as
`train.compile: true` in a recipe); compiling happens in the untimed warm-up.

Writes JSON (`{"device", "device_name", "date", "torch", "baseline", "rows": [...]}`),
again after every row (what a run cut short measured is kept), and prints a table.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from geotrain.recipe import TrainSpec
from geotrain.store import RunStore
from geotrain.sync.diloco import DiLoCo, RoundExchange, encode, model_params, params_hash
from geotrain.train import precision as P
from geotrain.train.model import build, build_optimizer, config_for
from geotrain.train.trainer import inner_step

# Dense tensor-core TFLOP/s per GPU from the vendors' datasheets (SXM parts, no
# sparsity); fp32 is the plain (non-TF32) figure. Matched by substring of the
# device name, first match wins.
PEAK_TFLOPS = [
    ("H200", {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0}),
    ("H100", {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0}),
    ("A100", {"bf16": 312.0, "fp16": 312.0, "fp32": 19.5}),
    ("L40S", {"bf16": 362.0, "fp16": 362.0, "fp32": 91.6}),
    ("A10G", {"bf16": 70.0, "fp16": 70.0, "fp32": 31.2}),
    ("L4", {"bf16": 121.0, "fp16": 121.0, "fp32": 30.3}),
]
GPU_PRESETS = ["tiny", "small", "medium", "large", "xl"]
CPU_PRESETS = ["tiny", "small"]


def flops_per_token(model: torch.nn.Module, cfg, seq_len: int) -> int:
    """6·N + 12·L·d·T: N counts every parameter that does matmul work per token
    (the tied head's d×V counted once as the head; position embeddings are a
    lookup and not counted)."""
    n = sum(p.numel() for name, p in model.named_parameters() if not name.startswith("pos."))
    return 6 * n + 12 * cfg.n_layer * cfg.d_model * seq_len


def device_peak(device: torch.device, precision: str, measured_tflops: float) -> tuple[float, str]:
    """(peak TFLOP/s, where that figure comes from) for this device and precision."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, table in PEAK_TFLOPS:
            if key in name:
                return table[precision], f"datasheet {key} dense {precision}"
        return measured_tflops, "no datasheet figure for this GPU: measured matmul"
    return measured_tflops, "measured fp32 matmul on this CPU (same run)"


def measure_matmul_tflops(device: torch.device, dtype: torch.dtype, n: int, repeat: int = 5) -> float:
    """The best of `repeat` square matmuls of size n, in TFLOP/s: the run's baseline."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(repeat + 1):  # the first is warm-up
        _sync(device)
        t0 = time.perf_counter()
        a @ b
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best / 1e12


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _batches(gen: torch.Generator, batch: int, seq_len: int, device: torch.device):
    x = torch.randint(0, 256, (batch, seq_len + 1), generator=gen)
    x = x.pin_memory() if device.type == "cuda" else x
    x = x.to(device, non_blocking=True)
    return x[:, :-1], x[:, 1:]


def bench_row(preset: str, precision: str, device: torch.device, args, peak_measured: float) -> dict:
    spec = TrainSpec(batch_size=args.batch_size, seq_len=args.seq_len, warmup_steps=0,
                     precision=precision)
    cfg = config_for(preset, spec.seq_len)
    model = build(cfg, seed=0).to(device)
    opt = build_optimizer(model, spec)
    scaler = P.grad_scaler(precision, device)
    forward = torch.compile(model) if args.compile else model

    def step(x, y) -> torch.Tensor:
        return inner_step(model, forward, opt, scaler, precision, x, y, spec.grad_clip)

    gen = torch.Generator().manual_seed(0)
    batches = [_batches(gen, spec.batch_size, spec.seq_len, device) for _ in range(4)]
    for i in range(args.warmup):
        step(*batches[i % len(batches)])
    _sync(device)
    t0 = time.perf_counter()
    total = torch.zeros((), device=device)
    for i in range(args.steps):
        total += step(*batches[i % len(batches)]).float()
    _sync(device)
    elapsed = time.perf_counter() - t0
    loss = total.item() / args.steps  # the one host read, after the timed span
    tokens_per_s = args.steps * spec.batch_size * spec.seq_len / elapsed
    fpt = flops_per_token(model, cfg, spec.seq_len)
    peak, peak_source = device_peak(device, precision, peak_measured)
    outside = round_outside_share(model, opt, step, batches, args)
    return {"preset": preset, "precision": precision, "compile": args.compile,
            "params": sum(p.numel() for p in model.parameters()),
            "batch_size": spec.batch_size, "seq_len": spec.seq_len, "steps": args.steps,
            "tokens_per_s": tokens_per_s, "flops_per_token": fpt,
            "achieved_tflops": tokens_per_s * fpt / 1e12, "peak_tflops": peak,
            "peak_source": peak_source, "mfu": tokens_per_s * fpt / 1e12 / peak,
            "peak_memory_bytes": _peak_memory(device), "loss": loss, **outside}


def round_outside_share(model, opt, step, batches, args) -> dict:
    """One site's DiLoCo through a file:// store: wall time of `--rounds` rounds
    against the time its inner steps took (each step timed with the device synced)."""
    device = next(model.parameters()).device
    with tempfile.TemporaryDirectory(prefix="gt-bench-train-") as tmp:
        store = RunStore("file://" + tmp)
        params = model_params(model)
        store.commit_global(0, {"model.safetensors": encode(params)}, {"hash": params_hash(params)})
        inner_s = 0.0
        with DiLoCo(model, opt, RoundExchange(store, "a"), inner_steps=args.inner_steps,
                    outer_lr=1.0, outer_momentum=0.0, liveness=False) as diloco:
            _sync(device)
            t_start = time.perf_counter()
            for i in range(args.rounds * args.inner_steps):
                t0 = time.perf_counter()
                step(*batches[i % len(batches)])
                _sync(device)
                inner_s += time.perf_counter() - t0
                diloco.step(tokens=batches[0][0].numel())
            _sync(device)
            wall = time.perf_counter() - t_start
    return {"rounds": args.rounds, "inner_steps": args.inner_steps,
            "round_wall_s": wall / args.rounds, "outside_share": max(0.0, 1 - inner_s / wall)}


def _row_in_subprocess(preset: str, precision: str, args) -> dict:
    """One row in a fresh process, so its peak memory is its own."""
    cmd = [sys.executable, __file__, "--out", args.out, "--one",
           f"{preset}:{precision}:{args.baseline!r}", "--steps", str(args.steps),
           "--warmup", str(args.warmup), "--rounds", str(args.rounds),
           "--inner-steps", str(args.inner_steps), "--batch-size", str(args.batch_size),
           "--seq-len", str(args.seq_len)] + (["--compile"] if args.compile else [])
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["(no output)"]
        return {"preset": preset, "precision": precision, "skipped": f"failed: {tail[0]}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="where to write the JSON")
    ap.add_argument("--presets", help="comma-separated; default: every preset that fits the device")
    ap.add_argument("--precisions", help="comma-separated; default: bf16,fp16,fp32 on a GPU, "
                                         "fp32,bf16 on the CPU")
    ap.add_argument("--steps", type=int, default=20, help="timed steps per row")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    ap.add_argument("--rounds", type=int, default=3, help="DiLoCo rounds for the outside share")
    ap.add_argument("--inner-steps", type=int, default=10, help="inner steps per round there")
    ap.add_argument("--batch-size", type=int, default=None, help="default 16 on a GPU, 8 on the CPU")
    ap.add_argument("--seq-len", type=int, default=None, help="default 1024 on a GPU, 128 on the CPU")
    ap.add_argument("--compile", action="store_true", help="run each row's forward through "
                                                           "torch.compile (warm-up untimed)")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # PRESET:PRECISION:BASELINE, in a child
    args = ap.parse_args(argv)
    device = torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    gpu = device.type == "cuda"
    args.batch_size = args.batch_size or (16 if gpu else 8)
    args.seq_len = args.seq_len or (1024 if gpu else 128)
    presets = args.presets.split(",") if args.presets else (GPU_PRESETS if gpu else CPU_PRESETS)
    precisions = (args.precisions.split(",") if args.precisions
                  else (["bf16", "fp16", "fp32"] if gpu else ["fp32", "bf16"]))
    P.prepare_device(device)
    if args.one:  # a child: one row, as JSON on the last line of stdout
        preset, precision, peak = args.one.split(":")
        try:
            row = bench_row(preset, precision, device, args, float(peak))
        except torch.cuda.OutOfMemoryError:
            row = {"preset": preset, "precision": precision, "skipped": "out of memory"}
        print(json.dumps(row))
        return 0
    name = torch.cuda.get_device_name(device) if gpu else f"CPU ({torch.get_num_threads()} threads)"
    baseline = args.baseline = measure_matmul_tflops(device, torch.float32, 4096 if gpu else 1024)
    print(f"device: {name}; baseline fp32 matmul {baseline:.3f} TFLOP/s", flush=True)
    out = {"device": device.type, "device_name": name,
           "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
           "torch": torch.__version__, "command": " ".join(["python", *sys.argv]),
           "baseline": {"fp32_matmul_tflops": baseline}, "rows": []}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    for preset in presets:
        for precision in precisions:
            row = _row_in_subprocess(preset, precision, args)
            out["rows"].append(row)
            Path(args.out).write_text(json.dumps(out, indent=2))  # each row kept as it comes
            if "skipped" in row:
                print(f"{preset:>6} {precision:>4}  skipped: {row['skipped']}", flush=True)
                continue
            print(f"{preset:>6} {precision:>4}  {row['tokens_per_s']:>12,.0f} tok/s  "
                  f"MFU {row['mfu']:6.1%}  peak mem {row['peak_memory_bytes'] / 2**20:8.1f} MiB  "
                  f"outside {row['outside_share']:5.1%}", flush=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
