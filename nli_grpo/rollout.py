"""GRPO rollouts with vLLM by LoRA adapter hot-swap.

vLLM holds the frozen base model once. After each policy update the trainer saves only the LoRA
adapter (megabytes) and hands vLLM a new `LoRARequest` for it; the previous version is dropped from
vLLM and from disk. TRL's own vLLM sync instead merges the adapter into the base and pushes every
weight: a cost that does not shrink with the rank, lossy on bnb-4bit bases, impossible on AWQ bases
and broken on vLLM's CPU backend (platform-notes.md). With hot-swap every cell of the grid
(bf16 / AWQ / bnb-4bit) gets vLLM rollouts.

The hook is TRL's `GRPOTrainer._generate_single_turn`: prompt token ids in, completion token ids
(and the sampled tokens' logprobs) out; everything else, rewards, advantages and the loss, is TRL's.

Scope: colocated, one training process (vLLM and the trainer share the GPU). For multi-GPU
training or a 32B policy that needs the whole GPU, the scale-out path is vLLM on its own GPU/node
(`trl vllm-serve`); TRL's server client syncs merged weights, not adapters, and vLLM's server
`load_lora_adapter` endpoint needs a shared file system: not wired yet, so `rollout.backend=vllm`
is refused with several GPUs per job (config validation says so).
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import torch

from .config import ExperimentConfig
from .layout import CellFolder
from .models import eval_dtype, resolve_model_path, training_precision

log = logging.getLogger(__name__)

#: LoRA ranks vLLM's kernels are built for; max_lora_rank must be one of them.
VLLM_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)


def vllm_max_lora_rank(rank: int) -> int:
    """The smallest LoRA rank vLLM supports that holds `rank`."""
    return next(r for r in VLLM_LORA_RANKS if r >= rank)


def derived_memory_share(cfg: ExperimentConfig, purpose: str) -> float:
    """vLLM's share of device memory. Evaluation has the GPU to itself
    (eval.gpu_memory_utilization); colocated rollouts share it with training (the same formula
    the sweep validator checks, grid.vllm_rollout_share). On vLLM's CPU backend the share is of
    host memory: 0.2 (0.9 fails)."""
    if not torch.cuda.is_available():
        return 0.2
    if purpose == "eval":
        return cfg.eval.gpu_memory_utilization
    from .grid import vllm_rollout_share

    return vllm_rollout_share(cfg, torch.cuda.get_device_properties(0).total_memory / 2**30)


def build_llm(cfg: ExperimentConfig, purpose: str, lora_rank: int | None):
    """A vLLM engine on the run's base model, for `purpose` "rollout" (colocated with training)
    or "eval" (alone), serving LoRA adapters up to `lora_rank` (None: no LoRA)."""
    from vllm import LLM

    path = resolve_model_path(cfg.model.name_or_path)
    cuda = torch.cuda.is_available()
    if purpose == "eval":
        max_len, dtype = cfg.eval.max_model_len, eval_dtype(cfg, cuda)
    else:  # rollouts sample from the policy as trained: the training weights' dtype
        max_len = cfg.rollout.max_model_len or cfg.grpo.max_prompt_length + cfg.grpo.max_completion_length
        dtype = training_precision(cfg, cuda)["dtype"]
    kwargs = dict(
        model=path, tokenizer=path, revision=cfg.model.revision, seed=cfg.seed,
        dtype=str(dtype).removeprefix("torch."),
        max_model_len=max_len, gpu_memory_utilization=derived_memory_share(cfg, purpose),
        enforce_eager=cfg.rollout.enforce_eager, trust_remote_code=cfg.model.trust_remote_code,
        enable_lora=lora_rank is not None,
    )
    if lora_rank is not None:
        kwargs.update(max_lora_rank=vllm_max_lora_rank(max(lora_rank, cfg.rollout.max_lora_rank or 0)), max_loras=1)
    if cfg.model.quantization == "bnb4":
        # vLLM quantises the bf16 checkpoint with bitsandbytes at load time, like the trainer.
        kwargs["quantization"] = "bitsandbytes"
    # AWQ: vLLM reads the checkpoint's quantization_config itself.
    log.info("starting vLLM (%s): %s", purpose, {k: v for k, v in kwargs.items() if k != "tokenizer"})
    return LLM(**kwargs)


class AdapterHotSwap:
    """Publishes the trainer's current LoRA adapter to vLLM as a new LoRARequest per policy
    version, and retires the previous version from vLLM and from disk."""

    def __init__(self, llm, folder: Path):
        self.llm = llm
        self.folder = folder
        self.request = None
        self.version_step: int | None = None
        self.published_steps: list[int] = []  # the optimizer step of every version handed to vLLM
        self.bytes_last_sync = 0
        self.seconds_last_sync = 0.0

    def sync(self, peft_model, step: int):
        """Make vLLM serve the adapter as it is now (at optimizer step `step`); idempotent."""
        import time

        from peft import get_peft_model_state_dict
        from safetensors.torch import save_file
        from vllm.lora.request import LoRARequest

        if self.version_step == step and self.request is not None:
            return self.request
        started = time.perf_counter()
        path = self.folder / f"step-{step:08d}"
        if path.exists():
            shutil.rmtree(path)
        path.mkdir(parents=True)
        # PEFT keeps LoRA weights in fp32; vLLM casts them to the base's dtype when it loads them,
        # so casting first gives it the same weights in half the bytes on a bf16 base.
        dtype = peft_model.get_base_model().dtype
        state = {k: (v.to(dtype) if v.is_floating_point() else v).contiguous()
                 for k, v in get_peft_model_state_dict(peft_model).items()}
        save_file(state, str(path / "adapter_model.safetensors"))
        peft_model.peft_config["default"].save_pretrained(str(path))
        previous = self.request
        # lora_int_id must be unique and > 0 per version: a reused id would serve vLLM's cached
        # (stale) weights.
        self.request = LoRARequest(f"policy-step-{step}", step + 1, str(path))
        self.version_step = step
        self.published_steps.append(step)
        if previous is not None:
            self.llm.llm_engine.remove_lora(previous.lora_int_id)
            shutil.rmtree(previous.lora_path, ignore_errors=True)
        self.bytes_last_sync = sum(f.stat().st_size for f in path.iterdir() if f.is_file())
        self.seconds_last_sync = time.perf_counter() - started
        return self.request

    def close(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def make_vllm_trainer_class(base):
    """`base` (a GRPOTrainer subclass) with rollouts generated by colocated vLLM."""
    from vllm import SamplingParams

    class VLLMRolloutTrainer(base):
        def configure_rollout(self, cfg: ExperimentConfig) -> None:
            self.rollout_cfg = cfg
            self.llm = build_llm(cfg, purpose="rollout", lora_rank=cfg.lora.rank)
            self.hot_swap = AdapterHotSwap(self.llm, CellFolder(cfg.output.dir).rollout_adapters)

        def close_rollout(self) -> None:
            import gc

            if self.llm is None:
                return
            self.hot_swap.close()
            self.llm.llm_engine.engine_core.shutdown()  # its worker processes hold the memory
            self.llm = self.hot_swap.llm = None
            gc.collect()

        def current_lora_request(self):
            peft_model = self.accelerator.unwrap_model(self.model)
            return self.hot_swap.sync(peft_model, self.state.global_step)

        def rollout_generate(self, prompt_ids: list[list[int]], sampling_params) -> list:
            """vLLM generation with the current policy; one output per prompt id list."""
            request = self.current_lora_request()
            return self.llm.generate([{"prompt_token_ids": ids} for ids in prompt_ids], sampling_params,
                                     lora_request=request, use_tqdm=False)

        def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
            g = self.rollout_cfg.grpo
            # TRL already repeated each prompt num_generations times: one sample per entry.
            params = SamplingParams(
                n=1, temperature=g.temperature, top_k=g.top_k, top_p=g.top_p, max_tokens=g.max_completion_length,
                logprobs=0, repetition_penalty=1.0, skip_special_tokens=True,
            )
            outputs = self.rollout_generate(prompt_ids, params)
            completion_ids = [list(o.outputs[0].token_ids) for o in outputs]
            logprobs = [[lp[tok].logprob for lp, tok in zip(o.outputs[0].logprobs, o.outputs[0].token_ids)] for o in outputs]
            self._metrics["train"]["rollout/sync_bytes"].append(float(self.hot_swap.bytes_last_sync))
            self._metrics["train"]["rollout/sync_seconds"].append(self.hot_swap.seconds_last_sync)
            return completion_ids, logprobs

    return VLLMRolloutTrainer


def trainer_class_for(cfg: ExperimentConfig, base):
    """The trainer class for the recipe's rollout backend: TRL's HF generate or vLLM hot-swap."""
    return make_vllm_trainer_class(base) if cfg.rollout.backend == "vllm" else base
