"""The launcher without a Slurm cluster: the sbatch script submitit would write (vs a golden file),
executor parameters, and CellJob with real child processes: USR2 forwarded to the training ranks
only, deaths by signal recorded and retried, errors not."""
import json
import os
import pickle
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import submitit

from nli_grpo import launch, results
from nli_grpo.config import ResourcesConfig
from nli_grpo.layout import CellFolder

GOLDEN = Path(__file__).parent / "golden"


def normalise(text: str, folder: Path) -> str:
    return text.replace(str(folder), "<LOGS>").replace(sys.executable, "<PYTHON>")


def test_sbatch_script_of_a_gpu_array_matches_the_golden_file(tmp_path):
    options = launch.LaunchOptions(partition="gpu", account="nlp", qos="normal", constraint="h100", array_parallelism=4)
    params = launch.executor_parameters(ResourcesConfig(gpus_per_node=1, cpus_per_task=8, mem_gb=64, timeout_min=1440), options, "nli_grpo_lora_rank")
    script = normalise(launch.sbatch_script(tmp_path / "logs", params, array_size=10), tmp_path / "logs")
    golden = GOLDEN / "lora_rank_array.sbatch"
    if os.environ.get("NLI_GRPO_UPDATE_GOLDEN") == "1":
        golden.write_text(script)
    assert script == golden.read_text(), "sbatch text changed; if intended, rerun with NLI_GRPO_UPDATE_GOLDEN=1 and review the diff"


def test_cpu_only_cells_ask_for_no_gpu_and_every_job_is_requeueable():
    params = launch.executor_parameters(ResourcesConfig(gpus_per_node=0), launch.LaunchOptions(), "x")
    assert "gpus_per_node" not in params and "slurm_partition" not in params
    assert params["slurm_additional_parameters"] == {"requeue": True}


def test_child_gets_at_most_the_signal_window_minus_a_margin_to_save():
    assert launch.LaunchOptions(signal_delay_s=300, grace_time_s=60).stop_timeout_s == 45
    assert launch.LaunchOptions(signal_delay_s=300, grace_time_s=None).stop_timeout_s == 285


CHILD = """
import signal, sys, time
signal.signal(signal.SIGUSR2, lambda *_: (print("saving", flush=True), time.sleep(0.5), sys.exit(75)))
print("ready", flush=True)
time.sleep(60)
"""


def test_checkpoint_forwards_usr2_waits_for_the_child_and_resubmits_a_fresh_job(tmp_path):
    job = launch.CellJob([sys.executable, "-c", CHILD], str(tmp_path), stop_timeout_s=20)
    job.start_child(stdout=subprocess.PIPE, text=True)
    assert job._child.stdout.readline() == "ready\n"
    started = time.monotonic()
    delayed = job.checkpoint()
    assert job._child.returncode == 75 and job._child.stdout.read() == "saving\n"
    assert time.monotonic() - started < 10
    again = pickle.loads(pickle.dumps(delayed.function))  # what submitit writes for the requeued job
    assert (again.command, again.run_dir, again._child) == (job.command, job.run_dir, None)


def test_checkpoint_kills_a_child_that_does_not_stop_in_time(tmp_path):
    stubborn = "import signal, time; signal.signal(signal.SIGUSR2, signal.SIG_IGN); print('ready', flush=True); time.sleep(60)"
    job = launch.CellJob([sys.executable, "-c", stubborn], str(tmp_path), stop_timeout_s=1)
    job.start_child(stdout=subprocess.PIPE, text=True)
    assert job._child.stdout.readline() == "ready\n"
    job.checkpoint()
    assert job._child.returncode == -signal.SIGKILL


def test_cell_job_reports_the_childs_failure_with_the_recorded_error(tmp_path, write_result):
    write_result(tmp_path, "failed", error="ValueError: no prompts")
    with pytest.raises(RuntimeError, match="exited with 3: ValueError: no prompts"):
        launch.CellJob([sys.executable, "-c", "raise SystemExit(3)"], str(tmp_path), 10)()
    write_result(tmp_path, "complete", attempts=2)
    assert launch.CellJob([sys.executable, "-c", "pass"], str(tmp_path), 10)() == {"run_dir": str(tmp_path), "status": "complete", "attempts": 2}


