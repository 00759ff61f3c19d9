"""Where a sweep stands: `python -m nli_grpo.status results/<sweep>`.

One line per cell: its state, Slurm job, attempts, training steps done / max and last update, then
a summary line. The state combines the queue (squeue for the job ids in the sweep's manifest) with
the cell's result.json, so it works while jobs run and after they left the queue:

    pending    queued, not started yet (the detail gives Slurm's reason, and what to do when it
               cannot start by itself: a QOS limit it can never meet, a node that is down)
    held       queued but held (`scontrol hold`, requeued held): it never starts until released
    running    running now
    preempted  stopped by a signal after saving: waiting in the queue to resume (requeued), or
               not queued any more (rerun the sweep to resume it)
    complete   result.json says complete            failed    the run failed, or its job ended
                                                               without a final result
    missing    never submitted, or no trace of it
    unknown    submitted, no result yet, and the queue could not be read (controller down?)

The sweep launcher decides what to (re)submit from the same states (`queued` never, `complete`
only with --force).

Running and preempted cells also show their recent reward and KL (the mean over the last
RECENT_STEPS optimizer steps of train_log.jsonl) and the time left at the current step rate (the
`time` of the current attempt's recent lines; "—" when unknown). Cells with offline W&B runs not
uploaded yet get the `wandb sync` command that uploads them. `--watch [SECONDS]` redraws it all
until Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from . import manifest as manifests
from . import results, slurm, verdict
from .config import read_snapshot
from .layout import (
    CONFIG_SNAPSHOT_FILENAME,
    POOL_SPEC_FILENAME,
    PREFLIGHT_DIRNAME,
    RESULT_FILENAME,
    CellFolder,
    PoolFolder,
    preflight_file,
)
from .trackers import wandb_sync_command

STATES = ("pending", "held", "running", "preempted", "blocked", "complete", "failed", "unknown", "missing")
#: Optimizer steps the recent reward and KL are averaged over, and the step rate is measured on.
RECENT_STEPS = 10
#: Seconds between two frames of --watch when none is given.
WATCH_SECONDS = 15.0
#: sacct states of a job that ended without its cell finishing.
_ENDED_BADLY = ("FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL", "DEADLINE", "PREEMPTED")


@dataclass
class CellStatus:
    cell_id: str
    state: str
    queued: bool = False
    """In the Slurm queue now (pending, running or requeued): never submit it again."""
    job_id: str | None = None
    attempts: int | None = None
    steps_done: int | None = None
    max_steps: int | None = None
    updated_at: str | None = None
    detail: str = ""
    reward: float | None = None
    """Mean reward of the last RECENT_STEPS steps that generated (running / preempted cells)."""
    kl: float | None = None
    """Mean KL of the last RECENT_STEPS steps that logged one."""
    seconds_per_step: float | None = None
    """The current attempt's recent step rate (from the train log's `time`)."""
    time_left_s: float | None = None
    """(max steps - steps done) x seconds_per_step; None when unknown."""
    wandb_sync: str | None = None
    """The command that uploads the cell's offline W&B runs, when some are not uploaded yet."""


def _mean(values: list) -> float | None:
    values = [v for v in values if isinstance(v, (int, float))]
    return sum(values) / len(values) if values else None


def train_progress(folder: CellFolder, recent: int = RECENT_STEPS) -> dict:
    """From the cell's train log (the last attempt's line of a replayed step): the last step
    logged, the mean reward and KL of the last `recent` steps that logged them, and the current
    attempt's seconds per step over its last `recent` lines (None with fewer than two)."""
    rows = results.read_train_log(folder.train_log)
    if not rows:
        return {}
    rewards = [r["reward"] for r in rows if isinstance(r.get("reward"), (int, float))]
    kls = [r["kl"] for r in rows if isinstance(r.get("kl"), (int, float))]
    attempt = rows[-1].get("attempt")
    timed = [r for r in rows if r.get("attempt") == attempt and isinstance(r.get("time"), (int, float))][-recent:]
    rate = None
    if len(timed) >= 2 and timed[-1]["step"] > timed[0]["step"] and timed[-1]["time"] >= timed[0]["time"]:
        rate = (timed[-1]["time"] - timed[0]["time"]) / (timed[-1]["step"] - timed[0]["step"])
    return {"last_step": rows[-1]["step"], "reward": _mean(rewards[-recent:]), "kl": _mean(kls[-recent:]),
            "seconds_per_step": rate}


