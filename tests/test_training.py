"""The training stage (nli_grpo.training) for real on the CPU: TRL's GRPOTrainer with PEFT on the
tiny Qwen2. The policy learns from the reward; zero-advantage updates change nothing (also under
DeepSpeed); every optimizer step is logged; the loss sees log-probs at the configured temperature;
TRL gets the paper's objective and precision, not its own defaults."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nli_grpo import results
from nli_grpo.job import config_for_run, run
from nli_grpo.layout import CellFolder
from nli_grpo.training import trl_args


@pytest.mark.slow
def test_grpo_raises_a_reward_only_a_trained_policy_collects(tmp_path, learning_task):
    cfg = config_for_run("smoke", [*learning_task.overrides, "rollout.backend=hf"], str(tmp_path / "run"))
    assert run(cfg, reward_funcs=[learning_task.reward]) == 0
    rewards = [r["reward"] for r in results.read_train_log(CellFolder(cfg.output.dir).train_log) if "reward" in r]
    fifth = len(rewards) // 5
    first, last = sum(rewards[:fifth]) / fifth, sum(rewards[-fifth:]) / fifth
    assert last >= 3 * first, (first, last)




class SignalThenConstant:
    """Rewards with signal for the first `signal_batches` generation batches, then a constant
    reward: every later update has advantage 0 everywhere (and a policy that already moved)."""

    def __init__(self, signal_batches: int):
        self.signal_batches, self.calls = signal_batches, 0

    def __call__(self, completions, **_):
        self.calls += 1
        alternating = [float(i % 2) for i in range(len(completions))]
        return alternating if self.calls <= self.signal_batches else [0.1] * len(completions)


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


@pytest.mark.slow
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
from nli_grpo.job import config_for_run, run

calls = 0
def signal_then_constant(completions, **_):  # SignalThenConstant(3), as the test above
    global calls
    calls += 1
    return [float(i % 2) for i in range(len(completions))] if calls <= 3 else [0.1] * len(completions)

cfg = config_for_run("smoke", {overrides!r}, {out!r})
raise SystemExit(run(cfg, reward_funcs=[signal_then_constant]))
"""


@pytest.mark.slow
@pytest.mark.parametrize("skip", [True, False])
def test_under_deepspeed_zero_advantage_updates_do_not_step_the_engine(tmp_path, skip):
    """DeepSpeed's engine steps inside backward: the skip must keep it out of the engine. ZeRO-2 on
    the CPU (one process, gloo), as in test_zero_advantage_updates_...: checkpoint 3 == 6 with the
    skip, the partitioned AdamW state and the adapter move without it."""
    overrides = [*SKIP_OVERRIDES, "grpo.deepspeed=zero2", f"grpo.skip_zero_advantage_steps={str(skip).lower()}"]
    script = tmp_path / "ds_run.py"
    script.write_text(DEEPSPEED_SCRIPT.format(overrides=overrides, out=str(tmp_path / "run")))
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


@pytest.mark.slow
def test_every_optimizer_step_is_logged_once_with_loss_kl_grad_norm_and_the_skip_flag(tmp_path, rewards):
    """num_iterations=4: one generation batch serves four optimizer steps; each of them is a line."""
    cfg = config_for_run("smoke", ["grpo.max_steps=8", "grpo.num_iterations=4", "eval.after_training=false"], str(tmp_path / "run"))
    assert run(cfg, reward_funcs=[rewards.alternating]) == 0
    rows = results.read_jsonl(CellFolder(cfg.output.dir).train_log)
    assert [r["step"] for r in rows] == list(range(1, 9))
    for row in rows:
        assert {"loss", "kl", "grad_norm", "learning_rate", "skipped_zero_advantage"} <= row.keys() and row["attempt"] == 1
    assert [r["step"] for r in rows if "reward" in r] == [1, 5]  # the steps that generated


@pytest.mark.parametrize("loss_temperature, expected", [("1.0", 1.0), ("0.5", 0.5), ("null", 0.9)])
def test_the_loss_sees_log_probs_at_the_configured_temperature(tmp_path, loss_temperature, expected):
    """grpo.loss_temperature: the per-token log-probs of the policy (and so of the old and
    reference policies: the same function) equal log_softmax(logits / T); null = TRL's, the
    sampling temperature (0.9)."""
    import torch

    from nli_grpo.process import StopRequest
    from nli_grpo.training import build_trainer

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