def test_a_training_stopped_by_a_signal_ends_the_job_without_a_traceback(tmp_path, write_result):
    """An external SIGTERM (`scontrol requeue`, a preemption without USR2, scancel) reaches the
    training, which saves and exits EXIT_PREEMPTED: the cell is resumable, not failed. The job exits
    with that code and one log line; an exception would make submitit log a traceback (and CI
    failed on that once: the child saved within Slurm's KillWait and the job raised)."""
    write_result(tmp_path, "preempted", steps=4)
    executor = submitit.AutoExecutor(folder=tmp_path / "logs", cluster="local")
    executor.update_parameters(timeout_min=5)
    job = executor.submit(launch.CellJob([sys.executable, "-c", "raise SystemExit(75)"], str(tmp_path), 10))
    deadline = time.monotonic() + 60
    while not job.done() and time.monotonic() < deadline:  # not job.result(): it waits 15 s for the result pickle a stop does not write
        time.sleep(0.2)
    assert job.done()
    log_text = Path(job.paths.stderr).read_text()
    assert "stopped by a signal after saving (exit 75); it resumes when requeued" in log_text, log_text
    assert "Traceback" not in log_text and "completed successfully" not in log_text, log_text


def test_a_multi_gpu_cell_trains_under_torchrun_one_process_per_gpu(tmp_path):
    single = launch.train_command(tmp_path)
    multi = launch.with_torchrun(single, 4)
    assert multi[:2] == single[:2] and multi[-6:] == single[-6:]
    assert multi[2:6] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=4"]


def test_checkpoint_reaches_ranks_that_run_in_sessions_of_their_own(tmp_path):
    """torchrun starts each worker with start_new_session=True: a process-group signal would miss
    them, and torchrun itself must not die of USR2 (the job starts it with USR2 ignored)."""
    saved = tmp_path / "saved"
    worker = ("import pathlib, signal, sys, time\n"
              f"def save(*_): pathlib.Path({str(saved)!r}).write_text('saved'); sys.exit(75)\n"
              "signal.signal(signal.SIGUSR2, save)\n"
              "print('ready', flush=True)\n"
              "time.sleep(60)\n")
    launcher = ("import subprocess, sys\n"
                f"worker = subprocess.Popen([sys.executable, '-c', {worker!r}], start_new_session=True)\n"
                "sys.exit(worker.wait())\n")
    job = launch.CellJob([sys.executable, "-c", launcher], str(tmp_path), stop_timeout_s=20)
    job.start_child(stdout=subprocess.PIPE, text=True)
    job._torchrun = True  # the launcher stands in for torchrun (start_child uses torchrun only with CUDA devices)
    assert job._child.stdout.readline() == "ready\n"
    job.checkpoint()
    assert saved.read_text() == "saved" and job._child.returncode == 75


def test_a_training_killed_by_a_signal_is_recorded_and_restarted_a_bounded_number_of_times(tmp_path, write_result):
    """The OOM killer's SIGKILL leaves the child no chance to write anything: the job records the
    death (signal, step on disk) and starts it again, `retries` times at most, then fails the cell
    with what happened instead of `error: None`."""
    write_result(tmp_path, "running", steps=0)
    checkpoint = tmp_path / "checkpoints" / "checkpoint-6"
    checkpoint.mkdir(parents=True)
    (checkpoint / "CHECKPOINT_COMPLETE").write_text("6\n")
    suicide = "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"
    job = launch.CellJob([sys.executable, "-c", suicide], str(tmp_path), 10, retries=1)
    with pytest.raises(RuntimeError, match="killed by SIGKILL with step 6 on disk.*1 retry used"):
        job()
    assert job.starts == 2
    doc = results.read_result(CellFolder(tmp_path).result)
    assert doc["status"] == "failed" and "SIGKILL" in doc["error"] and "OOM killer" in doc["error"]
    assert doc["failure"] == {"exit_signal": "SIGKILL", "last_step_on_disk": 6}
    assert [(d["signal"], d["step_on_disk"], d["retried"]) for d in doc["slurm"]["deaths"]] == [
        ("SIGKILL", 6, True), ("SIGKILL", 6, False)]


