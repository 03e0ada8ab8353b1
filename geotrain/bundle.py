"""What a cloud node installs: the exact geotrain the operator runs, pinned
dependencies, and the user's own code — packed here, verified on the node.

A cloud node has nothing of ours when it boots. `prepare()` packs, on the
operator's machine:

- **the geotrain wheel**: built from the source tree geotrain runs from (an
  editable install or a checkout) with setuptools, or, for geotrain installed
  from a wheel, repacked from its installed files. Builds are reproducible
  (SOURCE_DATE_EPOCH) and cached (cache_dir) by the hash of the
  sources, so a replacement or migrated site, or a resumed run, gets the same bytes.
- **requirements.txt**: every distribution geotrain needs, transitively, pinned
  to the version installed here (`name==version`; a local label such as
  `+cpu` is dropped so a GPU node gets its platform's build of that version).
  With `train.requirements_lock`, the lock's requirements instead, each with the
  sha256 of every file of its version, once each of geotrain's pins is found there
  at the version installed here (geotrain/lockfile.py); the node installs them with
  `--require-hashes`, so any file it downloads must match the lock.
- **the user's code** (when the recipe has `train.entrypoint`): a
  deterministic tar.gz of `train.code_dir` (default: the recipe's directory),
  without VCS folders, caches and virtual environments; refused above
  MAX_CODE_BYTES with a message that says what to do.

`publish()` uploads them to the run store under `_boot/<sha256>/<name>`, and
`boot_options()` gives a site's boot script a short-lived, read-only URL per
object (S3 presigned GET, GCS signed URL, Azure SAS: fsspec's `sign`) with its
sha256. The boot script downloads each object, refuses it if its hash differs,
and installs it (infra/boot.sh.tmpl); nothing else is fetched, and pip itself is
left as the image has it.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from geotrain.errors import GeotrainError

DIST = "geotrain"
MAX_CODE_BYTES = 100 * 2**20
URL_TTL_S = 6 * 3600  # a node boots within minutes; a boot that waits longer is relaunched
# Fixed timestamp for reproducible archives (1980-01-01: the earliest a zip can hold).
EPOCH = 315532800
SKIP_DIRS = {".git", ".hg", ".svn", "__pycache__", ".venv", "venv", "node_modules",
             ".pytest_cache", ".mypy_cache", ".ruff_cache", ".ipynb_checkpoints", "build", "dist",
             ".geotrain"}
SKIP_SUFFIXES = (".pyc", ".pyo", ".egg-info")
SOURCE_PARTS = ("pyproject.toml", "README.md", "geotrain", "providers")


class BundleError(GeotrainError):
    """The node bundle cannot be built."""


@dataclass(frozen=True)
class Artifact:
    name: str      # file name on the node
    sha256: str
    size: int
    path: Path     # where it lies on this machine

    @property
    def key(self) -> str:
        """Its key in the run store: content-addressed."""
        return f"_boot/{self.sha256}/{self.name}"


@dataclass(frozen=True)
class Bundle:
    wheel: Artifact
    requirements: Artifact
    code: Artifact | None
    hashed: bool = False  # requirements from a lock with hashes: the node uses --require-hashes

    def artifacts(self) -> list[Artifact]:
        return [a for a in (self.wheel, self.requirements, self.code) if a is not None]

    def size(self) -> int:
        return sum(a.size for a in self.artifacts())


def _artifact(path: Path) -> Artifact:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return Artifact(path.name, h.hexdigest(), path.stat().st_size, path)


# -- the geotrain wheel -------------------------------------------------------------

def source_root() -> Path | None:
    """The source tree this geotrain runs from (editable install or checkout), else None."""
    root = Path(__file__).resolve().parent.parent
    pyproject = root / "pyproject.toml"
    if pyproject.is_file() and re.search(r'(?m)^name\s*=\s*"geotrain"', pyproject.read_text()):
        return root
    return None


def _source_files(root: Path) -> list[Path]:
    out = []
    for part in SOURCE_PARTS:
        p = root / part
        if p.is_file():
            out.append(p)
        elif p.is_dir():
            out += [f for f in p.rglob("*") if f.is_file() and not _skipped(f.relative_to(root))]
    return sorted(out)


def _skipped(rel: Path) -> bool:
    return any(part in SKIP_DIRS or part.endswith(SKIP_SUFFIXES) for part in rel.parts) \
        or rel.name.endswith(SKIP_SUFFIXES)


def _tree_hash(root: Path, files: list[Path]) -> str:
    h = hashlib.sha256()
    for f in files:
        h.update(str(f.relative_to(root)).encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def build_wheel(cache: Path) -> Artifact:
    """The wheel of the running geotrain, from the cache when its sources are unchanged."""
    root = source_root()
    if root is None:
        return _repack_installed(cache)
    files = _source_files(root)
    out = cache / f"src-{_tree_hash(root, files)}"
    found = sorted(out.glob("geotrain-*.whl")) if out.is_dir() else []
    if found:
        return _artifact(found[0])
    with tempfile.TemporaryDirectory(prefix="gt-wheel-") as tmp:
        src = Path(tmp) / "src"
        for f in files:  # build from a clean copy: nothing is written into the user's tree
            dest = src / f.relative_to(root)
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(f, dest)
        wheels = Path(tmp) / "wheels"
        env = dict(os.environ, SOURCE_DATE_EPOCH=str(EPOCH), PIP_DISABLE_PIP_VERSION_CHECK="1")
        proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps",
                               "--no-build-isolation", "--wheel-dir", str(wheels), str(src)],
                              capture_output=True, text=True, env=env)
        built = sorted(wheels.glob("geotrain-*.whl"))
        if proc.returncode != 0 or not built:
            last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise BundleError(f"could not build the geotrain wheel for cloud nodes from {root}: "
                              f"{last}; check that `pip install -e {root}` works")
        out.mkdir(parents=True, exist_ok=True)
        final = out / built[0].name
        part = out / f".{built[0].name}.{os.getpid()}.part"
        shutil.copyfile(built[0], part)
        os.replace(part, final)  # whole or absent: another process may read the cache
    return _artifact(final)


def _write_whole(path: Path, data: bytes) -> None:
    """Write `path` so that a reader sees all of it or nothing (the cache is shared)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    part = path.with_name(f".{path.name}.{os.getpid()}.part")
    part.write_bytes(data)
    os.replace(part, path)


