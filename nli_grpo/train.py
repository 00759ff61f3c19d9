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
#: Exit code of a run refused before it started (bad config, conflicting run folder): never retried.
EXIT_REFUSED = 2
CHECKPOINTS_DIRNAME = "checkpoints"
ADAPTER_DIRNAME = "adapter"
COMPLETE_MARKER = "CHECKPOINT_COMPLETE"
#: The sweep's snapshot of the config a cell was submitted with (written by launch.py).
CONFIG_SNAPSHOT_FILENAME = "config.yaml"
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


#: Config sections a stage depends on: work a stage left on disk belongs to these settings.
STAGE_INPUTS = {"train": ("stage", "seed", "model", "lora", "grpo", "rollout", "data")}
STAGE_INPUTS["eval"] = (*STAGE_INPUTS["train"], "eval")


def changed_inputs(before: dict, now: dict, stage: str) -> list[str]:
    """Config sections (of two `to_dict()` configs) that `stage` depends on and that differ."""
    return [key for key in STAGE_INPUTS[stage] if before.get(key) != now.get(key)]


def stages_on_disk(run_dir: Path, previous: dict) -> list[str]:
    """The stages that left work in `run_dir`: training (a checkpoint, a finished training, the
    adapter) and evaluation (an evaluated set, a predictions file)."""
    found = []
    if "train" in previous.get("stages_done", []) or (run_dir / ADAPTER_DIRNAME).is_dir() \
            or any((run_dir / CHECKPOINTS_DIRNAME).glob("checkpoint-*")):
        found.append("train")
    if previous.get("eval") or any((run_dir / results.PREDICTIONS_DIRNAME).glob("*")):
        found.append("eval")
    return found


def conflicting_inputs(run_dir: Path, config: dict, adapter: str | None = None) -> list[str]:
    """Why `config` cannot continue the run in `run_dir`: the config sections (and the evaluated
    adapter) that differ from those of the work already there. Continuing would mix two
    experiments (a "resume" from checkpoints trained with other settings, or predictions of
    another model), so the train command and the sweep both refuse unless told to start afresh.
    The recorded settings are result.json's, else the sweep's config snapshot (launch.py)."""
    from .config import ConfigError, config_from_dict

    run_dir = Path(run_dir)
    previous = results.load_existing(run_dir / results.RESULT_FILENAME) or {}
    stages = stages_on_disk(run_dir, previous)
    if not stages:
        return []
    before = previous.get("config")
    snapshot = run_dir / CONFIG_SNAPSHOT_FILENAME
    if before is None and snapshot.is_file():
        from omegaconf import OmegaConf

        try:
            before = config_from_dict(OmegaConf.to_container(OmegaConf.load(snapshot))).to_dict()
        except ConfigError:
            before = None
    if before is None:
        return ["unknown (no readable result.json or config snapshot beside its checkpoints)"]
    changed = dict.fromkeys(key for stage in stages for key in changed_inputs(before, config, stage))
    if "eval" in stages and adapter is not None and previous.get("adapter") not in (None, adapter):
        changed["adapter"] = None
    return list(changed)


def move_aside(run_dir: Path) -> Path:
    """Move a run folder to `<parent>/.replaced/<name>.<time>` (hidden from aggregate, nothing
    deleted) so that a new run can start in its place. Returns where it went."""
    target = run_dir.parent / ".replaced" / f"{run_dir.name}.{results.now_iso().replace(':', '')}"
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(run_dir), target)
    return target


class RunRecord:
    """The run's result.json, rewritten atomically on every change (by the main process only).
    The caller has checked `conflicting_inputs`: every stage finished on disk is kept."""

    def __init__(self, cfg: ExperimentConfig):
        self.path = Path(cfg.output.dir) / results.RESULT_FILENAME
        previous = results.load_existing(self.path) or {}
        self.doc = {
            "schema_version": results.SCHEMA_VERSION,
            "tool": results.TOOL,
            "sweep": cfg.output.sweep,
            "cell_id": cfg.output.cell_id,
            "status": "running",
            "cell": cell_from_config(cfg),
            "config": cfg.to_dict(),
            "versions": results.package_versions(),
            "slurm": slurm_info(previous.get("slurm")),
            "model": None,
            "adapter": previous.get("adapter"),  # set by `nli_grpo.evaluate --adapter`
            "train": previous.get("train") if "train" in previous.get("stages_done", []) else None,
            "eval": previous.get("eval", {}),  # sets finished by an interrupted evaluation are kept
            "stages_done": previous.get("stages_done", []),
            "error": None,
            "created_at": previous.get("created_at", results.now_iso()),
            "updated_at": results.now_iso(),
        }

    @property
    def attempt(self) -> int:
        return self.doc["slurm"]["attempts"]

    def update(self, **fields) -> None:
        self.doc.update(fields, updated_at=results.now_iso())
        if is_main_process():
            results.atomic_write_json(self.path, self.doc)

    def stage_done(self, stage: str) -> bool:
        return stage in self.doc["stages_done"]

    def mark_stage_done(self, stage: str, **fields) -> None:
        self.update(stages_done=[*self.doc["stages_done"], stage], **fields)


