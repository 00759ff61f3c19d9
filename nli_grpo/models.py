"""Base models (bf16 / AWQ / bnb-4bit), the LoRA config, and local stand-ins that need no download:
a tiny random Qwen2 for CPU tests, the same warm-started on the answer format for smoke runs
(`tiny-sft`, nli_grpo.warmstart), and random-weight models with the real Qwen2.5 shapes for memory
and speed checks.

Every model goes through one loading path, `load_base_model`: the stand-ins are first written to a
local folder (`resolve_model_path`) and then loaded like a hub checkpoint, so tests exercise the
code a GPU job runs.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from importlib import resources
from pathlib import Path

import torch

from . import files, warmstart
from .cache import building, cache_dir, hub_cache_dir, staged_gguf
from .catalog import (
    GGUF_MODELS,
    QWEN25_COMMON,
    STAND_IN_FILENAME,
    TINY_SHAPE,
    TINY_VERSION,
    TINY_VOCAB_SIZE,
    model_key,
    qwen25_config,
    stand_in_shape,
)
from .config import ExperimentConfig, LoraConfig, ModelConfig

log = logging.getLogger(__name__)

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def chat_template() -> str:
    """The Qwen2.5 Instruct chat template (Jinja), as shipped in its tokenizer_config.json."""
    return resources.files("nli_grpo.assets").joinpath("qwen2_5_chat_template.jinja").read_text()


def _tokenizer_corpus() -> list[str]:
    from .prompts import LABELS, SYSTEM_PROMPT, USER_TEMPLATE

    words = " ".join(LABELS)
    base = [SYSTEM_PROMPT, USER_TEMPLATE, f"<think>{words}</think>", *(f"<answer>{w}</answer>" for w in LABELS)]
    prose = ("A man is playing a guitar on stage. The woman is not sleeping. Two dogs run across the "
             "field while children watch. Nobody is outside. The premise does not mention the weather.")
    return base * 20 + [prose] * 20


def build_tiny_tokenizer():
    """A small byte-level BPE tokenizer trained on the prompt text, with Qwen's special tokens and
    chat template, so prompts render exactly as they do for Qwen2.5 (only the ids differ)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB_SIZE, special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(_tokenizer_corpus(), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        chat_template=chat_template(), model_max_length=32768,
    )


