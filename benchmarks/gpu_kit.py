"""The wheels a bare GPU machine lacks to run benchmarks/gpu.sh, built here to be carried there.

A lent GPU machine (the `device` tool's `nvidia-h200`) reaches no package
index. Its image's `python3` holds a CUDA build of torch and much else
(numpy, pytest, typer, rich, PyYAML ...; `IMAGE`), but not Ray, pydantic or
cryptography, and the device tool carries at most 64 MiB of files there,
the repository included. This script, run on a machine with an index:

1. walks the requirements of `ROOTS` (geotrain's needs for local sites, the
   tests and the benchmark; not the cloud SDKs, which local sites never
   import) through the packages installed beside it, and keeps what `IMAGE`
   lacks, plus `ALWAYS` (small pure-Python packages that geotrain's code
   calls, whose versions on the image are unknown);
2. downloads each one's wheel for the target Python and platform, at the
   version installed here (the one CI tests with);
3. rewrites Ray's wheel without its Java jar and its dashboard's web client
   (`RAY_DROP`; geotrain starts Ray with the dashboard off and no Java
   workers), which takes it from about 79 MB to about 40;
4. checks that the wheels and the repository's tracked files fit under the
   carry limit, and prints what it built.

    python benchmarks/gpu_kit.py --out .whl      # for the nvidia-h200 image: CPython 3.12, x86-64
    echo /.whl/ >> .git/info/exclude             # carried, not committed

benchmarks/gpu.sh installs `.whl` into a folder of its own on the GPU
machine (pip --no-index --target) before anything else. Exit 1 with one
line when a wheel cannot be had or the kit does not fit.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import subprocess
import sys
import zipfile
from importlib import metadata
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename
from packaging.version import Version

# What geotrain imports to run local sites on a GPU, its GPU tests and benchmarks/train.py.
ROOTS = ("ray", "pydantic", "cryptography", "fsspec", "pyyaml", "typer", "rich", "safetensors",
         "packaging", "numpy", "pytest", "pytest-timeout", "pytest-xdist")
# Of geotrain's needs, what the nvidia-h200 image holds (device/KINDS.md, as read on 2026-11-17).
IMAGE = frozenset(canonicalize_name(n) for n in """
    aiohappyeyeballs aiohttp aiosignal annotated-doc attrs certifi charset-normalizer click
    colorama execnet filelock frozenlist fsspec grpcio idna iniconfig markdown-it-py mdurl
    msgpack multidict numpy packaging pluggy propcache protobuf psutil pygments pytest
    pytest-timeout pytest-xdist pyyaml requests rich safetensors shellingham six torch typer
    typing-extensions urllib3 yarl""".split())
# Carried even so, at the versions CI tests (small, pure Python, the image's versions
# unknown): what geotrain's own code calls. It needs fsspec>=2026.9, typer>=0.12.
ALWAYS = frozenset({"fsspec", "typing-extensions", "typer", "click", "rich", "shellingham",
                    "annotated-doc", "markdown-it-py", "mdurl", "pygments", "packaging",
                    "filelock"})
# Dropped from Ray's wheel: Java workers' jar, the dashboard's browser client.
RAY_DROP = ("ray/jars/", "ray/dashboard/client/build/")
CARRY_LIMIT = 64 * 2**20
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux1_x86_64")


class KitError(Exception):
    """What stops the kit, in one line."""


def target_environment(python: str) -> dict[str, str]:
    """The marker environment of CPython `python` ('3.12') on x86-64 Linux."""
    env = default_environment()
    env.update(python_version=python, python_full_version=f"{python}.0", implementation_name="cpython",
               platform_python_implementation="CPython", sys_platform="linux",
               platform_system="Linux", platform_machine="x86_64", os_name="posix")
    return env


def needed(roots: tuple[str, ...], python: str, image: frozenset[str] = IMAGE,
           always: frozenset[str] = ALWAYS) -> dict[str, str]:
    """{name: installed version} of every package in the requirement closure of
    `roots` (as installed here, extras left out, markers for the target Python)
    that `image` lacks or `always` names."""
    env, seen, todo = target_environment(python), {}, [canonicalize_name(r) for r in roots]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            raise KitError(f"{name} is not installed beside this script; install geotrain "
                           f"with its test extra here first") from None
        seen[name] = dist.version
        for line in dist.requires or ():
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate({**env, "extra": ""}):
                todo.append(canonicalize_name(req.name))
    return {n: v for n, v in sorted(seen.items()) if n not in image or n in always}


def download(packages: dict[str, str], python: str, out: Path) -> list[Path]:
    """Each package's wheel for CPython `python` on manylinux x86-64 into `out`."""
    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
           "--python-version", python, "--implementation", "cp", "--dest", str(out)]
    for p in PLATFORMS:
        cmd += ["--platform", p]
    proc = subprocess.run(cmd + [f"{n}=={v}" for n, v in packages.items()], capture_output=True,
                          text=True)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["pip download failed"])[-1]
        raise KitError(f"pip download: {last}")
    wheels = {}
    for w in out.glob("*.whl"):  # the requested version of each (an older one may lie beside it)
        name, version, _, _ = parse_wheel_filename(w.name)
        if name in packages and Version(packages[name]) == version:
            wheels[name] = w
    missing = sorted(set(packages) - set(wheels))
    if missing:
        raise KitError(f"no wheel came for {', '.join(missing)}")
    return [wheels[n] for n in packages]


