"""submitit glue: the checkpointable cell job, executors and job arrays, the sweep manifest, and
what Slurm says about partitions and queued jobs.

A cell runs as `python -m nli_grpo.train --config <cell>/config.yaml --output-dir <cell>` in a child
process of the submitit job (`CellJob`): CUDA and vLLM memory stay out of submitit's process, and
the child resumes from its last complete checkpoint on every start. On USR2 (time limit or
preemption) submitit calls `CellJob.checkpoint()`, which forwards the signal to the child, waits for
it to save and exit, and hands submitit a resubmission of the same job: submitit requeues it. An
external `scontrol requeue` calls no hook: the job simply starts again and the child resumes.

Two submitit settings matter (see slurm/README.md):
- `slurm_max_num_timeout` is set to MAX_REQUEUES: submitit counts every USR2 of a job with
  `timeout_min <= 10` as a time-out and stops requeueing after `max_num_timeout` (default 3).
- `slurm_signal_delay_s` (SIGNAL_DELAY_S): USR2 comes that long before the time limit; the child
  gets at most that (or the partition's GraceTime, when shorter) minus a margin to save.
"""

from __future__ import annotations

import contextlib
import fcntl
import getpass
import json
import logging
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import submitit

from . import results
from .config import ResourcesConfig

log = logging.getLogger(__name__)

MANIFEST_FILENAME = "manifest.json"
CONFIG_FILENAME = "config.yaml"
LOGS_DIRNAME = "logs"
#: submitit's requeue budget per job (its default, 3, is used up by three short preemptions).
MAX_REQUEUES = 20
#: Restarts of a cell's training killed by a signal (OOM killer, node fault), per job.
DEFAULT_RETRIES = 2
#: USR2 this many seconds before the time limit (the example sbatch files use the same).
SIGNAL_DELAY_S = 300
#: Time kept back from the signal delay / grace time for submitit's own requeue and exit.
STOP_MARGIN_S = 15
CLUSTERS = ("slurm", "local", "debug")
#: squeue states of a job that is still in the queue (a rerun must not submit its cell again).
QUEUED_STATES = {"PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "REQUEUED", "REQUEUE_HOLD",
                 "REQUEUE_FED", "RESIZING", "SUSPENDED", "SIGNALING", "STAGE_OUT", "STOPPED"}


class SlurmError(RuntimeError):
    """A Slurm command failed or the cluster cannot take a request; the message says what to do."""


