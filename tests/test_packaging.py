"""The wheel holds every module and data file the code needs: built, installed apart
from the source tree, and every module imported from the installed copy."""
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("probes", "calibration", "exporters", "monitor")


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"  # a copy, so setuptools' build/ never lands in the checkout
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".git", ".venv", "runs", "build", "*.egg-info",
                                                              "__pycache__", ".pytest_cache", ".hypothesis"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp / "dist"), str(src)], check=True, capture_output=True)
    wheel, = (tmp / "dist").glob("emoprobe-*.whl")
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(tmp / "site"),
                    str(wheel)], check=True, capture_output=True)
    return wheel, tmp / "site"


def source_modules() -> list[str]:
    return sorted(".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
                  for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")
                  if "samples" not in p.parts or p.name == "__init__.py")


def test_wheel_has_every_module_and_data_file(installed):
    wheel, _ = installed
    names = set(zipfile.ZipFile(wheel).namelist())
    for mod in source_modules():
        path = mod.replace(".", "/")
        assert f"{path}.py" in names or f"{path}/__init__.py" in names, mod
    for data in ("probes/data/corpus-v2.jsonl.gz", "probes/data/emotions171.txt", "probes/data/emotion_families.json",
                 "probes/data/emotion_groups.json", "probes/data/affect.json", "probes/data/eval/implicit.txt",
                 "probes/data/eval/heldout_messages.txt", "calibration/neutral.json", "monitor/samples/agent_calm.jsonl"):
        assert data in names, data
    assert not any(n.startswith("probes/data/v2/") for n in names)  # writers' sources stay in the repository


def test_every_module_imports_from_the_installed_wheel(installed):
    _, site = installed
    mods = [m for m in source_modules() if not m.startswith("monitor.samples")]
    code = ("import importlib, sys; sys.path.insert(0, sys.argv[1]); "
            "[importlib.import_module(m) for m in sys.argv[2:]]; "
            "import probes; print(probes.__file__)")
    out = subprocess.run([sys.executable, "-c", code, str(site), *mods], capture_output=True, text=True, cwd=site)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().startswith(str(site))  # the installed copy, not the source tree
