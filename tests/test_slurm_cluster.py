"""Real jobs on the local Slurm cluster (slurm/local-cluster.sh): what nli_grpo's launcher relies on."""
import os
import re
import subprocess
import sys
import time

import cloudpickle
import pytest
import submitit

pytestmark = [pytest.mark.slurm, pytest.mark.usefixtures("slurm_cluster")]

# Jobs unpickle the functions below in a fresh python that cannot import this test module.
cloudpickle.register_pickle_by_value(sys.modules[__name__])


def slurm(*args, timeout=30):
    return subprocess.run(args, check=True, capture_output=True, text=True, timeout=timeout).stdout


def wait_for(what, predicate, timeout):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {timeout} s")
        time.sleep(0.5)


def wait_for_state(job_id, wanted, timeout):
    """Poll sacct, which lags the real job state by up to ~1 s."""
    deadline = time.monotonic() + timeout
    while (state := slurm("sacct", "-X", "-n", "-P", "-j", job_id, "-o", "State").strip()) != wanted:
        if time.monotonic() > deadline:
            pytest.fail(f"job {job_id} is {state!r}, not {wanted} after {timeout} s; see `scontrol show job {job_id}`")
        time.sleep(0.5)


def result_within(job, timeout):
    """job.result(), but bounded: a stuck job is cancelled and reported with its log."""
    deadline = time.monotonic() + timeout
    while not job.done():
        if time.monotonic() > deadline:
            state = job.state
            job.cancel(check=False)
            pytest.fail(f"submitit job {job.job_id} not done after {timeout} s (state {state}); log: {job.paths.stderr}")
        time.sleep(0.5)
    return job.result()


def executor(tmp_path, partition="gpu", timeout_min=5, **parameters):
    ex = submitit.AutoExecutor(folder=tmp_path / "submitit" / "%j", cluster="slurm")
    ex.update_parameters(slurm_partition=partition, timeout_min=timeout_min, **parameters)
    return ex


def job_environment(x):
    return {"x": x, **{k: os.environ.get(k) for k in ("CUDA_VISIBLE_DEVICES", "SLURM_ARRAY_TASK_ID", "SLURM_JOB_PARTITION")}}


class Counter(submitit.helpers.Checkpointable):
    """Counts to `total`; on USR2 submitit pickles it with its progress (Checkpointable.checkpoint)
    and requeues it, so a resumed run starts at the step it reached."""

    def __init__(self, progress_file, total):
        self.progress_file, self.total, self.step, self.starts = progress_file, total, 0, 0

    def __call__(self):
        self.starts += 1
        self._log(f"start {self.starts} at step {self.step}")
        while self.step < self.total:
            time.sleep(0.25)
            self.step += 1
            self._log(f"step {self.step}")
        return {"steps": self.step, "starts": self.starts}

    def _log(self, line):
        with open(self.progress_file, "a") as f:
            f.write(line + "\n")


def test_partitions_gpu_cpu_urgent_exist_and_urgent_preempts():
    partitions = dict(line.split() for line in slurm("sinfo", "-h", "-o", "%P %a").splitlines())
    assert partitions == {"gpu*": "up", "cpu": "up", "urgent": "up"}  # '*': gpu is the default
    tiers = {p: re.search(r"PriorityTier=(\d+)", slurm("scontrol", "show", "partition", p)).group(1) for p in ("gpu", "cpu", "urgent")}
    assert int(tiers["urgent"]) > max(int(tiers["gpu"]), int(tiers["cpu"]))
    config = slurm("scontrol", "show", "config")
    assert re.search(r"^PreemptMode\s*=\s*REQUEUE$", config, re.M)
    assert "preempt_send_user_signal" in config
    assert re.search(r"^MaxArraySize\s*=\s*1001$", config, re.M)  # the launcher chunks arrays to it


def test_sbatch_gpu_job_sees_its_gpu_and_sacct_reports_completed(tmp_path):
    out = tmp_path / "job.out"
    job_id = slurm(
        "sbatch", "--parsable", "--wait", "-p", "gpu", "--gres=gpu:1", "-t", "1", "-J", "test-sbatch-gpu", f"--output={out}",
        "--wrap", "echo CUDA_VISIBLE_DEVICES=$CUDA_VISIBLE_DEVICES",
        timeout=45,
    ).strip()
    assert re.fullmatch(r"CUDA_VISIBLE_DEVICES=\d+\n", out.read_text())
    wait_for_state(job_id, "COMPLETED", 15)


def test_submitit_gpu_job_returns_its_result(tmp_path):
    job = executor(tmp_path, gpus_per_node=1).submit(job_environment, 7)
    result = result_within(job, 45)
    assert result["x"] == 7
    assert result["SLURM_JOB_PARTITION"] == "gpu"
    assert re.fullmatch(r"\d+", result["CUDA_VISIBLE_DEVICES"] or "")


