"""`python -m nli_grpo.status`: cell states from the queue and the result files, and from the files
alone once the jobs have left the queue."""
from nli_grpo import manifest, slurm, status


class Job:
    def __init__(self, job_id):
        self.job_id = job_id


def test_status_from_result_files_alone_after_the_jobs_left_the_queue(tmp_path, capsys, monkeypatch, write_result):
    sweep_dir = tmp_path / "lora_rank"
    write_result(sweep_dir / "a", "complete", attempts=3)
    write_result(sweep_dir / "b", "preempted", steps=4, attempts=2)
    write_result(sweep_dir / "c", "running", steps=0)
    (sweep_dir / "b" / "checkpoints" / "checkpoint-6").mkdir(parents=True)
    (sweep_dir / "b" / "checkpoints" / "checkpoint-6" / "CHECKPOINT_COMPLETE").write_text("6\n")
    manifest.record_submission(sweep_dir, {"d": {}}, manifest.submission_record("slurm", sweep_dir, {"c": Job("8_2")}, retries=2))

    lines = {s.cell_id: s for s in status.sweep_status(sweep_dir, queue=lambda: {}, accounting=lambda ids: {})}
    assert [(lines[c].state, lines[c].attempts, lines[c].steps_done) for c in "abcd"] == [
        ("complete", 3, 12), ("preempted", 2, 6), ("failed", 1, 0), ("missing", None, None)]
    assert "left the queue while running" in lines["c"].detail
    assert "rerun the sweep" in lines["b"].detail
    # without Slurm to ask, the files alone decide
    assert {s.cell_id: s.state for s in status.sweep_status(sweep_dir, queue=None)}["c"] == "running"
    monkeypatch.setattr(slurm, "queued_jobs", lambda: {"8_2": "RUNNING"})
    monkeypatch.setattr(slurm, "accounting_states", lambda ids: {})
    assert status.main([str(sweep_dir)]) == 0
    out = capsys.readouterr().out
    assert "lora_rank: 4 cells: 1 running, 1 preempted, 1 complete, 1 missing" in out and "6/12" in out


def test_a_job_that_ended_badly_before_writing_a_result_is_failed(tmp_path):
    sweep_dir = tmp_path / "s"
    manifest.record_submission(sweep_dir, {"x": {}}, manifest.submission_record("slurm", sweep_dir, {"x": Job("12")}, retries=2))
    [line] = status.sweep_status(sweep_dir, queue=lambda: {}, accounting=lambda ids: {"12": "OUT_OF_MEMORY"})
    assert line.state == "failed" and "job 12 out_of_memory before writing a result" in line.detail


def test_a_cell_pending_on_a_failed_pool_merge_is_blocked_with_the_cause(tmp_path):
    from nli_grpo import launch
    from nli_grpo.job import config_for_run
    from nli_grpo.layout import PoolFolder
    from nli_grpo.results import atomic_write_json

    pool = PoolFolder(tmp_path / "bootstrap" / "p")
    atomic_write_json(pool.merge_state, {"status": "failed", "error": "chunk-00003.jsonl, line 2: not valid JSON"})
    sweep_dir = tmp_path / "s"
    cfg = config_for_run("smoke", ["data.train_source=anli_hard", f"data.files.anli_hard={pool.pool}"], str(sweep_dir / "x"))
    launch.write_config_snapshot(cfg, sweep_dir / "x")
    manifest.record_submission(sweep_dir, {"x": {}}, manifest.submission_record("slurm", sweep_dir, {"x": Job("31")}, retries=2))
    [line] = status.sweep_status(sweep_dir, queue=lambda: {"31": slurm.BLOCKED})
    assert (line.state, line.queued) == ("blocked", False)
    assert "its pool's merge failed (chunk-00003.jsonl, line 2: not valid JSON" in line.detail and "run the sweep again" in line.detail


def test_a_pool_folder_shows_its_shards_and_merge(tmp_path, capsys):
    from nli_grpo.layout import PoolFolder
    from nli_grpo.pool import Pool, write_spec
    from nli_grpo.results import atomic_write_json

    pool = Pool(base="tiny", quantization="bf16", recipe="smoke", shards=2)
    folder = PoolFolder(tmp_path / "bootstrap" / pool.pool_id)
    write_spec(pool, folder)
    manifest.record_submission(folder.path, {"shard-00-of-02": {}, "shard-01-of-02": {}, "merge": {}},
                               manifest.submission_record("local", folder.path, {}, retries=2))
    atomic_write_json(folder.shard_state(0, 2), {"status": "complete", "chunks": [], "done": 3, "total": 3})
    atomic_write_json(folder.shard_state(1, 2), {"status": "preempted", "chunks": [1], "done": 1, "total": 3})
    assert status.main([str(tmp_path / "bootstrap")]) == 0
    out = capsys.readouterr().out
    assert "shard-00-of-02" in out and "complete" in out and "preempted" in out and "1/3 chunks" in out and "merge" in out
