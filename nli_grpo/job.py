"""The cell job: one grid cell from its config to its result.json, read top to bottom in `run`.

    cfg = config_for_run("paper", ["lora.rank=16", "seed=22"])
    exit_code = run(cfg)

Stages: training (`nli_grpo.training`, unless zero-shot) then evaluation (`nli_grpo.evaluation`);
each returns its results and this module alone writes them into result.json (`RunRecord`). The
rules a restart follows live here too:
- a stage that finished is never redone; an evaluation keeps the sets it finished;
- training resumes from the last complete checkpoint (nli_grpo.layout);
- a run folder holding work done with other settings is refused (`claim_run_dir`), unless forced,
  which moves that work aside: the train and evaluate commands and the sweeps share this rule;
- SIGUSR2 (Slurm's warning before a time limit or preemption) and SIGTERM make the job save a
  checkpoint after the current step and exit with EXIT_PREEMPTED, status `preempted`;
- a training process killed by a signal is recorded by its parent (`record_signal_death`);
- a write that fails for lack of space (disk full, quota; a checkpoint save too) ends the run as
  `failed`, naming what could not be written (`write_failure`): never a preemption, never retried;
- a `vllm_server` cell trains with a vLLM server of its own, started before training and stopped
  after it whatever happens (nli_grpo.server), unless the process that started this job gave it
  one (launch.CellJob does, for its torchrun ranks).

Nothing heavy is imported at module level: the login side (sweep, launch, status) uses the
config, the conflict rule and the exit codes without torch.
"""

from __future__ import annotations

import contextlib
import errno
import gc
import logging
import os
import shutil
import traceback
from pathlib import Path

from . import results
from .config import ExperimentConfig, load_config, read_snapshot
from .grid import cell_from_config, cell_id
from .layout import COMPLETE_MARKER, CellFolder, result_document
from .process import StopRequest, is_main_process
from .server import serving

log = logging.getLogger("nli_grpo.job")

#: Exit code of a run stopped by a signal after saving (EX_TEMPFAIL: "try again").
EXIT_PREEMPTED = 75
#: Exit code of a run refused before it started (bad config, conflicting run folder): never retried.
EXIT_REFUSED = 2
#: Exit code of a run that failed for lack of space (recorded as `failed`): never retried.
EXIT_FAILED = 1
#: Errors of a write that did not fit: no space left on the device, disk quota exceeded.
NO_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
#: Config sections a stage depends on: work a stage left on disk belongs to these settings.
STAGE_INPUTS = {"train": ("stage", "seed", "model", "lora", "grpo", "rollout", "data")}
STAGE_INPUTS["eval"] = (*STAGE_INPUTS["train"], "eval")


def config_for_run(recipe: str, overrides: list[str], output_dir: str | None = None) -> ExperimentConfig:
    """Load the recipe and give the run its sweep folder and cell id when not set explicitly."""
    cfg = load_config(recipe, overrides)
    given = {o.split("=", 1)[0] for o in overrides}
    if "output.cell_id" not in given:
        cfg.output.cell_id = cell_id(cell_from_config(cfg))
    if output_dir:
        cfg.output.dir = output_dir
    elif "output.dir" not in given:
        cfg.output.dir = str(Path("results") / cfg.output.sweep / cfg.output.cell_id)
    return cfg


# --------------------------------------------------------------------------- may this run continue the folder?
def changed_inputs(before: dict, now: dict, stage: str) -> list[str]:
    """Config sections (of two `to_dict()` configs) that `stage` depends on and that differ."""
    return [key for key in STAGE_INPUTS[stage] if before.get(key) != now.get(key)]


def stages_on_disk(folder: CellFolder, previous: dict) -> list[str]:
    """The stages that left work in the folder: training (a checkpoint, a finished training, the
    adapter) and evaluation (an evaluated set, a predictions file)."""
    found = []
    if "train" in previous.get("stages_done", []) or folder.adapter.is_dir() or folder.checkpoint_folders():
        found.append("train")
    if previous.get("eval") or (folder.predictions_dir.is_dir() and any(folder.predictions_dir.iterdir())):
        found.append("eval")
    return found


def recorded_config(folder: CellFolder, previous: dict) -> dict | None:
    """The settings the work in the folder was done with: result.json's, else the sweep's config
    snapshot; None when neither can be read."""
    if previous.get("config") is not None:
        return previous["config"]
    snapshot = read_snapshot(folder.config_snapshot)
    return snapshot.to_dict() if snapshot is not None else None