def record_signal_death(run_dir: Path, signal_name: str, retries_used: int, retries: int, retrying: bool) -> str:
    """Record in result.json that the training process was killed by a signal (it could not say
    so itself): in `slurm.deaths`, and, when no retry is left, as the run's failure (status
    `failed`, the signal and the last step on disk). Returns the message."""
    run_dir = Path(run_dir)
    checkpoint = last_complete_checkpoint(run_dir / CHECKPOINTS_DIRNAME)
    step = _step_of(checkpoint) if checkpoint else 0
    message = (f"training process killed by {signal_name} with step {step} on disk (the OOM killer, or a node fault? "
               "see the job's log, `sacct -j <job> -o JobID,State,MaxRSS` and dmesg); "
               + (f"restarting it from there (retry {retries_used + 1} of {retries})" if retrying else
                  f"not restarted: {retries} retr{'y' if retries == 1 else 'ies'} used (sweep --retries)"))
    path = run_dir / results.RESULT_FILENAME
    doc = results.load_existing(path)
    if doc is None:  # killed before it wrote anything: the run never started
        return message
    death = {"signal": signal_name, "step_on_disk": step, "at": results.now_iso(), "retried": retrying}
    doc["slurm"]["deaths"] = [*doc["slurm"].get("deaths", []), death]
    if not retrying:
        doc.update(status="failed", error=message, failure={"exit_signal": signal_name, "last_step_on_disk": step})
    doc["updated_at"] = results.now_iso()
    results.atomic_write_json(path, doc)
    return message


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
def _trainer_callbacks(run_dir: Path, keep: int, stop: StopRequest, attempt: int):
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
        """Append-only JSON lines, one per optimizer step: loss, KL, grad norm, learning rate, the
        skip flag, and the generation metrics (reward...) on the steps that generated. Each line
        carries the run's attempt: a restart replays the steps after its checkpoint and appends
        them again, and readers keep the last attempt's line (results.read_train_log)."""

        def on_log(self, args, state, control, logs=None, **kwargs):
            # "loss" marks a step's log; the end-of-training summary (train_runtime...) has none
            if state.is_world_process_zero and logs and "loss" in logs:
                results.append_jsonl(run_dir / results.TRAIN_LOG_FILENAME,
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


def make_trainer_class():
    """GRPOTrainer plus what the paper does that TRL does not: the skip of zero-advantage updates
    and the loss temperature (see `configure`)."""
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


def _train_summary(run_dir: Path, steps_done: int, started: float, first_step: int, max_steps: int, data_info: dict) -> dict:
    """The `train` block of result.json, from the training log (one record per optimizer step,
    the last attempt's where a restart replayed steps)."""
    rows = results.read_train_log(run_dir / results.TRAIN_LOG_FILENAME)
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
        **peak_memory(),
    }


def build_trainer(cfg: ExperimentConfig, stop: StopRequest, reward_funcs=None, attempt: int = 1):
    """The configured GRPO trainer (HF or vLLM rollouts) and a summary of its training data."""
    from transformers import set_seed

    from .models import load_base_model, load_tokenizer, peft_lora_config, training_precision
    from .rewards import nli_reward
    from .rollout import trainer_class_for

    set_seed(cfg.seed)
    tokenizer = load_tokenizer(cfg.model)
    dataset, data_info = prompt_dataset(cfg, tokenizer)
    trainer_cls = trainer_class_for(cfg, make_trainer_class())
    # The training arguments first: they set up the process's GPU and, under ZeRO-3, the
    # DeepSpeed config that from_pretrained must see.
    args = trl_args(cfg, Path(cfg.output.dir) / CHECKPOINTS_DIRNAME)
    dtype = training_precision(cfg, torch.cuda.is_available())["dtype"]
    trainer = trainer_cls(
        model=load_base_model(cfg.model, dtype, zero3=cfg.grpo.deepspeed == "zero3"),
        reward_funcs=reward_funcs or [nli_reward],
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=peft_lora_config(cfg.lora),
        callbacks=_trainer_callbacks(Path(cfg.output.dir), cfg.grpo.save_total_limit, stop, attempt),
    )
    trainer.configure(cfg)
    if hasattr(trainer, "configure_rollout"):
        trainer.configure_rollout(cfg)
    return trainer, data_info


