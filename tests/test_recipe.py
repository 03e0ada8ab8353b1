"""The recipe: defaults, path resolution, and one precise error for every kind of mistake."""

import json
import pickle
from pathlib import Path

import pytest
import yaml

from geotrain import recipe
from geotrain.errors import CapacityError, GeotrainError, RecipeError
from geotrain.recipe import Recipe, load, loads

pytestmark = pytest.mark.timeout(30)

SITES = "sites:\n  - name: a\n"


def error(text: str) -> RecipeError:
    with pytest.raises(RecipeError) as info:
        loads(text, source="r.yaml")
    return info.value


FULL = """\
name: demo-run
model:
  preset: small
  n_layer: 3
  dropout: 0.1
data:
  source: files
  paths: ["corpus/*.txt", /abs/data/**/*.md]
train:
  rounds: 5
  inner_steps: 10
  betas: [0.8, 0.9]
sync:
  outer_lr: 0.5
  nesterov: false
store:
  url: s3://bucket/geotrain
sites:
  - name: a
  - name: b
    provider: aws
    region: us-east-1
    instance_type: g5.12xlarge
    workers: 4
"""


def test_valid_recipe_loads_and_round_trips(tmp_path: Path):
    path = tmp_path / "r.yaml"
    path.write_text(FULL)
    r = load(path)
    assert r.name == "demo-run"
    assert r.model.dims() == (3, 8, 256)
    assert r.data.paths == [str(tmp_path / "corpus/*.txt"), "/abs/data/**/*.md"]
    assert r.train.betas == (0.8, 0.9)
    assert [(s.name, s.provider, s.region, s.workers) for s in r.sites] == [
        ("a", "local", None, "auto"), ("b", "aws", "us-east-1", 4)]
    assert r.store_root() == "s3://bucket/geotrain"
    d = r.to_dict()
    assert json.loads(json.dumps(d)) == d
    assert Recipe.model_validate(d) == r
    assert loads(json.dumps(d)) == r  # JSON is YAML; resolved paths stay as they are


def test_defaults_are_as_documented():
    r = loads("name: x\n" + SITES)
    assert r.model.model_dump() == dict(preset="tiny", n_layer=None, n_head=None, d_model=None,
                                        dropout=0.0)
    assert r.data.model_dump() == dict(source="python-stdlib", paths=[], eval_fraction=0.02)
    assert r.train.model_dump() == dict(
        rounds=20, inner_steps=50, batch_size=16, seq_len=128, lr=3e-3, min_lr_ratio=0.1,
        warmup_steps=20, weight_decay=0.1, grad_clip=1.0, betas=(0.9, 0.95), optimizer="adamw",
        muon_lr=0.02, seed=0, eval_batches=8, threads=1, precision="auto", compile=False,
        hours=None, entrypoint=None, code_dir=None,
        requirements_lock=None)
    assert r.sync.model_dump() == dict(algorithm="diloco", outer_lr=0.7,
                                       outer_lr_schedule="constant", outer_lr_min_ratio=0.1,
                                       outer_lr_warmup=0, outer_momentum=0.9,
                                       nesterov=True, compression="none", topk_fraction=0.01,
                                       value_bits=4, topk_chunk=4096, error_decay=1.0, overlap=False,
                                       fragments=1, round_seconds=None,
                                       round_timeout_s=600, join_wait_s=60, liveness_timeout_s=None,
                                       boot_timeout_s=1800, max_replacements=10,
                                       reject_norm_factor=10, state_every=1, offload="auto")
    assert r.store.url is None
    assert r.sites[0].model_dump() == dict(name="a", provider="local", region=None, workers="auto",
                                           zones=[], instance_type=None, gpu=None, spot=False,
                                           nodes=1, aws=None, gcp=None, azure=None,
                                           candidates=[])
    assert r.budget is None and r.train.hours is None