def conflicting_inputs(run_dir: str | os.PathLike, config: dict, adapter: str | None = None,
                       inputs: dict | None = None) -> list[str]:
    """Why `config` cannot continue the run in `run_dir`: the config sections (and the evaluated
    adapter) that differ from those of the work already there, and, given this attempt's
    `inputs` (`attempt_inputs`), the model revision and training data where they differ from
    the first attempt's. Continuing would mix two experiments (a "resume" from checkpoints
    trained with other settings or data, or predictions of another model), so the train and
    evaluate commands and the sweep all refuse it."""
    folder = CellFolder(run_dir)
    previous = results.load_existing(folder.result) or {}
    stages = stages_on_disk(folder, previous)
    if not stages:
        return []
    before = recorded_config(folder, previous)
    if before is None:
        return ["unknown (no readable result.json or config snapshot beside its work)"]
    changed = dict.fromkeys(key for stage in stages for key in changed_inputs(before, config, stage))
    if "eval" in stages and adapter is not None and previous.get("adapter") not in (None, adapter):
        changed["adapter"] = None
    if inputs is not None:
        changed.update(dict.fromkeys(changed_attempt_inputs(previous.get("attempts", []), inputs, stages)))
    return list(changed)


def attempt_inputs(cfg: ExperimentConfig, adapter: Path | None = None) -> dict:
    """What this attempt computes with beyond its settings, kept per attempt in result.json
    (`attempts`): the model's resolved path and hub revision, and while training is left to do,
    the fingerprint of the training prompts (the pool; data.fingerprint). Settings alone do not
    pin them: the cache can be prepared again (another model commit, another pool) between two
    attempts. An input that cannot be read here is left None: the stage that reads it fails
    with the error, recorded as the run's."""
    folder = CellFolder(cfg.output.dir)
    previous = results.load_existing(folder.result) or {}
    inputs: dict = {"model": None, "train_data": None}
    try:
        from .models import hub_revision, resolve_model_path

        inputs["model"] = {"path": resolve_model_path(cfg.model.name_or_path),
                           "revision": hub_revision(cfg.model.name_or_path, cfg.model.revision)}
        if cfg.stage == "grpo" and adapter is None and "train" not in previous.get("stages_done", []):
            from .data import fingerprint
            from .training import load_train_pool

            inputs["train_data"] = fingerprint(load_train_pool(cfg.data))
    except Exception as err:  # noqa: BLE001 - reported by the stage that needs the input
        log.warning("could not read this attempt's inputs (%s: %s); the stage that needs them will say why",
                    type(err).__name__, err)
    return inputs


def changed_attempt_inputs(attempts: list[dict], inputs: dict, stages: list[str]) -> list[str]:
    """`model revision` (the work in `stages`) and `training data` (training work) where this
    attempt's `inputs` differ from the first recorded attempt's."""
    def model_identity(model: dict) -> str | None:  # a hub commit, else the folder (a local model, a stand-in)
        return model.get("revision") or model.get("path")

    first_model = next((a["model"] for a in attempts if a.get("model")), None)
    first_data = next((a["train_data"] for a in attempts if a.get("train_data")), None)
    changed = []
    if stages and first_model and inputs.get("model") and model_identity(first_model) != model_identity(inputs["model"]):
        changed.append("model revision")
    if "train" in stages and first_data and inputs.get("train_data") and first_data != inputs["train_data"]:
        changed.append("training data")
    return changed


class RunConflict(RuntimeError):
    """The run folder holds work done with other settings; the message says how to start afresh."""


def claim_run_dir(cfg: ExperimentConfig, adapter: Path | None = None, force: bool = False,
                  inputs: dict | None = None) -> Path | None:
    """Make sure the run folder can take this run: refuse (RunConflict) when it holds work done
    with other settings (or, given this attempt's `inputs`, on another model revision or other
    training data), unless `force`, which moves that work aside (nothing is deleted). Returns
    where it went, or None."""
    folder = CellFolder(cfg.output.dir)
    conflicts = conflicting_inputs(folder.path, cfg.to_dict(), adapter=str(adapter) if adapter else None, inputs=inputs)
    if not conflicts:
        return None
    if not force:
        raise RunConflict(
            f"{folder.path} holds a run done with other settings ({', '.join(conflicts)}); continuing it would mix two "
            "experiments. Rerun with the settings it was started with, choose another output folder, or add --force "
            f"to move it to {folder.path.parent / '.replaced'}/ and start afresh (nothing is deleted).")
    if not is_main_process():
        return None
    moved = folder.move_aside()
    log.warning("--force: moved the earlier run (other %s) to %s", ", ".join(conflicts), moved)
    return moved


# --------------------------------------------------------------------------- the run record
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


