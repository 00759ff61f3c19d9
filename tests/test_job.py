"""The cell job (nli_grpo.job) for real on the CPU through `python -m nli_grpo.train`: the tiny
Qwen2, real TRL/PEFT, the shipped sample data. Resume after SIGKILL and USR2, the rule that
refuses a run folder holding other settings, stages that are never redone."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nli_grpo import results
from nli_grpo.data import BENCHMARK_NAMES
from nli_grpo.job import EXIT_PREEMPTED
from nli_grpo.layout import COMPLETE_MARKER, TRAIN_LOG_FILENAME

#: The smoke recipe at the size of a mechanics test (the recipe's own 40 steps of 32 completions are
#: sized to show learning: tests/test_smoke_learns.py).
QUICK = ("grpo.max_steps=12", "grpo.completions_per_step=8")


def _job(out: Path, *overrides: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "nli_grpo.train", "--config", "smoke", f"output.dir={out}", *QUICK, *overrides]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _wait_for_checkpoint(out: Path, proc: subprocess.Popen, min_step: int, timeout: float = 240) -> int:
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, f"job ended early: {proc.stderr.read()[-3000:]}"
        done = [int(p.parent.name.split("-")[1]) for p in (out / "checkpoints").glob(f"checkpoint-*/{COMPLETE_MARKER}")]
        if done and max(done) >= min_step:
            return max(done)
        time.sleep(0.2)
    raise AssertionError(f"no complete checkpoint >= {min_step} within {timeout}s")


@pytest.mark.slow
def test_smoke_recipe_trains_and_evaluates_all_13_sets(tmp_path):
    out = tmp_path / "smoke"
    proc = subprocess.run([sys.executable, "-m", "nli_grpo.train", "--config", "smoke", "--output-dir", str(out), *QUICK],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    doc = results.read_result(out / "result.json")
    assert doc["status"] == "complete" and doc["stages_done"] == ["train", "eval"]
    assert doc["train"]["steps_done"] == doc["config"]["grpo"]["max_steps"] == 12
    assert doc["cell"] == {"model": "tiny-sft", "quantization": "bf16", "lora_rank": 8, "seed": 0, "stage": "grpo", "rollout": "hf"}
    assert doc["config"]["grpo"]["beta"] == 0.01 and doc["versions"]["trl"]
    assert {k: doc["model"][k] for k in ("dtype", "bf16", "fp16")} == {"dtype": "float32", "bf16": False, "fp16": False}
    assert doc["train"]["tokens_per_s"] > 0 and doc["train"]["peak_memory_gb"] > 0
    assert sorted(doc["eval"]) == sorted(BENCHMARK_NAMES)
    # what every number was computed on: the evaluated rows (eval.limit 8) and the training pool
    assert doc["eval"]["snli"]["fingerprint"]["rows"] == doc["eval"]["snli"]["n"] == 8
    assert len(doc["eval"]["snli"]["fingerprint"]["sha256"]) == 64
    assert doc["train"]["data"]["fingerprint"]["rows"] == 48 and doc["train"]["data"]["source"] == "anli_train_r1"
    assert doc["model"]["revision"] is None and doc["model"]["random_weights"] is False  # a warm-started stand-in: no hub commit
    assert all(len(results.read_jsonl(out / "train_log.jsonl")) > 0 for _ in [0])
    assert (out / "adapter" / "adapter_config.json").is_file()
    assert (out / "predictions" / "hans_subsequence.jsonl.gz").is_file()


@pytest.mark.slow
def test_sigkill_mid_run_resumes_from_last_complete_checkpoint(tmp_path):
    out = tmp_path / "run"
    overrides = ("grpo.save_steps=2", "eval.after_training=false")
    proc = _job(out, *overrides)
    reached = _wait_for_checkpoint(out, proc, min_step=4)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    # What a save killed half-way leaves behind: a newer folder without the completion marker.
    torn = out / "checkpoints" / f"checkpoint-{reached + 1}"
    torn.mkdir(exist_ok=True)
    (torn / "adapter_model.safetensors").write_bytes(b"\0" * 10)
    assert results.read_result(out / "result.json")["status"] == "running"

    proc = _job(out, *overrides)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-4000:]
    doc = results.read_result(out / "result.json")
    assert doc["status"] == "complete"
    assert doc["train"]["steps_done"] == 12
    assert doc["train"]["resumed_from_step"] >= reached >= 4
    assert doc["slurm"]["attempts"] == 2
    assert not torn.exists()


@pytest.mark.slow
def test_usr2_checkpoints_exits_preempted_and_the_rerun_completes(tmp_path):
    out = tmp_path / "run"
    overrides = ("grpo.save_steps=100", "eval.after_training=false")
    proc = _job(out, *overrides)
    deadline = time.time() + 240
    while not results.read_jsonl(out / TRAIN_LOG_FILENAME):  # training has started
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read()[-3000:]
        time.sleep(0.2)
    proc.send_signal(signal.SIGUSR2)
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == EXIT_PREEMPTED, err[-4000:]
    doc = results.read_result(out / "result.json")
    assert doc["status"] == "preempted"
    stopped_at = doc["train"]["steps_done"]
    assert 0 < stopped_at < 12
    # The signal forced a save although save_steps is 100.
    assert (out / "checkpoints" / f"checkpoint-{stopped_at}" / COMPLETE_MARKER).exists()

    proc = _job(out, *overrides)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-4000:]
    doc = results.read_result(out / "result.json")
    assert doc["status"] == "complete"
    assert doc["train"]["steps_done"] == 12 and doc["train"]["resumed_from_step"] == stopped_at


def _cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nli_grpo.train", *args], capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_a_rerun_with_other_settings_is_refused_and_force_moves_the_old_run_aside(tmp_path):
    out = tmp_path / "run"
    # overrides on both sides of the options (argparse's intermixed parsing)
    first = _cli("--config", "smoke", "grpo.max_steps=4", "--output-dir", str(out), "eval.after_training=false")
    assert first.returncode == 0, first.stderr[-3000:]
    adapter = (out / "adapter" / "adapter_model.safetensors").read_bytes()

    other = _cli("--config", "smoke", "grpo.max_steps=4", "eval.after_training=false", "grpo.learning_rate=0.5",
                 "grpo.beta=0.2", "--output-dir", str(out))
    assert other.returncode == 2, other.stderr[-3000:]
    assert "other settings (grpo)" in other.stderr and "--force" in other.stderr
    doc = results.read_result(out / "result.json")  # untouched: the old settings, the old adapter
    assert doc["config"]["grpo"]["learning_rate"] == 1e-3 and doc["slurm"]["attempts"] == 1  # the recipe's
    assert (out / "adapter" / "adapter_model.safetensors").read_bytes() == adapter

    same = _cli("--config", "smoke", "grpo.max_steps=4", "eval.after_training=false", "--output-dir", str(out))
    assert same.returncode == 0 and results.read_result(out / "result.json")["slurm"]["attempts"] == 2

    forced = _cli("--config", "smoke", "grpo.max_steps=4", "eval.after_training=false", "grpo.learning_rate=0.5",
                  "grpo.beta=0.2", "--output-dir", str(out), "--force")
    assert forced.returncode == 0, forced.stderr[-3000:]
    doc = results.read_result(out / "result.json")
    assert doc["config"]["grpo"]["learning_rate"] == 0.5 and doc["slurm"]["attempts"] == 1
    assert doc["train"]["steps_done"] == 4 and doc["train"]["resumed_from_step"] == 0
    (old,) = (tmp_path / ".replaced").iterdir()
    assert (old / "adapter" / "adapter_model.safetensors").read_bytes() == adapter
    assert results.read_result(old / "result.json")["config"]["grpo"]["learning_rate"] == 1e-3


def test_which_settings_conflict_with_the_work_in_a_run_folder(tmp_path):
    from nli_grpo.config import load_config
    from nli_grpo.job import RunRecord, config_for_run, conflicting_inputs

    cfg = config_for_run("smoke", [], str(tmp_path / "run"))
    assert conflicting_inputs(tmp_path / "run", cfg.to_dict()) == []  # nothing there yet
    RunRecord(cfg).update()
    assert conflicting_inputs(tmp_path / "run", load_config("smoke", ["grpo.beta=0.5"]).to_dict()) == []  # no work done
    (tmp_path / "run" / "checkpoints" / "checkpoint-4").mkdir(parents=True)
    assert conflicting_inputs(tmp_path / "run", load_config("smoke", ["grpo.beta=0.5"]).to_dict()) == ["grpo"]
    # evaluation settings only matter once a set was evaluated; time and memory never do
    assert conflicting_inputs(tmp_path / "run", load_config("smoke", ["eval.limit=3", "resources.mem_gb=99"]).to_dict()) == []
    record = RunRecord(cfg)
    record.update(eval={"anli_r1": {"accuracy": 0.5, "accuracy_strict": 0.5, "unparseable_rate": 0.0, "n": 2}})
    assert conflicting_inputs(tmp_path / "run", load_config("smoke", ["eval.limit=3"]).to_dict()) == ["eval"]
    assert conflicting_inputs(tmp_path / "run", cfg.to_dict(), adapter="/elsewhere/adapter") == []  # none recorded yet
    record.update(adapter="/some/adapter")
    assert conflicting_inputs(tmp_path / "run", cfg.to_dict(), adapter="/elsewhere/adapter") == ["adapter"]


@pytest.mark.slow
def test_a_checkpoint_at_max_steps_takes_no_step_on_restart(tmp_path):
    """The job saved its last checkpoint and died before recording the stage: the restart
    finishes the stage from that checkpoint without training a step more."""
    out = tmp_path / "run"
    proc = _cli("--config", "smoke", "grpo.max_steps=4", "grpo.save_steps=2", "eval.after_training=false", "--output-dir", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = results.read_result(out / "result.json")
    doc.update(status="running", stages_done=[], train=None)  # as if killed right after the save
    results.atomic_write_json(out / "result.json", doc)
    shutil.rmtree(out / "adapter")
    log_lines = len(results.read_jsonl(out / TRAIN_LOG_FILENAME))

    proc = _cli("--config", "smoke", "grpo.max_steps=4", "grpo.save_steps=2", "eval.after_training=false", "--output-dir", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = results.read_result(out / "result.json")
    assert doc["status"] == "complete" and doc["train"]["steps_done"] == 4 and doc["train"]["resumed_from_step"] == 4
    assert sorted(p.name for p in (out / "checkpoints").glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    assert len(results.read_jsonl(out / TRAIN_LOG_FILENAME)) == log_lines  # no step logged again
    assert (out / "adapter" / "adapter_model.safetensors").read_bytes() == \
        (out / "checkpoints" / "checkpoint-4" / "adapter_model.safetensors").read_bytes()
    assert (out / "adapter" / "tokenizer.json").is_file() and not (out / "adapter" / "optimizer.pt").exists()


@pytest.mark.slow
def test_a_step_that_fails_after_a_stop_signal_is_a_preemption_and_the_rerun_completes(tmp_path):
    """Slurm's SIGTERM (requeue, preemption) reaches every process of the job: a vLLM server
    beside the training stops with it and the step in flight fails. The cell is preempted, not
    failed, and the rerun resumes from its last complete checkpoint."""
    import os

    from nli_grpo.job import config_for_run, run

    calls = []

    def server_stopped_by_the_same_sigterm(completions, **_):
        calls.append(len(completions))
        if len(calls) == 6:
            os.kill(os.getpid(), signal.SIGTERM)
            raise RuntimeError("http://127.0.0.1:8000/v1/completions: HTTP 500: EngineCore encountered an issue")
        return [float(i % 2) for i in range(len(completions))]

    out = tmp_path / "run"
    cfg = config_for_run("smoke", ["grpo.max_steps=10", "grpo.save_steps=2", "grpo.num_iterations=1",
                                   "eval.after_training=false"], str(out))
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR2)}
    try:
        assert run(cfg, reward_funcs=[server_stopped_by_the_same_sigterm]) == EXIT_PREEMPTED
        doc = results.read_result(out / "result.json")
        assert doc["status"] == "preempted" and doc["error"] is None
        saved = max(int(p.name.split("-")[1]) for p in (out / "checkpoints").glob("checkpoint-*"))
        assert run(cfg, reward_funcs=[lambda completions, **_: [float(i % 2) for i in range(len(completions))]]) == 0
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    doc = results.read_result(out / "result.json")
    assert doc["status"] == "complete" and doc["train"]["steps_done"] == 10 and doc["train"]["resumed_from_step"] == saved > 0


@pytest.fixture
def tiny_file_system(tmp_path):
    """A real file system too small for a smoke checkpoint: a 400 KB tmpfs (mounting needs root,
    as CI runs; a checkpoint of the tiny model takes about 550 KB)."""
    import os

    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (CI runs as root)")
    folder = tmp_path / "full"
    folder.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=400k", "tmpfs", str(folder)], check=True)
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=True)


def test_a_full_disk_fails_the_cell_with_the_path_and_is_no_preemption(tiny_file_system, caplog):
    """A checkpoint that does not fit (here the save after USR2, which used to count as a
    preemption and be requeued forever) ends the cell as failed: result.json and the job log
    name what could not be written and why; the half-written checkpoint is removed."""
    import os

    from nli_grpo.job import config_for_run, run

    def stop_after_the_first_step(completions, **_):
        os.kill(os.getpid(), signal.SIGUSR2)
        return [float(i % 2) for i in range(len(completions))]

    out = tiny_file_system / "run"
    cfg = config_for_run("smoke", ["grpo.max_steps=2", "grpo.completions_per_step=4", "grpo.num_iterations=1",
                                   "grpo.max_completion_length=8", "grpo.save_steps=100", "eval.after_training=false"], str(out))
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR2)}
    try:
        code = run(cfg, reward_funcs=[stop_after_the_first_step])
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    assert code not in (0, EXIT_PREEMPTED)
    doc = results.read_result(out / "result.json")
    assert doc["status"] == "failed" and "No space left on device" in doc["error"] and "MiB free" in doc["error"]
    assert doc["failure"]["write_failed"].startswith(str(out / "checkpoints" / "checkpoint-1"))
    assert "rerun the same command" in doc["error"]
    assert not list((out / "checkpoints").glob("checkpoint-*"))  # nothing half-written is left to resume from
    assert any(r.levelname == "ERROR" and str(out / "checkpoints" / "checkpoint-1") in r.getMessage() for r in caplog.records)


def test_each_attempt_keeps_its_inputs_and_a_resume_on_other_data_or_weights_is_refused(tmp_path):
    """Re-preparing the cache under the same settings (another pool, another model commit) must
    not let a resumed cell mix two experiments: every attempt records its model revision and
    training-data fingerprint, and a resume whose inputs differ from the first attempt's is
    refused as changed settings are."""
    import os

    from nli_grpo.data import samples_dir
    from nli_grpo.job import RunConflict, config_for_run, run

    def stop_after_the_first_step(completions, **_):
        os.kill(os.getpid(), signal.SIGUSR2)
        return [float(i % 2) for i in range(len(completions))]

    data = tmp_path / "data"
    data.mkdir()
    pool = data / "anli_train_r1.jsonl"
    shutil.copy(samples_dir() / "anli_train_r1.jsonl", pool)
    out = tmp_path / "run"
    cfg = config_for_run("smoke", ["grpo.max_steps=2", "grpo.completions_per_step=4", "grpo.num_iterations=1",
                                   "grpo.max_completion_length=8", "grpo.save_steps=100", "eval.after_training=false",
                                   f"data.local_dir={data}"], str(out))
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR2)}
    try:
        assert run(cfg, reward_funcs=[stop_after_the_first_step]) == EXIT_PREEMPTED
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    [first] = results.read_result(out / "result.json")["attempts"]
    assert first["attempt"] == 1 and first["train_data"]["rows"] == 48 and len(first["train_data"]["sha256"]) == 64
    assert set(first["model"]) >= {"path", "revision"}

    pool.write_text("".join(pool.read_text().splitlines(keepends=True)[:-1]))  # the pool prepared again: a row less
    with pytest.raises(RunConflict, match=r"other settings \(training data\)"):
        run(cfg)
    doc = results.read_result(out / "result.json")
    assert doc["status"] == "preempted" and len(doc["attempts"]) == 1  # refused before anything was written

    shutil.copy(samples_dir() / "anli_train_r1.jsonl", pool)
    doc["attempts"][0]["model"]["revision"] = "0123abc"  # as if the first attempt ran on another commit
    results.atomic_write_json(out / "result.json", doc)
    with pytest.raises(RunConflict, match=r"other settings \(model revision\)"):
        run(cfg)
