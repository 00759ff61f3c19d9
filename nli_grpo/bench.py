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
from collections.abc import Callable
from pathlib import Path

from .config import ExperimentConfig
from .data import BENCHMARK_NAMES
from .grid import cell_from_config, cell_id
from .layout import CellFolder, result_document
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


def write_synthetic_results(root: str | os.PathLike, n_results: int, *, cells_per_sweep: int = 1000,
                            log_steps: int = 20, seed: int = 0) -> int:
    """Write `n_results` synthetic cells under `root` as sweeps `synthetic_00`, `synthetic_01`, ...
    (model x quantization: a zero-shot cell, and LoRA ranks with seeds added until a sweep is full), each GRPO cell
    with a `log_steps`-line train log. Returns the number of sweeps. Plain writes (not atomic):
    throwaway data, and 10,000 fsyncs would dominate the set-up time."""
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


@benchmark("aggregate")
def bench_aggregate(workdir: Path, n_results: int = 10_000) -> dict:
    """`python -m nli_grpo.aggregate` on 10,000 synthetic result files: read + validate, tables,
    the whole in-process run without and with plots, and the CLI end to end (interpreter start-up
    and imports included) without plots."""
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


def _rollout_setup(workdir: Path):
    """The policy both rollout benchmarks use: the smoke recipe on NLI_GRPO_BENCH_MODEL (default
    the tiny CPU model; `random:qwen2.5-7b` on a GPU node for the real shape), LoRA rank
    NLI_GRPO_BENCH_RANK (default 64, the paper's), and a batch of NLI prompts x group size."""
    import torch
    from peft import get_peft_model

    from .data import load_train_source
    from .job import config_for_run
    from .models import load_base_model, load_tokenizer, peft_lora_config, training_precision
    from .prompts import render_prompt

    model = os.environ.get("NLI_GRPO_BENCH_MODEL", "tiny")
    rank = int(os.environ.get("NLI_GRPO_BENCH_RANK", "64"))
    cfg = config_for_run("smoke", [f"model.name_or_path={model}", f"lora.rank={rank}", "grpo.max_completion_length=64",
                                   "grpo.top_k=0"], str(workdir / "run"))
    tokenizer = load_tokenizer(cfg.model)
    rows = load_train_source("anli_train_r1", local_dir="samples", hub=False, limit=8).dataset
    prompts = [render_prompt(tokenizer, p, h) for p, h in zip(rows["premise"], rows["hypothesis"])]
    prompt_ids = [tokenizer(p, add_special_tokens=False).input_ids for p in prompts for _ in range(cfg.grpo.num_generations)]
    policy = get_peft_model(load_base_model(cfg.model, training_precision(cfg, torch.cuda.is_available())["dtype"]),
                            peft_lora_config(cfg.lora))
    # A trained-looking adapter (LoRA B is 0 at init, which vLLM could shortcut).
    for name, param in policy.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0, 0.01)
    return cfg, tokenizer, prompt_ids, policy


@benchmark("rollout")
def bench_rollout(workdir: Path) -> dict:
    """Rollouts and policy syncs, side by side on the same model, adapter and batch.

    Throughput: vLLM with the adapter hot-swapped vs HF generate, every sequence forced to the same
    completion length (EOS ignored) so both produce exactly the same number of tokens.
    Sync: our hot-swap (save the LoRA weights, new LoRARequest, retire the old one in vLLM) vs
    TRL's full merged-weight push (merge the adapter into the base, gather every weight, unmerge).
    The push's last step, vLLM's load_weights, cannot run on vLLM's CPU backend (platform-notes),
    so on the CPU its seconds are a lower bound."""
    import torch
    from vllm import SamplingParams

    from .rollout import AdapterHotSwap, build_llm

    cfg, tokenizer, prompt_ids, policy = _rollout_setup(workdir)
    g = cfg.grpo
    new_tokens = g.max_completion_length

    def hf_rollout():
        tokenizer.padding_side = "left"
        enc = tokenizer.pad({"input_ids": prompt_ids}, return_tensors="pt").to(policy.device)
        with torch.no_grad():
            out = policy.generate(**enc, do_sample=True, temperature=g.temperature, top_p=g.top_p, max_new_tokens=new_tokens,
                                  min_new_tokens=new_tokens, pad_token_id=tokenizer.pad_token_id)
        return (out.shape[1] - enc["input_ids"].shape[1]) * out.shape[0]

    hf_rollout()  # warm-up
    hf_s, _, hf_tokens = _timed(hf_rollout)
    start_s, _, llm = _timed(lambda: build_llm(cfg, purpose="rollout", lora_rank=cfg.lora.rank))
    swap = AdapterHotSwap(llm, workdir / "adapters")
    params = SamplingParams(temperature=g.temperature, top_p=g.top_p, max_tokens=new_tokens, ignore_eos=True)

    def vllm_rollout(step: int):
        request = swap.sync(policy, step)
        outs = llm.generate([{"prompt_token_ids": ids} for ids in prompt_ids], params, lora_request=request, use_tqdm=False)
        return sum(len(o.outputs[0].token_ids) for o in outs)

    vllm_rollout(0)  # warm-up (first LoRA load)
    vllm_s, _, vllm_tokens = _timed(vllm_rollout, 1)
    # Each sync publishes a new version (and retires the previous one); the next generate loads it.
    sync_s = sorted(_timed(swap.sync, policy, step)[0] for step in range(2, 7))[2]
    hot_bytes = swap.bytes_last_sync
    swap.close()

    def full_push() -> int:
        policy.merge_adapter()
        sent = 0
        with torch.no_grad():
            for name, param in policy.get_base_model().named_parameters():
                if "lora_" not in name:
                    sent += param.detach().contiguous().numel() * param.element_size()
        policy.unmerge_adapter()
        return sent

    full_push()
    push_s = sorted(_timed(full_push)[0] for _ in range(5))[2]
    push_bytes = full_push()
    return {
        "model": cfg.model.name_or_path, "lora_rank": cfg.lora.rank, "sequences": len(prompt_ids),
        "new_tokens_per_sequence": new_tokens, "device": "cuda" if torch.cuda.is_available() else "cpu",
        "hf_tokens_per_s": round(hf_tokens / hf_s, 1), "vllm_tokens_per_s": round(vllm_tokens / vllm_s, 1),
        "vllm_over_hf": round((vllm_tokens / vllm_s) / (hf_tokens / hf_s), 2),
        "vllm_engine_start_s": round(start_s, 1),
        "hot_swap_bytes": hot_bytes, "hot_swap_s": round(sync_s, 4),
        "full_push_bytes": push_bytes, "full_push_s": round(push_s, 4),
        "full_push_over_hot_swap_bytes": round(push_bytes / hot_bytes, 2),
        "full_push_over_hot_swap_s": round(push_s / sync_s, 2),
    }


