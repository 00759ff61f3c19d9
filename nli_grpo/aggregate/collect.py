"""Finding and reading result files: which result.json files count, which are skipped and why,
the cell axes of a result, and `--filter` on those axes. Nothing here knows about tables."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from ..layout import RESULT_FILENAME
from ..results import ResultError, read_result


@dataclass(frozen=True)
class SkippedFile:
    """A result.json that was not used, and why (shown to the user; `--strict` makes it an error)."""
    path: str
    reason: str


@dataclass
class Collection:
    """Valid result documents found under the results folders, and the files that were not usable."""
    runs: list[tuple[str, dict]] = field(default_factory=list)   # (path, document)
    skipped: list[SkippedFile] = field(default_factory=list)


def find_result_files(roots: Iterable[str | os.PathLike]) -> list[str]:
    """Every result.json under the roots, sorted. A folder holding a result.json is a cell folder:
    its subfolders (checkpoints, predictions) are not searched, which keeps big sweeps fast."""
    roots = [os.path.realpath(r) for r in roots]
    # A root inside another root would count its cells twice.
    roots = [r for r in roots if not any(r != o and r.startswith(o.rstrip(os.sep) + os.sep) for o in roots)]
    found = []
    for root in dict.fromkeys(roots):
        if os.path.isfile(root):
            found.append(root)
            continue
        for dirpath, dirnames, filenames in os.walk(root):
            if RESULT_FILENAME in filenames:
                found.append(os.path.join(dirpath, RESULT_FILENAME))
                dirnames.clear()
            else:
                dirnames[:] = [d for d in dirnames if not d.startswith(".")]
    return sorted(found)


def collect(roots: Iterable[str | os.PathLike]) -> Collection:
    """Read and validate every result file; unusable ones are recorded with the reason, never raised.
    Two files for the same sweep/cell_id (a copied folder) keep the newer one, the other is skipped."""
    collection = Collection()
    by_cell: dict[tuple[str, str], int] = {}
    for path in find_result_files(roots):
        try:
            doc = read_result(path)
        except ResultError as err:
            collection.skipped.append(SkippedFile(path, str(err).removeprefix(f"{path}: ")))
            continue
        key = (doc["sweep"], doc["cell_id"])
        if key in by_cell:
            i = by_cell[key]
            other_path, other = collection.runs[i]
            if str(doc.get("updated_at", "")) > str(other.get("updated_at", "")):
                collection.runs[i] = (path, doc)
                path, other_path = other_path, path
            collection.skipped.append(SkippedFile(
                path, f"same cell {key[0]}/{key[1]} as {other_path}, which is used instead "
                      f"(later or equal updated_at)"))
            continue
        by_cell[key] = len(collection.runs)
        collection.runs.append((path, doc))
    return collection


def cell_axes(doc: dict) -> dict[str, Any]:
    """The cell's axes as hashable table keys; `stage` filled in for cells written without it."""
    cell = doc["cell"]
    axes = {k: v if v is None or isinstance(v, (str, int, float, bool)) else json.dumps(v, sort_keys=True)
            for k, v in cell.items()}
    axes.setdefault("stage", "zero_shot" if cell["lora_rank"] is None else "grpo")
    return axes


def parse_filters(specs: Iterable[str]) -> dict[str, set[str]]:
    """`["quantization=awq", "lora_rank=8,64"]` -> {"quantization": {"awq"}, "lora_rank": {"8", "64"}}."""
    filters: dict[str, set[str]] = {}
    for spec in specs:
        axis, sep, values = spec.partition("=")
        wanted = {v.strip().lower() for v in values.split(",") if v.strip()}
        if not sep or not axis.strip() or not wanted:
            raise ValueError(f"--filter {spec!r}: expected AXIS=VALUE[,VALUE...], e.g. quantization=awq")
        filters.setdefault(axis.strip(), set()).update(wanted)
    return filters


def _filter_text(value: Any) -> str:
    return "none" if value is None else str(value).lower()


def apply_filters(runs: list[tuple[str, dict]], filters: dict[str, set[str]]) -> list[tuple[str, dict]]:
    """Keep the runs whose axes (or `sweep`, `status`) match every filter; `none` matches null."""
    if not filters:
        return runs
    rows = [({**cell_axes(doc), "sweep": doc["sweep"], "status": doc["status"]}, path, doc) for path, doc in runs]
    known = set().union(*(axes for axes, _, _ in rows)) if rows else set()
    for axis in filters:
        if axis not in known:
            raise ValueError(f"--filter {axis}=...: no result has an axis {axis!r}; axes present: "
                             f"{', '.join(sorted(known))}")
    return [(path, doc) for axes, path, doc in rows
            if all(_filter_text(axes.get(axis)) in wanted for axis, wanted in filters.items())]
