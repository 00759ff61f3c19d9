"""Live training curves (nli_grpo.trackers, `output.report_to`): the trackers' names, run id and
folders per cell; then for real on the CPU (the tiny model, real transformers callbacks,
TensorBoard and offline W&B): every optimizer step reaches a tracker once, also when a cell is
stopped by USR2 and rerun, or killed and replayed from its checkpoint; one W&B run per cell; no
credential in any file of the cell."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import struct
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from nli_grpo import results
from nli_grpo.config import ConfigError
from nli_grpo.job import EXIT_PREEMPTED, config_for_run, run
from nli_grpo.layout import COMPLETE_MARKER, CellFolder
from nli_grpo.trackers import WANDB_DIRNAME, report_args, tracker_env, wandb_sync_command

SECRET = "wandb-key-0123456789abcdef0123456789abcdef01234567"  # a WANDB_API_KEY the user has set
STEPS = 6
TRAIN = ["eval.after_training=false", f"grpo.max_steps={STEPS}", "grpo.completions_per_step=8"]


# --------------------------------------------------------------------------- names, run id, folders
def test_each_tracker_gets_the_cell_as_run_and_the_sweep_as_group(tmp_path):
    cell = tmp_path / "lora_rank" / "qwen__r8"
    cfg = config_for_run("smoke", ["output.sweep=lora_rank", "output.report_to=[tensorboard,wandb]"], str(cell))
    cell.mkdir(parents=True)
    env = tracker_env(cfg, environ={"HF_HUB_OFFLINE": "1", "WANDB_API_KEY": SECRET})
    run_id = (cell / WANDB_DIRNAME / "run_id").read_text().strip()
    assert env == {"TENSORBOARD_LOGGING_DIR": str(cell.resolve() / "tensorboard"), "WANDB_PROJECT": "nli_grpo",
                   "WANDB_RUN_GROUP": "lora_rank", "WANDB_NAME": cfg.output.cell_id, "WANDB_RUN_ID": run_id,
                   "WANDB_RESUME": "allow", "WANDB_DIR": str(cell.resolve()), "WANDB_MODE": "offline"}
    assert len(run_id) == 12 and SECRET not in json.dumps(env)  # credentials stay the user's
    # every attempt (and rank) continues the same run; another folder (a --force rerun) is another run
    assert tracker_env(cfg, environ={})["WANDB_RUN_ID"] == run_id and "WANDB_MODE" not in tracker_env(cfg, environ={})
    other = config_for_run("smoke", ["output.report_to=[wandb]"], str(tmp_path / "lora_rank" / "other"))
    assert tracker_env(other, environ={})["WANDB_RUN_ID"] != run_id
    # the mode: the config's, else the user's, else offline when the job runs offline; the project alike
    assert tracker_env(cfg, environ={"HF_HUB_OFFLINE": "1", "WANDB_MODE": "online"})["WANDB_MODE"] == "online"
    cfg.output.wandb_mode, cfg.output.wandb_project = "disabled", "nli"
    assert tracker_env(cfg, environ={"WANDB_MODE": "online", "WANDB_PROJECT": "x"})["WANDB_MODE"] == "disabled"
    assert tracker_env(cfg, environ={"WANDB_PROJECT": "x"})["WANDB_PROJECT"] == "nli"
    cfg.output.wandb_project = None
    assert tracker_env(cfg, environ={"WANDB_PROJECT": "x"})["WANDB_PROJECT"] == "x"
    assert report_args(cfg) == {"report_to": ["tensorboard", "wandb"], "run_name": cfg.output.cell_id, "project": "lora_rank"}

    none = config_for_run("smoke", [], str(tmp_path / "s" / "plain"))
    assert tracker_env(none, environ={"HF_HUB_OFFLINE": "1"}) == {} and report_args(none)["report_to"] == "none"
    assert not (tmp_path / "s" / "plain").exists()  # naming the trackers creates nothing for a cell without any


def test_trl_gets_the_trackers_run_name_and_project(tmp_path):
    from nli_grpo.training import trl_args

    cfg = config_for_run("smoke", ["output.report_to=[tensorboard,wandb]"], str(tmp_path / "smoke" / "c"))
    args = trl_args(cfg, tmp_path / "smoke" / "c" / "checkpoints")
    assert (args.report_to, args.run_name, args.project) == (["tensorboard", "wandb"], cfg.output.cell_id, "smoke")
    assert trl_args(config_for_run("smoke", [], str(tmp_path / "d")), tmp_path / "d").report_to == []
    if importlib.util.find_spec("trackio") is None:  # supported, not installed here (it pulls gradio)
        with pytest.raises(ConfigError, match=r"output.report_to has trackio, whose package is not installed: pip install trackio"):
            trl_args(config_for_run("smoke", ["output.report_to=[trackio]"], str(tmp_path / "e")), tmp_path / "e")


# --------------------------------------------------------------------------- reading the trackers back
def tensorboard_scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar event of every event file in `folder` (all attempts), as written: nothing
    purged or sampled away."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder), size_guidance={"scalars": 0}, purge_orphaned_data=False)
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def wandb_records(path: Path):
    """The records of a W&B transaction log (`run-<id>.wandb`): LevelDB's log format (a 7-byte
    header `:W&B` + magic + version, then records of crc32 / length / type in 32 KiB blocks), each
    a `Record` protobuf. wandb 0.31 ships no Python reader of it."""
    from wandb.proto.wandb_internal_pb2 import Record

    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B", path
    pos, chunk = 7, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 or pos + 7 + length > len(data):  # zeros: unwritten; short: torn by a kill
            break
        chunk = (b"" if kind in (1, 2) else chunk) + data[pos + 7:pos + 7 + length]  # FULL, FIRST | MIDDLE, LAST
        pos += 7 + length
        if kind in (1, 4):
            record = Record()
            record.ParseFromString(chunk)
            yield record


def wandb_runs(cell: Path) -> list[dict]:
    """Per offline W&B run folder of the cell (one per attempt), oldest first: its run record (None
    when nothing was written) and the optimizer steps (train/global_step) of its history rows that
    carry a training loss."""
    found = []
    for path in sorted((cell / WANDB_DIRNAME).glob("offline-run-*/*.wandb")):
        runs, steps = [], []
        for record in wandb_records(path):
            if record.HasField("run"):
                runs.append(record.run)
            elif record.HasField("history"):
                row = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
                if "train/loss" in row:
                    steps.append(int(row["train/global_step"]))
        found.append({"folder": path.parent.name, "run": runs[0] if runs else None, "steps": steps})
    return found


def files_holding(folder: Path, needle: str) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file() and not p.is_symlink() and needle.encode() in p.read_bytes()]


# --------------------------------------------------------------------------- for real
@pytest.mark.slow
def test_tensorboard_gets_every_optimizer_step_once_through_the_real_job(tmp_path, monkeypatch, rewards):
    monkeypatch.delenv("TENSORBOARD_LOGGING_DIR", raising=False)  # restored after the test: run() sets it here
    cfg = config_for_run("smoke", [*TRAIN, "output.report_to=[tensorboard]", "grpo.save_steps=100"], str(tmp_path / "smoke" / "c"))
    assert run(cfg, reward_funcs=[rewards.alternating]) == 0
    folder = CellFolder(cfg.output.dir)
    scalars = tensorboard_scalars(folder.tensorboard)
    logged = results.read_train_log(folder.train_log)
    assert [r["step"] for r in logged] == list(range(1, STEPS + 1))
    # every step's loss, KL and grad norm once, with the values of train_log.jsonl; the reward on the steps
    # that generated (num_iterations=2: every other step)
    for key in ("loss", "kl", "grad_norm", "learning_rate"):
        assert scalars[f"train/{key}"] == [(r["step"], pytest.approx(r[key], rel=1e-6, abs=1e-9)) for r in logged], key
    assert scalars["train/reward"] == [(r["step"], pytest.approx(r["reward"])) for r in logged if "reward" in r]
    assert [s for s, _ in scalars["train/reward"]] == [1, 3, 5]


def _train(out: Path, *overrides: str, env: dict) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "nli_grpo.train", "--config", "smoke", "--output-dir", str(out), *TRAIN, *overrides]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)


def _job_env(tmp_path: Path) -> dict:
    """The user's environment as a job sees it: offline (HF_HUB_OFFLINE=1, as sweep jobs run), a
    W&B key of theirs, nothing else of W&B's (their settings and caches kept out of the test's way)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_") and k != "TENSORBOARD_LOGGING_DIR"}
    home = tmp_path / "wandb-home"
    return {**env, "HF_HUB_OFFLINE": "1", "WANDB_API_KEY": SECRET, "WANDB_CONFIG_DIR": str(home / "config"),
            "WANDB_CACHE_DIR": str(home / "cache"), "WANDB_DATA_DIR": str(home / "data")}


