"""The cell folder, `results/<sweep>/<cell_id>/`: every file and folder name in it, checkpoint
discovery and the completion marker, moving a run aside, and the one function that builds a
result document (the job, the benchmarks and the tests all build theirs here).

    result.json            the run record (schema in nli_grpo.results)
    train_log.jsonl        one line per optimizer step (append-only; see results.read_train_log)
    predictions/<set>.jsonl.gz
    adapter/               the trained LoRA adapter and its tokenizer
    checkpoints/checkpoint-<step>/   complete only with CHECKPOINT_COMPLETE inside
    rollout_adapters/      adapter versions handed to vLLM during training (transient)
    config.yaml            the config snapshot a sweep submitted
    tensorboard/           TensorBoard event files (output.report_to=[tensorboard]), one file per attempt

Beside the cells, the sweep folder holds `manifest.json`, `logs/` (submitit's), `.replaced/`
(runs moved aside by --force) and `preflight/<combination>.json` (verdicts of nli_grpo.preflight).

A hard-example pool (nli_grpo.bootstrap; `results/bootstrap/<pool>/`, `PoolFolder`):

    pool_spec.json         what to sample (base model, samples, threshold, seed, data settings)
    chunks/chunk-<k>.jsonl the sampled items of chunk k, each written whole
    shard-<i>-of-<n>.json  a shard job's state (running / preempted / complete / failed, items done)
    merge.json             the merge job's state
    anli_hard.jsonl        the pool, in ANLI's schema plus the sampling statistics
    pool.json              its record: items, hard items, sha256, fingerprint, model and revision,
                           sampling settings; written last, so its presence means the pool is complete
    manifest.json, logs/   as in a sweep folder
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from . import files, results
from .config import ExperimentConfig
from .grid import cell_from_config

RESULT_FILENAME = "result.json"
TRAIN_LOG_FILENAME = "train_log.jsonl"
PREDICTIONS_DIRNAME = "predictions"
ADAPTER_DIRNAME = "adapter"
CHECKPOINTS_DIRNAME = "checkpoints"
CHECKPOINT_PREFIX = "checkpoint-"
COMPLETE_MARKER = "CHECKPOINT_COMPLETE"
ROLLOUT_ADAPTERS_DIRNAME = "rollout_adapters"
CONFIG_SNAPSHOT_FILENAME = "config.yaml"
TENSORBOARD_DIRNAME = "tensorboard"
# the sweep folder
MANIFEST_FILENAME = "manifest.json"
LOGS_DIRNAME = "logs"
REPLACED_DIRNAME = ".replaced"
#: Preflight verdicts of a sweep, one file per combination (nli_grpo.verdict.combination).
PREFLIGHT_DIRNAME = "preflight"
#: What a checkpoint holds besides the adapter and its tokenizer: the trainer's state.
TRAINER_STATE_FILES = ("optimizer.pt", "scheduler.pt", "scaler.pt", "trainer_state.json", "training_args.bin", COMPLETE_MARKER)


def preflight_file(sweep_dir: str | os.PathLike, combination: str) -> Path:
    """`<sweep_dir>/preflight/<combination>.json`: the preflight verdict of one combination."""
    return Path(sweep_dir) / PREFLIGHT_DIRNAME / f"{combination}.json"


def checkpoint_step(path: str | os.PathLike) -> int | None:
    """The step of a `checkpoint-<step>` folder; None for any other name."""
    name = Path(path).name
    digits = name[len(CHECKPOINT_PREFIX):]
    return int(digits) if name.startswith(CHECKPOINT_PREFIX) and digits.isdigit() else None


class CellFolder:
    """The paths of one cell's folder (nothing is created by naming them)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"CellFolder({str(self.path)!r})"

    @property
    def result(self) -> Path:
        return self.path / RESULT_FILENAME

    @property
    def train_log(self) -> Path:
        return self.path / TRAIN_LOG_FILENAME

    @property
    def adapter(self) -> Path:
        return self.path / ADAPTER_DIRNAME

    @property
    def checkpoints(self) -> Path:
        return self.path / CHECKPOINTS_DIRNAME

    @property
    def rollout_adapters(self) -> Path:
        return self.path / ROLLOUT_ADAPTERS_DIRNAME

    @property
    def config_snapshot(self) -> Path:
        return self.path / CONFIG_SNAPSHOT_FILENAME

    @property
    def tensorboard(self) -> Path:
        return self.path / TENSORBOARD_DIRNAME

    @property
    def predictions_dir(self) -> Path:
        return self.path / PREDICTIONS_DIRNAME

    def predictions(self, benchmark: str) -> Path:
        """Per-example predictions of one evaluation set."""
        return self.predictions_dir / f"{benchmark}.jsonl.gz"

    # ----------------------------------------------------------------------- checkpoints
    def checkpoint_folders(self) -> list[Path]:
        """Every `checkpoint-<step>` folder, complete or not, oldest first."""
        if not self.checkpoints.is_dir():
            return []
        found = [p for p in self.checkpoints.iterdir() if checkpoint_step(p) is not None]
        return sorted(found, key=checkpoint_step)

    def complete_checkpoints(self) -> list[Path]:
        """Checkpoints that were fully written (marker present), oldest first."""
        return [p for p in self.checkpoint_folders() if (p / COMPLETE_MARKER).exists()]

    def last_checkpoint(self) -> Path | None:
        """The newest complete checkpoint, the one a restart resumes from."""
        done = self.complete_checkpoints()
        return done[-1] if done else None

    def last_step_on_disk(self) -> int:
        """The step of the newest complete checkpoint (0 without one)."""
        last = self.last_checkpoint()
        return checkpoint_step(last) if last else 0

    def remove_incomplete_checkpoints(self) -> list[Path]:
        """Delete checkpoint folders without the completion marker (a save killed half-way), so that
        neither we nor transformers ever load one. Returns what was removed."""
        removed = [p for p in self.checkpoint_folders() if not (p / COMPLETE_MARKER).exists()]
        for path in removed:
            shutil.rmtree(path, ignore_errors=True)
        return removed

    def move_aside(self) -> Path:
        """Move the folder to `<sweep>/.replaced/<cell>.<time>` (hidden from aggregate, nothing
        deleted) so that a new run can start in its place. Returns where it went."""
        target = self.path.parent / REPLACED_DIRNAME / f"{self.path.name}.{results.now_iso().replace(':', '')}"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(self.path), target)
        return target


