"""submitit glue: the checkpointable cell job, executors, and cells grouped into job arrays.

A cell runs as `python -m nli_grpo.train --config <cell>/config.yaml --output-dir <cell>` in a child
process of the submitit job (`CellJob`): CUDA and vLLM memory stay out of submitit's process, and
the child resumes from its last complete checkpoint on every start. On USR2 (time limit or
preemption) submitit calls `CellJob.checkpoint()`, which forwards the signal to the training
processes, waits for them to save and exit, and hands submitit a resubmission of the same job:
submitit requeues it. An external `scontrol requeue` calls no hook: the job simply starts again
and the child resumes. Preemption on a cluster without preempt_send_user_signal (Slurm's
default) sends SIGTERM instead: the child saves and exits, and the job requeues itself
(`slurm.requeue_if_preempted`), for Slurm would record a job that ended within GraceTime as FAILED.

Two submitit settings matter (see slurm/README.md):
- `slurm_max_num_timeout` is set to MAX_REQUEUES: submitit counts every USR2 of a job with
  `timeout_min <= 10` as a time-out and stops requeueing after `max_num_timeout` (default 3).
- `slurm_signal_delay_s` (SIGNAL_DELAY_S): USR2 comes that long before the time limit; the child
  gets at most that (or the partition's GraceTime, when shorter) minus a margin to save.

A cell is trained by one job at a time: `CellJob` holds the cell folder's lock (`cell_lock`) while
its training runs, and a second job on a locked cell exits at once, touching nothing.

Submission (`submit_graph`) goes array by array, each recorded (the manifest) as soon as its
sbatch returns: whatever fails later, every queued job is on record.

What Slurm says (partitions, the queue) is nli_grpo.slurm's; the manifest is nli_grpo.manifest's.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import submitit

from . import cache, results
from .config import ResourcesConfig
from .layout import CellFolder

log = logging.getLogger(__name__)

#: submitit's requeue budget per job (its default, 3, is used up by three short preemptions).
MAX_REQUEUES = 20
#: Restarts of a cell's training killed by a signal (OOM killer, node fault), per job.
DEFAULT_RETRIES = 2
#: USR2 this many seconds before the time limit (the example sbatch files use the same).
SIGNAL_DELAY_S = 300
#: Time kept back from the signal delay / grace time for submitit's own requeue and exit.
STOP_MARGIN_S = 15
CLUSTERS = ("slurm", "local", "debug")
#: The least time a job has before its USR2: with less, every start stops almost at once and
#: requeues, MAX_REQUEUES times.
MIN_WORK_BEFORE_SIGNAL_S = 300
#: sbatch waits for a slurmctld that does not answer (retrying for many minutes): give up after this.
SBATCH_TIMEOUT_S = 120
#: The lock a cell's job holds in the cell folder while it trains.
CELL_LOCK_FILENAME = ".cell.lock"
#: Slurm states of a job that may still write to its cell (its lock is not stale).
LIVE_JOB_STATES = {"RUNNING", "COMPLETING", "CONFIGURING", "SUSPENDED", "SIGNALING", "STAGE_OUT", "STOPPED", "RESIZING"}


# --------------------------------------------------------------------------- one job per cell
class CellBusy(RuntimeError):
    """The cell is being trained by another job (its lock is held by a live job)."""


def current_job() -> str | None:
    """This process's Slurm job, as the manifest writes it (`123_4` for an array task); None off Slurm."""
    env = os.environ
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        return f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    return env.get("SLURM_JOB_ID")