def _steps_logged(out: Path) -> list[int]:
    return [r["step"] for r in results.read_jsonl(out / "train_log.jsonl")]


def _stop_with_usr2_then_rerun(out: Path, overrides: tuple, env: dict) -> int:
    """Train until 2 steps are logged, USR2 (saves, exits preempted), rerun to the end. The step it stopped at."""
    proc = _train(out, *overrides, env=env)
    deadline = time.time() + 240
    while len(_steps_logged(out)) < 2:
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read()[-3000:]
        time.sleep(0.1)
    proc.send_signal(signal.SIGUSR2)
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == EXIT_PREEMPTED, err[-4000:]
    stopped_at = results.read_result(out / "result.json")["train"]["steps_done"]
    assert 2 <= stopped_at < STEPS
    _, err = (proc := _train(out, *overrides, env=env)).communicate(timeout=300)
    assert proc.returncode == 0, err[-4000:]
    doc = results.read_result(out / "result.json")
    assert (doc["status"], doc["train"]["steps_done"], doc["slurm"]["attempts"]) == ("complete", STEPS, 2)
    return stopped_at


@pytest.mark.slow
def test_tensorboard_continues_the_same_curves_after_a_usr2_requeue(tmp_path):
    out = tmp_path / "smoke" / "cell"
    stopped_at = _stop_with_usr2_then_rerun(out, ("output.report_to=[tensorboard]", "grpo.save_steps=100"), _job_env(tmp_path))
    assert len(list((out / "tensorboard").glob("events.out.tfevents.*"))) == 2  # one file per attempt, one run
    scalars = tensorboard_scalars(out / "tensorboard")
    assert [s for s, _ in scalars["train/loss"]] == list(range(1, STEPS + 1))
    assert [s for s, _ in scalars["train/learning_rate"]] == list(range(1, STEPS + 1))
    generated = [r["step"] for r in results.read_train_log(out / "train_log.jsonl") if "reward" in r]
    assert [s for s, _ in scalars["train/reward"]] == generated and len(generated) >= STEPS // 2
    assert [s for s, _ in scalars["train/train_runtime"]] == [stopped_at, STEPS]  # each attempt's summary


