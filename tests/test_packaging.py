"""The wheel carries the configs, so a non-editable install runs from any directory."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # each test starts snn-train (or a script) as a process

ROOT = Path(__file__).parents[1]


def test_wheel_ships_every_config_file(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path), str(ROOT)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = tmp_path.glob("snn_train-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {
        f"snn_train/conf/{path.relative_to(ROOT / 'configs').as_posix()}" for path in (ROOT / "configs").rglob("*.yaml")
    }
    assert len(expected) >= 17
    assert expected <= names
    assert "snn_train/cli.py" in names
    assert "snn_train/lif_cpu.cpp" in names  # train.compile builds it on the CPU
    entry_points = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "snn-train = snn_train.cli:train" in entry_points and "snn-eval = snn_train.cli:evaluate" in entry_points
    assert "snn-export = snn_train.cli:export" in entry_points
