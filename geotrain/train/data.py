"""Training data as bytes: which files, which of them a site reads, and batches drawn from them.

Everything here is deterministic and cheap to start. The file list is built
from names alone; a site reads only the files of its own shard.

    files = stdlib_files()                     # or glob_files(["data/**/*.txt", "s3://b/corpus/*.txt"])
    train, held_out = split(files, eval_fraction=0.02, seed=0)
    data = load_bytes(shard(train, index=site, count=n_sites))
    batches = Batches(data, batch_size=16, seq_len=256, seed=site)
    x, y = batches.next()
"""

from __future__ import annotations

import glob
import hashlib
import os
import re
import sysconfig
from pathlib import Path

import fsspec
import torch

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+://")

_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "__pycache__"}
_SKIP_PATHS = {"idlelib/idle_test"}


def stdlib_files() -> list[Path]:
    """The running interpreter's standard-library `.py` files, sorted by path relative to the stdlib.

    Installed packages and the stdlib's own test suites are left out, and so
    is any file this process may not read.
    """
    root = sysconfig.get_paths()["stdlib"]
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = os.path.relpath(dirpath, root).replace(os.sep, "/")
        # Prune in place so os.walk never descends into site-packages (often huge).
        dirnames[:] = [
            d for d in dirnames
            if d not in _SKIP_DIRS and f"{rel_dir}/{d}".removeprefix("./") not in _SKIP_PATHS
        ]
        for name in filenames:
            path = os.path.join(dirpath, name)
            if name.endswith(".py") and os.path.isfile(path) and os.access(path, os.R_OK):
                found.append(Path(path))
    # Every path shares the stdlib prefix, so this is the order of relative paths.
    return sorted(found)


def is_url(pattern: str | Path) -> bool:
    """Whether a data path is an fsspec URL (s3://, gs://, az://, file://, ...), not a local path."""
    return isinstance(pattern, str) and bool(_URL.match(pattern))


def glob_files(patterns: list[str]) -> list[Path | str]:
    """Files matched by the glob patterns (`**` recurses), sorted and without duplicates:
    local paths as Paths, fsspec URLs (object storage, read with the machine's own
    credentials chain) as URL strings."""
    files: set[Path | str] = set()
    for pattern in patterns:
        if is_url(pattern):
            fs, path = fsspec.core.url_to_fs(pattern)
            found = fs.glob(path, detail=True)
            scheme = pattern.split("://", 1)[0]  # the user's own spelling (az://, not abfs://)
            matched = [f"{scheme}://{name if scheme == 'file' else name.lstrip('/')}" for name, info in sorted(found.items())
                       if info.get("type") == "file"]
        else:
            matched = [Path(p) for p in glob.glob(os.path.expanduser(pattern), recursive=True)]
            matched = [p for p in matched if p.is_file()]
        if not matched:
            raise ValueError(f"data pattern {pattern!r} matches no files")
        files.update(matched)
    return sorted(files, key=str)


def _name(f: Path | str) -> str:
    """A file's name for splitting: a URL's path without its scheme, else the absolute path."""
    if is_url(f):
        return "/" + str(f).split("://", 1)[1].lstrip("/")
    return os.path.abspath(f)


def _unit_hash(*parts: object) -> float:
    """A number in [0, 1) from its parts, the same in every process and on every machine."""
    digest = hashlib.sha256("\0".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split(files: list[Path], eval_fraction: float, seed: int) -> tuple[list[Path], list[Path]]:
    """Split files into (train, eval) by a hash of the seed and each file's relative name.

    Names are taken relative to the files' common folder, so the same tree
    splits the same way wherever it is installed. Eval is never empty: if no
    file falls under `eval_fraction`, the one with the lowest hash goes there.
    """
    if not files:
        raise ValueError("cannot split an empty list of files")
    root = os.path.commonpath([os.path.dirname(_name(f)) for f in files])
    scores = [_unit_hash(seed, Path(os.path.relpath(_name(f), root)).as_posix()) for f in files]
    held_out = {i for i, s in enumerate(scores) if s < eval_fraction}
    if not held_out:
        held_out = {min(range(len(files)), key=scores.__getitem__)}
    train = [f for i, f in enumerate(files) if i not in held_out]
    evals = [f for i, f in enumerate(files) if i in held_out]
    return train, evals


def shard(files: list[Path], index: int, count: int) -> list[Path]:
    """Shard `index` of `count`: every count-th file of the sorted list, so shards partition it."""
    if not 0 <= index < count:
        raise ValueError(f"shard index {index} is not in [0, {count})")
    return sorted(files, key=str)[index::count]


def load_bytes(files: list[Path], max_bytes: int | None = None) -> torch.Tensor:
    """The files' bytes, each followed by a newline, as one uint8 tensor; reading stops at `max_bytes`."""
    buf = bytearray()
    for path in files:
        if max_bytes is not None and len(buf) >= max_bytes:
            break
        if is_url(path):
            with fsspec.open(path, "rb") as f:
                buf += f.read()
        else:
            buf += Path(path).read_bytes()
        buf += b"\n"
    if max_bytes is not None:
        del buf[max_bytes:]
    if not buf:
        return torch.empty(0, dtype=torch.uint8)
    return torch.frombuffer(buf, dtype=torch.uint8)


def _windows(data: torch.Tensor, starts: torch.Tensor, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    chunk = data[starts[:, None] + torch.arange(seq_len + 1)].long()
    return chunk[:, :-1], chunk[:, 1:]


class Batches:
    """Random windows of seq_len+1 bytes from a byte tensor, reproducible from a seed.

    Batch k depends only on (seed, k), so the stream's whole state is two
    integers and a run resumes it exactly from `state_dict()`.
    """

    def __init__(self, data: torch.Tensor, batch_size: int, seq_len: int, seed: int):
        if data.numel() < seq_len + 1:
            raise ValueError(f"{data.numel()} bytes of data is too few for windows of {seq_len + 1}")
        self.data = data
        self.batch_size = batch_size
        self.seq_len = seq_len
        self.seed = seed
        self.step = 0
        self._gen = torch.Generator()

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B,T] and y [B,T], y being x shifted one byte ahead (int64, on the CPU)."""
        self._gen.manual_seed(int(_unit_hash(self.seed, self.step) * 2**63))
        self.step += 1
        high = self.data.numel() - self.seq_len
        starts = torch.randint(0, high, (self.batch_size,), generator=self._gen)
        return _windows(self.data, starts, self.seq_len)

    def state_dict(self) -> dict:
        return {"seed": self.seed, "step": self.step}

    def load_state_dict(self, d: dict) -> None:
        self.seed = int(d["seed"])
        self.step = int(d["step"])


def eval_batches(data: torch.Tensor, batch_size: int, seq_len: int, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`n` fixed batches of windows spaced evenly over the data: no RNG, the same on every machine."""
    last = data.numel() - seq_len - 1
    if last < 0:
        raise ValueError(f"{data.numel()} bytes of data is too few for windows of {seq_len + 1}")
    count = n * batch_size
    starts = torch.tensor([i * last // max(1, count - 1) for i in range(count)])
    return [_windows(data, s, seq_len) for s in starts.split(batch_size)]
