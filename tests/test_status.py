"""`python -m nli_grpo.status`: cell states from the queue and the result files, and from the files
alone once the jobs have left the queue."""
import json

import pytest

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

    lines = {s.cell_id: s for s in status.sweep_status(sweep_dir, queue=lambda ids: {}, accounting=lambda ids: {})}
    assert [(lines[c].state, lines[c].attempts, lines[c].steps_done) for c in "abcd"] == [
        ("complete", 3, 12), ("preempted", 2, 6), ("failed", 1, 0), ("missing", None, None)]
    assert "left the queue while running" in lines["c"].detail
    assert "rerun the sweep" in lines["b"].detail
    # without Slurm to ask, the files alone decide
    assert {s.cell_id: s.state for s in status.sweep_status(sweep_dir, queue=None)}["c"] == "running"
    monkeypatch.setattr(slurm, "queued_jobs", lambda ids: {"8_2": "RUNNING"})
    monkeypatch.setattr(slurm, "accounting_states", lambda ids: {})
    assert status.main([str(sweep_dir)]) == 0
    out = capsys.readouterr().out
    assert "lora_rank: 4 cells: 1 running, 1 preempted, 1 complete, 1 missing" in out and "6/12" in out


def test_a_job_that_ended_badly_before_writing_a_result_is_failed(tmp_path):
    sweep_dir = tmp_path / "s"
    manifest.record_submission(sweep_dir, {"x": {}}, manifest.submission_record("slurm", sweep_dir, {"x": Job("12")}, retries=2))
    [line] = status.sweep_status(sweep_dir, queue=lambda ids: {}, accounting=lambda ids: {"12": "OUT_OF_MEMORY"})
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
    [line] = status.sweep_status(sweep_dir, queue=lambda ids: {"31": slurm.BLOCKED})
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


# --------------------------------------------------------------------------- progress: reward, KL, time left, W&B sync
def _train_log(run_dir, rows):
    from nli_grpo import results

    for row in rows:
        results.append_jsonl(run_dir / "train_log.jsonl", row)


def _max_steps(run_dir, max_steps):
    from nli_grpo import results

    doc = results.read_result(run_dir / "result.json")
    doc["config"]["grpo"]["max_steps"] = max_steps
    results.atomic_write_json(run_dir / "result.json", doc)


