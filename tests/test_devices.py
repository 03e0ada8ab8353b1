"""GPU placement and the site's process group (geotrain/site/devices.py): `workers: auto`
and an explicit count against a node's GPUs (at the agent, in the plan, at launch), the
backend choice, and a real site Ray that declares GPUs on this CPU machine — Ray takes
`num_gpus` as a logical resource — so each TrainWorker gets its own GPU id from Ray,
reports that torch sees no CUDA, and the site's group forms over gloo."""

from __future__ import annotations

import json
import shutil
import tempfile

import pytest
import torch

from geotrain import catalog
from geotrain.placement import launch_site
from geotrain.plan import make_plan
from geotrain.recipe import SiteSpec, loads
from geotrain.site import devices
from geotrain.site.devices import WorkersError, choose_backend, resolve_workers
from geotrain.state import StateDB
from tests.helpers import geotrain_home  # noqa: F401

pytestmark = pytest.mark.timeout(60)


def recipe_with(site: str):
    return loads(f"name: x\nstore: {{url: 's3://bucket/runs'}}\nsites:\n  - {site}\n")


def test_auto_is_one_worker_per_gpu_and_one_without_gpus():
    assert resolve_workers("auto", 8) == 8
    assert resolve_workers("auto", 0) == 1
    assert resolve_workers(3, 8) == 3
    assert resolve_workers(4, 0) == 4  # a CPU-only node runs what it is asked, as before


def test_more_workers_than_gpus_is_an_error_naming_where():
    with pytest.raises(WorkersError) as e:
        resolve_workers(4, 2, "site 'a': this node")
    assert str(e.value).startswith("site 'a': this node: workers is 4 but it has 2 GPU(s)")
    assert "\n" not in str(e.value)


def test_recipe_default_is_auto_and_bad_values_get_one_precise_message():
    assert SiteSpec(name="a").workers == "auto"
    assert SiteSpec(name="a", workers=5).most_workers() == 5
    assert SiteSpec(name="a").most_workers() == devices.AUTO_WORKERS_BOUND
    with pytest.raises(ValueError, match=r"expected 'auto' \(one worker per GPU\) or a number "
                                         r"from 1 to 64 \(got 'all'\)"):
        SiteSpec(name="a", workers="all")
    with pytest.raises(ValueError, match=r"must be >= 1 \(got 0\)"):
        SiteSpec(name="a", workers=0)


def test_auto_bound_covers_every_catalog_type():
    # The bound on an auto site's tokens per round must allow any node the catalog offers.
    most = max(it.gpus for p in catalog.CLOUDS
               for it in catalog.parse(json.loads((catalog.SHIPPED / f"{p}.json").read_text()))
               .instances.values())
    assert most <= devices.AUTO_WORKERS_BOUND


def rank(i: int, device: str, gpu_ids=(), cuda=False, nccl=True) -> dict:
    return {"rank": i, "device": device, "gpu_ids": list(gpu_ids), "cuda": cuda, "nccl": nccl}


def test_nccl_only_when_every_rank_has_cuda_and_nccl():
    assert choose_backend([rank(0, "cuda:0", "0", True), rank(1, "cuda:0", "1", True)])[0] == "nccl"
    backend, why = choose_backend([rank(0, "cuda:0", "0", True), rank(1, "cpu")])
    assert backend == "gloo" and why.startswith("rank(s) 1 of 2 have no usable CUDA device")
    backend, why = choose_backend([rank(0, "cuda:0", "0", True, nccl=False)])
    assert backend == "gloo" and "no NCCL" in why


def test_plan_resolves_auto_from_the_catalog_and_keeps_it_for_local(geotrain_home):
    recipe = loads("name: x\nstore: {url: 's3://bucket/runs'}\nsites:\n"
                   "  - {name: a, provider: aws, region: us-east-1, instance_type: g5.12xlarge}\n"
                   "  - {name: b, provider: aws, region: us-east-1, instance_type: g5.12xlarge, "
                   "workers: 2}\n"
                   "  - {name: c}\n")
    plan = make_plan(recipe, geotrain_home)
    assert [s.workers for s in plan.sites] == [4, 2, "auto"]  # g5.12xlarge: 4 x A10G
    assert [s["workers"] for s in plan.to_dict()["sites"]] == [4, 2, "auto"]