# --------------------------------------------------------------------------- the job
class CellJob:
    """One grid cell as a submitit checkpointable callable: runs the training entry point as a
    child process and returns the cell's final status.

    A child killed by a signal (the OOM killer, a node fault) is recorded in result.json and
    started again, `retries` times at most: it resumes from its last complete checkpoint. A child
    that exits with an error code (a config error, a refused run folder, an exception) is not:
    the same inputs would fail the same way."""

    def __init__(self, command: list[str], run_dir: str, stop_timeout_s: float, threads: int = 1, gpus: int = 1,
                 retries: int = DEFAULT_RETRIES):
        self.command = command
        self.run_dir = run_dir
        self.stop_timeout_s = stop_timeout_s
        self.threads = threads
        self.gpus = gpus
        self.retries = retries
        self.starts = 0
        self._child: subprocess.Popen | None = None
        self._torchrun = False
        self._stopping = False

    def __call__(self) -> dict:
        from .train import EXIT_PREEMPTED, record_signal_death

        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        deaths = 0
        while True:
            self.start_child()
            # poll + sleep rather than wait(): checkpoint() runs in a signal handler on this thread
            # and must be able to wait for the child itself (wait() would hold Popen's lock).
            while (code := self._child.poll()) is None:
                time.sleep(1.0)
            if code < 0 and not self._stopping:
                retry = deaths < self.retries
                message = record_signal_death(Path(self.run_dir), signal.Signals(-code).name, deaths, self.retries, retry)
                log.error(message)
                if retry:
                    deaths += 1
                    continue
                raise RuntimeError(f"{self.run_dir}: {message}")
            break
        doc = results.load_existing(Path(self.run_dir) / results.RESULT_FILENAME) or {}
        if code == EXIT_PREEMPTED or self._stopping:
            raise RuntimeError(f"{self.run_dir}: stopped by a signal after saving (exit {code}); "
                               "it resumes when requeued, or when the sweep is run again")
        if code != 0:
            raise RuntimeError(f"{self.run_dir}: `{shlex.join(self.command)}` exited with {code}: {doc.get('error')}")
        return {"run_dir": self.run_dir, "status": doc.get("status"), "attempts": doc.get("slurm", {}).get("attempts")}

    def start_child(self, **popen_kwargs) -> subprocess.Popen:
        """Start the training: one process, or one per GPU under torchrun when the cell asked for
        several GPUs and the node really has them (decided here, on the node)."""
        command = self.command
        self._torchrun = self.gpus > 1 and (devices := _cuda_device_count()) > 1
        if self._torchrun:
            command = with_torchrun(command, min(self.gpus, devices))
        log.info("starting %s", shlex.join(command))
        # torch otherwise starts a thread per core of the node: oversubscribed on shared nodes
        threads = {k: str(self.threads) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS") if k not in os.environ}
        # USR2 starts ignored: torchrun would die of it (it handles only SIGTERM/SIGINT), while
        # the training processes install their own handler. Its own session keeps the job's
        # terminal signals to the job.
        self._child = subprocess.Popen(command, env={**os.environ, **threads, "PYTHONUNBUFFERED": "1"},
                                       start_new_session=True, preexec_fn=_ignore_usr2, **popen_kwargs)
        self.starts += 1
        return self._child

    def training_ranks(self) -> list:
        """The training processes: the child, or torchrun's workers (its children). Not their
        own children: vLLM's engine process, spawned by a rank, handles only SIGTERM/SIGINT and
        would die of USR2 in the middle of the step the rank must finish and save."""
        import psutil

        try:
            child = psutil.Process(self._child.pid)
            return child.children(recursive=False) if self._torchrun else [child]
        except psutil.NoSuchProcess:
            return []

    def checkpoint(self, *args, **kwargs) -> submitit.helpers.DelayedSubmission:
        """Called by submitit on USR2: let the training save and exit, then requeue this job."""
        child = self._child
        if child is not None and child.poll() is None:
            self._stopping = True
            log.warning("forwarding SIGUSR2 to the training process(es) of %d; waiting up to %.0f s for them to save",
                        child.pid, self.stop_timeout_s)
            _send(self.training_ranks(), signal.SIGUSR2)
            try:
                child.wait(timeout=self.stop_timeout_s)
            except subprocess.TimeoutExpired:
                # its last complete checkpoint is on disk; a half-written one is never loaded
                log.error("training process did not exit within %.0f s; killing it", self.stop_timeout_s)
                _send(_process_tree(child.pid), signal.SIGKILL)
                child.wait()
        return submitit.helpers.DelayedSubmission(CellJob(self.command, self.run_dir, self.stop_timeout_s, self.threads,
                                                          self.gpus, self.retries))

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_child": None}  # a process handle does not survive pickling


def train_command(run_dir: Path) -> list[str]:
    """What a cell job runs: the training entry point on the config snapshot in the cell folder."""
    return [sys.executable, "-u", "-m", "nli_grpo.train", "--config", str(run_dir / CONFIG_FILENAME), "--output-dir", str(run_dir)]


def with_torchrun(command: list[str], processes: int) -> list[str]:
    """`python -u -m X ...` as `python -u -m torch.distributed.run ... -m X ...`: one process per GPU."""
    return [*command[:2], "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}", *command[2:]]


def _cuda_device_count() -> int:
    import torch

    return torch.cuda.device_count()


def _ignore_usr2() -> None:
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)


