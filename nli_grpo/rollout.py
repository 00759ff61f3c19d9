"""GRPO rollouts with vLLM by LoRA adapter hot-swap: colocated (`rollout.backend: vllm`) or from a
vLLM server in the job's own allocation (`vllm_server`), optionally generating ahead of training.

vLLM holds the frozen base model once. After each policy update the trainer saves only the LoRA
adapter (megabytes) and hands vLLM a new `LoRARequest` for it; the previous version is dropped from
vLLM and from disk. TRL's own vLLM sync instead merges the adapter into the base and pushes every
weight: a cost that does not shrink with the rank, lossy on bnb-4bit bases, impossible on AWQ bases
and broken on vLLM's CPU backend (platform-notes.md). With hot-swap every cell of the grid
(bf16 / AWQ / bnb-4bit) gets vLLM rollouts.

The hook is TRL's `GRPOTrainer._generate_single_turn`: prompt token ids in, completion token ids
(and the sampled tokens' logprobs) out; everything else, rewards, advantages and the loss, is TRL's.

Colocated (`vllm`): one training process, vLLM in it (they share the GPU).

Server (`vllm_server`): the job started a vLLM OpenAI-compatible server on GPUs of its own
(nli_grpo.server). At each generation batch rank 0 writes the adapter into the run folder, loads it
into the server under a new name (`/v1/load_lora_adapter`; a new name also keeps vLLM's prefix
cache, keyed by adapter name, from serving the previous policy's blocks) and unloads the version
no request can name any more; every rank then sends its prompts' token ids to `/v1/completions`
naming that version, and gets completion token ids and the sampler's log-probs back. TRL's own
server client syncs merged weights over NCCL instead (not possible on AWQ bases, lossy on bnb-4bit).

Ahead of training (`rollout.max_staleness` k >= 1): a thread per rank generates the next batches
while the current one trains, each from the newest published policy, at most k versions behind
the policy that trains on it; the loss is corrected by TRL's importance sampling from the
sampler's log-probs. Which prompts come next is read from TRL's own sampler (`LookaheadSampler`),
so the batches are exactly those TRL would have generated for; a batch that does not match what
the trainer asks for (a resume in the middle of a batch) is generated on the spot instead.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from . import files
from .config import ExperimentConfig
from .layout import CellFolder
from .models import eval_dtype, resolve_model_path, training_precision
from .server import logprobs_mode, post_json, vllm_max_lora_rank

log = logging.getLogger(__name__)


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


def colocated_vllm_gb(cfg: ExperimentConfig) -> float:
    """GPU memory (GiB) the colocated rollout engine holds in its own process: its share of the
    GPU, which vLLM fills with KV cache after weights and runtime. 0 on the CPU (host memory)."""
    if not torch.cuda.is_available():
        return 0.0
    return derived_memory_share(cfg, "rollout") * torch.cuda.get_device_properties(0).total_memory / 2**30


def _engine_dtype(cfg: ExperimentConfig, purpose: str) -> str:
    """The dtype an engine for `purpose` runs in, as vLLM takes it (`auto`: the checkpoint's)."""
    cuda = torch.cuda.is_available()
    dtype = eval_dtype(cfg, cuda) if purpose == "eval" else training_precision(cfg, cuda)["dtype"]
    return str(dtype).removeprefix("torch.")


def _checkpoint_dtype(cfg: ExperimentConfig) -> str | None:
    """The dtype in a local checkpoint's config.json (what eval.dtype `auto` means); None if unknown."""
    import json

    config = Path(resolve_model_path(cfg.model.name_or_path), "config.json")
    if not config.is_file():
        return None
    fields = json.loads(config.read_text())
    return fields.get("dtype") or fields.get("torch_dtype")


#: Whether the evaluation after training may run on the colocated rollout engine (one engine start
#: per cell instead of two). Benchmarks turn it off to measure the difference.
REUSE_ROLLOUT_ENGINE_FOR_EVAL = True


def eval_reuses_rollout_engine(cfg: ExperimentConfig) -> bool:
    """Whether this cell's evaluation after training runs on its colocated rollout engine: both on
    vLLM, and the evaluation asks for the dtype the rollouts use (eval.dtype `auto` resolved from a
    local checkpoint; a hub checkpoint's `auto` is not resolved here, so no reuse)."""
    if not (REUSE_ROLLOUT_ENGINE_FOR_EVAL and cfg.stage == "grpo" and cfg.rollout.backend == "vllm"
            and cfg.eval.backend == "vllm" and cfg.eval.after_training):
        return False
    wanted = _engine_dtype(cfg, "eval")
    if wanted == "auto":
        wanted = _checkpoint_dtype(cfg)
    return wanted == _engine_dtype(cfg, "rollout")


def build_llm(cfg: ExperimentConfig, purpose: str, lora_rank: int | None):
    """A vLLM engine on the run's base model, for `purpose` "rollout" (colocated with training)
    or "eval" (alone), serving LoRA adapters up to `lora_rank` (None: no LoRA). A rollout engine
    the evaluation will reuse (eval_reuses_rollout_engine) also takes the evaluation's context."""
    from vllm import LLM

    path = resolve_model_path(cfg.model.name_or_path)
    if purpose == "eval":
        max_len = cfg.eval.max_model_len
    else:  # rollouts sample from the policy as trained: the training weights' dtype
        max_len = cfg.rollout.max_model_len or cfg.grpo.max_prompt_length + cfg.grpo.max_completion_length
        if eval_reuses_rollout_engine(cfg):
            max_len = max(max_len, cfg.eval.max_model_len)
    dtype = _engine_dtype(cfg, purpose)
    kwargs = dict(
        model=path, tokenizer=path, revision=cfg.model.revision, seed=cfg.seed, dtype=dtype,
        max_model_len=max_len, gpu_memory_utilization=derived_memory_share(cfg, purpose),
        enforce_eager=cfg.rollout.enforce_eager, trust_remote_code=cfg.model.trust_remote_code,
        enable_lora=lora_rank is not None,
        logprobs_mode=logprobs_mode(cfg),  # what the importance sampling correction compares with the loss's
    )
    if not torch.cuda.is_available() and not os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
        # On the CPU the KV cache is sized from the need (else vLLM derives it from the 0.2 share
        # minus the weights it holds, and refuses to start once they outgrow it).
        import psutil

        from .grid import vllm_cpu_kv_cache_bytes

        dtype_bytes = 2 if dtype in ("bfloat16", "float16") else 4
        kwargs["kv_cache_memory_bytes"] = vllm_cpu_kv_cache_bytes(cfg, purpose, max_len, dtype_bytes,
                                                                  psutil.virtual_memory().total)
    if purpose == "rollout" and torch.cuda.is_available():
        # The batch's needs, not vLLM's defaults, so that the share leaves room for the KV cache
        # (the sweep's memory fit counts the same). Not on the CPU: there a seeded prefill must
        # never be split over steps, which vLLM's own CPU budget ensures.
        from .grid import vllm_rollout_limits

        kwargs.update(vllm_rollout_limits(cfg, reused_for_eval=eval_reuses_rollout_engine(cfg)))
    if lora_rank is not None:
        kwargs.update(max_lora_rank=vllm_max_lora_rank(max(lora_rank, cfg.rollout.max_lora_rank or 0)), max_loras=1)
    # AWQ: vLLM reads the checkpoint's quantization_config itself. bnb-4bit never comes here: vLLM
    # 0.31+ has no bitsandbytes quantization (config validation refuses bnb4 with vLLM).
    log.info("starting vLLM (%s): %s", purpose, {k: v for k, v in kwargs.items() if k != "tokenizer"})
    return LLM(**kwargs)


def lora_state_dict(peft_model, zero3: bool = False, main: bool = True) -> dict | None:
    """The trained adapter's tensors (PEFT's names) on the main process (None on the others), in
    the base's dtype: PEFT keeps LoRA weights in fp32 and vLLM casts them to the base's dtype when
    it loads them, so casting first gives it the same weights in half the bytes on a 16-bit base.
    Under ZeRO-3 every rank must call this: gathering the sharded parameters is a collective."""
    import contextlib

    from peft import get_peft_model_state_dict

    gather = contextlib.nullcontext()
    if zero3:
        import deepspeed

        gather = deepspeed.zero.GatheredParameters([p for n, p in peft_model.named_parameters() if "lora_" in n])
    dtype = peft_model.get_base_model().dtype
    with gather:
        if not main:
            return None
        return {k: (v.to(dtype) if v.is_floating_point() else v).detach().cpu().contiguous()
                for k, v in get_peft_model_state_dict(peft_model).items()}


def write_adapter(peft_model, state: dict, path: Path) -> int:
    """An adapter folder vLLM can load (weights + adapter_config.json); returns its size in bytes."""
    from safetensors.torch import save_file

    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    save_file(state, str(path / "adapter_model.safetensors"))
    peft_model.peft_config["default"].save_pretrained(str(path))
    files.follow_umask(path)  # safetensors writes 0600 whatever the umask
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file())


