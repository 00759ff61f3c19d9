"""The model catalogue, without torch: short model names, the Qwen2.5 shapes the memory checks and
the random stand-ins use, and the base model an adapter names."""

import json

import pytest

from nli_grpo.catalog import (
    QWEN25_COMMON,
    QWEN25_SHAPES,
    STAND_IN_FILENAME,
    adapter_base_model,
    default_quantization,
    model_key,
    model_shape,
    qwen_checkpoint,
    stand_in_shape,
)


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


def test_stand_in_names():
    assert stand_in_shape("tiny") == "tiny" and stand_in_shape("random:qwen2.5-14b") == "qwen2.5-14b"
    assert stand_in_shape("Qwen/Qwen2.5-7B-Instruct") is None
    with pytest.raises(ValueError, match="unknown random model shape 'qwen2.5-3b'.*qwen2.5-7b"):
        stand_in_shape("random:qwen2.5-3b")


def test_checkpoints_and_the_quantization_their_names_imply():
    assert qwen_checkpoint("32b", "awq") == "Qwen/Qwen2.5-32B-Instruct-AWQ"
    assert qwen_checkpoint("7b", "bnb4") == qwen_checkpoint("7b", "bf16") == "Qwen/Qwen2.5-7B-Instruct"
    assert default_quantization("/models/Qwen2.5-14B-Instruct-AWQ/") == "awq"
    assert default_quantization("Qwen/Qwen2.5-14B-Instruct") == "bf16"


def test_shapes_of_known_models_stand_ins_and_local_folders(tmp_path):
    assert model_shape("Qwen/Qwen2.5-7B-Instruct-AWQ")["hidden_size"] == 3584
    assert model_shape("random:qwen2.5-32b")["num_hidden_layers"] == 64
    assert model_shape("tiny")["vocab_size"] == 512
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 8}))
    assert model_shape(str(tmp_path)) == {"hidden_size": 8} and model_shape("acme/unknown-9b") is None


def test_the_base_an_adapter_names(tmp_path):
    adapter, stand_in = tmp_path / "adapter", tmp_path / "cache" / "qwen2.5-7b"
    adapter.mkdir()
    stand_in.mkdir(parents=True)
    (stand_in / STAND_IN_FILENAME).write_text(json.dumps({"name": "qwen2.5-7b"}))
    for base, expected in ((str(stand_in), "random:qwen2.5-7b"), ("Qwen/Qwen2.5-7B-Instruct", "Qwen/Qwen2.5-7B-Instruct")):
        (adapter / "adapter_config.json").write_text(json.dumps({"r": 8, "base_model_name_or_path": base}))
        assert adapter_base_model(adapter) == expected


# --------------------------------------------------------------------------- the 0.5B shape (nli_grpo.bench's realistic CPU shape)
def test_qwen25_0_5b_is_the_public_config():
    from nli_grpo.catalog import qwen25_config

    config = qwen25_config("qwen2.5-0.5b")
    assert {k: config[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                                   "num_key_value_heads", "vocab_size", "tie_word_embeddings", "rope_theta",
                                   "rms_norm_eps", "max_position_embeddings")} == dict(
        hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
        vocab_size=151936, tie_word_embeddings=True, rope_theta=1e6, rms_norm_eps=1e-6, max_position_embeddings=32768)
    assert qwen25_config("qwen2.5-7b") == {**QWEN25_COMMON, **QWEN25_SHAPES["qwen2.5-7b"]}  # the paper's sizes unchanged
    assert stand_in_shape("random:qwen2.5-0.5b") == "qwen2.5-0.5b"
    assert model_shape("random:qwen2.5-0.5b")["vocab_size"] == 151936
    assert model_shape("Qwen/Qwen2.5-0.5B-Instruct")["tie_word_embeddings"] is True
    assert model_shape("Qwen/Qwen2.5-7B-Instruct")["tie_word_embeddings"] is False
    assert qwen_checkpoint("0.5b", "bf16") == "Qwen/Qwen2.5-0.5B-Instruct"


def test_qwen25_0_5b_has_the_published_parameter_count():
    torch = pytest.importorskip("torch")
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from nli_grpo.catalog import qwen25_config

    with torch.device("meta"):
        model = Qwen2ForCausalLM(Qwen2Config(**qwen25_config("qwen2.5-0.5b")))
    assert sum(p.numel() for p in model.parameters()) / 1e9 == pytest.approx(0.494, abs=0.002)


def test_kv_cache_bytes_per_token():
    from nli_grpo.catalog import kv_cache_bytes_per_token

    # K and V x 24 layers x 2 KV heads x head dim 64, 4-byte floats
    assert kv_cache_bytes_per_token(model_shape("random:qwen2.5-0.5b"), 4) == 2 * 24 * 2 * 64 * 4
    assert kv_cache_bytes_per_token(model_shape("qwen2.5-7b") or model_shape("Qwen/Qwen2.5-7B-Instruct"), 2) == 2 * 28 * 4 * 128 * 2
