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
import tempfile
from importlib import resources
from pathlib import Path

import torch

from . import warmstart
from .cache import building, cache_dir, hub_cache_dir
from .catalog import (
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
    with torch.device(device):
        model = Qwen2ForCausalLM(config).to(dtype)
    model.generation_config = GenerationConfig(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    with _atomic_folder(target) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / STAND_IN_FILENAME).write_text(json.dumps({"name": name, "seed": seed, "random_weights": True}))


def _write_warm_started_model(target: Path, seed: int = 0) -> None:
    """Write `tiny-sft`: the tiny random model after its warm start (nli_grpo.warmstart), atomically."""
    base = resolve_model_path("tiny")
    with _atomic_folder(target) as tmp:
        warmstart.warm_start(base, tmp, seed=seed)
        record = {"name": "tiny-sft", "seed": seed, "random_weights": False, "base": "tiny", "warm_start": warmstart.describe()}
        (tmp / STAND_IN_FILENAME).write_text(json.dumps(record))


@contextlib.contextmanager
def _atomic_folder(target: Path):
    """A temp folder next to `target` to write into, renamed to `target` when the block succeeds,
    so concurrent jobs never see a half-written model."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        yield tmp
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
    """A hub id or folder as given; the stand-ins (`tiny`, `tiny-sft`, `random:<shape>`) are built
    once into the cache, by one job at a time."""
    name = stand_in_shape(name_or_path)
    if name is None:
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


def load_base_model(model_cfg: ModelConfig, dtype: torch.dtype | str, zero3: bool = False):
    """The frozen base model in the config's quantization, its non-quantised weights in `dtype`
    (a torch dtype, or `auto` for the checkpoint's own; see training_precision / eval_dtype).

    - bf16: the checkpoint as is (the name says unquantised; the weights are held in `dtype`).
    - awq: a pre-quantised AWQ checkpoint; transformers 5 reads its quantization_config and loads
      it through gptqmodel (AutoAWQ is archived). Needs a CUDA GPU and `pip install gptqmodel`.
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
    if torch.cuda.is_available() and not zero3:
        kwargs["device_map"] = {"": int(os.environ.get("LOCAL_RANK", "0"))}
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if model_cfg.quantization == "awq" and getattr(model.config, "quantization_config", None) is None:
        raise ValueError(f"model.quantization=awq but {model_cfg.name_or_path} has no quantization_config: "
                         "point model.name_or_path at a pre-quantised AWQ checkpoint (e.g. Qwen/Qwen2.5-7B-Instruct-AWQ)")
    model.config.use_cache = not model_cfg.gradient_checkpointing
    return model


def _require_awq_backend() -> None:
    import importlib.util

    if not torch.cuda.is_available():
        raise RuntimeError("AWQ checkpoints need a CUDA GPU (gptqmodel's AWQ kernels); use model.quantization=bf16 or bnb4 on this machine")
    if importlib.util.find_spec("gptqmodel") is None:
        raise RuntimeError("loading AWQ checkpoints needs gptqmodel: pip install 'nli_grpo[gpu]' (or pip install gptqmodel)")


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
    """The commit a hub model resolves to in the hub cache (what a job offline loads), or None for
    a local folder, a stand-in, or a model that is not in the cache."""
    from huggingface_hub import try_to_load_from_cache

    if stand_in_shape(name_or_path) is not None or Path(name_or_path).is_dir():
        return None
    found = try_to_load_from_cache(name_or_path, "config.json", cache_dir=hub_cache_dir(), revision=revision or "main")
    return Path(found).parent.name if isinstance(found, str) else None
