"""What several test modules share: the Slurm cluster fixture, the sweep files, result documents
as jobs write them, and the reward functions of the CPU training tests. Test modules import
nothing from each other; they ask for these fixtures."""

import importlib.util
import os
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest

REPO = Path(__file__).resolve().parent.parent


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


# --------------------------------------------------------------------------- sweeps and results
@pytest.fixture(scope="session")
def load_sweep():
    """`load_sweep("lora_rank")`: the SWEEP declared in sweeps/lora_rank.py."""
    def load(name: str):
        spec = importlib.util.spec_from_file_location(f"sweep_{name}", REPO / "sweeps" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module.SWEEP
    return load


@pytest.fixture(scope="session")
def write_result():
    """`write_result(run_dir, status, steps=12, attempts=1, error=None)`: the result.json of a smoke
    cell as its job writes it (nli_grpo.layout.result_document), training at `steps`."""
    from nli_grpo import results
    from nli_grpo.job import config_for_run
    from nli_grpo.layout import CellFolder, result_document

    def write(run_dir: Path, status: str, steps: int = 12, attempts: int = 1, error: str | None = None) -> dict:
        cfg = config_for_run("smoke", ["output.sweep=" + Path(run_dir).parent.name], str(run_dir))
        cfg.output.cell_id = Path(run_dir).name
        doc = result_document(cfg, status=status, slurm={"attempts": attempts}, train={"steps_done": steps},
                              error=error, updated_at="2026-11-21T10:00:00+00:00")
        results.atomic_write_json(CellFolder(run_dir).result, doc)
        return doc
    return write


# --------------------------------------------------------------------------- rewards of the CPU training tests
def alternating(completions, **_):
    """0, 1, 0, 1 ...: non-zero advantages in every group, so every update runs backward (the
    paper's reward is 0 for everything a random model says, and such updates are skipped)."""
    return [float(i % 2) for i in range(len(completions))]


# Targets of the learning-signal reward: ~12% of the tiny tokenizer's vocabulary.
TARGET_TOKENS = set(range(3, 60))


def target_token_share(completions, completion_ids, **_):
    """Share of completion tokens in TARGET_TOKENS: a random policy collects ~0.1 to 0.2; only a
    policy that learned from the reward collects much more."""
    return [sum(t in TARGET_TOKENS for t in ids) / max(1, len(ids)) for ids in completion_ids]


@pytest.fixture(scope="session")
def rewards():
    """Reward functions for training the tiny model: `alternating` (signal in every group) and
    `target_token_share` (what only a policy that learned collects)."""
    return SimpleNamespace(alternating=alternating, target_token_share=target_token_share)


@pytest.fixture(scope="session")
def learning_task():
    """The learning-signal task: settings under which GRPO visibly raises `target_token_share`
    within 40 steps on the tiny model (the first fifth of the steps warms the lr up from 0, so it
    measures the untrained policy)."""
    overrides = [
        "grpo.max_steps=40", "grpo.num_generations=8", "grpo.completions_per_step=16", "grpo.num_iterations=1",
        "grpo.beta=0.0", "grpo.learning_rate=0.02", "grpo.warmup_steps=8", "grpo.lr_scheduler_type=constant_with_warmup",
        "grpo.max_completion_length=8", "grpo.temperature=1.0", "grpo.top_k=0", "grpo.save_steps=1000",
        "eval.after_training=false", "lora.rank=16",
    ]
    return SimpleNamespace(overrides=overrides, reward=target_token_share)
