"""Model names, the tiny stand-in model and tokenizer, the Qwen2.5 shapes, the LoRA config, and the
quantised loading paths; plus one real GRPO job with bnb-4bit + LoRA on the CPU."""

import json
from pathlib import Path

import pytest
import torch

from nli_grpo.config import LoraConfig, ModelConfig
from nli_grpo.models import (
    QWEN25_COMMON, QWEN25_SHAPES, load_base_model, load_tokenizer, model_key, peft_lora_config,
    resolve_model_path,
)
from nli_grpo.prompts import LABELS


@pytest.fixture(scope="module")
def model_cache(tmp_path_factory):
    """A private model cache for this module, so the tiny model is built here (once) by the code
    under test rather than taken from whatever an earlier version left in ~/.cache."""
    with pytest.MonkeyPatch.context() as patch:
        cache = tmp_path_factory.mktemp("nli_grpo_cache")
        patch.setenv("NLI_GRPO_CACHE", str(cache))
        yield cache


@pytest.fixture(scope="module")
def tiny_path(model_cache):
    return resolve_model_path("tiny")


@pytest.fixture(scope="module")
def tiny_tokenizer(tiny_path):
    return load_tokenizer(ModelConfig(name_or_path="tiny"))


@pytest.fixture(scope="module")
def tiny_model(tiny_path):
    return load_base_model(ModelConfig(name_or_path="tiny", quantization="bf16"), torch.float32)


# --------------------------------------------------------------------------- names
@pytest.mark.parametrize("name, key", [
    ("Qwen/Qwen2.5-7B-Instruct", "qwen2.5-7b"),
    ("Qwen/Qwen2.5-7B-Instruct-AWQ", "qwen2.5-7b"),
    ("Qwen/Qwen2.5-32B-Instruct-AWQ", "qwen2.5-32b"),
    ("Qwen/Qwen2.5-14B-Instruct-GPTQ-Int4", "qwen2.5-14b"),
    ("/scratch/models/Qwen2.5-14B-Instruct-AWQ/", "qwen2.5-14b"),
    ("./Qwen2.5-7B-Instruct", "qwen2.5-7b"),
    ("tiny", "tiny"),
    ("random:qwen2.5-7b", "qwen2.5-7b-random"),
])
def test_model_key(name, key):
    assert model_key(name) == key


def test_unknown_random_shape_is_rejected(model_cache):
    with pytest.raises(ValueError, match="unknown random model shape 'qwen2.5-3b'.*qwen2.5-7b"):
        resolve_model_path("random:qwen2.5-3b")
    assert not (model_cache / "models" / "qwen2.5-3b").exists()


def test_hub_ids_are_passed_through():
    assert resolve_model_path("Qwen/Qwen2.5-7B-Instruct-AWQ") == "Qwen/Qwen2.5-7B-Instruct-AWQ"


# --------------------------------------------------------------------------- Qwen2.5 shapes
# paper-facts.md, "Model shapes": hidden, intermediate, layers, heads, kv heads
PAPER_SHAPES = {
    "qwen2.5-7b": (3584, 18944, 28, 28, 4),
    "qwen2.5-14b": (5120, 13824, 48, 40, 8),
    "qwen2.5-32b": (5120, 27648, 64, 40, 8),
}


@pytest.mark.parametrize("name", PAPER_SHAPES)
def test_qwen25_shapes_match_the_public_configs(name):
    shape = QWEN25_SHAPES[name]
    assert (shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"],
            shape["num_attention_heads"], shape["num_key_value_heads"]) == PAPER_SHAPES[name]


def test_qwen25_common_settings():
    assert QWEN25_COMMON == dict(
        vocab_size=152064, hidden_act="silu", rope_theta=1e6, rms_norm_eps=1e-6,
        max_position_embeddings=32768, tie_word_embeddings=False, bos_token_id=151643, eos_token_id=151645,
    )


@pytest.mark.parametrize("name, billions", [("qwen2.5-7b", 7.6), ("qwen2.5-14b", 14.8), ("qwen2.5-32b", 32.8)])
def test_qwen25_shapes_give_the_published_parameter_counts(name, billions):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    with torch.device("meta"):  # shapes only, no memory
        model = Qwen2ForCausalLM(Qwen2Config(**QWEN25_COMMON, **QWEN25_SHAPES[name]))
    assert sum(p.numel() for p in model.parameters()) / 1e9 == pytest.approx(billions, abs=0.05)


# --------------------------------------------------------------------------- the tiny model
def test_tiny_model_is_a_small_qwen2(tiny_model, tiny_path):
    from transformers import Qwen2ForCausalLM

    assert isinstance(tiny_model, Qwen2ForCausalLM)
    config = tiny_model.config
    assert config.hidden_size // config.num_attention_heads == 64  # vLLM's CPU attention needs 64
    assert tiny_model.model.layers[0].self_attn.head_dim == 64
    assert tiny_model.dtype == torch.float32  # CPU compute dtype
    assert json.loads(Path(tiny_path, "nli_grpo_stand_in.json").read_text())["random_weights"]


def test_tiny_model_is_built_in_the_cache(tiny_path, model_cache):
    assert Path(tiny_path).parent == model_cache / "models"
    assert resolve_model_path("tiny") == tiny_path


def test_tiny_model_and_tokenizer_agree(tiny_model, tiny_tokenizer):
    assert tiny_model.config.vocab_size == len(tiny_tokenizer)
    assert tiny_model.config.eos_token_id == tiny_tokenizer.eos_token_id
    assert tiny_model.generation_config.eos_token_id == tiny_tokenizer.eos_token_id