def test_liveness_limit_is_longer_for_a_cloud_site_unless_the_recipe_sets_one():
    local = loads("name: x\n" + SITES)
    assert local.liveness_s() == 4.0 and local.sync.liveness_for("local") == 4.0
    cloud = loads("name: x\nstore: {url: 's3://b/p'}\nsites:\n"
                  "  - {name: a}\n"
                  "  - {name: b, provider: gcp, region: us-central1, instance_type: g2-standard-4,\n"
                  "     gcp: {service_account: n@p.iam.gserviceaccount.com, "
                  "store_credentials: 'arn:aws:iam::1:role/r'}}\n")
    assert cloud.sync.liveness_for("gcp") == 30.0 and cloud.sync.liveness_for("local") == 4.0
    assert cloud.liveness_s() == 30.0  # a round waits as long as its slowest kind of site
    # a local site whose fallback is on a cloud gets the cloud's patience too
    fallback = loads("name: x\nstore: {url: 's3://b/p'}\nsites:\n  - name: a\n    candidates:\n"
                     "      - {provider: aws, region: us-east-1, instance_type: t3.large,\n"
                     "         aws: {instance_profile: geotrain-node}}\n")
    assert fallback.liveness_s() == 30.0
    fixed = loads("name: x\nsync: {liveness_timeout_s: 9}\n" + SITES)
    assert fixed.sync.liveness_for("aws") == fixed.sync.liveness_for("local") == fixed.liveness_s() == 9


def test_recipe_is_frozen():
    r = loads("name: x\n" + SITES)
    with pytest.raises(Exception):
        r.name = "y"
    with pytest.raises(Exception):
        r.train.rounds = 3


def test_schema_describes_every_field():
    s = recipe.schema()
    assert s["title"] == "Recipe" and s["required"] == ["name", "sites"]
    models = [s, *s["$defs"].values()]
    assert {m["title"] for m in models} >= {"Recipe", "ModelSpec", "DataSpec", "TrainSpec",
                                             "SyncSpec", "StoreSpec", "SiteSpec"}
    for m in models:
        assert m["description"] and m["additionalProperties"] is False
        for name, prop in m["properties"].items():
            assert prop.get("description"), f"{m['title']}.{name} has no description"
    json.dumps(s)


def test_plain_path_store_becomes_absolute_file_url(tmp_path: Path):
    (tmp_path / "recipes").mkdir()
    path = tmp_path / "recipes" / "r.yaml"
    path.write_text("name: x\nstore:\n  url: ../runs\n" + SITES)
    r = load(path)
    assert r.store.url == f"file://{tmp_path / 'runs'}"
    assert r.store_root() == r.store.url
    assert loads("name: x\nstore: {url: /srv/runs}\n" + SITES).store.url == "file:///srv/runs"
    assert loads("name: x\nstore: {url: 'gs://b/p'}\n" + SITES).store.url == "gs://b/p"


def test_loads_resolves_against_base_dir(tmp_path: Path):
    text = "name: x\ndata: {source: files, paths: [a/*.txt]}\nstore: {url: runs}\n" + SITES
    r = loads(text, base_dir=tmp_path)
    assert r.data.paths == [str(tmp_path / "a/*.txt")]
    assert r.store.url == f"file://{tmp_path / 'runs'}"


