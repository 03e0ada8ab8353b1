"""The sync benchmark (benchmarks/sync.py) end to end in its tiny setup: 2 sites,
20 steps, DDP and DiLoCo with two codecs, no thin links, no torchft.

Checks the JSON shape the issue fixes, that DDP's bytes are the ring all-reduce's,
that DiLoCo's are what the codec payloads weigh (int8 about a quarter of fp32),
that every DiLoCo site ended bit-identical, and that losses are real numbers
that went down from ln 256.

    python -m pytest tests/test_bench_sync.py -q
"""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]


def test_tiny_run_writes_the_documented_json(tmp_path):
    out = tmp_path / "sync.json"
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks/sync.py"), "--preset", "tiny",
                        "--sites", "2", "--codecs", "none,int8:olr=1:om=0:se=2", "--H", "5", "--mbit", "",
                        "--no-plots", "--out", str(out)],
                       capture_output=True, text=True, timeout=220)
    assert p.returncode == 0, p.stderr[-3000:]
    results = json.loads(out.read_text())
    assert set(results) >= {"arms", "utilization"}
    assert results["utilization"] == [] and results["utilization_skipped"]
    arms = {a["name"]: a for a in results["arms"]}
    assert set(arms) == {"ddp", "diloco-none-H5", "diloco-int8,olr=1,om=0,se=2-H5"}
    for a in arms.values():
        assert {"name", "sites", "bytes_per_site", "eval_loss", "tokens", "wall_s"} <= set(a)
        assert a["sites"] == 2 and a["tokens"] == 20 * 4 * 32 * 2
        assert math.isfinite(a["eval_loss"]) and 1.0 < a["eval_loss"] < math.log(256)
        assert a["wall_s"] > 0
    ddp, none, int8 = arms["ddp"], arms["diloco-none-H5"], arms["diloco-int8,olr=1,om=0,se=2-H5"]
    params = ddp["params"]
    # ring all-reduce, 2 ranks: each sends and receives 2(N-1)/N * 4 B * params per step
    assert ddp["bytes_per_site"] == 20 * 2 * int(2 * 1 / 2 * 4 * params)
    # 4 rounds; each site uploads its fp32 delta and downloads the other's
    assert 8 * 4 * params < none["payload_bytes_per_site"] < 8 * 4 * params * 1.1
    assert 0.2 < int8["payload_bytes_per_site"] / none["payload_bytes_per_site"] < 0.35
    # bytes_per_site counts the global-state commits too (issue 13: bytes counted honestly)
    for arm in (none, int8):
        assert arm["bytes_per_site"] == arm["payload_bytes_per_site"] + arm["commit_bytes_per_site"]
    assert ddp["bytes_per_site"] == ddp["payload_bytes_per_site"] and results["schema"] == 2
    assert none["bytes_ratio_vs_ddp"] == pytest.approx(ddp["bytes_per_site"] / none["bytes_per_site"])
    assert none["payload_ratio_vs_ddp"] == pytest.approx(ddp["bytes_per_site"]
                                                         / none["payload_bytes_per_site"])
    assert none["bit_identical_sites"] and int8["bit_identical_sites"]
    assert ddp["loss_gap_vs_ddp"] == 0
    # Global commits: `none` (momentum 0.9) writes model + momentum every round (4 x 8 B/param);
    # the int8 arm (momentum 0, state every 2nd round) the model alone in rounds 2 and 4.
    assert 32 * params / 2 < none["commit_bytes_per_site"] < 32 * params / 2 * 1.05
    assert 8 * params / 2 < int8["commit_bytes_per_site"] < 8 * params / 2 * 1.05
    assert results["torchft"]["status"] == "skipped"


def test_an_earlier_result_is_upgraded_to_count_commits_in_bytes_per_site():
    sys.path.insert(0, str(ROOT))
    from benchmarks.sync import upgrade

    old = {"arms": [{"name": "ddp", "bytes_per_site": 1000.0, "bytes_sent_per_site": 500.0,
                     "eval_loss": 1.0},
                    {"name": "diloco-x", "bytes_per_site": 10.0, "bytes_sent_per_site": 4.0,
                     "commit_bytes_per_site": 2.5, "eval_loss": 1.1, "bytes_ratio_vs_ddp": 100.0}]}
    new = upgrade(json.loads(json.dumps(old)))
    ddp, arm = new["arms"]
    assert new["schema"] == 2 and ddp["bytes_per_site"] == 1000.0
    assert (arm["payload_bytes_per_site"], arm["bytes_per_site"]) == (10.0, 12.5)
    assert arm["bytes_ratio_vs_ddp"] == 80.0 and arm["payload_ratio_vs_ddp"] == 100.0
    assert upgrade(new) == new  # once only


def test_arm_settings_parse_and_bad_ones_say_what_is_valid():
    sys.path.insert(0, str(ROOT))
    from benchmarks.sync import parse_arm

    assert parse_arm("topk@0.03:olr=2:om=0:ed=0.95:se=10") == (
        "topk", "0.03:olr=2:om=0:ed=0.95:se=10",
        {"topk_fraction": 0.03, "outer_lr": 2.0, "outer_momentum": 0.0, "error_decay": 0.95,
         "state_every": 10})
    assert parse_arm("int8") == ("int8", "", {})
    with pytest.raises(SystemExit, match="valid: olr="):
        parse_arm("int8:lr=1")
