"""The GRPO job for real on the CPU: tiny Qwen2, real TRL/PEFT, the shipped sample data."""

from __future__ import annotations

import os
import shutil
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
    assert {k: doc["model"][k] for k in ("dtype", "bf16", "fp16")} == {"dtype": "float32", "bf16": False, "fp16": False}
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


def alternating_reward(completions, **_):
    """Non-zero advantages in every group: every update has signal."""
    return [float(i % 2) for i in range(len(completions))]


class SignalThenConstant:
    """Rewards with signal for the first `signal_batches` generation batches, then a constant
    reward: every later update has advantage 0 everywhere (and a policy that already moved)."""

    def __init__(self, signal_batches: int):
        self.signal_batches, self.calls = signal_batches, 0

    def __call__(self, completions, **_):
        self.calls += 1
        return alternating_reward(completions) if self.calls <= self.signal_batches else [0.1] * len(completions)


def checkpoint_tensors(checkpoint: Path) -> dict:
    """Every tensor a checkpoint holds of the policy and its optimizer: the adapter, and the
    optimizer state (torch's optimizer.pt, or DeepSpeed's partitioned optimizer states)."""
    import torch
    from safetensors.torch import load_file

    found = {f"adapter/{k}": v for k, v in load_file(checkpoint / "adapter_model.safetensors").items()}

    def walk(prefix, value):
        if isinstance(value, torch.Tensor):
            found[prefix] = value
        elif isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}/{k}", v)
        elif isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                walk(f"{prefix}/{i}", v)

    for path in [checkpoint / "optimizer.pt", *checkpoint.glob("global_step*/*optim_states.pt")]:
        if path.is_file():
            state = torch.load(path, map_location="cpu", weights_only=False)
            # the param groups carry the lr, which the schedule moves on every step, skipped or not
            walk(path.name, state.get("state", state.get("optimizer_state_dict", state)))
    assert any(k.startswith(("optimizer.pt/", "zero")) for k in found), f"no optimizer state in {checkpoint}"
    return found


def moved(before: dict, after: dict) -> list[str]:
    assert before.keys() == after.keys()
    return [k for k in before if not __import__("torch").equal(before[k], after[k])]


SKIP_OVERRIDES = ["grpo.max_steps=6", "grpo.save_steps=3", "grpo.save_total_limit=10", "grpo.num_iterations=1",
                  "grpo.learning_rate=0.01", "grpo.lr_scheduler_type=constant", "grpo.warmup_steps=0", "eval.after_training=false"]


@pytest.mark.parametrize("skip", [True, False])
def test_zero_advantage_updates_leave_a_trained_adapter_and_its_optimizer_bit_identical(tmp_path, skip):
    """Three updates with signal move the adapter and AdamW's moments away from their start;
    then three updates whose advantages are all 0: skipped, they change no weight and no moment
    (checkpoint 3 == checkpoint 6); not skipped, momentum and the KL term move both."""
    cfg = config_for_run("smoke", [*SKIP_OVERRIDES, f"grpo.skip_zero_advantage_steps={str(skip).lower()}"], str(tmp_path / "run"))
    assert run(cfg, reward_funcs=[SignalThenConstant(3)]) == 0
    checkpoints = tmp_path / "run" / "checkpoints"
    signal, flat = checkpoint_tensors(checkpoints / "checkpoint-3"), checkpoint_tensors(checkpoints / "checkpoint-6")
    lora_b = [t for k, t in signal.items() if k.startswith("adapter/") and "lora_B" in k]
    assert lora_b and any(t.abs().max().item() > 0 for t in lora_b), "the updates with signal did not train"
    changed = moved(signal, flat)
    doc = results.read_result(tmp_path / "run" / "result.json")
    if skip:
        assert changed == [] and doc["train"]["skipped_zero_advantage_steps"] == 3
    else:
        assert any(k.startswith("adapter/") for k in changed) and any(k.startswith("optimizer.pt/") for k in changed)
        assert doc["train"]["skipped_zero_advantage_steps"] == 0


