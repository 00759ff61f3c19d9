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
import gzip
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
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from .config import ExperimentConfig
from .data import BENCHMARK_NAMES
from .grid import cell_from_config, cell_id
from .layout import CellFolder, result_document
from .phases import PHASES, attach_phase_timer, time_calls
from .results import package_versions, read_train_log

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
    cfg = ExperimentConfig(stage="zero_shot" if lora_rank is None else "grpo", seed=seed)  # every field, as a job's
    cfg.model.name_or_path, cfg.model.quantization = f"Qwen/{model}-Instruct", quantization
    cfg.lora.rank = lora_rank or 64
    cfg.output.sweep, cfg.output.cell_id = sweep, cell_id(cell_from_config(cfg))
    return result_document(
        cfg, status=status, versions=VERSIONS,
        slurm={"job_id": str(rng.randrange(10**6)), "array_task_id": seed, "attempts": 1},
        train=None if lora_rank is None else {"steps_done": 1000, "max_steps": 1000, "wall_time_s": 3600.0,
                                              "reward_first": 0.3, "reward_last": 0.7, "kl_last": 0.02},
        eval=evals, error="CUDA out of memory" if status == "failed" else None,
        created_at="2025-01-01T00:00:00+00:00", updated_at="2025-01-01T00:00:00+00:00")


VERSIONS = package_versions()


def synthetic_predictions(benchmark: str, accuracy: float, unparseable: float, items: int,
                          rng: random.Random) -> tuple[bytes, dict]:
    """A gzip predictions file (scoring.write_predictions' records) of `items` items of a set, with
    round(unparseable * items) unparseable answers and `accuracy` of the others right, at random
    items; the same ids in every cell, so that the aggregation pairs them. Also the eval entry's
    numbers the file gives (accuracy, accuracy_strict, unparseable_rate, n)."""
    n_unparsed = round(unparseable * items)
    n_right = round(accuracy * (items - n_unparsed))
    order = rng.sample(range(items), items)
    unparsed, right = set(order[:n_unparsed]), set(order[n_unparsed:n_unparsed + n_right])
    lines = [f'{{"id": "{benchmark}-{i}", "label": 0, "prediction": {-1 if i in unparsed else 0}, '
             f'"correct": {"true" if i in right else "false"}, "completion": "<think>Compare the premise with '
             f'the hypothesis.</think><answer>entailment</answer>"}}\n' for i in range(items)]
    parsed = items - n_unparsed
    scores = {"accuracy": round(n_right / parsed, 6) if parsed else None, "accuracy_strict": round(n_right / items, 6),
              "unparseable_rate": round(n_unparsed / items, 6), "n": items}
    return gzip.compress("".join(lines).encode(), compresslevel=1, mtime=0), scores