def _steps(doc: dict | None, folder: CellFolder) -> tuple[int | None, int | None]:
    """Steps done (the training summary, or the last complete checkpoint while it runs) and max."""
    config = (doc or {}).get("config") or {}
    if config.get("stage") == "zero_shot":
        return None, None
    max_steps = config.get("grpo", {}).get("max_steps")
    done = max(((doc or {}).get("train") or {}).get("steps_done") or 0, folder.last_step_on_disk())
    return (done if doc or done else None), max_steps


def cell_status(cell_id: str, run_dir: Path, job: tuple[str, str] | None, queue: dict | None,
                ended: dict | None = None) -> CellStatus:
    """The state of one cell from its result file, its latest job (id, cluster) and the queue
    (None when Slurm cannot be asked: the result file alone decides)."""
    folder = CellFolder(run_dir)
    doc = results.load_existing(folder.result)
    job_id, cluster = job or (None, None)
    in_queue = (queue or {}).get(job_id) if cluster == "slurm" else None
    end_state = _end_state(ended or {}, job_id)
    status = (doc or {}).get("status")
    steps, max_steps = _steps(doc, folder)
    line = CellStatus(cell_id, "missing", bool(in_queue), job_id, ((doc or {}).get("slurm") or {}).get("attempts"),
                      steps, max_steps, (doc or {}).get("updated_at"))
    if in_queue == slurm.BLOCKED:
        line.state, line.queued, line.detail = "blocked", False, blocked_detail(folder)
    elif in_queue and status == "complete":  # its job still ends (COMPLETING, epilog): the cell is done
        line.state = "complete"
    elif in_queue:
        line.state = "running" if in_queue in ("RUNNING", "COMPLETING") else ("preempted" if status == "preempted" else "pending")
        line.detail = in_queue.lower() if line.state == "preempted" else ""
        reason, action = getattr(in_queue, "reason", ""), getattr(in_queue, "action", "")
        if line.state != "running" and reason:
            line.detail = ", ".join(filter(None, [line.detail, f"{reason}: {action}" if action else reason]))
        if reason in slurm.HELD_REASONS:
            line.state = "held"
    elif status in ("complete", "failed"):
        line.state, line.detail = status, (doc.get("error") or "") if status == "failed" else ""
    elif status == "preempted":
        unknown = cluster == "slurm" and queue is None  # Slurm could not be asked: it may be requeued
        line.state, line.detail = "preempted", "" if unknown else "not queued: rerun the sweep to resume"
    elif status == "running":
        gone = cluster == "slurm" and queue is not None
        line.state = "failed" if gone else "running"
        how = f"sacct: {end_state}" if end_state else "killed?"
        line.detail = f"job {job_id} left the queue while running ({how}; see its log)" if gone else ""
    elif job_id and end_state.startswith(_ENDED_BADLY):
        line.state, line.detail = "failed", f"job {job_id} {end_state.lower()} before writing a result"
    elif job_id and cluster == "slurm" and queue is None:
        line.state, line.detail = "unknown", f"job {job_id}: the Slurm queue could not be read"
    if line.state in ("running", "preempted") and max_steps is not None:
        progress = train_progress(folder)
        if line.state == "running":  # further than its last checkpoint (a preempted cell resumes from that)
            line.steps_done = max(line.steps_done or 0, progress.get("last_step") or 0)
        line.reward, line.kl, line.seconds_per_step = progress.get("reward"), progress.get("kl"), progress.get("seconds_per_step")
        if line.seconds_per_step is not None:
            line.time_left_s = max(0, max_steps - (line.steps_done or 0)) * line.seconds_per_step
    line.wandb_sync = wandb_sync_command(folder)
    return line


