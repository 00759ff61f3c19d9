"""The training stage: GRPO with TRL's GRPOTrainer and PEFT LoRA on the recipe's base model, plus
what the paper does that TRL has no option for (the skip of zero-advantage updates, the loss
temperature). `train` resumes from the cell's last complete checkpoint and returns its outcome;
the job (nli_grpo.job) records it.

    outcome = train(cfg, StopRequest(), attempt=1)     # TrainOutcome(finished, summary)
"""

from __future__ import annotations

import functools
import logging
import os
import resource
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from . import files, results
from .config import ConfigError, ExperimentConfig, importance_sampling_on
from .layout import CellFolder, adapter_from_checkpoint, checkpoint_step, mark_checkpoint_complete
from .process import StopRequest, is_main_process

log = logging.getLogger("nli_grpo.training")

DEEPSPEED_CONFIGS = {"zero2": "deepspeed_zero2.json", "zero3": "deepspeed_zero3.json"}


@dataclass
class TrainOutcome:
    """What a training attempt returns to the job."""

    finished: bool
    """max_steps reached (else: stopped by a signal after saving a checkpoint)."""
    summary: dict
    """The `train` block of result.json."""


def peak_memory(colocated_vllm_gb: float = 0.0) -> dict:
    """Peak memory of the training. On a GPU: this process's allocator peak plus what a colocated
    vLLM engine holds in a process of its own (vLLM's engine core), which that allocator never
    sees: its whole share (rollout.colocated_vllm_gb; its KV cache fills it). On a CPU: this
    process's peak resident set."""
    if torch.cuda.is_available():
        trainer = torch.cuda.max_memory_allocated() / 2**30
        kind = "cuda_max_allocated+vllm_share" if colocated_vllm_gb else "cuda_max_allocated"
        return {"peak_memory_gb": round(trainer + colocated_vllm_gb, 3), "peak_memory_kind": kind,
                "trainer_peak_memory_gb": round(trainer, 3), "vllm_memory_gb": round(colocated_vllm_gb, 3)}
    # ru_maxrss is in KiB on Linux.
    return {"peak_memory_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3), "peak_memory_kind": "host_max_rss"}


# --------------------------------------------------------------------------- trainer pieces
def _trainer_callbacks(folder: CellFolder, keep: int, stop: StopRequest, attempt: int):
    from transformers import TrainerCallback

    class CompleteCheckpoints(TrainerCallback):
        """Marks a checkpoint complete once transformers has written all of it (on_save runs
        after model, optimizer, scheduler, RNG and trainer state are on disk), then keeps the
        newest `keep` complete ones. transformers' own rotation is off: it counts half-written
        folders and could delete the only complete checkpoint."""

        def on_save(self, args, state, control, **kwargs):
            if state.is_world_process_zero:
                mark_checkpoint_complete(folder.checkpoints / f"checkpoint-{state.global_step}", state.global_step)
                for old in folder.complete_checkpoints()[:-keep]:
                    shutil.rmtree(old, ignore_errors=True)

    class TrainLog(TrainerCallback):
        """Append-only JSON lines, one per optimizer step: loss, KL, grad norm, learning rate, the
        skip flag, and the generation metrics (reward...) on the steps that generated. Each line
        carries the run's attempt: a restart replays the steps after its checkpoint and appends
        them again, and readers keep the last attempt's line (results.read_train_log)."""

        def on_log(self, args, state, control, logs=None, **kwargs):
            # "loss" marks a step's log; the end-of-training summary (train_runtime...) has none
            if state.is_world_process_zero and logs and "loss" in logs:
                results.append_jsonl(folder.train_log,
                                     {"step": state.global_step, "attempt": attempt, "time": time.time(), **logs})

    class StopOnSignal(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            stop_now = stop.is_set()
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                # Every rank must take the same decision, or the ranks that save (a collective
                # under DeepSpeed) would wait forever for the ones that train on.
                flag = torch.tensor([float(stop_now)], device=args.device)
                torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
                stop_now = bool(flag.item())
            if stop_now:
                stop.event.set()  # a rank that did not get the signal itself must stop alike
                control.should_save = True
                control.should_training_stop = True
            return control

    return [CompleteCheckpoints(), TrainLog(), StopOnSignal()]


#: Name (without .pt) of the checkpoint file with TRL's generation cycle (per rank under torchrun).
GENERATION_STATE = "generation_state"


@functools.cache
def epoch_aware(sampler_cls):
    """`sampler_cls` (TRL's RepeatSampler) with transformers' `set_epoch`: epoch e is shuffled by
    the e-th permutation of the sampler's seeded generator, as in a run never stopped, also when
    iteration starts at epoch e. RepeatSampler draws one permutation per pass, and a resumed
    trainer does not replay the passes of earlier epochs: epoch e would get epoch 0's order."""

    class EpochAwareSampler(sampler_cls):
        epoch = 0

        def set_epoch(self, epoch: int) -> None:
            self.epoch = epoch

        def __iter__(self):
            self.generator = torch.Generator()
            if self.seed is not None:
                self.generator.manual_seed(self.seed)
            for _ in range(self.epoch if self.shuffle else 0):  # the earlier epochs' permutations
                torch.randperm(self.num_samples, generator=self.generator)
            return super().__iter__()

    EpochAwareSampler.__name__ = EpochAwareSampler.__qualname__ = f"EpochAware{sampler_cls.__name__}"
    return EpochAwareSampler


def make_trainer_class():
    """GRPOTrainer plus what the paper does that TRL does not: the skip of zero-advantage updates,
    the loss temperature (see `configure`) and exact resume (`restore_generation_state`)."""
    from trl import GRPOTrainer

    class NLIGRPOTrainer(GRPOTrainer):
        """When every advantage of an update's batch is 0, the update is skipped entirely: no
        forward/backward, no gradient clipping, no optimizer step (so neither the weights nor
        AdamW's moments move). The lr schedule still advances: a skipped step is a step."""

        skip_zero_advantage_steps = True
        _update_has_signal = False  # some micro-batch of the current update had a non-zero advantage
        _prepared = None  # a micro-batch training_step already prepared (see _prepare_inputs)

        def configure(self, cfg: ExperimentConfig) -> None:
            """Apply the recipe's settings that TRL has no argument for."""
            self.skip_zero_advantage_steps = cfg.grpo.skip_zero_advantage_steps
            if cfg.grpo.loss_temperature is not None:
                self.set_loss_temperature(cfg.grpo.loss_temperature)
            self.keep_lora_weights_float32()

        def keep_lora_weights_float32(self) -> None:
            """Undo TRL's cast of the trainable (LoRA) weights to bf16 on 4-/8-bit bases (its
            `is_loaded_in_4bit` branch in __init__, after QLoRA's recommendation) before train()
            builds the optimizer: LoRA weights and AdamW's moments are float32 in every
            quantization, as PEFT keeps them on bf16 and AWQ bases, so the quantization ablation
            compares like with like (at lr 5e-6 many bf16 updates would round away). lora_A keeps
            the bf16-rounded start TRL left (lora_B starts at 0)."""
            model = self.model
            if not (getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False)):
                return
            for param in model.parameters():
                if param.requires_grad and param.dtype != torch.float32:
                    param.data = param.data.float()

        def set_loss_temperature(self, temperature: float) -> None:
            """Compute the loss's policy, old and reference log-probs at `temperature`. TRL 1.16
            bakes its sampling temperature into the fused LM head it adds to the model in
            __init__ (the only place the loss reads a temperature); patching the head again
            replaces it, while sampling keeps grpo.temperature."""
            from trl.trainer.utils import add_fused_lm_head

            model = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
            for target in (model, self.ref_model):
                if target is not None:
                    add_fused_lm_head(target, temperature=temperature, cast_lm_head_to_fp32=self.args.cast_lm_head_to_fp32,
                                      outputs=("log_probs", "entropy"))
            self.loss_temperature = temperature

        # ------------------------------------------------------------------ exact resume
        # What TRL keeps between optimizer steps and transformers does not checkpoint: the
        # micro-step counter that decides when the next batch is generated, the generated batch
        # a cycle of num_iterations x steps_per_generation micro-steps trains on, and the prompt
        # order of epochs after the first. With them (and transformers' RNG states, and the
        # rollout seeds derived from the step: rollout.py) a resumed cell takes the steps the
        # cell never stopped would have taken, bit for bit (tests/test_resume.py).
        def _generation_state_file(self, checkpoint) -> Path:
            rank = self.accelerator.process_index
            return Path(checkpoint) / (f"{GENERATION_STATE}_{rank}.pt" if self.accelerator.num_processes > 1 else f"{GENERATION_STATE}.pt")

        def _save_checkpoint(self, model, trial):
            super()._save_checkpoint(model, trial)
            # Every rank its own buffer (its slice of the batch); before on_save marks the
            # checkpoint complete. At a cycle boundary the buffer is spent: not saved.
            mid_cycle = self._step % (self.args.steps_per_generation * self.num_iterations) != 0
            path = self._generation_state_file(Path(self.args.output_dir) / f"checkpoint-{self.state.global_step}")
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save({"step": self._step, "buffered_inputs": self._buffered_inputs if mid_cycle else None}, path)

        def restore_generation_state(self, checkpoint) -> None:
            """Take up TRL's generation cycle where `checkpoint` left it (call before train())."""
            path = self._generation_state_file(checkpoint)
            if not path.is_file():  # a checkpoint written before this file existed
                log.warning("%s has no %s: a batch in flight is generated again (the resumed run is not the run "
                            "never stopped)", checkpoint, path.name)
                return
            state = torch.load(path, map_location=self.accelerator.device, weights_only=False)
            self._step, self._buffered_inputs = state["step"], state["buffered_inputs"]

        def _get_train_sampler(self, dataset=None):
            sampler = super()._get_train_sampler(dataset)
            sampler.__class__ = epoch_aware(type(sampler))  # TRL's sampler, as TRL configured it, plus set_epoch
            return sampler

        def _prepare_inputs(self, generation_batch):
            if self._prepared is not None:  # prepared by training_step for this very micro-batch
                inputs, self._prepared = self._prepared, None
                return inputs
            return super()._prepare_inputs(generation_batch)

        def training_step(self, model, inputs, num_items_in_batch):
            if not self.skip_zero_advantage_steps:
                return super().training_step(model, inputs, num_items_in_batch)
            self._guard_optimizer_step()
            model.train()  # before generating, as transformers' training_step: TRL reads the mode
            prepared = self._prepare_inputs(inputs)  # generates when the batch is due
            signal = prepared["advantages"].ne(0).any().float().reshape(1)
            if self.accelerator.num_processes > 1:
                # All ranks must agree, or DDP / DeepSpeed would wait forever for the skipping one.
                signal = self.accelerator.gather(signal)
            if signal.any():
                self._update_has_signal = True
                self._metrics["train"]["skipped_zero_advantage"].append(0.0)
                self._prepared = prepared
                return super().training_step(model, inputs, num_items_in_batch)
            # No forward, no backward: neither the gradients nor the optimizer see this micro-batch
            # (DeepSpeed steps inside backward: config validation allows the skip under DeepSpeed
            # only when an update is one micro-batch). The lr schedule is the trainer's: it steps.
            self._step += 1  # TRL's micro-step counter: it decides when the next batch is generated
            self._metrics["train"]["skipped_zero_advantage"].append(1.0)
            return torch.zeros((), device=self.args.device)

        def _guard_optimizer_step(self) -> None:
            """Wrap the prepared optimizer's step (once) so that an update without signal does
            not step. Calling it would also trip fp16's GradScaler, which asserts that it saw
            gradients ("No inf checks were recorded")."""
            optimizer = self.optimizer
            if getattr(optimizer, "_nli_grpo_guarded", False):
                return
            real_step = optimizer.step

            # wraps: keeps the marker torch's lr scheduler put on step (else it warns each step)
            @functools.wraps(real_step)
            def step(*args, **kwargs):
                result = real_step(*args, **kwargs) if self._update_has_signal else None
                self._update_has_signal = False
                return result

            optimizer.step = step
            optimizer._nli_grpo_guarded = True
            # A skipped first update is deliberate; torch would warn the schedule ran ahead.
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)` before `optimizer.step\(\)`")

        def _clip_grad_norm(self, model):
            if self.skip_zero_advantage_steps and not self._update_has_signal:
                return torch.zeros(())  # nothing to clip; unscaling no gradients would trip fp16
            return super()._clip_grad_norm(model)

        def _get_grad_norm(self, model, grad_norm=None):
            if self.skip_zero_advantage_steps and not self._update_has_signal:
                return 0.0
            return super()._get_grad_norm(model, grad_norm)

    return NLIGRPOTrainer


def trl_args(cfg: ExperimentConfig, output_dir: Path):
    """TRL GRPOConfig with every field the paper relies on set explicitly."""
    from trl import GRPOConfig

    from .models import training_precision
    from .trackers import report_args

    g = cfg.grpo
    cuda = torch.cuda.is_available()
    precision = training_precision(cfg, cuda)
    world = int(os.environ.get("WORLD_SIZE", "1"))  # processes actually started (torchrun sets it)
    if g.completions_per_step % (g.gradient_accumulation_steps * world):
        raise ConfigError(f"grpo.completions_per_step={g.completions_per_step} is not divisible by "
                          f"grpo.gradient_accumulation_steps ({g.gradient_accumulation_steps}) x {world} processes")
    deepspeed = None
    if g.deepspeed:
        deepspeed = str(Path(__file__).with_name("assets") / DEEPSPEED_CONFIGS[g.deepspeed]) if g.deepspeed in DEEPSPEED_CONFIGS else g.deepspeed
    return GRPOConfig(
        output_dir=str(output_dir),
        max_steps=g.max_steps,
        per_device_train_batch_size=g.completions_per_step // (g.gradient_accumulation_steps * world),
        gradient_accumulation_steps=g.gradient_accumulation_steps,
        steps_per_generation=g.gradient_accumulation_steps,
        num_generations=g.num_generations,
        num_iterations=g.num_iterations,
        beta=g.beta,
        epsilon=g.epsilon,
        epsilon_high=g.epsilon,
        delta=None,
        importance_sampling_level="token",
        # TRL 1.x defaults the paper's TRL 0.16 did not have, off so the objective is the paper's:
        use_bias_correction_kl=False,   # plain k3 KL, not weighted by the importance ratio
        # The sampler's log-probs correct the loss only where generation runs ahead of training
        # (rollout.max_staleness), unless the recipe asks; the bounds are pinned, not TRL's.
        vllm_importance_sampling_correction=importance_sampling_on(cfg),
        vllm_importance_sampling_mode=cfg.rollout.importance_sampling_mode,
        vllm_importance_sampling_clip_max=cfg.rollout.importance_sampling_cap,
        vllm_importance_sampling_clip_min=None,
        off_policy_mask_threshold=None,
        entropy_coef=0.0,
        top_entropy_quantile=1.0,
        use_adaptive_entropy=False,
        multi_objective_aggregation="sum_then_normalize",
        reward_weights=None,
        scale_rewards=g.scale_rewards,
        loss_type=g.loss_type,
        mask_truncated_completions=False,
        learning_rate=g.learning_rate,
        lr_scheduler_type=g.lr_scheduler_type,
        warmup_steps=g.warmup_steps,
        weight_decay=g.weight_decay,
        optim=g.optim,
        max_grad_norm=g.max_grad_norm,
        max_completion_length=g.max_completion_length,
        temperature=g.temperature,
        top_k=g.top_k,
        top_p=g.top_p,
        min_p=None,
        repetition_penalty=1.0,
        use_vllm=False,
        sync_ref_model=False,
        disable_dropout=True,
        bf16=precision["bf16"],
        fp16=precision["fp16"],
        use_cpu=not cuda,
        gradient_checkpointing=cfg.model.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False} if cfg.model.gradient_checkpointing else None,
        logging_steps=g.logging_steps,
        save_strategy="steps",
        save_steps=g.save_steps,
        save_total_limit=None,
        seed=cfg.seed,  # also seeds TRL's prompt sampler
        shuffle_dataset=True,
        remove_unused_columns=False,
        **report_args(cfg),  # output.report_to: the trackers, run name = cell id, project = sweep
        log_completions=False,
        dataloader_num_workers=0,
        deepspeed=deepspeed,
    )


def load_train_pool(data_cfg):
    """The training prompts: the hard-example pool (`anli_hard`, built by nli_grpo.bootstrap) or
    a raw train source of the registry."""
    from .data import load_train_source

    return load_train_source(data_cfg.train_source, local_dir=data_cfg.local_dir, files=data_cfg.files,
                             hub=data_cfg.hub, limit=data_cfg.train_limit).dataset


def prompt_dataset(cfg: ExperimentConfig, tokenizer):
    """Training prompts as TRL conversational records (`prompt` messages + gold `label`),
    dropping prompts longer than grpo.max_prompt_length tokens (TRL no longer truncates, and a
    left-truncated prompt would lose the system message)."""
    from .data import fingerprint
    from .prompts import build_messages

    pool = load_train_pool(cfg.data)
    pool_fingerprint = fingerprint(pool)
    dataset = pool.map(
        lambda ex: {"prompt": build_messages(ex["premise"], ex["hypothesis"])},
        remove_columns=[c for c in pool.column_names if c not in ("id", "label")],
    )
    rendered = tokenizer.apply_chat_template(list(dataset["prompt"]), add_generation_prompt=True, tokenize=True, return_dict=True)
    lengths = [len(ids) for ids in rendered["input_ids"]]
    keep = [i for i, n in enumerate(lengths) if n <= cfg.grpo.max_prompt_length]
    if len(keep) < len(dataset):
        log.warning("dropped %d of %d training prompts longer than grpo.max_prompt_length=%d tokens",
                    len(dataset) - len(keep), len(dataset), cfg.grpo.max_prompt_length)
        dataset = dataset.select(keep)
    if len(dataset) < cfg.grpo.completions_per_step // cfg.grpo.num_generations:
        raise ValueError(f"only {len(dataset)} training prompts left; a step needs "
                         f"{cfg.grpo.completions_per_step // cfg.grpo.num_generations} (check data.train_source / data.train_limit)")
    return dataset, {"prompts": len(dataset), "dropped_too_long": len(lengths) - len(keep), "max_prompt_tokens": max(lengths),
                     "source": cfg.data.train_source, "fingerprint": pool_fingerprint}


def lora_dtype(dtypes) -> str:
    """The adapter's precision for result.json's `train.lora_dtype`: "float32", or the dtypes
    found joined by "+" when they are mixed."""
    return "+".join(sorted({str(d).removeprefix("torch.") for d in dtypes}))


def train_summary(folder: CellFolder, steps_done: int, started: float, first_step: int, max_steps: int, data_info: dict,
                  colocated_vllm_gb: float = 0.0) -> dict:
    """The `train` block of result.json, from the training log (one record per optimizer step,
    the last attempt's where a restart replayed steps)."""
    rows = results.read_train_log(folder.train_log)
    generated = [r for r in rows if "reward" in r]  # reward: logged on the steps that generated
    tenth = max(1, len(generated) // 10)

    def mean(rows, key):
        vals = [r[key] for r in rows if isinstance(r.get(key), (int, float))]
        return round(sum(vals) / len(vals), 6) if vals else None

    wall = time.time() - started
    counted = [r for r in rows if isinstance(r.get("num_tokens"), (int, float))]
    before = [r["num_tokens"] for r in counted if r["step"] <= first_step]
    after = [r["num_tokens"] for r in counted if r["step"] > first_step]
    tokens = after[-1] - (before[-1] if before else 0) if after else 0
    return {
        "steps_done": steps_done,
        "max_steps": max_steps,
        "resumed_from_step": first_step,
        "wall_time_s": round(wall, 2),
        "tokens_per_s": round(tokens / wall, 2) if tokens and wall > 0 else None,
        "reward_first": mean(generated[:tenth], "reward"),
        "reward_last": mean(generated[-tenth:], "reward"),
        "reward_mean": mean(generated, "reward"),
        "kl_last": mean(rows[-tenth:], "kl"),
        "skipped_zero_advantage_steps": sum(r.get("skipped_zero_advantage") == 1.0 for r in rows),
        "data": data_info,
        **peak_memory(colocated_vllm_gb),
    }


def build_trainer(cfg: ExperimentConfig, stop: StopRequest, reward_funcs=None, attempt: int = 1):
    """The configured GRPO trainer (HF or vLLM rollouts) and a summary of its training data."""
    from transformers import set_seed

    from .models import load_base_model, load_tokenizer, peft_lora_config, training_precision
    from .rewards import nli_reward
    from .rollout import trainer_class_for
    from .trackers import last_logged_step, log_each_step_once, tracker_env

    set_seed(cfg.seed)
    tokenizer = load_tokenizer(cfg.model)
    dataset, data_info = prompt_dataset(cfg, tokenizer)
    trainer_cls = trainer_class_for(cfg, make_trainer_class())
    # The training arguments first: they set up the process's GPU and, under ZeRO-3, the
    # DeepSpeed config that from_pretrained must see.
    folder = CellFolder(cfg.output.dir)
    os.environ.update(tracker_env(cfg))  # the trackers' names, run id and folders; read as the trainer is built
    args = trl_args(cfg, folder.checkpoints)
    dtype = training_precision(cfg, torch.cuda.is_available())["dtype"]
    trainer = trainer_cls(
        model=load_base_model(cfg.model, dtype, zero3=cfg.grpo.deepspeed == "zero3", training=True),
        reward_funcs=reward_funcs or [nli_reward],
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=peft_lora_config(cfg.lora),
        callbacks=_trainer_callbacks(folder, cfg.grpo.save_total_limit, stop, attempt),
    )
    trainer.configure(cfg)
    log_each_step_once(trainer, last_logged_step(folder))  # a restart's replayed steps reach the trackers once
    if hasattr(trainer, "configure_rollout"):
        trainer.configure_rollout(cfg)
    return trainer, data_info


def train(cfg: ExperimentConfig, stop: StopRequest, attempt: int = 1, reward_funcs=None) -> TrainOutcome:
    """Run (or resume) GRPO training until grpo.max_steps or a stop request (a checkpoint is saved
    after the step in flight). On finishing, the final adapter is in the cell's `adapter/`."""
    folder = CellFolder(cfg.output.dir)
    for path in folder.remove_incomplete_checkpoints():
        log.warning("removed incomplete checkpoint %s (its save was interrupted)", path)
    resume = folder.last_checkpoint()
    first_step = checkpoint_step(resume) if resume else 0
    started = time.time()
    if first_step >= cfg.grpo.max_steps:
        # The job died after its last save and before recording the stage: nothing is left to
        # train (transformers would run one more step from a checkpoint at max_steps).
        log.info("%s is at grpo.max_steps=%d: no step left to train", resume, cfg.grpo.max_steps)
        if is_main_process():
            adapter_from_checkpoint(resume, folder.adapter)
        from safetensors.torch import load_file

        summary = train_summary(folder, first_step, started, first_step, cfg.grpo.max_steps, {})
        summary["lora_dtype"] = lora_dtype(t.dtype for t in load_file(resume / "adapter_model.safetensors").values())
        return TrainOutcome(True, summary)
    if resume:
        log.info("resuming from %s", resume)

    trainer, data_info = build_trainer(cfg, stop, reward_funcs, attempt=attempt)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    if resume:
        trainer.restore_generation_state(resume)
    trainer.train(resume_from_checkpoint=str(resume) if resume else None)

    if hasattr(trainer, "close_rollout"):
        trainer.close_rollout()  # free vLLM's memory before the evaluation starts its engine
    steps = trainer.state.global_step
    summary = train_summary(folder, steps, started, first_step, cfg.grpo.max_steps, data_info,
                            colocated_vllm_gb=getattr(trainer, "colocated_vllm_gb", 0.0))
    summary["lora_dtype"] = lora_dtype(p.dtype for p in trainer.model.parameters() if p.requires_grad)
    if steps < cfg.grpo.max_steps:
        if not stop.is_set():
            raise RuntimeError(f"training ended at step {steps} of {cfg.grpo.max_steps} without a stop request")
        return TrainOutcome(False, summary)
    # Every rank: under ZeRO-3 gathering the sharded LoRA weights is a collective (the trainer's
    # own save, as for its checkpoints); the main process writes the adapter and the tokenizer.
    trainer.save_model(str(folder.adapter))
    if trainer.accelerator.is_main_process:
        files.follow_umask(folder.adapter)  # safetensors writes the weights 0600 whatever the umask
    _release(trainer)
    return TrainOutcome(True, summary)


def _release(trainer) -> None:
    """Give back the trainer's GPU memory before evaluation starts a vLLM engine that checks how
    much memory is free: every reference to the model, its optimizer and lr schedule (the
    trainer's, accelerate's, the callback handler's; a DeepSpeed engine holds all three), then the
    reference cycles (TRL binds the model's forward onto it), then the allocator's cache."""
    import gc

    trainer.accelerator.free_memory()  # accelerate's lists of prepared models, optimizers, schedulers, engine
    handler = trainer.callback_handler
    handler.model = handler.optimizer = handler.lr_scheduler = handler.train_dataloader = handler.eval_dataloader = None
    trainer.model = trainer.model_wrapped = trainer.optimizer = trainer.lr_scheduler = None
    trainer.deepspeed = trainer.ref_model = None
    gc.collect()
    torch.cuda.empty_cache()  # a no-op where CUDA was never initialised