def write_synthetic_results(root: str | os.PathLike, n_results: int, *, cells_per_sweep: int = 1000,
                            log_steps: int = 20, seed: int = 0, items_per_set: int = 0) -> int:
    """Write `n_results` synthetic cells under `root` as sweeps `synthetic_00`, `synthetic_01`, ...
    (model x quantization: a zero-shot cell, and LoRA ranks with seeds added until a sweep is full), each GRPO cell
    with a `log_steps`-line train log, and with `items_per_set` > 0 every complete cell with per-item
    predictions of that many items per set (the eval entries' numbers set to match). Returns the number of sweeps.
    Plain writes (not atomic): throwaway data, and 10,000 fsyncs would dominate the set-up time."""
    rng = random.Random(seed)
    base = {name: rng.uniform(0.45, 0.75) for name in BENCHMARK_NAMES}
    # One zero-shot cell per model variant (greedy evaluation: its id has no seed), then the GRPO
    # cells of every rank, seed after seed.
    variants = [(m, q) for m in SYNTHETIC_MODELS for q in SYNTHETIC_QUANTIZATIONS]
    grpo = [(m, q, r) for m, q in variants for r in SYNTHETIC_RANKS if r is not None]
    cells = [(m, q, None, 0) for m, q in variants]
    cells += [(*grpo[i % len(grpo)], i // len(grpo)) for i in range(cells_per_sweep - len(cells))]
    n_sweeps = math.ceil(n_results / cells_per_sweep)
    for i in range(n_results):
        sweep = f"synthetic_{i // cells_per_sweep:02d}"
        model, quantization, rank, cell_seed = cells[i % cells_per_sweep]
        doc = synthetic_result(sweep, model, quantization, rank, cell_seed, rng, base)
        folder = CellFolder(Path(root) / sweep / doc["cell_id"])
        folder.path.mkdir(parents=True, exist_ok=True)
        if items_per_set and doc["eval"]:
            folder.predictions_dir.mkdir(exist_ok=True)
            for name, entry in doc["eval"].items():
                raw, scores = synthetic_predictions(name, entry["accuracy"], entry["unparseable_rate"], items_per_set, rng)
                folder.predictions(name).write_bytes(raw)
                entry.update(scores)
        folder.result.write_text(json.dumps(doc, indent=2))
        if rank is not None:
            lines = (json.dumps({"step": s, "reward": round(0.3 + 0.4 * s / log_steps + rng.gauss(0, 0.03), 4),
                                 "kl": round(0.001 * s, 5), "loss": 0.01}) for s in range(0, log_steps * 10, 10))
            folder.train_log.write_text("\n".join(lines) + "\n")
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


def _bench_intervals(workdir: Path, n_results: int, items_per_set: int, references) -> dict:
    """The same result files with per-item predictions: the tables without intervals (as before
    issue 22) beside the tables with every interval and paired delta, the predictions read cold
    (empty cache) and warm (the cache `aggregate` keeps under <out>/tables/)."""
    from .aggregate.collect import collect
    from .aggregate.items import ItemCache
    from .aggregate.render import render_report
    from .aggregate.tables import build_sweep_results, tables_for

    root = workdir / "results_with_predictions"
    setup_s, _, _ = _timed(partial(write_synthetic_results, items_per_set=items_per_set), root, n_results)
    collection = collect([root])
    cache_path = workdir / "item_cache.npz"

    def tables(items):
        sweeps = build_sweep_results(collection.runs, "accuracy", None, items)
        if items is not None:
            items.save()
        return render_report([(s, tables_for(s, references)) for s in sweeps], len(collection.runs), [], "accuracy")

    plain_s, plain_cpu, _ = _timed(tables, None)
    cold_s, cold_cpu, _ = _timed(lambda: tables(ItemCache(cache_path)))
    warm_s, warm_cpu, report = _timed(lambda: tables(ItemCache(cache_path)))
    files = sum(1 for _ in root.rglob("*.jsonl.gz"))
    return {"predictions_files": files, "items_per_set": items_per_set, "predictions_setup_s": round(setup_s, 2),
            "tables_no_intervals_s": round(plain_s, 3), "tables_no_intervals_cpu_s": round(plain_cpu, 3),
            "tables_intervals_cold_s": round(cold_s, 3), "tables_intervals_cold_cpu_s": round(cold_cpu, 3),
            "tables_intervals_warm_s": round(warm_s, 3), "tables_intervals_warm_cpu_s": round(warm_cpu, 3),
            "cache_mb": round(cache_path.stat().st_size / 2**20, 1), "intervals_shown": report.count(" [")}


def unavailable(*needs: str) -> str | None:
    """Why a benchmark side cannot run here (`"unavailable: ..."`, what a benchmark reports in its
    place), or None when it can: each need is `cuda` or a package that must import (vllm,
    bitsandbytes). The other sides still run, so a GPU node without vLLM keeps its HF figures."""
    import importlib

    for need in needs:
        if need == "cuda":
            import torch

            if not torch.cuda.is_available():
                return "unavailable: needs a CUDA GPU"
            continue
        try:
            importlib.import_module(need)
        except ImportError as error:
            return f"unavailable: {need} does not import ({error})"
    return None


@benchmark("aggregate")
def bench_aggregate(workdir: Path, n_results: int = 10_000, items_per_set: int = 200) -> dict:
    """`python -m nli_grpo.aggregate` on 10,000 synthetic result files: read + validate, tables,
    the whole in-process run without and with plots, and the CLI end to end (interpreter start-up
    and imports included) without plots; then the tables of the same files with per-item
    predictions (`items_per_set` items per set), without and with the bootstrap intervals."""
    from .aggregate.__main__ import main as aggregate_main
    from .aggregate.collect import collect
    from .aggregate.render import render_report
    from .aggregate.tables import DEFAULT_REFERENCE, build_sweep_results, load_references, tables_for

    root = workdir / "results"
    setup_s, _, n_sweeps = _timed(write_synthetic_results, root, n_results)
    read_s, read_cpu, collection = _timed(collect, [root])
    references = load_references(DEFAULT_REFERENCE)

    def tables():
        sweeps = build_sweep_results(collection.runs)
        sweep_tables = [(s, tables_for(s, references)) for s in sweeps]
        return render_report(sweep_tables, len(collection.runs), collection.skipped, "accuracy")

    tables_s, tables_cpu, _ = _timed(tables)

    def run(*extra: str) -> int:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            return aggregate_main([str(root), "--out", str(workdir / "out"), *extra])

    no_plots_s, no_plots_cpu, rc_no_plots = _timed(run, "--no-plots")
    with_plots_s, with_plots_cpu, rc_plots = _timed(run)
    cli = [sys.executable, "-m", "nli_grpo.aggregate", str(root), "--no-plots", "--out", str(workdir / "cli")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).parent.parent),
                                                                      os.environ.get("PYTHONPATH")]))}
    cli_s, cli_cpu, proc = _timed(lambda: subprocess.run(cli, capture_output=True, text=True, env=env))
    if rc_no_plots or rc_plots or proc.returncode:
        raise RuntimeError(f"aggregation failed (in-process rc {rc_no_plots}/{rc_plots}, CLI rc {proc.returncode}): "
                           f"{proc.stderr[-2000:]}")
    intervals = _bench_intervals(workdir, n_results, items_per_set, references)
    return {
        **intervals,
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
# Settings shared by the model benchmarks, paired measurements, summaries
# ---------------------------------------------------------------------------------------------

@dataclass
class BenchSettings:
    """What the model benchmarks run on: `--model` (NLI_GRPO_BENCH_MODEL; default the tiny CPU
    model, `random:qwen2.5-0.5b` for the realistic CPU shape, `random:qwen2.5-7b` on a GPU node),
    `--repeats` of each measured pair, `--threads` for torch and vLLM's CPU worker alike,
    `--prompts` per batch (each a GRPO group of 4), `--new-tokens` per completion."""

    model: str = "tiny"
    repeats: int = 3
    threads: int = 1
    prompts: int = 2
    new_tokens: int = 32
    rank: int = 64

    @classmethod
    def from_env(cls) -> BenchSettings:
        env = os.environ.get
        return cls(model=env("NLI_GRPO_BENCH_MODEL", "tiny"), repeats=int(env("NLI_GRPO_BENCH_REPEATS", "3")),
                   threads=int(env("NLI_GRPO_BENCH_THREADS", "1")), prompts=int(env("NLI_GRPO_BENCH_PROMPTS", "2")),
                   new_tokens=int(env("NLI_GRPO_BENCH_NEW_TOKENS", "32")), rank=int(env("NLI_GRPO_BENCH_RANK", "64")))

    def export(self) -> None:
        """Into the environment: the benchmarks (and vLLM's worker processes) read it there."""
        os.environ.update(NLI_GRPO_BENCH_MODEL=self.model, NLI_GRPO_BENCH_REPEATS=str(self.repeats),
                          NLI_GRPO_BENCH_THREADS=str(self.threads), NLI_GRPO_BENCH_PROMPTS=str(self.prompts),
                          NLI_GRPO_BENCH_NEW_TOKENS=str(self.new_tokens), NLI_GRPO_BENCH_RANK=str(self.rank))


def _pin_threads(threads: int) -> None:
    """The same cores for both sides of a pair: torch's threads here, OpenMP's in vLLM's worker,
    and none of them held back by vLLM (it reserves one core by default)."""
    import torch

    torch.set_num_threads(threads)
    os.environ.update(OMP_NUM_THREADS=str(threads), VLLM_CPU_NUM_OF_RESERVED_CPU="0")


def summary(values: list[float], digits: int = 3) -> dict:
    """Median and spread (min, max) of repeated measurements."""
    ordered = sorted(values)
    mid = len(ordered) // 2
    median = ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2
    return {"median": round(median, digits), "min": round(ordered[0], digits), "max": round(ordered[-1], digits),
            "n": len(ordered)}


def interleaved(measures: dict[str, Callable[[], float]], repeats: int) -> dict[str, list[float]]:
    """Each measure `repeats` times, side by side: A B, B A, A B ... so a change in the machine's
    load during the run falls on both sides alike."""
    values: dict[str, list[float]] = {name: [] for name in measures}
    names = list(measures)
    for r in range(repeats):
        for name in names if r % 2 == 0 else reversed(names):
            values[name].append(measures[name]())
    return values


def paired_ratio(numerator: list[float], denominator: list[float]) -> list[float]:
    """Per-repeat ratios of two interleaved measurements (each repeat's pair ran back to back)."""
    return [a / b for a, b in zip(numerator, denominator)]


def _fmt(value) -> str:
    if isinstance(value, dict) and "median" in value:
        return f"{value['median']:g} ({value['min']:g} to {value['max']:g}, n={value['n']})"
    return str(value)


def markdown_table(figures: dict) -> str:
    """Every benchmark's figures as Markdown: one table per benchmark, medians with their spread."""
    blocks = []
    for name, values in figures.items():
        rows = [f"| {key} | {_fmt(value)} |" for key, value in values.items() if key != "projection_table"]
        blocks.append(f"### {name}\n\n| figure | value (median (min to max, n)) |\n|---|---|\n" + "\n".join(rows))
        if "projection_table" in values:
            blocks.append(values["projection_table"])
    return "\n\n".join(blocks) + "\n"


def _run_config(workdir: Path, settings: BenchSettings, *extra: str):
    """The smoke recipe on the benchmark's model: LoRA at settings.rank, groups of 4, settings.prompts
    prompts per step, settings.new_tokens per completion, gradient checkpointing (the paper's)."""
    from .job import config_for_run

    return config_for_run("smoke", [
        # gradient checkpointing as the paper's recipe (without it a 0.5B step on the CPU needs ~9 GB)
        f"model.name_or_path={settings.model}", f"lora.rank={settings.rank}", "grpo.top_k=0", "model.gradient_checkpointing=true",
        f"grpo.max_completion_length={settings.new_tokens}", f"grpo.completions_per_step={4 * settings.prompts}",
        *extra], str(workdir / "run"))


def _rollout_setup(workdir: Path, settings: BenchSettings):
    """The policy the rollout benchmark uses and a batch of the paper's NLI prompts through the chat
    template, each repeated for a group of 4."""
    import torch
    from peft import get_peft_model

    from .data import load_train_source
    from .models import load_base_model, load_tokenizer, peft_lora_config, training_precision
    from .prompts import render_prompt

    cfg = _run_config(workdir, settings)
    tokenizer = load_tokenizer(cfg.model)
    rows = load_train_source("anli_train_r1", local_dir="samples", hub=False, limit=settings.prompts).dataset
    prompts = [render_prompt(tokenizer, p, h) for p, h in zip(rows["premise"], rows["hypothesis"])]
    prompt_ids = [tokenizer(p, add_special_tokens=False).input_ids for p in prompts for _ in range(cfg.grpo.num_generations)]
    load_s, _, base = _timed(load_base_model, cfg.model, training_precision(cfg, torch.cuda.is_available())["dtype"])
    policy = get_peft_model(base, peft_lora_config(cfg.lora))
    # A trained-looking adapter (LoRA B is 0 at init, which vLLM could shortcut).
    for name, param in policy.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0, 0.01)
    return cfg, tokenizer, prompt_ids, policy.eval(), load_s


