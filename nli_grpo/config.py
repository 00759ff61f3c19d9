"""Typed experiment config: dataclasses (defaults = the paper's main runs), YAML recipes shipped in
`nli_grpo/recipes/`, dotted `key=value` overrides, and validation that fails before anything heavy
is loaded.

    cfg = load_config("smoke", ["lora.rank=8", "grpo.max_steps=20"])

OmegaConf does the merging and the type checks (a wrong type or an unknown key is an error naming
the key); `validate` adds the checks that need several fields or a list of allowed values.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Dict, List, Optional

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .data import BENCHMARK_NAMES, TRAIN_SOURCES

QUANTIZATIONS = ("bf16", "awq", "bnb4")
DTYPES = ("float16", "bfloat16", "float32")
MIXED_PRECISIONS = ("bf16", "fp16", "no")
ROLLOUT_BACKENDS = ("hf", "vllm", "vllm_server")
IMPORTANCE_SAMPLING_MODES = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")
EVAL_BACKENDS = ("hf", "vllm")
STAGES = ("grpo", "zero_shot")
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
SCALE_REWARDS = ("none", "group", "batch")
TRACKERS = ("none", "tensorboard", "wandb", "trackio")
WANDB_MODES = ("online", "offline", "disabled")


class ConfigError(ValueError):
    """An invalid experiment config; the message names the field and what is allowed."""


@dataclass
class ModelConfig:
    name_or_path: str = "Qwen/Qwen2.5-7B-Instruct"
    """Hub id or local folder of the base model. `tiny` builds a tiny random Qwen2 with a locally
    trained tokenizer (no download); `random:qwen2.5-7b` (or -14b, -32b) builds the real shape
    with random weights, for memory and speed checks."""
    quantization: str = "bf16"
    """`bf16` (unquantised), `awq` (a pre-quantised AWQ checkpoint, e.g. Qwen2.5-7B-Instruct-AWQ,
    loaded through gptqmodel) or `bnb4` (bitsandbytes 4-bit NF4 at load time)."""
    key: Optional[str] = None
    """Short model name used in cell ids and tables (e.g. `qwen2.5-7b`); derived when unset."""
    revision: Optional[str] = None
    """Hub revision (commit) to pin; recorded in the result."""
    trust_remote_code: bool = False
    """Allow the checkpoint's own Python code. Off: Qwen2.5 needs none."""
    dtype: str = "float16"
    """Dtype the base weights are held in for training and rollouts on a GPU (the non-quantised
    layers of AWQ / bnb-4bit bases). The authors load every base in float16
    (`model_init_kwargs.torch_dtype: float16`) and train under bf16 autocast
    (grpo.mixed_precision). On a CPU everything runs in float32."""
    attn_implementation: str = "sdpa"
    """Attention kernel passed to transformers (`sdpa`, `eager`, `flash_attention_2`)."""
    gradient_checkpointing: bool = True
    """Trade compute for activation memory; needed for 512-token completions on 32B."""


@dataclass
class LoraConfig:
    rank: int = 64
    """LoRA rank r."""
    alpha: Optional[int] = None
    """LoRA alpha; unset means alpha = rank (the paper)."""
    dropout: float = 0.0
    target_modules: List[str] = field(default_factory=lambda: list(LORA_TARGETS))
    """Projections that get an adapter (default: all seven, as the paper)."""


