"""Recipes carry the paper's settings (paper-facts.md, "GRPO setup"), overrides are typed, and an
invalid config fails on the login node with a message that names the field and what is allowed."""

import dataclasses

import pytest

from nli_grpo.config import (
    LORA_TARGETS,
    ConfigError,
    ExperimentConfig,
    config_from_dict,
    load_config,
    recipe_names,
)
from nli_grpo.data import BENCHMARK_NAMES

PAPER_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.mark.parametrize("recipe", ["paper", "lora_rank", "smoke"])
def test_shipped_recipe_loads(recipe):
    assert recipe in recipe_names()
    assert isinstance(load_config(recipe), ExperimentConfig)


# Every row of paper-facts.md's GRPO table that is a config field.
PAPER_GRPO = {
    "num_generations": 4,
    "beta": 0.01,
    "epsilon": 0.2,
    "num_iterations": 4,
    "scale_rewards": "none",
    "loss_type": "grpo",
    "skip_zero_advantage_steps": True,
    "learning_rate": 5e-6,
    "lr_scheduler_type": "linear",
    "warmup_steps": 50,
    "optim": "paged_adamw_8bit",
    "max_grad_norm": 1.0,
    "max_prompt_length": 512,
    "max_completion_length": 512,
    "temperature": 0.9,
    "top_k": 50,
    "top_p": 1.0,
    "completions_per_step": 8,
    "max_steps": 4000,
}


@pytest.mark.parametrize("field, value", PAPER_GRPO.items())
def test_paper_recipe_grpo_field(field, value):
    assert getattr(load_config("paper").grpo, field) == value


def test_paper_recipe_lora_and_model():
    cfg = load_config("paper")
    assert (cfg.lora.rank, cfg.lora.alpha, cfg.lora.dropout) == (64, None, 0.0)
    assert cfg.lora.target_modules == PAPER_TARGETS
    assert cfg.grpo.completions_per_step // cfg.grpo.num_generations == 2  # prompts per step
    assert cfg.model.quantization == "awq"
    assert cfg.model.name_or_path == "Qwen/Qwen2.5-7B-Instruct-AWQ"
    assert cfg.eval.benchmarks == list(BENCHMARK_NAMES)
    assert (cfg.eval.max_new_tokens, cfg.eval.max_model_len) == (768, 1024)


def test_lora_rank_recipe():
    cfg = load_config("lora_rank")
    assert (cfg.grpo.completions_per_step, cfg.grpo.max_steps) == (32, 1000)
    assert (cfg.model.name_or_path, cfg.model.quantization) == ("Qwen/Qwen2.5-7B-Instruct", "bf16")
    # Inherited from the paper recipe.
    assert (cfg.grpo.beta, cfg.grpo.num_iterations, cfg.lora.rank) == (0.01, 4, 64)


def test_smoke_recipe_runs_without_gpu_or_network():
    cfg = load_config("smoke")
    assert cfg.model.name_or_path == "tiny-sft"  # built locally: the tiny model, warm-started
    assert (cfg.rollout.backend, cfg.eval.backend) == ("hf", "hf")
    assert cfg.data.hub is False
    assert cfg.resources.gpus_per_node == 0
    assert cfg.grpo.optim != "paged_adamw_8bit"  # needs CUDA


# --------------------------------------------------------------------------- overrides
def test_overrides_are_typed():
    cfg = load_config("smoke", [
        "lora.rank=16", "lora.alpha=32", "grpo.beta=0.05", "grpo.learning_rate=1e-5",
        "eval.after_training=false", "eval.benchmarks=[anli_r1,snli]", "model.key=my-model",
    ])
    assert cfg.lora.rank == 16 and type(cfg.lora.rank) is int
    assert cfg.lora.alpha == 32 and type(cfg.lora.alpha) is int
    assert cfg.grpo.beta == 0.05 and type(cfg.grpo.beta) is float
    assert cfg.grpo.learning_rate == 1e-5 and type(cfg.grpo.learning_rate) is float
    assert cfg.eval.after_training is False
    assert cfg.eval.benchmarks == ["anli_r1", "snli"] and type(cfg.eval.benchmarks) is list
    assert cfg.model.key == "my-model"


def test_override_wins_over_recipe_and_later_override_wins():
    cfg = load_config("paper", ["grpo.max_steps=10", "grpo.max_steps=20"])
    assert cfg.grpo.max_steps == 20


def test_int_in_float_field_is_accepted():
    assert load_config("paper", ["grpo.beta=0"]).grpo.beta == 0.0


