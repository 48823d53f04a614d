"""The wheel: it ships the space files of ``studies/`` inside ``ablate/study/``, and an install outside the
checkout lists them."""

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
#: What a wheel is built from (the rest of the checkout is not part of the package).
SOURCES = ("pyproject.toml", "setup.py", "README.md", "ablate", "analysis", "studies")
SPACES = sorted(p.name for p in (ROOT / "studies").glob("*.toml"))


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """A wheel built offline from a copy of the sources (the build leaves build/ and egg-info behind)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(ROOT / name, src / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
                    "-w", str(tmp / "dist"), str(src)], check=True, capture_output=True, text=True)
    (path,) = (tmp / "dist").glob("*.whl")
    return path


def test_wheel_ships_every_space_inside_the_package(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    assert sorted(n.split("/")[-1] for n in names if n.startswith("ablate/study/studies/")) == SPACES
    assert "ablate/study/spaces.py" in names
    assert not [n for n in names if n.startswith("studies/")]  # inside the package, not beside it


def test_installed_wheel_lists_its_spaces_from_anywhere(wheel, tmp_path):
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q", "--target", str(target),
                    str(wheel)], check=True, capture_output=True, text=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    script = ("import ablate.study.spaces as s; print(s.SPACES_DIR); from ablate.cli import main; "
              "raise SystemExit(main(['spaces']))")
    # The installed copy comes first on the path, ahead of the checkout's editable install.
    env = {**os.environ, "PYTHONPATH": str(target), "MLFLOW_DISABLE_TELEMETRY": "true"}
    done = subprocess.run([sys.executable, "-c", script], cwd=elsewhere, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    first, *listing = done.stdout.splitlines()
    assert Path(first) == target / "ablate" / "study" / "studies"
    assert [line.split()[0] for line in listing] == [Path(name).stem for name in SPACES]
