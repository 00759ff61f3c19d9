"""A sweep as one job graph: the pool's shards and merge (when cells train on a pool not built
yet), one preflight per combination (`--preflight`), then the cells, each after what it needs.
Every node is a job array (launch.ArrayNode) with its Slurm dependencies; beside the nodes, the
graph names what exists already and is used as it is (a complete or queued pool, a verdict of the
same settings, a preflight job in the queue).

    graph = plan_graph(todo, target, pool_plan, pool, preflight=True, checks=checks, ...)
    print(describe(graph))             # the dry run and the submission print the same graph
    queued = submit(graph)             # one function submits every node (launch.submit_graph)

Each node is recorded in the sweep's manifest as its sbatch returns: the submission's `graph`
lists the nodes with their jobs and what they wait on, which `status` reads back
(`recorded_graph`). A new kind of job is a new node builder here, not a new branch of the sweep.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from . import launch, manifest, slurm, verdict
from .config import read_snapshot
from .layout import LOGS_DIRNAME, preflight_file
from .pool import Pool, PoolPlan, pool_nodes
from .results import ResultError

#: A preflight job's time limit (minutes) when its cells ask for more: it trains a few steps, not a cell.
PREFLIGHT_TIME_MIN = 30
#: Settings the cells of one combination may differ in and share a verdict (verdict.combination:
#: LoRA rank, seed, loss settings): they change neither loading, memory, agreement nor step time.
NOT_MEASURED = ("stage", "seed", "output", "lora.rank", "lora.alpha", "lora.dropout", "grpo.epsilon", "grpo.scale_rewards",
                "grpo.loss_type", "grpo.learning_rate", "grpo.lr_scheduler_type", "grpo.warmup_steps", "grpo.weight_decay",
                "grpo.max_grad_norm", "grpo.loss_temperature", "grpo.temperature", "grpo.top_k", "grpo.top_p",
                "grpo.logging_steps", "grpo.save_total_limit")


# --------------------------------------------------------------------------- the verdicts cells are checked against
@dataclass
class Check:
    """A combination's preflight as the cells to submit see it."""

    combination: str
    doc: dict | None = None
    """The verdict document, when one was written for these settings."""
    problem: str = ""
    """Why the verdict file cannot be read."""
    changed: list = field(default_factory=list)
    """Settings (dotted keys) the verdict on file was measured with and the cells now differ in."""

    @property
    def state(self) -> str:
        """pass, warn, fail, none (no verdict for these settings), unreadable."""
        if self.problem:
            return "unreadable"
        return self.doc["verdict"] if self.doc else "none"

    def shown(self) -> str:
        if self.changed:
            return f"none for these settings (its verdict measured other {', '.join(self.changed[:4])}; --preflight runs it)"
        return {"none": "none ran (--preflight runs it)", "unreadable": f"unreadable ({self.problem})"}.get(self.state, self.state)


