"""Grid cells: what identifies one run of a sweep and its stable id; sweep axes -> cells (plain and
linked axes); per-size Slurm resources; the capability matrix and the GPU memory fit checked before
anything is submitted."""

from __future__ import annotations

import itertools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from . import cache
from .catalog import GGUF_MODELS, kv_cache_bytes_per_token, model_key, model_shape, qwen_checkpoint, stand_in_shape
from .config import ExperimentConfig, training_processes


def cell_from_config(cfg: ExperimentConfig) -> dict:
    """The axes that identify a run: model, quantization, LoRA rank (None for zero-shot), seed,
    stage, rollout backend, the rollouts' max_staleness when not 0, plus any `output.extra_axes`."""
    zero_shot = cfg.stage == "zero_shot"
    cell = {
        "model": cfg.model.key or model_key(cfg.model.name_or_path),
        "quantization": cfg.model.quantization,
        "lora_rank": None if zero_shot else cfg.lora.rank,
        "seed": cfg.seed,
        "stage": cfg.stage,
        "rollout": None if zero_shot else cfg.rollout.backend,
        **cfg.output.extra_axes,
    }
    if cfg.rollout.max_staleness and not zero_shot:  # only when set: on-policy cells keep their ids
        cell["max_staleness"] = cfg.rollout.max_staleness
    return cell


def cell_id(cell: dict) -> str:
    """Stable, path-safe id derived from the cell's axes only: the same cell always maps to the
    same folder, e.g. `qwen2.5-7b__awq__r64__s0`, `qwen2.5-32b__bf16__r64__s0__vllm_server__stale1`
    or `qwen2.5-7b__awq__zero-shot`."""
    parts = [cell["model"], cell["quantization"]]
    if cell.get("stage") == "zero_shot":
        parts.append("zero-shot")
    else:
        parts += [f"r{cell['lora_rank']}", f"s{cell['seed']}"]
        if cell.get("rollout") not in (None, "hf"):
            parts.append(cell["rollout"])
        if cell.get("max_staleness"):
            parts.append(f"stale{cell['max_staleness']}")
    extra = sorted(k for k in cell if k not in {"model", "quantization", "lora_rank", "seed", "stage", "rollout", "max_staleness"})
    parts += [f"{k}-{cell[k]}" for k in extra]
    return re.sub(r"[^A-Za-z0-9._-]+", "-", "__".join(str(p) for p in parts))


# --------------------------------------------------------------------------- sweep axes -> cells
#: What one cell asks Slurm for, per model size (one GPU each: the paper trained every size,
#: 32B AWQ included, on one GPU). Applied through the model variants below; the CLI overrides them.
SIZE_RESOURCES = {
    "7b": {"gpus_per_node": 1, "cpus_per_task": 8, "mem_gb": 64, "timeout_min": 24 * 60, "gpu_memory_gb": 80},
    "14b": {"gpus_per_node": 1, "cpus_per_task": 8, "mem_gb": 96, "timeout_min": 36 * 60, "gpu_memory_gb": 80},
    "32b": {"gpus_per_node": 1, "cpus_per_task": 8, "mem_gb": 128, "timeout_min": 48 * 60, "gpu_memory_gb": 80},
}


#: Unquantised 14B / 32B: training and colocated vLLM rollouts do not fit one 80 GB GPU together
#: (grid.memory_problems), so these variants run the vLLM server on a GPU of its own and train on
#: the others (32B: on two, sharded with ZeRO-3, which also fits the 32-completion lora_rank recipe).
SERVER_VARIANTS = {
    ("14b", "bf16"): {"rollout.backend": "vllm_server", "resources.gpus_per_node": 2},
    ("32b", "bf16"): {"rollout.backend": "vllm_server", "resources.gpus_per_node": 3, "grpo.deepspeed": "zero3"},
}
#: bnb-4bit: rollouts and evaluation through HF generate; the GPU install's vLLM (0.31) has no
#: bitsandbytes quantization (config validation refuses bnb4 with vLLM).
HF_ONLY = {"rollout.backend": "hf", "eval.backend": "hf"}