@benchmark("rollout")
def bench_rollout(workdir: Path) -> dict:
    """Rollouts and policy syncs, side by side on the same model, adapter and batch (the paper's
    prompts through the chat template, groups of 4), the same threads on both sides.

    Throughput: vLLM with the adapter hot-swapped vs HF generate on the PEFT model, and both
    without the adapter (the base alone); every sequence forced to the same completion length
    (EOS ignored) so both produce exactly the same number of tokens. vLLM with a group's prompt
    sent once (n=4 samples) vs once per sample.
    Sync: our hot-swap (save the LoRA weights, new LoRARequest, retire the old one in vLLM) vs
    TRL's full merged-weight push (merge the adapter into the base, gather every weight, unmerge).
    The push's last step, vLLM's load_weights, cannot run on vLLM's CPU backend (platform-notes),
    so on the CPU its seconds are a lower bound."""
    import torch
    from vllm import SamplingParams

    from .rollout import AdapterHotSwap, build_llm, group_runs

    settings = BenchSettings.from_env()
    _pin_threads(settings.threads)
    cfg, tokenizer, prompt_ids, policy, load_s = _rollout_setup(workdir, settings)
    g = cfg.grpo
    new_tokens = g.max_completion_length
    tokenizer.padding_side = "left"
    enc = tokenizer.pad({"input_ids": prompt_ids}, return_tensors="pt").to(policy.device)

    def hf_rollout(adapter: bool) -> float:
        context = contextlib.nullcontext() if adapter else policy.disable_adapter()
        started = time.perf_counter()
        with torch.no_grad(), context:
            out = policy.generate(**enc, do_sample=True, temperature=g.temperature, top_p=g.top_p, top_k=0,
                                  max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=tokenizer.pad_token_id)
        return (out.shape[1] - enc["input_ids"].shape[1]) * out.shape[0] / (time.perf_counter() - started)

    start_s, _, llm = _timed(lambda: build_llm(cfg, purpose="rollout", lora_rank=cfg.lora.rank))
    swap = AdapterHotSwap(llm, workdir / "adapters")
    versions = iter(range(1, 10_000))

    def vllm_rollout(adapter: bool, shared: bool = False) -> float:
        # a new policy version each time, as in training (its first generate loads it)
        request = swap.sync(policy, next(versions)) if adapter else None
        runs = group_runs(prompt_ids) if shared else [(i, 1) for i in range(len(prompt_ids))]
        params = [SamplingParams(n=n, temperature=g.temperature, top_p=g.top_p, max_tokens=new_tokens, ignore_eos=True)
                  for _, n in runs]
        started = time.perf_counter()
        outs = llm.generate([{"prompt_token_ids": prompt_ids[first]} for first, _ in runs], params, lora_request=request,
                            use_tqdm=False)
        return sum(len(c.token_ids) for o in outs for c in o.outputs) / (time.perf_counter() - started)

    hf_rollout(True), vllm_rollout(True)  # warm-up (first LoRA load)
    tps = interleaved({
        "hf_adapter": lambda: hf_rollout(True), "vllm_adapter": lambda: vllm_rollout(True),
        "hf_base": lambda: hf_rollout(False), "vllm_base": lambda: vllm_rollout(False),
        "vllm_adapter_group_shared": lambda: vllm_rollout(True, shared=True),
    }, settings.repeats)
    # Each sync publishes a new version (and retires the previous one); the next generate loads it.
    sync_s = [_timed(swap.sync, policy, 20_000 + step)[0] for step in range(5)]
    hot_bytes = swap.bytes_last_sync
    swap.close()
    llm.llm_engine.engine_core.shutdown()

    def full_push() -> int:
        policy.merge_adapter()
        sent = 0
        with torch.no_grad():
            for name, param in policy.get_base_model().named_parameters():
                if "lora_" not in name:
                    sent += param.detach().contiguous().numel() * param.element_size()
        policy.unmerge_adapter()
        return sent

    push_bytes = full_push()
    push_s = [_timed(full_push)[0] for _ in range(5)]
    return {
        "model": cfg.model.name_or_path, "lora_rank": cfg.lora.rank, "sequences": len(prompt_ids), "group_size": g.num_generations,
        "prompt_tokens": summary([len(x) for x in prompt_ids], 0),
        "new_tokens_per_sequence": new_tokens, "threads": settings.threads,
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        **{f"{k}_tokens_per_s": summary(v, 2) for k, v in tps.items()},
        "vllm_over_hf_with_adapter": summary(paired_ratio(tps["vllm_adapter"], tps["hf_adapter"]), 2),
        "vllm_over_hf_without_adapter": summary(paired_ratio(tps["vllm_base"], tps["hf_base"]), 2),
        "group_shared_over_per_sample": summary(paired_ratio(tps["vllm_adapter_group_shared"], tps["vllm_adapter"]), 2),
        "hf_model_load_s": round(load_s, 2), "vllm_engine_start_s": round(start_s, 1),
        "hot_swap_bytes": hot_bytes, "hot_swap_s": summary(sync_s, 4),
        "full_push_bytes": push_bytes, "full_push_s": summary(push_s, 4),
        "full_push_over_hot_swap_bytes": round(push_bytes / hot_bytes, 2),
        "full_push_over_hot_swap_s": round(summary(push_s, 6)["median"] / summary(sync_s, 6)["median"], 2),
        "load_avg_1min": round(os.getloadavg()[0], 2),
    }


