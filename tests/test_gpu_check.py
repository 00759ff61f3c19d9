"""tests/gpu/check.py, the GPU check for a borrowed machine: without a GPU it is a dry run that
goes to the end (its steps checked, nothing measured), and the wheels it carries fit what such a
machine takes along (64 MiB with the repository)."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
CHECK = REPO / "tests" / "gpu" / "check.py"


def test_without_a_gpu_the_check_is_a_dry_run_that_claims_no_figures(tmp_path):
    out = tmp_path / "gpu-check.json"
    proc = subprocess.run([sys.executable, str(CHECK), "--out", str(out), "--wheels", str(tmp_path / "no-wheels")],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "No CUDA GPU here: dry run" in proc.stdout
    assert "pytest collects" in proc.stdout and "nli_grpo.bench has grpo_step" in proc.stdout  # it ran to the end
    doc = json.loads(out.read_text())
    assert doc["dry_run"] is True and set(doc) == {"dry_run", "reason", "plan"}  # no device, no figures
    assert doc["plan"]["gpu_tests_collected"] > 0 and "tests/test_gpu.py" in doc["plan"]["pytest"]


@pytest.mark.network
def test_the_gpu_wheels_fit_what_the_gpu_machine_takes():
    """The listed wheels for CPython 3.12 (sizes from PyPI's index) and the repository: <= 64 MiB."""
    spec = importlib.util.spec_from_file_location("gpu_check", CHECK)
    check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(check)
    sizes = check.wheel_sizes("3.12")
    assert set(sizes) == set(check.wheel_requirements())
    assert sum(sizes.values()) + check.repository_bytes() <= check.CARRY_LIMIT == 64 * 2**20, sizes
