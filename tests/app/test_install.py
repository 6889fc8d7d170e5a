"""The project installed non-editable, run from outside the checkout, serves what the checkout ships.

A fresh virtualenv gets the wheel built from this tree (no source folders on its path); its dependencies come
from the test environment's site-packages, appended to its path by a .pth line, so nothing is downloaded.
From a temporary directory it must find the shipped adapter registry, the fusion tuning and the demo corpus
inside the installed package, and serve the shipped adapter.
"""

import json
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

from app.settings import Settings, read_retrieval_tuning
from generation.adapters import AdapterRegistry

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]

PROBE = """
import json, app
from app.cli.common import DEMO_CORPUS
from app.container import build_generator
from app.settings import Settings
settings = Settings(_env_file=None, data_dir="data", model_cache_dir={cache!r})
print(json.dumps({{"package": app.__file__, "adapters": str(settings.adapters_path), "adapter": settings.adapter,
                  "tuned": settings.tuned_fields, "demo": sorted(p.name for p in DEMO_CORPUS.iterdir()),
                  "served": build_generator(settings).adapter_name}}))
"""


def test_a_non_editable_install_serves_the_shipped_adapter_and_tuning(tmp_path):
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet", "-w",
                    str(wheels), str(REPO)], check=True, capture_output=True, timeout=600)
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    (Path(site) / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")  # dependencies, not the project
    subprocess.run([str(python), "-m", "pip", "install", "--no-deps", "--quiet", *map(str, wheels.glob("*.whl"))],
                   check=True, capture_output=True, timeout=600)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    probe = PROBE.format(cache=str(REPO / ".cache" / "models"))
    result = subprocess.run([str(python), "-c", probe], cwd=elsewhere, capture_output=True, text=True, timeout=600,
                            env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr[-3000:]
    found = json.loads(result.stdout.strip().splitlines()[-1])

    checkout = Settings(_env_file=None)
    assert found["package"].startswith(site) and not found["package"].startswith(str(REPO))  # not the checkout
    assert found["adapters"].startswith(site)
    assert found["adapter"] == checkout.adapter
    assert found["served"] == AdapterRegistry(checkout.adapters_path).resolve(checkout.adapter).label
    assert found["tuned"] == read_retrieval_tuning(checkout.retrieval_tuning) and found["tuned"]
    assert found["demo"] == sorted(p.name for p in (REPO / "demo" / "corpus").iterdir())