# --------------------------------------------------------------------------- invalid configs
# overrides on the paper recipe, then fragments the message must contain
INVALID = {
    "rank zero": (["lora.rank=0"], ["lora.rank", "positive"]),
    "rank negative": (["lora.rank=-8"], ["lora.rank", "positive"]),
    "unknown quantization": (["model.quantization=int8"], ["model.quantization", "bf16", "awq", "bnb4"]),
    "completions not whole groups": (["grpo.completions_per_step=6"], ["grpo.completions_per_step", "grpo.num_generations"]),
    "unknown benchmark": (["eval.benchmarks=[anli_r1,anli_r4]"], ["eval.benchmarks", "anli_r4", "anli_r1", "diag_logic"]),
    "unknown train source": (["data.train_source=mnli"], ["data.train_source", "anli_hard", "anli_train_r1"]),
    "unknown key": (["grpo.bta=0.1"], ["grpo.bta", "did you mean 'beta'"]),
    "unknown section": (["lorra.rank=8"], ["lorra", "did you mean 'lora'"]),
    "wrong type": (["lora.rank=abc"], ["lora.rank", "abc"]),
    "wrong bool": (["eval.after_training=maybe"], ["eval.after_training", "maybe"]),
    "no equals sign": (["lora.rank"], ["lora.rank", "key=value"]),
    "awq on a non-AWQ checkpoint": (["model.name_or_path=Qwen/Qwen2.5-7B-Instruct"], ["model.quantization=awq", "AWQ checkpoint", "Qwen/Qwen2.5-7B-Instruct"]),
    "colocated vllm on two GPUs": (["resources.gpus_per_node=2"], ["rollout.backend=vllm", "gpus_per_node=2", "rollout.backend=vllm_server"]),
    "unknown target module": (["lora.target_modules=[q_proj,qkv]"], ["lora.target_modules", "qkv", "down_proj"]),
    "stale batches without the importance-sampling correction": (
        ["rollout.backend=vllm_server", "resources.gpus_per_node=2", "rollout.max_staleness=1",
         "rollout.importance_sampling_correction=false"],
        ["rollout.max_staleness=1", "rollout.importance_sampling_correction"]),
}


@pytest.mark.parametrize("overrides, fragments", INVALID.values(), ids=list(INVALID))
def test_invalid_config_names_field_and_fix(overrides, fragments):
    with pytest.raises(ConfigError) as caught:
        load_config("paper", overrides)
    for fragment in fragments:
        assert fragment in str(caught.value)


def test_unknown_recipe_lists_shipped_ones():
    with pytest.raises(ConfigError, match="unknown recipe 'nope'.*lora_rank, paper, smoke"):
        load_config("nope")


def test_config_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)


def test_recipe_from_path_with_base(tmp_path):
    recipe = tmp_path / "mine.yaml"
    recipe.write_text("base: smoke\nlora:\n  rank: 4\n")
    cfg = load_config(str(recipe))
    assert cfg.lora.rank == 4
    assert cfg.model.name_or_path == "tiny-sft"


# --------------------------------------------------------------------------- round trip
@pytest.mark.parametrize("recipe", ["paper", "lora_rank", "smoke"])
def test_dict_round_trip(recipe):
    cfg = load_config(recipe, ["lora.alpha=16", "data.files={anli_r1: /data/r1.jsonl}"])
    again = config_from_dict(cfg.to_dict())
    assert again == cfg
    assert isinstance(again.lora, type(cfg.lora))


def test_to_dict_holds_every_field():
    data = load_config("paper").to_dict()
    assert set(data) == {f.name for f in dataclasses.fields(ExperimentConfig)}
    assert data["lora"]["target_modules"] == list(LORA_TARGETS)


# --------------------------------------------------------------------------- trackers (output.report_to)
@pytest.mark.parametrize("recipe", ["paper", "lora_rank", "smoke"])
def test_every_recipe_reports_to_no_tracker_by_default(recipe):
    cfg = load_config(recipe)
    assert (cfg.output.report_to, cfg.output.wandb_mode, cfg.output.wandb_project) == (["none"], None, None)


def test_report_to_takes_several_trackers_and_refuses_unknown_or_mixed_ones():
    cfg = load_config("smoke", ["output.report_to=[tensorboard,wandb,trackio]", "output.wandb_mode=offline"])
    assert cfg.output.report_to == ["tensorboard", "wandb", "trackio"]
    for value in ("[tensorbord]", "[none,wandb]", "[]"):
        with pytest.raises(ConfigError) as caught:
            load_config("smoke", [f"output.report_to={value}"])
        assert "output.report_to=" in str(caught.value) and "none" in str(caught.value) and "tensorboard, wandb, trackio" in str(caught.value)
    with pytest.raises(ConfigError, match=r"config field 'output.report_to' takes a list: write it in brackets, e.g. output.report_to=\[a,b\]"):
        load_config("smoke", ["output.report_to=wandb"])
    with pytest.raises(ConfigError, match="output.wandb_mode='cloud' is not allowed; choose one of: online, offline, disabled"):
        load_config("smoke", ["output.wandb_mode=cloud"])
