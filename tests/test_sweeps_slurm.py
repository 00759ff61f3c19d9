"""Sweeps on the real local Slurm cluster (slurm/local-cluster.sh): real submitit job arrays, real
training of the tiny model, real USR2 / `scontrol requeue` / partition preemption, and refusals
before anything is queued."""
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nli_grpo import manifest, results, slurm, status
from nli_grpo.layout import CONFIG_SNAPSHOT_FILENAME, MANIFEST_FILENAME, RESULT_FILENAME, CellFolder

pytestmark = [pytest.mark.slurm, pytest.mark.usefixtures("slurm_cluster")]

REPO = Path(__file__).resolve().parent.parent
QUICK_EVAL = ["eval.limit=2", "eval.benchmarks=[anli_r1,hans_subsequence]"]


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
    return {j: s for j, s in slurm.queued_jobs().items() if j in job_ids}


def test_smoke_sweep_runs_as_one_array_to_completion_and_a_rerun_submits_nothing(tmp_path, job_env):
    done = sweep_command("--smoke", "--cluster", "slurm", "--partition", "gpu", "--results", str(tmp_path), *QUICK_EVAL, env=job_env)
    assert done.returncode == 0, done.stdout + done.stderr
    sweep_dir = tmp_path / "lora_rank-smoke"
    [submission] = manifest.read_manifest(sweep_dir)["submissions"]
    jobs = submission["jobs"]
    assert sorted(jobs) == ["tiny__bf16__r16__s0", "tiny__bf16__r8__s0"]
    arrays = {j.split("_")[0] for j in jobs.values()}
    assert len(arrays) == 1 and all("_" in j for j in jobs.values()), f"expected one array, got {jobs}"
    assert f"submitted 2 of 2 cells (slurm: {arrays.pop()})" in done.stdout

    def all_complete():
        lines = status.sweep_status(sweep_dir, queue=slurm.queued_jobs)
        return all(s.state == "complete" for s in lines) and not queued(set(jobs.values())) and lines
    lines = wait_for("both cells complete", all_complete, 240, logs=sweep_dir / "logs")
    assert [(s.state, s.steps_done, s.max_steps) for s in lines] == [("complete", 12, 12)] * 2
    for cell_id, job_id in jobs.items():
        doc = results.read_result(CellFolder(sweep_dir / cell_id).result)  # validates the schema
        assert doc["status"] == "complete" and doc["train"]["steps_done"] == 12 and set(doc["eval"]) == {"anli_r1", "hans_subsequence"}
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
                         "--results", str(tmp_path), f"grpo.max_steps={max_steps}", "grpo.save_steps=2",
                         "grpo.max_completion_length=128", "eval.after_training=false", env=job_env)
    assert done.returncode == 0, done.stdout + done.stderr
    sweep_dir = tmp_path / "lora_rank-smoke"
    run_dir = sweep_dir / "tiny__bf16__r8__s0"
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


@pytest.mark.parametrize("argv, message", [
    (["--partition", "nosuch"], "partition 'nosuch' does not exist on this cluster; use --partition with one of: gpu, cpu, urgent"),
    (["--partition", "gpu", "--ranks", "0"], "lora.rank=0 must be a positive integer"),
    (["--partition", "gpu", "model.name_or_path=acme/SuperNLI-9B"], "unknown model 'acme/SuperNLI-9B'"),
    (["--partition", "gpu", "model.name_or_path=Qwen/Qwen2.5-7B-Instruct-AWQ", "model.quantization=awq"],
     "model.quantization=awq needs a pre-quantised AWQ checkpoint (e.g. Qwen/Qwen2.5-7B-Instruct-AWQ) and a GPU node"),
    (["--partition", "gpu", "--gpus-per-node", "8"], "asks for 8 GPUs per node; partition gpu has at most 4"),
    (["--partition", "gpu", "--results", "{blocker}/results"], "cannot be created: {blocker} is a file"),
], ids=["unknown-partition", "rank-0", "unknown-model", "awq-on-cpu-node", "too-many-gpus", "unwritable-results"])
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
