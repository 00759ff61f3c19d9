"""Stage a sweep's inputs on the login node, the one command that talks to the hub:

    python -m nli_grpo.prepare --sweep lora_rank [--ranks 8,64 ...]   # its models and every dataset
    python -m nli_grpo.prepare --config paper [key=value ...]         # one recipe's
    python -m nli_grpo.prepare --from ~/downloads/nli                 # the datasets' original files

into the cache on the shared file system (`--cache DIR`, default $NLI_GRPO_CACHE, else
~/.cache/nli_grpo; nli_grpo.cache): each model at a pinned revision (the one asked for, else the
default branch's commit at the time, recorded), the 13 evaluation sets and the ANLI training
rounds, each written whole under a temporary name and renamed, so an interruption leaves nothing
half-written and a rerun does only what is missing. The lock file beside them records, per set,
the source, revision or file, rows, rows without gold and the sha256 of the prepared file; per
model, the requested and resolved revisions.

Sweeps then refuse cells whose inputs are not there (naming this command), and their jobs run
offline against the cache, so a hub outage or a changed upstream file cannot change a running
sweep.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
from pathlib import Path

from . import cache
from .config import ConfigError, ExperimentConfig
from .results import atomic_open, atomic_write_json, now_iso

log = logging.getLogger("nli_grpo.prepare")

#: Files a model repository holds that loading never reads (other weight formats, originals).
MODEL_IGNORE = ["*.bin", "*.pt", "*.pth", "*.h5", "*.msgpack", "*.onnx", "original/*", "*.gguf"]


# --------------------------------------------------------------------------- what a sweep needs
def needed_stems(cfgs: list[ExperimentConfig]) -> list[str]:
    """Source stems the cells read that no local file of theirs provides: the evaluation sets, and
    for training cells their training source (the hard pool's raw material, the ANLI training
    rounds, when they train on the pool)."""
    from .data import BENCHMARKS, TRAIN_SOURCES, local_file

    stems = {}
    for cfg in cfgs:
        specs = [BENCHMARKS[name] for name in cfg.eval.benchmarks] if cfg.eval.after_training else []
        if cfg.stage == "grpo":
            sources = [f"anli_train_r{k}" for k in (1, 2, 3)] if cfg.data.train_source == "anli_hard" else [cfg.data.train_source]
            specs += [TRAIN_SOURCES[name] for name in sources]
        for spec in specs:
            if local_file(spec, cfg.data.local_dir, cfg.data.files) is None or cache.prepared_data(spec.stem):
                stems.setdefault(spec.stem, None)
    return list(stems)


def needed_models(cfgs: list[ExperimentConfig]) -> list[tuple[str, str | None]]:
    """Hub models (name, revision) the cells load: not the stand-ins, not local folders."""
    from .catalog import stand_in_shape

    models = {}
    for cfg in cfgs:
        name = cfg.model.name_or_path
        if stand_in_shape(name) is None and not Path(name).is_dir():
            models.setdefault((name, cfg.model.revision), None)
    return list(models)


# --------------------------------------------------------------------------- datasets
def _write_prepared(stem: str, rows: list[dict], no_gold: int, entry: dict) -> dict:
    """Write a stem's rows into the cache (temp file + rename) and record them in the lock."""
    path = cache.data_dir() / f"{stem}.jsonl"
    with atomic_open(path) as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    entry = {**entry, "rows": len(rows), "dropped_no_gold": no_gold,
             "sha256": hashlib.sha256(path.read_bytes()).hexdigest(), "prepared_at": now_iso()}
    with cache.locked():
        lock = cache.read_lock()
        lock["data"][stem] = entry
        atomic_write_json(cache.lock_path(), lock)
    return entry


def prepare_from_hub(stem: str) -> dict:
    """Download a source from the hub (its pinned revision, or the default branch's commit at the
    time, recorded) and write it into the cache."""
    import datasets

    from .data import RawRows, canonical_rows, source_specs

    spec = source_specs()[stem]
    raw = datasets.load_dataset(spec.hub_id, spec.hub_config, split=spec.split, revision=spec.hub_revision)
    class_names = {name: list(f.names) for name, f in raw.features.items() if isinstance(f, datasets.ClassLabel)}
    rows, no_gold = canonical_rows(RawRows(raw.to_pandas(), spec.hub_location, None, class_names), stem)
    revision = spec.hub_revision or _dataset_commit(spec.hub_id)
    return _write_prepared(stem, rows, no_gold, {"source": spec.hub_location, "revision": revision, "file": None})


def _dataset_commit(repo_id: str) -> str | None:
    """The commit the hub's default branch of a dataset is at now (what was just downloaded)."""
    from huggingface_hub import HfApi

    try:
        return HfApi().dataset_info(repo_id).sha
    except Exception as err:  # noqa: BLE001 - the data is there; only the record lacks its commit
        log.warning("could not read the commit of %s (%s); the lock records none", repo_id, err)
        return None


def ingest(folder: Path) -> dict[str, dict]:
    """Every file under `folder` that is one of the paper's sources, in its original distribution
    format or a hub schema (recognised by name, else by columns), checked row by row and written
    into the cache. Returns stem -> lock entry."""
    from .data import canonical_rows, read_file, recognise

    found: dict[str, Path] = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        stem = recognise(path, folder)
        if stem is None:
            continue
        if stem in found:
            raise ValueError(f"{found[stem]} and {path} are both {stem}: keep one of them in {folder}")
        found[stem] = path
    if not found:
        raise ValueError(f"{folder} holds none of the sets' files (e.g. heuristics_evaluation_set.txt, R1/test.jsonl, "
                         "snli_1.0_test.jsonl, multinli_1.0_dev_mismatched.jsonl, diagnostic-full.tsv, revised_combined/test.tsv)")
    entries = {}
    for stem, path in found.items():
        rows, no_gold = canonical_rows(read_file(path), stem)
        entries[stem] = _write_prepared(stem, rows, no_gold, {"source": "file", "revision": None, "file": str(path.resolve())})
        log.info("%s: %d rows from %s (%d without gold)", stem, len(rows), path, no_gold)
    return entries


