"""Models: the tiny stand-in model and tokenizer built locally, the quantised loading paths, the
LoRA config, and how training holds and computes the weights (the authors' precision)."""

import json
from pathlib import Path

import pytest
import torch

from nli_grpo.catalog import QWEN25_COMMON, QWEN25_SHAPES
from nli_grpo.config import LoraConfig, ModelConfig
from nli_grpo.models import load_base_model, load_tokenizer, peft_lora_config, resolve_model_path
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


def test_unknown_random_shape_is_rejected(model_cache):
    with pytest.raises(ValueError, match="unknown random model shape 'qwen2.5-3b'.*qwen2.5-7b"):
        resolve_model_path("random:qwen2.5-3b")
    assert not (model_cache / "models" / "qwen2.5-3b").exists()


def test_hub_ids_are_passed_through():
    assert resolve_model_path("Qwen/Qwen2.5-7B-Instruct-AWQ") == "Qwen/Qwen2.5-7B-Instruct-AWQ"


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
@pytest.mark.parametrize("recipe, overrides", [
    ("paper", []),                                                          # 7B AWQ, the main runs
    ("paper", ["model.name_or_path=Qwen/Qwen2.5-32B-Instruct-AWQ"]),
    ("lora_rank", []),                                                      # the unquantised 7B of the rank ablation
    ("lora_rank", ["model.name_or_path=Qwen/Qwen2.5-7B-Instruct-AWQ", "model.quantization=awq"]),
    ("lora_rank", ["model.quantization=bnb4", "rollout.backend=hf", "eval.backend=hf"]),
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


@pytest.mark.parametrize("name, billions", [("qwen2.5-7b", 7.6), ("qwen2.5-14b", 14.8), ("qwen2.5-32b", 32.8)])
def test_qwen25_shapes_give_the_published_parameter_counts(name, billions):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    with torch.device("meta"):  # shapes only, no memory
        model = Qwen2ForCausalLM(Qwen2Config(**QWEN25_COMMON, **QWEN25_SHAPES[name]))
    assert sum(p.numel() for p in model.parameters()) / 1e9 == pytest.approx(billions, abs=0.05)