def _end_state(ended: dict, job_id: str | None) -> str:
    """sacct's state of a job; an array task of an array cancelled whole while pending has none of
    its own: its array's (slurm.parse_sacct)."""
    if not job_id:
        return ""
    return ended.get(job_id) or ended.get(job_id.split("_")[0], "")


def _combination(cfg) -> str | None:
    """The preflight combination of a config snapshot (config.read_snapshot; None for none)."""
    return verdict.combination(cfg) if cfg is not None else None


def blocked_detail(folder: CellFolder) -> str:
    """Why a cell's job waits forever: a job it depends on failed (its pool's merge, when it
    trains on a pool being built; its combination's preflight, when the sweep ran --preflight),
    and what to do."""
    snapshot = read_snapshot(folder.config_snapshot)
    files = snapshot.data.files if snapshot is not None else {}
    merge = results.load_json(PoolFolder(Path(files["anli_hard"]).parent).merge_state) if files.get("anli_hard") else None
    if merge and merge.get("status") == "failed":
        cause = (f"its pool's merge failed ({merge.get('error') or 'see its log'}; python -m nli_grpo.status "
                 f"{Path(files['anli_hard']).parent})")
        return f"blocked: {cause}; fix that, then run the sweep again (it cancels and resubmits this cell)"
    failed = _failed_preflight(folder.path.parent, _combination(snapshot))
    if failed:
        return (f"blocked: its combination's preflight failed ({failed}); fix that, then run the sweep again with --preflight, "
                "or with --no-preflight to run it unchecked (either cancels and resubmits this cell)")
    return "blocked: a job it depends on failed; fix that, then run the sweep again (it cancels and resubmits this cell)"


def _failed_preflight(sweep_dir: Path, combination: str | None) -> str:
    """The fail reasons of the combination's verdict in the sweep folder, if it failed."""
    path = preflight_file(sweep_dir, combination or "")
    try:
        doc = verdict.read_verdict(path) if combination and path.is_file() else None
    except results.ResultError:
        return ""
    if not doc or doc["verdict"] != "fail":
        return ""
    return verdict.fail_reasons(doc)


def sweep_status(sweep_dir: str | Path, cell_ids: list[str] | None = None,
                 queue: Callable[[list], dict] | None = None,
                 accounting: Callable[[list], dict] | None = None, queue_required: bool = False) -> list[CellStatus]:
    """Status of every cell of a sweep folder: the manifest's cells, any cell folder with a result,
    and `cell_ids` (cells about to be planned). `queue` / `accounting` ask Slurm about the
    manifest's jobs (e.g. slurm.queued_jobs / slurm.accounting_states); None, or a failing call,
    means result files alone (a submitted cell without a result is then `unknown`), unless
    `queue_required` (the sweep deciding what to submit), where a failing call raises its SlurmError."""
    sweep_dir = Path(sweep_dir)
    manifest = manifests.read_manifest(sweep_dir)
    jobs = manifests.latest_jobs(manifest)
    ids = dict.fromkeys([*manifest["cells"], *(cell_ids or [])])
    if sweep_dir.is_dir():
        ids.update(dict.fromkeys(sorted(p.parent.name for p in sweep_dir.glob(f"*/{RESULT_FILENAME}"))))
    slurm_jobs = [job for job, cluster in jobs.values() if cluster == "slurm"]
    queued = ended = None
    if slurm_jobs and queue is not None:
        try:
            queued = queue(slurm_jobs)
        except slurm.SlurmError as err:
            if queue_required:
                raise
            print(f"warning: cannot read the Slurm queue ({err}); states come from result files only", file=sys.stderr)
    if slurm_jobs and accounting is not None:
        ended = accounting(slurm_jobs)
    return [cell_status(cell_id, sweep_dir / cell_id, jobs.get(cell_id), queued, ended) for cell_id in ids]


