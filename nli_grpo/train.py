"""The GRPO job: `python -m nli_grpo.train --config <recipe> [key=value ...]`.

One run = one grid cell: train a LoRA adapter with TRL's GRPOTrainer on the paper's recipe, then
(optionally) evaluate it, writing `<output.dir>/result.json` at every stage. The job resumes by
itself from the last COMPLETE checkpoint in `<output.dir>/checkpoints`, so rerunning the same
command after a crash, a preemption or a `scontrol requeue` continues where it stopped.

Signals: SIGUSR2 (Slurm's warning before a time limit or preemption) and SIGTERM make the job
save a checkpoint after the current step and exit with EXIT_PREEMPTED, status `preempted`.
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import resource
import shutil
import signal
import sys
import threading
import time
import warnings
from pathlib import Path

import torch

from . import results
from .config import ConfigError, ExperimentConfig, load_config
from .grid import cell_from_config, cell_id

log = logging.getLogger("nli_grpo.train")

#: Exit code of a run stopped by a signal after saving (EX_TEMPFAIL: "try again").
EXIT_PREEMPTED = 75
CHECKPOINTS_DIRNAME = "checkpoints"
ADAPTER_DIRNAME = "adapter"
COMPLETE_MARKER = "CHECKPOINT_COMPLETE"
DEEPSPEED_CONFIGS = {"zero2": "deepspeed_zero2.json", "zero3": "deepspeed_zero3.json"}


# --------------------------------------------------------------------------- checkpoints on disk
def _step_of(path: Path) -> int:
    return int(path.name.rsplit("-", 1)[1])


def complete_checkpoints(checkpoint_dir: Path) -> list[Path]:
    """Checkpoints that were fully written (marker present), oldest first."""
    if not checkpoint_dir.is_dir():
        return []
    found = [p for p in checkpoint_dir.glob("checkpoint-*") if p.name.rsplit("-", 1)[1].isdigit() and (p / COMPLETE_MARKER).exists()]
    return sorted(found, key=_step_of)


def last_complete_checkpoint(checkpoint_dir: Path) -> Path | None:
    done = complete_checkpoints(checkpoint_dir)
    return done[-1] if done else None


def remove_incomplete_checkpoints(checkpoint_dir: Path) -> list[Path]:
    """Delete checkpoint folders without the completion marker (a save killed half-way), so that
    neither we nor transformers ever load one."""
    removed = []
    for path in checkpoint_dir.glob("checkpoint-*") if checkpoint_dir.is_dir() else []:
        if not (path / COMPLETE_MARKER).exists():
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


# --------------------------------------------------------------------------- run bookkeeping
def slurm_info(previous: dict | None) -> dict:
    """Slurm identity of this attempt; `attempts` counts every start of the run."""
    env = os.environ
    info = dict(previous or {})
    info.update({
        "job_id": env.get("SLURM_JOB_ID"),
        "array_job_id": env.get("SLURM_ARRAY_JOB_ID"),
        "array_task_id": env.get("SLURM_ARRAY_TASK_ID"),
        "restart_count": int(env.get("SLURM_RESTART_COUNT", 0)),
        "node": env.get("SLURMD_NODENAME"),
        "attempts": int(info.get("attempts", 0)) + 1,
    })
    return info


def is_main_process() -> bool:
    """Rank 0 of a torchrun job, or a single-process run: the one that writes results."""
    return int(os.environ.get("RANK", "0")) == 0


#: Config sections a finished stage depends on: it is reused by a restart only if they are unchanged.
STAGE_INPUTS = {"train": ("stage", "seed", "model", "lora", "grpo", "rollout", "data")}
STAGE_INPUTS["eval"] = (*STAGE_INPUTS["train"], "eval")


def changed_inputs(before: dict, now: dict, stage: str) -> list[str]:
    """Config sections (of two `to_dict()` configs) that `stage` depends on and that differ."""
    return [key for key in STAGE_INPUTS[stage] if before.get(key) != now.get(key)]


def reusable_stages(previous: dict, config: dict) -> list[str]:
    """The finished stages of a previous attempt that the current config can keep: a restart
    never redoes one, and a changed recipe never inherits one that used other inputs."""
    return [stage for stage in previous.get("stages_done", [])
            if not changed_inputs(previous.get("config", {}), config, stage)]


class RunRecord:
    """The run's result.json, rewritten atomically on every change (by the main process only)."""

    def __init__(self, cfg: ExperimentConfig):
        self.path = Path(cfg.output.dir) / results.RESULT_FILENAME
        previous = results.load_existing(self.path) or {}
        config = cfg.to_dict()
        stages = reusable_stages(previous, config)
        eval_kept = not changed_inputs(previous.get("config", {}), config, "eval")
        self.doc = {
            "schema_version": results.SCHEMA_VERSION,
            "tool": results.TOOL,
            "sweep": cfg.output.sweep,
            "cell_id": cfg.output.cell_id,
            "status": "running",
            "cell": cell_from_config(cfg),
            "config": config,
            "versions": results.package_versions(),
            "slurm": slurm_info(previous.get("slurm")),
            "model": None,
            "adapter": previous.get("adapter"),  # set by `nli_grpo.evaluate --adapter`
            "train": previous.get("train") if "train" in stages else None,
            # sets finished by an interrupted evaluation are kept (same inputs only)
            "eval": previous.get("eval", {}) if eval_kept else {},
            "stages_done": stages,
            "error": None,
            "created_at": previous.get("created_at", results.now_iso()),
            "updated_at": results.now_iso(),
        }

    def update(self, **fields) -> None:
        self.doc.update(fields, updated_at=results.now_iso())
        if is_main_process():
            results.atomic_write_json(self.path, self.doc)

    def stage_done(self, stage: str) -> bool:
        return stage in self.doc["stages_done"]

    def mark_stage_done(self, stage: str, **fields) -> None:
        self.update(stages_done=[*self.doc["stages_done"], stage], **fields)


