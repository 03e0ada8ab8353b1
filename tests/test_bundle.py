"""What cloud nodes install (geotrain/bundle.py): the wheel of the running geotrain,
pinned requirements, the user's code — reproducible, content-addressed, unpacked safely.

The whole path on a booting node (download by signed URL, hash check, install, the
agent running from the installed wheel) is tests/test_boot_aws.py.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import tarfile
import urllib.request
import zipfile
from pathlib import Path

import pytest

from geotrain import bundle
from geotrain.recipe import load

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.timeout(300)


def test_wheel_is_the_running_source_reproducible_and_built_outside_the_tree(tmp_path):
    before = sorted(p.name for p in ROOT.iterdir())
    a = bundle.build_wheel(tmp_path / "a")
    b = bundle.build_wheel(tmp_path / "b")  # another cache: a fresh build
    assert a.sha256 == b.sha256 and a.size == b.size  # SOURCE_DATE_EPOCH: same bytes
    assert bundle.build_wheel(tmp_path / "a").path == a.path  # cached by source hash
    assert sorted(p.name for p in ROOT.iterdir()) == before  # no build/ or egg-info left here
    names = zipfile.ZipFile(a.path).namelist()
    for f in ("geotrain/bundle.py", "geotrain/site/agent.py", "providers/aws/__init__.py",
              "providers/aws/watcher.py", "geotrain/catalog/aws.json"):
        assert f in names, f
    assert (ROOT / "geotrain" / "bundle.py").read_bytes() == \
        zipfile.ZipFile(a.path).read("geotrain/bundle.py")
    assert not any(n.endswith(".pyc") or "__pycache__" in n for n in names)


def test_one_shared_cache_serves_processes_building_at_once(tmp_path, monkeypatch):
    shared = tmp_path / "shared"
    monkeypatch.setenv("GEOTRAIN_BUNDLE_CACHE", str(shared))
    assert bundle.cache_dir(tmp_path / "home") == shared
    monkeypatch.delenv("GEOTRAIN_BUNDLE_CACHE")
    assert bundle.cache_dir(tmp_path / "home") == tmp_path / "home" / "bundles"
    # Three processes find the cache empty and build together: each gets the whole wheel,
    # the same bytes, and nothing half-written is left behind.
    code = ("import sys; from pathlib import Path; from geotrain import bundle; "
            "w = bundle.build_wheel(Path(sys.argv[1])); print(w.path, w.sha256)")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(shared)], stdout=subprocess.PIPE,
                              text=True, cwd=tmp_path) for _ in range(3)]
    outs = [p.communicate(timeout=240)[0].split() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert len({tuple(o) for o in outs}) == 1
    path, sha = outs[0]
    assert bundle._artifact(Path(path)).sha256 == sha
    assert [p.name for p in shared.rglob("*") if p.is_file()] == [Path(path).name]


def test_wheel_of_an_installed_geotrain_is_repacked_from_its_files(tmp_path):
    """geotrain installed from a wheel (no source tree): the node gets the same files."""
    wheel = bundle.build_wheel(tmp_path / "cache")
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                    "--disable-pip-version-check", "--target", str(target), str(wheel.path)],
                   check=True, timeout=240)
    code = ("import sys; from pathlib import Path; from geotrain import bundle; "
            "assert bundle.source_root() is None, bundle.source_root(); "
            "print(bundle.build_wheel(Path(sys.argv[1])).path)")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "cache2")], check=True,
                         capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, PYTHONPATH=str(target)), cwd=tmp_path).stdout
    repacked = zipfile.ZipFile(out.strip())
    original = zipfile.ZipFile(wheel.path)
    code_files = [n for n in original.namelist() if not n.endswith("RECORD")]
    assert sorted(n for n in repacked.namelist() if not n.endswith("RECORD")) == sorted(code_files)
    for n in code_files:
        assert repacked.read(n) == original.read(n), n
    record = repacked.read("geotrain-0.1.0.dist-info/RECORD").decode()
    assert "geotrain/bundle.py,sha256=" in record


def test_pins_are_the_installed_closure_public_versions_and_no_test_extras():
    from importlib.metadata import version

    pins = dict(p.split("==") for p in bundle.pins())
    assert "geotrain" not in pins
    for dep in ("torch", "ray", "pydantic", "s3fs", "botocore", "numpy"):
        assert pins[dep] == version(dep).split("+")[0], dep
    assert "+" not in "".join(pins.values())  # local labels (+cpu) dropped: a GPU node gets its build
    for extra in ("pytest", "moto", "gcp-storage-emulator"):
        assert extra not in pins  # [test] extras are never installed on nodes


def _tree(root: Path) -> None:
    (root / "pkg").mkdir(parents=True)
    (root / "pkg" / "__init__.py").write_text("")
    (root / "pkg" / "train.py").write_text("def main(ctx):\n    return {}\n")
    for junk in (".git/HEAD", "pkg/__pycache__/train.cpython-311.pyc", ".venv/bin/python",
                 "node_modules/x.js"):
        (root / junk).parent.mkdir(parents=True, exist_ok=True)
        (root / junk).write_text("junk")


def test_code_archive_is_deterministic_and_leaves_out_caches_and_vcs(tmp_path):
    _tree(tmp_path / "one")
    a = bundle.pack_code(tmp_path / "one", tmp_path / "cache")
    os.utime(tmp_path / "one" / "pkg" / "train.py", (1, 1))  # times do not count
    _tree(tmp_path / "two")
    b = bundle.pack_code(tmp_path / "two", tmp_path / "cache2")
    assert a.sha256 == b.sha256
    with tarfile.open(a.path) as t:
        assert sorted(t.getnames()) == ["pkg/__init__.py", "pkg/train.py"]
    out = tmp_path / "node"
    assert bundle.unpack(a.path, out) == 2
    assert (out / "pkg" / "train.py").read_text().startswith("def main")


def test_code_archive_too_big_is_refused_with_what_to_do(tmp_path, monkeypatch):
    _tree(tmp_path / "code")
    monkeypatch.setattr(bundle, "MAX_CODE_BYTES", 10)
    with pytest.raises(bundle.BundleError, match="holds more than .* point it at the folder"):
        bundle.pack_code(tmp_path / "code", tmp_path / "cache")


@pytest.mark.parametrize("member", ["../evil.py", "/etc/evil", "link"])
def test_unpack_refuses_paths_outside_and_links(tmp_path, member):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        info = tarfile.TarInfo(member)
        if member == "link":
            info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
            tar.addfile(info)
        else:
            info.size = 3
            tar.addfile(info, io.BytesIO(b"bad"))
    (tmp_path / "a.tar.gz").write_bytes(buf.getvalue())
    with pytest.raises(bundle.BundleError, match="refusing the archive"):
        bundle.unpack(tmp_path / "a.tar.gz", tmp_path / "out")
    assert not (tmp_path / "evil.py").exists()
    # The boot script's entry point says so in one line and exits non-zero.
    proc = subprocess.run([sys.executable, "-m", "geotrain.bundle", "unpack",
                           str(tmp_path / "a.tar.gz"), str(tmp_path / "out2")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and "refusing the archive" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_code_dir_defaults_to_the_recipe_folder_only_with_an_entrypoint(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: r\nsites: [{name: a}]\n")
    assert bundle.code_dir_of(load(recipe), str(recipe)) is None
    recipe.write_text("name: r\ntrain: {entrypoint: 'pkg.train:main'}\nsites: [{name: a}]\n")
    assert bundle.code_dir_of(load(recipe), str(recipe)) == tmp_path


@pytest.mark.parametrize("scheme", ["s3", "az"])
def test_signed_url_reads_one_object_without_credentials(store_urls, tmp_path, scheme):
    """A signed GET (S3 presigned URL, GCS signed URL, Azure SAS): what a node uses
    before it has any geotrain, or any credentials."""
    from geotrain.store import RunStore

    store = RunStore(store_urls(scheme))
    wheel = bundle.build_wheel(tmp_path / "cache")
    b = bundle.Bundle(wheel=wheel, requirements=bundle.write_requirements(tmp_path / "cache"),
                      code=None)
    bundle.publish(store, b)
    opts = dict(bundle.boot_options(store, b))
    assert opts["wheel_sha256"] == wheel.sha256 and opts["wheel_name"] == wheel.name
    assert "code_url" not in opts
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(opts["wheel_url"], timeout=30) as r:
        assert r.read() == wheel.path.read_bytes()
    assert sorted(store.keys("_boot")) == sorted([b.wheel.key, b.requirements.key])


def test_a_store_that_cannot_sign_says_what_credentials_it_needs(store_urls, tmp_path):
    """The GCS emulator runs with anonymous credentials, which cannot sign a URL: the
    operator gets one line naming the store and what to use, not a traceback."""
    from geotrain.errors import StoreError
    from geotrain.store import RunStore

    store = RunStore(store_urls("gs"))
    store.put("_boot/x/a.txt", b"a")
    with pytest.raises(StoreError, match=r"could not sign a URL for _boot/x/a.txt .*service "
                                         r"account key") as e:
        store.sign("_boot/x/a.txt", 60)
    assert "\n" not in str(e.value)
