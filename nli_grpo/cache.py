"""Where a cluster's inputs live once prepared: the cache folder (on the shared file system), its
lock file, and what the lock says is there. `python -m nli_grpo.prepare` fills it on the login
node; the sweep checks it before submitting; jobs read it offline.

    $NLI_GRPO_CACHE (default ~/.cache/nli_grpo)
      data/<stem>.jsonl         every evaluation set and ANLI training round, in its hub schema
      hub/                      Hugging Face hub cache of the models ($HF_HUB_CACHE when set)
      models/                   stand-in models built locally (tiny, tiny-sft, random:<shape>), and
                                models staged from GGUF files (models/gguf/<name>-<sha256 prefix>-c<conversion>)
      prepared.lock.json        per set: source, revision or file, rows, rows without gold, sha256;
                                per model: requested and resolved revision, snapshot folder; per
                                staged GGUF model: source, sha256, quantisation, folder

Light: the login side reads it without torch.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

from . import files

LOCK_FILENAME = "prepared.lock.json"


def cache_dir() -> Path:
    """$NLI_GRPO_CACHE, else ~/.cache/nli_grpo."""
    return Path(os.environ.get("NLI_GRPO_CACHE", Path.home() / ".cache" / "nli_grpo"))


def data_dir() -> Path:
    """Prepared datasets, one `<stem>.jsonl` per source file, in its hub schema."""
    return cache_dir() / "data"


def hub_cache_dir() -> Path:
    """Where models from the hub are kept: $HF_HUB_CACHE when the user set one, else inside the
    cache. The sweep passes it on to its jobs, so they find what prepare downloaded."""
    return Path(os.environ["HF_HUB_CACHE"]) if os.environ.get("HF_HUB_CACHE") else cache_dir() / "hub"


def lock_path() -> Path:
    return cache_dir() / LOCK_FILENAME


def read_lock() -> dict:
    """The lock file's record ({"data": {...}, "models": {...}}; empty sections when absent)."""
    path = lock_path()
    if not path.is_file():
        return {"data": {}, "models": {}}
    try:
        lock = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err}); move it aside and run `python -m nli_grpo.prepare` again") from None
    return {"data": {}, "models": {}, **lock}


@contextlib.contextmanager
def locked():
    """Exclusive use of the lock file while a prepare updates it (two prepares may run at once,
    of several users of a shared cache: files.locked)."""
    with files.locked(cache_dir() / f".{LOCK_FILENAME}.flock"):
        yield


@contextlib.contextmanager
def building(target: Path):
    """Exclusive right to build `target` in the cache (a stand-in model): jobs that start together
    wait for the one building it, then find it built, instead of all building it."""
    with files.locked(target.parent / f".{target.name}.flock"):
        yield


def prepared_data(stem: str) -> Path | None:
    """The prepared file of a source stem, when the lock records it and it is on disk."""
    entry = read_lock()["data"].get(stem)
    path = data_dir() / f"{stem}.jsonl"
    return path if entry and path.is_file() else None


def prepared_model(name: str, revision: str | None = None) -> dict | None:
    """The lock's record of a hub model (its snapshot folder present), for the requested revision
    (None: whatever was prepared for the default branch)."""
    entry = read_lock()["models"].get(name)
    if not entry or entry.get("requested") != (revision or "main") or not Path(entry.get("path", "")).is_dir():
        return None
    return entry


def staged_gguf(name: str) -> dict | None:
    """The lock's record of a model staged from a GGUF file under `name` (`prepare --gguf`: its
    source, sha256, quantisation and HF folder), when that folder is present; else None."""
    entry = read_lock()["models"].get(name)
    if not entry or "gguf_sha256" not in entry or not Path(entry.get("path", "")).is_dir():
        return None
    return entry
