"""The GRPO job for real on the CPU: tiny Qwen2, real TRL/PEFT, the shipped sample data."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nli_grpo import results
from nli_grpo.data import BENCHMARK_NAMES
from nli_grpo.train import COMPLETE_MARKER, EXIT_PREEMPTED, config_for_run, run

pytestmark = pytest.mark.slow

# Targets of the learning-signal reward: ~12% of the tiny tokenizer's vocabulary.
TARGET_TOKENS = set(range(3, 60))


def _job(out: Path, *overrides: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "nli_grpo.train", "--config", "smoke", f"output.dir={out}", *overrides]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _wait_for_checkpoint(out: Path, proc: subprocess.Popen, min_step: int, timeout: float = 240) -> int:
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, f"job ended early: {proc.stderr.read()[-3000:]}"
        done = [int(p.parent.name.split("-")[1]) for p in (out / "checkpoints").glob(f"checkpoint-*/{COMPLETE_MARKER}")]
        if done and max(done) >= min_step:
            return max(done)
        time.sleep(0.2)
    raise AssertionError(f"no complete checkpoint >= {min_step} within {timeout}s")


def test_smoke_recipe_trains_and_evaluates_all_13_sets(tmp_path):
    out = tmp_path / "smoke"
    proc = subprocess.run([sys.executable, "-m", "nli_grpo.train", "--config", "smoke", "--output-dir", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    doc = results.read_result(out / "result.json")
    assert doc["status"] == "complete" and doc["stages_done"] == ["train", "eval"]
    assert doc["train"]["steps_done"] == doc["config"]["grpo"]["max_steps"] == 12
    assert doc["cell"] == {"model": "tiny", "quantization": "bf16", "lora_rank": 8, "seed": 0, "stage": "grpo", "rollout": "hf"}
    assert doc["config"]["grpo"]["beta"] == 0.01 and doc["versions"]["trl"]
    assert doc["train"]["tokens_per_s"] > 0 and doc["train"]["peak_memory_gb"] > 0
    assert sorted(doc["eval"]) == sorted(BENCHMARK_NAMES)
    assert all(len(results.read_jsonl(out / "train_log.jsonl")) > 0 for _ in [0])
    assert (out / "adapter" / "adapter_config.json").is_file()
    assert (out / "predictions" / "hans_subsequence.jsonl.gz").is_file()


def test_sigkill_mid_run_resumes_from_last_complete_checkpoint(tmp_path):
    out = tmp_path / "run"
    overrides = ("grpo.save_steps=2", "eval.after_training=false")
    proc = _job(out, *overrides)
    reached = _wait_for_checkpoint(out, proc, min_step=4)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    # What a save killed half-way leaves behind: a newer folder without the completion marker.
    torn = out / "checkpoints" / f"checkpoint-{reached + 1}"
    torn.mkdir(exist_ok=True)
    (torn / "adapter_model.safetensors").write_bytes(b"\0" * 10)
    assert results.read_result(out / "result.json")["status"] == "running"

    proc = _job(out, *overrides)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-4000:]
    doc = results.read_result(out / "result.json")
    assert doc["status"] == "complete"
    assert doc["train"]["steps_done"] == 12
    assert doc["train"]["resumed_from_step"] >= reached >= 4
    assert doc["slurm"]["attempts"] == 2
    assert not torn.exists()


def test_usr2_checkpoints_exits_preempted_and_the_rerun_completes(tmp_path):
    out = tmp_path / "run"
    overrides = ("grpo.save_steps=100", "eval.after_training=false")
    proc = _job(out, *overrides)
    deadline = time.time() + 240
    while not results.read_jsonl(out / results.TRAIN_LOG_FILENAME):  # training has started
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read()[-3000:]
        time.sleep(0.2)
    proc.send_signal(signal.SIGUSR2)
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == EXIT_PREEMPTED, err[-4000:]
    doc = results.read_result(out / "result.json")
    assert doc["status"] == "preempted"
    stopped_at = doc["train"]["steps_done"]
    assert 0 < stopped_at < 12
    # The signal forced a save although save_steps is 100.
    assert (out / "checkpoints" / f"checkpoint-{stopped_at}" / COMPLETE_MARKER).exists()

    proc = _job(out, *overrides)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-4000:]
    doc = results.read_result(out / "result.json")
    assert doc["status"] == "complete"
    assert doc["train"]["steps_done"] == 12 and doc["train"]["resumed_from_step"] == stopped_at


def target_token_reward(completions, completion_ids, **_):
    """Share of completion tokens in TARGET_TOKENS: a random policy collects ~0.1 to 0.2; only a
    policy that learned from the reward collects much more."""
    return [sum(t in TARGET_TOKENS for t in ids) / max(1, len(ids)) for ids in completion_ids]


LEARNING_OVERRIDES = [
    "grpo.max_steps=40", "grpo.num_generations=8", "grpo.completions_per_step=16", "grpo.num_iterations=1",
    # The first fifth of the steps warms the lr up from 0: it measures the untrained policy.
    "grpo.beta=0.0", "grpo.learning_rate=0.02", "grpo.warmup_steps=8", "grpo.lr_scheduler_type=constant_with_warmup",
    "grpo.max_completion_length=8", "grpo.temperature=1.0", "grpo.top_k=0", "grpo.save_steps=1000",
    "eval.after_training=false", "lora.rank=16",
]


def learning_curve(tmp_path: Path, backend: str) -> tuple[float, float]:
    cfg = config_for_run("smoke", [*LEARNING_OVERRIDES, f"rollout.backend={backend}"], str(tmp_path / backend))
    assert run(cfg, reward_funcs=[target_token_reward]) == 0
    rewards = [r["reward"] for r in results.read_jsonl(tmp_path / backend / results.TRAIN_LOG_FILENAME)]
    fifth = len(rewards) // 5
    return sum(rewards[:fifth]) / fifth, sum(rewards[-fifth:]) / fifth


def test_grpo_raises_a_reward_only_a_trained_policy_collects(tmp_path):
    first, last = learning_curve(tmp_path, "hf")
    assert last >= 3 * first, (first, last)


def test_steps_whose_advantages_are_all_zero_change_nothing(tmp_path):
    """A constant reward gives every completion advantage 0: the paper skips those steps, so the
    adapter must stay exactly at its initialisation (LoRA B = 0) although the lr is huge."""
    from safetensors.torch import load_file

    cfg = config_for_run("smoke", ["grpo.max_steps=3", "grpo.num_iterations=1", "grpo.learning_rate=0.5",
                                   "grpo.warmup_steps=0", "eval.after_training=false"], str(tmp_path / "run"))
    assert run(cfg, reward_funcs=[lambda completions, **_: [0.1] * len(completions)]) == 0
    weights = load_file(tmp_path / "run" / "adapter" / "adapter_model.safetensors")
    lora_b = [t for name, t in weights.items() if "lora_B" in name]
    assert lora_b and all(t.abs().max().item() == 0.0 for t in lora_b)
    doc = json.loads((tmp_path / "run" / "result.json").read_text())
    assert doc["train"]["skipped_zero_advantage_steps"] == 3


def test_a_restart_keeps_finished_stages_only_while_their_inputs_are_unchanged():
    from nli_grpo.config import load_config
    from nli_grpo.train import reusable_stages

    before = load_config("smoke").to_dict()
    previous = {"config": before, "stages_done": ["train", "eval"]}
    assert reusable_stages(previous, before) == ["train", "eval"]
    more_sets = load_config("smoke", ["eval.limit=100"]).to_dict()
    assert reusable_stages(previous, more_sets) == ["train"]
    longer = load_config("smoke", ["grpo.max_steps=100"]).to_dict()
    assert reusable_stages(previous, longer) == []
