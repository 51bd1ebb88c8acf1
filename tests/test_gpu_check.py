"""bench/gpu_check.py --dry-run: the one-shot GPU check's code at tiny shapes on the CPU, with
--wheels restarting it on a wheel installed from a folder (no index)."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.slow


def _wheel(directory) -> str:
    """A wheel of one pure-Python module, written by hand (nothing is downloaded)."""
    name = "megasft_check_dummy-0.1-py3-none-any.whl"
    info = "megasft_check_dummy-0.1.dist-info"
    files = {
        "megasft_check_dummy.py": "VALUE = 1\n",
        f"{info}/METADATA": "Metadata-Version: 2.1\nName: megasft-check-dummy\nVersion: 0.1\n",
        f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: tests\nRoot-Is-Purelib: true\n"
        "Tag: py3-none-any\n",
    }
    files[f"{info}/RECORD"] = "".join(f"{path},,\n" for path in [*files, f"{info}/RECORD"])
    with zipfile.ZipFile(directory / name, "w") as archive:
        for path, text in files.items():
            archive.writestr(path, text)
    return name


def test_dry_run_checks_parity_packing_and_throughput_and_writes_the_report(tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    wheel = _wheel(wheels)
    output = tmp_path / "report"
    result = subprocess.run(
        [sys.executable, str(REPO / "bench" / "gpu_check.py"), "--wheels", str(wheels),
         "--dry-run", "--output", str(output), "--work", str(tmp_path)],
        cwd=tmp_path, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    report = json.loads((output / "gpu-check.json").read_text())
    assert report["environment"]["dry_run"] is True
    assert report["environment"]["installed_wheels"] == [wheel]
    assert (output / "site" / "megasft_check_dummy.py").is_file()
    for precision in ("fp32", "bf16"):
        assert report["parity"][precision]["torch"]["passed"], report["parity"]
    training = report["training"]["torch"]
    assert training["packed_equals_unpacked"], training
    assert len(training["losses"]) == report["shape"]["steps"]
    for name in ("megasft", "transformers"):
        assert report["throughput"][name]["tokens_per_second"] > 0
    table = (output / "gpu-check.md").read_text()
    assert "| check | result | goal |" in table and "megasft / transformers tokens/s" in table