def mark_checkpoint_complete(checkpoint: Path, step: int) -> None:
    """Write the completion marker, durably, once everything else of the checkpoint is on disk;
    first its files get the modes open() would give them under the umask (safetensors writes
    its weights 0600), so that a shared results tree serves the whole group."""
    files.follow_umask(checkpoint)
    # The trainer's writes may still sit in the page cache: on disk first, or a crash (a node
    # losing power) could leave a marker on a checkpoint whose data never got there.
    _sync_tree(checkpoint)
    with open(checkpoint / COMPLETE_MARKER, "w") as f:
        f.write(f"{step}\n")
        f.flush()
        os.fsync(f.fileno())
    _sync(checkpoint)  # the marker's folder entry


def _sync_tree(top: Path) -> None:
    """fsync every file under `top`, then the folders naming them, deepest first."""
    found = sorted(top.rglob("*"), key=lambda p: len(p.parts), reverse=True)
    for path in [p for p in found if p.is_file() and not p.is_symlink()] + [p for p in found if p.is_dir()] + [top]:
        _sync(path)


def _sync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)  # a read-only descriptor is enough for fsync, folders included
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def adapter_from_checkpoint(checkpoint: Path, target: Path) -> None:
    """Copy a complete checkpoint's adapter and tokenizer files to `target` (atomically: a
    temporary folder renamed into place)."""
    tmp = target.with_name(f".{target.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for path in checkpoint.iterdir():
        if path.is_file() and path.name not in TRAINER_STATE_FILES and not path.name.startswith("rng_state"):
            shutil.copy2(path, tmp / path.name)
    files.follow_umask(tmp)  # copy2 copies the modes: a checkpoint written before they followed the umask
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)


def result_document(cfg: ExperimentConfig, **fields) -> dict:
    """A result document for the cell of `cfg` (schema: nli_grpo.results), status `running` and
    nothing done yet unless `fields` say otherwise. The sweep, cell id and cell come from the
    config (its `output.cell_id` as set by job.config_for_run), so that a cell's record always
    agrees with its folder."""
    now = results.now_iso()
    doc = {
        "schema_version": results.SCHEMA_VERSION,
        "tool": results.TOOL,
        "sweep": cfg.output.sweep,
        "cell_id": cfg.output.cell_id,
        "status": "running",
        "cell": cell_from_config(cfg),
        "config": cfg.to_dict(),
        "versions": None,
        "slurm": {},
        "attempts": [],
        "model": None,
        "adapter": None,
        "train": None,
        "eval": {},
        "stages_done": [],
        "error": None,
        "created_at": now,
        "updated_at": now,
    }
    doc.update(fields)
    if doc["versions"] is None:
        doc["versions"] = results.package_versions()
    return doc


# --------------------------------------------------------------------------- the pool folder
POOL_FILENAME = "anli_hard.jsonl"
POOL_RECORD_FILENAME = "pool.json"
POOL_SPEC_FILENAME = "pool_spec.json"
CHUNKS_DIRNAME = "chunks"
MERGE_STATE_FILENAME = "merge.json"


class PoolFolder:
    """The paths of a hard-example pool's folder (see the module docstring)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"PoolFolder({str(self.path)!r})"

    @property
    def pool(self) -> Path:
        return self.path / POOL_FILENAME

    @property
    def record(self) -> Path:
        return self.path / POOL_RECORD_FILENAME

    @property
    def spec(self) -> Path:
        return self.path / POOL_SPEC_FILENAME

    @property
    def merge_state(self) -> Path:
        return self.path / MERGE_STATE_FILENAME

    def chunk(self, index: int) -> Path:
        return self.path / CHUNKS_DIRNAME / f"chunk-{index:05d}.jsonl"

    def shard_id(self, index: int, count: int) -> str:
        return f"shard-{index:02d}-of-{count:02d}"

    def shard_state(self, index: int, count: int) -> Path:
        return self.path / f"{self.shard_id(index, count)}.json"

    def complete(self) -> bool:
        """The pool is merged (its record is written last)."""
        return self.record.is_file() and self.pool.is_file()
