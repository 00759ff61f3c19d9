"""Rebuild the paper's training pool: ANLI training items that are hard for the base model.

    python -m nli_grpo.bootstrap --base Qwen/Qwen2.5-7B-Instruct --pool-dir pools/qwen7b   # all of it, here
    python -m nli_grpo.bootstrap --pool-dir DIR --shard 3/8     # one shard job (sweeps/bootstrap.py submits them)
    python -m nli_grpo.bootstrap --pool-dir DIR --merge         # the merge job, after every shard

The authors trained on a private pool of "ANLI train items that are difficult for Qwen2.5-7B"
(paper-facts.md). This samples k completions per ANLI training item with the base model, the
paper's prompt and its GRPO sampling settings, and keeps the items whose accuracy is below a
threshold (nli_grpo.pool.Pool says which). The items are cut into chunks; each chunk is sampled
with its own seed (the pool's seed and the chunk's number) and written whole, so a shard stopped
by a signal (USR2: it finishes the chunk in flight, then exits 75) or killed resumes with the
chunks it has not written, and the pool is the same whatever the restarts or the number of shards.
The merge checks that every item was sampled, writes the pool (`anli_hard.jsonl`, ANLI's schema
plus the sampling statistics) and its record with the fingerprint (`pool.json`, written last).
Training reads it as `data.train_source=anli_hard` with `data.files.anli_hard=<pool>`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
from pathlib import Path

from .config import ConfigError, ExperimentConfig
from .job import EXIT_PREEMPTED, EXIT_REFUSED
from .layout import PoolFolder
from .pool import Pool, chunk_count, sampling_config, shard_chunks, write_spec
from .results import atomic_open, atomic_write_json, load_json, now_iso

log = logging.getLogger("nli_grpo.bootstrap")


class PoolError(RuntimeError):
    """The shards' work cannot make a pool (an item missing or sampled twice, a damaged chunk)."""


def sampled(rows: list[dict], completions: list[list[str]]) -> list[dict]:
    """Each row (ANLI schema, `uid`) with the share of its completions that got the gold label."""
    from .prompts import extract_label

    return [{**row, "bootstrap_accuracy": round(sum(extract_label(t) == row["label"] for t in texts) / len(texts), 6),
             "bootstrap_samples": len(texts)} for row, texts in zip(rows, completions)]


def hard_items(records: list[dict], below: float) -> list[dict]:
    """The sampled items whose accuracy is below `below`."""
    return [r for r in records if r["bootstrap_accuracy"] < below]


def items(cfg: ExperimentConfig, spec: dict) -> list[dict]:
    """Every item to sample, in a fixed order (rounds in order, rows in file order)."""
    from .data import load_train_source

    rows = []
    for source in spec["rounds"]:
        data = load_train_source(source, local_dir=cfg.data.local_dir, files=cfg.data.files, hub=cfg.data.hub, limit=spec["limit"])
        rows += [{"uid": r["id"], "premise": r["premise"], "hypothesis": r["hypothesis"], "label": r["label"], "round": source}
                 for r in data.dataset]
    return rows