@benchmark("sync_bytes")
def bench_sync_bytes(workdir: Path) -> dict:
    """Bytes one policy sync moves on the real Qwen2.5 shapes, per LoRA rank: the adapter our
    hot-swap saves (the LoRA weights in the base's dtype, bf16) vs the bf16 weights a merged push
    sends. Counted exactly from PEFT models built on the meta device (shapes, no
    memory), so it runs anywhere."""
    import torch
    from peft import get_peft_model
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from .catalog import QWEN25_SHAPES, qwen25_config
    from .config import LoraConfig
    from .models import peft_lora_config

    figures = {}
    for name in QWEN25_SHAPES:
        with torch.device("meta"):
            base = Qwen2ForCausalLM(Qwen2Config(**qwen25_config(name))).to(torch.bfloat16)
        full = sum(p.numel() * p.element_size() for p in base.parameters())
        figures[f"{name}_full_push_GB"] = round(full / 1e9, 2)
        peft_model = get_peft_model(base, peft_lora_config(LoraConfig(rank=8)))
        per_rank8 = sum(p.numel() for n, p in peft_model.named_parameters() if "lora_" in n) * 2
        for rank in (8, 64, 128):
            adapter = per_rank8 * rank // 8  # LoRA parameters grow linearly with the rank
            figures[f"{name}_r{rank}_hot_swap_MB"] = round(adapter / 1e6, 1)
            figures[f"{name}_r{rank}_full_over_hot_swap"] = round(full / adapter, 1)
    return figures


#: grpo_step's variants: name -> (overrides, what it needs besides the job). On a CPU every dtype
#: setting trains in float32 (models.training_precision), so the fp16 recipe is a GPU variant.
GRPO_STEP_VARIANTS = {
    "bf16": (["model.quantization=bf16", "model.dtype=bfloat16", "grpo.mixed_precision=bf16"], ()),
    "fp16_bf16_autocast": (["model.quantization=bf16", "model.dtype=float16", "grpo.mixed_precision=bf16"], ("cuda",)),
    "bnb4": (["model.quantization=bnb4"], ("bitsandbytes",)),
}


@benchmark("grpo_step")
def bench_grpo_step(workdir: Path) -> dict:
    """Peak memory and time of GRPO steps (LoRA r64, 8 completions of 64 tokens, the paper's
    settings otherwise) per precision variant (GRPO_STEP_VARIANTS: bf16 weights; the paper's
    float16 weights under bf16 autocast; bnb-4bit), through the real job. NLI_GRPO_BENCH_MODEL
    picks the model (default the tiny CPU one; `random:qwen2.5-7b` on a GPU node is the issue's
    check), NLI_GRPO_BENCH_STEP_VARIANTS (comma-separated) the variants; a variant this machine
    cannot run (no CUDA, no bitsandbytes) is reported unavailable and the others still run."""
    import torch

    from .job import config_for_run, run
    from .results import read_result

    model = BenchSettings.from_env().model
    names = [v for v in os.environ.get("NLI_GRPO_BENCH_STEP_VARIANTS", ",".join(GRPO_STEP_VARIANTS)).split(",") if v]
    unknown = [v for v in names if v not in GRPO_STEP_VARIANTS]
    if unknown:
        raise ValueError(f"NLI_GRPO_BENCH_STEP_VARIANTS: unknown {unknown}; choose from {', '.join(GRPO_STEP_VARIANTS)}")
    figures: dict = {"model": model, "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"}
    for name in names:
        overrides, needs = GRPO_STEP_VARIANTS[name]
        if reason := unavailable(*needs):
            figures[name] = reason
            continue
        out = workdir / name
        cfg = config_for_run("paper", [
            f"model.name_or_path={model}", *overrides, "lora.rank=64", "grpo.max_steps=3",
            "grpo.num_iterations=1", "grpo.max_completion_length=64", "grpo.save_steps=1000", "rollout.backend=hf",
            "data.train_source=anli_train_r1", "data.local_dir=samples", "data.hub=false", "eval.after_training=false",
            *([] if torch.cuda.is_available() else ["grpo.optim=adamw_torch", "resources.gpus_per_node=0"]),
        ], str(out))
        # Alternating rewards: every group has non-zero advantages, so every step runs backward.
        if run(cfg, reward_funcs=[lambda completions, **_: [float(i % 2) for i in range(len(completions))]]) != 0:
            raise RuntimeError(f"the {name} run failed; see {out}")
        train = read_result(CellFolder(out).result)["train"]
        step_times = [r["step_time"] for r in read_train_log(CellFolder(out).train_log) if "step_time" in r]
        figures[f"{name}_peak_memory_gb"] = train["peak_memory_gb"]
        figures[f"{name}_memory_kind"] = train["peak_memory_kind"]
        figures[f"{name}_step_s_after_first"] = round(sum(step_times[1:]) / max(1, len(step_times[1:])), 3)
    return figures


# ---------------------------------------------------------------------------------------------
# One GRPO step by phase, trainer overhead, evaluation, a cell's fixed costs
# ---------------------------------------------------------------------------------------------

def _alternating_rewards(completions, **_):
    """Rewards 0, 1, 0, 1 ...: every group has non-zero advantages, so no update is skipped
    (random weights would score 0 everywhere, and our trainer skips such updates; TRL does not)."""
    return [float(i % 2) for i in range(len(completions))]


def _phase_figures(prefix: str, steps: list[dict]) -> dict:
    measured = steps[1:] or steps  # the first step warms up (first LoRA load, allocator)
    return {f"{prefix}_{key}_s": summary([s[key] for s in measured]) for key in (*PHASES, "step")}