@benchmark("sync_bytes")
def bench_sync_bytes(workdir: Path) -> dict:
    """Bytes one policy sync moves on the real Qwen2.5 shapes, per LoRA rank: the adapter our
    hot-swap saves (the LoRA weights in the base's dtype, bf16) vs the bf16 weights a merged push
    sends. Counted exactly from PEFT models built on the meta device (shapes, no
    memory), so it runs anywhere."""
    import torch
    from peft import get_peft_model
    from transformers import Qwen2ForCausalLM

    from .catalog import QWEN25_COMMON, QWEN25_SHAPES
    from .config import LoraConfig
    from .models import _qwen2_config, peft_lora_config

    figures = {}
    for name, shape in QWEN25_SHAPES.items():
        with torch.device("meta"):
            base = Qwen2ForCausalLM(_qwen2_config(shape, QWEN25_COMMON["vocab_size"])).to(torch.bfloat16)
        full = sum(p.numel() * p.element_size() for p in base.parameters())
        figures[f"{name}_full_push_GB"] = round(full / 1e9, 2)
        peft_model = get_peft_model(base, peft_lora_config(LoraConfig(rank=8)))
        per_rank8 = sum(p.numel() for n, p in peft_model.named_parameters() if "lora_" in n) * 2
        for rank in (8, 64, 128):
            adapter = per_rank8 * rank // 8  # LoRA parameters grow linearly with the rank
            figures[f"{name}_r{rank}_hot_swap_MB"] = round(adapter / 1e6, 1)
            figures[f"{name}_r{rank}_full_over_hot_swap"] = round(full / adapter, 1)
    return figures


@benchmark("grpo_step")
def bench_grpo_step(workdir: Path) -> dict:
    """Peak memory and time of GRPO steps (LoRA r64, 8 completions of 64 tokens, the paper's
    settings otherwise) per base quantization, through the real job. NLI_GRPO_BENCH_MODEL picks the
    model (default the tiny CPU one; `random:qwen2.5-7b` on a GPU node is the issue's check)."""
    import torch

    from .job import config_for_run, run
    from .results import read_result

    model = os.environ.get("NLI_GRPO_BENCH_MODEL", "tiny")
    quantizations = ["bf16", "bnb4"]
    figures: dict = {"model": model, "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"}
    for quantization in quantizations:
        out = workdir / quantization
        cfg = config_for_run("paper", [
            f"model.name_or_path={model}", f"model.quantization={quantization}", "lora.rank=64", "grpo.max_steps=3",
            "grpo.num_iterations=1", "grpo.max_completion_length=64", "grpo.save_steps=1000", "rollout.backend=hf",
            "data.train_source=anli_train_r1", "data.local_dir=samples", "data.hub=false", "eval.after_training=false",
            *([] if torch.cuda.is_available() else ["grpo.optim=adamw_torch", "resources.gpus_per_node=0"]),
        ], str(out))
        # Alternating rewards: every group has non-zero advantages, so every step runs backward.
        if run(cfg, reward_funcs=[lambda completions, **_: [float(i % 2) for i in range(len(completions))]]) != 0:
            raise RuntimeError(f"the {quantization} run failed; see {out}")
        train = read_result(CellFolder(out).result)["train"]
        step_times = [r["step_time"] for r in read_train_log(CellFolder(out).train_log) if "step_time" in r]
        figures[f"{quantization}_peak_memory_gb"] = train["peak_memory_gb"]
        figures[f"{quantization}_memory_kind"] = train["peak_memory_kind"]
        figures[f"{quantization}_step_s_after_first"] = round(sum(step_times[1:]) / max(1, len(step_times[1:])), 3)
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