def qwen(size: str, quantization: str) -> dict:
    """One model variant as a linked axis value: the Qwen2.5-Instruct checkpoint that goes with the
    quantization (AWQ needs the pre-quantised `-AWQ` checkpoint) plus the size's Slurm resources
    (and, for unquantised 14B / 32B, rollouts from a vLLM server on a GPU of its own)."""
    return {
        "model.name_or_path": qwen_checkpoint(size, quantization),
        "model.quantization": quantization,
        **{f"resources.{k}": v for k, v in SIZE_RESOURCES[size].items()},
        **SERVER_VARIANTS.get((size, quantization), {}),
        **(HF_ONLY if quantization == "bnb4" else {}),
    }


@dataclass
class Grid:
    """One block of a sweep: a recipe and the axes crossed over it.

    `axes` maps a dotted config key to its values (`{"lora.rank": [8, 16]}`), or an axis name to a
    list of dicts of dotted keys: a *linked* axis whose keys change together (`{"model": [qwen("7b",
    "bf16"), qwen("7b", "awq")]}`). `overrides` apply to every cell of the block; `tags` become
    extra cell axes (`output.extra_axes`), which keep two blocks' otherwise equal cells apart."""

    recipe: str
    axes: dict = field(default_factory=dict)
    overrides: list = field(default_factory=list)
    tags: dict = field(default_factory=dict)

    def cells(self, seeds) -> list[list[str]]:
        """The override lists of every cell: the product of the axes and the seeds."""
        axes = [[_as_overrides(key, v) for v in values] for key, values in self.axes.items()]
        axes.append([[f"seed={s}"] for s in seeds])
        tags = [f"output.extra_axes.{k}={v}" for k, v in self.tags.items()]
        return [[*self.overrides, *tags, *itertools.chain(*combo)] for combo in itertools.product(*axes)]


def _as_overrides(key: str, value) -> list[str]:
    if isinstance(value, dict):
        return [f"{k}={_yaml_value(v)}" for k, v in value.items()]
    return [f"{key}={_yaml_value(value)}"]


def _yaml_value(value) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def axis_values(grid: Grid, key: str) -> list:
    """The values a dotted key takes in a block: a plain axis, the linked entries that set it, or []."""
    values = grid.axes.get(key)
    if values is not None:
        return list(values)
    return [v[key] for values in grid.axes.values() for v in values if isinstance(v, dict) and key in v]


def restrict_axis(grid: Grid, key: str, wanted: list, matches=lambda value, want: value == want) -> Grid:
    """The block with dotted `key` limited to `wanted`: a plain axis takes the wanted values, a
    linked axis keeps its entries whose `key` matches one, and a block without the key gets it as a
    new axis. Raises ValueError when a linked axis has no matching entry."""
    axes = dict(grid.axes)
    linked = [name for name, values in axes.items() if any(isinstance(v, dict) and key in v for v in values)]
    if key in axes or not linked:
        axes[key] = list(wanted)
    for name in linked:
        kept = [v for v in axes[name] if any(matches(v[key], w) for w in wanted)]
        if not kept:
            have = ", ".join(str(v[key]) for v in axes[name])
            raise ValueError(f"no {name} variant with {key} in {list(wanted)}; this sweep has: {have}")
        axes[name] = kept
    return Grid(grid.recipe, axes, list(grid.overrides), dict(grid.tags))


# --------------------------------------------------------------------------- capability matrix
#: model.quantization -> what a cell needs (checked before submission by `capability_problems`).
CAPABILITIES = {
    "bf16": "any node",
    "awq": "a pre-quantised AWQ checkpoint (e.g. Qwen/Qwen2.5-7B-Instruct-AWQ) and a GPU node (AWQ kernels are CUDA-only)",
    "bnb4": "bitsandbytes installed in the job's environment",
}