@benchmark("grpo_phases")
def bench_grpo_phases(workdir: Path) -> dict:
    """One GRPO step broken into phases (generation, adapter sync, reference / old log-probs,
    forward, backward, optimizer, the rest) with HF and with colocated vLLM rollouts, through our
    trainer (nli_grpo.training.build_trainer): 1 + --repeats steps each, the first dropped.
    One policy update per generation (grpo.num_iterations=1, so no old log-probs: the reference
    model's are the only no-grad pass; the paper's num_iterations=4 adds one more of the same size,
    which the projection counts). Without vLLM the HF side still runs and the vLLM side (with the
    comparison and the projection) is reported unavailable."""
    import gc

    from .process import StopRequest
    from .training import _release, build_trainer

    settings = BenchSettings.from_env()
    _pin_threads(settings.threads)
    figures: dict = {"model": settings.model, "lora_rank": settings.rank, "completions_per_step": 4 * settings.prompts,
                     "new_tokens": settings.new_tokens, "threads": settings.threads}
    for backend in ("hf", "vllm"):
        if reason := unavailable("vllm") if backend == "vllm" else None:
            figures[backend] = reason
            continue
        cfg = _run_config(workdir / backend, settings, f"rollout.backend={backend}", "grpo.num_iterations=1",
                          f"grpo.max_steps={settings.repeats + 1}", "grpo.save_steps=100000", "eval.after_training=false",
                          "grpo.gradient_accumulation_steps=1")
        trainer, _ = build_trainer(cfg, StopRequest(), reward_funcs=[_alternating_rewards])
        steps = attach_phase_timer(trainer)
        trainer.train()
        if hasattr(trainer, "close_rollout"):
            trainer.close_rollout()
        figures.update(_phase_figures(backend, steps))
        _release(trainer)  # the next backend's model (and engine) must fit beside nothing of this one
        del trainer
        gc.collect()
    if "vllm" in figures:  # the comparison and the projection need both sides
        figures["load_avg_1min"] = round(os.getloadavg()[0], 2)
        return figures
    hf, vl = (lambda k: figures[f"hf_{k}_s"]["median"]), (lambda k: figures[f"vllm_{k}_s"]["median"])
    figures["generation_hf_over_vllm"] = round(hf("generation") / max(vl("generation") + vl("adapter_sync"), 1e-9), 2)
    figures["step_hf_over_vllm"] = round(hf("step") / vl("step"), 2)
    figures["hf_generation_share"] = round(hf("generation") / hf("step"), 3)
    update = ("ref_old_logprobs", "forward", "backward", "optimizer", "other")
    figures["update_vllm_over_hf"] = round(sum(map(vl, update)) / sum(map(hf, update)), 2)  # the same computation: 1 ideally
    projection = project_grid_hours({p: hf(p) for p in PHASES}, {p: vl(p) for p in PHASES})
    figures["projection"] = projection
    figures["projection_table"] = projection_table(projection)
    figures["load_avg_1min"] = round(os.getloadavg()[0], 2)
    return figures


# The paper's training cells (sweeps/paper.py; zero-shot cells train nothing): size -> cells, each
# (steps x completions per step): 3 main runs x 3 seeds at 4000 x 8, and on 7B 10 LoRA-rank cells
# (5 ranks x bf16/AWQ) x 3 seeds at 1000 x 32: the same completions per cell.
PAPER_TRAINING_CELLS = {"7b": 3 + 30, "14b": 3, "32b": 3}
PAPER_NUM_ITERATIONS = 4


def generation_cycle_seconds(phases: dict, num_iterations: int) -> float:
    """Seconds of one generation batch and the num_iterations updates trained on it, from one
    measured step with num_iterations=1: generation + adapter sync + the no-grad log-prob pass
    (reference; with num_iterations > 1 also the old policy's, the same size) + num_iterations x
    (forward + backward + optimizer + the rest)."""
    logprob_passes = 2 if num_iterations > 1 else 1
    update = phases["forward"] + phases["backward"] + phases["optimizer"] + phases["other"]
    return phases["generation"] + phases["adapter_sync"] + logprob_passes * phases["ref_old_logprobs"] + num_iterations * update


def project_grid_hours(hf: dict, vllm: dict, num_iterations: int = PAPER_NUM_ITERATIONS) -> dict:
    """A PROJECTION, not a measurement: the paper grid's GPU-hours with vLLM rollouts from those
    with HF rollouts, by the measured phase ratio. Formula:
        ratio = cycle(hf phases, vLLM's generation and sync) / cycle(hf phases)   (generation_cycle_seconds)
        hours_hf(size)   = cells(size) x time limit(size) x GPUs(size)   (grid.SIZE_RESOURCES)
        hours_vllm(size) = ratio x hours_hf(size)
    Assumptions: the update (log-prob passes, forward, backward, optimizer) is the same computation
    with either backend, so both cycles take the HF run's update phases and only generation and
    sync differ (a colocated engine beside the trainer on a small machine slows the update it
    does not do); each HF cell runs for its whole Slurm time limit (an upper bound: the budget the
    sweeps ask for); the phase ratio measured here (CPU, this model, these lengths) holds on the GPU
    for every size. Longer completions (the paper allows 512 tokens) raise generation's share and
    with it the weight of the rollout backend."""
    from .grid import SIZE_RESOURCES

    vllm_cycle = {**hf, "generation": vllm["generation"], "adapter_sync": vllm["adapter_sync"]}
    ratio = generation_cycle_seconds(vllm_cycle, num_iterations) / generation_cycle_seconds(hf, num_iterations)
    rows = {}
    for size, cells in PAPER_TRAINING_CELLS.items():
        res = SIZE_RESOURCES[size]
        hf_hours = cells * res["timeout_min"] / 60 * res["gpus_per_node"]
        rows[size] = {"cells": cells, "hf_gpu_hours": round(hf_hours), "vllm_gpu_hours": round(hf_hours * ratio)}
    total_hf = sum(r["hf_gpu_hours"] for r in rows.values())
    return {"num_iterations": num_iterations, "cycle_ratio_vllm_over_hf": round(ratio, 3), "sizes": rows,
            "total_hf_gpu_hours": total_hf, "total_vllm_gpu_hours": round(total_hf * ratio)}


def projection_table(projection: dict) -> str:
    """The projection as a Markdown table, labelled as one, with its formula."""
    lines = ["**Projection** (not measured): paper grid GPU-hours, HF vs vLLM rollouts. "
             f"ratio = cycle(vLLM) / cycle(HF) = {projection['cycle_ratio_vllm_over_hf']}, cycle = generation + sync + "
             f"{2 if projection['num_iterations'] > 1 else 1} x log-prob pass + {projection['num_iterations']} x "
             "(forward + backward + optimizer + rest), phases measured by `grpo_phases`, the update phases the HF run's "
             "for both (the same computation); HF hours = cells x Slurm time limit x GPUs (assumed fully used).", "",
             "| size | training cells | HF GPU-h | vLLM GPU-h (projected) |", "|---|---|---|---|"]
    for size, row in projection["sizes"].items():
        lines.append(f"| {size} | {row['cells']} | {row['hf_gpu_hours']} | {row['vllm_gpu_hours']} |")
    lines.append(f"| total | {sum(r['cells'] for r in projection['sizes'].values())} | {projection['total_hf_gpu_hours']} | "
                 f"{projection['total_vllm_gpu_hours']} |")
    return "\n".join(lines)


def _step_clock(trainer) -> list[tuple[float, float]]:
    """(wall, CPU) clock readings at the start of each optimizer step of `trainer` and at the end
    of training: consecutive differences are each step's seconds, logging included. CPU seconds
    (this process and its threads) are the steadier figure on a machine shared with other jobs."""
    from transformers import TrainerCallback

    marks: list[tuple[float, float]] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            marks.append((time.perf_counter(), time.process_time()))

        def on_train_end(self, args, state, control, **kwargs):
            marks.append((time.perf_counter(), time.process_time()))

    trainer.add_callback(Clock())
    return marks