def test_submitit_job_array_runs_every_task(tmp_path):
    jobs = executor(tmp_path, gpus_per_node=1).map_array(job_environment, [10, 11, 12, 13])
    assert len({job.job_id.split("_")[0] for job in jobs}) == 1, "map_array should submit one Slurm array"
    results = [result_within(job, 45) for job in jobs]
    assert [r["x"] for r in results] == [10, 11, 12, 13]
    assert [r["SLURM_ARRAY_TASK_ID"] for r in results] == ["0", "1", "2", "3"]
    assert all(re.fullmatch(r"\d+", r["CUDA_VISIBLE_DEVICES"] or "") for r in results)


def test_urgent_job_preempts_checkpointable_job_which_resumes(tmp_path):
    progress = tmp_path / "progress.txt"
    # timeout_min >= 11: below that submitit treats every USR2 as a time-out, not a preemption.
    # --exclusive: the urgent job can then only start by preempting this job, not some other one.
    victim = executor(
        tmp_path, gpus_per_node=1, timeout_min=15, slurm_additional_parameters={"exclusive": True}
    ).submit(Counter(str(progress), total=24))
    wait_for("victim job reaches step 3", lambda: progress.exists() and "step 3\n" in progress.read_text(), 30)

    slurm("sbatch", "-p", "urgent", "-t", "1", "-J", "test-urgent", f"--output={tmp_path / 'urgent.out'}", "--wrap", "true")

    result = result_within(victim, 50)
    # starts == 2 means checkpoint() ran on the preemption signal: a job requeued without the
    # signal restarts from its original pickle (starts == 1, counting from step 0 again)
    assert result == {"steps": 24, "starts": 2}, progress.read_text()
    resumed_at = int(re.search(r"^start 2 at step (\d+)$", progress.read_text(), re.M).group(1))
    assert resumed_at >= 3
    assert "this job is preempted" in victim.stderr()


# --- the plain sbatch examples, run as shipped except for the training command ---------------------

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = "python -m nli_grpo.train"
STAND_IN = """
# Stands in for nli_grpo.train: resumes from its step file; on USR2 saves and exits 75.
import os, signal, sys, time
step = int(open("step.txt").read()) if os.path.exists("step.txt") else 0
print(f"start at step {step}", flush=True)
signal.signal(signal.SIGUSR2, lambda *_: (print(f"USR2 at step {step}", flush=True), sys.exit(75)))
while step < 16:
    time.sleep(0.25)
    step += 1
    open("step.txt", "w").write(str(step))
print("done", flush=True)
"""


def submit_example(tmp_path, name, train_replacement, *sbatch_options):
    """Submit slurm/<name> from tmp_path, as a user would from the repository root (their .venv
    is this test's python environment), with `python -m nli_grpo.train` replaced."""
    script = open(os.path.join(REPO, "slurm", name)).read()
    assert script.count(TRAIN) == 1, f"slurm/{name} should run `{TRAIN}` exactly once"
    (tmp_path / name).write_text(script.replace(TRAIN, train_replacement))
    (tmp_path / ".venv").symlink_to(sys.prefix)
    (tmp_path / "logs").mkdir()
    # the real jobs' memory and CPUs do not fit this machine; command-line options override #SBATCH lines
    command = ["sbatch", "--parsable", "--mem=1G", "--cpus-per-task=1", *sbatch_options, name]
    return subprocess.run(command, cwd=tmp_path, check=True, capture_output=True, text=True, timeout=60).stdout.strip()


def test_example_sbatch_requeues_itself_after_usr2_and_resumes(tmp_path):
    (tmp_path / "stand_in.py").write_text(STAND_IN)
    job_id = submit_example(tmp_path, "example.sbatch", "python stand_in.py")

    def step():
        path = tmp_path / "step.txt"
        return int(path.read_text() or 0) if path.exists() else 0

    wait_for("job reaches step 3", lambda: step() >= 3, 30)
    slurm("scancel", "--signal=USR2", job_id)  # what Slurm sends 300 s before the time limit
    wait_for_state(job_id, "COMPLETED", 45)
    log = next((tmp_path / "logs").glob(f"*-{job_id}.out")).read_text()
    starts = [int(s) for s in re.findall(r"^start at step (\d+)$", log, re.M)]
    assert len(starts) == 2 and starts[1] >= 3 and log.rstrip().endswith("done"), log


def test_example_array_sbatch_maps_task_ids_to_lora_ranks(tmp_path):
    array_id = submit_example(tmp_path, "example-array.sbatch", "echo", "--wait")  # --wait: until every task ended
    logs = {int(p.stem.rsplit("_", 1)[1]): p.read_text() for p in (tmp_path / "logs").glob(f"*-{array_id}_*.out")}
    ranks = {task: int(re.search(r"lora\.rank=(\d+)", log).group(1)) for task, log in logs.items()}
    assert ranks == {0: 8, 1: 16, 2: 32, 3: 64, 4: 128}