def _repack_installed(cache: Path) -> Artifact:
    """A wheel of geotrain as installed (from a wheel): its files and dist-info, with a
    fresh RECORD; scripts and caches are left out."""
    dist = metadata.distribution(DIST)
    files = sorted((f for f in dist.files or [] if not str(f).startswith("..")
                    and "__pycache__" not in str(f) and not str(f).endswith((".pyc", "RECORD",
                                                                              "INSTALLER", "REQUESTED",
                                                                              "direct_url.json"))),
                   key=str)
    h = hashlib.sha256()
    for f in files:
        h.update(str(f).encode() + b"\0" + Path(dist.locate_file(f)).read_bytes())
    name = f"geotrain-{dist.version}-py3-none-any.whl"
    out = cache / f"dist-{h.hexdigest()[:16]}" / name
    if out.exists():
        return _artifact(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    record_name = f"geotrain-{dist.version}.dist-info/RECORD"
    rows = []
    tmp = out.with_name(f".{name}.{os.getpid()}.part")
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as z:
        for f in files:
            data = Path(dist.locate_file(f)).read_bytes()
            z.writestr(zipfile.ZipInfo(str(f), date_time=(1980, 1, 1, 0, 0, 0)), data)
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            rows.append([str(f), f"sha256={digest}", str(len(data))])
        rows.append([record_name, "", ""])
        buf = io.StringIO()
        csv.writer(buf, lineterminator="\n").writerows(rows)
        z.writestr(zipfile.ZipInfo(record_name, date_time=(1980, 1, 1, 0, 0, 0)), buf.getvalue())
    tmp.replace(out)
    return _artifact(out)


# -- pinned requirements -------------------------------------------------------------

def pinned_versions(dist: str = DIST) -> dict[str, str]:
    """`{canonical name: version}` of every distribution `dist` needs on this platform,
    transitively, as installed here (local version labels dropped); `dist` itself excluded."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name
    from packaging.version import Version

    seen: dict[str, str] = {}
    todo = [(dist, frozenset())]
    while todo:
        name, extras = todo.pop()
        try:
            d = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            raise BundleError(f"cannot pin dependencies for cloud nodes: {name} is required "
                              f"but not installed here; run `pip install -e .` again") from None
        key = canonicalize_name(d.metadata["Name"])
        if key != canonicalize_name(dist):
            seen[key] = Version(d.version).public
        for raw in d.requires or []:
            req = Requirement(raw)
            env_ok = (req.marker is None
                      or any(req.marker.evaluate({"extra": e}) for e in (extras or {""})))
            if env_ok and canonicalize_name(req.name) not in seen:
                todo.append((req.name, frozenset(req.extras)))
    return dict(sorted(seen.items()))


def pins(dist: str = DIST) -> list[str]:
    """`name==version` for each of `pinned_versions(dist)`, sorted."""
    return [f"{n}=={v}" for n, v in pinned_versions(dist).items()]


def write_requirements(cache: Path, lock: Path | None = None) -> Artifact:
    """The node's requirements.txt: geotrain's pins by version, or with `lock` (the
    recipe's `train.requirements_lock`) the lock's requirements with their hashes, once
    every pin is found in it at this machine's version (geotrain/lockfile.py)."""
    if lock is None:
        text = ("# What a geotrain node installs (--no-deps): the operator's versions.\n"
                + "\n".join(pins()) + "\n")
    else:
        from geotrain.lockfile import locked_requirements

        text = locked_requirements(lock, pinned_versions(), DIST)
    digest = hashlib.sha256(text.encode()).hexdigest()[:16]
    path = cache / f"req-{digest}" / "requirements.txt"
    if not path.exists():
        _write_whole(path, text.encode())
    return _artifact(path)


# -- the user's code -----------------------------------------------------------------

def pack_code(code_dir: Path, cache: Path) -> Artifact:
    """A deterministic tar.gz of `code_dir` (sorted, fixed times and owners)."""
    if not code_dir.is_dir():
        raise BundleError(f"train.code_dir {code_dir} is not a directory; set it to the folder "
                          "that holds the module named by train.entrypoint")
    files, total = [], 0
    for dirpath, dirnames, filenames in os.walk(code_dir):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS and not d.endswith(SKIP_SUFFIXES))
        for name in sorted(filenames):
            p = Path(dirpath) / name
            if name.endswith(SKIP_SUFFIXES) or not p.is_file() or p.is_symlink():
                continue
            files.append(p)
            total += p.stat().st_size
            if total > MAX_CODE_BYTES:
                raise BundleError(f"train.code_dir {code_dir} holds more than "
                                  f"{MAX_CODE_BYTES // 2**20} MiB; point it at the folder of your "
                                  "code only (data belongs in data.paths or object storage)")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz", format=tarfile.PAX_FORMAT,
                      compresslevel=6) as tar:
        for p in sorted(files):
            info = tarfile.TarInfo(str(p.relative_to(code_dir)))
            data = p.read_bytes()
            info.size, info.mtime, info.mode = len(data), EPOCH, 0o644
            tar.addfile(info, io.BytesIO(data))
    # gzip writes the time into its header: zero it so equal trees give equal bytes.
    raw = bytearray(buf.getvalue())
    raw[4:8] = b"\0\0\0\0"
    digest = hashlib.sha256(raw).hexdigest()
    path = cache / f"code-{digest[:16]}" / "code.tar.gz"
    if not path.exists():
        _write_whole(path, bytes(raw))
    return _artifact(path)