def _bare_trl_trainer(cfg, out: Path):
    """What a user writes with TRL alone: GRPOTrainer on the same model, LoRA, prompts and
    GRPOConfig (nli_grpo.training.trl_args, trackers off), no subclass, no callbacks."""
    import torch
    from transformers import AutoModelForCausalLM
    from trl import GRPOTrainer

    from .models import load_tokenizer, peft_lora_config, resolve_model_path
    from .training import prompt_dataset, trl_args

    tokenizer = load_tokenizer(cfg.model)
    dataset, _ = prompt_dataset(cfg, tokenizer)
    args = trl_args(cfg, out)
    args.report_to = []
    model = AutoModelForCausalLM.from_pretrained(resolve_model_path(cfg.model.name_or_path), dtype=torch.float32)
    return GRPOTrainer(model=model, reward_funcs=[_alternating_rewards], args=args, train_dataset=dataset,
                       processing_class=tokenizer, peft_config=peft_lora_config(cfg.lora))


@benchmark("overhead")
def bench_overhead(workdir: Path) -> dict:
    """Our trainer's seconds per step over a bare TRL GRPOTrainer script's, same settings, HF
    rollouts: `ratio` of the medians (goal <= 1.05), in wall and in CPU seconds. --repeats pairs
    of runs alternate (ours, bare, bare, ours ...), 3 steps each (tiny: 10), the first dropped."""
    from .process import StopRequest
    from .training import _release, build_trainer

    settings = BenchSettings.from_env()
    _pin_threads(settings.threads)
    steps = 10 if settings.model == "tiny" else 3  # a tiny step is short: more of them against the machine's noise
    runs = iter(range(1000))
    per_step: dict[str, dict[str, list[float]]] = {kind: {"wall": [], "cpu": []} for kind in ("ours", "bare")}

    def run(kind: str) -> float:
        cfg = _run_config(workdir / f"{kind}-{next(runs)}", settings, "rollout.backend=hf", "grpo.num_iterations=1",
                          f"grpo.max_steps={steps}", "grpo.save_steps=100000", "eval.after_training=false",
                          "grpo.gradient_accumulation_steps=1")
        if kind == "ours":
            trainer, _ = build_trainer(cfg, StopRequest(), reward_funcs=[_alternating_rewards])
        else:
            trainer = _bare_trl_trainer(cfg, Path(cfg.output.dir) / "bare")
        marks = _step_clock(trainer)
        trainer.train()
        _release(trainer)  # one model in memory at a time
        for clock, index in (("wall", 0), ("cpu", 1)):
            per_step[kind][clock] += [b[index] - a[index] for a, b in zip(marks, marks[1:])][1:]
        return (marks[-1][0] - marks[1][0]) / (len(marks) - 2)

    means = interleaved({"ours": lambda: run("ours"), "bare": lambda: run("bare")}, settings.repeats)
    figures: dict = {"model": settings.model, "steps_per_run": steps, "pairs": settings.repeats, "threads": settings.threads}
    for clock in ("wall", "cpu"):
        ours, bare = summary(per_step["ours"][clock]), summary(per_step["bare"][clock])
        figures.update({f"ours_step_{clock}_s": ours, f"bare_trl_step_{clock}_s": bare,
                        f"ratio_{clock}": round(ours["median"] / bare["median"], 3)})
    figures["ratio"] = figures["ratio_wall"]
    figures["ratio_wall_per_pair"] = summary(paired_ratio(means["ours"], means["bare"]))
    figures["goal_ratio_max"] = 1.05
    figures["load_avg_1min"] = round(os.getloadavg()[0], 2)
    return figures


@benchmark("evaluation")
def bench_evaluation(workdir: Path) -> dict:
    """Examples/s of our 13-set evaluation (nli_grpo.evaluation.evaluate: data loading, prompts,
    generation, scoring, prediction files) vs raw vLLM generate of the same prompts with the same
    greedy settings, on one engine, side by side (NLI_GRPO_BENCH_EVAL_LIMIT examples per set):
    raw as one call over all sets, and raw as one call per set the way `evaluate` calls it, which
    separates the cost of per-set batches from the cost of our own per-set work."""
    from vllm import SamplingParams

    from .data import BENCHMARK_NAMES, load_benchmark
    from .evaluation import VLLMGenerator, _token_budget, evaluate
    from .prompts import render_prompt

    settings = BenchSettings.from_env()
    _pin_threads(settings.threads)
    limit = int(os.environ.get("NLI_GRPO_BENCH_EVAL_LIMIT", "4"))
    cfg = _run_config(workdir, settings, "stage=zero_shot", "eval.backend=vllm", f"eval.limit={limit}",
                      f"eval.max_new_tokens={settings.new_tokens}")
    start_s, _, generator = _timed(VLLMGenerator, cfg, None)
    e = cfg.eval
    requests_per_set = []
    for name in BENCHMARK_NAMES:
        ds = load_benchmark(name, local_dir=cfg.data.local_dir, hub=False, limit=limit).dataset
        ids = [generator.tokenizer(render_prompt(generator.tokenizer, p, h), add_special_tokens=False).input_ids
               for p, h in zip(ds["premise"], ds["hypothesis"])]
        requests_per_set.append(([{"prompt_token_ids": x} for x in ids],
                                 [SamplingParams(temperature=0.0, max_tokens=_token_budget(len(x), e.max_new_tokens, e.max_model_len),
                                                 skip_special_tokens=True) for x in ids]))
    examples = sum(len(prompts) for prompts, _ in requests_per_set)

    def ours() -> float:
        started = time.perf_counter()
        with contextlib.redirect_stderr(io.StringIO()):
            block = evaluate(cfg, adapter=None, generator=generator)
        return sum(entry["n"] for entry in block.values()) / (time.perf_counter() - started)

    def raw(calls: list[tuple[list, list]]) -> float:
        started = time.perf_counter()
        for prompts, params in calls:
            generator.llm.generate(prompts, params, use_tqdm=False)
        return examples / (time.perf_counter() - started)

    one_call = [([r for prompts, _ in requests_per_set for r in prompts], [p for _, params in requests_per_set for p in params])]
    raw(one_call)  # warm-up
    eps = interleaved({"ours": ours, "raw_vllm": lambda: raw(one_call), "raw_vllm_per_set": lambda: raw(requests_per_set)},
                      settings.repeats)
    generator.close()
    return {"model": settings.model, "sets": len(BENCHMARK_NAMES), "examples": examples, "max_new_tokens": e.max_new_tokens,
            "threads": settings.threads, "eval_engine_start_s": round(start_s, 1),
            "ours_examples_per_s": summary(eps["ours"]), "raw_vllm_examples_per_s": summary(eps["raw_vllm"]),
            "raw_vllm_per_set_examples_per_s": summary(eps["raw_vllm_per_set"]),
            "ours_over_raw": summary(paired_ratio(eps["ours"], eps["raw_vllm"])),
            "ours_over_raw_per_set": summary(paired_ratio(eps["ours"], eps["raw_vllm_per_set"])),
            "load_avg_1min": round(os.getloadavg()[0], 2)}