def _process_tree(pid: int) -> list:
    """The process and all its descendants (not a process group: torchrun starts each worker in
    a session of its own)."""
    import psutil

    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def _send(processes: list, sig: int) -> None:
    import psutil

    for process in processes:
        try:
            process.send_signal(sig)
        except psutil.NoSuchProcess:
            pass


def write_config_snapshot(cfg, run_dir: Path) -> None:
    """The resolved config the job will run (written at submission, so that a requeue days later
    runs what was validated, whatever happened to the recipes meanwhile)."""
    from omegaconf import OmegaConf

    with results.atomic_open(run_dir / CONFIG_FILENAME) as f:
        f.write(OmegaConf.to_yaml(OmegaConf.structured(cfg)))


# --------------------------------------------------------------------------- executors
@dataclass
class LaunchOptions:
    """Where and how cells are submitted (the per-cell resources come from their configs)."""

    cluster: str = "slurm"
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    array_parallelism: int = 256
    signal_delay_s: int = SIGNAL_DELAY_S
    grace_time_s: int | None = None
    """The partition's GraceTime (preemption), when known; bounds the child's time to save."""
    retries: int = DEFAULT_RETRIES
    """Restarts of a cell's training killed by a signal (the OOM killer, a node fault) per job."""

    @property
    def stop_timeout_s(self) -> float:
        window = min(self.signal_delay_s, self.grace_time_s or self.signal_delay_s)
        return max(5.0, window - STOP_MARGIN_S)


def executor_parameters(resources: ResourcesConfig, options: LaunchOptions, name: str) -> dict:
    """submitit AutoExecutor parameters of one cell; cells with equal parameters share an array."""
    params = {
        "name": name, "nodes": 1, "tasks_per_node": 1, "timeout_min": resources.timeout_min,
        "cpus_per_task": resources.cpus_per_task, "mem_gb": resources.mem_gb,
        "slurm_signal_delay_s": options.signal_delay_s, "slurm_array_parallelism": options.array_parallelism,
        # requeueable even where the cluster's JobRequeue=0: preemption and submitit both requeue
        "slurm_additional_parameters": {"requeue": True},
    }
    if resources.gpus_per_node:
        params["gpus_per_node"] = resources.gpus_per_node
    for key in ("partition", "account", "qos", "constraint"):
        if getattr(options, key):
            params[f"slurm_{key}"] = getattr(options, key)
    return params


def make_executor(cluster: str, folder: Path, parameters: dict) -> submitit.AutoExecutor:
    executor = submitit.AutoExecutor(folder=folder / "%j", cluster=cluster, slurm_max_num_timeout=MAX_REQUEUES)
    executor.update_parameters(**parameters)
    return executor


def sbatch_script(folder: Path, parameters: dict, array_size: int) -> str:
    """The sbatch script submitit writes for an array of `array_size` cells with these parameters
    (submitit's own generator, as used by its SlurmExecutor)."""
    from submitit.slurm.slurm import SlurmExecutor, _make_sbatch_string

    executor = make_executor("slurm", folder, parameters)._executor
    assert isinstance(executor, SlurmExecutor)
    extra = {"map_count": array_size} if array_size > 1 else {}
    return _make_sbatch_string(command=executor._submitit_command_str, folder=executor.folder, **executor.parameters, **extra)


