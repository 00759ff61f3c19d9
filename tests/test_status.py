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