def test_default_store_root_follows_geotrain_home(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("GEOTRAIN_HOME", str(tmp_path))
    assert recipe.default_home() == tmp_path
    assert loads("name: x\n" + SITES).store_root() == f"file://{tmp_path / 'runs'}"
    monkeypatch.delenv("GEOTRAIN_HOME")
    assert recipe.default_home() == Path.home() / ".geotrain"


TOP = "name: x\n"
MISTAKES = {
    "unknown top-level key": (
        TOP + "trian:\n  rounds: 3\n" + SITES, 2, "trian",
        "unknown field 'trian'; did you mean 'train'? "
        "valid fields: name, model, data, train, sync, store, sites, budget"),
    "unknown nested key": (
        TOP + "train:\n  rounds: 3\n  inner_stepz: 5\n" + SITES, 4, "train.inner_stepz",
        "unknown field 'inner_stepz'; did you mean 'inner_steps'? valid fields: rounds, "
        "inner_steps, batch_size, seq_len, lr, min_lr_ratio, warmup_steps, weight_decay, "
        "grad_clip, betas, optimizer, muon_lr, seed, eval_batches, threads, precision, compile, "
        "hours, entrypoint, code_dir, requirements_lock"),
    "unknown key, nothing close": (
        TOP + SITES + "    colour: eu\n", 4, "sites[0].colour",
        "unknown field 'colour'; valid fields: name, provider, region, workers, zones, "
        "instance_type, gpu, spot, nodes, aws, gcp, azure, candidates"),
    "misspelt required key": (
        "nmae: x\n" + SITES, 1, "nmae",
        "unknown field 'nmae'; did you mean 'name'? "
        "valid fields: name, model, data, train, sync, store, sites, budget"),
    "wrong literal": (
        TOP + "model:\n  preset: huge\n" + SITES, 3, "model.preset",
        "expected one of 'tiny', 'small', 'medium', 'large', 'xl' (got 'huge')"),
    "wrong literal, close": (
        TOP + "sites:\n  - name: a\n  - name: b\n    provider: asw\n", 5, "sites[1].provider",
        "expected one of 'local', 'aws', 'gcp', 'azure' (got 'asw'; did you mean 'aws'?)"),
    "number too small": (
        TOP + "train:\n  inner_steps: 0\n" + SITES, 3, "train.inner_steps",
        "must be >= 1 (got 0)"),
    "number too large in a list item": (
        TOP + "sites:\n  - name: a\n  - name: b\n    workers: 65\n", 5, "sites[1].workers",
        "must be <= 64 (got 65)"),
    "tuple item out of range": (
        TOP + "train:\n  betas: [0.9, 1.5]\n" + SITES, 3, "train.betas[1]",
        "must be < 1 (got 1.5)"),
    "not finite": (
        TOP + "train:\n  lr: .inf\n" + SITES, 3, "train.lr", "expected a finite number (got inf)"),
    "wrong type, integer": (
        TOP + "train:\n  inner_steps: abc\n" + SITES, 3, "train.inner_steps",
        "expected an integer (got 'abc')"),
    "wrong type, fraction for integer": (
        TOP + "train:\n  rounds: 2.5\n" + SITES, 3, "train.rounds",
        "expected an integer (got 2.5)"),
    "wrong type, string": (
        TOP + "sites:\n  - name: a\n    region: no\n", 4, "sites[0].region",
        "expected a string (got false)"),
    "wrong type, mapping": (
        TOP + "model: big\n" + SITES, 2, "model", "expected a mapping (got 'big')"),
    "wrong type, list": (
        TOP + "sites:\n  name: a\n", 2, "sites", "expected a list (got a mapping)"),
    "missing name": (
        "# a comment\n" + SITES, 2, "name", "required field is missing"),
    "missing sites": (
        TOP + "train:\n  rounds: 3\n", 1, "sites", "required field is missing"),
    "missing site name": (
        TOP + "sites:\n  - name: a\n  - workers: 2\n", 4, "sites[1].name",
        "required field is missing"),
    "empty sites": (
        TOP + "sites: []\n", 2, "sites", "must have at least 1 item (got 0)"),
    "duplicate site names": (
        TOP + "sites:\n  - name: a\n  - name: b\n  - name: a\n", 5, "sites[2].name",
        "duplicate site name 'a' (also sites[0])"),
    "bad slug": (
        "name: My Run\n" + SITES, 1, "name",
        "must be lowercase a-z, 0-9 and '-', not starting with '-' (got 'My Run')"),
    "site name too long": (
        TOP + "sites:\n  - name: abcdefghijklmnopqrstu\n", 3, "sites[0].name",
        "must be at most 20 characters (got 21)"),
    "d_model not divisible by n_head": (
        TOP + "model:\n  n_head: 3\n  d_model: 100\n" + SITES, 4, "model.d_model",
        "must be divisible by n_head 3, e.g. 99 or 102 (got 100)"),
    "n_head does not divide the preset's d_model": (
        TOP + "model:\n  preset: tiny\n  n_head: 3\n" + SITES, 4, "model.n_head",
        "must divide d_model 128 of preset 'tiny' (got 3)"),
    "files source without paths": (
        TOP + "data:\n  source: files\n" + SITES, 2, "data.paths",
        "required when source is 'files': a list of glob patterns, e.g. ['corpus/*.txt']"),
    "paths without files source": (
        TOP + "data:\n  paths: [a.txt]\n" + SITES, 3, "data.paths",
        "only allowed when source is 'files' (source is 'python-stdlib')"),
    "empty path": (
        TOP + "data:\n  source: files\n  paths:\n    - a.txt\n    - ''\n" + SITES, 6,
        "data.paths[1]", "must not be empty"),
    "bad store scheme": (
        TOP + "store:\n  url: http://example.com/runs\n" + SITES, 3, "store.url",
        "unsupported store URL 'http://example.com/runs'; "
        "valid: file://, s3://, gs://, az:// or a filesystem path"),
    "store scheme without //": (
        TOP + "store:\n  url: 's3:bucket'\n" + SITES, 3, "store.url",
        "unsupported store URL 's3:bucket'; "
        "valid: file://, s3://, gs://, az:// or a filesystem path"),
    "store URL without bucket": (
        TOP + "store:\n  url: 'gs://'\n" + SITES, 3, "store.url",
        "'gs://' names no bucket or folder"),
}


@pytest.mark.parametrize("text, line, field, message", MISTAKES.values(), ids=MISTAKES.keys())
def test_each_mistake_gets_one_precise_error(text, line, field, message):
    e = error(text)
    assert (e.file, e.line, e.field, e.message) == ("r.yaml", line, field, message)
    assert str(e) == f"r.yaml:{line}: {field}: {message}"


@pytest.mark.parametrize("section, field, value, message", [
    ("train", "optimizer", "sgd", "expected one of 'adamw', 'muon' (got 'sgd')"),
    ("train", "optimizer", "Muon", "expected one of 'adamw', 'muon' (got 'Muon'; did you mean 'muon'?)"),
    ("train", "muon_lr", "0", "must be > 0 (got 0)"),
    ("sync", "value_bits", "3", "expected one of 2, 4, 8 (got 3)"),
    ("sync", "topk_chunk", "8", "must be >= 16 (got 8)"),
    ("sync", "topk_chunk", "65537", "must be <= 65536 (got 65537)"),
    ("sync", "topk_chunk", "1.5", "expected an integer (got 1.5)"),
])
def test_optimizer_and_topk_settings(section, field, value, message):
    ok = {"train": "{optimizer: muon, muon_lr: 0.01}", "sync": "{value_bits: 2, topk_chunk: 256}"}
    r = loads(f"{TOP}train: {ok['train']}\nsync: {ok['sync']}\n" + SITES)
    assert (r.train.optimizer, r.train.muon_lr, r.sync.value_bits, r.sync.topk_chunk) == (
        "muon", 0.01, 2, 256)
    e = error(f"{TOP}{section}:\n  {field}: {value}\n" + SITES)
    assert str(e) == f"r.yaml:3: {section}.{field}: {message}"


def test_topk_takes_sparseloco_outer_defaults_unless_the_recipe_sets_them():
    """With compression 'topk' the outer step defaults to plain SGD at lr 2 with the error
    feedback (decay 0.95) as its momentum (TOPK_DEFAULTS); a value the recipe sets wins,
    and the other codecs keep the published DiLoCo defaults."""
    outer = lambda r: (r.sync.outer_lr, r.sync.outer_momentum, r.sync.error_decay)  # noqa: E731
    assert outer(loads(f"{TOP}sync: {{compression: topk}}\n" + SITES)) == (2.0, 0.0, 0.95)
    assert outer(loads(f"{TOP}sync: {{compression: topk, outer_lr: 1, outer_momentum: 0.5, "
                       f"error_decay: 1}}\n" + SITES)) == (1.0, 0.5, 1.0)
    assert outer(loads(f"{TOP}sync: {{compression: topk, outer_momentum: 0.9}}\n" + SITES)) \
        == (2.0, 0.9, 0.95)
    for codec in ("none", "int8", "int4"):
        assert outer(loads(f"{TOP}sync: {{compression: {codec}}}\n" + SITES)) == (0.7, 0.9, 1.0)
    assert outer(loads(TOP + SITES)) == (0.7, 0.9, 1.0)
    e = error(f"{TOP}sync:\n  compression: topk\n  outer_momentum: 1\n" + SITES)
    assert e.field == "sync.outer_momentum"  # a set value is still validated


def test_first_error_in_file_order_is_reported():
    e = error(TOP + "train:\n  rounds: 0\n  inner_steps: 0\nsync:\n  outer_lr: 0\n" + SITES)
    assert (e.line, e.field) == (3, "train.rounds")
    e = error(TOP + "train:\n  inner_stepz: 1\n  rounds: 0\n" + SITES)
    assert (e.line, e.field) == (3, "train.inner_stepz")


@pytest.mark.parametrize("text, line, message", [
    ("name: x\nsites:\n  - name: a\n   workers: 2\n", 4,
     "invalid YAML: expected <block end>, but found '<block mapping start>' "
     "(check the indentation)"),
    ("name: x\nsites: : a\n", 2, "invalid YAML: mapping values are not allowed here"),
    ("name: [x\n" + SITES, 2, "invalid YAML: expected ',' or ']', but got ':'"),
    ("name: x\ntrain: {}\ntrain: {rounds: 1}\n" + SITES, 3,
     "duplicate key 'train' (first on line 2)"),
    ("# recipe\n- name: a\n- name: b\n", 2,
     "expected a mapping of fields at the top level (got a list)"),
    ("just text\n", 1, "expected a mapping of fields at the top level (got 'just text')"),
], ids=["yaml indentation", "yaml colon", "yaml bracket", "duplicate key", "top-level list",
        "top-level scalar"])
def test_file_level_mistakes(text, line, message):
    e = error(text)
    assert (e.line, e.field, e.message) == (line, "", message)
    assert str(e) == f"r.yaml:{line}: {message}"


def test_empty_recipe():
    e = error("# nothing yet\n")
    assert (e.line, e.field) == (None, "")
    assert str(e) == "r.yaml: recipe is empty; it needs at least 'name' and 'sites'"


def test_missing_file(tmp_path: Path):
    path = tmp_path / "nope.yaml"
    with pytest.raises(RecipeError) as info:
        load(path)
    assert str(info.value) == f"{path}: file not found"
    assert info.value.to_dict() == {"error": "RecipeError", "file": str(path), "line": None,
                                    "field": "", "message": "file not found"}


def test_errors_in_a_file_name_the_file(tmp_path: Path):
    path = tmp_path / "r.yaml"
    path.write_text("name: x\nsites: []\n")
    with pytest.raises(RecipeError, match=r"r\.yaml:2: sites: must have at least 1 item"):
        load(path)


def test_errors_are_geotrain_errors_and_pickle():
    e = error("name: x\nsites: []\n")
    assert isinstance(e, GeotrainError)
    again = pickle.loads(pickle.dumps(e))
    assert str(again) == str(e) and again.to_dict() == e.to_dict()
    c = CapacityError("no g5 capacity", ["aws/us-east-1", "aws/us-west-2"])
    assert str(c) == "no g5 capacity (tried: aws/us-east-1, aws/us-west-2)"
    assert str(pickle.loads(pickle.dumps(c))) == str(c)
    assert CapacityError("none").tried == []


# -- placement: zones, instance types, spot, nodes, candidates; budget ---------------------

PLACED = """\
name: x
budget: {max_usd: 100}
sites:
  - name: a
    provider: aws
    region: us-east-1
    zones: [us-east-1a, us-east-1b]
    instance_type: g5.xlarge
    spot: true
    nodes: 2
    candidates:
      - {provider: gcp, region: us-central1, instance_type: g2-standard-4}
      - {provider: aws, region: us-west-2, instance_type: g5.xlarge, spot: true}
  - {name: b}
"""


def test_placements_are_the_primary_then_the_candidates():
    r = loads(PLACED)
    a, b = r.sites
    assert [(p.provider, p.region, p.zones, p.instance_type, p.spot) for p in a.placements()] == [
        ("aws", "us-east-1", ["us-east-1a", "us-east-1b"], "g5.xlarge", True),
        ("gcp", "us-central1", [], "g2-standard-4", False),
        ("aws", "us-west-2", [], "g5.xlarge", True)]
    assert a.nodes == 2 and r.budget.max_usd == 100
    assert a.placements()[0].where() == "aws/us-east-1[us-east-1a,us-east-1b] g5.xlarge spot"
    assert [p.provider for p in b.placements()] == ["local"] and not b.placements()[0].spot
    assert Recipe.model_validate(r.to_dict()) == r
    assert loads("name: x\nsites: [{name: a, provider: azure, gpu: 'H100:8'}]\n").sites[0].gpu == "H100:8"


PLACEMENT_MISTAKES = {
    "cloud site without instance type": (
        "name: x\nsites:\n  - name: a\n    provider: gcp\n", 3, "sites[0].instance_type",
        "required on provider 'gcp' (e.g. 'g2-standard-4'), or give the site a `gpu` requirement "
        "such as 'A100:8'"),
    "cloud candidate without instance type": (
        "name: x\nsites:\n  - name: a\n    candidates:\n      - {provider: aws, region: us-east-1}\n",
        5, "sites[0].candidates[0].instance_type",
        "required on provider 'aws' (e.g. 'g5.xlarge'), or give the site a `gpu` requirement "
        "such as 'A100:8'"),
    "candidate without provider": (
        "name: x\nsites:\n  - name: a\n    candidates:\n      - {region: us-east-1}\n", 5,
        "sites[0].candidates[0].provider", "required field is missing"),
    "unknown candidate key": (
        "name: x\nsites:\n  - name: a\n    candidates:\n      - {provider: local, zone: a}\n", 5,
        "sites[0].candidates[0].zone", "unknown field 'zone'; did you mean 'zones'? valid fields: "
        "provider, region, zones, instance_type, spot, aws, gcp, azure"),
    "bad gpu requirement": (
        "name: x\nsites:\n  - name: a\n    provider: aws\n    gpu: 'A100:x8'\n", 5, "sites[0].gpu",
        "expected 'MODEL:COUNT' GPUs per node, e.g. 'A100:8' or 'L4:1' (got 'A100:x8')"),
    "zero nodes": (
        "name: x\nsites:\n  - name: a\n    nodes: 0\n", 4, "sites[0].nodes", "must be >= 1 (got 0)"),
    "budget without max": (
        "name: x\nbudget: {}\nsites: [{name: a}]\n", 2, "budget.max_usd", "required field is missing"),
    "negative budget": (
        "name: x\nbudget: {max_usd: -5}\nsites: [{name: a}]\n", 2, "budget.max_usd", "must be > 0 (got -5)"),
    "unknown budget key": (
        "name: x\nbudget: {max_usd: 5, max_eur: 4}\nsites: [{name: a}]\n", 2, "budget.max_eur",
        "unknown field 'max_eur'; did you mean 'max_usd'? valid fields: max_usd"),
}


@pytest.mark.parametrize("text, line, field, message", PLACEMENT_MISTAKES.values(), ids=PLACEMENT_MISTAKES.keys())
def test_placement_mistakes(text, line, field, message):
    e = error(text)
    assert (e.line, e.field, e.message) == (line, field, message)


@pytest.mark.parametrize("name", ["local.yaml", "aws.yaml", "multicloud.yaml", "twin.yaml"])
def test_shipped_recipes_are_valid(name):
    root = Path(__file__).resolve().parent.parent / "recipes"
    text = (root / name).read_text()
    r = load(root / name)
    if name == "aws.yaml":
        assert {s.provider for s in r.sites} == {"aws"} and len({s.region for s in r.sites}) == 2
        assert all(s.spot and s.candidates for s in r.sites)
    if name == "multicloud.yaml":
        assert [s.provider for s in r.sites] == ["aws", "gcp", "azure"]
        assert all(s.candidates for s in r.sites)
    if name == "twin.yaml":  # each site falls back to the other cloud
        assert [(s.provider, s.candidates[0].provider) for s in r.sites] == [
            ("aws", "gcp"), ("gcp", "aws"), ("azure", "aws")]
    if name != "local.yaml":
        assert "geotrain plan" in text.split("name:")[0] and "geotrain launch" in text.split("name:")[0]