def _flat(doc: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in doc.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def measured_changes(before: dict, now: dict) -> list[str]:
    """Dotted keys of two `to_dict()` configs that differ and that a preflight measures (all but NOT_MEASURED)."""
    a, b = _flat(before), _flat(now)
    return [key for key in sorted({*a, *b}) if a.get(key) != b.get(key)
            and not any(key == n or key.startswith(f"{n}.") for n in NOT_MEASURED)]


def by_combination(cells: list) -> dict[str, list]:
    """Planned cells with a config by the preflight they need (verdict.combination), in plan order."""
    groups: dict[str, list] = {}
    for c in cells:
        if c.cfg is not None:
            groups.setdefault(verdict.combination(c.cfg), []).append(c)
    return groups


def read_checks(sweep_dir: Path, cells: list) -> dict[str, Check]:
    """The preflight of each combination of the cells, as its first cell's settings see it: a
    verdict measured with other settings counts as none."""
    checks = {}
    for combo, group in by_combination(cells).items():
        check, path = Check(combo), preflight_file(sweep_dir, combo)
        if path.exists():
            try:
                doc = verdict.read_verdict(path)
            except ResultError as err:
                check.problem = str(err)
            else:
                check.changed = measured_changes(doc.get("config") or {}, group[0].cfg.to_dict())
                check.doc = None if check.changed else doc
        checks[combo] = check
    return checks


def queued_preflights(sweep_dir: Path, cells: list, queue: Callable[[list], dict]) -> dict[str, str]:
    """combination -> job id of the preflights recorded in the sweep's manifest that are in the
    queue (pending or running, not blocked) for the settings of the combination's first cell: a
    run with --preflight waits on them instead of submitting another."""
    jobs = manifest.preflight_jobs(manifest.read_manifest(sweep_dir))
    if not jobs:
        return {}
    states = queue(list(jobs.values()))
    found = {}
    for combo, group in by_combination(cells).items():
        job = jobs.get(combo)
        if job and states.get(job) and states[job] != slurm.BLOCKED:
            submitted = read_snapshot(preflight_file(sweep_dir, combo).with_suffix(".yaml"))
            if submitted is not None and not measured_changes(submitted.to_dict(), group[0].cfg.to_dict()):
                found[combo] = job
    return found


def refuse_failed(cells: list, checks: dict[str, Check]) -> None:
    """Refuse the cells to submit of a combination whose preflight failed with these settings (or
    whose verdict file is broken)."""
    for combo, group in by_combination([c for c in cells if c.action == "submit"]).items():
        check = checks.get(combo)
        if check is None or check.state not in ("fail", "unreadable"):
            continue
        problem = check.problem or f"its combination {combo} failed preflight: {verdict.fail_reasons(check.doc)}"
        for c in group:
            c.problems.append(f"{problem}. Fix that and run --preflight again, leave these cells out (--models, "
                              "--quantizations), or submit them all the same with --no-preflight")


# --------------------------------------------------------------------------- the graph
@dataclass
class Target:
    """Where a sweep's jobs go: its folder, the stem of its job names, the launch options."""

    sweep_dir: Path
    name: str
    options: launch.LaunchOptions
    max_array_size: int = 1001

    @property
    def log_folder(self) -> Path:
        return self.sweep_dir / LOGS_DIRNAME


@dataclass
class Graph:
    """The jobs to submit, in order, and what exists already."""

    nodes: list = field(default_factory=list)
    existing: list = field(default_factory=list)
    """Lines: what the graph uses as it is."""
    notes: list = field(default_factory=list)
    """Lines: what is left out, and why."""
    cells: list = field(default_factory=list)
    """The planned cells the graph submits."""
    cluster: str = "slurm"
    record: dict | None = None
    """The sweep manifest's record of this submission (None in a dry run)."""

    def jobs(self, kind: str) -> int:
        return sum(len(n.jobs) for n in self.nodes if n.kind == kind)


def plan_graph(todo: list, target: Target, checks: dict[str, Check], *, pool: Pool | None = None,
               pool_plan: PoolPlan | None = None, preflight: bool = False, queued_preflights: dict | None = None,
               room: Callable[[int], tuple] | None = None, book: manifest.Book | None = None,
               pool_book: manifest.Book | None = None, described_cells: list = ()) -> Graph:
    """The sweep's job graph for the cells to submit (`todo`, planned cells with `.cfg`,
    `.run_dir`, `.dependency` on a job queued before): the pool's nodes when `pool_plan` has
    parts to submit; with `preflight`, one preflight per combination whose verdict for these
    settings is not pass / warn and that has no preflight job queued (`queued_preflights`:
    combination -> job id), the cells after it; the cells, as job arrays. `room(other_jobs)`
    trims the cells to a submit limit (and notes why). `book` / `pool_book`: the manifests each
    node is recorded in as it is queued (None: a dry run), with `described_cells` (the sweep's
    cells) among the manifest's cells."""
    graph = Graph(cluster=target.options.cluster)
    if pool_plan is not None:
        if pool_plan.to_submit:
            graph.nodes += pool_nodes(pool, pool_plan, target.options, pool_book)
        elif pool_plan.merge_job:
            graph.existing.append(f"pool merge: job {pool_plan.merge_job}, queued already")
    preflights = _preflight_nodes(todo, target, checks, graph, queued_preflights or {}) if preflight else {}
    if room is not None:
        todo, cut = room(sum(len(n.jobs) for n in graph.nodes))
        graph.notes += [f"submit limit: {cut}"] if cut else []
    graph.cells = todo
    merge = ("pool merge",) if any(n.kind == "pool merge" for n in graph.nodes) else ()
    for c in todo:
        combo = verdict.combination(c.cfg)
        c.after = (merge if c.waits_on_pool else ()) + preflights.get(combo, ())
    graph.nodes += _cell_nodes(todo, target)
    if book is not None:
        graph.record = manifest.submission_record(target.options.cluster, target.log_folder, {}, target.options.retries)
        graph.record["graph"] = []
        described = {c.cell_id: c.description() for c in described_cells}
        for node in graph.nodes:
            node.record = _recording(node, book, described, graph.record)
    return graph


def _preflight_nodes(todo: list, target: Target, checks: dict[str, Check], graph: Graph,
                     queued: dict[str, str]) -> dict[str, tuple]:
    """Add the preflight nodes: one job per combination that needs one, running `python -m
    nli_grpo.preflight` on its first cell's config with that cell's resources (at most
    PREFLIGHT_TIME_MIN), after what its cells wait on (the pool); one array per distinct Slurm
    parameters. Returns what each combination's cells wait on: (node, combination) in the graph;
    a preflight queued before goes into their `dependency`."""
    groups: dict[str, tuple[dict, tuple, dict, dict]] = {}
    after: dict[str, tuple] = {}
    options = target.options
    for combo, cells in by_combination(todo).items():
        cfg, check = cells[0].cfg, checks.get(combo) or Check(combo)
        if reason := verdict.refusal(cfg):
            graph.notes.append(f"not preflighted: {combo}: {reason}")
        elif check.state in ("pass", "warn"):
            graph.existing.append(f"preflight {combo}: {check.state}, measured {check.doc.get('created', '?')} with these settings")
        elif job := queued.get(combo):
            graph.existing.append(f"preflight {combo}: job {job}, queued already; its cells wait on it")
            for c in cells:
                c.dependency = ",".join(filter(None, [c.dependency, f"afterok:{job}"]))
        else:
            out = preflight_file(target.sweep_dir, combo)
            resources = replace(cfg.resources, timeout_min=min(cfg.resources.timeout_min, PREFLIGHT_TIME_MIN))
            dependency = next((c.dependency for c in cells if c.dependency), None)
            params = launch.executor_parameters(resources, options, f"nli_grpo_preflight_{target.name}", dependency)
            command = [sys.executable, "-u", "-m", "nli_grpo.preflight", "--config", str(out.with_suffix(".yaml")),
                       "--out", str(out), "--signal-delay-s", str(options.signal_delay_s)]
            # gpus=1: one process (no torchrun), which sees all of the job's GPUs
            job = launch.CellJob(command, str(out.parent), options.stop_timeout_s, resources.cpus_per_task, 1, options.retries,
                                 options.online, exclusive=False)
            pool_wait = ("pool merge",) if any(c.waits_on_pool for c in cells) and any(n.kind == "pool merge" for n in graph.nodes) else ()
            key = json.dumps([params, pool_wait], sort_keys=True)
            _, _, jobs, configs = groups.setdefault(key, (params, pool_wait, {}, {}))
            jobs[combo], configs[combo] = job, cfg
    for i, (params, pool_wait, jobs, configs) in enumerate(groups.values(), 1):
        name = "preflight" if len(groups) == 1 else f"preflight {i}"

        def prepare(configs=configs) -> None:
            for combo, cfg in configs.items():
                launch.write_config_snapshot(cfg, target.sweep_dir, preflight_file(target.sweep_dir, combo).with_suffix(".yaml"))
        graph.nodes.append(launch.ArrayNode(name, params, jobs, target.log_folder, lambda queued: None,
                                            after=pool_wait, kind="preflight", prepare=prepare))
        after.update({combo: ((name, combo),) for combo in jobs})
    return after


def _cell_nodes(todo: list, target: Target) -> list[launch.ArrayNode]:
    """The cells as the job arrays of launch.array_groups (one per distinct Slurm parameters and
    jobs waited on, chunked to MaxArraySize), each writing its cells' config snapshots first."""
    nodes = []
    groups = launch.array_groups(todo, target.options, f"nli_grpo_{target.name}", target.max_array_size)
    for i, (params, chunk) in enumerate(groups, 1):
        def prepare(chunk=chunk) -> None:
            for c in chunk:
                launch.write_config_snapshot(c.cfg, c.run_dir)
        nodes.append(launch.ArrayNode("cells" if len(groups) == 1 else f"cells {i}", params,
                                      {c.cell_id: launch.cell_job(c, target.options) for c in chunk}, target.log_folder,
                                      lambda queued: None, after=chunk[0].after, kind="cells", prepare=prepare))
    return nodes


def _recording(node: launch.ArrayNode, book: manifest.Book, described: dict, record: dict) -> Callable[[dict], None]:
    """node's record: its own (the pool's manifest), then the sweep's: the node in the
    submission's graph, its preflight and cell jobs among the submission's jobs."""
    own = node.record

    def keep(queued: dict) -> None:
        own(queued)
        ids = manifest.job_ids(queued)
        record["graph"].append({"node": node.name, "kind": node.kind, "jobs": ids, "after": [_ref_text(r) for r in node.after],
                                "dependency": _dependency(node)})
        if node.kind == "preflight":
            record["jobs"].update({f"{manifest.PREFLIGHT_PART}{combo}": job for combo, job in ids.items()})
        elif node.kind == "cells":
            record["jobs"].update(ids)
        book.record(described, record)
    return keep


def _ref_text(ref) -> str:
    return f"{ref[0]}/{ref[1]}" if isinstance(ref, tuple) else ref


def submit(graph: Graph) -> dict[str, dict]:
    """Submit every node in order (launch.submit_graph): {node name: {part: job}}; raises
    launch.SubmissionError at the first failed sbatch, what was queued before it recorded. A
    node after a failed job on this machine (local executors) is not submitted: absent."""
    return launch.submit_graph(graph.nodes, graph.cluster)


# --------------------------------------------------------------------------- showing it
def describe(graph: Graph, checks: dict[str, Check] | None = None) -> str:
    """The graph as lines, in submission order: each kind of job with its count and what it waits
    on, what exists already, what is left out. `checks`: the verdicts the cells are checked against
    (without --preflight)."""
    lines = ["job graph:"]
    kinds: dict[str, list] = {}
    for node in graph.nodes:
        kinds.setdefault(node.kind, []).append(node)
    for kind, nodes in kinds.items():
        parts = [p for n in nodes for p in n.jobs]
        count = f"{len(parts)} job" if kind == "pool merge" else f"{len(parts)} job(s)"
        listed = f" ({', '.join(parts)})" if kind in ("pool shards", "preflight") else ""
        lines.append(f"  {kind}: {count}{listed}{_waits(nodes, len(parts))}")
    for combo, check in (checks or {}).items():
        lines.append(f"  preflight {combo}: {check.shown()}" + (" (its cells are refused)" if check.state == "fail" else ""))
    if "cells" not in kinds:
        lines.append("  cells: 0 job(s)")
    lines += [f"  uses: {line}" for line in graph.existing] + [f"  {line}" for line in graph.notes]
    return "\n".join(lines)


def _waits(nodes: list, total: int) -> str:
    """', after X' for the nodes of one kind: what their jobs wait on, in the graph or queued before."""
    refs = {f"the {ref}" if isinstance(ref, str) else "its combination's preflight" for n in nodes for ref in n.after}
    said = [r for r in ("the pool shards", "the pool merge", "its combination's preflight") if r in refs]
    if any(_dependency(n) for n in nodes):
        said.append("jobs queued already")
    waiting = sum(len(n.jobs) for n in nodes if n.after or _dependency(n))
    if not said:
        return ""
    return f", {'' if waiting == total else f'{waiting} of them '}after {' and '.join(said)}"


def _dependency(node: launch.ArrayNode) -> str | None:
    return node.parameters.get("slurm_additional_parameters", {}).get("dependency")


def sbatch_scripts(graph: Graph) -> list[tuple[str, str]]:
    """(title, the sbatch script submitit would write) of every node, its dependency on the jobs
    of earlier nodes named in angle brackets (they have no ids before submission)."""
    out = []
    for node in graph.nodes:
        params = dict(node.parameters)
        params["slurm_additional_parameters"] = {**params.get("slurm_additional_parameters", {}),
                                                 "dependency": launch.dependency_text(node)}
        if params["slurm_additional_parameters"]["dependency"] is None:
            del params["slurm_additional_parameters"]["dependency"]
        out.append((f"{node.name}: {len(node.jobs)} job(s) ({', '.join(list(node.jobs)[:6])}{', ...' if len(node.jobs) > 6 else ''})",
                    launch.sbatch_script(node.log_folder, params, len(node.jobs))))
    return out


def recorded_graph(sweep_dir: Path) -> list[dict]:
    """The nodes of the sweep's submissions as recorded (oldest first): node, kind, jobs, after."""
    return [{**entry, "submitted_at": s.get("submitted_at")} for s in manifest.read_manifest(sweep_dir)["submissions"]
            for entry in s.get("graph", [])]