@benchmark("fixed_costs")
def bench_fixed_costs(workdir: Path) -> dict:
    """A cell's fixed costs through the real job (nli_grpo.job.run: 1 GRPO step with colocated vLLM
    rollouts, then the evaluation on one set): engine starts, model loads and the job's wall time,
    with the evaluation reusing the rollout engine (now the default) and without (before)."""
    from . import models, rollout
    from .job import run

    settings = BenchSettings.from_env()
    _pin_threads(settings.threads)
    counts: dict[str, list[float]] = {}
    figures: dict = {"model": settings.model, "threads": settings.threads}
    originals = {}
    try:
        for owner, attr in ((rollout, "build_llm"), (models, "load_base_model")):
            originals[(owner, attr)] = time_calls(owner, attr, lambda seconds, attr=attr: counts.setdefault(attr, []).append(seconds))
        for reuse in (True, False):
            rollout.REUSE_ROLLOUT_ENGINE_FOR_EVAL = reuse
            counts.clear()
            label = "reuse" if reuse else "no_reuse"
            cfg = _run_config(workdir / label, settings, "rollout.backend=vllm", "eval.backend=vllm", "grpo.max_steps=1",
                              "grpo.num_iterations=1", "grpo.save_steps=100000", "eval.benchmarks=[anli_r1]", "eval.limit=2",
                              f"eval.max_new_tokens={settings.new_tokens}", "grpo.gradient_accumulation_steps=1")
            wall, _, code = _timed(run, cfg, [_alternating_rewards])
            if code != 0:
                raise RuntimeError(f"the {label} job failed (exit {code}); see {cfg.output.dir}")
            figures[f"{label}_job_s"] = round(wall, 1)
            figures[f"{label}_engine_starts"] = len(counts.get("build_llm", []))
            figures[f"{label}_engine_start_s"] = round(sum(counts.get("build_llm", [])), 1)
            figures[f"{label}_hf_model_loads"] = len(counts.get("load_base_model", []))
            figures[f"{label}_hf_model_load_s"] = round(sum(counts.get("load_base_model", [])), 1)
    finally:
        rollout.REUSE_ROLLOUT_ENGINE_FOR_EVAL = True
        for (owner, attr), inner in originals.items():
            setattr(owner, attr, inner)
    figures["job_s_saved_by_reuse"] = round(figures["no_reuse_job_s"] - figures["reuse_job_s"], 1)
    figures["load_avg_1min"] = round(os.getloadavg()[0], 2)
    return figures


@benchmark("resume_cost")
def bench_resume_cost(workdir: Path) -> dict:
    """What exact resume costs (training.NLIGRPOTrainer._save_checkpoint): a GRPO run of 2 steps,
    num_iterations 2, saving after each (step 1: inside the generation cycle, the generated batch
    is saved; step 2: at its boundary, nothing to save), through the real job. Times each save
    (what a USR2/SIGTERM stop adds before the job can exit) and the generation state's share of
    it, and the bytes it adds to a checkpoint. For the alternative (a stop waits for the cycle's
    end), the time of a step that does not generate: a stop waits up to
    num_iterations x steps_per_generation - 1 of them."""
    import torch

    from . import training
    from .job import run

    settings = BenchSettings.from_env()
    _pin_threads(settings.threads)
    saves: list[float] = []
    make = training.make_trainer_class

    def timed_class():
        cls = make()

        class Timed(cls):
            def _save_checkpoint(self, model, trial):
                started = time.perf_counter()
                super()._save_checkpoint(model, trial)
                saves.append(time.perf_counter() - started)
        return Timed

    training.make_trainer_class = timed_class
    try:
        cfg = _run_config(workdir, settings, "grpo.max_steps=2", "grpo.num_iterations=2", "grpo.save_steps=1",
                          "grpo.save_total_limit=10", "rollout.backend=hf", "eval.after_training=false")
        if run(cfg, reward_funcs=[_alternating_rewards]) != 0:
            raise RuntimeError(f"the run failed; see {cfg.output.dir}")
    finally:
        training.make_trainer_class = make
    checkpoints = CellFolder(cfg.output.dir).checkpoints
    state_file = checkpoints / "checkpoint-1" / f"{training.GENERATION_STATE}.pt"
    state = torch.load(state_file, weights_only=False)
    state_s = _timed(torch.save, state, workdir / "state-copy.pt")[0]

    def size(folder: Path) -> int:
        return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())

    step_times = [r.get("step_time") for r in read_train_log(CellFolder(cfg.output.dir).train_log)]
    return {"model": settings.model, "lora_rank": cfg.lora.rank, "completions_per_step": cfg.grpo.completions_per_step,
            "new_tokens": settings.new_tokens, "threads": settings.threads,
            "save_mid_cycle_s": round(saves[0], 3), "save_at_boundary_s": round(saves[1], 3),
            "generation_state_save_s": round(state_s, 4),
            "generation_state_bytes_mid_cycle": state_file.stat().st_size,
            "generation_state_bytes_at_boundary": (checkpoints / "checkpoint-2" / state_file.name).stat().st_size,
            "checkpoint_bytes_mid_cycle": size(checkpoints / "checkpoint-1"),
            "generating_step_s": step_times[0], "reusing_step_s": step_times[1],
            "load_avg_1min": round(os.getloadavg()[0], 2)}


@benchmark("is_logprob_gap")
def bench_is_logprob_gap(workdir: Path) -> dict:
    """What TRL's importance-sampling ratio compares when it is on (rollout.max_staleness > 0 or
    rollout.importance_sampling): the sampler's log-probs of the sampled tokens (vLLM,
    `logprobs_mode` from server.logprobs_mode) and the trainer's old log-probs of the same tokens
    at the loss temperature. On-policy, at the same adapter version (after 2 GRPO steps with
    colocated vLLM rollouts), both should be the same numbers: the mean and max |delta log p| per
    completion token is what the ratio sees that is not staleness. At loss temperature 1 (the
    paper: raw log-probs) and at TRL's default (loss temperature = sampling temperature: vLLM's
    processed log-probs, after top-k/top-p)."""
    from .process import StopRequest
    from .rollout import sampler_logprob_deltas
    from .server import logprobs_mode
    from .training import build_trainer

    settings = BenchSettings.from_env()
    _pin_threads(settings.threads)
    figures: dict = {"model": settings.model, "new_tokens": settings.new_tokens, "threads": settings.threads}
    for label, loss_temperature in (("raw", "1.0"), ("processed", "null")):
        cfg = _run_config(workdir / label, settings, "rollout.backend=vllm", "grpo.max_steps=2", "grpo.num_iterations=1",
                          "grpo.save_steps=1000", "grpo.top_k=50", f"grpo.loss_temperature={loss_temperature}",
                          "eval.after_training=false")
        trainer, _ = build_trainer(cfg, StopRequest(), reward_funcs=[_alternating_rewards])
        trainer.train()
        tokenizer = trainer.processing_class
        rows = trainer.train_dataset.select(range(settings.prompts))
        prompt_ids = [ids for ids in tokenizer.apply_chat_template(list(rows["prompt"]), add_generation_prompt=True,
                                                                   tokenize=True, return_dict=True)["input_ids"]
                      for _ in range(cfg.grpo.num_generations)]
        deltas = sampler_logprob_deltas(trainer, prompt_ids)
        trainer.close_rollout()
        figures[f"{label}_logprobs_mode"] = logprobs_mode(cfg)
        figures[f"{label}_loss_temperature"] = cfg.grpo.loss_temperature or cfg.grpo.temperature
        figures[f"{label}_tokens"] = len(deltas)
        figures[f"{label}_mean_abs_delta_logp"] = round(sum(deltas) / len(deltas), 6)
        figures[f"{label}_max_abs_delta_logp"] = round(max(deltas), 6)
        del trainer
    figures["load_avg_1min"] = round(os.getloadavg()[0], 2)
    return figures