def test_tiny_tokenizer_has_qwen_special_tokens(tiny_tokenizer):
    assert tiny_tokenizer.eos_token == "<|im_end|>"
    assert tiny_tokenizer.pad_token == "<|endoftext|>"
    for token in ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]:
        assert len(tiny_tokenizer.encode(token, add_special_tokens=False)) == 1, token


@pytest.mark.parametrize("text", [
    *(f"<think>so it is {label}</think>\n<answer>{label}</answer>" for label in LABELS),
    "A man is playing a guitar on stage. Überraschung: 7 dogs!",
])
def test_tiny_tokenizer_round_trips_text(tiny_tokenizer, text):
    ids = tiny_tokenizer.encode(text, add_special_tokens=False)
    assert tiny_tokenizer.decode(ids) == text


def test_completions_decode_without_special_tokens(tiny_tokenizer):
    ids = tiny_tokenizer.encode("<think>x</think><answer>neutral</answer><|im_end|>", add_special_tokens=False)
    assert tiny_tokenizer.decode(ids, skip_special_tokens=True) == "<think>x</think><answer>neutral</answer>"


def test_gradient_checkpointing_turns_off_the_kv_cache(model_cache):
    model = load_base_model(ModelConfig(name_or_path="tiny", gradient_checkpointing=True), torch.float32)
    assert model.config.use_cache is False


# --------------------------------------------------------------------------- quantization
def test_bnb4_gives_4bit_linear_layers_that_run(tiny_tokenizer):
    import bitsandbytes as bnb

    model = load_base_model(ModelConfig(name_or_path="tiny", quantization="bnb4"), torch.float32)
    layer = model.model.layers[0]
    for proj in [layer.self_attn.q_proj, layer.self_attn.o_proj, layer.mlp.gate_proj, layer.mlp.down_proj]:
        assert isinstance(proj, bnb.nn.Linear4bit)
        assert proj.weight.dtype == torch.uint8  # packed 4-bit
    assert model.config.quantization_config.bnb_4bit_quant_type == "nf4"
    ids = tiny_tokenizer("<think>a</think><answer>neutral</answer>", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], len(tiny_tokenizer))
    assert torch.isfinite(logits).all()


@pytest.mark.skipif(torch.cuda.is_available(), reason="the error is for machines without CUDA")
def test_awq_without_cuda_is_a_clear_error(model_cache):
    with pytest.raises(RuntimeError, match="GPU"):
        load_base_model(ModelConfig(name_or_path="Qwen/Qwen2.5-7B-Instruct-AWQ", quantization="awq"), torch.float16)


# --------------------------------------------------------------------------- LoRA
def test_lora_alpha_defaults_to_rank():
    peft = peft_lora_config(LoraConfig(rank=16))
    assert (peft.r, peft.lora_alpha, peft.lora_dropout) == (16, 16, 0.0)
    assert set(peft.target_modules) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert peft.bias == "none"


def test_lora_alpha_when_set():
    assert peft_lora_config(LoraConfig(rank=16, alpha=32)).lora_alpha == 32


# --------------------------------------------------------------------------- the real job
def alternating_reward(completions, **_):
    """0, 1, 0, 1 ...: every group of 4 gets a non-zero advantage, so the step runs a backward
    pass through the 4-bit layers (the paper's reward is 0 for everything a random model says,
    and all-zero-advantage steps are skipped)."""
    return [float(i % 2) for i in range(len(completions))]


@pytest.mark.slow
def test_grpo_job_with_bnb4_and_lora_on_cpu(model_cache, tmp_path):
    from safetensors.torch import load_file

    from nli_grpo.results import read_result
    from nli_grpo.train import config_for_run, run

    cfg = config_for_run("smoke", [
        "model.quantization=bnb4", "grpo.max_steps=2", "grpo.num_iterations=1", "grpo.save_steps=100",
        "eval.after_training=false",
    ], str(tmp_path / "run"))
    assert run(cfg, reward_funcs=[alternating_reward]) == 0

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


@pytest.mark.parametrize("recipe, overrides", [
    ("paper", []),                                                          # 7B AWQ, the main runs
    ("paper", ["model.name_or_path=Qwen/Qwen2.5-32B-Instruct-AWQ"]),
    ("lora_rank", []),                                                      # the unquantised 7B of the rank ablation
    ("lora_rank", ["model.name_or_path=Qwen/Qwen2.5-7B-Instruct-AWQ", "model.quantization=awq"]),
    ("lora_rank", ["model.quantization=bnb4"]),
])
def test_paper_recipes_train_like_the_authors_fp16_weights_under_bf16_autocast(recipe, overrides):
    """The authors' configs/grpo/base.yaml: every base loaded in float16, training under bf16
    autocast (bf16: true, fp16: false), AWQ included; no fp16 GradScaler. Their evaluation ran
    vLLM with dtype auto (the checkpoint's own). On a CPU: float32, no autocast."""
    from nli_grpo.config import load_config
    from nli_grpo.models import eval_dtype, training_precision

    cfg = load_config(recipe, overrides)
    assert training_precision(cfg, cuda=True) == {"dtype": torch.float16, "bf16": True, "fp16": False}
    assert eval_dtype(cfg, cuda=True) == "auto"
    assert training_precision(cfg, cuda=False) == {"dtype": torch.float32, "bf16": False, "fp16": False}
    assert eval_dtype(cfg, cuda=False) == torch.float32


def test_precision_fields_reach_the_trainer_and_the_loaded_model(tmp_path):
    from nli_grpo.config import ConfigError, load_config
    from nli_grpo.models import training_precision
    from nli_grpo.train import config_for_run, trl_args

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