def summary_line(name: str, lines: list[CellStatus]) -> str:
    counts = Counter(line.state for line in lines)
    parts = [f"{counts[s]} {s}" for s in STATES if counts[s]]
    return f"{name}: {len(lines)} cells" + (f": {', '.join(parts)}" if parts else "")


def make_console():
    """A rich console; logs and CI are not terminals: don't squeeze tables into 80 columns there."""
    from rich.console import Console

    return Console(highlight=False, width=None if sys.stdout.isatty() else 160)


def duration(seconds: float | None) -> str:
    """`45s`, `12m`, `3h05m`, `2d04h`; "—" when unknown."""
    if seconds is None:
        return "—"
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds}s"
    minutes, hours = seconds // 60, seconds // 3600
    if hours < 1:
        return f"{minutes}m"
    return f"{hours}h{minutes % 60:02d}m" if hours < 24 else f"{hours // 24}d{hours % 24:02d}h"


def _number(value: float | None) -> str:
    return "—" if value is None else f"{value:.3g}"


def print_status(name: str, lines: list[CellStatus], console=None) -> None:
    from rich.table import Table

    console = console or make_console()
    colours = {"complete": "green", "failed": "red", "preempted": "yellow", "running": "cyan", "missing": "magenta",
               "held": "red", "unknown": "magenta"}
    table = Table(title=f"sweep {name}", show_lines=False)
    for column in ("cell", "state", "job", "attempts", "steps", "reward", "KL", "time left", "updated", "detail"):
        table.add_column(column, overflow="fold")
    for s in lines:
        steps = "—" if s.max_steps is None else f"{s.steps_done or 0}/{s.max_steps}"
        table.add_row(s.cell_id, f"[{colours.get(s.state, 'white')}]{s.state}[/]", s.job_id or "—",
                      str(s.attempts or "—"), steps, _number(s.reward), _number(s.kl), duration(s.time_left_s),
                      s.updated_at or "—", s.detail)
    console.print(table)
    console.print(summary_line(name, lines))
    syncs = [s.wandb_sync for s in lines if s.wandb_sync]
    if syncs:
        console.print("offline W&B runs not uploaded yet; on a machine with internet (WANDB_API_KEY set):", soft_wrap=True)
        for command in syncs:
            console.print(f"  {command}", soft_wrap=True, markup=False)


def print_pools(folders: list[PoolFolder], as_json: bool = False, console=None) -> int:
    """The shards and the merge of hard-example pools (sweeps/bootstrap.py, or built for a sweep)."""
    from rich.table import Table

    from .pool import folder_states

    console = console or make_console()
    for folder in folders:
        try:
            queue = slurm.queued_jobs(manifests.recorded_jobs(folder.path))
        except slurm.SlurmError as err:
            queue = None
            print(f"warning: cannot read the Slurm queue ({err}); states come from the pool's files only", file=sys.stderr)
        states = folder_states(folder, queue)
        if as_json:
            for state in states:
                print(json.dumps({"pool": str(folder.path), **asdict(state)}))
            continue
        table = Table(title=f"pool {folder.path.name}" + (": complete" if folder.complete() else ""))
        for column in ("part", "state", "job", "done", "detail"):
            table.add_column(column, overflow="fold")
        for state in states:
            done = f"{state.done}/{state.total} chunks" if state.total else "—"
            table.add_row(state.part, state.state, state.job_id or "—", done, state.detail)
        console.print(table)
        record = results.load_json(folder.record)
        if record:
            console.print(f"{record['hard_items']} hard items of {record['items']}; sha256 {record['sha256'][:12]}; {folder.pool}")
    return 0


