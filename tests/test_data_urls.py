"""Training data from object storage: `data.paths` may be fsspec URLs, which is how a
cloud site reads its shard (with its node's own identity); a local path for a cloud
site is refused before anything is created."""

from __future__ import annotations

import os
import subprocess

import fsspec
import pytest
import yaml

from geotrain.checks import data_access
from geotrain.recipe import load
from geotrain.state import StateDB
from geotrain.train import data as D
from tests.helpers import geotrain_cmd

pytestmark = pytest.mark.timeout(120)


@pytest.mark.parametrize("scheme", ["s3", "gs", "az"])
def test_url_patterns_glob_split_shard_and_load_like_local_files(store_urls, tmp_path, scheme):
    url = store_urls(scheme)
    texts = {f"corpus/part-{i:02d}.txt": f"text number {i}\n" * (i + 1) for i in range(12)}
    texts["corpus/skip.bin"] = "not matched"
    for name, text in texts.items():
        with fsspec.open(f"{url}/{name}", "wb") as f:
            f.write(text.encode())
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text(text)

    remote = D.glob_files([f"{url}/corpus/*.txt"])
    local = D.glob_files([str(tmp_path / "corpus" / "*.txt")])
    assert [str(f).rsplit("/", 1)[1] for f in remote] == [p.name for p in local]
    assert all(str(f).startswith(f"{scheme}://") for f in remote)
    # The same tree splits and shards the same way wherever it lies.
    r_train, r_eval = D.split(remote, 0.2, seed=3)
    l_train, l_eval = D.split(local, 0.2, seed=3)
    assert [str(f).rsplit("/", 1)[1] for f in r_eval] == [p.name for p in l_eval]
    mine = D.shard(r_train, 1, 3)
    assert [str(f).rsplit("/", 1)[1] for f in mine] == [p.name for p in D.shard(l_train, 1, 3)]
    assert bytes(D.load_bytes(mine).numpy()) == bytes(D.load_bytes(D.shard(l_train, 1, 3)).numpy())
    with pytest.raises(ValueError, match="matches no files"):
        D.glob_files([f"{url}/nothing/*.txt"])


def test_recipe_keeps_urls_and_resolves_local_paths(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("name: r\ndata: {source: files, paths: ['s3://b/corpus/*.txt', 'c/*.txt']}\n"
                    "sites: [{name: a}]\n")
    r = load(path)
    assert r.data.paths == ["s3://b/corpus/*.txt", str(tmp_path / "c" / "*.txt")]


def _cloud_recipe(tmp_path, paths, name="r.yaml"):
    spec = {"name": "r", "data": {"source": "files", "paths": paths},
            "store": {"url": "s3://bucket/runs"},
            "sites": [{"name": "a", "provider": "local"},
                      {"name": "b", "provider": "aws", "region": "us-east-1",
                       "instance_type": "g5.xlarge", "aws": {"instance_profile": "geotrain-node"}}]}
    path = tmp_path / name
    path.write_text(yaml.safe_dump(spec))
    return path


def test_a_cloud_site_with_local_data_is_refused_in_one_line(tmp_path):
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "a.txt").write_text("x")
    path = _cloud_recipe(tmp_path, ["s3://bucket/more/*.txt", "corpus/*.txt"])
    why = data_access(load(path))
    assert why == (f"site b: its aws nodes cannot read data.paths[1] "
                   f"'{tmp_path / 'corpus' / '*.txt'}', which is on this machine; copy the files "
                   "to object storage and list their URL instead (e.g. 's3://bucket/corpus/*.txt')")
    assert data_access(load(_cloud_recipe(tmp_path, ["s3://bucket/more/*.txt"], "ok.yaml"))) is None
    home = tmp_path / "home"
    out = subprocess.run(geotrain_cmd("launch", str(path)), capture_output=True, text=True,
                         timeout=90, env={**os.environ, "GEOTRAIN_HOME": str(home),
                                          # refused before any provider is asked; were one
                                          # asked, never a real cloud
                                          "AWS_ENDPOINT_URL": "http://127.0.0.1:9",
                                          "AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "x"})
    assert out.returncode != 0 and "cannot read data.paths[1]" in out.stderr
    assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert not (home / "state.db").exists() or StateDB(home).runs() == []  # nothing created
