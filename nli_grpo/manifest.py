"""A sweep's manifest, `results/<sweep>/manifest.json`: the cells of the sweep and every submission
(when, by whom, with which command, the job id of each cell). Written under a lock and
atomically, so concurrent sweep commands never lose each other's records; read by the sweep (what
is queued) and by status.
"""

from __future__ import annotations

import contextlib
import getpass
import json
import os
import sys
from pathlib import Path

from . import files, results
from .layout import MANIFEST_FILENAME


def read_manifest(sweep_dir: str | os.PathLike) -> dict:
    """The sweep's manifest (an empty skeleton when there is none)."""
    path = Path(sweep_dir) / MANIFEST_FILENAME
    if not path.exists():
        return {"sweep": Path(sweep_dir).name, "cells": {}, "submissions": []}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err}); move it aside to start a new manifest") from None


@contextlib.contextmanager
def _lock(sweep_dir: Path):
    with files.locked(sweep_dir / f".{MANIFEST_FILENAME}.lock"):  # usable by all who may write the sweep
        yield


class Book:
    """The manifest of a sweep whose lock this process holds (`held`): what it records is written
    at once, atomically, so that a failure or a Ctrl-C later in the submission keeps it."""

    def __init__(self, sweep_dir: Path):
        self.sweep_dir = sweep_dir
        self.manifest = read_manifest(sweep_dir)

    def record(self, cells: dict, submission: dict) -> dict:
        """Add cells (cell_id -> description) and a submission record (submission_record), or
        more jobs to a submission recorded before (the same dict): earlier records are kept."""
        self.manifest["cells"].update(cells)
        if not any(s is submission for s in self.manifest["submissions"]):
            self.manifest["submissions"].append(submission)
        results.atomic_write_json(self.sweep_dir / MANIFEST_FILENAME, self.manifest)
        return self.manifest


@contextlib.contextmanager
def held(sweep_dir: str | os.PathLike):
    """The sweep's manifest under its lock, for as long as the block runs: a sweep holds it from
    reading what is queued to its last record, so that two sweeps started at once never both
    submit a cell (the second waits, then finds the first's jobs)."""
    sweep_dir = Path(sweep_dir)
    with _lock(sweep_dir):
        yield Book(sweep_dir)


def record_submission(sweep_dir: str | os.PathLike, cells: dict, submission: dict) -> dict:
    """Add cells (cell_id -> description) and one submission record to the manifest, under a lock
    and atomically: earlier records are kept, concurrent runs do not lose each other's."""
    with held(sweep_dir) as book:
        return book.record(cells, submission)


def submission_record(cluster: str, folder: Path, jobs: dict, retries: int) -> dict:
    """One submission: when, who, the command line, where submitit logs, the retry budget per job,
    and the job id of each cell (`jobs`: cell_id -> submitit job)."""
    return {
        "submitted_at": results.now_iso(), "command": [sys.executable, *sys.argv], "cwd": os.getcwd(),
        "user": getpass.getuser(), "cluster": cluster, "log_folder": str(folder), "retries": retries,
        "jobs": job_ids(jobs),
    }


def job_ids(jobs: dict) -> dict[str, str]:
    """cell_id -> submitit job, as the manifest records it: cell_id -> job id (`123_4` in an array)."""
    return {cell_id: str(job.job_id) for cell_id, job in jobs.items()}


def latest_jobs(manifest: dict) -> dict[str, tuple[str, str]]:
    """cell_id -> (job id, cluster) of the cell's most recent submission."""
    found = {}
    for submission in manifest.get("submissions", []):
        for cell_id, job_id in submission.get("jobs", {}).items():
            found[cell_id] = (job_id, submission.get("cluster", "slurm"))
    return found


#: How a preflight's job is keyed among a submission's jobs: `preflight/<combination>`.
PREFLIGHT_PART = "preflight/"


def preflight_jobs(manifest: dict) -> dict[str, str]:
    """combination -> job id of the latest preflight job of each combination the manifest records."""
    return {part.removeprefix(PREFLIGHT_PART): job for part, (job, _) in latest_jobs(manifest).items()
            if part.startswith(PREFLIGHT_PART)}


def recorded_jobs(sweep_dir: str | os.PathLike) -> list[str]:
    """The latest job id of every cell (or part) of the manifest: the jobs to ask the queue about."""
    return [job_id for job_id, _ in latest_jobs(read_manifest(sweep_dir)).values()]
