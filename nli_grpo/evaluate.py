"""Evaluate a model on the 13 NLI sets, or score completions produced elsewhere:

    python -m nli_grpo.evaluate --base MODEL [--adapter DIR] [--benchmarks ...] [key=value ...]
    python -m nli_grpo.evaluate --score FILE.jsonl --benchmark NAME [--out RESULT.json]

A thin command line: the evaluation is a cell job (nli_grpo.job) whose stage is
nli_grpo.evaluation, writing results/eval/<cell>/ unless --out says otherwise; scoring is
nli_grpo.scoring's, under the same protocol.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from .config import ConfigError
from .data import BENCHMARKS


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m nli_grpo.evaluate", description=__doc__.split("\n\n")[0],
                                     epilog="Overrides (key=value) may come before or after the options.")
    model = parser.add_argument_group("evaluate a model (greedy, the paper's protocol)")
    model.add_argument("--base", help="base model: hub id, folder, `tiny` or `random:qwen2.5-7b` "
                                      "(default: the base named in the adapter's adapter_config.json, else the recipe's)")
    model.add_argument("--adapter", type=Path, help="LoRA adapter folder (omit for the zero-shot baseline)")
    model.add_argument("--quantization", choices=("bf16", "awq", "bnb4"),
                       help="quantization of the base model (default: awq for an -AWQ checkpoint, else bf16)")
    model.add_argument("--benchmarks", help=f"comma list (default: all 13): {','.join(BENCHMARKS)}")
    model.add_argument("--config", default="paper", help="recipe for eval/data settings (default: paper)")
    model.add_argument("--backend", choices=("vllm", "hf"), help="generation backend (default: the recipe's)")
    model.add_argument("--limit", type=int, help="N examples per set (N >= 1): a seeded sample keeping each set's label (and HANS subcase) "
                       "proportions, the same for every run")
    model.add_argument("--force", action="store_true",
                       help="where the output folder holds an evaluation with other settings or another adapter, "
                            "move it aside to <parent>/.replaced/ and start afresh (default: refuse)")
    model.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. data.local_dir=/data/nli")
    score = parser.add_argument_group("score completions produced elsewhere, under the same protocol")
    score.add_argument("--score", type=Path, metavar="FILE.jsonl",
                       help='JSON lines (or .jsonl.gz) with "id", "label", "completion" per example')
    score.add_argument("--benchmark", metavar="NAME", help=f"whose scoring rule applies: {', '.join(BENCHMARKS)}")
    parser.add_argument("--out", type=Path, help="model evaluation: the folder for result.json and predictions "
                                                 "(default results/eval/<cell>); --score: a JSON file for the eval entry")
    args = parser.parse_intermixed_args(argv)
    if args.score is not None:
        given = [f"--{name}" for name in ("base", "adapter", "quantization", "benchmarks", "backend", "limit")
                 if getattr(args, name) is not None] + (["overrides"] if args.overrides else [])
        if args.benchmark is None or given:
            parser.error("--score needs --benchmark NAME" if args.benchmark is None
                         else f"--score scores a file; it takes no {', '.join(given)}")
    elif args.benchmark is not None:
        parser.error("--benchmark goes with --score FILE; to evaluate a model on some sets use --benchmarks")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.score is not None:
        from .scoring import score_command

        return score_command(args.score, args.benchmark, args.out)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.adapter is not None and not (args.adapter / "adapter_config.json").is_file():
        print(f"error: {args.adapter} is not a PEFT adapter folder (no adapter_config.json)", file=sys.stderr)
        return 2
    from .catalog import adapter_base_model, default_quantization
    from .evaluation import adapter_rank

    base = args.base or (adapter_base_model(args.adapter) if args.adapter is not None else None)
    # Results go to results/eval/<cell> unless --out or output.* say otherwise.
    overrides = ["output.sweep=eval", *args.overrides, "eval.after_training=true"]
    if base:
        overrides.append(f"model.name_or_path={base}")
    if args.quantization or base:
        overrides.append(f"model.quantization={args.quantization or default_quantization(base)}")
    if args.benchmarks:
        overrides.append(f"eval.benchmarks=[{args.benchmarks}]")
    if args.backend:
        overrides.append(f"eval.backend={args.backend}")
    if args.limit is not None:
        overrides.append(f"eval.limit={args.limit}")
    if args.adapter is None:
        overrides.append("stage=zero_shot")
    else:  # the cell records the adapter's own rank, whatever the recipe says
        overrides.append(f"lora.rank={adapter_rank(args.adapter)}")
    from .job import EXIT_REFUSED, RunConflict, config_for_run, run

    try:
        cfg = config_for_run(args.config, overrides, str(args.out) if args.out else None)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_REFUSED
    try:
        return run(cfg, adapter=args.adapter, force=args.force)
    except RunConflict as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_REFUSED


if __name__ == "__main__":
    raise SystemExit(main())