def test_errors_are_never_retried(tmp_path, write_result):
    write_result(tmp_path, "running", steps=0)
    job = launch.CellJob([sys.executable, "-c", "raise SystemExit(2)"], str(tmp_path), 10, retries=5)
    with pytest.raises(RuntimeError, match="exited with 2"):
        job()
    assert job.starts == 1


def _snapshot_cell(tmp_path: Path, *overrides: str) -> Path:
    """A cell folder as the sweep leaves it: the config snapshot the job's command runs."""
    from nli_grpo.job import config_for_run

    run_dir = tmp_path / "cell"
    # 8 completions a step (the recipe's 32 are sized to show learning, not to test the launcher)
    launch.write_config_snapshot(config_for_run("smoke", ["grpo.completions_per_step=8", *overrides], str(run_dir)), run_dir)
    return run_dir


def _wait_for(predicate, job_thread, timeout: float = 300):
    deadline = time.time() + timeout
    while not predicate():
        assert job_thread.is_alive(), "the job ended before the test could act"
        assert time.time() < deadline, "timed out"
        time.sleep(0.1)


def _in_thread(job):
    outcome = {}

    def target():
        try:
            outcome["result"] = job()
        except (Exception, SystemExit) as err:  # noqa: BLE001 - the test reads it (a stop exits 75)
            outcome["error"] = err
    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, outcome


@pytest.mark.slow
def test_a_killed_training_restarts_from_its_last_checkpoint_and_completes(tmp_path):
    run_dir = _snapshot_cell(tmp_path, "grpo.max_steps=40", "grpo.save_steps=2", "eval.after_training=false")
    job = launch.CellJob(launch.train_command(run_dir), str(run_dir), 30, retries=2)
    thread, outcome = _in_thread(job)
    _wait_for(lambda: any((run_dir / "checkpoints").glob("checkpoint-*/CHECKPOINT_COMPLETE")), thread)
    os.kill(job._child.pid, signal.SIGKILL)
    thread.join(timeout=300)
    assert outcome.get("result", {}).get("status") == "complete", outcome
    doc = results.read_result(CellFolder(run_dir).result)
    assert job.starts == 2 and doc["slurm"]["attempts"] == 2
    (death,) = doc["slurm"]["deaths"]
    assert death["signal"] == "SIGKILL" and death["retried"] and death["step_on_disk"] >= 2
    assert doc["train"]["steps_done"] == 40 and doc["train"]["resumed_from_step"] == death["step_on_disk"]


def _engine_processes(since: float) -> list:
    import psutil

    found = []
    for process in psutil.process_iter(["name", "cmdline", "create_time"]):
        text = " ".join([process.info["name"] or "", *(process.info["cmdline"] or [])])
        # colocated: vLLM's engine process; server mode: the API server and its engine
        if ("EngineCore" in text or "vllm.entrypoints" in text) and process.info["create_time"] >= since - 1:
            found.append(process)
    return found


@pytest.mark.slow
@pytest.mark.vllm
def test_usr2_reaches_the_training_rank_not_the_vllm_engine(tmp_path):
    """With colocated vLLM rollouts the rank has a child of its own, vLLM's engine process, which
    handles only SIGTERM/SIGINT: a USR2 sent to it too would kill it under the step in flight.
    Only the rank gets it: it finishes the step, saves, exits 75; the rerun completes with the
    exact step count; no engine process is left behind."""
    started = time.time()
    run_dir = _snapshot_cell(tmp_path, "rollout.backend=vllm", "grpo.max_steps=30", "grpo.num_iterations=1",
                             "grpo.save_steps=1000", "eval.after_training=false")
    job = launch.CellJob(launch.train_command(run_dir), str(run_dir), 120)
    thread, outcome = _in_thread(job)
    _wait_for(lambda: len(results.read_jsonl(CellFolder(run_dir).train_log)) >= 2, thread)
    job.checkpoint()
    thread.join(timeout=120)
    assert job._child.returncode == 75 and outcome["error"].code == 75, outcome  # a stop, not a failure: SystemExit(75)
    doc = results.read_result(CellFolder(run_dir).result)
    stopped_at = doc["train"]["steps_done"]
    assert doc["status"] == "preempted" and 2 <= stopped_at < 30
    assert (run_dir / "checkpoints" / f"checkpoint-{stopped_at}" / "CHECKPOINT_COMPLETE").exists()

    assert launch.CellJob(launch.train_command(run_dir), str(run_dir), 120)()["status"] == "complete"
    doc = results.read_result(CellFolder(run_dir).result)
    assert doc["train"]["steps_done"] == 30 and doc["train"]["resumed_from_step"] == stopped_at
    deadline = time.time() + 30
    while _engine_processes(started) and time.time() < deadline:
        time.sleep(0.5)
    assert _engine_processes(started) == []