def code_dir_of(recipe, recipe_path: str | None) -> Path | None:
    """The folder shipped as the user's code, or None when the recipe has no entrypoint."""
    if not recipe.train.entrypoint:
        return None
    explicit = getattr(recipe.train, "code_dir", None)
    if explicit:
        return Path(explicit)
    return Path(recipe_path).resolve().parent if recipe_path else Path.cwd()


def lock_of(recipe) -> Path | None:
    """The recipe's `train.requirements_lock` (resolved at load), or None."""
    lock = recipe.train.requirements_lock
    return Path(lock) if lock else None


# -- the whole bundle ---------------------------------------------------------------

def needs_bundle(recipe) -> bool:
    """Whether any placement of the recipe (candidates included) is a node elsewhere."""
    from providers import capabilities_of

    return any(not capabilities_of(p.provider).runs_here for s in recipe.sites for p in s.placements())


def cache_dir(home: Path | None = None) -> Path:
    """Where packed artifacts are kept: $GEOTRAIN_BUNDLE_CACHE, else <home>/bundles.
    Every entry is named by the hash of what it was made from and written whole (a
    rename), so one cache may serve several homes and processes at once."""
    from geotrain.recipe import default_home

    shared = os.environ.get("GEOTRAIN_BUNDLE_CACHE")
    return Path(shared) if shared else Path(home or default_home()) / "bundles"


