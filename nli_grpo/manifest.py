"""A sweep's manifest, `results/<sweep>/manifest.json`: the cells of the sweep and every submission
(when, by whom, with which command, the job id of each cell). Written under a lock and
atomically, so concurrent sweep commands never lose each other's records; read by the sweep (what
is queued) and by status.
"""

from __future__ import annotations

import contextlib
import fcntl
import getpass
import json
import os
import sys
from pathlib import Path

from . import results
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
    sweep_dir.mkdir(parents=True, exist_ok=True)
    with open(sweep_dir / f".{MANIFEST_FILENAME}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def record_submission(sweep_dir: str | os.PathLike, cells: dict, submission: dict) -> dict:
    """Add cells (cell_id -> description) and one submission record to the manifest, under a lock
    and atomically: earlier records are kept, concurrent runs do not lose each other's."""
    sweep_dir = Path(sweep_dir)
    with _lock(sweep_dir):
        manifest = read_manifest(sweep_dir)
        manifest["cells"].update(cells)
        manifest["submissions"].append(submission)
        results.atomic_write_json(sweep_dir / MANIFEST_FILENAME, manifest)
    return manifest


def submission_record(cluster: str, folder: Path, jobs: dict, retries: int) -> dict:
    """One submission: when, who, the command line, where submitit logs, the retry budget per job,
    and the job id of each cell (`jobs`: cell_id -> submitit job)."""
    return {
        "submitted_at": results.now_iso(), "command": [sys.executable, *sys.argv], "cwd": os.getcwd(),
        "user": getpass.getuser(), "cluster": cluster, "log_folder": str(folder), "retries": retries,
        "jobs": {cell_id: str(job.job_id) for cell_id, job in jobs.items()},
    }


def latest_jobs(manifest: dict) -> dict[str, tuple[str, str]]:
    """cell_id -> (job id, cluster) of the cell's most recent submission."""
    found = {}
    for submission in manifest.get("submissions", []):
        for cell_id, job_id in submission.get("jobs", {}).items():
            found[cell_id] = (job_id, submission.get("cluster", "slurm"))
    return found
