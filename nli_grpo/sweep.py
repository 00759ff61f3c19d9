"""The sweep command line shared by every `sweeps/*.py`: expand the grid, validate every cell, show
the plan, submit what is missing as Slurm job arrays, record it in the sweep's manifest.

A sweep file only declares its axes::

    SWEEP = Sweep(name="lora_rank", recipe="lora_rank",
                  axes={"lora.rank": [8, 16, 32, 64, 128], "model": [qwen("7b", "bf16"), qwen("7b", "awq")]})
    if __name__ == "__main__":
        raise SystemExit(SWEEP.main())

and `python sweeps/lora_rank.py --partition gpu` submits it and returns; running the same command
again submits only the cells that are not complete and not in the queue (`--force`: also the
complete ones, whose old folder is moved to `<sweep>/.replaced/`). Nothing is submitted when any
cell is invalid, or changed: its earlier run, complete or not, used other settings (`--force`
reruns it afresh). `--smoke` runs the sweep's shape on the tiny model on this machine in minutes.
The whole submission is one job graph (nli_grpo.graph): the pool's shards and merge when cells
train on a pool not built yet, with `--preflight` one preflight job per combination of the cells
(nli_grpo.preflight) and each combination's cells after it, then the cells; the dry run prints it,
one function submits it. A run without `--preflight` refuses the cells of a combination whose
verdict for these settings is `fail` (`--no-preflight` submits them all the same).
Exit codes: 0 submitted / nothing to do / dry run, 1 a submission failed, 2 refused.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import shlex
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from . import files, graph, launch, manifest, slurm, status, verdict
from .catalog import model_key
from .config import ConfigError, ExperimentConfig
from .grid import (
    Grid,
    capability_problems,
    cell_from_config,
    estimate_gpu_memory,
    input_problems,
    memory_problems,
    restrict_axis,
    server_gpus,
    server_memory_share,
    server_weights_gb,
)
from .job import config_for_run, conflicting_inputs
from .layout import LOGS_DIRNAME, MANIFEST_FILENAME, PREFLIGHT_DIRNAME, REPLACED_DIRNAME, CellFolder
from .pool import Pool, describe_plan, ensure_pool, plan_pool
from .pool import input_problems as pool_input_problems

SMOKE_RECIPE = "smoke"
#: Keys a smoke run takes from the smoke recipe, whatever the sweep's axes say: the tiny model in
#: bf16 on the CPU, and the smoke recipe's resources...
SMOKE_OWNED_PREFIXES = ("model.", "resources.")
#: ...but one CPU thread per cell: the tiny model is fastest so, and cells run side by side on a small machine.
SMOKE_OVERRIDES = ["resources.cpus_per_task=1"]
#: CLI flags that restrict an axis: flag -> (dotted key, type, help).
AXIS_FLAGS = {
    "ranks": ("lora.rank", int, "LoRA ranks, e.g. 8,32"),
    "quantizations": ("model.quantization", str, "quantizations (bf16, awq, bnb4), e.g. bf16"),
    "models": ("model.name_or_path", str, "model sizes / names, e.g. qwen2.5-7b or Qwen/Qwen2.5-7B-Instruct"),
}
#: CLI flags that override every cell's resources: flag -> ResourcesConfig field.
RESOURCE_FLAGS = {"gpus_per_node": "gpus_per_node", "cpus_per_task": "cpus_per_task", "mem_gb": "mem_gb",
                  "gpu_memory_gb": "gpu_memory_gb", "time": "timeout_min"}


@dataclass
class Sweep:
    """A named grid: `recipe` x `axes` (see grid.Grid for plain and linked axes) plus any further
    `grids` (blocks on other recipes, e.g. the paper's rank ablation and zero-shot baselines),
    each crossed with `seeds`. Cells with the same id are one run (zero-shot cells do not depend
    on the seed or rank)."""

    name: str
    recipe: str | None = None
    axes: dict = field(default_factory=dict)
    grids: list = field(default_factory=list)
    seeds: list = field(default_factory=lambda: [0])
    description: str = ""
    pool: Pool | None = field(default_factory=Pool)
    """The hard-example pool of the cells that train on `anli_hard` without a pool file of their
    own (the paper's: ANLI items hard for Qwen2.5-7B); built first when missing (nli_grpo.pool)."""

    def blocks(self) -> list[Grid]:
        return ([Grid(self.recipe, dict(self.axes))] if self.recipe else []) + list(self.grids)

    def main(self, argv: list[str] | None = None) -> int:
        """Run the sweep command line (argv defaults to sys.argv[1:]); returns the exit code."""
        return run(self, parse_args(self, argv))


@dataclass
class PlannedCell:
    """One cell of the plan: its resolved config (None when invalid), problems and what to do."""

    label: str
    cfg: ExperimentConfig | None = None
    problems: list = field(default_factory=list)
    action: str = "submit"
    reason: str = ""
    dependency: str | None = None
    """A Slurm dependency of its job (`afterok:<merge job>` while its pool is built)."""
    blocked_job: str | None = None
    """Its earlier job, pending forever on a failed dependency (cancelled when the cell is resubmitted)."""
    waits_on_pool: bool = False
    """It trains on the sweep's pool, not built yet."""
    after: tuple = ()
    """Jobs of the same submission it waits on (launch.ArrayNode.after; set by graph.plan_graph)."""

    @property
    def cell_id(self) -> str:
        return self.cfg.output.cell_id if self.cfg else self.label

    @property
    def run_dir(self) -> Path:
        return Path(self.cfg.output.dir)

    def description(self) -> dict:
        """The cell as the manifest records it."""
        return {"cell": cell_from_config(self.cfg), "run_dir": str(self.run_dir), "command": launch.train_command(self.run_dir)}


def load_sweep_file(name_or_path: str) -> Sweep:
    """The SWEEP a sweep file declares: `sweeps/<name>.py` (from the current folder), or a path."""
    path = Path(name_or_path) if name_or_path.endswith(".py") else Path("sweeps") / f"{name_or_path}.py"
    if not path.is_file():
        shipped = sorted(p.stem for p in Path("sweeps").glob("*.py")) if Path("sweeps").is_dir() else []
        raise ValueError(f"no sweep file {path}; give a path to one, or run from the repository root"
                         + (f" (sweeps: {', '.join(shipped)})" if shipped else ""))
    spec = importlib.util.spec_from_file_location(f"sweep_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.SWEEP


# --------------------------------------------------------------------------- command line
def parse_args(sweep: Sweep, argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=f"python sweeps/{sweep.name}.py",
        description=f"{sweep.description or sweep.name} sweep: validate every cell, then submit the missing ones as Slurm job arrays.",
        epilog="Positional key=value overrides apply to every cell (e.g. grpo.max_steps=100). "
               f"Watch it with: python -m nli_grpo.status results/{sweep.name}",
    )
    _where_and_resources(parser, "resources per cell (default: per model size, from the recipe / grid)")
    parser.add_argument("--gpu-memory-gb", type=int, help="memory of one GPU of the nodes, for the fit check (default 80)")
    grid = parser.add_argument_group("grid")
    grid.add_argument("--seeds", type=_int_list, help=f"comma-separated seeds (default {','.join(map(str, sweep.seeds))})")
    for flag, (key, kind, text) in AXIS_FLAGS.items():
        grid.add_argument(f"--{flag}", type=_list_of(kind), help=f"only these {text} ({key})")
    grid.add_argument("--smoke", action="store_true", help="tiny model on the CPU with the shipped sample data: the sweep's shape, shrunk, in minutes")
    grid.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides for every cell")
    run_ = _run_arguments(parser, "the sweep writes to <results>/<sweep>/")
    run_.add_argument("--force", action="store_true", help="also resubmit complete cells (their folders move to <sweep>/.replaced/); queued ones never")
    checks = run_.add_mutually_exclusive_group()
    checks.add_argument("--preflight", action="store_true",
                        help="first one short preflight job per combination (model x quantization x rollout x GPUs) of the cells "
                             "to submit, each combination's cells after it: a failed preflight leaves its cells blocked")
    checks.add_argument("--no-preflight", action="store_true",
                        help="submit the cells of combinations whose preflight failed too (recorded in the manifest)")
    return _parse(parser, argv)


def _where_and_resources(parser: argparse.ArgumentParser, resources_title: str) -> None:
    where = parser.add_argument_group("where")
    where.add_argument("--cluster", choices=launch.CLUSTERS, help="slurm (default), local (this machine, waits), debug (in-process); --smoke defaults to local")
    where.add_argument("--partition", help="Slurm partition (default: the cluster's default partition)")
    where.add_argument("--account")
    where.add_argument("--qos")
    where.add_argument("--constraint", help="Slurm node features, e.g. a100|h100")
    where.add_argument("--array-parallelism", type=int, default=256, help="array tasks running at once (default 256)")
    res = parser.add_argument_group(resources_title)
    res.add_argument("--gpus-per-node", type=int)
    res.add_argument("--cpus-per-task", type=int)
    res.add_argument("--mem-gb", type=int)
    res.add_argument("--time", type=slurm.parse_time_min, help="time limit: minutes or [D-]HH:MM[:SS]")


def _run_arguments(parser: argparse.ArgumentParser, results_help: str):
    run_ = parser.add_argument_group("run")
    run_.add_argument("--results", default="results", help=f"results root (default results/); {results_help}")
    run_.add_argument("--dry-run", action="store_true", help="validate and print the plan and the sbatch script(s); submit nothing")
    run_.add_argument("--retries", type=int, default=launch.DEFAULT_RETRIES,
                      help="restarts of a job whose training is killed by a signal (OOM killer, node fault), per job "
                           f"(default {launch.DEFAULT_RETRIES}); errors are never retried")
    run_.add_argument("--online", action="store_true",
                      help="the compute nodes reach the hub: jobs may download, and cells need no prepared inputs "
                           "(default: jobs run offline against the cache that `python -m nli_grpo.prepare` fills)")
    return run_


def _parse(parser: argparse.ArgumentParser, argv) -> argparse.Namespace:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_intermixed_args(argv)
    args.argv = argv
    if args.retries < 0:
        parser.error(f"--retries {args.retries}: give 0 or more restarts")
    args.cluster = args.cluster or ("local" if args.smoke else "slurm")
    return args


def _list_of(kind):
    def parse(text: str) -> list:
        try:
            return [kind(x) for x in text.split(",") if x.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of {kind.__name__}") from None
    return parse


_int_list = _list_of(int)


# --------------------------------------------------------------------------- the plan
def grid_blocks(sweep: Sweep, args: argparse.Namespace) -> tuple[list[Grid], list]:
    """The sweep's blocks and seeds after the CLI's axis flags and --smoke."""
    blocks, seeds = sweep.blocks(), args.seeds or list(sweep.seeds)
    if args.smoke:
        blocks = [_smoke_block(b) for b in blocks]
        seeds = seeds if args.seeds else seeds[:1]
    for flag, (key, _, _) in AXIS_FLAGS.items():
        wanted = getattr(args, flag)
        if wanted and not (args.smoke and key.startswith(SMOKE_OWNED_PREFIXES)):  # smoke: always the tiny model
            blocks = [restrict_axis(b, key, wanted, _model_matches if flag == "models" else _equal) for b in blocks]
    return blocks, seeds


def _equal(value, wanted) -> bool:
    return value == wanted


def _model_matches(value: str, wanted: str) -> bool:
    return wanted in (value, model_key(value)) or model_key(value) == f"qwen2.5-{wanted.lower()}"


def _smoke_block(block: Grid) -> Grid:
    """The block on the smoke recipe: model and resource axes dropped (the tiny model on the CPU),
    at most two values per remaining axis."""
    axes = {}
    for name, values in block.axes.items():
        if name.startswith(SMOKE_OWNED_PREFIXES):
            continue
        if any(isinstance(v, dict) for v in values):
            kept = [{k: x for k, x in v.items() if not k.startswith(SMOKE_OWNED_PREFIXES)} for v in values]
            values = [v for i, v in enumerate(kept) if v and v not in kept[:i]] or None
        if values:
            axes[name] = values[:2]
    overrides = [o for o in block.overrides if not o.startswith(SMOKE_OWNED_PREFIXES)] + SMOKE_OVERRIDES
    return Grid(SMOKE_RECIPE, axes, overrides, dict(block.tags))


def plan(sweep: Sweep, args: argparse.Namespace) -> list[PlannedCell]:
    """Every cell of the sweep with its resolved config, or the reason it cannot run; cells that
    resolve to the same id are one cell."""
    sweep_name = sweep.name + ("-smoke" if args.smoke else "")
    sweep_dir = Path(args.results).absolute() / sweep_name
    cli = [*args.overrides, *(f"resources.{field_}={getattr(args, flag)}" for flag, field_ in RESOURCE_FLAGS.items()
                              if getattr(args, flag) is not None)]
    blocks, seeds = grid_blocks(sweep, args)
    cells: dict[str, PlannedCell] = {}
    for block in blocks:
        for overrides in block.cells(seeds):
            overrides = [*overrides, f"output.sweep={sweep_name}", *cli]
            label = f"{block.recipe}: {' '.join(overrides)}"
            try:
                cfg = config_for_run(block.recipe, overrides)
            except ConfigError as err:
                cells.setdefault(label, PlannedCell(label, problems=[str(err)]))
                continue
            cfg.output.dir = str(sweep_dir / cfg.output.cell_id)
            if sweep.pool is not None and needs_pool_file(cfg):
                cfg.data.files["anli_hard"] = str(sweep_pool(sweep, args).folder(args.results).pool)
            cell = PlannedCell(label, cfg)
            cell.problems = capability_problems(cfg) + memory_problems(cfg)
            cells.setdefault(cell.cell_id, cell)
    return list(cells.values())


def needs_pool_file(cfg: ExperimentConfig) -> bool:
    """A training cell on `anli_hard` with no pool of its own (a file, a local folder, the cache)."""
    from .data import TRAIN_SOURCES, local_file

    return (cfg.stage == "grpo" and cfg.data.train_source == "anli_hard"
            and local_file(TRAIN_SOURCES["anli_hard"], cfg.data.local_dir, cfg.data.files) is None)


def sweep_pool(sweep: Sweep, args: argparse.Namespace) -> Pool:
    """The sweep's pool as this run builds it (--smoke: on the tiny model, in seconds)."""
    return sweep.pool.smoke() if args.smoke else sweep.pool


def cells_waiting_for_pool(sweep: Sweep, args: argparse.Namespace, cells: list[PlannedCell]) -> list[PlannedCell]:
    """Cells to submit that train on the sweep's pool while it is not built yet."""
    if sweep.pool is None:
        return []
    folder = sweep_pool(sweep, args).folder(args.results)
    if folder.complete():
        return []
    return [c for c in cells if c.action == "submit" and c.cfg.data.files.get("anli_hard") == str(folder.pool)]


def results_dir_problem(sweep_dir: Path) -> str | None:
    """Why results cannot be written under sweep_dir (checked without creating anything)."""
    if any(c in str(sweep_dir) for c in "%\\"):
        return (f"results folder {sweep_dir} has a % or \\ in its path, which Slurm expands in the jobs' log paths "
                "(%j, %A...): the jobs would die before writing a log; pass --results <a path without them>")
    existing = sweep_dir
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        return f"results folder {sweep_dir} cannot be created: {existing} is a file; pass --results <a folder you can write>"
    # Another user's sweep can be rerun when its folder is writable by the group (README: A lab
    # sharing a cache and results); cells to submit are checked in decide.
    sweep_level = [existing]
    if existing == sweep_dir:  # its files (manifest, its lock) and the folders every rerun writes into
        sweep_level += [p for p in sweep_dir.iterdir() if p.is_file() or p.name in (LOGS_DIRNAME, REPLACED_DIRNAME)]
    for path in sweep_level:
        if problem := files.not_writable_problem(path, f"results folder {sweep_dir}", tree=False):
            return f"{problem}; or pass --results <a folder you can write>"
    if existing == sweep_dir:
        try:
            tempfile.TemporaryFile(dir=sweep_dir).close()
        except OSError as err:
            return f"results folder {sweep_dir} is not writable ({err.strerror}); pass --results <a folder you can write>"
    return None


def decide(cells: list[PlannedCell], sweep_dir: Path, force: bool, queue=slurm.queued_jobs,
           force_command: str = "the same command with --force") -> None:
    """Set each valid cell's action from its status: queued cells are never submitted again,
    complete ones only with --force, everything else (failed, preempted, missing, blocked on a
    failed dependency) is submitted.
    Without a queue to ask (local runs), a cell whose result says running is left alone too.
    A cell whose earlier run (complete or not) used other settings is `changed` and refused:
    its results are not the current declaration's, and resuming its checkpoints would mix two
    experiments. `force_command` (the sweep's command line with --force) starts it afresh, the
    old run moved aside."""
    valid = [c for c in cells if not c.problems]
    states = {s.cell_id: s for s in status.sweep_status(sweep_dir, [c.cell_id for c in valid], queue=queue, accounting=None,
                                                        queue_required=True)}  # a failed squeue refuses
    for cell in valid:
        state = states[cell.cell_id]
        changed = changed_settings(cell)
        if state.queued:
            cell.action, cell.reason = "skip", f"{state.state} (job {state.job_id})"
            if changed:  # its job runs the settings it was submitted with, not these
                cell.problems.append(f"job {state.job_id} ({state.state}) runs other settings ({', '.join(changed)}); "
                                     f"wait for it or cancel it (scancel {state.job_id}), then: {force_command}")
        elif changed and not force:
            cell.action, cell.reason = "changed", f"changed ({', '.join(changed)})"
            cell.problems.append(f"its earlier run ({state.state}) used other settings ({', '.join(changed)}): its results "
                                 "are not this declaration's. Rerun with the settings it was submitted with, or start it "
                                 f"afresh (the old run moves to {sweep_dir / REPLACED_DIRNAME}/): {force_command}")
        elif state.state == "complete" and not force:
            cell.action, cell.reason = "skip", "complete"
        elif state.state == "running" and queue is None and not force:
            cell.action, cell.reason = "skip", "running (no queue to ask; --force if it died)"
        else:
            cell.action = "submit"
            cell.reason = (f"changed ({', '.join(changed)})" if changed else state.state) + (
                " (--force)" if force and state.state != "missing" else "")
            if state.state == "blocked":  # its job waits on one that failed: replace it
                cell.blocked_job = state.job_id
            if problem := files.not_writable_problem(cell.run_dir, "its folder"):  # another user's run
                cell.problems.append(f"{problem}; or pass --results <a folder you can write>")


def changed_settings(cell: PlannedCell) -> list[str]:
    """Config sections that differ between the work already in the cell's folder and now (the
    train command applies the same rule); resources (time, memory) may change freely."""
    return conflicting_inputs(cell.run_dir, cell.cfg.to_dict())


# --------------------------------------------------------------------------- output
def print_plan(name: str, cells: list[PlannedCell], console, checks: dict | None = None) -> None:
    """The plan as a table; a cell's GPU memory is its preflight's measured peak where one ran on a
    GPU with these settings (`checks`: graph.read_checks'), else the validator's estimate."""
    from rich.table import Table

    table = Table(title=f"sweep {name}: {len(cells)} cells")
    for column in ("cell", "GPUs", "CPUs", "mem", "time", "GPU mem est./avail.", "action"):
        table.add_column(column, overflow="fold")
    for c in cells:
        if c.cfg is None:
            table.add_row(c.label, *["?"] * 5, "[red]invalid[/]")
            continue
        r = c.cfg.resources
        estimate = estimate_gpu_memory(c.cfg)
        fit = f"{estimate['total']}/{r.gpu_memory_gb} GB" if estimate else "— (CPU)"
        if estimate and "vllm_kv_cache" in estimate:  # of the colocated engine's share
            fit += f" (vLLM KV cache {estimate['vllm_kv_cache']} GB)"
        measured = getattr((checks or {}).get(verdict.combination(c.cfg)), "doc", None)
        if measured and measured.get("memory", {}).get("limit_field") == "resources.gpu_memory_gb":
            fit = f"{measured['memory']['peak_gb']:.1f} measured/{r.gpu_memory_gb} GB (preflight)"
        gpus = str(r.gpus_per_node)
        if served := server_gpus(c.cfg):  # the split of the job's GPUs, and the server's own fit
            gpus += f" ({served} vLLM server + {r.gpus_per_node - served} training)"
            fit = f"training {fit}, server {server_weights_gb(c.cfg)} GB weights/{server_memory_share(c.cfg) * r.gpu_memory_gb:.0f} GB"
        action = (f"[red]{c.reason}[/]" if c.action == "changed" else "[red]invalid[/]" if c.problems
                  else f"[green]submit[/] ({c.reason})" if c.action == "submit" else f"skip: {c.reason}")
        table.add_row(c.cell_id, gpus, str(r.cpus_per_task), f"{r.mem_gb} GB", f"{r.timeout_min} min", fit, action)
    console.print(table)


def run(sweep: Sweep, args: argparse.Namespace) -> int:
    """Plan, validate, show, and (unless --dry-run) submit; see the module docstring."""
    with contextlib.ExitStack() as held:  # the manifest's lock, from reading the queue to the last record
        return _run(sweep, args, held)


def _run(sweep: Sweep, args: argparse.Namespace, held: contextlib.ExitStack) -> int:
    console = status.make_console()
    name = sweep.name + ("-smoke" if args.smoke else "")
    sweep_dir = Path(args.results).absolute() / name
    try:
        cells = plan(sweep, args)
    except ValueError as err:  # an axis flag that selects nothing
        console.print(f"[red]error:[/] {err}")
        return 2
    refusals = [p for p in [results_dir_problem(sweep_dir)] if p]
    missing_inputs = False
    for c in cells:
        if c.cfg is not None and (problems := input_problems(c.cfg, args.online)):
            c.problems += problems
            missing_inputs = True
    if missing_inputs:
        grid_args = [a for a in args.argv if a not in ("--dry-run", "--force", "--online")]
        refusals.append("inputs missing: on the login node, run `" + shlex.join(["python", "-m", "nli_grpo.prepare", "--sweep",
                        sweep.name, *grid_args]) + "` (it downloads what the cells need; `--from DIR` ingests the datasets' "
                        "original files instead), then submit again. If the nodes reach the hub, --online skips this check.")
    options = launch.LaunchOptions(cluster=args.cluster, partition=args.partition, account=args.account, qos=args.qos,
                                   constraint=args.constraint, array_parallelism=args.array_parallelism,
                                   retries=args.retries, online=args.online)
    target = graph.Target(sweep_dir, name, options)
    room, room_limit, book = None, "", None
    checks: dict = {}
    try:
        if args.cluster == "slurm":
            facts = slurm.partition_facts(args.partition)
            options.partition, options.grace_time_s = facts["name"], facts["grace_time_s"]
            target.max_array_size = slurm.max_array_size()
            room, room_limit = slurm.submit_room(options.qos, options.account)
            for c in cells:
                if c.cfg is not None:
                    c.problems += slurm.resource_problems(c.cfg.resources, facts)
                    c.problems += [p for p in [launch.time_problem(c.cfg.resources.timeout_min, options)] if p]
        else:
            refusals += _local_gpu_problems(cells)
        if not refusals and not any(c.problems for c in cells):
            book = None if args.dry_run else held.enter_context(manifest.held(sweep_dir))
            decide(cells, sweep_dir, args.force, queue=slurm.queued_jobs if args.cluster == "slurm" else None,
                   force_command=shlex.join(["python", f"sweeps/{sweep.name}.py", *args.argv, "--force"]))
            checks = graph.read_checks(sweep_dir, [c for c in cells if c.action == "submit"])
            if not (args.preflight or args.no_preflight):
                graph.refuse_failed(cells, checks)
    except slurm.SlurmError as err:
        refusals.append(str(err))
    print_plan(name, cells, console, checks)
    invalid = [c for c in cells if c.problems]
    if refusals or invalid:
        for c in invalid:
            for problem in c.problems:
                console.print(f"[red]refused[/] {c.cell_id}: {problem}", soft_wrap=True)
        for problem in refusals:
            console.print(f"[red]refused:[/] {problem}", soft_wrap=True)
        console.print(f"[red]Nothing submitted[/]: {len(invalid)} invalid or changed cell(s)" + (f", {len(refusals)} other problem(s)" if refusals else "")
                      + ". Fix them (or leave those cells out with --ranks/--quantizations/--models) and run again.")
        return 2
    todo = [c for c in cells if c.action == "submit"]
    waiting = cells_waiting_for_pool(sweep, args, cells)
    if waiting and (problems := pool_input_problems(sweep_pool(sweep, args), args.online)):
        for problem in problems:
            console.print(f"[red]refused:[/] {len(waiting)} cell(s) train on a pool that is not built yet, and building it needs "
                          f"inputs: {problem}", soft_wrap=True)
        console.print("[red]Nothing submitted.[/] Stage them with `" + shlex.join(["python", "-m", "nli_grpo.prepare", "--sweep",
                      sweep.name, *[a for a in args.argv if a not in ("--dry-run", "--force", "--online")]])
                      + "` (the pool's base model and the ANLI training rounds among them), then submit again.")
        return 2
    try:
        pool_plan, pool_book = _plan_pool(sweep, args, waiting, held)
        queued = graph.queued_preflights(sweep_dir, todo, slurm.queued_jobs) if args.preflight and args.cluster == "slurm" else {}
    except slurm.SlurmError as err:
        console.print(f"[red]error:[/] {err}. Nothing was submitted.", soft_wrap=True)
        return 1
    jobs_graph = graph.plan_graph(todo, target, checks, pool=sweep_pool(sweep, args) if waiting else None, pool_plan=pool_plan,
                                  preflight=args.preflight, queued_preflights=queued, book=book, pool_book=pool_book,
                                  room=lambda others: within_submit_limit(todo, room, room_limit, others),
                                  described_cells=[c for c in cells if c.cfg is not None])
    if jobs_graph.record is not None:
        jobs_graph.record["preflight"] = ("skipped (--no-preflight)" if args.no_preflight else "run first (--preflight)" if args.preflight
                                          else {combo: check.state for combo, check in checks.items()})
    submitted_combinations = graph.by_combination(jobs_graph.cells)
    console.print(graph.describe(jobs_graph, None if args.preflight else {k: v for k, v in checks.items() if k in submitted_combinations}),
                  soft_wrap=True, markup=False)
    preflights, todo = jobs_graph.jobs("preflight"), jobs_graph.cells
    if args.dry_run:
        if pool_plan is not None:
            console.print(describe_plan(pool_plan), soft_wrap=True)
        if args.cluster == "slurm":
            for title, script in graph.sbatch_scripts(jobs_graph):
                console.rule(title)
                console.print(script, markup=False, highlight=False, soft_wrap=True)
        console.print(f"dry run: {len(todo)} of {len(cells)} cells would be submitted"
                      + (f", after {preflights} preflight job(s)" if preflights else "") + "; nothing was.")
        return 0
    if not jobs_graph.nodes:
        everything = "" if jobs_graph.notes else f": every cell of {name} is complete or queued"
        console.print(f"nothing to submit{everything}. Status: python -m nli_grpo.status {sweep_dir}")
        return 0
    if args.force:
        for c in todo:
            _move_aside(c)
    replaced = [job for c in todo if (job := c.blocked_job)]
    if replaced:  # pending forever on a failed dependency (its pool, its preflight): replaced by the new submissions
        slurm.cancel(replaced)
    try:
        queued = graph.submit(jobs_graph)
    except KeyboardInterrupt:
        console.print(f"[red]interrupted[/]: what was queued is recorded in {sweep_dir / MANIFEST_FILENAME}; run the same "
                      "command again to submit the rest.")
        return 130
    except launch.SubmissionError as err:
        queued, error = {}, err
    else:
        error = None
    held.close()  # the manifests are written: release their locks (a local run now waits for its jobs)
    return _report(jobs_graph, queued, error, pool_plan, checks, args, sweep_dir, console)


def _plan_pool(sweep: Sweep, args: argparse.Namespace, waiting: list[PlannedCell], held: contextlib.ExitStack):
    """The pool the `waiting` cells train on: what is missing of it (pool.plan_pool), its manifest
    locked (unless a dry run) until the graph is submitted; the cells wait on its queued merge."""
    if not waiting:
        return None, None
    pool = sweep_pool(sweep, args)
    folder = pool.folder(args.results)
    pool_book = None if args.dry_run else held.enter_context(manifest.held(folder.path))
    queued = slurm.queued_jobs(manifest.recorded_jobs(folder.path)) if args.cluster == "slurm" else None
    pool_plan = plan_pool(pool, args.results, queued)
    for c in waiting:
        c.waits_on_pool = True
        if pool_plan.merge_job:
            c.dependency = f"afterok:{pool_plan.merge_job}"
    return pool_plan, pool_book


def _report(jobs_graph: graph.Graph, queued: dict, error, pool_plan, checks: dict, args: argparse.Namespace, sweep_dir: Path,
            console) -> int:
    """What the submission queued (and, on this machine, what its jobs did)."""
    by_kind: dict[str, dict] = {}
    for node in jobs_graph.nodes:
        by_kind.setdefault(node.kind, {}).update(queued.get(node.name, {}))
    if pool_plan is not None and pool_plan.submitted:
        console.print(describe_plan(pool_plan), soft_wrap=True)
    if preflights := by_kind.get("preflight"):
        console.print(f"submitted {len(preflights)} preflight job(s) ({args.cluster}: {', '.join(str(j.job_id) for j in preflights.values())}); "
                      f"verdicts go to {sweep_dir / PREFLIGHT_DIRNAME}/; the cells of a combination that fails "
                      + ("stay blocked (status says why)" if args.cluster == "slurm" else "are not run"), soft_wrap=True)
    cells, todo = by_kind.get("cells", {}), jobs_graph.cells
    if todo:
        arrays = sorted({str(j.job_id).split("_")[0] for j in cells.values()})
        console.print(f"submitted {len(cells)} of {len(todo)} cells ({args.cluster}: {', '.join(arrays) or 'none'}); "
                      f"manifest {sweep_dir / MANIFEST_FILENAME}; logs {sweep_dir / LOGS_DIRNAME}")
    if len(cells) < len(todo) and not error:  # on this machine, after a preflight that failed
        console.print(f"[red]{len(todo) - len(cells)} cell(s) not run[/]: a job they come after failed (below)", soft_wrap=True)
    unchecked = sorted({verdict.combination(c.cfg) for c in todo} & {k for k, c in checks.items() if c.state == "none"})
    if unchecked and not (args.no_preflight or args.preflight):
        console.print(f"[yellow]no preflight ran[/] for {', '.join(unchecked)}: those cells were submitted unchecked "
                      "(`--preflight` checks a combination first, in minutes, and the cells after it)", soft_wrap=True)
    for note in jobs_graph.notes:
        console.print(f"[yellow]{note}[/]", soft_wrap=True)
    if error:
        console.print(f"[red]error:[/] {error}. Run the same command again to submit the rest.", soft_wrap=True)
    if args.cluster != "slurm":
        _wait_here(cells, console)
        status.print_status(sweep_dir.name, status.sweep_status(sweep_dir, queue=None, accounting=None), console)
        status.print_verdicts(sweep_dir, console)
    else:
        console.print(f"watch it: python -m nli_grpo.status {sweep_dir} --watch")
    return 1 if error else 0


def within_submit_limit(todo: list, room: int | None, limit: str, pool_jobs: int = 0) -> tuple[list, str | None]:
    """The cells to submit that fit the room a submit limit leaves (slurm.submit_room: `room`
    jobs, set by `limit`) after the `pool_jobs` the same run queues before them (their pool, the
    preflights), and what to tell the user when some do not: sbatch rejects an array over the limit whole."""
    if room is None or len(todo) <= room - pool_jobs:
        return todo, None
    fit = max(0, room - pool_jobs)
    pool = f", and the pool they train on takes {min(pool_jobs, room)} of the room" if pool_jobs else ""
    return todo[:fit], (f"{limit}{pool}: {fit} of the {len(todo)} cells to submit fit now; run the same command again "
                        "when jobs have left the queue, to submit the rest.")


def _local_gpu_problems(cells: list[PlannedCell]) -> list[str]:
    wanted = max((c.cfg.resources.gpus_per_node for c in cells if c.cfg), default=0)
    if not wanted:
        return []  # CPU-only cells (the smoke sweep): no need to ask torch
    import torch

    here = torch.cuda.device_count()
    if wanted > here:
        return [f"cells ask for {wanted} GPU(s) but this machine has {here}: use --cluster slurm, or --smoke to run on the CPU"]
    return []


def _move_aside(cell: PlannedCell) -> None:
    """--force on a cell with an earlier run (complete, or under other settings): keep that run
    (hidden from aggregate) so that the new one starts fresh."""
    from . import results

    folder = CellFolder(cell.run_dir)
    complete = (results.load_existing(folder.result) or {}).get("status") == "complete"
    if complete or changed_settings(cell):
        folder.move_aside()


def _wait_here(jobs: dict, console) -> None:
    """Local and debug executors: the jobs run on this machine, so wait for them."""
    for cell_id, job in jobs.items():
        try:
            job.result()
        except Exception as err:  # noqa: BLE001 - the status table shows the cell as failed
            console.print(f"[red]{cell_id} failed[/]: {str(err).strip().splitlines()[-1]}")


# --------------------------------------------------------------------------- a pool alone
@dataclass
class PoolSweep:
    """A hard-example pool as a sweep of its own (sweeps/bootstrap.py): shards as one job array,
    then the merge; the same validation, dry run, manifest and idempotent rerun as a grid."""

    pool: Pool = field(default_factory=Pool)
    description: str = "the hard-example pool"

    def main(self, argv: list[str] | None = None) -> int:
        return run_pool(self, parse_pool_args(self, argv))


def parse_pool_args(sweep: PoolSweep, argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python sweeps/bootstrap.py",
        description=f"{sweep.description}: validate, then submit its shards (one job array) and the merge after them.",
        epilog="Watch it with: python -m nli_grpo.status results/bootstrap/<pool>. Training sweeps build it by themselves "
               "when a cell needs it.")
    _where_and_resources(parser, "resources per shard job (default: the pool's, a 7B node)")
    pool = parser.add_argument_group("the pool")
    pool.add_argument("--shards", type=int, help=f"jobs of the array (default {sweep.pool.shards})")
    pool.add_argument("--base", help=f"the model whose difficulties define the pool (default {sweep.pool.base})")
    pool.add_argument("--quantization", choices=("bf16", "awq", "bnb4"))
    pool.add_argument("--samples", type=int, help=f"completions per item (default {sweep.pool.samples})")
    pool.add_argument("--below", type=float, help=f"keep items whose accuracy is below this (default {sweep.pool.below})")
    pool.add_argument("--seed", type=int, help=f"sampling seed (default {sweep.pool.seed})")
    pool.add_argument("--limit", type=int, help="first N items of each round (a quick look)")
    pool.add_argument("--smoke", action="store_true", help="the tiny model and the shipped samples, on the CPU, in seconds")
    pool.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides of the sampling run")
    _run_arguments(parser, "the pool goes to <results>/bootstrap/<pool>/")
    return _parse(parser, argv)


def pool_of(sweep: PoolSweep, args: argparse.Namespace) -> Pool:
    """The declared pool with the command line's changes."""
    from dataclasses import replace

    pool = sweep.pool.smoke() if args.smoke else sweep.pool
    changes = {k: getattr(args, k) for k in ("shards", "base", "quantization", "samples", "below", "seed", "limit")
               if getattr(args, k) is not None}
    if args.overrides:
        changes["overrides"] = (*pool.overrides, *args.overrides)
    resources = {f: getattr(args, flag) for flag, f in RESOURCE_FLAGS.items() if f != "gpu_memory_gb" and getattr(args, flag) is not None}
    if resources:
        changes["resources"] = {**pool.resources, **resources}
    return replace(pool, **changes)


def run_pool(sweep: PoolSweep, args: argparse.Namespace) -> int:
    """Validate the pool, show its parts, and (unless --dry-run) submit what is missing."""
    from rich.table import Table

    from .config import ResourcesConfig
    from .pool import input_problems, part_states, pool_nodes, sampling_config

    console = status.make_console()
    pool = pool_of(sweep, args)
    problems = [f"--shards {pool.shards}: give 1 or more"] if pool.shards < 1 else []
    try:
        sampling_config(pool.spec())
    except ConfigError as err:
        problems.append(str(err))
    folder = pool.folder(args.results)
    problems += [p for p in [results_dir_problem(folder.path)] if p]
    if not problems:
        problems += input_problems(pool, args.online)
    options = launch.LaunchOptions(cluster=args.cluster, partition=args.partition, account=args.account, qos=args.qos,
                                   constraint=args.constraint, array_parallelism=args.array_parallelism,
                                   retries=args.retries, online=args.online)
    queue = None
    try:
        if args.cluster == "slurm":
            facts = slurm.partition_facts(args.partition)
            options.partition, options.grace_time_s = facts["name"], facts["grace_time_s"]
            problems += slurm.resource_problems(ResourcesConfig(**pool.resources), facts)
            problems += [p for p in [launch.time_problem(ResourcesConfig(**pool.resources).timeout_min, options)] if p]
            queue = slurm.queued_jobs(manifest.recorded_jobs(folder.path))
    except slurm.SlurmError as err:
        problems.append(str(err))
    if problems:
        for problem in problems:
            console.print(f"[red]refused:[/] {problem}", soft_wrap=True)
        console.print("[red]Nothing submitted.[/] Stage the inputs with `python -m nli_grpo.prepare` (the base model and "
                      "the ANLI training rounds), or fix the above, and run again.")
        return 2
    table = Table(title=f"pool {pool.pool_id}: {folder.path}")
    for column in ("part", "state", "job", "done", "detail"):
        table.add_column(column, overflow="fold")
    for part in part_states(pool, folder, queue):
        done = f"{part.done}/{part.total} chunks" if part.total else "—"
        table.add_row(part.part, part.state, part.job_id or "—", done, part.detail)
    console.print(table)
    try:
        plan = ensure_pool(pool, args.results, options, slurm.queued_jobs if args.cluster == "slurm" else None, dry_run=args.dry_run)
    except (slurm.SlurmError, launch.SubmissionError) as err:
        console.print(f"[red]error:[/] {err}. What was queued before it is recorded; run the same command again to submit the rest.",
                      soft_wrap=True)
        return 1
    console.print(describe_plan(plan), soft_wrap=True)
    if args.dry_run and args.cluster == "slurm" and plan.to_submit:
        for title, script in graph.sbatch_scripts(graph.Graph(nodes=pool_nodes(pool, plan, options, None))):
            console.rule(title)
            console.print(script, markup=False, highlight=False, soft_wrap=True)
        console.print("dry run: nothing was submitted.")
    elif not args.dry_run:
        console.print(f"watch it: python -m nli_grpo.status {folder.path} --watch")
    return 0
