"""A requirements lock with hashes (`train.requirements_lock`): read it, check it against
what geotrain pins, and write what a cloud node installs with `pip --require-hashes`.

The standard tools make such a lock: `pip-compile --generate-hashes`,
`uv pip compile --generate-hashes`, `uv export --format requirements-txt
--no-emit-project`. It lists every file of each pinned version (every platform), so a
GPU node can install its own build (torch's CUDA wheel) and pip still checks that file's
sha256. geotrain/bundle.py calls `locked_requirements()` at launch; everything here is
refused with one line (a BundleError) before anything is created.

The format is pip's: `\\` continues a line, `#` after a space starts a comment,
options follow the requirement (`--hash=sha256:HEX`), and a line of its own may name
where pip looks (`--index-url`, `--extra-index-url`, `--find-links`, `--no-index`).
Every requirement must pin `==` one exact version and carry at least one sha256.
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from pathlib import Path

from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from geotrain.bundle import BundleError

OPTION = "train.requirements_lock"
# Where pip looks: harmless under --require-hashes (every file is checked), and a CUDA
# build of torch lives on its own index.
INDEX_OPTIONS = ("--index-url", "-i", "--extra-index-url", "--find-links", "-f", "--no-index")
HOW = "make it with `pip-compile --generate-hashes` or `uv pip compile --generate-hashes`"


class LockError(BundleError):
    """The requirements lock cannot be used."""


@dataclass(frozen=True)
class Locked:
    """One requirement of the lock: its line number, the requirement, its hashes."""
    line: int
    req: Requirement
    hashes: tuple[str, ...]  # "sha256:HEX", as given

    @property
    def name(self) -> str:
        return canonicalize_name(self.req.name)

    @property
    def version(self) -> str:
        return next(iter(self.req.specifier)).version

    def applies(self) -> bool:
        """Whether its environment marker holds here (the operator's Python and platform)."""
        return self.req.marker is None or self.req.marker.evaluate({"extra": ""})

    def text(self) -> str:
        return " ".join([str(self.req), *(f"--hash={h}" for h in self.hashes)])


@dataclass(frozen=True)
class Lock:
    index_options: tuple[str, ...]
    requirements: tuple[Locked, ...]


def logical_lines(text: str) -> list[tuple[int, str]]:
    """(first line number, text) of each non-empty line: continuations joined, comments
    (a `#` at the start or after whitespace) removed, as pip reads them."""
    out: list[tuple[int, str]] = []
    buf, start = "", 0
    for n, raw in enumerate(text.splitlines(), 1):
        line = _strip_comment(raw)
        if not buf:
            start = n
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        if buf.strip():
            out.append((start, " ".join(buf.split())))
        buf = ""
    if buf.strip():
        out.append((start, " ".join(buf.split())))
    return out


def _strip_comment(line: str) -> str:
    for i, c in enumerate(line):
        if c == "#" and (i == 0 or line[i - 1] in string.whitespace):
            return line[:i].rstrip()
    return line.rstrip()


def parse(text: str, where: str) -> Lock:
    """The lock in `text`; `where` names it in errors (`train.requirements_lock PATH`)."""
    index, reqs = [], []
    for n, line in logical_lines(text):
        at = f"{where}, line {n}"
        tokens = line.split(" ")
        if tokens[0].startswith("-"):
            option = tokens[0].split("=", 1)[0]
            if option not in INDEX_OPTIONS:
                hint = (" (the project itself: export without it, e.g. `uv export "
                        "--no-emit-project`)" if option in ("-e", "--editable") else "")
                raise LockError(f"{at}: `{line[:80]}` is not a pinned requirement{hint}; a lock "
                                f"holds `name==version --hash=sha256:...` lines and index options "
                                f"({', '.join(o for o in INDEX_OPTIONS if o.startswith('--'))})")
            index.append(line)
            continue
        first_option = next((i for i, t in enumerate(tokens) if t.startswith("-")), len(tokens))
        spec, options = " ".join(tokens[:first_option]), tokens[first_option:]
        try:
            req = Requirement(spec)
        except InvalidRequirement as e:
            said = str(e).splitlines()[0]  # packaging adds the text and a caret below
            raise LockError(f"{at}: `{spec[:80]}` is not a requirement ({said})") from None
        pins = list(req.specifier)
        if req.url or len(pins) != 1 or pins[0].operator != "==" or "*" in pins[0].version:
            raise LockError(f"{at}: `{spec[:80]}` pins no exact version; every requirement of a "
                            f"lock is `name==version` with its hashes: {HOW}")
        hashes = _hashes(options, at, req.name)
        reqs.append(Locked(n, req, hashes))
    return Lock(tuple(index), tuple(reqs))


def _hashes(options: list[str], at: str, name: str) -> tuple[str, ...]:
    found, i = [], 0
    while i < len(options):
        opt = options[i]
        if opt == "--hash" and i + 1 < len(options):
            value, i = options[i + 1], i + 2
        elif opt.startswith("--hash="):
            value, i = opt[len("--hash="):], i + 1
        else:
            raise LockError(f"{at}: {name}: option `{opt}` is not a hash; a lock line is "
                            "`name==version --hash=sha256:HEX ...`")
        algo, _, digest = value.partition(":")
        if not digest or any(c not in string.hexdigits for c in digest):
            raise LockError(f"{at}: {name}: `--hash={value[:80]}` is not `ALGORITHM:HEX`")
        if algo == "sha256" and len(digest) != 64:
            raise LockError(f"{at}: {name}: sha256 `{digest[:80]}` is not 64 hex digits")
        found.append(f"{algo}:{digest.lower()}")
    if not any(h.startswith("sha256:") for h in found):
        raise LockError(f"{at}: {name} has no --hash=sha256:...; a node checks every file it "
                        f"installs against the lock: {HOW}")
    return tuple(found)


def check_pins(lock: Lock, pinned: dict[str, str], where: str) -> None:
    """Every distribution geotrain pins (`{canonical name: operator's public version}`)
    appears in the lock at that version, for this platform's markers."""
    for name, version in sorted(pinned.items()):
        here = [r for r in lock.requirements if r.name == name and r.applies()]
        if not here:
            raise LockError(f"{where} has no line for {name} (geotrain needs it; this machine "
                            f"runs {name} {version}): add {name}=={version} with its hashes to "
                            f"the lock, e.g. regenerate it with geotrain among its inputs")
        if len(here) > 1:
            lines = ", ".join(str(r.line) for r in here)
            raise LockError(f"{where} lists {name} more than once for this platform (lines "
                            f"{lines}); keep one line per distribution")
        if Version(here[0].version).public != version:
            raise LockError(f"{where} pins {name}=={here[0].version} (line {here[0].line}) "
                            f"but this machine runs {name} {version}: nodes run the versions "
                            f"you run; regenerate the lock with {name}=={version}, or install "
                            f"{name}=={here[0].version} here")


def locked_requirements(path: Path, pinned: dict[str, str], own: str) -> str:
    """The node's requirements file from the lock at `path`: index options first, then
    every requirement with its hashes, one line each, comments gone. A line for `own`
    (geotrain itself) is left out: the node installs the operator's own wheel."""
    where = f"{OPTION} {path}"
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise LockError(f"{where} cannot be read ({e.__class__.__name__}: "
                        f"{getattr(e, 'strerror', None) or e}); set {OPTION} to a lock file "
                        f"with hashes, relative to the recipe's folder") from None
    lock = parse(text, where)
    check_pins(lock, pinned, where)
    body = [r.text() for r in lock.requirements if r.name != canonicalize_name(own)]
    return ("# What a geotrain node installs (--require-hashes), from the operator's lock.\n"
            + "".join(f"{line}\n" for line in (*lock.index_options, *body)))