def _holder_alive(holder: dict, job: str | None) -> bool:
    """Whether the lock's holder may still be writing: its Slurm job is running (asked by job id),
    or, off Slurm, its process lives on this host. Unknown counts as alive: a refused job costs a
    rerun, two jobs on one cell cost the run."""
    from . import slurm

    if holder.get("job") and holder["job"] == job:
        return False  # this job's own earlier start (requeued): it ended before this one began
    if holder.get("job"):
        try:
            state = slurm.queued_jobs([holder["job"]]).get(holder["job"])
        except slurm.SlurmError:
            return True
        return state in LIVE_JOB_STATES
    if holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int):
        try:
            os.kill(holder["pid"], 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass  # alive: another user's process
    return True


@contextlib.contextmanager
def cell_lock(run_dir: str | os.PathLike):
    """Hold the cell folder's lock while the block runs; CellBusy when a live job holds it.

    The lock is a file created with O_EXCL (atomic on NFS and parallel file systems, where flock
    may be local to a node) naming its job, host and process. A lock left by a dead job (killed,
    node lost) is stale: it is renamed aside (of two jobs breaking it at once, one rename wins)
    and taken."""
    path = Path(run_dir) / CELL_LOCK_FILENAME
    path.parent.mkdir(parents=True, exist_ok=True)
    me = {"job": current_job(), "host": socket.gethostname(), "pid": os.getpid(), "since": results.now_iso()}
    while True:
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
        except FileExistsError:
            try:
                holder = json.loads(path.read_text() or "null")
            except FileNotFoundError:
                continue  # released meanwhile
            except (OSError, json.JSONDecodeError):
                holder = None
            if holder is None and time.time() - _mtime(path) < 60:
                holder = {"job": "?", "host": "?", "since": "just now (still writing its lock)"}
            if holder is not None and _holder_alive(holder, me["job"]):
                raise CellBusy(f"{run_dir} is being trained by job {holder.get('job') or '?'} (host {holder.get('host')}, pid "
                               f"{holder.get('pid')}, since {holder.get('since')}); this job leaves it alone. If that job is "
                               f"dead, remove {path}") from None
            with contextlib.suppress(FileNotFoundError):
                path.rename(path.with_name(f"{path.name}.stale-{me['job'] or me['pid']}"))
            continue
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
            f.flush()
            os.fsync(f.fileno())
        break
    try:
        yield
    finally:
        with contextlib.suppress(OSError, json.JSONDecodeError):
            if json.loads(path.read_text()) == me:
                path.unlink()


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return 0.0


# --------------------------------------------------------------------------- the job
class CellJob:
    """One grid cell as a submitit checkpointable callable: runs the training entry point as a
    child process and returns the cell's final status.

    A child killed by a signal (the OOM killer, a node fault) is recorded in result.json and
    started again, `retries` times at most: it resumes from its last complete checkpoint. A child
    that exits with an error code (a config error, a refused run folder, an exception) is not:
    the same inputs would fail the same way. A child stopped by a signal after saving (exit
    EXIT_PREEMPTED: SIGTERM from a requeue or preemption, which submitit's own process ignores)
    ends the job with that exit code and no exception: the cell resumes on its next start.

    `exclusive` (a cell): hold the cell folder's lock (`cell_lock`) while training; a job that
    finds it held by a live job exits with EXIT_REFUSED at once. A pool's shards share their
    folder and are not exclusive."""

    def __init__(self, command: list[str], run_dir: str, stop_timeout_s: float, threads: int = 1, gpus: int = 1,
                 retries: int = DEFAULT_RETRIES, online: bool = False, rollout_server: bool = False, exclusive: bool = True):
        self.command = command
        self.run_dir = run_dir
        self.stop_timeout_s = stop_timeout_s
        self.threads = threads
        self.gpus = gpus
        self.retries = retries
        self.online = online
        self.rollout_server = rollout_server
        self.exclusive = exclusive
        self.starts = 0
        self._child: subprocess.Popen | None = None
        self._torchrun = False
        self._stopping = False

    def __call__(self) -> dict:
        from .job import EXIT_REFUSED

        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        try:
            with cell_lock(self.run_dir) if self.exclusive else contextlib.nullcontext():
                return self._train()
        except CellBusy as err:
            log.error("%s", err)
            sys.exit(EXIT_REFUSED)  # not an exception: submitit would log a traceback

    def _train(self) -> dict:
        from .job import EXIT_PREEMPTED, record_signal_death

        deaths = 0
        while True:
            # A fresh vLLM server for every start of the training, stopped when it exits, or when
            # submitit exits this process after checkpoint() (sys.exit unwinds the `with`).
            with self.serving() as server_env:
                self.start_child(server_env)
                # poll + sleep rather than wait(): checkpoint() runs in a signal handler on this
                # thread and must be able to wait for the child itself (wait() would hold Popen's lock).
                while (code := self._child.poll()) is None:
                    time.sleep(1.0)
            if code < 0 and not self._stopping:
                retry = deaths < self.retries
                message = record_signal_death(self.run_dir, signal.Signals(-code).name, deaths, self.retries, retry)
                log.error(message)
                if retry:
                    deaths += 1
                    continue
                raise RuntimeError(f"{self.run_dir}: {message}")
            break
        doc = results.load_existing(CellFolder(self.run_dir).result) or {}
        if code == EXIT_PREEMPTED or self._stopping:
            if not self._stopping:
                self._requeue_if_preempted()
            # Not a failure: the step is saved. Exit with EXIT_PREEMPTED rather than raise, for
            # submitit logs any exception with a traceback (SystemExit passes through it unlogged).
            log.warning("%s: stopped by a signal after saving (exit %s); it resumes when requeued, or when the "
                        "sweep is run again", self.run_dir, code)
            sys.exit(EXIT_PREEMPTED)
        if code != 0:
            raise RuntimeError(f"{self.run_dir}: `{shlex.join(self.command)}` exited with {code}: {doc.get('error')}")
        return {"run_dir": self.run_dir, "status": doc.get("status"), "attempts": doc.get("slurm", {}).get("attempts")}

    def _requeue_if_preempted(self) -> None:
        """The training stopped on a SIGTERM: if it was Slurm's preemption (a cluster without
        preempt_send_user_signal sends no USR2 then, so submitit's checkpoint() never ran), requeue
        this job; Slurm would record its exit within GraceTime as FAILED and never start it again."""
        from . import slurm

        job = current_job()
        if job is None:
            return
        try:
            if slurm.requeue_if_preempted(job):
                log.warning("job %s is preempted (SIGTERM, no user signal): requeued it; the cell resumes from its last checkpoint", job)
        except slurm.SlurmError as err:
            log.error("could not requeue job %s after a SIGTERM: %s; run the sweep again to resume the cell", job, err)

    def serving(self):
        """The cell's vLLM server while its training runs (`rollout.backend: vllm_server`, see
        nli_grpo.server), as the environment the training processes need; else nothing."""
        if not self.rollout_server:
            return contextlib.nullcontext({})
        from .job import config_for_run
        from .server import serving

        folder = CellFolder(self.run_dir)
        if "train" in (results.load_existing(folder.result) or {}).get("stages_done", []):
            return contextlib.nullcontext({})  # only the evaluation is left
        return serving(config_for_run(str(folder.config_snapshot), [], self.run_dir), self.run_dir)

    def start_child(self, server_env: dict | None = None, **popen_kwargs) -> subprocess.Popen:
        """Start the training: one process, or one per GPU under torchrun when the cell asked for
        several GPUs and the node really has them (decided here, on the node). `server_env`: the
        cell's vLLM server (its URL and the GPUs it left for training)."""
        command, server_env = self.command, server_env or {}
        gpus = len(server_env["CUDA_VISIBLE_DEVICES"].split(",")) if "CUDA_VISIBLE_DEVICES" in server_env else self.gpus
        self._torchrun = gpus > 1 and (devices := _cuda_device_count()) > 1
        if self._torchrun:
            command = with_torchrun(command, min(gpus, devices))
        log.info("starting %s", shlex.join(command))
        # torch otherwise starts a thread per core of the node: oversubscribed on shared nodes
        env = {k: str(self.threads) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS") if k not in os.environ}
        # The prepared cache, offline: a hub outage or a changed upstream file cannot change a
        # running sweep, and a missing input fails at once instead of downloading on a node.
        env["HF_HUB_CACHE"] = str(cache.hub_cache_dir())
        if not self.online:
            env |= {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
        # USR2 starts ignored: torchrun would die of it (it handles only SIGTERM/SIGINT), while
        # the training processes install their own handler. Its own session keeps the job's
        # terminal signals to the job.
        self._child = subprocess.Popen(command, env={**os.environ, **env, **server_env, "PYTHONUNBUFFERED": "1"},
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
            send_signal(self.training_ranks(), signal.SIGUSR2)
            try:
                child.wait(timeout=self.stop_timeout_s)
            except subprocess.TimeoutExpired:
                # its last complete checkpoint is on disk; a half-written one is never loaded
                log.error("training process did not exit within %.0f s; killing it", self.stop_timeout_s)
                send_signal(process_tree(child.pid), signal.SIGKILL)
                child.wait()
        return submitit.helpers.DelayedSubmission(CellJob(self.command, self.run_dir, self.stop_timeout_s, self.threads,
                                                          self.gpus, self.retries, self.online, self.rollout_server,
                                                          self.exclusive))

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_child": None}  # a process handle does not survive pickling


def train_command(run_dir: Path) -> list[str]:
    """What a cell job runs: the training entry point on the config snapshot in the cell folder."""
    return [sys.executable, "-u", "-m", "nli_grpo.train", "--config", str(CellFolder(run_dir).config_snapshot),
            "--output-dir", str(run_dir)]


def with_torchrun(command: list[str], processes: int) -> list[str]:
    """`python -u -m X ...` as `python -u -m torch.distributed.run ... -m X ...`: one process per GPU."""
    return [*command[:2], "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}", *command[2:]]


def _cuda_device_count() -> int:
    import torch

    return torch.cuda.device_count()


def _ignore_usr2() -> None:
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)


def process_tree(pid: int) -> list:
    """The process and all its descendants alive now, as psutil.Process (not a process group:
    torchrun starts each worker in a session of its own); [] when it is gone."""
    import psutil

    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def send_signal(processes: list, sig: int) -> None:
    """Send `sig` to each of `processes` (psutil.Process) that is still there."""
    import psutil

    for process in processes:
        try:
            process.send_signal(sig)
        except psutil.NoSuchProcess:
            pass


def write_config_snapshot(cfg, run_dir: Path, path: Path | None = None) -> None:
    """The resolved config the job will run (written at submission, so that a requeue days later
    runs what was validated, whatever happened to the recipes meanwhile), to the cell folder's
    snapshot or to `path`."""
    from omegaconf import OmegaConf

    path = path or CellFolder(run_dir).config_snapshot
    path.parent.mkdir(parents=True, exist_ok=True)
    with results.atomic_open(path) as f:
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
    online: bool = False
    """The nodes reach the hub; else jobs run offline against the prepared cache."""

    @property
    def stop_timeout_s(self) -> float:
        window = min(self.signal_delay_s, self.grace_time_s or self.signal_delay_s)
        return max(5.0, window - STOP_MARGIN_S)


def time_problem(timeout_min: int, options: LaunchOptions) -> str | None:
    """Why a time limit is too short for the USR2 that comes `signal_delay_s` before it."""
    least = options.signal_delay_s + MIN_WORK_BEFORE_SIGNAL_S
    if timeout_min * 60 >= least:
        return None
    return (f"--time {timeout_min} min is too short: USR2 (save and requeue) comes {options.signal_delay_s} s before the "
            f"time limit, so every start would stop after {max(0, timeout_min * 60 - options.signal_delay_s)} s; give "
            f"--time {-(-least // 60)} or more")


def executor_parameters(resources: ResourcesConfig, options: LaunchOptions, name: str, dependency: str | None = None) -> dict:
    """submitit AutoExecutor parameters of one job; cells with equal parameters share an array.
    `dependency`: a Slurm dependency (`afterok:<job>`), e.g. on the merge of the pool a cell trains on."""
    additional = {"requeue": True}  # requeueable even where the cluster's JobRequeue=0: preemption and submitit requeue
    if dependency:
        additional["dependency"] = dependency
    params = {
        "name": name, "nodes": 1, "tasks_per_node": 1, "timeout_min": resources.timeout_min,
        "cpus_per_task": resources.cpus_per_task, "mem_gb": resources.mem_gb,
        "slurm_signal_delay_s": options.signal_delay_s, "slurm_array_parallelism": options.array_parallelism,
        "slurm_additional_parameters": additional,
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
    if cluster == "slurm":  # submitit runs a bare `sbatch FILE`, without a timeout
        executor._executor._make_submission_command = lambda path: ["timeout", str(SBATCH_TIMEOUT_S), "sbatch", str(path)]
    return executor


def sbatch_script(folder: Path, parameters: dict, array_size: int) -> str:
    """The sbatch script submitit writes for an array of `array_size` cells with these parameters
    (submitit's own generator, as used by its SlurmExecutor)."""
    from submitit.slurm.slurm import SlurmExecutor, _make_sbatch_string

    executor = make_executor("slurm", folder, parameters)._executor
    assert isinstance(executor, SlurmExecutor)
    extra = {"map_count": array_size} if array_size > 1 else {}
    return _make_sbatch_string(command=executor._submitit_command_str, folder=executor.folder, **executor.parameters, **extra)


def array_groups(cells: list, options: LaunchOptions, name: str, max_array_size: int) -> list[tuple[dict, list]]:
    """The job arrays a list of cells (objects with `.cfg`, a `.dependency` when they wait on a
    queued job, `.after` when on a job of the same submission) is submitted as: one per distinct
    executor parameters and jobs waited on (cells asking Slurm for the same thing, after the same
    jobs), chunked to the cluster's MaxArraySize. The dry run shows exactly these; the submission
    submits exactly these."""
    groups: dict[str, tuple[dict, list]] = {}
    for cell in cells:
        params = executor_parameters(cell.cfg.resources, options, name, getattr(cell, "dependency", None))
        key = json.dumps([params, getattr(cell, "after", ())], sort_keys=True)
        groups.setdefault(key, (params, []))[1].append(cell)
    return [(params, group[start:start + max_array_size])
            for params, group in groups.values() for start in range(0, len(group), max_array_size)]


def cell_job(cell, options: LaunchOptions) -> CellJob:
    """The job of a planned cell (an object with `.cfg` and `.run_dir`)."""
    return CellJob(train_command(cell.run_dir), str(cell.run_dir), options.stop_timeout_s, cell.cfg.resources.cpus_per_task,
                   cell.cfg.resources.gpus_per_node, options.retries, options.online,
                   rollout_server=cell.cfg.rollout.backend == "vllm_server")


# --------------------------------------------------------------------------- submitting
@dataclass
class ArrayNode:
    """One job array of a submission (a sweep's cells, a pool's shards, its merge, preflights):
    what sbatch is given, the jobs by part (cell id, shard, combination), and what records them."""

    name: str
    parameters: dict
    """submitit's executor parameters; a dependency on jobs queued before this submission is in them."""
    jobs: dict
    """part -> the callable the job runs (a CellJob)."""
    log_folder: Path
    record: Callable[[dict], object]
    """Called with {part: submitit job} as soon as its sbatch returned (the manifest's record)."""
    after: tuple = ()
    """Jobs of earlier nodes of the same submission that must succeed first (`afterok`): a node's
    name (all its jobs) or (node name, part) (one job)."""
    kind: str = ""
    """What its jobs are ("pool shards", "pool merge", "preflight", "cells"), for the graph's description."""
    prepare: Callable[[], object] | None = None
    """Writes what its jobs read (config snapshots...) just before its sbatch; never in a dry run."""


def _after_jobs(node: ArrayNode, queued: dict[str, dict]) -> list:
    """The submitted jobs `node.after` names."""
    return [job for ref in node.after
            for job in ([queued[ref[0]][ref[1]]] if isinstance(ref, tuple) else queued[ref].values())]


def dependency_text(node: ArrayNode, queued: dict[str, dict] | None = None) -> str | None:
    """node's Slurm dependency: the one in its parameters plus `afterok` on the jobs of `after`;
    before submission (`queued` None, the dry run) those are named in angle brackets."""
    given = node.parameters.get("slurm_additional_parameters", {}).get("dependency", "")
    if queued is None:
        waits = [f"<the {ref[0]} job of {ref[1]}>" if isinstance(ref, tuple) else f"<the {ref} job>" for ref in node.after]
    else:
        waits = [str(job.job_id) for job in _after_jobs(node, queued)]
    return ",".join(filter(None, [given, f"afterok:{':'.join(waits)}" if waits else ""])) or None


class SubmissionError(RuntimeError):
    """An sbatch failed; every job queued before it is recorded. The message names the array."""


@contextlib.contextmanager
def _interrupt_deferred():
    """Ctrl-C while the block runs takes effect when it ends: a job sbatch queued is recorded first."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught = []
    previous = signal.signal(signal.SIGINT, lambda *args: caught.append(args))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if caught:
        raise KeyboardInterrupt


def submit_graph(nodes: list[ArrayNode], cluster: str) -> dict[str, dict]:
    """Submit job arrays in order, each with `afterok` on the jobs of the nodes it comes after,
    and record each as soon as its sbatch returns. Returns {node name: {part: job}}; raises
    SubmissionError at the first failed sbatch (submitit's errors included), the earlier ones
    recorded, so that a rerun submits only what is missing.
    Local executors know no dependencies: a node waits here for the jobs it comes after, and is
    not submitted (absent from the result) when one of them failed."""
    queued: dict[str, dict] = {}
    for node in nodes:
        parameters = dict(node.parameters)
        if cluster == "slurm":
            additional = {k: v for k, v in parameters.get("slurm_additional_parameters", {}).items() if k != "dependency"}
            if dependency := dependency_text(node, queued):
                additional["dependency"] = dependency
            parameters["slurm_additional_parameters"] = additional
        elif any((ref[0] if isinstance(ref, tuple) else ref) not in queued for ref in node.after) \
                or not wait_for(_after_jobs(node, queued)):
            continue  # what it comes after was not submitted, or failed
        if node.prepare is not None:
            node.prepare()
        executor = make_executor(cluster, node.log_folder, parameters)
        with _interrupt_deferred():
            try:
                with executor.batch():
                    submitted = [executor.submit(job) for job in node.jobs.values()]
            except Exception as err:  # noqa: BLE001 - submitit raises plain RuntimeError / CalledProcessError
                detail = str(err).strip().splitlines()
                if getattr(err.__cause__, "returncode", None) == 124:  # timeout's: the controller may have queued it all the same
                    detail = [f"no answer within {SBATCH_TIMEOUT_S} s (is slurmctld up?); it may have been queued all the same: "
                              f"look for jobs named {parameters.get('name')} in squeue before running again"]
                raise SubmissionError(f"the sbatch of {node.name} ({len(node.jobs)} job(s)) failed: "
                                      f"{detail[-1] if detail else type(err).__name__}") from err
            queued[node.name] = dict(zip(node.jobs, submitted))
            node.record(queued[node.name])
    return queued


def wait_for(jobs) -> bool:
    """Wait for jobs run on this machine; whether all of them succeeded (a failure shows in its
    own files: the cell's result, the pool's state, the verdict)."""
    ok = True
    for job in jobs:
        try:
            job.result()
        except Exception:  # noqa: BLE001 - reported, and the nodes after it are not submitted
            print(f"job {job.job_id} failed (its log: {job.paths.stderr})", file=sys.stderr)
            ok = False
    return ok