def test_plan_refuses_more_workers_than_a_candidates_gpus(geotrain_home):
    recipe = recipe_with("{name: west, provider: aws, region: us-west-2, instance_type: "
                         "g5.12xlarge, workers: 4, candidates: [{provider: aws, region: "
                         "us-west-2, instance_type: g6.xlarge}]}")
    with pytest.raises(WorkersError, match=r"^site 'west': instance type g6.xlarge: workers is 4 "
                                           r"but it has 1 GPU\(s\)"):
        make_plan(recipe, geotrain_home)


def test_launch_refuses_before_asking_the_provider(geotrain_home):
    recipe = recipe_with("{name: a, provider: aws, region: us-east-1, instance_type: g6.xlarge, "
                         "workers: 2}")
    db = StateDB(geotrain_home)
    db.add_run("run-1", "x", "r.yaml", recipe.to_dict(), "s3://bucket/runs/run-1", 1,
               [{"name": "a", "provider": "aws", "region": "us-east-1"}])
    with pytest.raises(WorkersError, match="workers is 2 but it has 1 GPU"):
        launch_site(db, "run-1", recipe.sites[0], store_url="s3://bucket/runs/run-1",
                    home=geotrain_home)
    assert db.nodes("run-1") == []  # no node row: nothing was asked of the cloud
    tried = json.loads(db.sites("run-1")[0]["placements_tried"])
    assert [t["error"] for t in tried] == [
        "site 'a': instance type g6.xlarge: workers is 2 but it has 1 GPU(s), and each worker "
        "needs one; use at most 1, or 'auto' (one per GPU)"]


@pytest.mark.timeout(180)
@pytest.mark.skipif(torch.cuda.is_available(), reason="declares GPUs that CPU torch cannot use: "
                    "tests/test_gpu.py is this test where CUDA is present")
def test_declared_gpus_one_per_worker_and_cpu_torch_forms_a_gloo_group(monkeypatch):
    import ray

    from geotrain.site import agent

    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")  # the group stays on loopback
    monkeypatch.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    temp = tempfile.mkdtemp(prefix="gt-dev-")  # short: Ray's socket paths must fit
    try:
        workers = resolve_workers("auto", 2)
        agent.start_ray(workers, "127.0.0.1", temp, gpus=2)
        assert ray.cluster_resources().get("GPU") == 2
        group = agent.form_local_group(f"file://{temp}/run", "a", "a", workers, 2, temp)
        ids = [r["gpu_ids"] for r in group.ranks]
        assert sorted(ids) == [["0"], ["1"]], ids  # each worker its own GPU from Ray
        assert [(r["device"], r["cuda"]) for r in group.ranks] == [("cpu", False)] * 2
        assert group.backend == "gloo"
        assert group.reason == ("rank(s) 0, 1 of 2 have no usable CUDA device; Ray gave them "
                                f"GPU(s) {', '.join(i for r in group.ranks for i in r['gpu_ids'])} "
                                "but torch sees no CUDA")

        def group_seen_by(_worker) -> tuple[str, int]:  # runs inside each actor
            import torch.distributed as dist

            return dist.get_backend(), dist.get_world_size()

        formed = ray.get([a.__ray_call__.remote(group_seen_by) for a in group.actors])
        assert formed == [("gloo", 2)] * 2
    finally:
        ray.shutdown()
        shutil.rmtree(temp, ignore_errors=True)


def test_the_summarys_rank_count_takes_only_plausible_group_events(tmp_path):
    """The final summary estimates tokens from each site's `group` event (an `auto`
    site's worker count is known only on its node). Those events are site-written:
    a world that is not a whole number within what the site could run, or a site
    that is not the run's, is ignored, never a crash or a figure it dictates."""
    from geotrain.runs import _site_ranks
    from geotrain.store import RunStore

    recipe = loads("name: x\nsites:\n  - {name: a, provider: local}\n"
                   "  - {name: b, provider: local, workers: 2}\n  - {name: c, provider: local}\n")
    store = RunStore("file://" + str(tmp_path))
    store.event("a", "group", world=3)
    for forged in ("4", 1e9, 3.0, -1, 0, None, 10 ** 6, True):
        store.event("b", "group", world=forged)
    store.event("c", "group", world=2)
    store.append_jsonl("sites/c/events.jsonl",  # written as another, not the run's, site
                       {"at": 0.0, "source": "zz", "kind": "group", "message": "", "world": 5})
    ranks = _site_ranks(store, recipe)
    # a: 3 of at most 16 ('auto'); b: nothing plausible (2 workers x 1 node at most; True
    # is a bool, not a count); c: its own event, the forged source ignored.
    assert ranks == {"a": 3, "c": 2}