@dataclass
class GRPOConfig:
    """The paper's GRPO settings ([code] in paper-facts.md). Every field is passed to TRL
    explicitly because TRL's defaults have moved across versions."""

    max_steps: int = 4000
    """Optimizer steps."""
    num_generations: int = 4
    """Group size: completions sampled per prompt."""
    completions_per_step: int = 8
    """Completions per optimizer step over all GPUs (paper: 2 prompts x 4 = 8; rank ablation: 32)."""
    gradient_accumulation_steps: int = 1
    num_iterations: int = 4
    """Optimizer steps taken on each generated batch (GRPO's mu)."""
    beta: float = 0.01
    """KL coefficient; the reference is the base model with the adapter disabled."""
    epsilon: float = 0.2
    """Clip range, symmetric (epsilon_high = epsilon)."""
    scale_rewards: str = "none"
    """Advantage = reward - group mean; `none` = no division by the group std (paper)."""
    loss_type: str = "grpo"
    """`grpo`: per-sequence token mean, then mean over sequences (original GRPO, paper)."""
    skip_zero_advantage_steps: bool = True
    """Skip the backward pass and optimizer update when every advantage of the batch is 0."""
    learning_rate: float = 5e-6
    lr_scheduler_type: str = "linear"
    warmup_steps: int = 50
    weight_decay: float = 0.0
    optim: str = "paged_adamw_8bit"
    """Optimizer name as transformers spells it (paper: bitsandbytes paged 8-bit AdamW)."""
    max_grad_norm: float = 1.0
    mixed_precision: str = "bf16"
    """Autocast precision of training on a GPU: `bf16` (the authors: `bf16: true, fp16: false`, over
    float16 weights), `fp16` (with a gradient scaler) or `no`. Ignored on a CPU (float32)."""
    loss_temperature: Optional[float] = 1.0
    """Temperature the logits are divided by for the policy, old and reference log-probs of the
    loss. The authors compute them at 1.0 (their `_get_per_token_logps` does not scale); TRL 1.16
    divides by the sampling temperature. `null` = TRL's behaviour (grpo.temperature)."""
    max_prompt_length: int = 512
    max_completion_length: int = 512
    temperature: float = 0.9
    top_k: int = 50
    top_p: float = 1.0
    logging_steps: int = 1
    save_steps: int = 100
    """Checkpoint every N steps (plus one on USR2 / SIGTERM)."""
    save_total_limit: int = 2
    """Complete checkpoints kept on disk."""
    deepspeed: Optional[str] = None
    """DeepSpeed config for multi-GPU jobs: a path, or `zero2` / `zero3` for the shipped ones."""


@dataclass
class RolloutConfig:
    backend: str = "hf"
    """`hf`: HF generate (the paper); `vllm`: vLLM in the training process (one GPU), with LoRA
    adapter hot-swap; `vllm_server`: a vLLM server on GPUs of the job's own (rollout.server_gpus),
    fed each adapter version through its /v1/load_lora_adapter, training on the other GPUs."""
    server_gpus: int = 1
    """`vllm_server`: GPUs of the job that run the server (tensor parallel when > 1); training
    runs on the rest of resources.gpus_per_node. Ignored on CPU nodes (the server shares the host)."""
    max_staleness: int = 0
    """`vllm_server`: how many policy versions generation may run ahead of training (a version is
    published at each generation batch). 0: on-policy, every batch sampled from the policy that
    trains on it (the paper). k >= 1: the next k batches are generated while the current one
    trains, and the loss is corrected by importance sampling (below)."""
    importance_sampling_correction: Optional[bool] = None
    """Weight the loss by the ratio of the trained policy's to the sampler's log-probs of each
    token (TRL's vllm_importance_sampling_correction). Unset: on exactly when max_staleness >= 1.
    Requires grpo.loss_temperature of 1 or of the sampling temperature (what vLLM can report)."""
    importance_sampling_mode: str = "sequence_mask"
    """How the ratio is bounded (TRL's vllm_importance_sampling_mode; its default)."""
    importance_sampling_cap: float = 3.0
    """Upper bound of the ratio (TRL's vllm_importance_sampling_clip_max; its default)."""
    gpu_memory_utilization: Optional[float] = None
    """vLLM's share of GPU memory (host memory on its CPU backend); unset: derived per model."""
    max_lora_rank: Optional[int] = None
    """Unset: the LoRA rank of the run."""
    max_model_len: Optional[int] = None
    """Unset: max_prompt_length + max_completion_length."""
    enforce_eager: bool = False