#: Why TRL's AsyncGRPOTrainer (trl/experimental/async_grpo) is not in the comparison on a machine
#: without CUDA: found by running it here against the vLLM CPU server with adapter sync.
TRL_ASYNC_NEEDS_CUDA = ("TRL 1.16's AsyncGRPOTrainer needs CUDA: its __init__ calls "
                        "trl.trainer.utils.get_peak_flops_per_device (torch.cuda.get_device_name), and it "
                        "loads the model with attn_implementation='tree_fa3' (FlashAttention-3 kernels from the hub)")


@benchmark("server_rollouts")
def bench_server_rollouts(workdir: Path) -> dict:
    """Rollouts from a vLLM server vs colocated vLLM on the smoke task (its warm-started model, so
    the reward moves), one after the other in this run: colocated (`rollout.backend=vllm`), the
    server on-policy (`vllm_server`, max_staleness 0, the paper's) and one version ahead
    (max_staleness 1: the next batch is generated while the update runs). Per mode: optimizer
    steps per hour of training (first to last logged step; the engine or server start and model
    load are reported apart as `start_s`) and the mean reward over the same steps. Issue 10's goal:
    max_staleness 1 at >= 1.5x the on-policy server's steps per hour at equal reward.
    NLI_GRPO_BENCH_SERVER_STEPS: steps per mode (default 16)."""
    import torch

    from .job import config_for_run, run

    settings = BenchSettings.from_env()
    _pin_threads(settings.threads)
    steps = int(os.environ.get("NLI_GRPO_BENCH_SERVER_STEPS", "16"))
    modes = {
        "colocated": ["rollout.backend=vllm"],
        "server_sync": ["rollout.backend=vllm_server"],
        "server_stale1": ["rollout.backend=vllm_server", "rollout.max_staleness=1"],
    }
    figures: dict = {"steps": steps, "threads": settings.threads}
    for mode, overrides in modes.items():
        out = workdir / mode
        cfg = config_for_run("smoke", [*overrides, f"grpo.max_steps={steps}", "grpo.num_iterations=1",
                                       "grpo.save_steps=100000", "eval.after_training=false"], str(out))
        started = time.time()
        if run(cfg) != 0:
            raise RuntimeError(f"the {mode} run failed; see {out}")
        log = read_train_log(CellFolder(out).train_log)
        first, last = log[0]["time"], log[-1]["time"]
        seconds_per_step = (last - first) / (len(log) - 1)
        figures[f"{mode}_steps_per_hour"] = round(3600 / seconds_per_step)
        figures[f"{mode}_mean_reward"] = round(sum(r["reward"] for r in log) / len(log), 3)
        figures[f"{mode}_start_s"] = round(first - started - seconds_per_step, 1)
        if mode == "server_stale1":
            figures["server_stale1_mean_staleness"] = round(sum(r.get("rollout/staleness", 0) for r in log) / len(log), 2)
    figures["stale1_over_sync"] = round(figures["server_stale1_steps_per_hour"] / figures["server_sync_steps_per_hour"], 2)
    figures["server_sync_over_colocated"] = round(figures["server_sync_steps_per_hour"] / figures["colocated_steps_per_hour"], 2)
    figures["trl_async_grpo"] = "not run: " + TRL_ASYNC_NEEDS_CUDA if not torch.cuda.is_available() else \
        "not run: no GPU run of it is wired here yet"
    figures["load_avg_1min"] = round(os.getloadavg()[0], 2)
    return figures


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nli_grpo.bench", description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", metavar="NAME",
                        help=f"benchmarks to run (default: all of {', '.join(BENCHMARKS)})")
    parser.add_argument("--json", metavar="FILE", help="also write the figures as JSON: {name: {figure: value}}")
    parser.add_argument("--keep", metavar="DIR", help="work in DIR/<name> and keep it (default: a temporary folder)")
    parser.add_argument("--markdown", metavar="FILE", help="also write the figures as Markdown tables")
    defaults = BenchSettings.from_env()
    parser.add_argument("--model", default=defaults.model,
                        help="model of the model benchmarks: tiny (default), random:qwen2.5-0.5b (the realistic CPU shape), ...")
    parser.add_argument("--repeats", type=int, default=defaults.repeats, help="repeats of each measured pair (default 3)")
    parser.add_argument("--threads", type=int, default=defaults.threads,
                        help="torch / vLLM CPU threads, the same on both sides of a pair (default 1)")
    parser.add_argument("--prompts", type=int, default=defaults.prompts, help="prompts per batch, a group of 4 each (default 2)")
    parser.add_argument("--new-tokens", type=int, default=defaults.new_tokens, help="tokens per completion (default 32)")
    args = parser.parse_args(argv)
    BenchSettings(model=args.model, repeats=args.repeats, threads=args.threads, prompts=args.prompts,
                  new_tokens=args.new_tokens, rank=defaults.rank).export()
    unknown = [n for n in args.names if n not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark {', '.join(unknown)}; choose from: {', '.join(BENCHMARKS)}")

    figures, failed = {}, []
    for name in args.names or list(BENCHMARKS):
        started = time.perf_counter()
        try:
            if args.keep:
                workdir = Path(args.keep) / name
                workdir.mkdir(parents=True, exist_ok=True)
                figures[name] = BENCHMARKS[name](workdir)
            else:
                with tempfile.TemporaryDirectory(prefix=f"nli_grpo_bench_{name}_") as tmp:
                    figures[name] = BENCHMARKS[name](Path(tmp))
        except Exception as error:  # one benchmark failing must not cost the others their figures
            traceback.print_exc()
            figures[name], failed = {"error": f"{type(error).__name__}: {error}"}, [*failed, name]
        figures[name]["benchmark_wall_s"] = round(time.perf_counter() - started, 1)
        width = max(map(len, figures[name]))
        print(f"{name}\n" + "\n".join(f"  {k:<{width}}  {v}" for k, v in figures[name].items()
                                        if k != "projection_table"), flush=True)
        if args.json:  # after each benchmark, whole or not at all: a run killed later keeps what it measured
            partial_json = Path(args.json).with_name(Path(args.json).name + ".partial")
            partial_json.write_text(json.dumps(figures, indent=2) + "\n")
            os.replace(partial_json, args.json)
    table = markdown_table(figures)
    print(table)
    if args.markdown:
        Path(args.markdown).write_text(table)
    if failed:
        print(f"failed: {', '.join(failed)} (their errors are in the figures)", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