def _installed(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def capability_problems(cfg: ExperimentConfig) -> list[str]:
    """What makes a valid config impossible to run as requested (quantization backends, GPU-only
    optimizers, missing libraries, unknown models); empty when it can run. Jobs run in the
    submitting environment, so library checks look at this one."""
    problems = []
    gpus = cfg.resources.gpus_per_node
    quant = cfg.model.quantization
    if model_shape(cfg.model.name_or_path) is None:
        problems.append(f"unknown model {cfg.model.name_or_path!r}: use a Qwen2.5 Instruct checkpoint "
                        f"(Qwen/Qwen2.5-{{7B,14B,32B}}-Instruct[-AWQ]), `tiny`, `random:qwen2.5-7b`, or a local folder with a config.json")
    if quant == "awq" and gpus < 1:
        problems.append(f"model.quantization=awq needs {CAPABILITIES['awq']}; this cell asks for resources.gpus_per_node=0")
    if quant == "bnb4" and not _installed("bitsandbytes"):
        problems.append(f"model.quantization=bnb4 needs {CAPABILITIES['bnb4']}: pip install bitsandbytes")
    if "8bit" in cfg.grpo.optim and gpus < 1 and cfg.stage == "grpo":
        problems.append(f"grpo.optim={cfg.grpo.optim} (bitsandbytes) needs a GPU; use grpo.optim=adamw_torch on CPU nodes")
    for what, backend in (("rollout.backend", cfg.rollout.backend if cfg.stage == "grpo" else None),
                          ("eval.backend", cfg.eval.backend if cfg.eval.after_training else None)):
        if backend == "vllm" and not _installed("vllm"):
            problems.append(f"{what}=vllm needs vLLM installed (pip install 'nli_grpo[gpu]'), or set {what}=hf")
    tensor_parallel = server_gpus(cfg)
    shape = model_shape(cfg.model.name_or_path)
    if tensor_parallel > 1 and shape is not None:
        heads, kv_heads = shape["num_attention_heads"], shape["num_key_value_heads"]
        if heads % tensor_parallel or (kv_heads % tensor_parallel and tensor_parallel % kv_heads):
            fitting = [n for n in range(1, heads + 1) if heads % n == 0 and (kv_heads % n == 0 or n % kv_heads == 0)][:6]
            problems.append(f"rollout.server_gpus={tensor_parallel} is vLLM's tensor-parallel size, which must divide the model's "
                            f"{heads} attention heads and fit its {kv_heads} KV heads: use one of {', '.join(map(str, fitting))}")
    if cfg.stage == "zero_shot" and not cfg.eval.after_training:
        problems.append("stage=zero_shot only evaluates; it needs eval.after_training=true")
    return problems


# --------------------------------------------------------------------------- inputs on disk
def input_problems(cfg: ExperimentConfig, online: bool = False) -> list[str]:
    """Inputs of a cell that its job could not find: jobs run offline (HF_HUB_OFFLINE) against the
    prepared cache, so a hub model must be there (or a local folder), and every dataset the cell
    reads must be a local file or prepared. With `online` (the nodes reach the hub), only what the
    hub cannot provide counts (the hard pool). Empty when the job has everything it needs."""
    from .data import BENCHMARKS, TRAIN_SOURCES, local_file

    problems = []
    name = cfg.model.name_or_path
    local = stand_in_shape(name) is not None or Path(name).is_dir() or cache.staged_gguf(name) is not None
    if name in GGUF_MODELS and not local:  # no hub holds it: only `prepare --gguf` does, online or not
        problems.append(f"model {name} is not staged in the cache {cache.cache_dir()} (python -m nli_grpo.prepare --gguf {name})")
    elif not online and not local and not cache.prepared_model(name, cfg.model.revision):
        at = f" at revision {cfg.model.revision}" if cfg.model.revision else ""
        problems.append(f"model {name}{at} is not in the cache {cache.hub_cache_dir()} (jobs run offline)")
    specs = [BENCHMARKS[b] for b in cfg.eval.benchmarks] if cfg.eval.after_training else []
    if cfg.stage == "grpo":
        specs.append(TRAIN_SOURCES[cfg.data.train_source])
    missing = [s.name for s in specs if local_file(s, cfg.data.local_dir, cfg.data.files) is None
               and (not online or s.hub_id is None)]
    if missing:
        where = f"data.local_dir={cfg.data.local_dir}" if cfg.data.local_dir else "no data.local_dir"
        problems.append(f"data not found locally ({where}) nor in the prepared cache {cache.data_dir()}: {', '.join(missing)}")
    return problems


# --------------------------------------------------------------------------- GPU memory fit
_BYTES_PER_LINEAR_WEIGHT = {"bf16": 2.0, "awq": 0.52, "bnb4": 0.53}  # 4-bit + group-128 scales / zeros
_LORA_BYTES_PER_PARAM = {"8bit": 4 + 4 + 2, "other": 4 + 4 + 8}     # fp32 weight + grad + Adam moments
_OVERHEAD_GB = 2.0   # CUDA context, allocator fragmentation
_VLLM_KV_GB = 6.0    # the KV cache nli_grpo.rollout adds to the weights for its derived share
_VLLM_GRAPHS_GB = 0.5  # vLLM's CUDA graphs (capture sizes up to max_num_seqs) and workspace
#: TRL 1.16's fused LM head computes log-probs in tiles of 4,096 tokens x 32,768 vocabulary entries
#: (trl/kernels/chunked_logprob.py) and never holds a batch's logits; a tile in float32, with its gradient.
_LM_HEAD_TILE_GB = 4096 * 32768 * 4 * 2 / 2.0**30


def base_weights_gb(cfg: ExperimentConfig) -> float | None:
    """Memory of the frozen base weights in GB (2**30 bytes) in the cell's quantization, from the
    model's shape; None for an unknown model."""
    shape = model_shape(cfg.model.name_or_path)
    if shape is None:
        return None
    h, inter, layers = shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"]
    kv_dim = shape["num_key_value_heads"] * (h // shape["num_attention_heads"])
    linear_params = layers * (2 * h * h + 2 * h * kv_dim + 3 * h * inter)
    tables = 1 if shape.get("tie_word_embeddings") else 2  # embeddings (+ lm_head unless tied) stay 16-bit
    embeddings = tables * shape["vocab_size"] * h * 2
    return (linear_params * _BYTES_PER_LINEAR_WEIGHT[cfg.model.quantization] + embeddings) / 2.0**30


#: vLLM CPU backend: the KV cache holds at least this many full-length sequences, at most this share of host memory.
_CPU_KV_MIN_SEQUENCES = 16
_CPU_KV_MAX_HOST_SHARE = 0.25


def vllm_cpu_kv_cache_bytes(cfg: ExperimentConfig, purpose: str, max_model_len: int, dtype_bytes: int,
                            host_bytes: int) -> int:
    """KV cache bytes for vLLM on the CPU, sized from the need: enough for every sequence a step
    generates at once (grpo.completions_per_step; the evaluation: eval.batch_size, at least
    _CPU_KV_MIN_SEQUENCES) at `max_model_len` tokens each, with 25% headroom, capped at
    _CPU_KV_MAX_HOST_SHARE of `host_bytes`. (vLLM's CPU default, a share of host memory minus
    what the worker already holds, refuses to start once the weights outgrow that share, e.g.
    Qwen2.5-0.5B in float32 with the 0.2 a 24 GiB machine allows.)"""
    shape = model_shape(cfg.model.name_or_path)
    per_token = kv_cache_bytes_per_token(shape, dtype_bytes) if shape else 2**20  # unknown model: 1 MiB a token
    sequences = max(_CPU_KV_MIN_SEQUENCES, cfg.eval.batch_size if purpose == "eval" else cfg.grpo.completions_per_step)
    need = int(per_token * max_model_len * sequences * 1.25)
    return max(per_token * max_model_len, min(need, int(host_bytes * _CPU_KV_MAX_HOST_SHARE)))


def rollout_max_model_len(cfg: ExperimentConfig) -> int:
    """The context of a rollout engine: rollout.max_model_len, else a prompt plus a completion."""
    return cfg.rollout.max_model_len or cfg.grpo.max_prompt_length + cfg.grpo.max_completion_length


def vllm_rollout_limits(cfg: ExperimentConfig, reused_for_eval: bool = False) -> dict:
    """Scheduler limits of the colocated rollout engine on a GPU, sized to a generation batch
    instead of vLLM's defaults (on an H100: 1,024 sequences, 16,384 tokens per step), whose
    activation, sampler and CUDA-graph memory would come out of the rollout share and leave
    little of it for the KV cache: `max_num_seqs` = the batch's completions (eval.batch_size at
    least when the evaluation reuses the engine); `max_num_batched_tokens` = the batch's prompts
    prefilled in one step, at least one full-length sequence."""
    g = cfg.grpo
    seqs = max(g.completions_per_step, cfg.eval.batch_size) if reused_for_eval else g.completions_per_step
    prompts = g.completions_per_step // g.num_generations
    return {"max_num_seqs": seqs, "max_num_batched_tokens": max(rollout_max_model_len(cfg), prompts * g.max_prompt_length)}


def vllm_runtime_gb(cfg: ExperimentConfig, limits: dict) -> float:
    """What a vLLM engine holds besides weights and KV cache, under `limits`: the profiling
    forward's activations over max_num_batched_tokens (one layer's q/k/v, attention output and
    MLP gate/up at 16-bit), the sampler's float32 logits of max_num_seqs rows, and
    _VLLM_GRAPHS_GB of CUDA graphs and workspace. A formula from the shapes, not a measurement."""
    shape = model_shape(cfg.model.name_or_path)
    if shape is None:
        return _VLLM_GRAPHS_GB
    h, inter = shape["hidden_size"], shape["intermediate_size"]
    activations = limits["max_num_batched_tokens"] * (4 * h + 3 * inter) * 2
    sampler = limits["max_num_seqs"] * shape["vocab_size"] * 4 * 2  # logits and probabilities
    return (activations + sampler) / 2.0**30 + _VLLM_GRAPHS_GB


def vllm_rollout_kv_gb(cfg: ExperimentConfig, gpu_gb: float) -> float:
    """KV cache left to the colocated rollout engine: its share minus weights and runtime."""
    limits = vllm_rollout_limits(cfg)
    return vllm_rollout_share(cfg, gpu_gb) * gpu_gb - (base_weights_gb(cfg) or 16.0) - vllm_runtime_gb(cfg, limits)


def vllm_kv_need_gb(cfg: ExperimentConfig) -> float | None:
    """KV cache one generation batch needs: every completion at full length at once (16-bit)."""
    shape = model_shape(cfg.model.name_or_path)
    if shape is None:
        return None
    return cfg.grpo.completions_per_step * rollout_max_model_len(cfg) * kv_cache_bytes_per_token(shape, 2) / 2.0**30


def vllm_rollout_share(cfg: ExperimentConfig, gpu_gb: float) -> float:
    """Share of a GPU of `gpu_gb` that colocated vLLM rollouts take: rollout.gpu_memory_utilization
    when set, else the base weights plus a KV cache of _VLLM_KV_GB, between 0.15 and 0.6. The
    sweep validator and the job both use this, so what is checked is what is asked for."""
    if cfg.rollout.gpu_memory_utilization:
        return cfg.rollout.gpu_memory_utilization
    weights = base_weights_gb(cfg) or 16.0  # unknown model: assume a 7B in bf16
    runtime = vllm_runtime_gb(cfg, vllm_rollout_limits(cfg))
    return round(min(0.6, max(0.15, (weights + runtime + _VLLM_KV_GB) / gpu_gb)), 3)


def estimate_gpu_memory(cfg: ExperimentConfig) -> dict | None:
    """Rough per-GPU memory of a cell in GB (2**30 bytes), by component, with `total`: the frozen
    base weights, LoRA weights + grads + optimizer, activations (gradient checkpointing aware) and
    completion logits of one micro-batch, HF generation's KV cache, vLLM's colocated share, and a
    fixed overhead. An upper-side estimate meant to catch cells that cannot fit, not to tune
    batch sizes. None for CPU-only cells or unknown models."""
    shape = model_shape(cfg.model.name_or_path)
    if shape is None or cfg.resources.gpus_per_node < 1:
        return None
    gpus = training_processes(cfg)  # the GPUs that train (the server's are estimated apart)
    h, inter, layers = shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"]
    kv_dim = shape["num_key_value_heads"] * (h // shape["num_attention_heads"])
    linears = {"q_proj": (h, h), "k_proj": (h, kv_dim), "v_proj": (h, kv_dim), "o_proj": (h, h),
               "gate_proj": (h, inter), "up_proj": (h, inter), "down_proj": (inter, h)}
    gb = 2.0**30
    weights = base_weights_gb(cfg)
    if cfg.grpo.deepspeed == "zero3":
        weights /= gpus
    parts = {"weights": weights}
    g = cfg.grpo
    if cfg.stage == "grpo":
        lora_params = layers * cfg.lora.rank * sum(sum(linears[t]) for t in cfg.lora.target_modules)
        parts["lora_optimizer"] = lora_params * _LORA_BYTES_PER_PARAM["8bit" if "8bit" in g.optim else "other"] / gb
        seqs = g.completions_per_step // (g.gradient_accumulation_steps * gpus)
        tokens = seqs * (g.max_prompt_length + g.max_completion_length)
        # The residual stream is float32 when float16 weights run under bf16 autocast (torch
        # promotes float16 + bfloat16 to float32), or in a float32 model; else 16-bit.
        mixed = {cfg.model.dtype, {"bf16": "bfloat16", "fp16": "float16"}.get(g.mixed_precision)}
        residual = 4 if cfg.model.dtype == "float32" or mixed == {"float16", "bfloat16"} else 2
        # ~34*h bytes per token and layer for a transformer layer's activations in 16-bit
        # (Korthikanti et al. 2022), its two residual-stream tensors (layer input, post-attention
        # sum) at `residual` bytes; with checkpointing only each layer's input is kept, plus one layer.
        layer = 34 * h + 2 * (residual - 2) * h
        per_token = layers * residual * h + layer if cfg.model.gradient_checkpointing else layers * layer
        parts["activations"] = tokens * per_token / gb
        parts["lm_head_tile"] = _LM_HEAD_TILE_GB * min(1.0, tokens / 4096)
        if cfg.rollout.backend == "hf":
            parts["generation_kv"] = tokens * layers * 2 * kv_dim * 2 / gb
        elif cfg.rollout.backend == "vllm":
            parts["vllm_share"] = vllm_rollout_share(cfg, cfg.resources.gpu_memory_gb) * cfg.resources.gpu_memory_gb
    parts["overhead"] = _OVERHEAD_GB
    parts["total"] = sum(parts.values())
    if "vllm_share" in parts:  # what of the share is left for the KV cache (within it, not added)
        parts["vllm_kv_cache"] = vllm_rollout_kv_gb(cfg, cfg.resources.gpu_memory_gb)
    return {k: round(v, 1) for k, v in parts.items()}


def server_memory_share(cfg: ExperimentConfig) -> float:
    """Share of each server GPU the vLLM server takes (`rollout.backend: vllm_server`): it has
    them to itself, as the evaluation engine: rollout.gpu_memory_utilization when set, else
    eval.gpu_memory_utilization."""
    return cfg.rollout.gpu_memory_utilization or cfg.eval.gpu_memory_utilization


def server_gpus(cfg: ExperimentConfig) -> int:
    """GPUs of a cell's job that run its vLLM server; 0 when it has none (other backends, CPU)."""
    if cfg.rollout.backend != "vllm_server" or cfg.stage != "grpo" or cfg.resources.gpus_per_node < 1:
        return 0
    return cfg.rollout.server_gpus


def server_weights_gb(cfg: ExperimentConfig) -> float | None:
    """Base weights per server GPU in GB (tensor parallel splits them); None without a server."""
    weights = base_weights_gb(cfg)
    return round(weights / server_gpus(cfg), 1) if weights is not None and server_gpus(cfg) else None


def memory_problems(cfg: ExperimentConfig) -> list[str]:
    """Refusals with the numbers when a cell's estimated footprint exceeds its GPUs' memory:
    the training GPUs, the vLLM server's GPUs (their share must hold the weights and a KV cache),
    and the evaluation engine's share, which must hold the weights."""
    estimate = estimate_gpu_memory(cfg)
    if estimate is None:
        return []
    available = cfg.resources.gpu_memory_gb
    problems = []
    served = server_weights_gb(cfg)
    if served is not None and served + _VLLM_KV_GB > server_memory_share(cfg) * available:
        problems.append(f"the vLLM server does not fit: {served} GB of weights + {_VLLM_KV_GB} GB of KV cache per server GPU > "
                        f"{server_memory_share(cfg):g} x {available} GB; set rollout.server_gpus={server_gpus(cfg) + 1} "
                        "(and one more resources.gpus_per_node), or use a quantized base")
    if estimate["total"] > available:
        detail = " + ".join(f"{k.replace('_', ' ')} {v}" for k, v in estimate.items() if k not in ("total", "vllm_kv_cache"))
        where = "training GPU" if served is not None else "GPU"
        rollouts = {"vllm": "rollout.backend=vllm_server (generation on a GPU of its own) or hf",
                    "vllm_server": "more training GPUs with grpo.deepspeed=zero3"}.get(cfg.rollout.backend, "")
        problems.append(
            f"does not fit: ~{estimate['total']} GB per {where} ({detail}) > {available} GB (resources.gpu_memory_gb). "
            f"Use a quantized base (model.quantization=awq|bnb4), {rollouts + ', ' if rollouts else ''}fewer "
            "grpo.completions_per_step or more grpo.gradient_accumulation_steps, or nodes with more GPU memory (--gpu-memory-gb)")
    need = vllm_kv_need_gb(cfg)
    if estimate["total"] <= available and "vllm_kv_cache" in estimate and need is not None and estimate["vllm_kv_cache"] < need:
        problems.append(f"the colocated vLLM share leaves ~{estimate['vllm_kv_cache']} GB of KV cache, less than the {need:.1f} GB "
                        f"a generation batch needs ({cfg.grpo.completions_per_step} completions x {rollout_max_model_len(cfg)} tokens): "
                        "raise rollout.gpu_memory_utilization, or use rollout.backend=vllm_server")
    if cfg.eval.after_training and cfg.eval.backend == "vllm":
        share = cfg.eval.gpu_memory_utilization * available
        weights = round(base_weights_gb(cfg), 1)  # the evaluation engine holds all of them, ZeRO-3 or not
        if weights + 1.0 > share:
            problems.append(f"evaluation does not fit: vLLM's share {share:.1f} GB (eval.gpu_memory_utilization="
                            f"{cfg.eval.gpu_memory_utilization} x {available} GB) cannot hold the {weights} GB of weights")
    return problems