def prepare(recipe, recipe_path: str | None, home: Path | None = None) -> Bundle:
    cache = cache_dir(home)
    code = code_dir_of(recipe, recipe_path)
    lock = lock_of(recipe)
    requirements = write_requirements(cache, lock)  # a lock that does not fit: refused first
    return Bundle(wheel=build_wheel(cache), requirements=requirements,
                  code=pack_code(code, cache) if code else None, hashed=lock is not None)


def publish(store, bundle: Bundle) -> None:
    """Upload what the store does not hold yet (keys are content hashes)."""
    for a in bundle.artifacts():
        if not store.exists(a.key):
            store.put(a.key, a.path.read_bytes())


def boot_options(store, bundle: Bundle, ttl_s: int = URL_TTL_S) -> tuple[tuple[str, str], ...]:
    """The SitePlan options the boot script reads: where to GET each object and its
    sha256 (`wheel_*`, `requirements_*`, `code_*`). A signed URL; on a gs:// or az://
    store whose operator credentials cannot sign (a user's or a managed identity's
    token, no account key), the object's gs:// or az:// URL, which a GCE or Azure node
    reads with its own identity. An az:// store adds `store_account`, its storage
    account (the URL names only the container)."""
    from geotrain.errors import StoreError

    out = [("store_account", store.azure_account)] if store.azure_account else []
    for role, a in (("wheel", bundle.wheel), ("requirements", bundle.requirements),
                    ("code", bundle.code)):
        if a is None:
            continue
        try:
            url = store.sign(a.key, ttl_s)
        except StoreError:
            if store.scheme not in ("gs", "az"):
                raise
            url = store.object_url(a.key)
        out += [(f"{role}_url", url), (f"{role}_sha256", a.sha256), (f"{role}_name", a.name)]
    if bundle.hashed:
        out.append(("requirements_hashes", "true"))
    return tuple(out)


def unpack(archive: Path, dest: Path) -> int:
    """Extract a code archive made by `pack_code` on a node: regular files only, every
    path inside `dest` (no absolute paths, no `..`, no links). Returns the file count."""
    dest = dest.resolve()
    count = 0
    with tarfile.open(archive, mode="r:gz") as tar:
        for m in tar:
            target = (dest / m.name).resolve()
            if not m.isfile() or os.path.isabs(m.name) or not target.is_relative_to(dest):
                raise BundleError(f"code archive member {m.name!r} is not a plain file inside "
                                  "the code folder; refusing the archive")
            target.parent.mkdir(parents=True, exist_ok=True)
            src = tar.extractfile(m)
            with open(target, "wb") as f:
                shutil.copyfileobj(src, f)
            count += 1
    return count


def main(argv: list[str] | None = None) -> int:
    """`python -m geotrain.bundle unpack ARCHIVE DEST` (run by the node boot script)."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 3 or args[0] != "unpack":
        print("usage: python -m geotrain.bundle unpack ARCHIVE DEST", file=sys.stderr)
        return 2
    try:
        n = unpack(Path(args[1]), Path(args[2]))
    except (BundleError, tarfile.TarError, OSError) as e:
        print(f"geotrain boot: {e}", file=sys.stderr)
        return 1
    print(f"geotrain boot: code unpacked ({n} files)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
