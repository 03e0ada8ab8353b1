"""A stand-in cloud node: what a real VM does with the boot data it was created with.

The stand-in clouds (moto EC2, tests/fakes/gce_server.py, tests/fakes/arm_server.py)
create instances; `BootedNode` is what makes one of them boot. It runs the instance's
boot script (AWS user data, GCE `startup-script`, Azure custom data) with `bash`, as
its own process tree, in its own root directory (the boot script puts /opt and
/var/log under `$GEOTRAIN_NODE_ROOT`), with a clean environment: no credential of
the test process, only what the stand-in gives the instance (the address of its
metadata service, the network route to the store emulator) and the node image's
Python first on PATH.

The node image (`node_image`) is a Python with geotrain's dependencies already
installed, as a GPU image ships torch: `python3` is this machine's base interpreter,
and the image's packages are the test environment's site-packages, given to every
process of the node by PYTHONPATH (the venv the boot creates sees them, as a real
node's `venv --system-site-packages` sees an image's). geotrain itself is *not*
importable from there (an editable install is a .pth file that a PYTHONPATH entry
does not run), so a node runs geotrain only if its boot really installed the wheel.

Where the machine allows it, the node has its own network (tests/fakes/netns.py): a
namespace with a loopback only, from which the services its boot data names — every
`127.0.0.1:PORT` in its script and environment — are relayed over a shaped link, and
nothing else on this machine is reachable; `network` says which it got ("isolated" or
"host") and `link` (isolated only) counts what crossed it. A node given a `nic` (the
private address its cloud assigned it, on its cloud network's switch) also has an
`eth0` with that address, on which it reaches the other nodes of its network and no
others: a multi-node site's Ray cluster runs there. `private_ip` is the address its
metadata service must answer: the nic's, or 127.0.0.1 on this machine's network.

Every process of a node carries `GEOTRAIN_STANDIN_NODE=<instance id>` in its
environment; `stop()` signals exactly those (SIGTERM, then SIGKILL after a grace
period), never anything found by name, so terminating an instance ends its whole tree,
Ray included, and nothing else.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

from tests.fakes import netns

TAG = "GEOTRAIN_STANDIN_NODE"


def node_image(directory: Path) -> Path:
    """A node image's bin directory (BootedNode puts it first on PATH): `python3` is
    this machine's base interpreter."""
    bin_dir = directory / "bin"
    bin_dir.mkdir(parents=True, exist_ok=True)
    py = bin_dir / "python3"
    if not py.exists():
        py.symlink_to(os.path.realpath(getattr(sys, "_base_executable", sys.executable)))
    return bin_dir


def image_packages() -> str:
    """PYTHONPATH of a node image: the test environment's installed packages."""
    paths = sysconfig.get_paths()
    return os.pathsep.join(dict.fromkeys([paths["purelib"], paths["platlib"]]))


def tagged_pids(instance_id: str) -> list[int]:
    """Live processes of this machine started by the node `instance_id`."""
    needle = f"{TAG}={instance_id}\0".encode()
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            raw = Path(f"/proc/{entry}/environ").read_bytes() + b"\0"
            state = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[-1].split()[0]
        except OSError:
            continue
        if needle in raw and state != "Z":
            out.append(int(entry))
    return out


class BootedNode:
    """One instance's boot script running as a process tree under `root`."""

    def __init__(self, instance_id: str, script: str, root: Path, image_bin: Path,
                 env: dict[str, str] | None = None, nic: netns.Nic | None = None):
        self.instance_id = instance_id
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        (root / "home").mkdir(exist_ok=True)
        # Short: Ray's socket paths under it must stay within AF_UNIX's 107 bytes.
        self.tmp = Path(tempfile.mkdtemp(prefix="gtn-", dir="/tmp"))
        self.script = root / "boot.sh"
        self.script.write_text(script)
        self.console = root / "console.log"
        self.env = {
            "PATH": f"{image_bin}:/usr/local/bin:/usr/bin:/bin",
            "HOME": str(root / "home"), "TMPDIR": str(self.tmp), "LANG": "C.UTF-8",
            "GEOTRAIN_NODE_ROOT": str(root), TAG: instance_id, "PYTHONPATH": image_packages(),
            # Never the operator's: a node must not be mistaken for a local site.
            "GEOTRAIN_HOME": str(root / "home" / ".geotrain"),
            **(env or {})}
        self.proc: subprocess.Popen | None = None
        self.network = "isolated" if netns.use_isolated() else "host"
        self.nic = nic if self.network == "isolated" else None
        self.private_ip = self.nic.address if self.nic else "127.0.0.1"
        self.link: netns.Namespace | None = None

    def start(self) -> BootedNode:
        argv, fds = ["bash", str(self.script)], ()
        if self.network == "isolated":
            self.link = netns.Namespace(netns.ports_named(self.script.read_text(),
                                                          *self.env.values()), nic=self.nic)
            argv, fds = self.link.command(argv)
        with open(self.console, "ab") as console:
            self.proc = subprocess.Popen(argv, cwd=self.root, env=self.env, pass_fds=fds,
                                         stdin=subprocess.DEVNULL, stdout=console,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        return self

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def console_text(self) -> str:
        return self.console.read_text(errors="replace") if self.console.exists() else ""

    def stop(self, grace_s: float = 15.0) -> None:
        """End every process of this node: SIGTERM (a shutdown), then SIGKILL."""
        for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 10.0)):
            for pid in tagged_pids(self.instance_id):
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + wait_s
            while time.monotonic() < deadline:
                if self.proc is not None:
                    self.proc.poll()
                if not tagged_pids(self.instance_id):
                    break
                time.sleep(0.2)
        if self.proc is not None:
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        if self.link is not None:
            self.link.close()
        if not tagged_pids(self.instance_id):
            shutil.rmtree(self.tmp, ignore_errors=True)
