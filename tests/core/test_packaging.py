"""The project installs as a wheel (``pip install .``) with a working ``casa-lora`` console script."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_wheel_holds_the_library_and_its_console_script(tmp_path):
    src = tmp_path / "src"  # build from a copy: setuptools writes build/ and *.egg-info next to the sources
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    shutil.copytree(REPO / "casa_core", src / "casa_core", ignore=shutil.ignore_patterns("__pycache__"))
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(wheels), str(src)], check=True)
    (wheel,) = wheels.glob("casa_lora-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        entry = next(n for n in names if n.endswith("entry_points.txt"))
        assert "casa-lora = casa_core.cli:main" in z.read(entry).decode()
    assert "casa_core/cli.py" in names and "casa_core/formats/lora.py" in names
    assert "casa_core/fonts/aileron_atlas.py" in names and "casa_core/methods/casa.py" in names
    assert not any(n.startswith(("nodes/", "tests/")) for n in names)  # the wheel is the library only

    # installed on its own (dependencies from this environment), the console script runs
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target),
                    str(wheel)], check=True)
    env = {**os.environ, "PYTHONPATH": str(target)}
    script = target / "bin" / "casa-lora"
    out = subprocess.run([sys.executable, str(script), "--help"], env=env, capture_output=True, text=True,
                         cwd=tmp_path, check=True)
    assert "transfer" in out.stdout and "demo" in out.stdout
    demo = subprocess.run([sys.executable, str(script), "demo", "--out", str(tmp_path / "D"), "--dim", "64",
                           "--ffn-dim", "128", "--blocks", "1", "--rank", "4"], env=env, capture_output=True,
                          text=True, cwd=tmp_path)
    assert demo.returncode == 0, demo.stderr[-2000:]
    assert (tmp_path / "D" / "loras" / "transferred_casa.safetensors").is_file()
    # it ran the installed copy, not this checkout
    where = subprocess.run([sys.executable, "-c", "import casa_core; print(casa_core.__file__)"], env=env,
                           capture_output=True, text=True, cwd=tmp_path, check=True).stdout.strip()
    assert Path(where).resolve().is_relative_to(target.resolve())
