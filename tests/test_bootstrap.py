"""The hard-example pool: the selection rule, the real command on the tiny model, shards that stop
and resume to the same pool, and a merge that refuses incomplete work."""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nli_grpo.bootstrap import hard_items, main, sampled
from nli_grpo.data import fingerprint, load_train_source
from nli_grpo.job import EXIT_PREEMPTED
from nli_grpo.layout import PoolFolder

ROWS = [{"uid": "a", "label": 0}, {"uid": "b", "label": 2}, {"uid": "c", "label": 1}]
ENT, NEU, CON = ("<think>x</think><answer>entailment</answer>", "<answer>neutral</answer>", "<answer>contradiction</answer>")


def test_keeps_items_the_model_mostly_gets_wrong():
    completions = [[ENT, ENT, ENT, NEU], [ENT, NEU, CON, "no answer"], [NEU, NEU, CON, CON]]
    records = sampled(ROWS, completions)
    assert [(r["uid"], r["bootstrap_accuracy"], r["bootstrap_samples"]) for r in records] == [
        ("a", 0.75, 4), ("b", 0.25, 4), ("c", 0.5, 4)]
    assert [r["uid"] for r in hard_items(records, below=0.5)] == ["b"]
    assert [r["uid"] for r in hard_items(records, below=0.6)] == ["b", "c"]


POOL = ["--base", "tiny", "--rounds", "anli_train_r1,anli_train_r2", "--limit", "5", "--samples", "2", "--below", "1.0",
        "--chunk-items", "2", "--config", "smoke", "--backend", "hf", "grpo.max_completion_length=8"]


def pool_sha(folder: Path) -> str:
    return json.loads((folder / "pool.json").read_text())["sha256"]


@pytest.mark.slow
def test_command_writes_a_pool_that_training_can_read(tmp_path):
    folder = tmp_path / "pool"
    assert main([*POOL, "--pool-dir", str(folder)]) == 0
    pool = load_train_source("anli_hard", files={"anli_hard": folder / "anli_hard.jsonl"}, hub=False).dataset
    # A random tiny model answers nothing correctly: every item is hard.
    assert len(pool) == 10 and set(pool["label"]) <= {0, 1, 2} and len(set(pool["id"])) == 10
    record = json.loads((folder / "pool.json").read_text())
    assert (record["items"], record["hard_items"], record["chunks"], record["base"]) == (10, 10, 5, "tiny")
    assert record["fingerprint"] == fingerprint(pool) and record["sha256"] == hashlib.sha256((folder / "anli_hard.jsonl").read_bytes()).hexdigest()
    # A rerun samples nothing again and writes the same pool; other settings in the same folder are refused.
    before = (folder / "anli_hard.jsonl").read_text()
    assert main([*POOL, "--pool-dir", str(folder)]) == 0 and (folder / "anli_hard.jsonl").read_text() == before
    assert main([*POOL, "--pool-dir", str(folder), "--seed", "1"]) == 2


@pytest.mark.slow
def test_a_shard_stopped_by_usr2_resumes_and_the_pool_is_the_one_an_uninterrupted_run_makes(tmp_path):
    """Chunk by chunk seeds: the same pool whatever the stops, restarts or number of shards."""
    # 20 chunks of 2 items, long enough completions that USR2 lands while the shard samples
    settings = ["--base", "tiny", "--rounds", "anli_train_r1", "--limit", "40", "--samples", "2", "--below", "1.0",
                "--chunk-items", "2", "--config", "smoke", "--backend", "hf", "grpo.max_completion_length=32"]
    whole = tmp_path / "whole"
    assert main([*settings, "--pool-dir", str(whole)]) == 0

    from nli_grpo.pool import Pool, write_spec

    spec = json.loads((whole / "pool_spec.json").read_text())
    folder = PoolFolder(tmp_path / "sharded")
    write_spec(Pool(**{k: tuple(v) if isinstance(v, list) else v for k, v in spec.items()}, shards=2), folder)
    assert json.loads(folder.spec.read_text()) == spec
    shard = [sys.executable, "-m", "nli_grpo.bootstrap", "--pool-dir", str(folder.path), "--shard"]
    proc = subprocess.Popen([*shard, "0/2"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while not folder.chunk(0).is_file():
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read()[-3000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGUSR2)
    assert proc.wait(timeout=240) == EXIT_PREEMPTED, proc.stderr.read()[-3000:]
    state = json.loads(folder.shard_state(0, 2).read_text())
    assert state["status"] == "preempted" and 1 <= state["done"] < state["total"] == 10  # chunks 0, 2, ... 18 of 20
    for index in ("0/2", "1/2", "0/2"):  # the resumed shard; the other; the finished one again: nothing to do
        assert subprocess.run([*shard, index], capture_output=True, timeout=240).returncode == 0
    assert json.loads(folder.shard_state(0, 2).read_text())["attempts"] == 3
    assert main(["--pool-dir", str(folder.path), "--merge"]) == 0
    assert pool_sha(folder.path) == pool_sha(whole)
    assert folder.pool.read_bytes() == (whole / "anli_hard.jsonl").read_bytes()


def test_the_merge_refuses_missing_or_damaged_work(tmp_path, capsys):
    from nli_grpo.pool import Pool, write_spec

    folder = PoolFolder(tmp_path / "pool")
    write_spec(Pool(base="tiny", quantization="bf16", samples=2, below=1.0, rounds=("anli_train_r2",), recipe="smoke",
                    chunk_items=4), folder)
    assert main(["--pool-dir", str(folder.path), "--merge"]) == 1
    assert "2 of 2 chunks not sampled (first: " in capsys.readouterr().err and not folder.pool.exists()
    assert json.loads(folder.merge_state.read_text())["status"] == "failed"
    rows = [{"uid": f"u{i}", "premise": "P", "hypothesis": "H", "label": 0, "round": "anli_train_r2",
             "bootstrap_accuracy": 0.0, "bootstrap_samples": 2} for i in range(6)]
    folder.chunk(0).parent.mkdir(parents=True)
    folder.chunk(0).write_text("".join(json.dumps(r) + "\n" for r in rows[:4]))
    folder.chunk(1).write_text(json.dumps(rows[4]) + "\n" + json.dumps(rows[5])[:20])  # cut short
    assert main(["--pool-dir", str(folder.path), "--merge"]) == 1
    error = capsys.readouterr().err
    assert "chunk-00001.jsonl, line 2: not valid JSON" in error and "delete that chunk file and rerun" in error
    assert not folder.complete()