def print_verdicts(sweep_dir: Path, console=None) -> None:
    """The sweep's preflights (nli_grpo.preflight): each combination's verdict with its reasons and
    figures, or its job while the verdict is not in. Nothing when the sweep ran none."""
    from rich.table import Table

    console = console or make_console()
    jobs = manifests.preflight_jobs(manifests.read_manifest(sweep_dir))
    combos = sorted({*jobs, *(p.stem for p in (sweep_dir / PREFLIGHT_DIRNAME).glob("*.json"))})
    if not combos:
        return
    colours = {"pass": "green", "warn": "yellow", "fail": "red"}
    docs: dict[str, dict] = {}
    table = Table(title=f"preflight of {sweep_dir.name}")
    for column in ("combination", "verdict", "job", "s/step", "peak mem", "projected", "reasons"):
        table.add_column(column, overflow="fold")
    for combo in combos:
        path = preflight_file(sweep_dir, combo)
        if not path.exists():
            table.add_row(combo, "none yet", jobs.get(combo, "—"), "—", "—", "—", f"its log: {sweep_dir / 'logs'}")
            continue
        try:
            doc = verdict.read_verdict(path)
        except results.ResultError as err:
            table.add_row(combo, "[red]unreadable[/]", jobs.get(combo, "—"), "—", "—", "—", str(err))
            continue
        docs[combo] = doc
        memory, fit = doc.get("memory", {}), doc.get("fit", {})
        table.add_row(combo, f"[{colours[doc['verdict']]}]{doc['verdict']}[/]", jobs.get(combo, "—"),
                      _number(doc.get("steps", {}).get("seconds_per_step")),
                      f"{memory['peak_gb']:.2f}/{memory['limit_gb']} GB" if "peak_gb" in memory else "—",
                      duration(fit.get("projected_s")), "; ".join(f"{r['level']}: {r['reason']}" for r in doc["reasons"]) or "—")
    console.print(table)
    if line := projection_line(sweep_dir, docs):
        console.print(line, soft_wrap=True)


def projection_line(sweep_dir: Path, docs: dict[str, dict]) -> str | None:
    """The sweep's cost as its verdicts project it: each submitted cell (its config snapshot in the
    sweep folder) costs its combination's projected hours (fit.hours, x its GPUs: fit.gpu_hours),
    and beside that what the preflights themselves took (their elapsed time x their GPUs)."""
    cells = Counter(_combination(read_snapshot(p)) for p in sweep_dir.glob(f"*/{CONFIG_SNAPSHOT_FILENAME}"))
    measured = {combo: doc for combo, doc in docs.items() if "hours" in doc.get("fit", {})}
    covered = {combo: n for combo, n in cells.items() if combo in measured}
    if not covered:
        return None
    hours = sum(n * measured[combo]["fit"]["hours"] for combo, n in covered.items())
    gpu_hours = sum(n * measured[combo]["fit"]["gpu_hours"] for combo, n in covered.items())
    checks = [(doc.get("elapsed_s") or 0) / 3600 for doc in docs.values()]
    check_gpu_hours = sum(h * ((doc.get("config") or {}).get("resources", {}).get("gpus_per_node") or 0)
                          for h, doc in zip(checks, docs.values()))
    share = f" ({check_gpu_hours / gpu_hours:.1%} of the cells')" if gpu_hours else ""
    return (f"projected from the verdicts: {sum(covered.values())} of the {sum(cells.values())} submitted cells need "
            f"{hours:.2f} job-hours, {gpu_hours:.2f} GPU-hours; the preflights took {sum(checks):.2f} job-hours, "
            f"{check_gpu_hours:.2f} GPU-hours{share}")


