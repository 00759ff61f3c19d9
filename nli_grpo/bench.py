"""Performance benchmarks: `python -m nli_grpo.bench [NAME ...] [--json FILE] [--keep DIR]`.

A benchmark is a function `(workdir: Path) -> dict` of measured figures, registered by name with
`@benchmark("name")`; it may write whatever it needs under `workdir` (a temporary folder, or
`--keep DIR` to look at it afterwards). Figures are plain numbers/strings so they fit in JSON.

    python -m nli_grpo.bench                     # every benchmark
    python -m nli_grpo.bench aggregate --json bench.json
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

from .data import BENCHMARK_NAMES
from .results import RESULT_FILENAME, SCHEMA_VERSION, TOOL, TRAIN_LOG_FILENAME

BENCHMARKS: dict[str, Callable[[Path], dict]] = {}


def benchmark(name: str):
    """Register `fn(workdir) -> dict of figures` under `name`."""
    def register(fn: Callable[[Path], dict]) -> Callable[[Path], dict]:
        BENCHMARKS[name] = fn
        return fn
    return register


# ---------------------------------------------------------------------------------------------
# Synthetic results (benchmark input; also handy to try the aggregation without a cluster)
# ---------------------------------------------------------------------------------------------

SYNTHETIC_MODELS = {"qwen2.5-7b": 0.0, "qwen2.5-14b": 0.03, "qwen2.5-32b": 0.06}   # model -> accuracy bonus
SYNTHETIC_RANKS = (None, 8, 16, 32, 64, 128)                                     # None = zero-shot
SYNTHETIC_QUANTIZATIONS = {"bf16": 0.0, "awq": -0.02}
HANS_SUBCASES = 10


def synthetic_result(sweep: str, model: str, quantization: str, lora_rank: int | None, seed: int,
                     rng: random.Random, base: dict[str, float]) -> dict:
    """A result document shaped like a real job's (full config, per-class and HANS per-subcase detail),
    with made-up numbers: base + model bonus + a GRPO gain growing with log2(rank) + seed noise."""
    status = rng.choices(("complete", "running", "failed"), weights=(95, 3, 2))[0]
    gain = 0.0 if lora_rank is None else 0.08 + 0.01 * math.log2(lora_rank / 8)
    evals = {}
    if status == "complete":
        for name in BENCHMARK_NAMES:
            acc = min(1.0, max(0.0, base[name] + SYNTHETIC_MODELS[model] + SYNTHETIC_QUANTIZATIONS[quantization]
                               + gain + rng.gauss(0, 0.005)))
            entry = {"accuracy": round(acc, 4), "accuracy_strict": round(acc - 0.01, 4), "unparseable_rate": 0.01,
                     "n": 1000, "per_class": {c: round(acc + rng.gauss(0, 0.02), 4)
                                              for c in ("entailment", "neutral", "contradiction")}}
            if name.startswith("hans"):
                entry["per_subcase"] = {f"subcase_{i}": round(acc + rng.gauss(0, 0.05), 4)
                                        for i in range(HANS_SUBCASES)}
            evals[name] = entry
    stage = "zero_shot" if lora_rank is None else "grpo"
    cell_id = f"{model}__{quantization}__{'zs' if lora_rank is None else f'r{lora_rank}'}__s{seed}"
    config = {
        "stage": stage, "seed": seed,
        "model": {"name_or_path": f"Qwen/{model}-Instruct", "quantization": quantization, "short_name": model},
        "lora": {"r": lora_rank, "alpha": lora_rank, "dropout": 0.0,
                 "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]},
        "grpo": {"num_generations": 4, "beta": 0.01, "epsilon": 0.2, "num_iterations": 4, "learning_rate": 5e-6,
                 "lr_scheduler_type": "linear", "warmup_steps": 50, "max_prompt_length": 512,
                 "max_completion_length": 512, "temperature": 0.9, "top_k": 50, "top_p": 1.0, "max_steps": 1000},
        "eval": {"benchmarks": list(BENCHMARK_NAMES), "max_new_tokens": 768, "max_model_len": 1024},
        "slurm": {"partition": "gpu", "gpus_per_node": 1, "cpus_per_task": 8, "mem_gb": 64, "time_min": 720},
    }
    return {
        "schema_version": SCHEMA_VERSION, "tool": TOOL, "sweep": sweep, "cell_id": cell_id, "status": status,
        "cell": {"model": model, "quantization": quantization, "lora_rank": lora_rank, "seed": seed, "stage": stage},
        "config": config,
        "versions": {"python": "3.11.9", "torch": "2.6.0", "transformers": "4.51.0", "trl": "0.16.0", "peft": "0.15.0",
                     "vllm": "0.8.4", "bitsandbytes": "0.45.5", "deepspeed": None, "submitit": "1.5.2"},
        "slurm": {"job_id": str(rng.randrange(10**6)), "array_task_id": seed, "attempts": 1},
        "train": None if stage == "zero_shot" else {"steps_done": 1000, "max_steps": 1000, "wall_time_s": 3600.0,
                                                    "reward_first": 0.3, "reward_last": 0.7, "kl_last": 0.02},
        "eval": evals, "error": "CUDA out of memory" if status == "failed" else None,
        "created_at": "2025-01-01T00:00:00+00:00", "updated_at": "2025-01-01T00:00:00+00:00",
    }


def write_synthetic_results(root: str | os.PathLike, n_results: int, *, cells_per_sweep: int = 1000,
                            log_steps: int = 20, seed: int = 0) -> int:
    """Write `n_results` synthetic cells under `root` as sweeps `synthetic_00`, `synthetic_01`, ...
    (model x quantization x zero-shot/LoRA ranks, seeds added until a sweep is full), each GRPO cell
    with a `log_steps`-line train log. Returns the number of sweeps. Plain writes (not atomic):
    throwaway data, and 10,000 fsyncs would dominate the set-up time."""
    rng = random.Random(seed)
    base = {name: rng.uniform(0.45, 0.75) for name in BENCHMARK_NAMES}
    variants = [(m, q, r) for m in SYNTHETIC_MODELS for q in SYNTHETIC_QUANTIZATIONS for r in SYNTHETIC_RANKS]
    n_sweeps = math.ceil(n_results / cells_per_sweep)
    for i in range(n_results):
        sweep, index = f"synthetic_{i // cells_per_sweep:02d}", i % cells_per_sweep
        model, quantization, rank = variants[index % len(variants)]
        doc = synthetic_result(sweep, model, quantization, rank, index // len(variants), rng, base)
        folder = Path(root) / sweep / doc["cell_id"]
        folder.mkdir(parents=True, exist_ok=True)
        (folder / RESULT_FILENAME).write_text(json.dumps(doc, indent=2))
        if rank is not None:
            lines = (json.dumps({"step": s, "reward": round(0.3 + 0.4 * s / log_steps + rng.gauss(0, 0.03), 4),
                                 "kl": round(0.001 * s, 5), "loss": 0.01}) for s in range(0, log_steps * 10, 10))
            (folder / TRAIN_LOG_FILENAME).write_text("\n".join(lines) + "\n")
    return n_sweeps


# ---------------------------------------------------------------------------------------------
# Benchmarks
# ---------------------------------------------------------------------------------------------

def _timed(fn: Callable, *args) -> tuple[float, float, object]:
    """(wall seconds, CPU seconds of this process and its children, value). CPU time is the steadier
    figure on a shared machine: other users' load stretches wall time, not CPU time."""
    def cpu() -> float:
        own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime

    wall, start_cpu = time.perf_counter(), cpu()
    value = fn(*args)
    return time.perf_counter() - wall, cpu() - start_cpu, value


