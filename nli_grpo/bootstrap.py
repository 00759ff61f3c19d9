"""Rebuild the paper's training pool: ANLI train items that are hard for the base model.

    python -m nli_grpo.bootstrap --base Qwen/Qwen2.5-7B-Instruct --out pools/anli_hard.jsonl

The authors trained on a private pool of "ANLI train items that are difficult for Qwen2.5-7B"
(paper-facts.md). This samples `--samples` completions per ANLI-train item with the base model,
the paper's prompt and its GRPO sampling settings, and keeps the items whose accuracy is below
`--below`. The pool is written in ANLI's schema plus the sampling statistics, so training reads it
as `data.train_source=anli_hard` with `data.local_dir=<its folder>`.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from .config import ConfigError
from .results import append_jsonl, atomic_open, read_jsonl

log = logging.getLogger("nli_grpo.bootstrap")


#: Items sampled between two appends to the progress file: what a preemption can cost.
CHUNK = 2000


def sampled(rows: list[dict], completions: list[list[str]]) -> list[dict]:
    """Each row (ANLI schema, `uid`) with the share of its completions that got the gold label."""
    from .prompts import extract_label

    return [{**row, "bootstrap_accuracy": round(sum(extract_label(t) == row["label"] for t in texts) / len(texts), 6),
             "bootstrap_samples": len(texts)} for row, texts in zip(rows, completions)]


def hard_items(records: list[dict], below: float) -> list[dict]:
    """The sampled items whose accuracy is below `below`."""
    return [r for r in records if r["bootstrap_accuracy"] < below]


def write_jsonl(path: Path, rows: list[dict]) -> None:
    """Write all rows or nothing (see results.atomic_open)."""
    with atomic_open(path) as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m nli_grpo.bootstrap", description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", required=True, help="base model (hub id, folder, or `tiny`)")
    parser.add_argument("--quantization", choices=("bf16", "awq", "bnb4"),
                        help="quantization of the base model (default: awq for an -AWQ checkpoint, else bf16)")
    parser.add_argument("--out", type=Path, required=True, help="where to write the pool (.jsonl)")
    parser.add_argument("--rounds", default="anli_train_r1,anli_train_r2,anli_train_r3", help="ANLI train sources to sample")
    parser.add_argument("--samples", type=int, default=4, help="completions per item (default 4, the GRPO group size)")
    parser.add_argument("--below", type=float, default=0.5, help="keep items whose accuracy is below this (default 0.5)")
    parser.add_argument("--limit", type=int, help="first N items per round")
    parser.add_argument("--config", default="paper", help="recipe for sampling/data settings (default: paper)")
    parser.add_argument("--backend", choices=("vllm", "hf"), help="generation backend (default: the recipe's eval backend)")
    parser.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. data.local_dir=/data/anli")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    from .catalog import default_quantization
    from .config import load_config
    from .data import load_train_source
    from .evaluation import make_generator
    from .prompts import render_prompt

    overrides = [*args.overrides, f"model.name_or_path={args.base}", "stage=zero_shot",
                 f"model.quantization={args.quantization or default_quantization(args.base)}"]
    if args.backend:
        overrides.append(f"eval.backend={args.backend}")
    try:
        cfg = load_config(args.config, overrides)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.samples < 1 or not 0 < args.below <= 1:
        print("error: --samples must be >= 1 and --below in (0, 1]", file=sys.stderr)
        return 2
    rows = []
    for source in args.rounds.split(","):
        data = load_train_source(source, local_dir=cfg.data.local_dir, files=cfg.data.files, hub=cfg.data.hub, limit=args.limit)
        rows += [{"uid": r["id"], "premise": r["premise"], "hypothesis": r["hypothesis"], "label": r["label"],
                  "round": source} for r in data.dataset]
    # Every sampled item is appended to a progress file chunk by chunk: a rerun after a
    # preemption samples only what is missing.
    progress = args.out.with_name(args.out.name + ".progress.jsonl")
    earlier = read_jsonl(progress)
    if any(r["bootstrap_samples"] != args.samples for r in earlier):
        print(f"error: {progress} holds items sampled with another --samples; remove it to start over", file=sys.stderr)
        return 2
    seen = {r["uid"] for r in earlier}
    todo = [r for r in rows if r["uid"] not in seen]
    if todo:
        generator = make_generator(cfg, adapter=None)
        for start in range(0, len(todo), CHUNK):
            chunk = todo[start:start + CHUNK]
            prompts = [render_prompt(generator.tokenizer, r["premise"], r["hypothesis"]) for r in chunk]
            completions = generator.sample(prompts, args.samples, desc=f"bootstrap {start + len(chunk)}/{len(todo)}")
            for record in sampled(chunk, completions):
                append_jsonl(progress, record)
    wanted = {r["uid"] for r in rows}
    pool = hard_items([r for r in read_jsonl(progress) if r["uid"] in wanted], args.below)
    write_jsonl(args.out, pool)
    print(f"kept {len(pool)} of {len(rows)} items (accuracy < {args.below} over {args.samples} samples) -> {args.out}")
    return 0 if pool else 1


if __name__ == "__main__":
    raise SystemExit(main())