def submit_cells(cells: list, options: LaunchOptions, folder: Path, name: str, max_array_size: int) -> tuple[dict, list]:
    """Submit cells (objects with `.cfg` and `.run_dir`) as job arrays: one per distinct resource
    request, chunked to the cluster's MaxArraySize. Returns ({cell_id: job}, [errors]); a failed
    submission stops the rest and is reported, the jobs already submitted are returned."""
    groups: dict[str, tuple[dict, list]] = {}
    for cell in cells:
        params = executor_parameters(cell.cfg.resources, options, name)
        groups.setdefault(json.dumps(params, sort_keys=True), (params, []))[1].append(cell)
    jobs = {}
    for params, group in groups.values():
        executor = make_executor(options.cluster, folder, params)
        for start in range(0, len(group), max_array_size):
            chunk = group[start:start + max_array_size]
            for cell in chunk:
                write_config_snapshot(cell.cfg, cell.run_dir)
            try:
                with executor.batch():
                    submitted = [executor.submit(CellJob(train_command(c.run_dir), str(c.run_dir), options.stop_timeout_s,
                                                         c.cfg.resources.cpus_per_task, c.cfg.resources.gpus_per_node,
                                                         options.retries))
                                 for c in chunk]
            except Exception as err:  # noqa: BLE001 - report, keep what was submitted
                return jobs, [f"submission of {len(chunk)} cells failed: {err}"]
            jobs.update({c.cfg.output.cell_id: job for c, job in zip(chunk, submitted)})
    return jobs, []


# --------------------------------------------------------------------------- the manifest
def read_manifest(sweep_dir: Path) -> dict:
    """The sweep's manifest (empty skeleton when there is none)."""
    path = Path(sweep_dir) / MANIFEST_FILENAME
    if not path.exists():
        return {"sweep": Path(sweep_dir).name, "cells": {}, "submissions": []}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err}); move it aside to start a new manifest") from None