class AdapterHotSwap:
    """Publishes the trainer's current LoRA adapter to colocated vLLM as a new LoRARequest per
    policy version, and retires the previous version from vLLM and from disk."""

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
        from vllm.lora.request import LoRARequest

        if self.version_step == step and self.request is not None:
            return self.request
        started = time.perf_counter()
        path = self.folder / f"step-{step:08d}"
        self.bytes_last_sync = write_adapter(peft_model, lora_state_dict(peft_model), path)
        previous = self.request
        # lora_int_id must be unique and > 0 per version: a reused id would serve vLLM's cached
        # (stale) weights.
        self.request = LoRARequest(f"policy-step-{step}", step + 1, str(path))
        self.version_step = step
        self.published_steps.append(step)
        if previous is not None:
            self.llm.llm_engine.remove_lora(previous.lora_int_id)
            shutil.rmtree(previous.lora_path, ignore_errors=True)
        self.seconds_last_sync = time.perf_counter() - started
        return self.request

    def close(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


class RolloutMixin:
    """What both vLLM backends add to the trainer: TRL's importance sampling correction from the
    sampler's log-probs, which TRL applies only when it drives vLLM itself (`use_vllm`)."""

    rollout_cfg: ExperimentConfig

    def enable_importance_sampling(self, cfg: ExperimentConfig) -> None:
        from .config import importance_sampling_on

        # The correction's settings reach TRL through GRPOConfig (training.trl_args); TRL reads
        # them only under use_vllm, which is set here, after __init__, because with it set before
        # TRL would start a vLLM of its own. Its other uses concern that engine, which our
        # _generate_single_turn replaces.
        self.use_vllm = importance_sampling_on(cfg)

    def log_rollout_metrics(self, **values: float) -> None:
        for name, value in values.items():
            self._metrics["train"][f"rollout/{name}"].append(float(value))


#: Colocated rollouts send a group's equal prompts as one request with n samples (else n requests).
SHARE_GROUP_PROMPTS = True


def group_runs(prompt_ids: list) -> list[tuple[int, int]]:
    """(first row, rows) of each run of consecutive equal prompts: GRPO's groups."""
    runs: list[list[int]] = []
    for i, ids in enumerate(prompt_ids):
        if runs and list(prompt_ids[runs[-1][0]]) == list(ids):
            runs[-1][1] += 1
        else:
            runs.append([i, 1])
    return [(first, n) for first, n in runs]


_parked_engine = None


def park_engine(llm) -> None:
    """Keep the rollout engine after training for the evaluation that follows (take_parked_engine),
    with no adapter left loaded: the evaluation's LoRA ids start again at 1."""
    global _parked_engine
    shutdown_parked_engine()
    for lora_id in list(llm.llm_engine.list_loras()):
        llm.llm_engine.remove_lora(lora_id)
    _parked_engine = llm


def take_parked_engine():
    """The engine kept by park_engine (now the caller's to shut down), or None."""
    global _parked_engine
    llm, _parked_engine = _parked_engine, None
    return llm


def shutdown_parked_engine() -> None:
    """Shut down a kept engine nobody took (a run stopped before its evaluation)."""
    llm = take_parked_engine()
    if llm is not None:
        llm.llm_engine.engine_core.shutdown()


def make_vllm_trainer_class(base):
    """`base` (a GRPOTrainer subclass) with rollouts generated by colocated vLLM."""
    from vllm import SamplingParams

    class VLLMRolloutTrainer(RolloutMixin, base):
        def configure_rollout(self, cfg: ExperimentConfig) -> None:
            self.rollout_cfg = cfg
            self.llm = build_llm(cfg, purpose="rollout", lora_rank=cfg.lora.rank)
            self.colocated_vllm_gb = colocated_vllm_gb(cfg)
            self.hot_swap = AdapterHotSwap(self.llm, CellFolder(cfg.output.dir).rollout_adapters)
            self.enable_importance_sampling(cfg)

        def close_rollout(self) -> None:
            import gc

            if self.llm is None:
                return
            self.hot_swap.close()
            if eval_reuses_rollout_engine(self.rollout_cfg):
                park_engine(self.llm)  # the evaluation that follows runs on it
            else:
                self.llm.llm_engine.engine_core.shutdown()  # its worker processes hold the memory
            self.llm = self.hot_swap.llm = None
            gc.collect()

        def current_lora_request(self):
            return self.hot_swap.sync(self.accelerator.unwrap_model(self.model), self.state.global_step)

        def rollout_generate(self, prompt_ids: list[list[int]], sampling_params) -> list:
            """vLLM generation with the current policy; one output per prompt id list
            (`sampling_params`: one for all, or one per prompt)."""
            request = self.current_lora_request()
            return self.llm.generate([{"prompt_token_ids": ids} for ids in prompt_ids], sampling_params,
                                     lora_request=request, use_tqdm=False)

        def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
            g = self.rollout_cfg.grpo
            # TRL repeated each prompt num_generations times; a run of equal prompts (a group)
            # goes as one request with n samples, so vLLM handles the shared prompt once.
            runs = group_runs(prompt_ids) if SHARE_GROUP_PROMPTS else [(i, 1) for i in range(len(prompt_ids))]
            # Seeded from the step (vLLM seeds a group's i-th sample with seed + i), not from the
            # engine's generator, which a restarted job cannot restore: a resumed cell samples
            # what the cell never stopped sampled.
            seeds = group_seeds(self.rollout_cfg.seed, (3, self.state.global_step, self.accelerator.process_index), len(runs))
            params = [SamplingParams(
                n=n, temperature=g.temperature, top_k=g.top_k, top_p=g.top_p, max_tokens=g.max_completion_length,
                logprobs=0, repetition_penalty=1.0, skip_special_tokens=True, seed=seed,
            ) for (_, n), seed in zip(runs, seeds)]
            outputs = self.rollout_generate([prompt_ids[first] for first, _ in runs], params)
            samples = [c for o in outputs for c in sorted(o.outputs, key=lambda c: c.index)]
            completion_ids = [list(c.token_ids) for c in samples]
            logprobs = [[lp[tok].logprob for lp, tok in zip(c.logprobs, c.token_ids)] for c in samples]
            self.log_rollout_metrics(sync_bytes=self.hot_swap.bytes_last_sync, sync_seconds=self.hot_swap.seconds_last_sync)
            return completion_ids, logprobs

    return VLLMRolloutTrainer


def sampler_logprob_deltas(trainer, prompt_ids: list[list[int]]) -> list[float]:
    """|log p(sampler) - log p(trainer)| of every completion token: `trainer` (a vLLM rollout
    trainer) generates for `prompt_ids` as in training (the current adapter version, the sampler
    reporting log-probs as server.logprobs_mode says), then scores the same tokens with its own
    model at the loss temperature. What TRL's importance ratio sees that is not staleness."""
    completions, sampled = trainer._generate_single_turn(prompt_ids, None, None, trainer.rollout_cfg.grpo.num_generations)
    deltas: list[float] = []
    with torch.no_grad():
        for prompt, completion, sampler_logps in zip(prompt_ids, completions, sampled):
            ids = torch.tensor([list(prompt) + list(completion)], device=trainer.accelerator.device)
            logps, _, _ = trainer._get_per_token_logps_and_entropies(trainer.model, ids, torch.ones_like(ids), len(completion))
            deltas += (logps[0].float().cpu() - torch.tensor(sampler_logps)).abs().tolist()
    return deltas


# --------------------------------------------------------------------------- the vLLM server
def sampling_request(cfg: ExperimentConfig) -> dict:
    """The sampling fields of a /v1/completions request: those of the colocated path."""
    g = cfg.grpo
    return {"temperature": g.temperature, "top_k": g.top_k, "top_p": g.top_p, "max_tokens": g.max_completion_length,
            "repetition_penalty": 1.0, "skip_special_tokens": True, "logprobs": 0, "return_token_ids": True}


@dataclass
class Rollouts:
    """Completions for one generation batch of one rank."""

    prompt_ids: list
    completion_ids: list
    logprobs: list
    version: int
    """The policy version (generation batch index) they were sampled from."""


class ServerClient:
    """The trainer's side of the cell's vLLM server: generation requests, adapter versions."""

    def __init__(self, url: str, cfg: ExperimentConfig):
        self.url = url.rstrip("/")
        self.sampling = sampling_request(cfg)
        self.pool = ThreadPoolExecutor(max_workers=64, thread_name_prefix="vllm-request")

    def generate(self, model: str, prompt_ids: list[list[int]], seeds: list[int], **overrides) -> tuple[list, list]:
        """Completion token ids and the sampler's log-probs, one per prompt. Consecutive equal
        prompts (a GRPO group) go as one request with n samples: vLLM seeds the i-th of them
        with seed + i, so they differ, and requests run concurrently in the server's batches."""
        runs = group_runs(prompt_ids)
        fields = {**self.sampling, **overrides}

        def request(run):
            first, n = run
            body = {"model": model, "prompt": prompt_ids[first], "n": n, "seed": seeds[first], **fields}
            choices = sorted(post_json(f"{self.url}/v1/completions", body)["choices"], key=lambda c: c["index"])
            return [(c["token_ids"], (c.get("logprobs") or {}).get("token_logprobs")) for c in choices]

        outputs = [out for run_outputs in self.pool.map(request, runs) for out in run_outputs]
        return [ids for ids, _ in outputs], [lps for _, lps in outputs]

    def load_adapter(self, name: str, path: Path) -> None:
        post_json(f"{self.url}/v1/load_lora_adapter", {"lora_name": name, "lora_path": str(path)})

    def unload_adapter(self, name: str) -> None:
        try:
            post_json(f"{self.url}/v1/unload_lora_adapter", {"lora_name": name})
        except RuntimeError as err:  # never loaded (a failed publish): nothing to free
            log.warning("unloading %s: %s", name, err)

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


class AdapterVersions:
    """Policy versions on the server: version n (the n-th generation batch of this trainer) is the
    adapter as trained then, loaded as `policy-<run>-<n>`. The last `keep` versions stay loaded
    (batches still being generated may name them), the files one version longer (vLLM reads a
    LoRA's files lazily, and a missing folder is fatal to its engine)."""

    def __init__(self, client: ServerClient, folder: Path, keep: int, run_token: str):
        self.client = client
        self.folder = folder
        self.keep = keep
        self.run_token = run_token
        self.latest = -1
        self.bytes_last = 0
        self.seconds_last = 0.0

    def name(self, version: int) -> str:
        return f"policy-{self.run_token}-{version}"

    def publish(self, trainer) -> int:
        """Publish the adapter as it is now as the next version (every rank calls this); returns it."""
        started = time.perf_counter()
        version = self.latest + 1
        model, main = trainer.accelerator.unwrap_model(trainer.model), trainer.accelerator.is_main_process
        zero3 = trainer.is_deepspeed_enabled and trainer.accelerator.state.deepspeed_plugin.zero_stage == 3
        state = lora_state_dict(model, zero3, main)
        if main:
            path = self.folder / f"version-{version:06d}"
            self.bytes_last = write_adapter(model, state, path)
            self.client.load_adapter(self.name(version), path)
            if version - self.keep >= 0:
                self.client.unload_adapter(self.name(version - self.keep))
                shutil.rmtree(self.folder / f"version-{version - self.keep - 1:06d}", ignore_errors=True)
        trainer.accelerator.wait_for_everyone()  # no rank names a version before it is loaded
        self.latest = version
        self.seconds_last = time.perf_counter() - started
        return version

    def close(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def group_seeds(base_seed: int, key: tuple, count: int) -> list[int]:
    """Per-row sampling seeds of a generation batch, from the run's seed and the batch's `key`:
    reproducible whatever order the server runs requests in."""
    import numpy as np

    return [int(s) for s in np.random.SeedSequence([base_seed, *key]).generate_state(count) % 2**31]


class LookaheadSampler:
    """TRL's RepeatSampler (the same orders from the same seed) whose epochs can be read before
    the trainer reaches them: each epoch's permutation is drawn from the sampler's generator in
    epoch order, whoever asks first, the data loader or the thread generating ahead."""

    def __init__(self, repeat_sampler):
        self.inner = repeat_sampler
        self._orders: list[list[int]] = []
        self._lock = threading.Lock()
        self.epochs_started = 0

    def order(self, epoch: int) -> list[int]:
        s = self.inner
        with self._lock:
            while len(self._orders) <= epoch:
                self._orders.append(torch.randperm(s.num_samples, generator=s.generator).tolist() if s.shuffle
                                    else list(range(s.num_samples)))
            return self._orders[epoch]

    def chunks(self, epoch: int) -> list[list[int]]:
        """The prompts of each generation batch of `epoch`, in order (full batches only, as TRL)."""
        order, size = self.order(epoch), self.inner.batch_size
        return [order[i:i + size] for i in range(0, len(order) - size + 1, size)]

    def set_epoch(self, epoch: int) -> None:
        """transformers names the epoch it iterates next (a resumed trainer starts at a later one)."""
        self.epochs_started = epoch

    def __iter__(self):
        # RepeatSampler.__iter__ with the epoch's order drawn through order()
        epoch, self.epochs_started = self.epochs_started, self.epochs_started + 1
        for chunk in self.chunks(epoch):
            for _ in range(self.inner.repeat_count):
                for index in chunk:
                    yield from [index] * self.inner.mini_repeat_count

    def __len__(self) -> int:
        return len(self.inner)


class PromptSchedule:
    """The rows one rank will be asked to generate for, batch after batch: position p is batch
    p % batches_per_epoch of epoch p // batches_per_epoch of the sampler; a rank gets its slice
    of the batch's prompts, each repeated num_generations times (accelerate hands rank r the
    r-th of each round of per-device batches)."""

    def __init__(self, sampler: LookaheadSampler, ids: list, rows_per_rank: int, rank: int):
        self.sampler = sampler
        self.ids = ids
        self.rows_per_rank = rows_per_rank
        self.rank = rank
        self.batches_per_epoch = len(sampler.chunks(0))

    def rows(self, position: int) -> list[int]:
        epoch, batch = divmod(position, self.batches_per_epoch)
        chunk = self.sampler.chunks(epoch)[batch]
        repeated = [i for i in chunk for _ in range(self.sampler.inner.mini_repeat_count)]
        return repeated[self.rank * self.rows_per_rank:(self.rank + 1) * self.rows_per_rank]

    def row_ids(self, position: int) -> list:
        return [self.ids[i] for i in self.rows(position)]

    def locate(self, ids: list, expected: int | None) -> int | None:
        """The position whose rows have these ids: `expected` if it does, else a search of the
        epoch being trained and the next; None if nowhere."""
        if expected is not None and self.row_ids(expected) == ids:
            return expected
        epoch = max(0, self.sampler.epochs_started - 1)
        for position in range(epoch * self.batches_per_epoch, (epoch + 2) * self.batches_per_epoch):
            if self.row_ids(position) == ids:
                return position
        return None


class AheadGenerator:
    """Generates the batches after the one training, each from the newest published version, but
    never more than `max_staleness` versions ahead of the version that will train on it.

    Generation batch j after the anchor (the batch the trainer took at version `anchor_version`)
    is taken by the trainer when it publishes version anchor_version + j, so it may be generated
    from version v only if anchor_version + j - v <= max_staleness."""

    def __init__(self, client: ServerClient, versions: AdapterVersions, schedule: PromptSchedule, tokenize,
                 max_staleness: int, seed: int):
        self.client, self.versions, self.schedule = client, versions, schedule
        self.tokenize = tokenize
        self.max_staleness = max_staleness
        self.seed = seed
        self.cond = threading.Condition()
        self.ready: dict[int, Rollouts] = {}
        self.anchor: tuple[int, int] | None = None  # (position, version) of the last batch taken
        self.next_position: int | None = None
        self.error: BaseException | None = None
        self.stopped = False
        self.thread = threading.Thread(target=self._run, name="generate-ahead", daemon=True)
        self.thread.start()

    def take(self, position: int, version: int) -> Rollouts:
        """The rollouts of `position` for the trainer at `version` (published just before):
        waits for them while they are being generated."""
        with self.cond:
            if self.anchor is None or position != self.anchor[0] + version - self.anchor[1]:
                # first batch, or not the batch expected next: restart the look-ahead from here
                self.ready = {p: r for p, r in self.ready.items() if p == position}
                self.next_position = position if position not in self.ready else position + 1
            self.anchor = (position, version)
            self.cond.notify_all()
            while position not in self.ready:
                if self.error is not None:
                    raise RuntimeError(f"generating ahead failed: {self.error}") from self.error
                self.cond.wait()
            taken = self.ready.pop(position)
            self.cond.notify_all()
            return taken

    def _due(self) -> bool:
        """Whether the next batch may be generated now (called under the lock)."""
        if self.anchor is None or self.next_position is None:
            return False
        position, version = self.anchor
        taken_at = version + self.next_position - position  # the version that will train on it
        return taken_at - self.versions.latest <= self.max_staleness and len(self.ready) <= self.max_staleness

    def _run(self) -> None:
        try:
            while True:
                with self.cond:
                    while not self.stopped and not self._due():
                        self.cond.wait()
                    if self.stopped:
                        return
                    position, version = self.next_position, self.versions.latest
                rows = self.schedule.rows(position)
                prompt_ids = self.tokenize(rows)
                seeds = group_seeds(self.seed, (1, position, self.schedule.rank), len(rows))
                completion_ids, logprobs = self.client.generate(self.versions.name(version), prompt_ids, seeds)
                with self.cond:
                    if self.next_position == position:  # not re-anchored meanwhile
                        self.ready[position] = Rollouts(prompt_ids, completion_ids, logprobs, version)
                        self.next_position = position + 1
                    self.cond.notify_all()
        except BaseException as err:  # reported to the trainer on its next take()
            with self.cond:
                self.error = err
                self.cond.notify_all()

    def close(self) -> None:
        with self.cond:
            self.stopped = True
            self.cond.notify_all()
        self.thread.join(timeout=60)


def make_server_trainer_class(base):
    """`base` (a GRPOTrainer subclass) with rollouts from the job's vLLM server."""

    class ServerRolloutTrainer(RolloutMixin, base):
        ahead: AheadGenerator | None = None
        _lookahead: LookaheadSampler | None = None

        def configure_rollout(self, cfg: ExperimentConfig) -> None:
            import uuid

            from accelerate.utils import broadcast_object_list

            from .server import URL_ENV

            url = os.environ.get(URL_ENV)
            if not url:
                raise RuntimeError(f"rollout.backend=vllm_server: no server ({URL_ENV} is unset). The job that starts "
                                   "training starts it: run through `python -m nli_grpo.train` or a sweep, or start one "
                                   f"yourself (python -m vllm.entrypoints.openai.api_server ... --enable-lora) and set {URL_ENV}")
            self.rollout_cfg = cfg
            self.client = ServerClient(url, cfg)
            token = broadcast_object_list([uuid.uuid4().hex[:8]], from_process=0)[0]  # one name per version on all ranks
            k = cfg.rollout.max_staleness
            self.versions = AdapterVersions(self.client, CellFolder(cfg.output.dir).rollout_adapters, keep=k + 1, run_token=token)
            self.enable_importance_sampling(cfg)
            if k > 0:
                rows = self.args.per_device_train_batch_size * self.args.steps_per_generation
                schedule = PromptSchedule(self._train_sampler(), list(self.train_dataset["id"]), rows, self.accelerator.process_index)
                self.ahead = AheadGenerator(self.client, self.versions, schedule, self._prompt_tokenizer(), k, cfg.seed)

        def _train_sampler(self) -> LookaheadSampler:
            if self._lookahead is None:
                self._lookahead = LookaheadSampler(super()._get_train_sampler())
            return self._lookahead

        def _get_train_sampler(self, dataset=None):
            if self.ahead is not None or self._lookahead is not None:
                return self._train_sampler()
            return super()._get_train_sampler(dataset)

        def _prompt_tokenizer(self):
            """Dataset rows -> prompt token ids as TRL's _tokenize_prompts makes them, on a copy of
            the tokenizer of its own (a fast tokenizer must not be shared between threads)."""
            import copy

            tokenizer = copy.deepcopy(self.processing_class)
            prompts = self.train_dataset["prompt"]

            def tokenize(rows: list[int]) -> list[list[int]]:
                rendered = tokenizer.apply_chat_template([prompts[i] for i in rows], add_generation_prompt=True,
                                                         tokenize=True, return_dict=True)
                return [list(ids) for ids in rendered["input_ids"]]

            return tokenize

        def close_rollout(self) -> None:
            if self.ahead is not None:
                self.ahead.close()
                self.ahead = None
            self.client.close()
            self.versions.close()

        def server_generate(self, prompt_ids: list[list[int]], **sampling) -> list[list[int]]:
            """Completion token ids from the server with the policy as it is now (published as a
            new version), `sampling` overriding the training's fields (e.g. temperature=0)."""
            version = self.versions.publish(self)
            seeds = group_seeds(self.rollout_cfg.seed, (2, version), len(prompt_ids))
            return self.client.generate(self.versions.name(version), prompt_ids, seeds, **sampling)[0]

        def _generate_and_score_completions(self, inputs):
            self._rows = [x.get("id") for x in inputs]  # which batch of the schedule is asked for
            return super()._generate_and_score_completions(inputs)

        def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
            waited = time.perf_counter()
            version = self.versions.publish(self)
            published = time.perf_counter()
            rollouts = self._take_ahead(version, prompt_ids) if self.ahead is not None else None
            if rollouts is None:  # on-policy, or not the batch generated ahead: generate it now
                seeds = group_seeds(self.rollout_cfg.seed, (0, self.state.global_step, self.accelerator.process_index),
                                    len(prompt_ids))
                completion_ids, logprobs = self.client.generate(self.versions.name(version), prompt_ids, seeds)
                rollouts = Rollouts(prompt_ids, completion_ids, logprobs, version)
            self.log_rollout_metrics(staleness=version - rollouts.version, publish_seconds=published - waited,
                                     wait_seconds=time.perf_counter() - published, sync_bytes=self.versions.bytes_last)
            return rollouts.completion_ids, rollouts.logprobs

        def _take_ahead(self, version: int, prompt_ids: list) -> Rollouts | None:
            schedule = self.ahead.schedule
            expected = None if self.ahead.anchor is None else self.ahead.anchor[0] + version - self.ahead.anchor[1]
            position = schedule.locate(self._rows, expected)
            if position is None:
                log.warning("the trainer asked for a batch that is not in the sampler's schedule; generating it now")
                return None
            rollouts = self.ahead.take(position, version)
            if rollouts.prompt_ids != [list(p) for p in prompt_ids]:
                log.warning("prompts generated ahead differ from the trainer's tokenization; generating them now")
                return None
            return rollouts

    return ServerRolloutTrainer


def trainer_class_for(cfg: ExperimentConfig, base):
    """The trainer class for the recipe's rollout backend: TRL's HF generate, colocated vLLM
    hot-swap, or the job's vLLM server."""
    if cfg.rollout.backend == "vllm":
        return make_vllm_trainer_class(base)
    if cfg.rollout.backend == "vllm_server":
        return make_server_trainer_class(base)
    return base
