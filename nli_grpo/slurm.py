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
class JobState(str):
    """A queued job's squeue state (compares as the state string: "RUNNING", "PENDING"...), with
    its pending `reason` and, for a job that waits for a person rather than for resources, what
    to do (`action`)."""

    reason: str = ""
    action: str = ""

    def __new__(cls, state: str, reason: str = "", action: str = ""):
        self = super().__new__(cls, state)
        self.reason, self.action = reason, action
        return self


#: Pending reasons of a job that waits for a person, not for resources: what to do about it.
#: Held jobs never start by themselves; the others cannot start until a limit or request changes.
HELD_REASONS = {
    "JobHeldUser": "held: `scontrol release {job}` lets it start",
    "JobHeldAdmin": "held by an administrator: ask them to release it (`scontrol release {job}`)",
    "job requeued in held state": "requeued and held: `scontrol release {job}` lets it start",
    "launch failed requeued held": "its launch failed on the node and it was held: check the node, then "
                                   "`scontrol release {job}`",
}
NEVER_RUNNABLE_PREFIXES = {
    "QOSMax": "over a QOS limit it can never meet: ask for a QOS that allows it (--qos) or lower the request (--time, --gpus-per-node)",
    "AssocMax": "over an association limit it can never meet: lower the request, or ask an administrator to raise the limit",
    "PartitionTimeLimit": "asks for more time than the partition allows: cancel it and submit with a lower --time",
    "PartitionNodeLimit": "asks for more nodes than the partition allows: cancel it and resubmit",
    "ReqNodeNotAvail": "a node it needs is down, drained or reserved: it starts when the node returns (`sinfo -R`)",
    "InvalidQOS": "its QOS is not allowed for your account: cancel it and submit with another --qos",
    "InvalidAccount": "its account is not valid: cancel it and submit with another --account",
    "BadConstraints": "no node has the features it asks for: cancel it and submit with another --constraint",
}


def pending_action(reason: str, job: str) -> str:
    """What to do about a pending job that waits for a person rather than for resources ("" when
    it simply waits its turn)."""
    if reason in HELD_REASONS:
        return HELD_REASONS[reason].format(job=job)
    for prefix, action in NEVER_RUNNABLE_PREFIXES.items():
        if reason.startswith(prefix):
            return action
    return ""


def parse_squeue(text: str) -> dict[str, JobState]:
    """`squeue --noheader --array --format=%i|%T|%r` -> {job id (array tasks one by one, `123_4`):
    JobState}, for the jobs still in the queue; a pending job whose dependency can never be
    satisfied is BLOCKED (it will not run: the sweep cancels and replaces it)."""
    jobs = {}
    for line in text.splitlines():
        job, state, reason = (line.strip().split("|") + ["", ""])[:3]
        if state == "PENDING" and reason == "DependencyNeverSatisfied":
            jobs[job] = JobState(BLOCKED, reason)
        elif state in QUEUED_STATES:
            jobs[job] = JobState(state, "" if reason == "None" else reason,
                                 pending_action(reason, job) if state in ("PENDING", "REQUEUE_HOLD") else "")
    return jobs


def parse_sacct(text: str) -> dict[str, str]:
    """`sacct -X -n -P -o JobID,State` -> {job id: state} (`CANCELLED by 0` kept whole). An array
    that ended before its tasks were split (cancelled while pending) is one line, `51_[0-1%2]`
    or `51`: its tasks are listed one by one, and its base id stands for any task not listed."""
    states = {}
    for line in text.splitlines():
        if "|" not in line:
            continue
        job, state = line.split("|", 1)
        base, _, tasks = job.partition("_")
        if tasks.startswith("["):
            for task in _array_tasks(tasks.strip("[]").split("%")[0]):
                states.setdefault(f"{base}_{task}", state)
            states.setdefault(base, state)
        else:
            states[job] = state
    return states


def _array_tasks(ranges: str) -> list[int]:
    """`0-3,5,7-9:2` -> the task ids."""
    tasks = []
    for part in ranges.split(","):
        span, _, step = part.partition(":")
        first, _, last = span.partition("-")
        if first.isdigit():
            tasks += range(int(first), int(last or first) + 1, int(step or 1))
    return tasks


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