def _qwen2_config(shape: dict, vocab_size: int, tokenizer=None):
    from transformers import Qwen2Config

    common = dict(QWEN25_COMMON, vocab_size=vocab_size, **shape)
    if tokenizer is not None:
        common.update(bos_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    if vocab_size < 10_000:
        common["max_position_embeddings"] = 4096
    return Qwen2Config(**common)


def _write_random_model(target: Path, name: str, seed: int = 0) -> None:
    """Write a randomly initialised Qwen2 checkpoint + tokenizer folder, atomically (build in a
    temp folder, rename), so concurrent jobs never see a half-written model."""
    from transformers import GenerationConfig, Qwen2ForCausalLM

    tokenizer = build_tiny_tokenizer()
    if name == "tiny":
        config, dtype = _qwen2_config(TINY_SHAPE, len(tokenizer), tokenizer), torch.float32
    else:
        fields = qwen25_config(name)  # the size's public config.json (shape, vocabulary, tied head)
        config, dtype = _qwen2_config(fields, fields.pop("vocab_size"), tokenizer), torch.bfloat16
    torch.manual_seed(seed)
    device = "cuda" if torch.cuda.is_available() and name != "tiny" else "cpu"
    model = _random_qwen2(Qwen2ForCausalLM, config, dtype, device)
    model.generation_config = GenerationConfig(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    with _atomic_folder(target) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / STAND_IN_FILENAME).write_text(json.dumps({"name": name, "seed": seed, "random_weights": True}))


def _random_qwen2(model_class, config, dtype: torch.dtype, device: str):
    """A randomly initialised model built in `dtype` from the start: built in float32 and cast,
    Qwen2.5-32B would need ~131 GB on the GPU for a moment."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            return model_class(config)
    finally:
        torch.set_default_dtype(default)


#: The AWQ format the Qwen2.5 AWQ checkpoints use (their config.json's quantization_config).
AWQ_QUANTIZATION_CONFIG = {"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True, "version": "gemm",
                           "modules_to_not_convert": None}


def write_random_awq_model(target: Path, name: str, seed: int = 0) -> None:
    """Write a random-weight checkpoint of a Qwen2.5 shape (`qwen2.5-7b`) in the AWQ GEMM format
    of the published AWQ checkpoints, with the tiny tokenizer, atomically: for GPU checks of the
    AWQ paths (gptqmodel's kernels, vLLM) on machines that cannot download a real one. Every
    linear layer of the decoder is int4: `qweight` (in, out/8) and `qzeros` (in/128, out/8) packed
    into int32, `scales` (in/128, out) in float16; the zero point is 8 and the scale makes the
    weights' spread about Qwen's initialiser's (0.02). Any int4 values are valid weights, so no
    packing order matters for random ones. Embeddings, norms, biases and LM head stay float16."""
    from safetensors.torch import save_file
    from transformers import GenerationConfig

    tokenizer = build_tiny_tokenizer()
    fields = qwen25_config(name)
    config = _qwen2_config(fields, fields.pop("vocab_size"), tokenizer)
    config.quantization_config = dict(AWQ_QUANTIZATION_CONFIG)
    config.dtype = torch.float16
    h, inter, vocab = config.hidden_size, config.intermediate_size, config.vocab_size
    kv = config.num_key_value_heads * (h // config.num_attention_heads)
    group = AWQ_QUANTIZATION_CONFIG["group_size"]
    generator = torch.Generator().manual_seed(seed)
    zeros_8 = int.from_bytes(bytes([0x88] * 4), "little", signed=True)  # eight nibbles of 8
    scale = 0.02 / 4.6  # (q - 8) for q uniform in 0..15 has a standard deviation of ~4.6

    def normal(*size):
        return (torch.randn(*size, generator=generator) * 0.02).half()

    state = {"model.embed_tokens.weight": normal(vocab, h), "model.norm.weight": torch.ones(h, dtype=torch.float16)}
    if not config.tie_word_embeddings:
        state["lm_head.weight"] = normal(vocab, h)
    linears = {"self_attn.q_proj": (h, h, True), "self_attn.k_proj": (h, kv, True), "self_attn.v_proj": (h, kv, True),
               "self_attn.o_proj": (h, h, False), "mlp.gate_proj": (h, inter, False), "mlp.up_proj": (h, inter, False),
               "mlp.down_proj": (inter, h, False)}
    for layer in range(config.num_hidden_layers):
        prefix = f"model.layers.{layer}."
        state[prefix + "input_layernorm.weight"] = torch.ones(h, dtype=torch.float16)
        state[prefix + "post_attention_layernorm.weight"] = torch.ones(h, dtype=torch.float16)
        for module, (n_in, n_out, bias) in linears.items():
            state[f"{prefix}{module}.qweight"] = torch.randint(-2**31, 2**31, (n_in, n_out // 8), dtype=torch.int32, generator=generator)
            state[f"{prefix}{module}.qzeros"] = torch.full((n_in // group, n_out // 8), zeros_8, dtype=torch.int32)
            state[f"{prefix}{module}.scales"] = torch.full((n_in // group, n_out), scale, dtype=torch.float16)
            if bias:
                state[f"{prefix}{module}.bias"] = torch.zeros(n_out, dtype=torch.float16)
    with _atomic_folder(target) as tmp:
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        config.save_pretrained(tmp)
        GenerationConfig(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id).save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / STAND_IN_FILENAME).write_text(json.dumps({"name": name, "seed": seed, "random_weights": True, "format": "awq"}))


def _write_warm_started_model(target: Path, seed: int = 0) -> None:
    """Write `tiny-sft`: the tiny random model after its warm start (nli_grpo.warmstart), atomically."""
    base = resolve_model_path("tiny")
    with _atomic_folder(target) as tmp:
        warmstart.warm_start(base, tmp, seed=seed)
        record = {"name": "tiny-sft", "seed": seed, "random_weights": False, "base": "tiny", "warm_start": warmstart.describe()}
        (tmp / STAND_IN_FILENAME).write_text(json.dumps(record))


#: Version of write_gguf_model's output: a model staged by an older conversion is staged again
#: (2: the tokenizer's special tokens are the file's).
GGUF_CONVERSION = 2


def write_gguf_model(gguf_file: Path, target: Path) -> None:
    """Write the model in a GGUF file as an HF model folder (float32 safetensors, its config,
    generation config and tokenizer, the chat template from the file's metadata), atomically.

    transformers dequantises the GGUF tensors on loading (with the `gguf` package) but marks the
    model as GGUF-quantised (config.quantization_config, the quantizer), which save_pretrained
    refuses; the model is therefore rebuilt from its config without that marker and given the
    dequantised state dict. Float32 holds every dequantised value exactly (GGUF's block scales are
    float16)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_file.parent), gguf_file.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = loaded.config
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    # The special tokens are the file's (tokenizer.ggml.{bos,eos,padding}_token_id, which the
    # config carries): transformers 5.17's GGUF tokenizer conversion names <|im_start|> as EOS for
    # SmolLM2 (5.19's names <|im_end|>), and generation would then not stop where vLLM stops.
    for role in ("bos", "eos", "pad"):
        if (token_id := getattr(config, f"{role}_token_id", None)) is not None:
            setattr(tokenizer, f"{role}_token", tokenizer.convert_ids_to_tokens(token_id))
    with _atomic_folder(target) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)


@contextlib.contextmanager
def _atomic_folder(target: Path):
    """A temp folder next to `target` to write into, renamed to `target` when the block succeeds,
    so concurrent jobs never see a half-written model. Its files get the modes open() would give
    them under the umask (safetensors writes 0600): a lab's shared cache serves all its users."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = files.new_temp_folder(target.parent, prefix=f".{target.name}.")
    try:
        yield tmp
        files.follow_umask(tmp)
        os.replace(tmp, target) if not target.exists() else shutil.rmtree(tmp)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _stand_in_folder(name: str) -> str:
    """The cache folder of a stand-in, versioned so that a changed build is rebuilt."""
    if name == "tiny":
        return f"tiny-v{TINY_VERSION}"
    if name == "tiny-sft":
        return f"tiny-sft-v{TINY_VERSION}.{warmstart.WARM_START_VERSION}"
    return name


def resolve_model_path(name_or_path: str) -> str:
    """A hub id or folder as given; a model staged from a GGUF file (`prepare --gguf`), its folder in
    the cache; the stand-ins (`tiny`, `tiny-sft`, `random:<shape>`) are built once into the cache,
    by one job at a time."""
    name = stand_in_shape(name_or_path)
    if name is None:
        staged = staged_gguf(name_or_path) if not Path(name_or_path).is_dir() else None
        if staged is not None:
            return staged["path"]
        if name_or_path in GGUF_MODELS:
            raise FileNotFoundError(f"model {name_or_path} is not staged in the cache {cache_dir()}: "
                                    f"run `python -m nli_grpo.prepare --gguf {name_or_path}` first")
        return name_or_path
    target = cache_dir() / "models" / _stand_in_folder(name)
    if not (target / "config.json").exists():
        with building(target):
            if not (target / "config.json").exists():  # another job may have built it while this one waited
                log.info("building stand-in model %s in %s", name, target)
                if name == "tiny-sft":
                    _write_warm_started_model(target)
                else:
                    _write_random_model(target, name)
    return str(target)


def training_precision(cfg: ExperimentConfig, cuda: bool) -> dict:
    """How training holds and computes the model: `dtype` of the base weights and the trainer's
    `bf16` / `fp16` autocast flags. On a GPU: model.dtype and grpo.mixed_precision (the paper
    recipes: float16 weights under bf16 autocast, the authors' settings); on a CPU: float32, no
    autocast (exact there, and as fast)."""
    if not cuda:
        return {"dtype": torch.float32, "bf16": False, "fp16": False}
    return {"dtype": getattr(torch, cfg.model.dtype), "bf16": cfg.grpo.mixed_precision == "bf16",
            "fp16": cfg.grpo.mixed_precision == "fp16"}


def eval_dtype(cfg: ExperimentConfig, cuda: bool) -> torch.dtype | str:
    """Dtype of the base during evaluation: eval.dtype on a GPU (`auto` = the checkpoint's own, as
    the authors' vLLM evaluation), float32 on a CPU."""
    if not cuda:
        return torch.float32
    return "auto" if cfg.eval.dtype == "auto" else getattr(torch, cfg.eval.dtype)


def load_tokenizer(model_cfg: ModelConfig):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(
        resolve_model_path(model_cfg.name_or_path), revision=model_cfg.revision,
        trust_remote_code=model_cfg.trust_remote_code,
    )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_base_model(model_cfg: ModelConfig, dtype: torch.dtype | str, zero3: bool = False, training: bool = False):
    """The frozen base model in the config's quantization, its non-quantised weights in `dtype`
    (a torch dtype, or `auto` for the checkpoint's own; see training_precision / eval_dtype).
    `training`: the model will be trained (LoRA on top), not only run.

    - bf16: the checkpoint as is (the name says unquantised; the weights are held in `dtype`).
    - awq: a pre-quantised AWQ checkpoint; transformers 5 reads its quantization_config and loads
      it through gptqmodel (AutoAWQ is archived), with trainable kernels when `training`
      (awq_loading_config). Needs a CUDA GPU and gptqmodel >= GPTQMODEL_MIN_VERSION.
    - bnb4: bitsandbytes NF4 with double quantisation, quantised at load time (QLoRA), computing in
      `dtype` (bfloat16 for `auto`).

    Under torchrun each process loads onto its own GPU (LOCAL_RANK); under DeepSpeed ZeRO-3 no
    device map is given (DeepSpeed partitions the weights; its config must exist first)."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    path = resolve_model_path(model_cfg.name_or_path)
    kwargs = dict(
        dtype=dtype, revision=model_cfg.revision, trust_remote_code=model_cfg.trust_remote_code,
        attn_implementation=model_cfg.attn_implementation,
    )
    if model_cfg.quantization == "bnb4":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16 if dtype == "auto" else dtype,
        )
    elif model_cfg.quantization == "awq":
        _require_awq_backend()
        if training:
            kwargs["quantization_config"] = awq_loading_config(training=True)
    if torch.cuda.is_available() and not zero3:
        kwargs["device_map"] = {"": int(os.environ.get("LOCAL_RANK", "0"))}
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if model_cfg.quantization == "awq" and getattr(model.config, "quantization_config", None) is None:
        raise ValueError(f"model.quantization=awq but {model_cfg.name_or_path} has no quantization_config: "
                         "point model.name_or_path at a pre-quantised AWQ checkpoint (e.g. Qwen/Qwen2.5-7B-Instruct-AWQ)")
    model.config.use_cache = not model_cfg.gradient_checkpointing
    return model


def awq_loading_config(training: bool):
    """The AwqConfig from_pretrained gets for an AWQ checkpoint: only its loading attribute, the
    gptqmodel kernel (`backend`), counts; transformers keeps the checkpoint's quantization_config
    and overrides that attribute (AutoHfQuantizer.merge_quantization_configs). Training needs
    `auto_trainable`: gptqmodel's `auto` picks Machete / Marlin / ExllamaV2 on CUDA, inference-only
    kernels whose train() raises NotImplementedError at the trainer's first model.train().
    Evaluation keeps `auto` (the fastest kernels)."""
    from transformers import AwqConfig

    return AwqConfig(backend="auto_trainable" if training else "auto")


#: transformers 5 loads AWQ through gptqmodel's hf_select_quant_linear_v2, first in gptqmodel 5.6.
GPTQMODEL_MIN_VERSION = "5.6"


def awq_backend_problem(cuda: bool, gptqmodel_version: str | None) -> str | None:
    """Why AWQ checkpoints cannot load here (no GPU, no or too old gptqmodel); None when they can."""
    from packaging.version import Version

    if not cuda:
        return "AWQ checkpoints need a CUDA GPU (gptqmodel's AWQ kernels); use model.quantization=bf16 or bnb4 on this machine"
    if gptqmodel_version is None:
        return "loading AWQ checkpoints needs gptqmodel: pip install 'nli_grpo[gpu]'"
    if Version(gptqmodel_version) < Version(GPTQMODEL_MIN_VERSION):
        return (f"gptqmodel {gptqmodel_version} is too old for transformers 5's AWQ loading (needs >= {GPTQMODEL_MIN_VERSION}, "
                "hf_select_quant_linear_v2): pip install 'nli_grpo[gpu]'")
    return None


def _require_awq_backend() -> None:
    import importlib.metadata

    try:
        installed = importlib.metadata.version("gptqmodel")
    except importlib.metadata.PackageNotFoundError:
        installed = None
    problem = awq_backend_problem(torch.cuda.is_available(), installed)
    if problem:
        raise RuntimeError(problem)


def peft_lora_config(lora: LoraConfig):
    """PEFT LoraConfig from ours: alpha = rank unless set, no bias, causal-LM task."""
    from peft import LoraConfig as PeftLoraConfig

    return PeftLoraConfig(
        r=lora.rank, lora_alpha=lora.alpha or lora.rank, lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules), bias="none", task_type="CAUSAL_LM",
    )


def describe(cfg: ExperimentConfig) -> dict:
    """What the result records about the model beyond the config: the resolved path and revision
    (the commit of a hub model in the cache; None for a local folder or a stand-in), and how
    training holds and computes it (weights dtype, bf16 / fp16 autocast)."""
    path = resolve_model_path(cfg.model.name_or_path)
    precision = training_precision(cfg, torch.cuda.is_available())
    return {
        "key": cfg.model.key or model_key(cfg.model.name_or_path),
        "path": path,
        "revision": hub_revision(cfg.model.name_or_path, cfg.model.revision),
        "dtype": str(precision["dtype"]).removeprefix("torch."),
        "bf16": precision["bf16"],
        "fp16": precision["fp16"],
        "random_weights": _stand_in_record(path).get("random_weights", False),
    }


def _stand_in_record(path: str) -> dict:
    """What a stand-in's folder says it is (name, random weights, warm start); {} for a real model."""
    record = Path(path, STAND_IN_FILENAME)
    return json.loads(record.read_text()) if record.is_file() else {}


def hub_revision(name_or_path: str, revision: str | None) -> str | None:
    """The commit a hub model resolves to in the hub cache (what a job offline loads), `gguf-sha256:<hex>`
    for a model staged from a GGUF file, or None for a local folder, a stand-in, or a model that is
    not in the cache."""
    from huggingface_hub import try_to_load_from_cache

    if stand_in_shape(name_or_path) is not None or Path(name_or_path).is_dir():
        return None
    staged = staged_gguf(name_or_path)
    if staged is not None:
        return staged["revision"]
    found = try_to_load_from_cache(name_or_path, "config.json", cache_dir=hub_cache_dir(), revision=revision or "main")
    return Path(found).parent.name if isinstance(found, str) else None