DEEPSPEED_SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
from test_train import SignalThenConstant
from nli_grpo.train import config_for_run, run
cfg = config_for_run("smoke", {overrides!r}, {out!r})
raise SystemExit(run(cfg, reward_funcs=[SignalThenConstant(3)]))
"""


@pytest.mark.parametrize("skip", [True, False])
def test_under_deepspeed_zero_advantage_updates_do_not_step_the_engine(tmp_path, skip):
    """DeepSpeed's engine steps inside backward: the skip must keep it out of the engine. ZeRO-2 on
    the CPU (one process, gloo), as in test_zero_advantage_updates_...: checkpoint 3 == 6 with the
    skip, the partitioned AdamW state and the adapter move without it."""
    overrides = [*SKIP_OVERRIDES, "grpo.deepspeed=zero2", f"grpo.skip_zero_advantage_steps={str(skip).lower()}"]
    script = tmp_path / "ds_run.py"
    script.write_text(DEEPSPEED_SCRIPT.format(tests=str(Path(__file__).parent), overrides=overrides, out=str(tmp_path / "run")))
    env = {**os.environ, "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(29500 + os.getpid() % 1000 + (0 if skip else 1))}
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    checkpoints = tmp_path / "run" / "checkpoints"
    assert list((checkpoints / "checkpoint-6").glob("global_step*/*optim_states.pt")), "not a DeepSpeed checkpoint"
    changed = moved(checkpoint_tensors(checkpoints / "checkpoint-3"), checkpoint_tensors(checkpoints / "checkpoint-6"))
    if skip:
        assert changed == []
    else:
        assert any(k.startswith("adapter/") for k in changed) and any(not k.startswith("adapter/") for k in changed)


def test_deepspeed_skip_with_several_micro_batches_per_update_is_refused():
    from nli_grpo.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="gradient_accumulation_steps=1"):
        load_config("smoke", ["grpo.deepspeed=zero2", "grpo.gradient_accumulation_steps=2"])
    load_config("smoke", ["grpo.deepspeed=zero2", "grpo.gradient_accumulation_steps=2", "grpo.skip_zero_advantage_steps=false"])


def _cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nli_grpo.train", *args], capture_output=True, text=True, timeout=timeout)


def test_a_rerun_with_other_settings_is_refused_and_force_moves_the_old_run_aside(tmp_path):
    out = tmp_path / "run"
    # overrides on both sides of the options (argparse's intermixed parsing)
    first = _cli("--config", "smoke", "grpo.max_steps=4", "--output-dir", str(out), "eval.after_training=false")
    assert first.returncode == 0, first.stderr[-3000:]
    adapter = (out / "adapter" / "adapter_model.safetensors").read_bytes()

    other = _cli("--config", "smoke", "grpo.max_steps=4", "eval.after_training=false", "grpo.learning_rate=0.5",
                 "grpo.beta=0.2", "--output-dir", str(out))
    assert other.returncode == 2, other.stderr[-3000:]
    assert "other settings (grpo)" in other.stderr and "--force" in other.stderr
    doc = results.read_result(out / "result.json")  # untouched: the old settings, the old adapter
    assert doc["config"]["grpo"]["learning_rate"] == 1e-4 and doc["slurm"]["attempts"] == 1
    assert (out / "adapter" / "adapter_model.safetensors").read_bytes() == adapter

    same = _cli("--config", "smoke", "grpo.max_steps=4", "eval.after_training=false", "--output-dir", str(out))
    assert same.returncode == 0 and results.read_result(out / "result.json")["slurm"]["attempts"] == 2

    forced = _cli("--config", "smoke", "grpo.max_steps=4", "eval.after_training=false", "grpo.learning_rate=0.5",
                  "grpo.beta=0.2", "--output-dir", str(out), "--force")
    assert forced.returncode == 0, forced.stderr[-3000:]
    doc = results.read_result(out / "result.json")
    assert doc["config"]["grpo"]["learning_rate"] == 0.5 and doc["slurm"]["attempts"] == 1
    assert doc["train"]["steps_done"] == 4 and doc["train"]["resumed_from_step"] == 0
    (old,) = (tmp_path / ".replaced").iterdir()
    assert (old / "adapter" / "adapter_model.safetensors").read_bytes() == adapter
    assert results.read_result(old / "result.json")["config"]["grpo"]["learning_rate"] == 1e-4


def test_which_settings_conflict_with_the_work_in_a_run_folder(tmp_path):
    from nli_grpo.config import load_config
    from nli_grpo.train import RunRecord, conflicting_inputs

    cfg = config_for_run("smoke", [], str(tmp_path / "run"))
    assert conflicting_inputs(tmp_path / "run", cfg.to_dict()) == []  # nothing there yet
    RunRecord(cfg).update()
    assert conflicting_inputs(tmp_path / "run", load_config("smoke", ["grpo.beta=0.5"]).to_dict()) == []  # no work done
    (tmp_path / "run" / "checkpoints" / "checkpoint-4").mkdir(parents=True)
    assert conflicting_inputs(tmp_path / "run", load_config("smoke", ["grpo.beta=0.5"]).to_dict()) == ["grpo"]
    # evaluation settings only matter once a set was evaluated; time and memory never do
    assert conflicting_inputs(tmp_path / "run", load_config("smoke", ["eval.limit=3", "resources.mem_gb=99"]).to_dict()) == []
    record = RunRecord(cfg)
    record.update(eval={"anli_r1": {"accuracy": 0.5, "accuracy_strict": 0.5, "unparseable_rate": 0.0, "n": 2}})
    assert conflicting_inputs(tmp_path / "run", load_config("smoke", ["eval.limit=3"]).to_dict()) == ["eval"]
    assert conflicting_inputs(tmp_path / "run", cfg.to_dict(), adapter="/elsewhere/adapter") == []  # none recorded yet
    record.update(adapter="/some/adapter")
    assert conflicting_inputs(tmp_path / "run", cfg.to_dict(), adapter="/elsewhere/adapter") == ["adapter"]


def test_a_checkpoint_at_max_steps_takes_no_step_on_restart(tmp_path):
    """The job saved its last checkpoint and died before recording the stage: the restart
    finishes the stage from that checkpoint without training a step more."""
    out = tmp_path / "run"
    proc = _cli("--config", "smoke", "grpo.max_steps=4", "grpo.save_steps=2", "eval.after_training=false", "--output-dir", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = results.read_result(out / "result.json")
    doc.update(status="running", stages_done=[], train=None)  # as if killed right after the save
    results.atomic_write_json(out / "result.json", doc)
    shutil.rmtree(out / "adapter")
    log_lines = len(results.read_jsonl(out / results.TRAIN_LOG_FILENAME))

    proc = _cli("--config", "smoke", "grpo.max_steps=4", "grpo.save_steps=2", "eval.after_training=false", "--output-dir", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = results.read_result(out / "result.json")
    assert doc["status"] == "complete" and doc["train"]["steps_done"] == 4 and doc["train"]["resumed_from_step"] == 4
    assert sorted(p.name for p in (out / "checkpoints").glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    assert len(results.read_jsonl(out / results.TRAIN_LOG_FILENAME)) == log_lines  # no step logged again
    assert (out / "adapter" / "adapter_model.safetensors").read_bytes() == \
        (out / "checkpoints" / "checkpoint-4" / "adapter_model.safetensors").read_bytes()
    assert (out / "adapter" / "tokenizer.json").is_file() and not (out / "adapter" / "optimizer.pt").exists()


def test_every_optimizer_step_is_logged_once_with_loss_kl_grad_norm_and_the_skip_flag(tmp_path):
    """num_iterations=4: one generation batch serves four optimizer steps; each of them is a line."""
    cfg = config_for_run("smoke", ["grpo.max_steps=8", "grpo.num_iterations=4", "eval.after_training=false"], str(tmp_path / "run"))
    assert run(cfg, reward_funcs=[alternating_reward]) == 0
    rows = results.read_jsonl(tmp_path / "run" / results.TRAIN_LOG_FILENAME)
    assert [r["step"] for r in rows] == list(range(1, 9))
    for row in rows:
        assert {"loss", "kl", "grad_norm", "learning_rate", "skipped_zero_advantage"} <= row.keys() and row["attempt"] == 1
    assert [r["step"] for r in rows if "reward" in r] == [1, 5]  # the steps that generated


def test_readers_keep_the_last_attempt_of_a_replayed_step(tmp_path):
    """A restart replays the steps after its checkpoint: the summary and aggregate's curves see
    one record per step, the last attempt's."""
    from nli_grpo import aggregate

    run_dir = tmp_path / "sweep" / "cell"
    run_dir.mkdir(parents=True)
    log = run_dir / results.TRAIN_LOG_FILENAME
    for attempt, steps, reward in ((1, range(1, 8), 0.0), (2, range(5, 11), 1.0)):
        for step in steps:
            results.append_jsonl(log, {"step": step, "attempt": attempt, "loss": 0.0, "reward": reward, "kl": reward})
    rows = results.read_train_log(log)
    assert [(r["step"], r["attempt"]) for r in rows] == [(s, 1 if s < 5 else 2) for s in range(1, 11)]
    from nli_grpo.train import _train_summary

    summary = _train_summary(run_dir, 10, 0.0, 4, 10, {})
    assert summary["reward_last"] == 1.0 and summary["reward_mean"] == 0.6

    curve = aggregate.mean_train_curve([str(run_dir)])
    assert list(curve.index) == list(range(1, 11)) and list(curve["reward"]) == [0.0] * 4 + [1.0] * 6


