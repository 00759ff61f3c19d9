"""What Slurm says: plain functions that parse the text of `squeue`, `sacct`, `sinfo` and `scontrol`
(tested on output recorded from a real cluster, tests/recorded/slurm/), and thin functions that
run those commands and parse what they print. Nothing here submits anything (nli_grpo.launch does).
"""

from __future__ import annotations

import re
import shlex
import subprocess

from .config import ResourcesConfig

#: squeue states of a job that is still in the queue (a rerun must not submit its cell again).
QUEUED_STATES = {"PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "REQUEUED", "REQUEUE_HOLD",
                 "REQUEUE_FED", "RESIZING", "SUSPENDED", "SIGNALING", "STAGE_OUT", "STOPPED"}
#: A pending job whose dependency failed: it would pend forever (Slurm keeps it unless
#: kill_invalid_depend is set). Reported as this pseudo-state, which is not "queued".
BLOCKED = "BLOCKED"
#: What `squeue` / `sacct` are asked to print (the parsers below read exactly this).
SQUEUE_FORMAT = "%i|%T|%r"
SINFO_NODE_FORMAT = "%G|%m|%c"


class SlurmError(RuntimeError):
    """A Slurm command failed or the cluster cannot take a request; the message says what to do."""


# --------------------------------------------------------------------------- parsing
def parse_squeue(text: str) -> dict[str, str]:
    """`squeue --noheader --array --format=%i|%T|%r` -> {job id (array tasks one by one, `123_4`):
    state}, for the jobs still in the queue; a pending job whose dependency can never be satisfied
    is BLOCKED (it will not run: the sweep cancels and replaces it)."""
    jobs = {}
    for line in text.splitlines():
        job, state, reason = (line.strip().split("|") + ["", ""])[:3]
        if state == "PENDING" and reason == "DependencyNeverSatisfied":
            jobs[job] = BLOCKED
        elif state in QUEUED_STATES:
            jobs[job] = state
    return jobs


def parse_sacct(text: str) -> dict[str, str]:
    """`sacct -X -n -P -o JobID,State` -> {job id: state} (`CANCELLED by 0` kept whole)."""
    return dict(line.split("|", 1) for line in text.splitlines() if "|" in line)


def parse_partitions(text: str) -> tuple[list[str], str | None]:
    """`sinfo --noheader --format=%P` -> (partition names, the default one or None); Slurm marks
    the default with a trailing `*`."""
    listed = text.split()
    defaults = [p.rstrip("*") for p in listed if p.endswith("*")]
    return [p.rstrip("*") for p in listed], (defaults[0] if defaults else None)


def parse_node_resources(text: str) -> dict:
    """`sinfo --noheader --partition P --format=%G|%m|%c` -> the largest node of the partition:
    {gpus_per_node, mem_gb, cpus_per_node}. Reads GRES like `gpu:4`, `gpu:a100:8(S:0-1)` or
    `(null)`, and memory / CPU counts with Slurm's `+` for mixed nodes (`512000+`)."""
    gpus, mem_mb, cpus = 0, 0, 0
    for node in text.split():
        gres, mem, cpu = node.split("|")
        gpus = max([gpus, *(int(n) for n in re.findall(r"gpu(?::[^:,(]+)?:(\d+)", gres))])
        mem_mb = max(mem_mb, int(re.sub(r"\D", "", mem) or 0))
        cpus = max(cpus, int(re.sub(r"\D", "", cpu) or 0))
    return {"gpus_per_node": gpus, "mem_gb": mem_mb / 1024, "cpus_per_node": cpus}


def parse_partition_limits(text: str) -> dict:
    """`scontrol show partition P` -> {max_time_min (None = unlimited), grace_time_s}."""
    max_time = re.search(r"MaxTime=(\S+)", text)
    grace = re.search(r"GraceTime=(\d+)", text)
    unlimited = not max_time or max_time.group(1) in ("UNLIMITED", "INFINITE")
    return {"max_time_min": None if unlimited else parse_time_min(max_time.group(1)),
            "grace_time_s": int(grace.group(1)) if grace else None}


def parse_max_array_size(text: str) -> int:
    """MaxArraySize from `scontrol show config` (an array's task ids must stay below it); Slurm's
    default 1001 when the line is missing."""
    match = re.search(r"^MaxArraySize\s*=\s*(\d+)", text, re.M)
    return int(match.group(1)) if match else 1001


def parse_time_min(text: str) -> int:
    """Minutes from a Slurm time: `90`, `HH:MM:SS`, `MM:SS`, `D-HH`, `D-HH:MM[:SS]` (seconds round up)."""
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


# --------------------------------------------------------------------------- asking
def run_command(*args: str, timeout: float = 30) -> str:
    """A Slurm command's stdout; SlurmError saying what to do when it is missing, hangs or fails."""
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
    """This user's jobs in the queue: job id (array tasks one by one) -> state."""
    return parse_squeue(run_command("squeue", "--me", "--noheader", "--array", f"--format={SQUEUE_FORMAT}"))


def accounting_states(job_ids: list[str]) -> dict[str, str]:
    """Final sacct states (FAILED, CANCELLED by 0, OUT_OF_MEMORY...) of jobs; {} without accounting."""
    if not job_ids:
        return {}
    base = sorted({j.split("_")[0] for j in job_ids})
    try:
        return parse_sacct(run_command("sacct", "-X", "-n", "-P", "-o", "JobID,State", "-j", ",".join(base)))
    except SlurmError:
        return {}


def cancel(job_ids: list[str]) -> None:
    """Cancel jobs (e.g. ones blocked on a failed dependency, before they are replaced)."""
    if job_ids:
        run_command("scancel", *job_ids)


def max_array_size() -> int:
    return parse_max_array_size(run_command("scontrol", "show", "config"))


def partition_facts(partition: str | None) -> dict:
    """What a partition offers per node: name, max GPUs, memory (GB), CPUs, MaxTime (minutes or
    None) and GraceTime (s). The default partition when `partition` is None. SlurmError names the
    partitions that exist when it does not."""
    names, default = parse_partitions(run_command("sinfo", "--noheader", "--format=%P"))
    if partition is None:
        if default is None:
            raise SlurmError(f"this cluster has no default partition; pass --partition (one of: {', '.join(names)})")
        partition = default
    if partition not in names:
        raise SlurmError(f"partition {partition!r} does not exist on this cluster; use --partition with one of: {', '.join(names)}")
    nodes = parse_node_resources(run_command("sinfo", "--noheader", "--partition", partition, f"--format={SINFO_NODE_FORMAT}"))
    limits = parse_partition_limits(run_command("scontrol", "show", "partition", partition))
    return {"name": partition, **nodes, **limits}


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
