"""Sweeps on the real local Slurm cluster (slurm/local-cluster.sh): real submitit job arrays, real
training of the tiny model, real USR2 / `scontrol requeue` / partition preemption, and refusals
before anything is queued."""
import contextlib
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nli_grpo import manifest, results, slurm, status
from nli_grpo.layout import CONFIG_SNAPSHOT_FILENAME, MANIFEST_FILENAME, RESULT_FILENAME, CellFolder, PoolFolder

pytestmark = [pytest.mark.slurm, pytest.mark.usefixtures("slurm_cluster")]

REPO = Path(__file__).resolve().parent.parent
QUICK_STEPS = 12
# The interruption tests time their signals against the random tiny model, whose generations always
# run to max_completion_length (the smoke recipe's warm-started model stops after its answer), and
# the 8 completions per step they were timed with.
RANDOM_MODEL = ["model.name_or_path=tiny", "grpo.completions_per_step=8"]
QUICK_EVAL = [f"grpo.max_steps={QUICK_STEPS}", "eval.limit=2", "eval.benchmarks=[anli_r1,hans_subsequence]"]


@pytest.fixture(scope="module")
def job_env(tmp_path_factory):
    """Jobs inherit the submitting environment: this venv's python, and one model cache for all."""
    cache = os.environ.get("NLI_GRPO_CACHE") or str(tmp_path_factory.mktemp("cache"))
    return {**os.environ, "NLI_GRPO_CACHE": cache, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def sweep_command(*argv, env, timeout=120):
    """`python sweeps/lora_rank.py ...` as a user types it (the venv's python)."""
    return subprocess.run([sys.executable, str(REPO / "sweeps" / "lora_rank.py"), *argv], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


def wait_for(what, predicate, timeout, logs: Path | None = None):
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() > deadline:
            tail = "".join(p.read_text()[-3000:] for p in sorted(logs.rglob("*.err"))) if logs else ""
            pytest.fail(f"{what}: not within {timeout} s\n{tail}")
        time.sleep(0.5)
    return value


def queued(job_ids) -> dict:
    return {j: s for j, s in slurm.queued_jobs(list(job_ids)).items() if j in job_ids}


def test_smoke_sweep_runs_as_one_array_to_completion_and_a_rerun_submits_nothing(tmp_path, job_env):
    done = sweep_command("--smoke", "--cluster", "slurm", "--partition", "gpu", "--results", str(tmp_path), *QUICK_EVAL, env=job_env)
    assert done.returncode == 0, done.stdout + done.stderr
    sweep_dir = tmp_path / "lora_rank-smoke"
    [submission] = manifest.read_manifest(sweep_dir)["submissions"]
    jobs = submission["jobs"]
    assert sorted(jobs) == ["tiny-sft__bf16__r16__s0", "tiny-sft__bf16__r8__s0"]
    arrays = {j.split("_")[0] for j in jobs.values()}
    assert len(arrays) == 1 and all("_" in j for j in jobs.values()), f"expected one array, got {jobs}"
    assert f"submitted 2 of 2 cells (slurm: {arrays.pop()})" in done.stdout

    def all_complete():
        lines = status.sweep_status(sweep_dir, queue=slurm.queued_jobs)
        return all(s.state == "complete" for s in lines) and not queued(set(jobs.values())) and lines
    lines = wait_for("both cells complete", all_complete, 240, logs=sweep_dir / "logs")
    assert [(s.state, s.steps_done, s.max_steps) for s in lines] == [("complete", QUICK_STEPS, QUICK_STEPS)] * 2
    for cell_id, job_id in jobs.items():
        doc = results.read_result(CellFolder(sweep_dir / cell_id).result)  # validates the schema
        assert doc["status"] == "complete" and doc["train"]["steps_done"] == QUICK_STEPS and set(doc["eval"]) == {"anli_r1", "hans_subsequence"}
        assert f"{doc['slurm']['array_job_id']}_{doc['slurm']['array_task_id']}" == job_id
        assert doc["slurm"]["attempts"] == 1 and doc["config"]["output"]["dir"] == str(sweep_dir / cell_id)

    again = sweep_command("--smoke", "--cluster", "slurm", "--partition", "gpu", "--results", str(tmp_path), *QUICK_EVAL, env=job_env)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "nothing to submit" in again.stdout and again.stdout.count("skip: complete") == 2
    assert len(manifest.read_manifest(sweep_dir)["submissions"]) == 1


def test_a_cell_survives_usr2_scontrol_requeue_and_preemption_and_finishes_exactly_once(tmp_path, job_env):
    max_steps = 60
    # 4 (fake) GPUs: the node's every GPU, so that an urgent job asking for one must preempt this one
    done = sweep_command("--smoke", "--cluster", "slurm", "--partition", "gpu", "--gpus-per-node", "4", "--ranks", "8",
                         "--results", str(tmp_path), f"grpo.max_steps={max_steps}", "grpo.save_steps=2", *RANDOM_MODEL,
                         "grpo.max_completion_length=128", "eval.after_training=false", env=job_env)
    assert done.returncode == 0, done.stdout + done.stderr
    sweep_dir = tmp_path / "lora_rank-smoke"
    run_dir = sweep_dir / "tiny__bf16__r8__s0"  # on the random model (RANDOM_MODEL)
    [job_id] = manifest.read_manifest(sweep_dir)["submissions"][0]["jobs"].values()
    logs = sweep_dir / "logs"

    def saved_step():
        checkpoint = CellFolder(run_dir).last_checkpoint()
        return int(checkpoint.name.rsplit("-", 1)[1]) if checkpoint else 0

    def attempts():
        doc = results.load_existing(CellFolder(run_dir).result)
        return doc["slurm"]["attempts"] if doc else 0


    interruptions = [
        ("USR2 (the time-limit warning)", ["scancel", "--signal=USR2", job_id]),
        ("scontrol requeue", ["scontrol", "requeue", job_id]),
        ("preemption by the urgent partition", ["sbatch", "-p", "urgent", "--gres=gpu:1", "-t", "1", "-J", "test-urgent",
                                                f"--output={tmp_path / 'urgent.out'}", "--wrap", "sleep 1"]),
    ]
    stopped_at = []
    for attempt, (what, command) in enumerate(interruptions, start=1):
        def running_again(attempt=attempt):
            return attempts() == attempt and queued({job_id}).get(job_id) == "RUNNING"
        wait_for(f"attempt {attempt} started before {what}", running_again, 120, logs)
        start = saved_step()
        # interrupt it while it trains: once it saved a checkpoint of its own
        stopped_at.append(wait_for(f"attempt {attempt} saved a step after {start}", lambda start=start: saved_step() > start and saved_step(), 120, logs))
        assert stopped_at[-1] < max_steps, "the run finished before it could be interrupted; make it longer"
        subprocess.run(command, check=True, capture_output=True, timeout=30)

    def finished():
        doc = results.load_existing(CellFolder(run_dir).result)
        return doc and doc["status"] == "complete" and not queued({job_id}) and doc
    doc = wait_for("the cell completes", finished, 240, logs)
    assert doc["train"]["steps_done"] == max_steps and doc["stages_done"] == ["train"]
    assert doc["slurm"]["attempts"] >= 4 and doc["train"]["resumed_from_step"] >= stopped_at[-1] > 0
    assert saved_step() == max_steps  # and never beyond: the log of every attempt stops there too
    assert max(r["step"] for r in results.read_jsonl(CellFolder(run_dir).train_log)) <= max_steps
    assert list(sweep_dir.glob(f"*/{RESULT_FILENAME}")) == [CellFolder(run_dir).result]

    log_text = "".join(p.read_text() for p in sorted(logs.rglob("*_log.err")))
    resumed = [int(s) for s in re.findall(r"resuming from \S*checkpoint-(\d+)", log_text)]
    assert len(resumed) >= 3 and resumed == sorted(resumed) and resumed[0] >= stopped_at[0] - 2, log_text[-3000:]
    # USR2 and the preemption went through CellJob.checkpoint (submitit requeued the job);
    # `scontrol requeue` calls no hook: that start resumed from disk alone
    assert log_text.count("forwarding SIGUSR2 to the training process") >= 2
    assert "this job is preempted" in log_text
    assert status.sweep_status(sweep_dir, queue=slurm.queued_jobs)[0].state == "complete"


def _vllm_servers(job_id: str) -> list:
    """The vLLM server and engine processes of a Slurm job on this machine (the local cluster's
    node): those with the job's id in their environment."""
    import psutil

    found = []
    for process in psutil.process_iter(["name", "cmdline"]):
        text = " ".join([process.info["name"] or "", *(process.info["cmdline"] or [])])
        if "vllm.entrypoints" in text or "EngineCore" in text:
            with contextlib.suppress(psutil.Error):
                if process.environ().get("SLURM_JOB_ID") == job_id:
                    found.append(process)
    return found


@pytest.mark.vllm
def test_a_server_mode_cell_survives_usr2_and_requeue_and_leaves_no_server(tmp_path, job_env):
    """rollout.backend=vllm_server under Slurm: each start of the job starts a fresh vLLM server in
    the job, USR2 and `scontrol requeue` stop it with the training, the cell completes exactly
    max_steps, and no server process is left on the node."""
    max_steps = 24
    done = sweep_command("--smoke", "--cluster", "slurm", "--partition", "gpu", "--ranks", "8", "--results", str(tmp_path),
                         "rollout.backend=vllm_server", f"grpo.max_steps={max_steps}", "grpo.save_steps=2", "grpo.completions_per_step=8", *RANDOM_MODEL,
                         "grpo.num_iterations=1", "grpo.max_completion_length=64", "eval.after_training=false", env=job_env)
    assert done.returncode == 0, done.stdout + done.stderr
    sweep_dir = tmp_path / "lora_rank-smoke"
    [(cell_id, job_id)] = manifest.read_manifest(sweep_dir)["submissions"][0]["jobs"].items()
    assert cell_id.endswith("__bf16__r8__s0__vllm_server")  # the cell id names the rollout backend
    run_dir, logs = sweep_dir / cell_id, sweep_dir / "logs"

    def attempts():
        doc = results.load_existing(CellFolder(run_dir).result)
        return doc["slurm"]["attempts"] if doc else 0

    def steps_logged():
        return len({r["step"] for r in results.read_jsonl(CellFolder(run_dir).train_log)})

    for attempt, command in enumerate([["scancel", "--signal=USR2", job_id], ["scontrol", "requeue", job_id]], start=1):
        wait_for(f"attempt {attempt} running", lambda a=attempt: attempts() == a and queued({job_id}).get(job_id) == "RUNNING", 420, logs)
        before = steps_logged()
        wait_for(f"attempt {attempt} trained a few steps", lambda b=before: steps_logged() >= b + 3 and CellFolder(run_dir).last_checkpoint(), 420, logs)
        assert steps_logged() < max_steps, "the run finished before it could be interrupted; make it longer"
        assert _vllm_servers(job_id)  # the job's server, while it trains
        subprocess.run(command, check=True, capture_output=True, timeout=30)

    def finished():
        doc = results.load_existing(CellFolder(run_dir).result)
        return doc and doc["status"] == "complete" and not queued({job_id}) and doc
    doc = wait_for("the cell completes", finished, 600, logs)
    assert doc["train"]["steps_done"] == max_steps and doc["slurm"]["attempts"] >= 3 and doc["train"]["resumed_from_step"] > 0
    assert max(r["step"] for r in results.read_jsonl(CellFolder(run_dir).train_log)) == max_steps
    assert (run_dir / "vllm_server.log").read_text().count("Application startup complete") >= 3  # one per start
    log_text = "".join(p.read_text() for p in sorted(logs.rglob("*_log.err")))
    assert "Traceback" not in log_text, log_text[-3000:]  # the requeue's SIGTERM is a stop, not a failure
    deadline = time.time() + 30
    while _vllm_servers(job_id) and time.time() < deadline:
        time.sleep(0.5)
    assert _vllm_servers(job_id) == []


@pytest.mark.parametrize("argv, message", [
    (["--partition", "nosuch"], "partition 'nosuch' does not exist on this cluster; use --partition with one of: gpu, cpu, urgent"),
    (["--partition", "gpu", "--ranks", "0"], "lora.rank=0 must be a positive integer"),
    (["--partition", "gpu", "model.name_or_path=acme/SuperNLI-9B"], "unknown model 'acme/SuperNLI-9B'"),
    (["--partition", "gpu", "model.name_or_path=Qwen/Qwen2.5-7B-Instruct-AWQ", "model.quantization=awq"],
     "model.quantization=awq needs a pre-quantised AWQ checkpoint (e.g. Qwen/Qwen2.5-7B-Instruct-AWQ) and a GPU node"),
    (["--partition", "gpu", "--gpus-per-node", "8"], "asks for 8 GPUs per node; partition gpu has at most 4"),
    (["--partition", "gpu", "--results", "{blocker}/results"], "cannot be created: {blocker} is a file"),
    (["--partition", "gpu", "--time", "4"], "--time 4 min is too short: USR2 (save and requeue) comes 300 s before the time "
                                            "limit, so every start would stop after 0 s; give --time 10 or more"),
    (["--partition", "gpu", "--results", "{blocker}-%j"], "has a % or \\ in its path, which Slurm expands in the jobs' log paths"),
], ids=["unknown-partition", "rank-0", "unknown-model", "awq-on-cpu-node", "too-many-gpus", "unwritable-results", "time-under-the-usr2-lead",
        "percent-in-results"])
def test_bad_input_is_refused_before_anything_is_queued(tmp_path, capsys, argv, message, load_sweep):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    argv = [a.format(blocker=blocker) for a in argv]
    results_dir = [] if "--results" in argv else ["--results", str(tmp_path / "results")]
    ours = lambda: [j for j in subprocess.run(["squeue", "--me", "-h", "-o", "%j"], capture_output=True, text=True).stdout.split()  # noqa: E731
                    if j.startswith("nli_grpo_lora_rank")]
    before = ours()
    code = load_sweep("lora_rank").main(["--smoke", "--cluster", "slurm", *results_dir, *argv])
    out = " ".join(capsys.readouterr().out.split())  # undo the console's line wrapping
    assert code == 2
    assert message.format(blocker=blocker) in out and "Nothing submitted" in out
    assert ours() == before == []
    assert not list(tmp_path.rglob(MANIFEST_FILENAME)) and not list(tmp_path.rglob(CONFIG_SNAPSHOT_FILENAME))


def test_a_sweep_with_inputs_missing_queues_nothing_and_names_prepare(tmp_path, job_env, original_files):
    """The hub is unreachable and nothing is prepared: the dry run of a real (GPU) sweep refuses with
    exit 2 and the prepare command; after `prepare --from` with the original files and a local
    model folder it passes."""
    env = {**job_env, "NLI_GRPO_CACHE": str(tmp_path / "cache")}
    model = tmp_path / "models" / "Qwen2.5-7B-Instruct"
    model.mkdir(parents=True)
    (model / "config.json").write_text(json.dumps({"hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
                                                   "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 152064}))
    argv = ["--dry-run", "--partition", "gpu", "--ranks", "8", "--quantizations", "bf16", "--mem-gb", "8", "--cpus-per-task", "2",
            "--time", "60", "--results", str(tmp_path / "results"), "data.train_source=anli_train_r1"]
    refused = sweep_command(*argv, env=env)
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert "python -m nli_grpo.prepare --sweep lora_rank" in refused.stdout and "Nothing submitted" in refused.stdout
    assert "model Qwen/Qwen2.5-7B-Instruct is not in the cache" in refused.stdout
    assert not list(tmp_path.rglob(MANIFEST_FILENAME))

    prepared = subprocess.run([sys.executable, "-m", "nli_grpo.prepare", "--from", str(original_files)], env=env, cwd=REPO,
                              capture_output=True, text=True, timeout=120)
    assert prepared.returncode == 0, prepared.stderr
    passes = sweep_command(*argv, f"model.name_or_path={model}", env=env)
    assert passes.returncode == 0, passes.stdout + passes.stderr
    assert "dry run: 1 of 1 cells would be submitted" in passes.stdout


# --------------------------------------------------------------------------- the pool, then the cells that train on it
POOL_CELLS = ["--smoke", "--cluster", "slurm", "--partition", "gpu", "data.train_source=anli_hard", *QUICK_EVAL]


def pool_folder(root: Path) -> Path:
    [folder] = (root / "bootstrap").iterdir()
    return folder


def sacct_times(job_ids: list[str]) -> dict[str, tuple[str, str]]:
    """job id -> (start, end) as sacct reports them (ISO times sort as text)."""
    out = subprocess.run(["sacct", "-n", "-P", "-X", "-o", "JobID,Start,End", "-j", ",".join(sorted({j.split("_")[0] for j in job_ids}))],
                         capture_output=True, text=True, check=True).stdout
    return {job: (start, end) for job, start, end in (line.split("|") for line in out.splitlines() if line.count("|") == 2)}


def test_one_command_builds_the_pool_then_trains_on_it_and_a_rerun_submits_nothing(tmp_path, job_env):
    root = tmp_path / "results"
    done = sweep_command(*POOL_CELLS, "--results", str(root), env=job_env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "the training cells wait on the merge" in done.stdout
    sweep_dir, pool = root / "lora_rank-smoke", pool_folder(root)
    pool_jobs = manifest.latest_jobs(manifest.read_manifest(pool))
    cell_jobs = manifest.latest_jobs(manifest.read_manifest(sweep_dir))
    assert sorted(pool_jobs) == ["merge", "shard-00-of-02", "shard-01-of-02"] and len(cell_jobs) == 2

    def all_complete():
        lines = status.sweep_status(sweep_dir, queue=slurm.queued_jobs)
        return all(s.state == "complete" and not s.queued for s in lines) and lines  # and their jobs ended
    wait_for("the pool, then both cells", all_complete, 420, logs=sweep_dir / "logs")
    times = sacct_times([j for j, _ in (*pool_jobs.values(), *cell_jobs.values())])
    shard_end = max(times[pool_jobs[p][0]][1] for p in ("shard-00-of-02", "shard-01-of-02"))
    merge_start, merge_end = times[pool_jobs["merge"][0]]
    assert shard_end <= merge_start and all(merge_end <= times[j][0] for j, _ in cell_jobs.values()), times
    record = json.loads((pool / "pool.json").read_text())
    for cell_id in cell_jobs:
        doc = results.read_result(CellFolder(sweep_dir / cell_id).result)
        assert doc["train"]["data"]["fingerprint"] == record["fingerprint"] and doc["train"]["steps_done"] == 12

    again = sweep_command(*POOL_CELLS, "--results", str(root), env=job_env)
    assert again.returncode == 0 and "nothing to submit" in again.stdout, again.stdout
    assert len(manifest.read_manifest(pool)["submissions"]) == 1 and len(manifest.read_manifest(sweep_dir)["submissions"]) == 1


def test_a_failed_merge_leaves_the_cells_blocked_and_a_rerun_after_the_fix_completes_them(tmp_path, job_env):
    root = tmp_path / "results"
    done = sweep_command(*POOL_CELLS, "--results", str(root), env=job_env)
    assert done.returncode == 0, done.stdout + done.stderr
    sweep_dir, pool = root / "lora_rank-smoke", pool_folder(root)
    merge_job = manifest.latest_jobs(manifest.read_manifest(pool))["merge"][0]
    subprocess.run(["scontrol", "hold", merge_job], check=True)  # so that a shard's work can be damaged first
    folder = PoolFolder(pool)
    wait_for("both shards", lambda: all(json.loads(folder.shard_state(i, 2).read_text()).get("status") == "complete"
                                        for i in (0, 1) if folder.shard_state(i, 2).is_file()) and
             folder.shard_state(1, 2).is_file() and folder.shard_state(0, 2).is_file(), 240, logs=pool / "logs")
    damaged = folder.chunk(3)
    damaged.write_text(damaged.read_text()[:-30])  # a chunk cut short
    subprocess.run(["scontrol", "release", merge_job], check=True)

    def blocked():
        lines = status.sweep_status(sweep_dir, queue=slurm.queued_jobs)
        return all(s.state == "blocked" for s in lines) and lines
    lines = wait_for("the cells blocked on the failed merge", blocked, 240, logs=pool / "logs")
    assert all("its pool's merge failed" in s.detail and "chunk-00003.jsonl" in s.detail for s in lines), lines
    shown = subprocess.run([sys.executable, "-m", "nli_grpo.status", str(sweep_dir)], capture_output=True, text=True, env=job_env)
    assert "blocked" in shown.stdout and "2 blocked" in shown.stdout
    pool_shown = subprocess.run([sys.executable, "-m", "nli_grpo.status", str(root / "bootstrap")], capture_output=True, text=True,
                                env=job_env)
    assert "merge" in pool_shown.stdout and "failed" in pool_shown.stdout

    damaged.unlink()  # the fix the merge's error names: sample that chunk again
    again = sweep_command(*POOL_CELLS, "--results", str(root), env=job_env)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "submitted shard-01-of-02" in again.stdout and "merge" in again.stdout  # chunk 3 is shard 1's

    def all_complete():
        lines = status.sweep_status(sweep_dir, queue=slurm.queued_jobs)
        return all(s.state == "complete" and not s.queued for s in lines) and lines  # and their jobs ended
    wait_for("the cells after the fixed pool", all_complete, 420, logs=sweep_dir / "logs")
    assert folder.complete() and not queued({j for j, _ in manifest.latest_jobs(manifest.read_manifest(sweep_dir)).values()})


def test_the_dry_run_shows_the_pool_the_cells_wait_on(tmp_path, job_env):
    done = sweep_command(*POOL_CELLS, "--dry-run", "--results", str(tmp_path / "results"), env=job_env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "missing; would submit shard-00-of-02, shard-01-of-02, merge, and the training cells after its merge" in done.stdout
    assert "#SBATCH --dependency='afterok:<the pool merge job>'" in done.stdout  # (a real job id is not quoted)
    assert not (tmp_path / "results" / "bootstrap").exists()  # a dry run writes nothing


# --------------------------------------------------------------------------- shared clusters: one job per cell, nothing unrecorded
def fake_slurm_command(folder: Path, name: str, script: str) -> Path:
    """A `name` on PATH in front of the real one, standing in for a Slurm failure (`script`: bash;
    the real command is `$REAL`)."""
    folder.mkdir(exist_ok=True)
    real = subprocess.run(["bash", "-c", f"command -v {name}"], capture_output=True, text=True, check=True).stdout.strip()
    path = folder / name
    path.write_text(f"#!/bin/bash\nREAL={real}\n{script}\n")
    path.chmod(0o755)
    return folder


def with_path(env: dict, folder: Path) -> dict:
    return {**env, "PATH": f"{folder}:{env['PATH']}"}


def recorded_jobs(folder: Path) -> list[str]:
    """Every job id of every submission of a manifest (not only the latest per cell)."""
    return [j for s in manifest.read_manifest(folder)["submissions"] for j in s["jobs"].values()]


@contextlib.contextmanager
def cancelled_after(folder: Path):
    """Cancel the jobs the block's sweeps recorded (the tests below look at submission, not training)."""
    try:
        yield
    finally:
        ids = [j for m in folder.rglob(MANIFEST_FILENAME) for j in recorded_jobs(m.parent)]
        if ids:
            subprocess.run(["scancel", *sorted({j.split("_")[0] for j in ids})], capture_output=True, timeout=30)


SMOKE_SLURM = ["--smoke", "--cluster", "slurm", "--partition", "gpu", "grpo.max_steps=2", "eval.after_training=false"]


def test_a_failed_squeue_submits_nothing(tmp_path, job_env):
    with cancelled_after(tmp_path):
        first = sweep_command(*SMOKE_SLURM, "--ranks", "8", "--results", str(tmp_path), env=job_env)
        assert first.returncode == 0, first.stdout + first.stderr
        sweep_dir = tmp_path / "lora_rank-smoke"
        [job] = recorded_jobs(sweep_dir)
        fakes = fake_slurm_command(tmp_path / "bin", "squeue",
                                   'echo "slurm_load_jobs error: Socket timed out on send/recv operation" >&2; exit 1')
        again = sweep_command(*SMOKE_SLURM, "--ranks", "8", "--results", str(tmp_path), env=with_path(job_env, fakes))
        out = " ".join(again.stdout.split())
        assert again.returncode == 2, out + again.stderr
        assert "Socket timed out" in out and "Nothing submitted" in out
        assert recorded_jobs(sweep_dir) == [job]


def test_two_sweeps_started_at_once_queue_each_cell_once(tmp_path, job_env):
    # sbatch answers slowly (a busy controller): both sweeps plan while neither has submitted yet
    slow = with_path(job_env, fake_slurm_command(tmp_path / "bin", "sbatch", 'sleep 3; exec "$REAL" "$@"'))
    argv = [sys.executable, str(REPO / "sweeps" / "lora_rank.py"), *SMOKE_SLURM, "--results", str(tmp_path)]
    with cancelled_after(tmp_path):
        sweeps = [subprocess.Popen(argv, env=slow, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                  for _ in range(2)]
        outputs = [p.communicate(timeout=180)[0] for p in sweeps]
        assert [p.returncode for p in sweeps] == [0, 0], outputs
        sweep_dir = tmp_path / "lora_rank-smoke"
        submissions = manifest.read_manifest(sweep_dir)["submissions"]
        assert [sorted(s["jobs"]) for s in submissions] == [["tiny-sft__bf16__r16__s0", "tiny-sft__bf16__r8__s0"]], outputs
        assert sum("nothing to submit" in out for out in outputs) == 1, outputs
        # this test's jobs only (an earlier test's cancelled ones may still be leaving the queue):
        # their batch script (%o) lies in this sweep's log folder
        queue = subprocess.run(["squeue", "-h", "--array", "-o", "%j %o"], capture_output=True, text=True, check=True).stdout
        names = [line.split()[0] for line in queue.splitlines() if str(tmp_path) in line]
        assert names.count("nli_grpo_lora_rank-smoke") == 2, queue


@pytest.fixture(scope="module")
def other_user():
    """A second Unix user on this machine (the cluster's node): a colleague sharing the sweep."""
    name = "nli_grpo_colleague"
    if subprocess.run(["id", name], capture_output=True).returncode != 0:
        subprocess.run(["useradd", "--no-create-home", name], check=True, capture_output=True)
    return name


def test_another_users_held_job_is_skipped_and_status_says_how_to_release_it(tmp_path, job_env, other_user):
    sweep_dir = tmp_path / "lora_rank-smoke"
    held = subprocess.run(["runuser", "-u", other_user, "--", "sbatch", "--parsable", "--hold", "-p", "cpu", "-t", "5",
                           "-o", "/dev/null", "--wrap", "true"], capture_output=True, text=True, check=True, cwd="/").stdout.strip()
    try:
        # the colleague's submission of one cell, as their sweep recorded it
        manifest.record_submission(sweep_dir, {"tiny-sft__bf16__r8__s0": {}}, {
            "submitted_at": results.now_iso(), "user": other_user, "cluster": "slurm", "jobs": {"tiny-sft__bf16__r8__s0": held}})
        plan = sweep_command(*SMOKE_SLURM, "--dry-run", "--results", str(tmp_path), env=job_env)
        out = " ".join(plan.stdout.split())
        assert plan.returncode == 0, out + plan.stderr
        assert f"skip: held (job {held})" in out and "submit (missing)" in out  # r8 is the colleague's; r16 is missing
        assert "dry run: 1 of 2 cells would be submitted" in out
        shown = subprocess.run([sys.executable, "-m", "nli_grpo.status", str(sweep_dir), "--json"], env=job_env, capture_output=True,
                               text=True, timeout=60)
        line = next(json.loads(x) for x in shown.stdout.splitlines() if "r8" in x)
        assert line["state"] == "held" and line["queued"] and "JobHeldUser" in line["detail"]
        assert f"scontrol release {held}" in line["detail"]
    finally:
        subprocess.run(["scancel", held], capture_output=True, timeout=30)


def test_an_sbatch_failing_after_the_first_array_leaves_it_recorded_and_the_rerun_submits_only_the_rest(tmp_path, job_env):
    # the pool's shards are queued, then sbatch fails (the merge's)
    count = tmp_path / "sbatch-calls"
    failing = fake_slurm_command(tmp_path / "bin", "sbatch", f'echo x >> {count}\n'
                                 f'if [ "$(wc -l < {count})" -ge 2 ]; then echo "sbatch: error: Batch job submission failed: '
                                 'Socket timed out on send/recv operation" >&2; exit 1; fi\nexec "$REAL" "$@"')
    root = tmp_path / "results"
    with cancelled_after(root):
        first = sweep_command(*POOL_CELLS, "--results", str(root), env=with_path(job_env, failing))
        assert first.returncode == 1, first.stdout + first.stderr
        assert "Traceback" not in first.stderr and "the sbatch of pool merge (1 job(s)) failed" in first.stdout, first.stdout
        pool = pool_folder(root)
        [shards] = manifest.read_manifest(pool)["submissions"]
        assert sorted(shards["jobs"]) == ["shard-00-of-02", "shard-01-of-02"]

        again = sweep_command(*POOL_CELLS, "--results", str(root), env=job_env)
        assert again.returncode == 0, again.stdout + again.stderr
        first_submission, second = manifest.read_manifest(pool)["submissions"]
        assert first_submission == shards and sorted(second["jobs"]) == ["merge"]
        first_graph, cells = manifest.read_manifest(root / "lora_rank-smoke")["submissions"]
        assert [n["node"] for n in first_graph["graph"]] == ["pool shards"] and not first_graph["jobs"]
        assert [n["node"] for n in cells["graph"]] == ["pool merge", "cells"] and len(cells["jobs"]) == 2


def test_a_second_job_on_a_locked_cell_exits_at_once_and_touches_nothing(tmp_path):
    """The training of a cell in its job (a stand-in that sleeps), and a second job on the same
    cell: the second exits with EXIT_REFUSED before running anything; the first is untouched."""
    import submitit

    from nli_grpo import launch
    from nli_grpo.job import EXIT_REFUSED

    run_dir, touched = tmp_path / "cell", tmp_path / "cell" / "second-job-was-here"
    run_dir.mkdir()

    def submit(command):
        executor = submitit.AutoExecutor(folder=tmp_path / "logs" / "%j", cluster="slurm")
        executor.update_parameters(slurm_partition="cpu", timeout_min=5, cpus_per_task=1)
        return executor.submit(launch.CellJob(command, str(run_dir), 5))

    started = tmp_path / "first-job-trains"
    first = submit(["bash", "-c", f"touch {started}; sleep 60"])
    try:
        wait_for("the first job trains", started.is_file, 60, tmp_path / "logs")
        second = submit(["touch", str(touched)])
        wait_for("the second job ends", lambda: not queued({second.job_id}) and second.state not in ("PENDING", "RUNNING"), 60,
                 tmp_path / "logs")
        assert not touched.exists()
        assert f"is being trained by job {first.job_id}" in Path(second.paths.stderr).read_text()
        assert subprocess.run(["sacct", "-X", "-n", "-P", "-o", "ExitCode", "-j", second.job_id], capture_output=True,
                              text=True).stdout.strip() == f"{EXIT_REFUSED}:0"
        assert queued({first.job_id}).get(first.job_id) == "RUNNING"
    finally:
        first.cancel(check=False)


@pytest.fixture(scope="module")
def small_qos():
    """A QOS that lets a user queue two jobs at once (as shared clusters limit new users)."""
    name = "nli_grpo_small"
    subprocess.run(["sacctmgr", "-i", "add", "qos", name], capture_output=True, timeout=30)  # exists already: fine
    subprocess.run(["sacctmgr", "-i", "modify", "qos", name, "set", "MaxSubmitJobsPerUser=2"], check=True, capture_output=True,
                   timeout=30)
    return name


def test_a_qos_submit_limit_of_2_with_3_cells_completes_them_over_reruns(tmp_path, job_env, small_qos):
    argv = [*SMOKE_SLURM, "--ranks", "8", "--seeds", "0,1,2", "--qos", small_qos, "--results", str(tmp_path)]
    sweep_dir = tmp_path / "lora_rank-smoke"

    def complete(count):
        lines = status.sweep_status(sweep_dir, queue=slurm.queued_jobs)
        return sum(s.state == "complete" and not s.queued for s in lines) == count and lines
    with cancelled_after(tmp_path):
        first = sweep_command(*argv, env=job_env)
        out = " ".join(first.stdout.split())
        assert first.returncode == 0, out + first.stderr
        assert f"QOS {small_qos}'s MaxSubmitJobsPerUser is 2 and you have 0 job(s) queued: 2 of the 3 cells to submit fit now" in out
        wait_for("the first two cells", lambda: complete(2), 240, sweep_dir / "logs")
        again = sweep_command(*argv, env=job_env)
        assert again.returncode == 0 and "submitted 1 of 1 cells" in again.stdout, again.stdout + again.stderr
        wait_for("the third cell", lambda: complete(3), 240, sweep_dir / "logs")
        assert [len(s["jobs"]) for s in manifest.read_manifest(sweep_dir)["submissions"]] == [2, 1]


def test_the_pool_a_sweep_queues_first_counts_against_the_submit_limit(tmp_path, job_env, small_qos):
    # the pool's two shards and its merge would fill the QOS's 2 jobs: no cell fits this time
    plan = sweep_command(*POOL_CELLS, "--qos", small_qos, "--dry-run", "--results", str(tmp_path), env=job_env)
    out = " ".join(plan.stdout.split())
    assert plan.returncode == 0, out + plan.stderr
    assert "would submit shard-00-of-02, shard-01-of-02, merge" in out
    assert "the pool they train on takes 2 of the room: 0 of the 2 cells to submit fit now" in out
    assert "dry run: 0 of 2 cells would be submitted" in out


def test_preemption_without_a_user_signal_requeues_the_cell_which_resumes_to_completion(tmp_path, job_env):
    """Slurm's defaults: no preempt_send_user_signal, so a preempted job gets no USR2, only SIGTERM
    (then SIGKILL after GraceTime). This cluster sends a job's --signal at preemption; a job
    submitted without one gets exactly what a default cluster sends. The cell must save, be
    requeued by Slurm itself and finish, with nothing run again by hand."""
    max_steps = 24
    no_signal = with_path(job_env, fake_slurm_command(tmp_path / "bin", "sbatch",
                                                      'for script; do :; done\nsed -i "/^#SBATCH --signal=/d" "$script"\n'
                                                      'exec "$REAL" "$@"'))
    # 4 (fake) GPUs: the node's every GPU, so that an urgent job asking for one must preempt this one
    with cancelled_after(tmp_path):
        done = sweep_command("--smoke", "--cluster", "slurm", "--partition", "gpu", "--gpus-per-node", "4", "--ranks", "8",
                             "--results", str(tmp_path), f"grpo.max_steps={max_steps}", "grpo.save_steps=2", *RANDOM_MODEL,
                             "grpo.max_completion_length=128", "eval.after_training=false", env=no_signal)
        assert done.returncode == 0, done.stdout + done.stderr
        sweep_dir = tmp_path / "lora_rank-smoke"
        run_dir, logs = CellFolder(sweep_dir / "tiny__bf16__r8__s0"), sweep_dir / "logs"
        [job_id] = recorded_jobs(sweep_dir)
        [script] = logs.rglob("*_submission.sh")
        assert "#SBATCH --signal" not in script.read_text()

        def saved_step():
            checkpoint = run_dir.last_checkpoint()
            return int(checkpoint.name.rsplit("-", 1)[1]) if checkpoint else 0
        wait_for("the job runs", lambda: queued({job_id}).get(job_id) == "RUNNING", 120, logs)
        stopped_at = wait_for("a checkpoint of its own", saved_step, 120, logs)
        assert stopped_at < max_steps, "the run finished before it could be preempted; make it longer"
        subprocess.run(["sbatch", "-p", "urgent", "--gres=gpu:1", "-t", "1", "-J", "test-urgent",
                        f"--output={tmp_path / 'urgent.out'}", "--wrap", "sleep 1"], check=True, capture_output=True, timeout=30)

        def finished():
            doc = results.load_existing(run_dir.result)
            return doc and doc["status"] == "complete" and not queued({job_id}) and doc
        doc = wait_for("the cell completes", finished, 240, logs)
    assert doc["train"]["steps_done"] == max_steps and saved_step() == max_steps
    assert doc["slurm"]["attempts"] >= 2 and doc["train"]["resumed_from_step"] >= stopped_at > 0
    assert max(r["step"] for r in results.read_jsonl(run_dir.train_log)) <= max_steps
    log_text = "".join(p.read_text() for p in sorted(logs.rglob("*_log.err")))
    assert "Bypassing signal SIGTERM" in log_text and "forwarding SIGUSR2" not in log_text, log_text[-3000:]
    assert f"job {job_id} is preempted (SIGTERM, no user signal): requeued it" in log_text

    def recorded_end():  # slurmdbd records the last attempt's end a moment after the job left the queue
        found = subprocess.run(["sacct", "-n", "-X", "-D", "-P", "-o", "State", "-j", job_id], capture_output=True, text=True,
                               timeout=30).stdout.split()
        return found and found[-1] not in ("RUNNING", "COMPLETING") and found
    states = wait_for("sacct's record of the last attempt", recorded_end, 60)
    assert len(states) >= 2 and set(states[:-1]) <= {"REQUEUED", "PREEMPTED"} and states[-1] == "COMPLETED", states
    assert recorded_jobs(sweep_dir) == [job_id]  # one submission: Slurm requeued it, no rerun


# --------------------------------------------------------------------------- preflight through the sweep
#: The smoke recipe shrunk to what the preflight's checks need (as tests/test_preflight.py's SMALL).
PREFLIGHT_SMALL = ["grpo.completions_per_step=8", "grpo.max_completion_length=8", "grpo.num_iterations=1", "eval.limit=2",
                   "preflight.prompts=2", "preflight.greedy_tokens=8"]
SMOKE_SLURM = ["--smoke", "--cluster", "slurm", "--partition", "gpu"]
SMOKE_COMBINATION = "tiny-sft__bf16__hf__g0"


def test_the_sweep_preflights_each_combination_before_its_cells(tmp_path, job_env):
    """--preflight is one graph: the preflight, then the cells after it. A failing combination
    (100000 steps cannot fit in --time 10) leaves its cells blocked with the verdict's reason, and
    a run without --preflight refuses them; passing settings replace them, and the cells start
    only after their preflight passed."""
    from nli_grpo.layout import preflight_file
    from nli_grpo.verdict import read_verdict

    sweep_dir = tmp_path / "lora_rank-smoke"
    verdict_file = preflight_file(sweep_dir, SMOKE_COMBINATION)
    too_long = ["grpo.max_steps=100000", "--time", "10"]

    def sweep(*argv):
        return sweep_command(*SMOKE_SLURM, "--results", str(tmp_path), *PREFLIGHT_SMALL, *argv, env=job_env)

    def submitted(done) -> dict:
        assert done.returncode == 0, done.stdout + done.stderr
        assert "submitted 1 preflight job(s)" in done.stdout and "submitted 2 of 2 cells" in done.stdout, done.stdout
        return manifest.read_manifest(sweep_dir)["submissions"][-1]

    first = submitted(sweep("--preflight", *too_long))
    nodes = {n["kind"]: n for n in first["graph"]}
    assert list(nodes) == ["preflight", "cells"] and nodes["cells"]["after"] == [f"preflight/{SMOKE_COMBINATION}"]
    assert nodes["preflight"]["jobs"] == {SMOKE_COMBINATION: first["jobs"][f"preflight/{SMOKE_COMBINATION}"]}

    def blocked():
        lines = status.sweep_status(sweep_dir, queue=slurm.queued_jobs)
        return len(lines) == 2 and all(s.state == "blocked" for s in lines) and lines
    lines = wait_for("the cells blocked by the failed preflight", blocked, 240, logs=sweep_dir / "logs")
    assert all("its combination's preflight failed" in s.detail and "ask for --time" in s.detail for s in lines), lines
    assert read_verdict(verdict_file)["verdict"] == "fail"
    shown = subprocess.run([sys.executable, "-m", "nli_grpo.status", str(sweep_dir)], capture_output=True, text=True, env=job_env).stdout
    assert re.search(rf"{SMOKE_COMBINATION}\s*│\s*fail", shown) and "job graph of the last submission" in shown, shown
    assert re.search(r"cells\s*│.*│\s*preflight/\S+\s*│\s*2 blocked", shown), shown

    refused = sweep(*too_long)
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert refused.stdout.count(f"its combination {SMOKE_COMBINATION} failed preflight") == 2 and "Nothing submitted" in refused.stdout
    forced = sweep(*too_long, "--no-preflight")
    unchecked = manifest.read_manifest(sweep_dir)["submissions"][-1]
    subprocess.run(["scancel", *unchecked["jobs"].values()], check=True)  # 100000 steps: not to be run
    assert forced.returncode == 0 and "submitted 2 of 2 cells" in forced.stdout, forced.stdout + forced.stderr
    assert unchecked["preflight"] == "skipped (--no-preflight)" and [n["kind"] for n in unchecked["graph"]] == ["cells"]
    assert not queued(list(nodes["cells"]["jobs"].values()))  # the blocked jobs were replaced

    second = submitted(sweep("--preflight"))  # its verdict was measured with other settings: it runs again
    preflight_job = second["jobs"][f"preflight/{SMOKE_COMBINATION}"]
    cell_jobs = [job for part, job in second["jobs"].items() if not part.startswith("preflight/")]

    def started():
        lines = status.sweep_status(sweep_dir, queue=slurm.queued_jobs)
        return all(s.state in ("running", "complete") for s in lines) and lines
    wait_for("the cells, after their preflight passed", started, 240, logs=sweep_dir / "logs")
    subprocess.run(["scancel", *cell_jobs], check=True)
    assert read_verdict(verdict_file)["verdict"] == "pass"
    times = wait_for("sacct's record of them", lambda: (t := sacct_times([preflight_job, *cell_jobs])).keys() >= {preflight_job, *cell_jobs}
                     and t, 60)  # slurmdbd records a moment later
    assert all(times[preflight_job][1] <= times[job][0] for job in cell_jobs), times


def test_the_dry_run_shows_the_job_graph_pool_then_preflight_then_cells(tmp_path, job_env):
    results_dir = tmp_path / "results"
    done = sweep_command(*POOL_CELLS, "--preflight", "--dry-run", "--results", str(results_dir), env=job_env)
    assert done.returncode == 0, done.stdout + done.stderr
    graph = done.stdout[done.stdout.index("job graph:"):]
    assert re.search(r"pool shards: 2 job\(s\).*\n\s*pool merge: 1 job, after the pool shards\n"
                     rf"\s*preflight: 1 job\(s\) \({SMOKE_COMBINATION}\), after the pool merge\n"
                     r"\s*cells: 2 job\(s\), after the pool merge and its combination's preflight\n", graph), graph
    assert "#SBATCH --dependency='afterok:<the pool merge job>'" in graph and "--job-name=nli_grpo_preflight_" in graph
    assert f"#SBATCH --dependency='afterok:<the pool merge job>:<the preflight job of {SMOKE_COMBINATION}>'" in graph
    assert "dry run: 2 of 2 cells would be submitted, after 1 preflight job(s); nothing was." in done.stdout

    cells = sweep_command(*POOL_CELLS, "--dry-run", "--results", str(results_dir), env=job_env)
    assert cells.returncode == 0, cells.stdout + cells.stderr
    assert f"preflight {SMOKE_COMBINATION}: none ran (--preflight runs it)" in cells.stdout
    assert "cells: 2 job(s), after the pool merge" in cells.stdout
    assert not results_dir.exists()  # a dry run writes nothing