@pytest.mark.parametrize("loss_temperature, expected", [("1.0", 1.0), ("0.5", 0.5), ("null", 0.9)])
def test_the_loss_sees_log_probs_at_the_configured_temperature(tmp_path, loss_temperature, expected):
    """grpo.loss_temperature: the per-token log-probs of the policy (and so of the old and
    reference policies: the same function) equal log_softmax(logits / T); null = TRL's, the
    sampling temperature (0.9)."""
    import torch

    from nli_grpo.train import StopRequest, build_trainer

    cfg = config_for_run("smoke", [f"grpo.loss_temperature={loss_temperature}", "grpo.temperature=0.9"], str(tmp_path))
    trainer, _ = build_trainer(cfg, StopRequest())
    model = trainer.model
    torch.manual_seed(0)
    input_ids = torch.randint(3, 400, (2, 12))
    attention_mask = torch.ones_like(input_ids)
    keep = 5
    with torch.no_grad():
        seen, _, _ = trainer._get_per_token_logps_and_entropies(model, input_ids, attention_mask, keep)
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, -keep - 1:-1]
    want = torch.log_softmax(logits.float() / expected, dim=-1).gather(-1, input_ids[:, -keep:, None]).squeeze(-1)
    assert torch.allclose(seen, want, atol=1e-5), (seen - want).abs().max()
    for other in {1.0, 0.5, 0.9} - {expected}:
        wrong = torch.log_softmax(logits.float() / other, dim=-1).gather(-1, input_ids[:, -keep:, None]).squeeze(-1)
        assert not torch.allclose(seen, wrong, atol=1e-3)
