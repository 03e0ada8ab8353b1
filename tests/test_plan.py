"""`geotrain plan`: candidates priced from the catalog, the run's $/h, hours, total and
egress — checked against figures worked out by hand from the shipped catalog."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from geotrain import catalog
from geotrain.plan import BYTES_PER_PARAM, PlanError, bytes_per_param, make_plan, param_count
from geotrain.recipe import loads
from tests.helpers import geotrain_cmd, geotrain_home  # noqa: F401

pytestmark = pytest.mark.timeout(60)
ROOT = Path(__file__).resolve().parent.parent

TWO_CLOUDS = """\
name: two
model: {preset: tiny}
train: {rounds: 10, hours: 2}
store: {url: 's3://bucket/runs'}
sites:
  - {name: a, provider: aws, region: us-east-1, instance_type: g5.xlarge}
  - {name: b, provider: gcp, region: us-central1, instance_type: g2-standard-4}
"""


def test_param_count_follows_the_formula():
    r = loads("name: x\nmodel: {preset: tiny}\nsites: [{name: a}]\n")
    assert param_count(r) == 12 * 4 * 128 ** 2 + 256 * 128 == 819_200
    assert param_count(loads("name: x\nmodel: {preset: large}\nsites: [{name: a}]\n")) == 12 * 24 * 1024 ** 2 + 256 * 1024


def test_costs_and_egress_by_hand(geotrain_home):
    p = make_plan(loads(TWO_CLOUDS))
    assert [c.usd_per_hour for s in p.sites for c in s.candidates] == [1.006, 0.7068]
    assert p.usd_per_hour == pytest.approx(1.7128)
    assert (p.hours, p.hours_from) == (2, "train.hours")
    payload = 819_200 * 4  # codec none
    # Per round: each of 2 sites uploads 1 payload and downloads the other's.
    assert p.egress_bytes == 10 * 2 * 2 * payload
    # a (aws) <-> s3 store: aws inter-region both ways; b (gcp): gcp internet out, aws internet in.
    per_gb = 0.02 + 0.02 + 0.12 + 0.09
    assert p.egress_usd == pytest.approx(round(10 * payload / 1e9 * per_gb, 4))
    assert p.usd_total == pytest.approx(round(1.7128 * 2 + p.egress_usd, 4))
    assert p.catalog == {"aws": catalog.load("aws").retrieved, "gcp": catalog.load("gcp").retrieved}


def test_compression_table_scales_egress(geotrain_home):
    base = make_plan(loads(TWO_CLOUDS))
    assert BYTES_PER_PARAM == {"none": 4.0, "int8": 1.0, "int4": 0.5}
    # Three sites: each downloads two others' payloads.
    three = make_plan(loads(TWO_CLOUDS + "  - {name: c, provider: aws, region: us-west-2, instance_type: g5.xlarge}\n"))
    assert three.egress_bytes == base.egress_bytes / 4 * 9


@pytest.mark.parametrize("chunk,fraction,bits", [(4096, 0.01, 4), (256, 0.01, 2), (256, 0.05, 8),
                                                  (1024, 0.02, 4)])
def test_topk_bytes_per_param_is_what_the_codec_sends(chunk, fraction, bits):
    """The plan's egress estimate uses the codec's own size: a tensor a whole number of
    chunks long, encoded, costs bytes_per_param x its size (plus the fixed header)."""
    import torch

    from geotrain.sync import compression

    sync = loads(TWO_CLOUDS + f"sync: {{compression: topk, topk_chunk: {chunk}, "
                 f"topk_fraction: {fraction}, value_bits: {bits}}}\n").sync
    n = chunk * 64
    def size(numel: int) -> int:
        codec = compression.make_codec("topk", topk_fraction=fraction, chunk=chunk, value_bits=bits)
        return len(codec.encode({"w": torch.randn(numel)}))

    small, large = size(chunk * 8), size(n + chunk * 8)
    # Within a few bytes: the header's shape gains digits, 4- and 2-bit codes pack by the byte.
    assert (large - small) / n == pytest.approx(bytes_per_param(sync), abs=8 / n)


def test_nodes_multiply_and_local_is_free(geotrain_home):
    r = loads(TWO_CLOUDS.replace("instance_type: g5.xlarge}", "instance_type: g5.xlarge, nodes: 3}")
              + "  - {name: c}\n")
    p = make_plan(r)
    assert p.sites[0].candidates[0].usd_per_hour == pytest.approx(3 * 1.006)
    assert p.sites[2].candidates[0].usd_per_hour == 0.0 and p.sites[2].candidates[0].available


def test_gpu_requirement_and_open_region_pick_the_cheapest(geotrain_home):
    r = loads("""\