def chunk_seed(seed: int, chunk: int) -> int:
    """The sampling seed of a chunk: the same chunk gets the same completions in any run."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{chunk}".encode()).digest()[:4], "big")


def _write_state(path: Path, **fields) -> None:
    """Update a shard's or the merge's state file (a start counts as an attempt)."""
    previous = load_json(path) or {}
    if fields.get("status") == "running":
        fields["attempts"] = previous.get("attempts", 0) + 1
    atomic_write_json(path, {**previous, **fields, "updated_at": now_iso()})


def run_shard(folder: PoolFolder, index: int, count: int, stop) -> int:
    """Sample the chunks of shard `index` of `count` that are not on disk yet; the exit code
    (EXIT_PREEMPTED when a stop request came between two chunks)."""
    from .evaluation import make_generator
    from .prompts import render_prompt

    spec = json.loads(folder.spec.read_text())
    cfg = sampling_config(spec)
    rows = items(cfg, spec)
    mine = shard_chunks(index, count, chunk_count(len(rows), spec["chunk_items"]))
    state = folder.shard_state(index, count)
    _write_state(state, status="running", chunks=mine, total=len(mine), done=sum(folder.chunk(k).is_file() for k in mine), error=None)
    generator = None
    try:
        for k in mine:
            if folder.chunk(k).is_file():
                continue
            if stop.is_set():
                _write_state(state, status="preempted")
                return EXIT_PREEMPTED
            generator = generator or make_generator(cfg, adapter=None)
            chunk = rows[k * spec["chunk_items"]:(k + 1) * spec["chunk_items"]]
            prompts = [render_prompt(generator.tokenizer, r["premise"], r["hypothesis"]) for r in chunk]
            completions = generator.sample(prompts, spec["samples"], desc=f"chunk {k}", seed=chunk_seed(spec["seed"], k))
            with atomic_open(folder.chunk(k)) as handle:  # whole or not at all
                handle.writelines(json.dumps(record) + "\n" for record in sampled(chunk, completions))
            _write_state(state, done=sum(folder.chunk(j).is_file() for j in mine))
    except BaseException as err:
        _write_state(state, status="failed", error=f"{type(err).__name__}: {err}")
        raise
    finally:
        if generator is not None:
            generator.close()
    _write_state(state, status="complete")
    return 0


def merge(folder: PoolFolder) -> dict:
    """Check that every item was sampled once, then write the pool and its record (last)."""
    from .data import DataError, fingerprint, json_lines, load_train_source
    from .models import hub_revision

    spec = json.loads(folder.spec.read_text())
    rows = items(sampling_config(spec), spec)
    chunks = chunk_count(len(rows), spec["chunk_items"])
    missing = [k for k in range(chunks) if not folder.chunk(k).is_file()]
    if missing:
        raise PoolError(f"{len(missing)} of {chunks} chunks not sampled (first: {folder.chunk(missing[0])}); "
                        "rerun the bootstrap: the shards sample only what is missing")
    by_uid = {}
    try:
        for k in range(chunks):
            for number, record in json_lines(folder.chunk(k)):
                if record.get("uid") in by_uid:
                    raise PoolError(f"{folder.chunk(k)}, line {number}: item {record.get('uid')} sampled twice")
                by_uid[record.get("uid")] = record
    except DataError as err:
        raise PoolError(f"{err}; delete that chunk file and rerun the bootstrap to sample it again") from None
    absent = [r["uid"] for r in rows if r["uid"] not in by_uid]
    if absent or len(by_uid) != len(rows):
        raise PoolError(f"the chunks hold {len(by_uid)} items, the rounds {len(rows)} (e.g. {absent[:3]} missing): "
                        "the data changed since the shards ran; remove the chunks and rebuild the pool")
    pool = hard_items([by_uid[r["uid"]] for r in rows], spec["below"])
    with atomic_open(folder.pool) as handle:
        handle.writelines(json.dumps(record) + "\n" for record in pool)
    loaded = load_train_source("anli_hard", files={"anli_hard": folder.pool}, hub=False).dataset
    record = {
        "items": len(rows), "hard_items": len(pool), "sha256": hashlib.sha256(folder.pool.read_bytes()).hexdigest(),
        "fingerprint": fingerprint(loaded), "base": spec["base"], "quantization": spec["quantization"],
        "revision": hub_revision(spec["base"], None), "samples": spec["samples"], "below": spec["below"],
        "seed": spec["seed"], "rounds": spec["rounds"], "limit": spec["limit"], "recipe": spec["recipe"],
        "overrides": spec["overrides"], "chunks": chunks, "created_at": now_iso(),
    }
    atomic_write_json(folder.record, record)
    return record


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m nli_grpo.bootstrap", description=__doc__.split("\n\n")[0])
    parser.add_argument("--pool-dir", type=Path, required=True, help="the pool's folder (its anli_hard.jsonl, record and work)")
    part = parser.add_mutually_exclusive_group()
    part.add_argument("--shard", metavar="I/N", help="sample shard I of N (0-based) of the pool in --pool-dir, then stop")
    part.add_argument("--merge", action="store_true", help="merge the shards' work into the pool")
    pool = parser.add_argument_group("the pool (when building it here in one go)")
    pool.add_argument("--base", help="base model (hub id, folder, or `tiny`)")
    pool.add_argument("--quantization", choices=("bf16", "awq", "bnb4"),
                      help="quantization of the base model (default: awq for an -AWQ checkpoint, else bf16)")
    pool.add_argument("--rounds", default="anli_train_r1,anli_train_r2,anli_train_r3", help="ANLI train sources to sample")
    pool.add_argument("--samples", type=int, default=4, help="completions per item (default 4, the GRPO group size)")
    pool.add_argument("--below", type=float, default=0.5, help="keep items whose accuracy is below this (default 0.5)")
    pool.add_argument("--seed", type=int, default=0)
    pool.add_argument("--limit", type=int, help="first N items per round")
    pool.add_argument("--chunk-items", type=int, default=256, help="items per chunk, the unit written whole (default 256)")
    pool.add_argument("--config", default="paper", help="recipe for sampling/data settings (default: paper)")
    pool.add_argument("--backend", choices=("vllm", "hf"), help="generation backend (default: the recipe's eval backend)")
    pool.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. data.local_dir=/data/anli")
    return parser.parse_intermixed_args(argv)


def main(argv=None) -> int:
    from .process import StopRequest

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    folder = PoolFolder(args.pool_dir)
    stop = StopRequest()
    stop.install()
    if args.merge:
        return _merge_command(folder)
    if args.shard:
        try:
            index, count = (int(x) for x in args.shard.split("/"))
            assert 0 <= index < count
        except (ValueError, AssertionError):
            print(f"error: --shard {args.shard}: give I/N with 0 <= I < N", file=sys.stderr)
            return EXIT_REFUSED
        if not folder.spec.is_file():
            print(f"error: {folder.spec} not found: submit the pool with `python sweeps/bootstrap.py`", file=sys.stderr)
            return EXIT_REFUSED
        return run_shard(folder, index, count, stop)
    # Everything here, in one process: shard 0 of 1, then the merge.
    if not args.base or args.samples < 1 or not 0 < args.below <= 1:
        print("error: give --base, --samples >= 1 and --below in (0, 1]", file=sys.stderr)
        return EXIT_REFUSED
    overrides = [*args.overrides, *([f"eval.backend={args.backend}"] if args.backend else [])]
    pool = Pool(base=args.base, quantization=args.quantization, samples=args.samples, below=args.below, seed=args.seed,
                limit=args.limit, rounds=tuple(args.rounds.split(",")), recipe=args.config, overrides=tuple(overrides),
                chunk_items=args.chunk_items, shards=1)
    try:
        sampling_config(pool.spec())
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_REFUSED
    if folder.spec.is_file() and json.loads(folder.spec.read_text()) != pool.spec():
        print(f"error: {folder.path} holds a pool sampled with other settings ({folder.spec}); use another --pool-dir",
              file=sys.stderr)
        return EXIT_REFUSED
    write_spec(pool, folder)
    code = run_shard(folder, 0, 1, stop)
    return code if code else _merge_command(folder)


def _merge_command(folder: PoolFolder) -> int:
    _write_state(folder.merge_state, status="running", error=None)
    try:
        record = merge(folder)
    except PoolError as err:
        _write_state(folder.merge_state, status="failed", error=str(err))
        print(f"error: {err}", file=sys.stderr)
        return 1
    _write_state(folder.merge_state, status="complete")
    print(f"kept {record['hard_items']} of {record['items']} items (accuracy < {record['below']} over {record['samples']} "
          f"samples) -> {folder.pool} (sha256 {record['sha256'][:12]})")
    return 0 if record["hard_items"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