def print_graph(sweep_dir: Path, queue: Callable[[list], dict] | None = None, accounting: Callable[[list], dict] | None = None,
                console=None) -> None:
    """The job graph of the sweep's latest submission as its manifest recorded it (nli_grpo.graph):
    each node's jobs, what they wait on, and their states now (the queue, else sacct). Nothing
    when no submission recorded one."""
    from rich.table import Table

    from .graph import recorded_graph

    nodes = recorded_graph(sweep_dir)
    if not nodes:
        return
    latest = nodes[-1]["submitted_at"]
    nodes = [n for n in nodes if n["submitted_at"] == latest]
    ids = [job for n in nodes for job in n["jobs"].values()]
    queued = _ask(queue, ids) or {}
    ended = _ask(accounting, [j for j in ids if j not in queued]) or {}

    def state(job: str) -> str:
        if job in queued:
            return "blocked" if queued[job] == slurm.BLOCKED else str(queued[job]).lower()
        return _end_state(ended, job).lower() or "left the queue"
    table = Table(title=f"job graph of the last submission ({latest})")
    for column in ("node", "jobs", "after", "now"):
        table.add_column(column, overflow="fold")
    for n in nodes:
        jobs = list(n["jobs"].items())
        shown = ", ".join(f"{part} {job}" for part, job in jobs[:3]) + (f", ... ({len(jobs)})" if len(jobs) > 3 else "")
        after = ", ".join([*n["after"], *([n["dependency"]] if n.get("dependency") else [])]) or "—"
        counts = Counter(state(job) for _, job in jobs)
        table.add_row(n["node"], shown, after, ", ".join(f"{count} {s}" for s, count in counts.items()))
    console = console or make_console()
    console.print(table)


def _ask(call: Callable[[list], dict] | None, ids: list) -> dict | None:
    """Slurm's answer about job ids, None when there is none to ask or it cannot be asked."""
    if call is None or not ids:
        return None
    try:
        return call(ids)
    except slurm.SlurmError:
        return None


def show(sweep_dir: Path, as_json: bool = False, console=None) -> int:
    """One frame: the pools' shards and merges, or the sweep's cells (table or JSON lines)."""
    pools = [sweep_dir] if (sweep_dir / POOL_SPEC_FILENAME).is_file() else sorted(
        p.parent for p in sweep_dir.glob(f"*/{POOL_SPEC_FILENAME}"))
    if pools:
        return print_pools([PoolFolder(p) for p in pools], as_json, console)
    lines = sweep_status(sweep_dir, queue=slurm.queued_jobs, accounting=slurm.accounting_states)
    if as_json:
        for line in lines:
            print(json.dumps(asdict(line)), flush=True)
    else:
        print_status(sweep_dir.name, lines, console)
        print_verdicts(sweep_dir, console)
        print_graph(sweep_dir, slurm.queued_jobs, slurm.accounting_states, console)
    return 0


def watch(frame: Callable[[], object], seconds: float, frames: int | None = None, console=None) -> int:
    """Redraw `frame()` every `seconds` (clearing a terminal first) until Ctrl-C, or `frames` times."""
    console = console or make_console()
    shown = 0
    try:
        while frames is None or shown < frames:
            if shown:
                time.sleep(seconds)
            console.clear()
            frame()
            shown += 1
    except KeyboardInterrupt:
        pass
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nli_grpo.status", description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dir", help="a sweep's results folder, e.g. results/lora_rank (or a pool's: results/bootstrap/...)")
    parser.add_argument("--json", action="store_true", help="one JSON object per cell instead of the table")
    parser.add_argument("--watch", nargs="?", type=float, const=WATCH_SECONDS, metavar="SECONDS",
                        help=f"redraw every SECONDS (default {WATCH_SECONDS:g}) until Ctrl-C")
    args = parser.parse_args(argv)
    sweep_dir = Path(args.sweep_dir)
    if not sweep_dir.is_dir():
        print(f"error: {sweep_dir} is not a folder; give a sweep's results folder, e.g. results/lora_rank", file=sys.stderr)
        return 2
    if args.watch is None:
        return show(sweep_dir, args.json)
    if args.watch <= 0:
        print(f"error: --watch {args.watch:g}: give a positive number of seconds", file=sys.stderr)
        return 2
    console = make_console()

    def frame():
        show(sweep_dir, args.json, console)
        if not args.json:
            console.print(f"[dim]{results.now_iso()}: every {args.watch:g} s; Ctrl-C to stop[/]")

    return watch(frame, args.watch, console=console)


if __name__ == "__main__":
    raise SystemExit(main())
