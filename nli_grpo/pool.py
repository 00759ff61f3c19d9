"""The paper's training pool on a cluster: declared by a sweep, built by a job array of shards and a
merge job that depends on them, and depended on by the training cells that need it.

    python sweeps/bootstrap.py --partition gpu [--shards 16]   # the pool alone
    python sweeps/paper.py --partition gpu                      # the pool (when missing), then the cells

A `Pool` says what to sample (base model, k samples per ANLI training item, the accuracy below
which an item is hard, the seed) and how to split the work (shards, resources per shard). Its
folder, `results/bootstrap/<pool id>/` (nli_grpo.layout.PoolFolder), is named after what it samples,
so the same declaration always finds the same pool, and holds the shards' work, the pool and its
record. `plan_pool` finds what is missing (shards not complete and not queued, then the merge with
`afterok` on them) or the queued merge to wait on; `pool_nodes` are the job arrays that build it,
in a sweep's job graph (nli_grpo.graph) before the cells, or alone (`ensure_pool`, sweeps/bootstrap.py).
The sampling itself is nli_grpo.bootstrap's, on the node.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from . import launch, manifest, slurm
from .catalog import default_quantization, model_key
from .config import ResourcesConfig
from .grid import SIZE_RESOURCES
from .layout import LOGS_DIRNAME, PoolFolder
from .results import atomic_write_json, load_json

POOL_SWEEP_DIRNAME = "bootstrap"
MERGE_ID = "merge"
#: The merge reads every chunk and writes the pool: a CPU job of minutes.
MERGE_RESOURCES = ResourcesConfig(gpus_per_node=0, cpus_per_task=2, mem_gb=16, timeout_min=60)


@dataclass(frozen=True)
class Pool:
    """A hard-example pool: ANLI training items the base model mostly gets wrong (paper-facts.md:
    "ANLI train items that are difficult for Qwen2.5-7B"), rebuilt by sampling."""

    base: str = "Qwen/Qwen2.5-7B-Instruct"
    """The model whose difficulties define the pool."""
    quantization: str | None = None
    """Of the base (None: what its name implies)."""
    samples: int = 4
    """Completions per item (the GRPO group size)."""
    below: float = 0.5
    """An item is hard when the share of its completions with the gold label is below this."""
    seed: int = 0
    """Seeds the sampling, chunk by chunk: the same pool whatever the number of shards or restarts."""
    limit: int | None = None
    """Only the first N items of each round (a quick look)."""
    rounds: tuple = ("anli_train_r1", "anli_train_r2", "anli_train_r3")
    recipe: str = "paper"
    """Recipe of the sampling settings (temperature, top-k, max length) and the data settings."""
    overrides: tuple = ()
    """Further config overrides of the sampling run (e.g. eval.backend=hf)."""
    chunk_items: int = 256
    """Items per chunk: the unit written whole, and what a preemption can cost."""
    shards: int = 8
    """Jobs of the array (split by chunks; the pool does not depend on it)."""
    resources: dict = field(default_factory=lambda: dict(SIZE_RESOURCES["7b"]))
    """What one shard job asks Slurm for."""

    def spec(self) -> dict:
        """What the pool's content depends on (not the shards or resources): written into its
        folder, read by the jobs, and hashed into the folder's name."""
        spec = asdict(self)
        for key in ("shards", "resources"):
            spec.pop(key)
        spec.update(rounds=list(self.rounds), overrides=list(self.overrides),
                    quantization=self.quantization or default_quantization(self.base))
        return spec

    @property
    def pool_id(self) -> str:
        digest = hashlib.sha256(json.dumps(self.spec(), sort_keys=True).encode()).hexdigest()[:8]
        spec = self.spec()
        return f"{model_key(self.base)}__{spec['quantization']}__k{self.samples}-below{self.below}-s{self.seed}__{digest}"

    def smoke(self) -> Pool:
        """The same pool shape on the tiny model and the shipped samples, on the CPU, in seconds."""
        return replace(self, base="tiny", quantization="bf16", recipe="smoke", shards=2, chunk_items=8,
                       overrides=("grpo.max_completion_length=8",),
                       resources={"gpus_per_node": 0, "cpus_per_task": 1, "mem_gb": 4, "timeout_min": 30})

    @classmethod
    def from_spec(cls, spec: dict, shards: int = 1) -> Pool:
        """The pool a spec (its folder's pool_spec.json) describes, split into `shards`."""
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in spec.items()}, shards=shards)

    def folder(self, results_root: str | Path) -> PoolFolder:
        return PoolFolder(Path(results_root).absolute() / POOL_SWEEP_DIRNAME / self.pool_id)


def sampling_config(spec: dict):
    """The run config a pool is sampled with: the recipe, its overrides, the base model."""
    from .config import load_config

    return load_config(spec["recipe"], [*spec["overrides"], f"model.name_or_path={spec['base']}", "stage=zero_shot",
                                        f"model.quantization={spec['quantization']}", f"seed={spec['seed']}"])


