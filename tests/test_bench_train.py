"""The training-speed benchmark (benchmarks/train.py) end to end on this CPU,
at its smallest: the JSON it writes, FLOPs per token by the formula it states,
and figures that are real measurements (positive, finite, shares in [0, 1)).

    python -m pytest tests/test_bench_train.py -q
"""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def test_cpu_rows_write_the_documented_json(tmp_path):
    out = tmp_path / "train.json"
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks/train.py"), "--out", str(out),
                        "--presets", "tiny", "--precisions", "fp32,bf16", "--steps", "3",
                        "--warmup", "1", "--rounds", "2", "--inner-steps", "2"],
                       capture_output=True, text=True, timeout=280)
    assert p.returncode == 0, p.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["device"] == "cpu" and result["baseline"]["fp32_matmul_tflops"] > 0
    rows = {r["precision"]: r for r in result["rows"]}
    assert set(rows) == {"fp32", "bf16"}
    for r in rows.values():
        assert r["preset"] == "tiny" and "skipped" not in r
        # tiny: 4 layers, d_model 128, seq_len 128; position embeddings (128 x 128) are a lookup.
        n = r["params"] - 128 * 128
        assert r["flops_per_token"] == 6 * n + 12 * 4 * 128 * 128
        assert r["tokens_per_s"] > 0 and r["peak_memory_bytes"] > 0
        assert r["mfu"] == pytest.approx(r["tokens_per_s"] * r["flops_per_token"] / 1e12
                                         / r["peak_tflops"])
        assert r["peak_source"].startswith("measured")
        assert 0 <= r["outside_share"] < 1 and r["rounds"] == 2 and r["round_wall_s"] > 0
        assert math.isfinite(r["loss"]) and 4.0 < r["loss"] < math.log(256) + 0.5
    # Same model, data and steps: bf16 autocast moves the loss only a little.
    assert rows["bf16"]["loss"] == pytest.approx(rows["fp32"]["loss"], rel=0.02)


def test_compile_hands_each_rows_model_to_torch_compile(monkeypatch):
    """`--compile` reaches each row's process and its forward goes through
    torch.compile; the row says so. (A spy stands in for the compiler here:
    training through inductor itself is tests/test_precision.py's compile test.)"""
    import argparse

    import torch

    from benchmarks import train as B

    seen = []
    monkeypatch.setattr(torch, "compile", lambda model, *a, **k: seen.append(model) or model)
    args = argparse.Namespace(out="unused.json", baseline=1.0, steps=2, warmup=1, rounds=1,
                              inner_steps=2, batch_size=4, seq_len=32, compile=True)
    row = B.bench_row("tiny", "fp32", torch.device("cpu"), args, 1.0)
    assert row["compile"] is True and len(seen) == 1 and math.isfinite(row["loss"])
    commands = []
    monkeypatch.setattr(B.subprocess, "run", lambda cmd, **kw: commands.append(cmd) or
                        subprocess.CompletedProcess(cmd, 0, stdout=json.dumps(row) + "\n"))
    assert B._row_in_subprocess("tiny", "fp32", args) == row
    assert "--compile" in commands[0]