@pytest.mark.slow
def test_offline_wandb_keeps_one_run_per_cell_across_a_usr2_requeue_and_no_key_on_disk(tmp_path):
    out = tmp_path / "smoke" / "cell"
    stopped_at = _stop_with_usr2_then_rerun(out, ("output.report_to=[wandb]", "grpo.save_steps=100"), _job_env(tmp_path))
    run_id = (out / WANDB_DIRNAME / "run_id").read_text().strip()
    attempts = wandb_runs(out)
    assert len(attempts) == 2  # offline: one folder per attempt, of the same run
    for attempt in attempts:
        assert attempt["folder"].endswith(f"-{run_id}")
        found = attempt["run"]
        assert (found.run_id, found.display_name, found.run_group, found.project) == (run_id, "tiny-sft__bf16__r8__s0", "smoke", "nli_grpo")
    assert attempts[0]["steps"] == list(range(1, stopped_at + 1))
    assert attempts[1]["steps"] == list(range(stopped_at + 1, STEPS + 1))
    assert wandb_sync_command(CellFolder(out)) == f"wandb sync {out / WANDB_DIRNAME}"
    assert results.read_result(out / "result.json")["config"]["output"]["report_to"] == ["wandb"]
    assert files_holding(out, SECRET) == [] and files_holding(out, "WANDB_API_KEY") == []


@pytest.mark.slow
def test_steps_replayed_after_a_kill_reach_the_trackers_once(tmp_path):
    out = tmp_path / "smoke" / "cell"
    env, overrides = _job_env(tmp_path), ("output.report_to=[tensorboard,wandb]", "grpo.save_steps=3")
    proc = _train(out, *overrides, env=env)
    deadline = time.time() + 240
    while not ((out / "checkpoints" / "checkpoint-3" / COMPLETE_MARKER).exists() and max(_steps_logged(out), default=0) >= 4):
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read()[-3000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)  # the OOM killer: nothing saved after the checkpoint
    proc.wait()
    killed_at = max(_steps_logged(out))
    _, err = (proc := _train(out, *overrides, env=env)).communicate(timeout=300)
    assert proc.returncode == 0, err[-4000:]
    doc = results.read_result(out / "result.json")
    resumed = doc["train"]["resumed_from_step"]
    assert resumed < killed_at < STEPS  # steps resumed+1 .. killed_at were trained (and logged) twice
    replayed = Counter(_steps_logged(out))
    assert {s for s, n in replayed.items() if n == 2} == set(range(resumed + 1, killed_at + 1))

    scalars = tensorboard_scalars(out / "tensorboard")
    assert [s for s, _ in scalars["train/loss"]] == list(range(1, STEPS + 1))  # TensorBoard writes each step at once
    # W&B: no step twice; the killed attempt's rows are W&B's to lose (its service writes the .wandb
    # file every 15 s and the kill takes it down too), the rerun's steps after the replay are all there
    steps = [s for attempt in wandb_runs(out) for s in attempt["steps"]]
    assert len(steps) == len(set(steps)) and set(range(killed_at + 1, STEPS + 1)) <= set(steps)
