"""The wheel: everything under qwen_mlx, the converter's data files included, no generic top-level names."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_installs_only_under_qwen_mlx(tmp_path) -> None:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    wheel = next(tmp_path.glob("qwen_mlx-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {name.split("/")[0] for name in names}
    assert top_level == {"qwen_mlx", wheel.name.split("-py3")[0] + ".dist-info"}, top_level
    for expected in (
        "qwen_mlx/convert/__main__.py",
        "qwen_mlx/convert/core.py",
        "qwen_mlx/convert/calibration.txt",
        "qwen_mlx/convert/recipes/mixed_4_6.json",
    ):
        assert expected in names
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "qwen-mlx = qwen_mlx.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()