@contextlib.contextmanager
def _manifest_lock(sweep_dir: Path):
    sweep_dir.mkdir(parents=True, exist_ok=True)
    with open(sweep_dir / f".{MANIFEST_FILENAME}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def record_submission(sweep_dir: Path, cells: dict, submission: dict) -> dict:
    """Add cells (cell_id -> description) and one submission record to the manifest, under a lock
    and atomically: earlier records are kept, concurrent runs do not lose each other's."""
    sweep_dir = Path(sweep_dir)
    with _manifest_lock(sweep_dir):
        manifest = read_manifest(sweep_dir)
        manifest["cells"].update(cells)
        manifest["submissions"].append(submission)
        results.atomic_write_json(sweep_dir / MANIFEST_FILENAME, manifest)
    return manifest


def submission_record(cluster: str, folder: Path, jobs: dict, retries: int = DEFAULT_RETRIES) -> dict:
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


# --------------------------------------------------------------------------- asking Slurm
def _slurm(*args: str, timeout: float = 30) -> str:
    try:
        done = subprocess.run(args, capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError:
        raise SlurmError(f"`{args[0]}` not found: run on a Slurm login node, or use --cluster local") from None
    except subprocess.TimeoutExpired:
        raise SlurmError(f"`{shlex.join(args)}` did not answer within {timeout} s; is slurmctld up?") from None
    if done.returncode != 0:
        raise SlurmError(f"`{shlex.join(args)}` failed: {(done.stderr or done.stdout).strip()}")
    return done.stdout


def queued_jobs() -> dict[str, str]:
    """job id (array tasks one by one, `123_4`) -> state of this user's jobs in the queue."""
    out = _slurm("squeue", "--me", "--noheader", "--array", "--format=%i|%T")
    return {job: state for job, state in (line.split("|") for line in out.split()) if state in QUEUED_STATES}


def accounting_states(job_ids: list[str]) -> dict[str, str]:
    """Final sacct states (FAILED, CANCELLED by 0, OUT_OF_MEMORY...) of jobs; {} without accounting."""
    if not job_ids:
        return {}
    base = sorted({j.split("_")[0] for j in job_ids})
    try:
        out = _slurm("sacct", "-X", "-n", "-P", "-o", "JobID,State", "-j", ",".join(base))
    except SlurmError:
        return {}
    return dict(line.split("|", 1) for line in out.splitlines() if "|" in line)


def max_array_size() -> int:
    """MaxArraySize from `scontrol show config` (an array's task ids must stay below it)."""
    match = re.search(r"^MaxArraySize\s*=\s*(\d+)", _slurm("scontrol", "show", "config"), re.M)
    return int(match.group(1)) if match else 1001


def partition_facts(partition: str | None) -> dict:
    """What a partition offers per node: name, max GPUs, memory (GB), CPUs, MaxTime (minutes or
    None) and GraceTime (s). The default partition when `partition` is None. SlurmError names the
    partitions that exist when it does not."""
    listed = _slurm("sinfo", "--noheader", "--format=%P")
    names = [p.strip().rstrip("*") for p in listed.split()]
    if partition is None:
        defaults = [p.rstrip("*") for p in listed.split() if p.endswith("*")]
        if not defaults:
            raise SlurmError(f"this cluster has no default partition; pass --partition (one of: {', '.join(names)})")
        partition = defaults[0]
    if partition not in names:
        raise SlurmError(f"partition {partition!r} does not exist on this cluster; use --partition with one of: {', '.join(names)}")
    nodes = _slurm("sinfo", "--noheader", "--partition", partition, "--format=%G|%m|%c").split()
    gpus, mem_mb, cpus = 0, 0, 0
    for node in nodes:
        gres, mem, cpu = node.split("|")
        gpus = max([gpus, *(int(n) for n in re.findall(r"gpu(?::[^:,(]+)?:(\d+)", gres))])
        mem_mb, cpus = max(mem_mb, int(re.sub(r"\D", "", mem) or 0)), max(cpus, int(re.sub(r"\D", "", cpu) or 0))
    shown = _slurm("scontrol", "show", "partition", partition)
    max_time = re.search(r"MaxTime=(\S+)", shown)
    grace = re.search(r"GraceTime=(\d+)", shown)
    return {
        "name": partition, "gpus_per_node": gpus, "mem_gb": mem_mb / 1024, "cpus_per_node": cpus,
        "max_time_min": None if not max_time or max_time.group(1) in ("UNLIMITED", "INFINITE") else parse_time_min(max_time.group(1)),
        "grace_time_s": int(grace.group(1)) if grace else None,
    }


def resource_problems(resources: ResourcesConfig, facts: dict) -> list[str]:
    """Why a partition cannot run a cell's request (else sbatch refuses, or the job pends forever)."""
    p, name = facts, facts["name"]
    problems = []
    if resources.gpus_per_node > p["gpus_per_node"]:
        problems.append(f"asks for {resources.gpus_per_node} GPUs per node; partition {name} has at most {p['gpus_per_node']} (--gpus-per-node / --partition)")
    if resources.cpus_per_task > p["cpus_per_node"]:
        problems.append(f"asks for {resources.cpus_per_task} CPUs; partition {name} nodes have {p['cpus_per_node']} (resources.cpus_per_task=...)")
    if resources.mem_gb > p["mem_gb"]:
        problems.append(f"asks for {resources.mem_gb} GB of memory; partition {name} nodes have {p['mem_gb']:.0f} GB (--mem-gb)")
    if p["max_time_min"] is not None and resources.timeout_min > p["max_time_min"]:
        problems.append(f"asks for {resources.timeout_min} min; partition {name} allows {p['max_time_min']} min (--time)")
    return problems


def parse_time_min(text: str) -> int:
    """Minutes from a Slurm time: `90`, `HH:MM:SS`, `MM:SS`, `D-HH`, `D-HH:MM[:SS]`."""
    days, _, clock = text.rpartition("-")
    parts = [int(x) for x in clock.split(":")]
    if days:
        hours, minutes, seconds = (parts + [0, 0])[:3]
    elif len(parts) == 1:
        hours, minutes, seconds = 0, parts[0], 0
    elif len(parts) == 2:
        hours, minutes, seconds = 0, *parts
    else:
        hours, minutes, seconds = parts
    return int(days or 0) * 24 * 60 + hours * 60 + minutes + (1 if seconds else 0)