def input_problems(pool: Pool, online: bool = False) -> list[str]:
    """What the shard jobs could not find: the base model (in the cache, unless the nodes reach the
    hub) and the ANLI training rounds (a local file or prepared, unless the hub can give them)."""
    from .data import TRAIN_SOURCES, local_file
    from .grid import input_problems as cell_input_problems

    cfg = sampling_config(pool.spec())
    cfg.eval.after_training = False  # the model only: the rounds are checked below
    problems = cell_input_problems(cfg, online)
    missing = [r for r in pool.rounds if local_file(TRAIN_SOURCES[r], cfg.data.local_dir, cfg.data.files) is None and not online]
    if missing:
        problems.append(f"the pool's ANLI training rounds are neither local nor prepared: {', '.join(missing)}")
    return problems


def write_spec(pool: Pool, folder: PoolFolder) -> None:
    """The spec the jobs sample by (the folder's name is its hash: an existing one is the same)."""
    if not folder.spec.is_file():
        atomic_write_json(folder.spec, pool.spec())


def chunk_count(items: int, chunk_items: int) -> int:
    return -(-items // chunk_items)


def shard_chunks(index: int, count: int, chunks: int) -> list[int]:
    """The chunks shard `index` of `count` samples: every count-th one."""
    return list(range(index, chunks, count))


# --------------------------------------------------------------------------- where a pool stands
@dataclass
class PartState:
    """A shard or the merge: its state and its latest job."""

    part: str
    state: str
    """complete, queued (pending / running), blocked (waits on a failed job), failed, preempted, missing."""
    job_id: str | None = None
    detail: str = ""
    done: int | None = None
    total: int | None = None


def part_states(pool: Pool, folder: PoolFolder, queue: dict | None) -> list[PartState]:
    """Every shard's and the merge's state, from their state files, the manifest and the queue
    (None: the files alone decide)."""
    jobs = manifest.latest_jobs(manifest.read_manifest(folder.path))
    parts = [(folder.shard_id(i, pool.shards), folder.shard_state(i, pool.shards)) for i in range(pool.shards)]
    parts.append((MERGE_ID, folder.merge_state))
    states = []
    for part, path in parts:
        doc = load_json(path) or {}
        job_id, _ = jobs.get(part, (None, None))
        queued = (queue or {}).get(job_id) if job_id else None
        line = PartState(part, doc.get("status") or "missing", job_id, doc.get("error") or "", doc.get("done"), doc.get("total"))
        if part == MERGE_ID and folder.complete():
            line.state = "complete"
        elif line.state == "complete" and not all(folder.chunk(k).is_file() for k in doc.get("chunks", [])):
            line.state, line.detail = "incomplete", "chunks of it are missing (deleted?): it samples them again when resubmitted"
        elif queued == "BLOCKED":
            line.state, line.detail = "blocked", "waits on a job that failed; rerun the sweep to resubmit"
        elif queued:
            line.state, line.detail = "queued", queued.lower()
        elif line.state == "running" and queue is not None and job_id:
            line.state, line.detail = "failed", f"job {job_id} left the queue while running (see its log)"
        states.append(line)
    return states


def folder_states(folder: PoolFolder, queue: dict | None) -> list[PartState]:
    """The parts of a submitted pool, its shard count from its manifest."""
    cells = manifest.read_manifest(folder.path)["cells"]
    shards = sum(1 for part in cells if part.startswith("shard-")) or 1
    return part_states(Pool.from_spec(load_json(folder.spec), shards), folder, queue)


# --------------------------------------------------------------------------- submitting
@dataclass
class PoolPlan:
    """What a sweep does about a pool: nothing (it is complete), wait on a job, or submit parts."""

    folder: PoolFolder
    complete: bool = False
    merge_job: str | None = None
    """The queued merge job the training cells wait on (`afterok`), when no merge is submitted now."""
    submitted: dict = field(default_factory=dict)
    """part -> job id, submitted now."""
    to_submit: list = field(default_factory=list)
    """Parts a (dry) run submits."""
    queued_shards: list = field(default_factory=list)
    """Job ids of shards queued before, which a merge submitted now waits on."""
    replace: list = field(default_factory=list)
    """Job ids of parts waiting forever on a failed job (or a merge waiting on shards submitted
    again): cancelled when the parts are submitted."""

    @property
    def shards(self) -> list[str]:
        return [p for p in self.to_submit if p != MERGE_ID]


def shard_command(folder: PoolFolder, index: int, count: int) -> list[str]:
    return [sys.executable, "-u", "-m", "nli_grpo.bootstrap", "--pool-dir", str(folder.path), "--shard", f"{index}/{count}"]


def merge_command(folder: PoolFolder) -> list[str]:
    return [sys.executable, "-u", "-m", "nli_grpo.bootstrap", "--pool-dir", str(folder.path), "--merge"]


def plan_pool(pool: Pool, results_root: str | Path, queued: dict | None) -> PoolPlan:
    """What is missing of the pool: the shards neither complete nor queued and, unless a merge is
    queued already (then the job to wait on), the merge. `queued`: the queue's states of the
    pool's recorded jobs (slurm.queued_jobs; None: the files alone decide)."""
    folder = pool.folder(results_root)
    plan = PoolPlan(folder)
    if folder.complete():
        plan.complete = True
        return plan
    states = {s.part: s for s in part_states(pool, folder, queued)}
    shards = [folder.shard_id(i, pool.shards) for i in range(pool.shards)
              if states[folder.shard_id(i, pool.shards)].state not in ("complete", "queued")]
    merge = states[MERGE_ID]
    if merge.state == "queued" and not shards:
        plan.merge_job = merge.job_id
        return plan
    plan.to_submit = [*shards, MERGE_ID]
    plan.queued_shards = [s.job_id for p, s in states.items() if p != MERGE_ID and s.state == "queued"]
    plan.replace = [s.job_id for s in states.values() if s.state == "blocked" and s.job_id]
    if merge.state == "queued":
        plan.replace.append(merge.job_id)  # it waits on shards that are submitted again now
    return plan


def pool_nodes(pool: Pool, plan: PoolPlan, options: launch.LaunchOptions, book: manifest.Book | None) -> list[launch.ArrayNode]:
    """The job arrays that build what the plan finds missing: the shards (one array), then the
    merge after them and after the shards queued before; each recorded in the pool's manifest
    (`book`; None in a dry run) as its sbatch returns."""
    if not plan.to_submit:
        return []
    folder = plan.folder
    log_folder = folder.path / LOGS_DIRNAME
    index = {folder.shard_id(i, pool.shards): i for i in range(pool.shards)}
    parts = {part: {"command": shard_command(folder, i, pool.shards)} for part, i in index.items()} | {
        MERGE_ID: {"command": merge_command(folder)}}
    record = manifest.submission_record(options.cluster, log_folder, {}, options.retries)

    def keep(jobs: dict) -> None:
        record["jobs"].update(manifest.job_ids(jobs))
        plan.submitted.update(manifest.job_ids(jobs))
        book.record(parts, record)

    def prepare() -> None:  # before the first sbatch: the spec the jobs read; what they replace goes
        write_spec(pool, folder)
        if plan.replace:
            slurm.cancel(plan.replace)

    nodes = []
    if plan.shards:
        params = launch.executor_parameters(ResourcesConfig(**pool.resources), options, f"nli_grpo_bootstrap_{pool.pool_id[:40]}")
        nodes.append(launch.ArrayNode("pool shards", params, {
            part: launch.CellJob(shard_command(folder, index[part], pool.shards), str(folder.path), options.stop_timeout_s,
                                 pool.resources.get("cpus_per_task", 1), pool.resources.get("gpus_per_node", 0),
                                 options.retries, options.online, exclusive=False)
            for part in plan.shards}, log_folder, keep, kind="pool shards", prepare=prepare))
    waits = plan.queued_shards if options.cluster == "slurm" else []  # local executors know no queue
    params = launch.executor_parameters(MERGE_RESOURCES, options, "nli_grpo_bootstrap_merge",
                                        dependency=f"afterok:{':'.join(waits)}" if waits else None)
    nodes.append(launch.ArrayNode("pool merge", params, {MERGE_ID: launch.CellJob(
        merge_command(folder), str(folder.path), options.stop_timeout_s, 2, 0, options.retries, options.online, exclusive=False)},
        log_folder, keep, after=("pool shards",) if plan.shards else (), kind="pool merge",
        prepare=None if plan.shards else prepare))
    return nodes


def ensure_pool(pool: Pool, results_root: str | Path, options: launch.LaunchOptions,
                queue: Callable[[list], dict] | None, dry_run: bool = False) -> PoolPlan:
    """The pool alone (sweeps/bootstrap.py): plan what is missing (plan_pool) and, unless a dry
    run, submit it (pool_nodes, launch.submit_graph; SubmissionError when an sbatch fails), the
    pool's manifest locked from reading the queue to the last record. A sweep whose cells train
    on the pool puts the same nodes in its own graph (nli_grpo.graph)."""
    folder = pool.folder(results_root)
    with contextlib.ExitStack() as held:
        book = None if dry_run else held.enter_context(manifest.held(folder.path))
        plan = plan_pool(pool, results_root, queue(manifest.recorded_jobs(folder.path)) if queue is not None else None)
        if not dry_run and plan.to_submit:
            queued = launch.submit_graph(pool_nodes(pool, plan, options, book), options.cluster)
            if options.cluster != "slurm":  # this machine runs them: wait (a failure shows in the pool's state files)
                launch.wait_for([job for jobs in queued.values() for job in jobs.values()])
    plan.complete = folder.complete()
    return plan


def describe_plan(plan: PoolPlan) -> str:
    """One line for the sweep's output."""
    if plan.complete:
        return f"pool {plan.folder.path}: complete"
    if plan.submitted:
        return (f"pool {plan.folder.path}: submitted {', '.join(f'{p} ({j})' for p, j in plan.submitted.items())}; "
                f"the training cells wait on the merge (job {plan.submitted.get(MERGE_ID, '?')})")
    if plan.merge_job:
        return f"pool {plan.folder.path}: being built; the training cells wait on its merge (job {plan.merge_job})"
    return f"pool {plan.folder.path}: missing; would submit {', '.join(plan.to_submit)}, and the training cells after its merge"