@benchmark("aggregate")
def bench_aggregate(workdir: Path, n_results: int = 10_000) -> dict:
    """`python -m nli_grpo.aggregate` on 10,000 synthetic result files: read + validate, tables,
    the whole in-process run without and with plots, and the CLI end to end (interpreter start-up
    and imports included) without plots."""
    from . import aggregate

    root = workdir / "results"
    setup_s, _, n_sweeps = _timed(write_synthetic_results, root, n_results)
    read_s, read_cpu, collection = _timed(aggregate.collect, [root])
    references = aggregate.load_references(aggregate.DEFAULT_REFERENCE)

    def tables():
        sweeps = aggregate.build_sweeps(collection.runs)
        sweep_tables = [(s, aggregate.tables_for(s, references)) for s in sweeps]
        return aggregate.render_report(sweep_tables, len(collection.runs), collection.skipped, "accuracy")

    tables_s, tables_cpu, _ = _timed(tables)

    def run(*extra: str) -> int:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            return aggregate.main([str(root), "--out", str(workdir / "out"), *extra])

    no_plots_s, no_plots_cpu, rc_no_plots = _timed(run, "--no-plots")
    with_plots_s, with_plots_cpu, rc_plots = _timed(run)
    cli = [sys.executable, "-m", "nli_grpo.aggregate", str(root), "--no-plots", "--out", str(workdir / "cli")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).parent.parent),
                                                                      os.environ.get("PYTHONPATH")]))}
    cli_s, cli_cpu, proc = _timed(lambda: subprocess.run(cli, capture_output=True, text=True, env=env))
    if rc_no_plots or rc_plots or proc.returncode:
        raise RuntimeError(f"aggregation failed (in-process rc {rc_no_plots}/{rc_plots}, CLI rc {proc.returncode}): "
                           f"{proc.stderr[-2000:]}")
    return {
        "result_files": len(collection.runs) + len(collection.skipped), "sweeps": n_sweeps,
        "setup_s": round(setup_s, 2),
        "read_validate_s": round(read_s, 3), "read_validate_cpu_s": round(read_cpu, 3),
        "tables_s": round(tables_s, 3), "tables_cpu_s": round(tables_cpu, 3),
        "no_plots_s": round(no_plots_s, 3), "no_plots_cpu_s": round(no_plots_cpu, 3),
        "with_plots_s": round(with_plots_s, 3), "with_plots_cpu_s": round(with_plots_cpu, 3),
        "plots_written": len(list((workdir / "out" / "plots").rglob("*.png"))),
        "cli_no_plots_s": round(cli_s, 3), "cli_no_plots_cpu_s": round(cli_cpu, 3),
        "cpus": os.cpu_count(), "load_avg_1min": round(os.getloadavg()[0], 2),
    }


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nli_grpo.bench", description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", metavar="NAME",
                        help=f"benchmarks to run (default: all of {', '.join(BENCHMARKS)})")
    parser.add_argument("--json", metavar="FILE", help="also write the figures as JSON: {name: {figure: value}}")
    parser.add_argument("--keep", metavar="DIR", help="work in DIR/<name> and keep it (default: a temporary folder)")
    args = parser.parse_args(argv)
    unknown = [n for n in args.names if n not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark {', '.join(unknown)}; choose from: {', '.join(BENCHMARKS)}")

    figures = {}
    for name in args.names or list(BENCHMARKS):
        if args.keep:
            workdir = Path(args.keep) / name
            workdir.mkdir(parents=True, exist_ok=True)
            figures[name] = BENCHMARKS[name](workdir)
        else:
            with tempfile.TemporaryDirectory(prefix=f"nli_grpo_bench_{name}_") as tmp:
                figures[name] = BENCHMARKS[name](Path(tmp))
        width = max(map(len, figures[name]))
        print(f"{name}\n" + "\n".join(f"  {k:<{width}}  {v}" for k, v in figures[name].items()))
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
