"""Live training curves (`output.report_to`): TensorBoard, Weights & Biases and Trackio through
transformers' own callbacks, named after the cell and continued, not restarted, across requeues.

    os.environ.update(tracker_env(cfg))                      # before the trainer is built
    GRPOConfig(..., **report_args(cfg))                      # report_to, run_name, project
    log_each_step_once(trainer, last_logged_step(folder))    # once the trainer is built

- Names: run = the cell id; W&B group = the sweep, project = output.wandb_project, else
  $WANDB_PROJECT, else `nli_grpo`; Trackio project = the sweep; TensorBoard event files in
  `<cell>/tensorboard/` (one file per attempt, read as one run).
- One run per cell: the W&B run id is drawn once and kept in `<cell>/wandb/run_id`, and every
  attempt resumes it (`WANDB_RESUME=allow`); a --force rerun starts in a new folder, so a new run.
- Each optimizer step once: a restart from a checkpoint replays the steps after it (after a kill;
  USR2 saves the step it logged last). transformers would log them again (TensorBoard then holds
  two points for a step; W&B two rows), so the trackers get only the steps after the last one an
  earlier attempt logged (train_log.jsonl): for a replayed step they keep the first attempt's
  values, while train_log.jsonl and result.json keep the last attempt's. In W&B the optimizer
  step is `train/global_step` (transformers makes it every chart's x axis); W&B's own `_step`
  counts rows, TRL's timing rows (`profiling/...`) included.
- Offline W&B (no internet on the node): written under `<cell>/wandb/offline-run-*/`, one folder
  per attempt, all with the run's id; `wandb sync <cell>/wandb` uploads them in order (status
  prints the command for the cells that have some not uploaded yet: `offline_wandb_runs`).
- Credentials (WANDB_API_KEY, HF_TOKEN...) are read by the trackers from the user's environment;
  nothing here reads or writes them.

Light: no torch / transformers at module level (the login side's status uses it).
"""

from __future__ import annotations

import importlib.util
import os
import secrets
from pathlib import Path

from . import results
from .config import ConfigError, ExperimentConfig
from .layout import CellFolder

#: W&B's own folder under WANDB_DIR (= the cell folder): its runs, logs, and our run id.
WANDB_DIRNAME = "wandb"
WANDB_RUN_ID_FILENAME = "run_id"
DEFAULT_WANDB_PROJECT = "nli_grpo"
#: The package each tracker needs (any of them), for a clear error before the model is loaded.
_PACKAGES = {"tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",), "trackio": ("trackio",)}
_TRUE = ("1", "true", "yes", "on")


def trackers(cfg: ExperimentConfig) -> list[str]:
    """The trackers of output.report_to (none: an empty list)."""
    return [t for t in cfg.output.report_to if t != "none"]


def report_args(cfg: ExperimentConfig) -> dict:
    """The training arguments (transformers / TRL) that choose and name the trackers. Raises
    ConfigError when a chosen tracker's package is not installed."""
    chosen = trackers(cfg)
    for tracker in chosen:
        if not any(importlib.util.find_spec(p) for p in _PACKAGES[tracker]):
            raise ConfigError(f"output.report_to has {tracker}, whose package is not installed: pip install {_PACKAGES[tracker][0]}")
    return {"report_to": chosen or "none", "run_name": cfg.output.cell_id, "project": cfg.output.sweep}


def tracker_env(cfg: ExperimentConfig, environ: dict | None = None) -> dict[str, str]:
    """The environment variables the chosen trackers read when the trainer is built (the
    callbacks read them in __init__ and on_train_begin); `environ`: the user's (os.environ)."""
    environ = os.environ if environ is None else environ
    folder = CellFolder(cfg.output.dir)
    chosen = trackers(cfg)
    env = {}
    if "tensorboard" in chosen:
        env["TENSORBOARD_LOGGING_DIR"] = str(folder.tensorboard.resolve())
    if "wandb" in chosen:
        env.update(WANDB_PROJECT=cfg.output.wandb_project or environ.get("WANDB_PROJECT") or DEFAULT_WANDB_PROJECT,
                   WANDB_RUN_GROUP=cfg.output.sweep, WANDB_NAME=cfg.output.cell_id, WANDB_RUN_ID=wandb_run_id(folder),
                   WANDB_RESUME="allow", WANDB_DIR=str(folder.path.resolve()))
        offline_job = environ.get("HF_HUB_OFFLINE", "").lower() in _TRUE
        mode = cfg.output.wandb_mode or environ.get("WANDB_MODE") or ("offline" if offline_job else None)
        if mode:
            env["WANDB_MODE"] = mode
    return env


def wandb_run_id(folder: CellFolder) -> str:
    """The cell's W&B run id: drawn the first time, then read from `<cell>/wandb/run_id` by every
    attempt (and every rank: the first writer wins, atomically)."""
    path = folder.path / WANDB_DIRNAME / WANDB_RUN_ID_FILENAME
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{WANDB_RUN_ID_FILENAME}.{os.getpid()}")
        tmp.write_text(secrets.token_hex(6) + "\n")
        try:
            os.link(tmp, path)  # creates the file with its content, or fails if another got there first
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
    return path.read_text().strip()


def last_logged_step(folder: CellFolder) -> int:
    """The last optimizer step an earlier attempt logged (0 before the first); read before this
    attempt's trainer logs anything."""
    return max((r["step"] for r in results.read_jsonl(folder.train_log) if isinstance(r.get("step"), int)), default=0)


def log_each_step_once(trainer, after_step: int) -> None:
    """Make the trainer's tracker callbacks skip the logs of steps <= `after_step` (replayed: an
    earlier attempt logged them)."""
    from transformers.integrations import TensorBoardCallback, TrackioCallback, WandbCallback

    for callback in trainer.callback_handler.callbacks:
        if isinstance(callback, (TensorBoardCallback, WandbCallback, TrackioCallback)):
            callback.on_log = _after(callback.on_log, after_step)


def _after(on_log, after_step: int):
    def log_after(args, state, control, logs=None, **kwargs):
        return on_log(args, state, control, logs=logs, **kwargs) if state.global_step > after_step else None

    return log_after


def offline_wandb_runs(folder: CellFolder) -> list[Path]:
    """The cell's offline W&B runs not uploaded yet (no `.wandb.synced` marker beside the run's
    file, which `wandb sync` writes), oldest first."""
    found = sorted((folder.path / WANDB_DIRNAME).glob("offline-run-*/*.wandb"))
    return [p.parent for p in found if not p.with_suffix(".wandb.synced").exists()]


def wandb_sync_command(folder: CellFolder) -> str | None:
    """The command that uploads the cell's offline W&B runs (as one run, in order), or None."""
    return f"wandb sync {folder.path / WANDB_DIRNAME}" if offline_wandb_runs(folder) else None
