"""benchmarks/gpu_kit.py: the wheels a bare GPU machine lacks, found from the
installed requirements, and Ray's wheel slimmed so that pip still installs it.

    python -m pytest tests/test_gpu_kit.py -q
"""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from benchmarks import gpu_kit

pytestmark = pytest.mark.timeout(120)


def test_the_closure_keeps_what_the_image_lacks_and_nothing_it_has():
    kit = gpu_kit.needed(("pydantic", "ray"), "3.12")
    # pydantic's own needs come along; typing-extensions although the image has one (ALWAYS).
    assert {"pydantic", "pydantic-core", "annotated-types", "typing-inspection",
            "typing-extensions"} <= set(kit)
    # Ray's: jsonschema and what it needs, and click (ALWAYS); not what the image holds.
    assert {"ray", "jsonschema", "referencing", "rpds-py", "click"} <= set(kit)
    assert not {"requests", "msgpack", "pyyaml", "protobuf", "urllib3", "idna"} & set(kit)
    assert "torch" not in gpu_kit.needed(("safetensors", "numpy"), "3.12")
    from importlib import metadata
    assert kit["ray"] == metadata.version("ray")  # the version CI tests with


def test_markers_are_those_of_the_target_python():
    req = Requirement('tomli>=1; python_version < "3.11"')
    assert req.marker.evaluate({**gpu_kit.target_environment("3.10"), "extra": ""})
    assert not req.marker.evaluate({**gpu_kit.target_environment("3.12"), "extra": ""})


def test_a_missing_root_is_one_line_naming_it():
    with pytest.raises(gpu_kit.KitError, match="no-such-package-xyz is not installed"):
        gpu_kit.needed(("no-such-package-xyz",), "3.12")


def _fake_ray_wheel(folder: Path) -> Path:
    wheel = folder / "ray-9.9.9-py3-none-any.whl"
    files = {"ray/__init__.py": b"VERSION = '9.9.9'\n",
             "ray/jars/ray_dist.jar": b"\0" * 50_000,
             "ray/dashboard/__init__.py": b"",
             "ray/dashboard/client/build/static/main.js.map": b"x" * 50_000}
    info = "ray-9.9.9.dist-info/"
    meta = {info + "METADATA": b"Metadata-Version: 2.1\nName: ray\nVersion: 9.9.9\n",
            info + "WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                            b"Tag: py3-none-any\n"}
    record = "".join(f"{name},{gpu_kit._record_hash(data)},{len(data)}\n"
                     for name, data in {**files, **meta}.items()) + f"{info}RECORD,,\n"
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_STORED) as z:
        for name, data in {**files, **meta, info + "RECORD": record.encode()}.items():
            z.writestr(name, data)
    return wheel


def test_slimmed_ray_wheel_drops_the_jar_and_web_client_and_still_installs(tmp_path):
    wheel = _fake_ray_wheel(tmp_path)
    saved = gpu_kit.slim_wheel(wheel)
    assert saved > 0
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        record = z.read("ray-9.9.9.dist-info/RECORD").decode()
    assert "ray/__init__.py" in names and "ray/dashboard/__init__.py" in names
    assert not any(n.startswith(gpu_kit.RAY_DROP) for n in names)
    assert "jars" not in record and "client/build" not in record
    assert gpu_kit.slim_wheel(wheel) == 0  # once is enough
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
                    "--target", str(target), str(wheel)], check=True, capture_output=True,
                   timeout=100)
    assert (target / "ray/__init__.py").read_text() == "VERSION = '9.9.9'\n"
    assert not (target / "ray/jars").exists()
