"""`python -m nli_grpo.prepare`: the datasets' original files ingested into the cache (the lock
records each), read back by every job without a local folder; a broken file replaces nothing; the
hub path run for real up to the network, which this machine does not reach."""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from nli_grpo import cache, prepare
from nli_grpo.data import BENCHMARK_NAMES, TRAIN_SOURCES, fingerprint, load_benchmark, load_train_source

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def empty_cache(tmp_path, monkeypatch):
    """A cache of this test's own (nothing prepared yet)."""
    monkeypatch.setenv("NLI_GRPO_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_ingested_originals_serve_every_set_from_the_cache_as_the_files_themselves_do(empty_cache, original_files, capsys):
    assert prepare.main(["--from", str(original_files)]) == 0
    assert "prepared 11 source(s)" in capsys.readouterr().out
    lock = cache.read_lock()
    snli = lock["data"]["snli"]
    assert snli["source"] == "file" and snli["file"].endswith("snli_1.0/snli_1.0_test.jsonl")
    assert (snli["rows"], snli["dropped_no_gold"]) == (4, 1)
    assert snli["sha256"] == hashlib.sha256((cache.data_dir() / "snli.jsonl").read_bytes()).hexdigest()
    for name in BENCHMARK_NAMES:  # no local_dir: the prepared cache
        from_cache = load_benchmark(name, hub=False)
        from_files = load_benchmark(name, local_dir=original_files, hub=False)
        assert from_cache.source == str(cache.data_dir() / f"{from_cache.spec.stem}.jsonl")
        assert fingerprint(from_cache.dataset) == fingerprint(from_files.dataset), name
        assert from_cache.dataset["id"] == from_files.dataset["id"] and from_cache.n_dropped == from_files.n_dropped
    for name in (n for n in TRAIN_SOURCES if n != "anli_hard"):
        assert load_train_source(name, hub=False).dataset["label"] == [0, 1, 2]


def test_the_lock_records_every_ingested_source(empty_cache, original_files):
    prepare.main(["--from", str(original_files)])
    assert sorted(cache.read_lock()["data"]) == ["anli_r1", "anli_r2", "anli_r3", "anli_train_r1", "anli_train_r2",
                                                 "anli_train_r3", "counter_nli", "glue_diagnostics", "hans", "mnli_mm", "snli"]
    assert cache.read_lock()["data"]["hans"]["rows"] == 5


def test_a_broken_file_is_reported_with_its_line_and_replaces_nothing(empty_cache, original_files, capsys):
    assert prepare.main(["--from", str(original_files)]) == 0
    prepared = (cache.data_dir() / "snli.jsonl").read_bytes()
    source = original_files / "snli_1.0" / "snli_1.0_test.jsonl"
    source.write_text(source.read_text()[:-40])  # a copy cut short
    capsys.readouterr()
    assert prepare.main(["--from", str(original_files)]) == 1
    assert "snli_1.0_test.jsonl, line 4: not valid JSON" in capsys.readouterr().err
    assert (cache.data_dir() / "snli.jsonl").read_bytes() == prepared
    assert not [p for p in cache.data_dir().iterdir() if p.name.startswith(".")]  # no temporary left


def test_a_sweep_needs_its_models_and_every_dataset(load_sweep):
    from nli_grpo.sweep import parse_args, plan

    sweep = load_sweep("lora_rank")
    cfgs = [c.cfg for c in plan(sweep, parse_args(sweep, ["--ranks", "8,64"]))]
    assert prepare.needed_models(cfgs) == [("Qwen/Qwen2.5-7B-Instruct", None), ("Qwen/Qwen2.5-7B-Instruct-AWQ", None)]
    assert sorted(prepare.needed_stems(cfgs)) == sorted([
        "anli_r1", "anli_r2", "anli_r3", "snli", "mnli_mm", "hans", "counter_nli", "glue_diagnostics",
        "anli_train_r1", "anli_train_r2", "anli_train_r3"])  # the pool's raw material
    smoke = [c.cfg for c in plan(sweep, parse_args(sweep, ["--smoke"]))]
    assert prepare.needed_models(smoke) == [] and prepare.needed_stems(smoke) == []  # the shipped samples


def test_the_hub_path_runs_for_real_up_to_the_network(tmp_path):
    """No network here: the real download code (datasets, huggingface_hub) is called and fails at
    the boundary; every failure is reported, nothing half-written is left, and the rerun hint is given."""
    env = {**os.environ, "NLI_GRPO_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    env.pop("HF_HUB_CACHE", None)
    done = subprocess.run([sys.executable, "-m", "nli_grpo.prepare", "--config", "paper", "eval.benchmarks=[anli_r1,hans_subsequence]"],
                          capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "0 input(s) already prepared, 6 to download" in done.stdout  # anli_r1, hans, the 3 train rounds, the model
    for item in ("anli_r1:", "hans:", "anli_train_r1:", "Qwen/Qwen2.5-7B-Instruct-AWQ:"):
        assert f"error: {item}" in done.stderr, item
    assert "rerun the same command" in done.stderr and "--from DIR" in done.stderr
    lock = tmp_path / "cache" / cache.LOCK_FILENAME
    assert not lock.exists() or json.loads(lock.read_text()) == {"data": {}, "models": {}}
    assert not list((tmp_path / "cache").rglob("*.jsonl"))


def test_cache_flag_and_folders(tmp_path, original_files, monkeypatch):
    monkeypatch.delenv("NLI_GRPO_CACHE", raising=False)
    target = tmp_path / "shared" / "nli"
    assert prepare.main(["--from", str(original_files), "--cache", str(target)]) == 0
    assert (target / "data" / "hans.jsonl").is_file() and (target / cache.LOCK_FILENAME).is_file()
    assert prepare.main(["--from", str(tmp_path / "nope")]) == 2