class RunRecord:
    """The run's result.json, rewritten atomically on every change (by the main process only).
    The caller has claimed the folder (`claim_run_dir`): every stage finished on disk is kept,
    and every attempt's inputs (`attempt_inputs`), this one's appended."""

    def __init__(self, cfg: ExperimentConfig, inputs: dict | None = None):
        self.path = CellFolder(cfg.output.dir).result
        previous = results.load_existing(self.path) or {}
        stages = previous.get("stages_done", [])
        slurm = slurm_info(previous.get("slurm"))
        attempt = {"attempt": slurm["attempts"], "started_at": results.now_iso(), "job_id": slurm["job_id"],
                   **(inputs or {"model": None, "train_data": None})}
        self.doc = result_document(
            cfg, slurm=slurm, attempts=[*previous.get("attempts", []), attempt],
            adapter=previous.get("adapter"),  # set by `nli_grpo.evaluate --adapter`
            train=previous.get("train") if "train" in stages else None,
            eval=previous.get("eval", {}),  # sets finished by an interrupted evaluation are kept
            stages_done=stages, created_at=previous.get("created_at", results.now_iso()))

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


def record_signal_death(run_dir: str | os.PathLike, signal_name: str, retries_used: int, retries: int, retrying: bool) -> str:
    """Record in result.json that the training process was killed by a signal (it could not say
    so itself): in `slurm.deaths`, and, when no retry is left, as the run's failure (status
    `failed`, the signal and the last step on disk). Called by the process that started it
    (launch.CellJob). Returns the message."""
    folder = CellFolder(run_dir)
    step = folder.last_step_on_disk()
    message = (f"training process killed by {signal_name} with step {step} on disk (the OOM killer, or a node fault? "
               "see the job's log, `sacct -j <job> -o JobID,State,MaxRSS` and dmesg); "
               + (f"restarting it from there (retry {retries_used + 1} of {retries})" if retrying else
                  f"not restarted: {retries} retr{'y' if retries == 1 else 'ies'} used (sweep --retries)"))
    doc = results.load_existing(folder.result)
    if doc is None:  # killed before it wrote anything: nothing started that could be recorded
        return message
    death = {"signal": signal_name, "step_on_disk": step, "at": results.now_iso(), "retried": retrying}
    doc["slurm"]["deaths"] = [*doc["slurm"].get("deaths", []), death]
    if not retrying:
        doc.update(status="failed", error=message, failure={"exit_signal": signal_name, "last_step_on_disk": step})
    doc["updated_at"] = results.now_iso()
    results.atomic_write_json(folder.result, doc)
    return message