@pytest.mark.slow
@pytest.mark.vllm
def test_usr2_in_server_mode_saves_stops_the_server_and_the_rerun_completes(tmp_path):
    """rollout.backend=vllm_server: the job starts the vLLM server beside the training process.
    USR2 reaches the training rank only (the server ignores it): the rank saves and exits 75, the
    job stops the server; the rerun starts a fresh server, resumes and completes the exact step
    count; no server or engine process is left behind."""
    started = time.time()
    run_dir = _snapshot_cell(tmp_path, "rollout.backend=vllm_server", "grpo.max_steps=16", "grpo.num_iterations=1",
                             "grpo.save_steps=1000", "eval.after_training=false")
    job = launch.CellJob(launch.train_command(run_dir), str(run_dir), 120, rollout_server=True)
    thread, outcome = _in_thread(job)
    _wait_for(lambda: len(results.read_jsonl(CellFolder(run_dir).train_log)) >= 2, thread)
    assert len(_engine_processes(started)) >= 1  # the server is up while training runs
    job.checkpoint()
    thread.join(timeout=120)
    assert job._child.returncode == 75 and outcome["error"].code == 75, outcome  # a stop, not a failure: SystemExit(75)
    assert _engine_processes(started) == []  # the job stopped it when its training ended
    doc = results.read_result(CellFolder(run_dir).result)
    stopped_at = doc["train"]["steps_done"]
    assert doc["status"] == "preempted" and 2 <= stopped_at < 16
    assert (run_dir / "checkpoints" / f"checkpoint-{stopped_at}" / "CHECKPOINT_COMPLETE").exists()

    restarted = time.time()
    assert launch.CellJob(launch.train_command(run_dir), str(run_dir), 120, rollout_server=True)()["status"] == "complete"
    doc = results.read_result(CellFolder(run_dir).result)
    assert doc["train"]["steps_done"] == 16 and doc["train"]["resumed_from_step"] == stopped_at
    assert (run_dir / "vllm_server.log").read_text().count("Application startup complete") == 2  # a fresh one
    assert _engine_processes(restarted) == [] and _engine_processes(started) == []


def test_a_cell_lock_of_a_live_process_refuses_and_a_dead_ones_is_taken_over(tmp_path, monkeypatch):
    import socket
    import subprocess

    for name in ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID"):
        monkeypatch.delenv(name, raising=False)
    lock = tmp_path / launch.CELL_LOCK_FILENAME
    dead = subprocess.Popen(["true"])
    dead.wait()
    lock.write_text(json.dumps({"job": None, "host": socket.gethostname(), "pid": dead.pid, "since": "earlier"}))
    with launch.cell_lock(tmp_path):  # its holder died (killed, no cleanup): stale
        assert json.loads(lock.read_text())["pid"] == os.getpid()
        with pytest.raises(launch.CellBusy, match=f"is being trained by job \\? .*pid {os.getpid()}"):
            with launch.cell_lock(tmp_path):
                pass
        assert lock.is_file()  # the refused one touched nothing
    assert not lock.exists() and list(tmp_path.glob(f"{launch.CELL_LOCK_FILENAME}.stale-*"))


def test_a_ctrl_c_during_a_submission_keeps_the_record_of_what_was_queued(tmp_path):
    """Ctrl-C arrives while the first array is being queued: it is recorded all the same, the
    second is never submitted, and the interrupt then reaches the caller."""
    recorded = []

    def record(jobs):
        if not recorded:
            os.kill(os.getpid(), signal.SIGINT)  # the user's Ctrl-C, while the first array is being recorded
        recorded.append(sorted(jobs))
    nodes = [launch.ArrayNode(name, {"timeout_min": 30}, {f"{name}-cell": print}, tmp_path, record) for name in ("first", "second")]
    with pytest.raises(KeyboardInterrupt):
        launch.submit_graph(nodes, "debug")
    assert recorded == [["first-cell"]]