@pytest.mark.parametrize("preset, stage", [("zero2", 2), ("zero3", 3)])
def test_deepspeed_presets_resolve_to_the_shipped_configs(tmp_path, preset, stage):
    args = trl_args(config_for_run("smoke", [f"grpo.deepspeed={preset}"], str(tmp_path)), tmp_path)
    assert args.deepspeed.endswith(f"deepspeed_zero{stage}.json")
    assert args.hf_deepspeed_config.config["zero_optimization"]["stage"] == stage


def test_trl_gets_the_papers_objective_not_trl_1x_defaults(tmp_path):
    """TRL 1.x added options (on by default for some) that the paper's TRL 0.16 did not have."""
    args = trl_args(config_for_run("paper", ["model.quantization=bf16", "model.name_or_path=Qwen/Qwen2.5-7B-Instruct"],
                                   str(tmp_path)), tmp_path)
    assert (args.beta, args.epsilon, args.epsilon_high, args.num_iterations) == (0.01, 0.2, 0.2, 4)
    assert (args.scale_rewards, args.loss_type, args.num_generations) == ("none", "grpo", 4)
    assert args.use_bias_correction_kl is False and args.vllm_importance_sampling_correction is False
    assert (args.entropy_coef, args.top_entropy_quantile, args.mask_truncated_completions) == (0.0, 1.0, False)
    assert (args.temperature, args.top_k, args.top_p, args.max_completion_length) == (0.9, 50, 1.0, 512)
    assert (args.learning_rate, args.lr_scheduler_type.value, args.warmup_steps, args.max_grad_norm) == (5e-6, "linear", 50, 1.0)
    assert args.per_device_train_batch_size * args.gradient_accumulation_steps == 8


@pytest.mark.slow
def test_grpo_job_with_bnb4_and_lora_on_cpu(tmp_path, rewards):
    """QLoRA on the CPU: GRPO steps with a real backward pass through 4-bit layers."""
    from safetensors.torch import load_file

    from nli_grpo.results import read_result

    cfg = config_for_run("smoke", [
        "model.quantization=bnb4", "grpo.max_steps=2", "grpo.num_iterations=1", "grpo.save_steps=100",
        "eval.after_training=false",
    ], str(tmp_path / "run"))
    assert run(cfg, reward_funcs=[rewards.alternating]) == 0

    result = read_result(tmp_path / "run" / "result.json")
    assert result["status"] == "complete"
    assert result["cell"]["quantization"] == "bnb4"
    assert result["train"]["steps_done"] == 2
    assert result["train"]["skipped_zero_advantage_steps"] == 0
    adapter = tmp_path / "run" / "adapter"
    assert json.loads((adapter / "adapter_config.json").read_text())["r"] == 8
    weights = load_file(adapter / "adapter_model.safetensors")
    # PEFT starts every lora_B at zero; a non-zero one shows that the optimizer stepped.
    assert any(w.abs().max() > 0 for name, w in weights.items() if "lora_B" in name)
    # LoRA weights train in float32 as on the bf16 and AWQ cells (TRL casts them to bf16 on 4-bit
    # bases, where lr 5e-6 updates would round away): the quantization ablation compares like with like.
    assert {w.dtype for w in weights.values()} == {torch.float32}
    assert result["train"]["lora_dtype"] == "float32"


def test_precision_fields_reach_the_trainer_and_the_loaded_model(tmp_path):
    from nli_grpo.config import ConfigError, load_config
    from nli_grpo.models import load_base_model, training_precision

    cfg = config_for_run("smoke", [], str(tmp_path))
    args = trl_args(cfg, tmp_path)
    assert (args.bf16, args.fp16) == (False, False)  # this CPU: float32, as training_precision says
    model = load_base_model(cfg.model, training_precision(cfg, cuda=False)["dtype"])
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    fp16 = load_config("paper", ["grpo.mixed_precision=fp16", "model.dtype=float16"])
    assert training_precision(fp16, cuda=True) == {"dtype": torch.float16, "bf16": False, "fp16": True}
    with pytest.raises(ConfigError, match="AWQ kernels compute in float16"):
        load_config("paper", ["model.dtype=bfloat16"])
    with pytest.raises(ConfigError, match="grpo.mixed_precision='fp32' is not allowed"):
        load_config("paper", ["grpo.mixed_precision=fp32"])