def test_running_and_preempted_cells_show_recent_reward_kl_and_time_left(tmp_path, capsys, write_result):
    sweep_dir = tmp_path / "s"
    # r: attempt 1 logged steps 1..20 at 10 s/step, was killed; attempt 2 resumed from checkpoint 16,
    # replays 17..20 and goes on to 30 at 3 s/step. The last attempt's line of a replayed step counts.
    write_result(sweep_dir / "r", "running", steps=16, attempts=2)
    _max_steps(sweep_dir / "r", 100)
    _train_log(sweep_dir / "r", [{"step": s, "attempt": 1, "time": 1000.0 + 10 * s, "loss": 0.0, "kl": 1.0,
                                  **({"reward": 5.0} if s % 2 == 0 else {})} for s in range(1, 21)])
    _train_log(sweep_dir / "r", [{"step": s, "attempt": 2, "time": 5000.0 + 3 * (s - 17), "loss": 0.0, "kl": s / 1000,
                                  "reward": s / 100} for s in range(17, 31)])
    # p: preempted after step 8 (5 s/step) with step 6 saved: it resumes from 6
    write_result(sweep_dir / "p", "preempted", steps=6, attempts=1)
    _max_steps(sweep_dir / "p", 100)
    _train_log(sweep_dir / "p", [{"step": s, "attempt": 1, "time": 2000.0 + 5 * s, "loss": 0.0, "kl": 0.05, "reward": 0.5}
                                 for s in range(1, 9)])
    # n: running, one line of its attempt so far: no rate yet
    write_result(sweep_dir / "n", "running", steps=0)
    _train_log(sweep_dir / "n", [{"step": 1, "attempt": 1, "time": 3000.0, "loss": 0.0, "kl": 0.5, "reward": 1.0}])
    # c: complete, with offline W&B runs not uploaded (two attempts); u: its offline run was uploaded
    write_result(sweep_dir / "c", "complete")
    for stamp in ("20261201_100000", "20261201_120000"):
        run = sweep_dir / "c" / "wandb" / f"offline-run-{stamp}-abc123"
        run.mkdir(parents=True)
        (run / "run-abc123.wandb").write_bytes(b":W&B")
    write_result(sweep_dir / "u", "complete")
    run = sweep_dir / "u" / "wandb" / "offline-run-20261201_100000-def456"
    run.mkdir(parents=True)
    (run / "run-def456.wandb").write_bytes(b":W&B")
    (run / "run-def456.wandb.synced").write_bytes(b"")

    lines = {s.cell_id: s for s in status.sweep_status(sweep_dir, queue=None)}
    r, p, n = lines["r"], lines["p"], lines["n"]
    assert (r.state, r.steps_done, r.max_steps) == ("running", 30, 100)  # the log is ahead of the checkpoint
    assert r.reward == pytest.approx(sum(s / 100 for s in range(21, 31)) / 10)  # the last 10 steps: 21..30
    assert r.kl == pytest.approx(sum(s / 1000 for s in range(21, 31)) / 10)
    assert r.seconds_per_step == pytest.approx(3.0) and r.time_left_s == pytest.approx(70 * 3.0)
    assert (p.state, p.steps_done, p.reward, p.kl) == ("preempted", 6, 0.5, pytest.approx(0.05))
    assert p.seconds_per_step == pytest.approx(5.0) and p.time_left_s == pytest.approx(94 * 5.0)
    assert (n.reward, n.kl, n.seconds_per_step, n.time_left_s) == (1.0, 0.5, None, None)
    assert lines["c"].reward is None and lines["c"].time_left_s is None  # only running / preempted cells
    assert lines["c"].wandb_sync == f"wandb sync {sweep_dir / 'c' / 'wandb'}"
    assert lines["u"].wandb_sync is None and r.wandb_sync is None

    assert status.main([str(sweep_dir)]) == 0
    out = capsys.readouterr().out
    row = {line.split("│")[1].strip(): [c.strip() for c in line.split("│")[2:-1]] for line in out.splitlines()
           if line.startswith("│")}
    # cell: state job attempts steps reward KL "time left" updated detail
    assert row["r"][3:7] == ["30/100", "0.255", "0.0255", "3m"]
    assert row["p"][3:7] == ["6/100", "0.5", "0.05", "7m"]
    assert row["n"][3:7] == ["1/12", "1", "0.5", "—"]
    assert row["c"][3:7] == ["12/12", "—", "—", "—"]
    assert f"wandb sync {sweep_dir / 'c' / 'wandb'}" in out and "wandb sync " + str(sweep_dir / "u") not in out

    assert status.main([str(sweep_dir), "--json"]) == 0
    docs = {d["cell_id"]: d for d in map(json.loads, capsys.readouterr().out.splitlines())}
    assert docs["r"]["time_left_s"] == pytest.approx(210.0) and docs["r"]["reward"] == pytest.approx(0.255)
    assert docs["c"]["wandb_sync"] == f"wandb sync {sweep_dir / 'c' / 'wandb'}" and docs["n"]["time_left_s"] is None


def test_durations_read_at_a_glance():
    assert [status.duration(s) for s in (None, 0, 59.4, 60, 3599, 3600, 3 * 3600 + 5 * 60, 86400 + 4 * 3600)] == [
        "—", "0s", "59s", "1m", "59m", "1h00m", "3h05m", "1d04h"]