@dataclass
class DataConfig:
    train_source: str = "anli_hard"
    """Training prompts: `anli_hard` (the pool built by `python -m nli_grpo.bootstrap`) or any
    train source name of the data registry."""
    local_dir: Optional[str] = None
    """Folder of local files in the hub's schemas; `samples` = the small set shipped with the
    package. Looked at before the hub."""
    files: Dict[str, str] = field(default_factory=dict)
    """Explicit file per dataset name (overrides local_dir)."""
    hub: bool = True
    """Allow downloading from the Hugging Face hub when no local file is found."""
    train_limit: Optional[int] = None
    """Use only the first N training prompts (their order is shuffled with the run's seed)."""


@dataclass
class EvalConfig:
    benchmarks: List[str] = field(default_factory=lambda: list(BENCHMARK_NAMES))
    backend: str = "vllm"
    """`vllm` (the paper) or `hf` (HF generate, for machines without vLLM)."""
    max_new_tokens: int = 768
    max_model_len: int = 1024
    batch_size: int = 64
    """Prompts per generate call for the hf backend (vLLM schedules by itself)."""
    limit: Optional[int] = None
    """Evaluate N examples per set (smoke runs, quick looks): a seeded sample with the set's label
    proportions (and HANS subcases), the same rows for every cell (data.representative_sample)."""
    after_training: bool = True
    """Run the evaluation as the last stage of a training job."""
    gpu_memory_utilization: float = 0.85
    dtype: str = "auto"
    """Dtype of the base during evaluation on a GPU: `auto` = the checkpoint's own (bfloat16 for
    Qwen2.5-Instruct, float16 for its AWQ checkpoints), as the authors' vLLM evaluation; or one of
    float16, bfloat16, float32."""


@dataclass
class ResourcesConfig:
    """What one cell asks Slurm for; per model size in the recipes, overridable from the CLI."""

    gpus_per_node: int = 1
    """GPUs of one job (one training process each); 0 for a CPU-only job."""
    cpus_per_task: int = 8
    mem_gb: int = 64
    timeout_min: int = 24 * 60
    gpu_memory_gb: int = 80
    """Memory of one GPU of the nodes asked for; the sweep launcher checks the estimated per-GPU
    footprint of a cell against it before submitting."""


@dataclass
class OutputConfig:
    dir: str = "results/default/run"
    """Where the run writes result.json, logs, checkpoints and predictions."""
    sweep: str = "default"
    cell_id: str = "run"
    extra_axes: Dict[str, str] = field(default_factory=dict)
    """Further axes that tell cells of one sweep apart beyond model, quantization, rank, seed and
    stage (e.g. `ablation: lora_rank` in the paper sweep); part of the cell and its id."""
    report_to: List[str] = field(default_factory=lambda: ["none"])
    """Trackers that get the live training curves (every optimizer step's loss, KL, reward...):
    `none`, or one or more of `tensorboard` (event files in the cell's `tensorboard/`), `wandb`
    (Weights & Biases: run name = cell id, group = sweep) and `trackio` (project = sweep, run name
    = cell id). A preempted and requeued cell continues the same run; credentials come from the
    environment only (e.g. WANDB_API_KEY) and are never written anywhere."""
    wandb_project: Optional[str] = None
    """W&B project of report_to=wandb; unset: $WANDB_PROJECT, else `nli_grpo`."""
    wandb_mode: Optional[str] = None
    """W&B mode: `online`, `offline` (the run is written under the cell's `wandb/`; `python -m
    nli_grpo.status` prints the `wandb sync` command that uploads it) or `disabled`. Unset:
    $WANDB_MODE, else `offline` when the job runs offline (HF_HUB_OFFLINE=1, as sweep jobs do
    unless --online), else `online`."""