def _record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def slim_wheel(wheel: Path, drop: tuple[str, ...] = RAY_DROP) -> int:
    """Rewrite `wheel` in place without the files under `drop` (and their RECORD
    lines); returns the bytes saved. A wheel already without them is left as is."""
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        if not any(n.startswith(drop) for n in names):
            return 0
        before = wheel.stat().st_size
        tmp = wheel.with_suffix(".tmp")
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as out:
            for info in z.infolist():
                if info.filename.startswith(drop):
                    continue
                data = z.read(info)
                if info.filename.endswith(".dist-info/RECORD"):
                    lines = data.decode().splitlines()
                    data = ("\n".join(l for l in lines if not l.startswith(drop)) + "\n").encode()
                out.writestr(info, data, compress_type=zipfile.ZIP_DEFLATED, compresslevel=9)
    tmp.replace(wheel)
    return before - wheel.stat().st_size


def tracked_bytes(repo: Path) -> int:
    """What the repository's tracked files weigh (they travel with the kit)."""
    files = subprocess.run(["git", "ls-files", "-z"], cwd=repo, capture_output=True,
                           check=True).stdout.decode().split("\0")
    return sum((repo / f).stat().st_size for f in files if f and (repo / f).is_file())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path(".whl"), help="folder for the wheels (.whl)")
    ap.add_argument("--python", default="3.12", help="the GPU machine's Python (3.12 on nvidia-h200)")
    ap.add_argument("--limit-mib", type=float, default=CARRY_LIMIT / 2**20,
                    help="what may travel, repository included (64)")
    args = ap.parse_args(argv)
    try:
        packages = needed(ROOTS, args.python)
        wheels = download(packages, args.python, args.out)
        for w in args.out.glob("*.whl"):  # one version of each, nothing else: gpu.sh installs all
            if w not in wheels:
                w.unlink()
        saved = sum(slim_wheel(w) for w in wheels if w.name.startswith("ray-"))
        kit = sum(w.stat().st_size for w in wheels)
        repo = tracked_bytes(Path(__file__).resolve().parent.parent)
        for w in wheels:
            print(f"{w.stat().st_size / 2**20:7.1f} MiB  {w.name}")
        print(f"{kit / 2**20:.1f} MiB of wheels ({saved / 2**20:.1f} MiB cut from Ray), "
              f"{repo / 2**20:.1f} MiB of repository: {(kit + repo) / 2**20:.1f} of "
              f"{args.limit_mib:.0f} MiB")
        if kit + repo > args.limit_mib * 2**20:
            raise KitError(f"the kit and the repository weigh {(kit + repo) / 2**20:.1f} MiB, over "
                           f"the {args.limit_mib:.0f} MiB that may travel")
    except KitError as e:
        print(f"gpu_kit: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