def test_watch_redraws_the_table_until_interrupted(tmp_path, capsys, monkeypatch, write_result):
    sweep_dir = tmp_path / "s"
    write_result(sweep_dir / "r", "running", steps=0)
    _train_log(sweep_dir / "r", [{"step": s, "attempt": 1, "time": 100.0 + 2 * s, "loss": 0.0} for s in (1, 2)])
    slept = []

    def sleep(seconds):  # between two frames training goes on; the second sleep is the Ctrl-C
        slept.append(seconds)
        if len(slept) > 1:
            raise KeyboardInterrupt
        _train_log(sweep_dir / "r", [{"step": s, "attempt": 1, "time": 100.0 + 2 * s, "loss": 0.0} for s in (3, 4, 5)])

    monkeypatch.setattr(status.time, "sleep", sleep)
    assert status.main([str(sweep_dir), "--watch", "0.5"]) == 0
    frames = capsys.readouterr().out.split("sweep s")[1:]
    assert slept == [0.5, 0.5] and len(frames) == 2
    assert "2/12" in frames[0] and "20s" in frames[0]  # 10 steps left at 2 s/step
    assert "5/12" in frames[1] and "14s" in frames[1] and "every 0.5 s; Ctrl-C to stop" in frames[1]
    assert status.main([str(sweep_dir), "--watch", "0"]) == 2


def test_status_names_held_jobs_end_states_and_an_unreadable_queue(tmp_path, write_result):
    sweep_dir = tmp_path / "s"
    write_result(sweep_dir / "done", "complete")
    write_result(sweep_dir / "gone", "running", steps=3)
    jobs = {"held": Job("40_0"), "done": Job("40_1"), "gone": Job("40_2"), "cancelled": Job("41_1"), "queued": Job("42")}
    manifest.record_submission(sweep_dir, dict.fromkeys(jobs, {}), manifest.submission_record("slurm", sweep_dir, jobs, retries=2))
    queue = slurm.parse_squeue("40_0|PENDING|JobHeldAdmin\n40_1|COMPLETING|None\n42|PENDING|Priority\n")
    ended = slurm.parse_sacct("40_2|OUT_OF_MEMORY\n41|CANCELLED by 0\n")
    lines = {s.cell_id: s for s in status.sweep_status(sweep_dir, queue=lambda ids: queue, accounting=lambda ids: ended)}
    assert {c: lines[c].state for c in jobs} == {"held": "held", "done": "complete", "gone": "failed", "cancelled": "failed",
                                                 "queued": "pending"}
    assert lines["held"].queued and "JobHeldAdmin" in lines["held"].detail and "scontrol release 40_0" in lines["held"].detail
    assert "sacct: OUT_OF_MEMORY" in lines["gone"].detail and "cancelled by 0" in lines["cancelled"].detail
    assert lines["queued"].detail == "Priority"

    def controller_down(ids):
        raise slurm.SlurmError("`squeue` did not answer within 30 s; is slurmctld up?")
    lines = {s.cell_id: s for s in status.sweep_status(sweep_dir, queue=controller_down, accounting=lambda ids: {})}
    assert [lines[c].state for c in ("held", "cancelled", "queued", "done")] == ["unknown"] * 3 + ["complete"]
    with pytest.raises(slurm.SlurmError, match="slurmctld up"):
        status.sweep_status(sweep_dir, queue=controller_down, queue_required=True)


def test_the_verdicts_project_the_sweeps_cost_beside_the_preflights_own(tmp_path):
    """Each submitted cell (a config snapshot) costs its combination's projected hours; the
    preflights' elapsed time is their share of it."""
    from nli_grpo import launch, verdict
    from nli_grpo.config import load_config

    sweep_dir = tmp_path / "lora_rank"
    for rank in (8, 16):
        cfg = load_config("smoke", [f"lora.rank={rank}", "resources.gpus_per_node=2"])
        launch.write_config_snapshot(cfg, sweep_dir / f"r{rank}")
    doc = {"fit": {"hours": 2.0, "gpu_hours": 4.0}, "elapsed_s": 360, "config": {"resources": {"gpus_per_node": 2}}}
    assert status.projection_line(sweep_dir, {verdict.combination(cfg): doc}) == (
        "projected from the verdicts: 2 of the 2 submitted cells need 4.00 job-hours, 8.00 GPU-hours; "
        "the preflights took 0.10 job-hours, 0.20 GPU-hours (2.5% of the cells')")
    assert status.projection_line(sweep_dir, {"another__combination": doc}) is None
