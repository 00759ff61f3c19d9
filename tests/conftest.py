import os
import shutil
import subprocess

import pytest


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "slurm: needs the local Slurm cluster (bash slurm/local-cluster.sh up); skipped when it is down"
    )


def _slurm_problem():
    """Why the Slurm cluster cannot be used, or None when it answers."""
    if shutil.which("sbatch") is None:
        return "sbatch is not on PATH"
    try:
        ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=10)
    except subprocess.TimeoutExpired:
        return "`scontrol ping` did not answer within 10 s"
    if "is UP" not in ping.stdout:
        first_line = (ping.stdout + ping.stderr).strip().splitlines()[:1]  # then comes a banner of stars
        return f"slurmctld is not up (`scontrol ping`: {' '.join(first_line)})"
    return None


@pytest.fixture(scope="session")
def slurm_cluster():
    """A running Slurm cluster. Skips when there is none, fails instead when NLI_GRPO_REQUIRE_SLURM=1
    (CI), so that a broken cluster cannot pass as an all-skipped run."""
    problem = _slurm_problem()
    if problem:
        message = f"Slurm cluster not usable: {problem}. Start one with `bash slurm/local-cluster.sh up` (as root)."
        if os.environ.get("NLI_GRPO_REQUIRE_SLURM") == "1":
            pytest.fail(message + " NLI_GRPO_REQUIRE_SLURM=1 is set, so this is an error.", pytrace=False)
        pytest.skip(message)