@dataclass
class PreflightConfig:
    """`python -m nli_grpo.preflight`: a few real GRPO steps of one combination (base model x
    quantization x rollout backend x GPUs) before a grid, and the thresholds of its verdict."""

    cycles: int = 2
    """Generation cycles trained (each grpo.num_iterations optimizer steps); the first warms up
    (first LoRA load, allocator), the others are timed."""
    prompts: int = 4
    """Training prompts of the agreement and greedy checks."""
    greedy_tokens: int = 16
    """Greedy tokens compared between the sampler and HF generate per prompt."""
    perturbation_std: float = 0.05
    """Std of the noise added to the adapter's LoRA B weights for the checks after a publish (a
    non-zero adapter that changes greedy output)."""
    max_mean_logprob_delta: float = 0.05
    """Fail when the mean |log p(sampler) - log p(trainer)| per completion token exceeds this
    (same tokens, same adapter version): the importance ratio would see it as off-policy."""
    max_token_logprob_delta: float = 2.0
    """Warn when one token's |delta log p| exceeds this (16-bit kernels differ on rare tokens)."""
    memory_headroom: float = 0.9
    """Warn when the measured peak memory exceeds this share of the memory asked for (fail above it all)."""
    time_headroom: float = 0.8
    """Warn when the projected run time exceeds this share of the time before USR2 (fail above it all)."""
    max_checkpoint_interval_min: float = 60.0
    """Warn when grpo.save_steps at the measured rate is longer than this: a node failure (no
    USR2) loses up to that much work."""


@dataclass
class ExperimentConfig:
    stage: str = "grpo"
    """`grpo` (train then evaluate) or `zero_shot` (evaluate the base model only)."""
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    data: DataConfig = field(default_factory=DataConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    preflight: PreflightConfig = field(default_factory=PreflightConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def recipe_names() -> list[str]:
    """Names of the recipes shipped with the package."""
    return sorted(p.name[:-5] for p in resources.files("nli_grpo.recipes").iterdir() if p.name.endswith(".yaml"))


def _recipe_path(recipe: str) -> Path:
    if recipe.endswith((".yaml", ".yml")) or "/" in recipe:
        path = Path(recipe)
        if not path.is_file():
            raise ConfigError(f"recipe file {recipe} not found")
        return path
    path = Path(str(resources.files("nli_grpo.recipes").joinpath(f"{recipe}.yaml")))
    if not path.is_file():
        raise ConfigError(f"unknown recipe {recipe!r}; shipped recipes: {', '.join(recipe_names())}, or give a path to a .yaml file")
    return path


def _load_yaml_chain(path: Path) -> list:
    """A recipe may name a parent with `base: <recipe>`; parents merge first."""
    node = OmegaConf.load(path)
    parent = node.pop("base", None)
    return (_load_yaml_chain(_recipe_path(parent)) if parent else []) + [node]


def load_config(recipe: str | None = None, overrides: list[str] | None = None) -> ExperimentConfig:
    """Dataclass defaults, then the recipe (a shipped name or a path) and its parents, then dotted
    `key=value` overrides; validated. Raises ConfigError naming the offending field."""
    layers = [OmegaConf.structured(ExperimentConfig)]
    if recipe:
        layers += _load_yaml_chain(_recipe_path(recipe))
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. lora.rank=16)")
        layers.append(OmegaConf.from_dotlist([item]))
    try:
        merged = OmegaConf.merge(*layers)
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        raise ConfigError(_explain(err)) from None
    validate(cfg)
    return cfg


def config_from_dict(data: dict[str, Any]) -> ExperimentConfig:
    """Rebuild a config from `to_dict()` output (e.g. the copy stored in result.json)."""
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ExperimentConfig), data))
    except OmegaConfBaseException as err:
        raise ConfigError(_explain(err)) from None


def read_snapshot(path: str | Path) -> ExperimentConfig | None:
    """A config snapshot as written at submission (a cell's `config.yaml`, a preflight's
    `preflight/<combination>.yaml`); None when it is missing or cannot be read back."""
    try:
        return config_from_dict(OmegaConf.to_container(OmegaConf.load(path)))
    except (OSError, ValueError, ConfigError, OmegaConfBaseException):
        return None