# --------------------------------------------------------------------------- a write that did not fit
def write_failure(err: BaseException) -> tuple[BaseException, str] | None:
    """The error in `err`'s chain that says a write did not fit, and why (no space left, quota
    exceeded); None for any other error. The libraries that write checkpoints do not all raise
    OSError: safetensors raises its own error with the OS message, torch.save a RuntimeError
    from its stream writer with no errno at all ("unexpected pos ...")."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno in NO_SPACE_ERRNOS:
            return err, os.strerror(err.errno)
        text = str(err)
        for code in NO_SPACE_ERRNOS:
            if os.strerror(code) in text or f"os error {code})" in text:
                return err, os.strerror(code)
        if isinstance(err, RuntimeError) and ("inline_container.cc" in text or "PytorchStreamWriter" in text):
            return err, f"torch.save could not write its file ({' or '.join(map(os.strerror, NO_SPACE_ERRNOS))}?)"
        err = err.__cause__ or err.__context__
    return None


def record_write_failure(record: RunRecord, folder: CellFolder, err: BaseException, reason: str) -> str:
    """End the run as failed for a write that did not fit: record and log what could not be
    written, why and what to do, after removing the half-written checkpoint (never resumed
    from; its space lets result.json be written). Returns the message."""
    # The failed writer's open file (torch's stream writer) lives in the traceback's frames: let
    # it go, or its blocks stay taken, deleted or not, while this process records the failure.
    chained = err
    while chained is not None:
        traceback.clear_frames(chained.__traceback__)
        chained = chained.__cause__ or chained.__context__
    gc.collect()
    half_written = [p for p in folder.checkpoint_folders() if not (p / COMPLETE_MARKER).exists()]
    path = getattr(err, "filename", None) or (half_written[-1] if half_written else folder.path)
    try:
        usage = shutil.disk_usage(folder.path)
        room = f"{usage.free / 2**20:.1f} MiB free of {usage.total / 2**20:.1f} MiB"
    except OSError:
        room = "free space unknown"
    if is_main_process():
        folder.remove_incomplete_checkpoints()
    step = folder.last_step_on_disk()
    message = (f"could not write {path}: {reason} ({room} on its file system; {type(err).__name__}: {err}). Free space "
               "(or quota) there, or choose another output folder, then rerun the same command: it resumes from the "
               f"last complete checkpoint (step {step}).")
    log.error(message)
    try:
        record.update(status="failed", error=message,
                      failure={"write_failed": str(path), "reason": reason, "error": f"{type(err).__name__}: {err}",
                               "last_step_on_disk": step})
    except OSError as again:
        log.error("result.json could not be written either (%s): it still says %s", again, record.doc.get("status"))
    return message


# --------------------------------------------------------------------------- the job
@contextlib.contextmanager
def _environment(variables: dict[str, str]):
    """os.environ with `variables` set while the block runs, as it was after (a second job in
    the same process, as the benchmarks run them, must not find the first one's server)."""
    saved = {name: os.environ.get(name) for name in variables}
    os.environ.update(variables)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@contextlib.contextmanager
def rollout_server(cfg: ExperimentConfig, run_dir: str | os.PathLike):
    """A vllm_server training's server (server.serving: unless one is given), with this process's
    environment pointing the trainer at it while the block runs. Start it before CUDA is initialised."""
    with serving(cfg, run_dir) as env, _environment(env):
        yield env


def run(cfg: ExperimentConfig, reward_funcs=None, adapter: Path | None = None, force: bool = False) -> int:
    """The whole job for one cell: train (unless zero-shot or already done), then evaluate
    (if configured and not done). `adapter`: evaluate this trained adapter instead of training
    one (`nli_grpo.evaluate --adapter`). `force`: start afresh where the run folder holds work
    done with other settings (else RunConflict). Returns the process exit code."""
    adapter = adapter.resolve() if adapter is not None else None
    inputs = attempt_inputs(cfg, adapter)
    if claim_run_dir(cfg, adapter, force, inputs):  # the earlier run moved aside: this one starts afresh
        inputs = attempt_inputs(cfg, adapter)
    stop = StopRequest()
    stop.install()
    record = RunRecord(cfg, inputs)
    if adapter is not None:
        record.doc["adapter"] = str(adapter)
    training = cfg.stage == "grpo" and adapter is None and not record.stage_done("train")
    try:
        record.update()
        with rollout_server(cfg, cfg.output.dir) if training else contextlib.nullcontext():
            from .models import describe

            record.update(model=describe(cfg))  # its path, revision (what a number was computed with) and precision
            if training:
                from .training import train

                outcome = train(cfg, stop, attempt=record.attempt, reward_funcs=reward_funcs)
                if not outcome.finished:
                    record.update(status="preempted", train=outcome.summary)
                    return EXIT_PREEMPTED
                record.mark_stage_done("train", train=outcome.summary)
        if not is_main_process():
            return 0  # evaluation runs once, on rank 0
        if cfg.eval.after_training and not record.stage_done("eval"):
            from .evaluation import evaluate

            if adapter is None and cfg.stage == "grpo":
                adapter = CellFolder(cfg.output.dir).adapter
            evaluation = evaluate(cfg, adapter=adapter, stop=stop, done=record.doc["eval"],
                                  on_set_done=lambda block: record.update(eval=block))
            if evaluation is None:
                record.update(status="preempted")
                return EXIT_PREEMPTED
            record.mark_stage_done("eval", eval=evaluation)
        record.update(status="complete")
        return 0
    except BaseException as err:
        if isinstance(err, Exception) and (failed_write := write_failure(err)) is not None:
            record_write_failure(record, CellFolder(cfg.output.dir), *failed_write)
            return EXIT_FAILED
        if training and stop.is_set() and isinstance(err, Exception):
            # Slurm's SIGTERM (requeue, preemption) reaches every process of the job: a step in
            # flight can fail with it (the cell's vLLM server stopped). Its last complete
            # checkpoint resumes the cell: a stop, not a failure.
            log.warning("the step in flight failed after %s (%s: %s); exiting to resume from the last checkpoint",
                        stop.signal_name, type(err).__name__, err)
            record.update(status="preempted")
            return EXIT_PREEMPTED
        record.update(status="failed", error=f"{type(err).__name__}: {err}")
        raise
    finally:
        _shutdown_kept_engine()


def _shutdown_kept_engine() -> None:
    """Shut down the rollout engine training kept for an evaluation that did not take it (a stop,
    a failure, an evaluation already done): nli_grpo.rollout.park_engine."""
    import sys

    rollout = sys.modules.get("nli_grpo.rollout")  # never imported here when nothing was trained
    if rollout is not None:
        rollout.shutdown_parked_engine()