name: x
sites:
  - {name: a, provider: gcp, gpu: "L4:1"}
  - {name: b, provider: gcp, region: europe-west4, gpu: "L4:1"}
  - {name: c, provider: aws, instance_type: p3.2xlarge, spot: true}
  - name: d
    provider: azure
    gpu: "H100:8"
    candidates: [{provider: aws, region: us-east-2}]
""")
    a, b, c, d = make_plan(r).sites
    assert (a.chosen().instance_type, a.chosen().region, a.chosen().usd_per_hour) == ("g2-standard-4", "us-central1", 0.7068)
    assert (b.chosen().instance_type, b.chosen().region) == ("g2-standard-4", "europe-west4")
    assert (c.chosen().region, c.chosen().usd_per_hour) == ("us-east-1", 0.92)
    assert d.chosen().instance_type == "Standard_ND96isr_H100_v5" and d.chosen().gpus == 8
    assert d.candidates[1].instance_type == "p5.48xlarge" and d.candidates[1].region == "us-east-2"


def test_unavailable_candidates_fall_through_then_fail_naming_the_site(geotrain_home):
    text = """\
name: x
sites:
  - name: big
    provider: aws
    region: eu-west-1
    instance_type: p5.48xlarge
    candidates: [{provider: aws, region: us-east-2, instance_type: p5.48xlarge}]
"""
    [site] = make_plan(loads(text)).sites
    first, second = site.candidates
    assert not first.available and first.usd_per_hour is None
    assert first.reason == "p5.48xlarge not offered on-demand in eu-west-1"
    assert site.chosen() is second and second.usd_per_hour == 55.04
    bad = text.replace("region: us-east-2, instance_type: p5.48xlarge", "region: us-east-2, instance_type: p9.huge")
    with pytest.raises(PlanError, match=r"site 'big': no candidate is available .*p9\.huge is not in the aws catalog"):
        make_plan(loads(bad))


def test_hours_derived_from_the_throughput_table(geotrain_home):
    r = loads("name: x\ntrain: {rounds: 20, inner_steps: 50, batch_size: 16, seq_len: 128}\n"
              "sites: [{name: a, provider: aws, region: us-east-1, instance_type: g5.xlarge}]\n")
    p = make_plan(r)
    tokens_per_s = catalog.GPU_TFLOPS["A10G"] * 1e12 * catalog.DEFAULT_MFU / (6 * 819_200)
    assert p.hours_from == "derived"
    assert p.hours == pytest.approx(20 * 50 * 16 * 128 / tokens_per_s / 3600, rel=1e-4)


def plan_cli(*args: str, home: Path) -> subprocess.CompletedProcess:
    return subprocess.run(geotrain_cmd("plan", *args), capture_output=True, text=True, timeout=50,
                          env=dict(os.environ, GEOTRAIN_HOME=str(home), COLUMNS="200"))


@pytest.mark.parametrize("recipe", ["aws.yaml", "multicloud.yaml", "local.yaml", "twin.yaml"])
def test_plan_json_shape_for_the_shipped_recipes(recipe, geotrain_home):
    p = plan_cli(str(ROOT / "recipes" / recipe), "--json", home=geotrain_home)
    assert p.returncode == 0, p.stderr
    d = json.loads(p.stdout)
    assert {"sites", "usd_per_hour", "hours", "usd_total", "egress", "catalog"} <= set(d)
    assert set(d["egress"]) == {"bytes", "usd"} and d["hours"] > 0
    for s in d["sites"]:
        assert s["name"] and s["candidates"]
        for c in s["candidates"]:
            assert {"provider", "region", "instance_type", "gpus", "spot", "usd_per_hour", "available"} <= set(c)
    if recipe != "local.yaml":
        assert all(len(s["candidates"]) >= 2 for s in d["sites"])
        assert d["usd_per_hour"] > 0 and d["egress"]["usd"] > 0 and d["catalog"]


def test_plan_text_and_error(tmp_path: Path, geotrain_home):
    p = plan_cli(str(ROOT / "recipes/aws.yaml"), home=geotrain_home)
    assert p.returncode == 0 and "g5.12xlarge" in p.stdout and "run: $" in p.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nsites: [{name: far, provider: gcp, region: mars-1, instance_type: a2-highgpu-8g}]\n")
    p = plan_cli(str(bad), home=geotrain_home)
    assert p.returncode == 1 and "Traceback" not in p.stderr
    assert "site 'far': no candidate is available" in p.stderr and "a2-highgpu-8g not offered" in p.stderr
    p = plan_cli(str(bad), "--json", home=geotrain_home)
    assert p.returncode == 1 and json.loads(p.stdout)["error"]["error"] == "PlanError"