def parse_being_preempted(text: str) -> bool:
    """`scontrol show job -o J` -> whether the job is running and selected for preemption (its
    PreemptTime set): what its SIGTERM means, rather than a cancel (COMPLETING) or a requeue."""
    state = re.search(r"\bJobState=(\S+)", text)
    preempt = re.search(r"\bPreemptTime=(\S+)", text)
    return bool(state and state.group(1) == "RUNNING" and preempt and preempt.group(1) not in ("None", "Unknown"))


def parse_max_array_size(text: str) -> int:
    """MaxArraySize from `scontrol show config` (an array's task ids must stay below it); Slurm's
    default 1001 when the line is missing."""
    match = re.search(r"^MaxArraySize\s*=\s*(\d+)", text, re.M)
    return int(match.group(1)) if match else 1001


def parse_submit_limits(assoc_text: str, qos_text: str) -> list[tuple[int, str]]:
    """The limits on the jobs a user may have in the queue at once (pending or running; every
    array task counts): `sacctmgr -n -P show assoc where user=U format=Account,Partition,MaxSubmit`
    and `sacctmgr -n -P show qos Q format=Name,MaxSubmitPU` -> [(limit, what sets it)]."""
    limits = []
    for line in assoc_text.splitlines():
        account, partition, max_submit = (line.split("|") + ["", ""])[:3]
        if max_submit.strip().isdigit():
            where = f"account {account}" + (f", partition {partition}" if partition else "")
            limits.append((int(max_submit), f"the association limit MaxSubmitJobs of {where}"))
    for line in qos_text.splitlines():
        name, max_submit = (line.split("|") + [""])[:2]
        if max_submit.strip().isdigit():
            limits.append((int(max_submit), f"QOS {name}'s MaxSubmitJobsPerUser"))
    return limits


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


def queued_jobs(job_ids: list[str]) -> dict[str, JobState]:
    """These jobs, whoever submitted them, while they are in the queue: job id (array tasks one by
    one) -> JobState. SlurmError when the queue cannot be read (never "nothing is queued")."""
    base = sorted({str(j).split("_")[0] for j in job_ids})
    if not base:
        return {}
    try:
        return parse_squeue(run_command("squeue", "--noheader", "--array", f"--jobs={','.join(base)}",
                                        f"--format={SQUEUE_FORMAT}"))
    except SlurmError as err:
        if "Invalid job id specified" in str(err):  # a single job id that left the queue (and MinJobAge)
            return {}
        raise


def accounting_states(job_ids: list[str]) -> dict[str, str]:
    """Final sacct states (FAILED, CANCELLED by 0, OUT_OF_MEMORY...) of jobs, array tasks one by
    one (an array cancelled whole while pending under its base id too); {} without accounting."""
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


def requeue_if_preempted(job_id: str) -> bool:
    """Requeue a job of ours that is being preempted; whether it was. For clusters without
    preempt_send_user_signal (Slurm's default): a preempted job then gets SIGTERM, not its
    --signal, and a job that exits within GraceTime ends FAILED, not requeued."""
    if not parse_being_preempted(run_command("scontrol", "show", "job", "-o", job_id)):
        return False
    run_command("scontrol", "requeue", job_id)
    return True


def submit_room(qos: str | None, account: str | None = None) -> tuple[int | None, str]:
    """How many more jobs this user may queue under the QOS / association submit limits, and the
    limit that sets it: (None, "") when there is none, or accounting cannot be asked (sbatch
    then decides). A job array over the limit is rejected whole, so arrays are cut to this."""
    import getpass

    user = getpass.getuser()
    try:
        assoc = run_command("sacctmgr", "-n", "-P", "show", "assoc", "where", f"user={user}",
                            "format=Account,Partition,MaxSubmit,QOS,DefaultQOS")
        rows = [line.split("|") for line in assoc.splitlines() if line.count("|") >= 4]
        if account:
            rows = [r for r in rows if r[0] == account]
        qos = qos or next((r[4] for r in rows if r[4]), "") or "normal"
        qos_text = run_command("sacctmgr", "-n", "-P", "show", "qos", qos, "format=Name,MaxSubmitPU")
    except SlurmError:
        return None, ""
    room = []
    for limit, what in parse_submit_limits("\n".join("|".join(r[:3]) for r in rows), qos_text):
        scope = ["--qos", qos] if what.startswith("QOS") else []
        queued = run_command("squeue", "--me", "--noheader", "--array", "--format=%i", *scope).split()
        room.append((max(0, limit - len(queued)), f"{what} is {limit} and you have {len(queued)} job(s) queued"))
    return min(room) if room else (None, "")


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