#: What a checkpoint holds besides the adapter and its tokenizer: the trainer's state.
TRAINER_STATE_FILES = ("optimizer.pt", "scheduler.pt", "scaler.pt", "trainer_state.json", "training_args.bin", COMPLETE_MARKER)


def adapter_from_checkpoint(checkpoint: Path, target: Path) -> None:
    """Copy a complete checkpoint's adapter and tokenizer files to `target` (atomically: a
    temporary folder renamed into place)."""
    tmp = target.with_name(f".{target.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for path in checkpoint.iterdir():
        if path.is_file() and path.name not in TRAINER_STATE_FILES and not path.name.startswith("rng_state"):
            shutil.copy2(path, tmp / path.name)
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)


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
    record.update(model=describe(cfg))
    started = time.time()
    if first_step >= cfg.grpo.max_steps:
        # The job died after its last save and before recording the stage: nothing is left to
        # train (transformers would run one more step from a checkpoint at max_steps).
        log.info("%s is at grpo.max_steps=%d: no step left to train", resume, cfg.grpo.max_steps)
        if is_main_process():
            adapter_from_checkpoint(resume, run_dir / ADAPTER_DIRNAME)
        summary = _train_summary(run_dir, first_step, started, first_step, cfg.grpo.max_steps, {})
        record.mark_stage_done("train", train=summary)
        return True
    if resume:
        log.info("resuming from %s", resume)

    trainer, data_info = build_trainer(cfg, stop, reward_funcs, attempt=record.attempt)
    tokenizer = trainer.processing_class
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    trainer.train(resume_from_checkpoint=str(resume) if resume else None)

    if hasattr(trainer, "close_rollout"):
        trainer.close_rollout()  # free vLLM's memory before the evaluation starts its engine
    steps = trainer.state.global_step
    summary = _train_summary(run_dir, steps, started, first_step, cfg.grpo.max_steps, data_info)
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


class RunConflict(RuntimeError):
    """The run folder holds work done with other settings; the message says how to start afresh."""


def claim_run_dir(cfg: ExperimentConfig, adapter: Path | None = None, force: bool = False) -> None:
    """Make sure the run folder can take this run: refuse (RunConflict) when it holds work done
    with other settings, unless `force`, which moves that work aside (nothing is deleted)."""
    run_dir = Path(cfg.output.dir)
    conflicts = conflicting_inputs(run_dir, cfg.to_dict(), adapter=str(adapter) if adapter else None)
    if not conflicts:
        return
    if not force:
        raise RunConflict(
            f"{run_dir} holds a run done with other settings ({', '.join(conflicts)}); continuing it would mix two "
            "experiments. Rerun with the settings it was started with, choose another output folder, or add --force "
            f"to move it to {run_dir.parent / '.replaced'}/ and start afresh (nothing is deleted).")
    if is_main_process():
        log.warning("--force: moved the earlier run (other %s) to %s", ", ".join(conflicts), move_aside(run_dir))


def run(cfg: ExperimentConfig, reward_funcs=None, adapter: Path | None = None, force: bool = False) -> int:
    """The whole job for one cell: train (unless zero-shot or already done), then evaluate
    (if configured and not done). `adapter`: evaluate this trained adapter instead of training
    one (`nli_grpo.evaluate --adapter`). `force`: start afresh where the run folder holds work
    done with other settings (else RunConflict). Returns the process exit code."""
    adapter = adapter.resolve() if adapter is not None else None
    claim_run_dir(cfg, adapter, force)
    stop = StopRequest()
    stop.install()
    record = RunRecord(cfg)
    if adapter is not None:
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
    parser.add_argument("--force", action="store_true",
                        help="where the output folder holds a run with other settings, move it aside to "
                             "<parent>/.replaced/ and start afresh (default: refuse)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. lora.rank=16 grpo.max_steps=100")
    # intermixed: overrides may come before and after the options
    return parser.parse_intermixed_args(argv)


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
        return EXIT_REFUSED
    log.info("run folder %s (cell %s)", cfg.output.dir, cfg.output.cell_id)
    try:
        return run(cfg, force=args.force)
    except RunConflict as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_REFUSED


if __name__ == "__main__":
    raise SystemExit(main())