# --------------------------------------------------------------------------- models
def prepare_model(name: str, revision: str | None) -> dict:
    """Download a model repository into the hub cache (huggingface_hub resumes what an earlier
    attempt left) and record the commit it resolved to."""
    from huggingface_hub import snapshot_download

    path = snapshot_download(name, revision=revision, cache_dir=cache.hub_cache_dir(), ignore_patterns=MODEL_IGNORE)
    entry = {"requested": revision or "main", "revision": Path(path).name, "path": str(path), "prepared_at": now_iso()}
    with cache.locked():
        lock = cache.read_lock()
        lock["models"][name] = entry
        atomic_write_json(cache.lock_path(), lock)
    return entry


# --------------------------------------------------------------------------- command line
def configs_of(args, extra: list[str]) -> list[ExperimentConfig]:
    """The configs of the cells to prepare for: a sweep's (its grid flags in `extra`) or one recipe's."""
    from .job import config_for_run

    if args.sweep:
        from .pool import sampling_config
        from .sweep import load_sweep_file, parse_args, plan, sweep_pool

        sweep = load_sweep_file(args.sweep)
        sweep_args = parse_args(sweep, extra)
        cells = plan(sweep, sweep_args)
        invalid = [f"{c.cell_id}: {p}" for c in cells for p in c.problems]
        if invalid:
            raise ConfigError("; ".join(invalid))
        cfgs = [c.cfg for c in cells]
        pool = sweep_pool(sweep, sweep_args) if sweep.pool is not None else None
        if pool is not None and any(cfg.data.files.get("anli_hard") == str(pool.folder(sweep_args.results).pool) for cfg in cfgs):
            cfgs.append(sampling_config(pool.spec()))  # the pool the cells train on is sampled with its base model
        return cfgs
    return [config_for_run(args.config, extra)]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m nli_grpo.prepare", description=__doc__.split("\n\n")[0],
        epilog="With --sweep, the sweep's own grid flags (--ranks, --models, --quantizations, --seeds, --smoke) and "
               "key=value overrides follow; with --config, key=value overrides.")
    what = parser.add_mutually_exclusive_group()
    what.add_argument("--sweep", help="a sweep (sweeps/<name>.py, or a path to a sweep file): prepare what its cells need")
    what.add_argument("--config", default=None, help="a recipe (paper, lora_rank, smoke, or a YAML path)")
    parser.add_argument("--from", dest="source", type=Path, metavar="DIR",
                        help="ingest the datasets' original files found under DIR (no download)")
    parser.add_argument("--cache", type=Path, help="the cache folder (default: $NLI_GRPO_CACHE, else ~/.cache/nli_grpo)")
    parser.add_argument("--data-only", action="store_true", help="datasets only, no models")
    args, extra = parser.parse_known_args(argv)
    if args.source is not None and (args.sweep or args.config):
        parser.error("--from ingests files; prepare a sweep's or recipe's downloads in another call")
    if args.source is None and not args.sweep and not args.config:
        args.config = "paper"
    return args, extra


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args, extra = parse_args(argv)
    if args.cache:
        os.environ["NLI_GRPO_CACHE"] = str(args.cache.absolute())  # nli_grpo.cache and the jobs read it
    if args.source is not None:
        if not args.source.is_dir():
            print(f"error: --from {args.source}: not a folder", file=sys.stderr)
            return 2
        try:
            entries = ingest(args.source)
        except (ValueError, OSError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 1
        for stem, entry in entries.items():
            print(f"{stem}: {entry['rows']} rows ({entry['dropped_no_gold']} without gold) from {entry['file']}")
        print(f"prepared {len(entries)} source(s) into {cache.data_dir()}; lock {cache.lock_path()}")
        return 0
    try:
        cfgs = configs_of(args, extra)
    except (ConfigError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return download(needed_stems(cfgs), [] if args.data_only else needed_models(cfgs))


def download(stems: list[str], models: list[tuple[str, str | None]]) -> int:
    """Prepare what is missing (a rerun after an interruption does the rest); 1 if anything failed."""
    from tqdm.auto import tqdm

    failures = []
    todo = [("data", stem) for stem in stems if not cache.prepared_data(stem)]
    todo += [("model", model) for model in models if not cache.prepared_model(*model)]
    done = len(stems) + len(models) - len(todo)
    print(f"cache {cache.cache_dir()}: {done} input(s) already prepared, {len(todo)} to download")
    for kind, item in tqdm(todo, desc="prepare", unit="input"):
        try:
            entry = prepare_from_hub(item) if kind == "data" else prepare_model(*item)
        except Exception as err:  # noqa: BLE001 - report each, go on with the rest, fail at the end
            failures.append(f"{item if kind == 'data' else item[0]}: {type(err).__name__}: {err}")
            continue
        print(f"{kind} {item if kind == 'data' else item[0]}: " + (f"{entry['rows']} rows, revision {entry['revision']}"
              if kind == "data" else f"revision {entry['revision']} in {entry['path']}"))
    for failure in failures:
        print(f"error: {failure}", file=sys.stderr)
    if failures:
        print("The cache keeps what was prepared; rerun the same command to retry the rest. Without access to the hub, "
              "ingest the datasets' original files with --from DIR and point model.name_or_path at local folders.",
              file=sys.stderr)
        return 1
    print(f"ready: lock {cache.lock_path()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