class StopRequest:
    """Set by SIGUSR2 / SIGTERM; the trainer checks it after every optimizer step."""

    def __init__(self):
        self.event = threading.Event()
        self.signal_name: str | None = None

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGUSR2, signal.SIGTERM):
            signal.signal(sig, self._handle)

    def _handle(self, signum, _frame) -> None:
        self.signal_name = signal.Signals(signum).name
        log.warning("received %s: saving a checkpoint after this step, then exiting", self.signal_name)
        self.event.set()

    def is_set(self) -> bool:
        return self.event.is_set()


def peak_memory() -> dict:
    if torch.cuda.is_available():
        return {"peak_memory_gb": round(torch.cuda.max_memory_allocated() / 2**30, 3), "peak_memory_kind": "cuda_max_allocated"}
    # ru_maxrss is in KiB on Linux.
    return {"peak_memory_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3), "peak_memory_kind": "host_max_rss"}


# --------------------------------------------------------------------------- trainer pieces
def _trainer_callbacks(run_dir: Path, keep: int, stop: StopRequest):
    from transformers import TrainerCallback

    class CompleteCheckpoints(TrainerCallback):
        """Marks a checkpoint complete once transformers has written all of it (on_save runs
        after model, optimizer, scheduler, RNG and trainer state are on disk), then keeps the
        newest `keep` complete ones. transformers' own rotation is off: it counts half-written
        folders and could delete the only complete checkpoint."""

        def on_save(self, args, state, control, **kwargs):
            if state.is_world_process_zero:
                folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
                with open(folder / COMPLETE_MARKER, "w") as f:
                    f.write(f"{state.global_step}\n")
                    f.flush()
                    os.fsync(f.fileno())
                for old in complete_checkpoints(Path(args.output_dir))[:-keep]:
                    shutil.rmtree(old, ignore_errors=True)

    class TrainLog(TrainerCallback):
        """Append-only JSON lines of TRL's metrics, one per logging step; a restart appends."""

        def on_log(self, args, state, control, logs=None, **kwargs):
            if state.is_world_process_zero and logs and "reward" in logs:
                results.append_jsonl(run_dir / results.TRAIN_LOG_FILENAME, {"step": state.global_step, "time": time.time(), **logs})

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


def make_trainer_class():
    """GRPOTrainer plus the paper's skip of zero-advantage batches (TRL has no such option)."""
    from trl import GRPOTrainer

    class NLIGRPOTrainer(GRPOTrainer):
        """When every advantage of an update's batches is 0, the update is skipped entirely: no
        forward/backward, no gradient clipping, no optimizer step (so neither the weights nor
        AdamW's moments move). The lr schedule still advances: a skipped step is a step."""

        skip_zero_advantage_steps = True
        skipped_zero_advantage = 0
        _update_has_signal = False  # some micro-batch of the current update had a non-zero advantage

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if self.skip_zero_advantage_steps and self.model.training:
                self._guard_optimizer_step()
                any_signal = inputs["advantages"].ne(0).any().float().reshape(1)
                if self.accelerator.num_processes > 1:
                    # All ranks must agree, or DDP would wait forever for the skipping rank.
                    any_signal = self.accelerator.gather(any_signal)
                if not any_signal.any():
                    self.skipped_zero_advantage += 1
                    self._metrics["train"]["skipped_zero_advantage"].append(1.0)
                    # Tied to no parameter: backward leaves every gradient None.
                    return torch.zeros((), device=inputs["advantages"].device, requires_grad=True)
                self._update_has_signal = True
                self._metrics["train"]["skipped_zero_advantage"].append(0.0)
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

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

    g = cfg.grpo
    cuda = torch.cuda.is_available()
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
        vllm_importance_sampling_correction=False,
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
        bf16=cuda and cfg.model.quantization != "awq",
        fp16=cuda and cfg.model.quantization == "awq",
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
        report_to="none",
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
    from .prompts import build_messages

    pool = load_train_pool(cfg.data)
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
    return dataset, {"prompts": len(dataset), "dropped_too_long": len(lengths) - len(keep), "max_prompt_tokens": max(lengths)}


def _train_summary(run_dir: Path, trainer, started: float, first_step: int, max_steps: int, data_info: dict) -> dict:
    logs = [r for r in results.read_jsonl(run_dir / results.TRAIN_LOG_FILENAME) if "reward" in r]
    by_step = {r["step"]: r for r in logs}  # a restart re-logs some steps: keep the latest
    ordered = [by_step[s] for s in sorted(by_step)]
    tenth = max(1, len(ordered) // 10)

    def mean(rows, key):
        vals = [r[key] for r in rows if isinstance(r.get(key), (int, float))]
        return round(sum(vals) / len(vals), 6) if vals else None

    wall = time.time() - started
    this_attempt = [r for r in ordered if r["step"] > first_step]
    tokens = (this_attempt[-1].get("num_tokens", 0) - (by_step.get(first_step, {}).get("num_tokens") or 0)) if this_attempt else 0
    return {
        "steps_done": trainer.state.global_step,
        "max_steps": max_steps,
        "resumed_from_step": first_step,
        "wall_time_s": round(wall, 2),
        "tokens_per_s": round(tokens / wall, 2) if tokens and wall > 0 else None,
        "reward_first": mean(ordered[:tenth], "reward"),
        "reward_last": mean(ordered[-tenth:], "reward"),
        "reward_mean": mean(ordered, "reward"),
        "kl_last": mean(ordered[-tenth:], "kl"),
        "skipped_zero_advantage_steps": trainer.skipped_zero_advantage,
        "data": data_info,
        **peak_memory(),
    }


def build_trainer(cfg: ExperimentConfig, stop: StopRequest, reward_funcs=None):
    """The configured GRPO trainer (HF or vLLM rollouts) and a summary of its training data."""
    from transformers import set_seed

    from .models import load_base_model, load_tokenizer, peft_lora_config
    from .rewards import nli_reward
    from .rollout import trainer_class_for

    set_seed(cfg.seed)
    tokenizer = load_tokenizer(cfg.model)
    dataset, data_info = prompt_dataset(cfg, tokenizer)
    trainer_cls = trainer_class_for(cfg, make_trainer_class())
    # The training arguments first: they set up the process's GPU and, under ZeRO-3, the
    # DeepSpeed config that from_pretrained must see.
    args = trl_args(cfg, Path(cfg.output.dir) / CHECKPOINTS_DIRNAME)
    trainer = trainer_cls(
        model=load_base_model(cfg.model, zero3=cfg.grpo.deepspeed == "zero3"),
        reward_funcs=reward_funcs or [nli_reward],
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=peft_lora_config(cfg.lora),
        callbacks=_trainer_callbacks(Path(cfg.output.dir), cfg.grpo.save_total_limit, stop),
    )
    trainer.skip_zero_advantage_steps = cfg.grpo.skip_zero_advantage_steps
    if hasattr(trainer, "configure_rollout"):
        trainer.configure_rollout(cfg)
    return trainer, data_info


def train(cfg: ExperimentConfig, record: RunRecord, stop: StopRequest, reward_funcs=None) -> bool:
    """Run (or resume) GRPO training; True when max_steps were reached, False when stopped by a
    signal after saving. Saves the final adapter to `<output.dir>/adapter`."""
    from .models import describe

    run_dir = Path(cfg.output.dir)
    checkpoint_dir = run_dir / CHECKPOINTS_DIRNAME
    for path in remove_incomplete_checkpoints(checkpoint_dir):
        log.warning("removed incomplete checkpoint %s (its save was interrupted)", path)
    resume = last_complete_checkpoint(checkpoint_dir)
    first_step = _step_of(resume) if resume else 0
    if resume:
        log.info("resuming from %s", resume)

    trainer, data_info = build_trainer(cfg, stop, reward_funcs)
    tokenizer = trainer.processing_class
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    started = time.time()
    record.update(model=describe(cfg))
    trainer.train(resume_from_checkpoint=str(resume) if resume else None)

    if hasattr(trainer, "close_rollout"):
        trainer.close_rollout()  # free vLLM's memory before the evaluation starts its engine
    steps = trainer.state.global_step
    summary = _train_summary(run_dir, trainer, started, first_step, cfg.grpo.max_steps, data_info)
    if steps < cfg.grpo.max_steps:
        if not stop.is_set():
            raise RuntimeError(f"training ended at step {steps} of {cfg.grpo.max_steps} without a stop request")
        record.update(status="preempted", train=summary)
        return False
    if trainer.accelerator.is_main_process:
        trainer.model.save_pretrained(run_dir / ADAPTER_DIRNAME)
        tokenizer.save_pretrained(run_dir / ADAPTER_DIRNAME)
    record.mark_stage_done("train", train=summary)
    _release(trainer)
    return True


def _release(trainer) -> None:
    """Give back the trainer's GPU memory (model, optimizer, allocator cache) before evaluation
    starts a vLLM engine that checks how much memory is free."""
    import gc

    trainer.accelerator.free_memory()
    trainer.model = trainer.model_wrapped = trainer.optimizer = None
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run(cfg: ExperimentConfig, reward_funcs=None, adapter: Path | None = None) -> int:
    """The whole job for one cell: train (unless zero-shot or already done), then evaluate
    (if configured and not done). `adapter`: evaluate this trained adapter instead of training
    one (`nli_grpo.evaluate --adapter`). Returns the process exit code."""
    stop = StopRequest()
    stop.install()
    record = RunRecord(cfg)
    if adapter is not None:
        adapter = adapter.resolve()
        if record.doc["adapter"] != str(adapter):  # what an earlier run evaluated was another adapter's
            record.doc.update(eval={}, stages_done=[s for s in record.doc["stages_done"] if s != "eval"])
        record.doc["adapter"] = str(adapter)
    record.update()
    try:
        if cfg.stage == "grpo" and adapter is None and not record.stage_done("train"):
            if not train(cfg, record, stop, reward_funcs):
                return EXIT_PREEMPTED
        if not is_main_process():
            return 0  # evaluation runs once, on rank 0
        if cfg.eval.after_training and not record.stage_done("eval"):
            from .evaluate import evaluate_run

            if adapter is None and cfg.stage == "grpo":
                adapter = Path(cfg.output.dir) / ADAPTER_DIRNAME
            evaluation = evaluate_run(cfg, adapter=adapter, stop=stop, done=record.doc["eval"],
                                      on_set_done=lambda block: record.update(eval=block))
            if evaluation is None:
                record.update(status="preempted")
                return EXIT_PREEMPTED
            record.mark_stage_done("eval", eval=evaluation)
        record.update(status="complete")
        return 0
    except BaseException as err:
        record.update(status="failed", error=f"{type(err).__name__}: {err}")
        raise


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m nli_grpo.train",
        description="Train (GRPO + LoRA) and evaluate one cell; resumes from its last complete checkpoint.",
    )
    parser.add_argument("--config", default="paper", help="recipe name (paper, lora_rank, smoke) or a YAML path")
    parser.add_argument("--output-dir", help="shortcut for output.dir=...")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. lora.rank=16 grpo.max_steps=100")
    return parser.parse_args(argv)


def config_for_run(recipe: str, overrides: list[str], output_dir: str | None = None) -> ExperimentConfig:
    """Load the recipe and give the run its sweep folder and cell id when not set explicitly."""
    cfg = load_config(recipe, overrides)
    cell = cell_id(cell_from_config(cfg))
    given = {o.split("=", 1)[0] for o in overrides}
    if "output.cell_id" not in given:
        cfg.output.cell_id = cell
    if output_dir:
        cfg.output.dir = output_dir
    elif "output.dir" not in given:
        cfg.output.dir = str(Path("results") / cfg.output.sweep / cfg.output.cell_id)
    return cfg


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    try:
        cfg = config_for_run(args.config, args.overrides, args.output_dir)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    log.info("run folder %s (cell %s)", cfg.output.dir, cfg.output.cell_id)
    return run(cfg)


if __name__ == "__main__":
    raise SystemExit(main())