def _explain(err: OmegaConfBaseException) -> str:
    key = getattr(err, "full_key", None) or ""
    message = str(err).splitlines()[0]
    if "not in" in message or "Missing key" in message or "Key '" in message:
        leaf = key.split(".")[-1]
        parent_cls = _section_class(key.rsplit(".", 1)[0] if "." in key else "")
        names = [f.name for f in dataclasses.fields(parent_cls)] if parent_cls else []
        close = difflib.get_close_matches(leaf, names, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else (f"; valid keys: {', '.join(names)}" if names else "")
        return f"unknown config field {key!r}{hint}"
    if key and "is not a ListConfig" in message:  # a list field given one value, e.g. output.report_to=wandb
        return f"config field {key!r} takes a list: write it in brackets, e.g. {key}=[a,b]"
    return f"config field {key!r}: {message}" if key else message


def _section_class(path: str):
    cls = ExperimentConfig
    for part in filter(None, path.split(".")):
        cls = typing.get_type_hints(cls).get(part)
        if not dataclasses.is_dataclass(cls):
            return None
    return cls


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _choice(name: str, value: Any, allowed: tuple) -> None:
    _require(value in allowed, f"{name}={value!r} is not allowed; choose one of: {', '.join(map(str, allowed))}")


def validate(cfg: ExperimentConfig) -> None:
    """Cross-field and allowed-value checks; raises ConfigError with the field and the fix."""
    _choice("stage", cfg.stage, STAGES)
    _choice("model.quantization", cfg.model.quantization, QUANTIZATIONS)
    _choice("rollout.backend", cfg.rollout.backend, ROLLOUT_BACKENDS)
    _choice("eval.backend", cfg.eval.backend, EVAL_BACKENDS)
    _choice("grpo.loss_type", cfg.grpo.loss_type, LOSS_TYPES)
    _choice("grpo.scale_rewards", cfg.grpo.scale_rewards, SCALE_REWARDS)
    _choice("grpo.mixed_precision", cfg.grpo.mixed_precision, MIXED_PRECISIONS)
    _choice("model.dtype", cfg.model.dtype, DTYPES)
    _choice("eval.dtype", cfg.eval.dtype, ("auto", *DTYPES))
    _require(cfg.grpo.loss_temperature is None or cfg.grpo.loss_temperature > 0,
             f"grpo.loss_temperature={cfg.grpo.loss_temperature} must be > 0, or null for TRL's (the sampling temperature)")
    _require(cfg.model.quantization != "awq" or cfg.model.dtype == "float16",
             f"model.dtype={cfg.model.dtype} with model.quantization=awq: AWQ kernels compute in float16; set model.dtype=float16")
    if cfg.model.quantization == "bnb4":
        engines = [f"{what}=vllm" for what, backend, used in (
            ("rollout.backend", cfg.rollout.backend, cfg.stage == "grpo"), ("eval.backend", cfg.eval.backend, cfg.eval.after_training))
            if used and backend in ("vllm", "vllm_server")]
        _require(not engines, f"model.quantization=bnb4 with {' and '.join(engines)}: the vLLM of the GPU install (0.31) has no "
                 "bitsandbytes quantization any more (\"Unknown quantization method\"); set rollout.backend=hf and "
                 "eval.backend=hf for bnb4 cells (HF generate), or use model.quantization=awq with vLLM")
    _require(cfg.lora.rank > 0, f"lora.rank={cfg.lora.rank} must be a positive integer (the paper uses 8..128)")
    _require(cfg.lora.alpha is None or cfg.lora.alpha > 0, f"lora.alpha={cfg.lora.alpha} must be positive, or unset for alpha = rank")
    _require(0.0 <= cfg.lora.dropout < 1.0, f"lora.dropout={cfg.lora.dropout} must be in [0, 1)")
    bad_targets = sorted(set(cfg.lora.target_modules) - set(LORA_TARGETS))
    _require(not bad_targets and cfg.lora.target_modules, f"lora.target_modules has unknown {bad_targets or 'nothing'}; choose from: {', '.join(LORA_TARGETS)}")
    g = cfg.grpo
    for name in ("max_steps", "num_generations", "completions_per_step", "gradient_accumulation_steps",
                 "num_iterations", "max_prompt_length", "max_completion_length", "save_steps", "logging_steps"):
        _require(getattr(g, name) > 0, f"grpo.{name}={getattr(g, name)} must be positive")
    _require(g.num_generations >= 2, f"grpo.num_generations={g.num_generations}: GRPO needs a group of at least 2 completions per prompt")
    _require(g.completions_per_step % g.num_generations == 0,
             f"grpo.completions_per_step={g.completions_per_step} must be divisible by grpo.num_generations={g.num_generations} "
             "(every prompt gets a whole group); e.g. completions_per_step=8 with num_generations=4")
    processes = training_processes(cfg)
    per_micro, rest = divmod(g.completions_per_step, g.gradient_accumulation_steps * processes)
    _require(rest == 0 and per_micro > 0,
             f"grpo.completions_per_step={g.completions_per_step} must be divisible by grpo.gradient_accumulation_steps "
             f"({g.gradient_accumulation_steps}) x training processes ({processes}, one per training GPU)")
    _require(g.beta >= 0, f"grpo.beta={g.beta} must be >= 0")
    _require(0 < g.epsilon < 1, f"grpo.epsilon={g.epsilon} must be in (0, 1)")
    _require(g.temperature > 0, f"grpo.temperature={g.temperature} must be > 0 (GRPO samples)")
    _require(0 < g.top_p <= 1, f"grpo.top_p={g.top_p} must be in (0, 1]")
    _require(g.deepspeed in (None, "zero2", "zero3") or Path(g.deepspeed).is_file(),
             f"grpo.deepspeed={g.deepspeed!r}: use zero2, zero3 or a path to a DeepSpeed JSON config")
    for name, limit in (("eval.limit", cfg.eval.limit), ("data.train_limit", cfg.data.train_limit)):
        _require(limit is None or limit >= 1, f"{name}={limit} must be a positive number of examples, or null for all")
    _require(not (g.deepspeed and g.skip_zero_advantage_steps and g.gradient_accumulation_steps > 1),
             f"grpo.deepspeed={g.deepspeed} with grpo.skip_zero_advantage_steps=true needs grpo.gradient_accumulation_steps=1 "
             f"(not {g.gradient_accumulation_steps}): DeepSpeed steps inside backward, so an update is skipped by not "
             "entering the engine, which only works when the update is one micro-batch. Set "
             "grpo.gradient_accumulation_steps=1, or grpo.skip_zero_advantage_steps=false")
    unknown = [b for b in cfg.eval.benchmarks if b not in BENCHMARK_NAMES]
    _require(not unknown, f"eval.benchmarks has unknown {unknown}; valid names: {', '.join(BENCHMARK_NAMES)}")
    _require(cfg.eval.max_new_tokens < cfg.eval.max_model_len,
             f"eval.max_new_tokens={cfg.eval.max_new_tokens} must be below eval.max_model_len={cfg.eval.max_model_len}")
    util = cfg.rollout.gpu_memory_utilization
    _require(util is None or 0 < util < 1, f"rollout.gpu_memory_utilization={util} must be in (0, 1)")
    _require(cfg.rollout.max_lora_rank is None or cfg.rollout.max_lora_rank >= cfg.lora.rank,
             f"rollout.max_lora_rank={cfg.rollout.max_lora_rank} is below lora.rank={cfg.lora.rank}")
    if cfg.model.quantization == "awq":
        _require("awq" in cfg.model.name_or_path.lower() or Path(cfg.model.name_or_path).is_dir(),
                 f"model.quantization=awq needs a pre-quantised AWQ checkpoint (e.g. Qwen/Qwen2.5-7B-Instruct-AWQ), "
                 f"not {cfg.model.name_or_path!r}; for an unquantised checkpoint set model.quantization=bf16 (or bnb4)")
    _choice("data.train_source", cfg.data.train_source, tuple(TRAIN_SOURCES))
    trackers = cfg.output.report_to
    unknown = [t for t in trackers if t not in TRACKERS]
    _require(not unknown and trackers and ("none" not in trackers or len(trackers) == 1),
             f"output.report_to={list(trackers)} is not allowed: give [none], or one or more of "
             f"{', '.join(TRACKERS[1:])} (e.g. output.report_to=[tensorboard,wandb])")
    _require(cfg.output.wandb_mode is None or cfg.output.wandb_mode in WANDB_MODES,
             f"output.wandb_mode={cfg.output.wandb_mode!r} is not allowed; choose one of: {', '.join(WANDB_MODES)}, "
             "or null for $WANDB_MODE / offline when the job runs offline")
    pf = cfg.preflight
    _require(pf.cycles >= 2, f"preflight.cycles={pf.cycles} must be at least 2 (the first generation cycle warms up)")
    _require(pf.prompts >= 1 and pf.greedy_tokens >= 1 and pf.perturbation_std > 0,
             "preflight.prompts, preflight.greedy_tokens and preflight.perturbation_std must be positive")
    _require(0 < pf.memory_headroom <= 1 and 0 < pf.time_headroom <= 1,
             "preflight.memory_headroom and preflight.time_headroom are shares: in (0, 1]")
    _validate_rollout(cfg)


def training_processes(cfg: ExperimentConfig) -> int:
    """Training processes of a job: one per GPU that does not run the vLLM server; one on a CPU."""
    gpus = cfg.resources.gpus_per_node
    if cfg.rollout.backend == "vllm_server" and cfg.stage == "grpo" and gpus > 0:
        gpus -= cfg.rollout.server_gpus
    return max(1, gpus)


def importance_sampling_on(cfg: ExperimentConfig) -> bool:
    """Whether the loss is corrected by the sampler's log-probs (rollout.importance_sampling_correction,
    by default on exactly when generation may run ahead of training)."""
    r = cfg.rollout
    return r.importance_sampling_correction if r.importance_sampling_correction is not None else r.max_staleness > 0


def _validate_rollout(cfg: ExperimentConfig) -> None:
    r, gpus = cfg.rollout, cfg.resources.gpus_per_node
    _require(r.backend != "vllm" or gpus <= 1,
             f"rollout.backend=vllm runs colocated in one training process; with resources.gpus_per_node={gpus} "
             "use rollout.backend=vllm_server (a vLLM server on rollout.server_gpus of them, training on the rest)")
    _require(r.server_gpus >= 1, f"rollout.server_gpus={r.server_gpus} must be at least 1")
    _require(r.backend != "vllm_server" or gpus == 0 or gpus > r.server_gpus,
             f"rollout.backend=vllm_server with resources.gpus_per_node={gpus} and rollout.server_gpus={r.server_gpus} "
             f"leaves no GPU for training: ask for at least {r.server_gpus + 1} GPUs")
    _require(r.max_staleness >= 0, f"rollout.max_staleness={r.max_staleness} must be >= 0 (0 = on-policy)")
    _require(r.max_staleness == 0 or r.backend == "vllm_server",
             f"rollout.max_staleness={r.max_staleness} generates ahead of training, which needs rollout.backend=vllm_server "
             f"(not {r.backend})")
    _choice("rollout.importance_sampling_mode", r.importance_sampling_mode, IMPORTANCE_SAMPLING_MODES)
    _require(r.importance_sampling_cap > 0, f"rollout.importance_sampling_cap={r.importance_sampling_cap} must be > 0")
    # Checked whether or not the correction is on: switched off, it is exactly what this refuses.
    _require(r.max_staleness == 0 or r.importance_sampling_correction is not False,
             f"rollout.max_staleness={r.max_staleness} trains on batches sampled by older policies: it needs "
             "rollout.importance_sampling_correction (leave it unset, or set true), or rollout.max_staleness=0")
    if importance_sampling_on(cfg):
        _require(r.backend != "hf", "rollout.importance_sampling_correction needs the sampler's log-probs: "
                 "rollout.backend=vllm or vllm_server")
        loss_t = cfg.grpo.loss_temperature or cfg.grpo.temperature
        _require(loss_t in (1.0, cfg.grpo.temperature),
                 f"the importance sampling correction compares the sampler's log-probs with the loss's at "
                 f"grpo.loss_temperature={loss_t}; vLLM reports them at temperature 1 or at the sampling temperature "
                 f"({cfg.grpo.temperature}): set grpo.loss_temperature to one of those")
