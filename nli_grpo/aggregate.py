"""Merge per-cell result files into ablation tables (Markdown, CSV, LaTeX) and plots.

    python -m nli_grpo.aggregate results/                       # every sweep under results/
    python -m nli_grpo.aggregate results/lora_rank --filter quantization=awq --filter lora_rank=8,64,none
    python -m nli_grpo.aggregate results/ --metric accuracy_strict --format md,tex --no-plots

Markdown goes to stdout; files go to `<out>/tables/<sweep>/<table>.{md,csv,tex}` (plus
`<out>/tables/report.md`, the stdout text) and `<out>/plots/<sweep>/*.png`; `<out>` defaults to the
first results folder.

How a sweep becomes tables: every result file is one seed of a *variant* (its cell axes minus the
seed). Seeds are merged per variant (mean, sample std, n over the `complete` ones); an average column
is computed per seed first (every member benchmark required), then merged like a benchmark. Each
layout in `TABLE_LAYOUTS` looks at the axes present in the sweep and returns a table or None, so a
new sweep needs no new code. Rows the sweep's axes imply but that have no complete seed show the
state of their seeds (running / preempted / failed) or "—" when no file exists: nothing is dropped.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import re
import sys
from collections import Counter
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any, Iterable, Optional

import numpy as np
import pandas as pd

from .data import ADVERSARIAL_BENCHMARKS, BENCHMARK_NAMES, STANDARD_BENCHMARKS
from .results import QUANTIZATIONS, RESULT_FILENAME, TRAIN_LOG_FILENAME, ResultError, read_result, read_train_log

METRICS = ("accuracy", "accuracy_strict")
FORMATS = ("md", "csv", "tex")
#: Published numbers shown as reference rows (committed with the repository, see its `source` column).
DEFAULT_REFERENCE = Path(__file__).resolve().parent.parent / "results" / "reference" / "paper.csv"

BENCHMARK_LABELS = {
    "anli_r1": "ANLI R1", "anli_r2": "ANLI R2", "anli_r3": "ANLI R3", "snli": "SNLI", "mnli_mm": "MNLI-mm",
    "hans_lexical_overlap": "HANS lex.", "hans_subsequence": "HANS sub.", "hans_constituent": "HANS const.",
    "counter_nli": "Counter-NLI", "diag_knowledge": "Diag. knowl.", "diag_logic": "Diag. logic",
    "diag_lexical_semantics": "Diag. lex. sem.", "diag_predicate_argument": "Diag. pred.-arg.",
}
#: Average columns: key -> (header, member benchmarks; None = every shown benchmark).
AVERAGES = {
    "avg_standard": ("Std. avg", STANDARD_BENCHMARKS),
    "avg_adversarial": ("Adv. avg", ADVERSARIAL_BENCHMARKS),
    "avg": ("Avg", None),
}
#: Axes every cell has (seed aside), in the order tables nest them; other cell keys follow, sorted.
CORE_AXES = ("model", "quantization", "stage", "lora_rank")
AXIS_LABELS = {"quantization": "quant.", "lora_rank": "rank", "system": "system", "delta": "Δ"}
STAGE_ORDER = ("zero_shot", "grpo")
# When no seed of a variant is complete, the cell shows the most hopeful state among its seeds.
PENDING_STATES = ("running", "preempted", "failed")
MISSING = "missing"
#: Evaluated, but no completion parsed, so the paper-comparable accuracy (parsed only) has no value.
NO_PARSE = "no parse"


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------

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


# ---------------------------------------------------------------------------------------------
# Seeds -> variants
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Stat:
    """One table cell: seeds of one variant merged for one column (fractions), or why there is no number.
    kind: result | delta | reference; state: ok | missing | running | preempted | failed."""
    mean: Optional[float] = None
    std: Optional[float] = None
    n: Optional[int] = None
    state: str = "ok"
    kind: str = "result"
    best: bool = False


@dataclass
class Variant:
    """All seeds of one configuration of a sweep."""
    axes: dict[str, Any]                 # every axis of the sweep but the seed (None where a cell lacks it)
    statuses: dict[Any, str] = field(default_factory=dict)     # seed -> status
    result_dirs: list[str] = field(default_factory=list)
    stats: dict[str, Stat] = field(default_factory=dict)       # column -> merged seeds
    unparsed: set[str] = field(default_factory=set)             # benchmarks evaluated with no value


@dataclass
class Sweep:
    name: str
    metric: str
    axes: list[str]                      # non-seed axes, in nesting order
    columns: list[str]                   # benchmarks then averages, in display order
    variants: list[Variant]
    expected_seeds: dict[str, list]      # stage -> every seed the sweep has in that stage

    def __post_init__(self):
        self._index = {self._key(v.axes): v for v in self.variants}

    def _key(self, axes: dict) -> tuple:
        return tuple(axes.get(a) for a in self.axes)

    def find(self, **axes) -> Optional[Variant]:
        return self._index.get(self._key(axes))

    # `having`: only the variants that have a value on that axis (e.g. `lora_rank` leaves out zero-shot).
    def _members(self, having: Optional[str]) -> list[Variant]:
        return [v for v in self.variants if having is None or v.axes[having] is not None]

    def values(self, axis: str, having: Optional[str] = None) -> list:
        """Distinct values of an axis, in table order."""
        return sorted({v.axes[axis] for v in self._members(having)}, key=partial(_sort_key, axis))

    def varies(self, axis: str, having: Optional[str] = None) -> bool:
        return len(self.values(axis, having)) > 1

    def groups(self, axes: list[str], having: Optional[str] = None) -> list[dict]:
        """Distinct combinations of the given axes, in table order."""
        combos = {tuple(v.axes[a] for a in axes) for v in self._members(having)}
        ordered = sorted(combos, key=lambda c: tuple(_sort_key(a, x) for a, x in zip(axes, c)))
        return [dict(zip(axes, c)) for c in ordered]


def _model_size(name: str) -> float:
    if name == "tiny":
        return 0.0
    match = re.search(r"(\d+(?:\.\d+)?)b\b", name.lower())
    return float(match.group(1)) if match else math.inf


def _sort_key(axis: str, value: Any) -> tuple:
    """Order for axis values: zero-shot/None first, models by size, quantizations as in results.py."""
    if value is None:
        return (0, 0.0, "")
    if axis == "model":
        return (1, _model_size(str(value)), str(value))
    if axis == "quantization" and value in QUANTIZATIONS:
        return (1, QUANTIZATIONS.index(value), "")
    if axis == "stage" and value in STAGE_ORDER:
        return (1, STAGE_ORDER.index(value), "")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (1, value, "")
    return (2, 0.0, str(value))


def order_benchmarks(names: Iterable[str]) -> list[str]:
    """Standard sets, then the adversarial ones (the paper's order), then unknown names sorted."""
    names = set(names)
    known = [b for b in (*STANDARD_BENCHMARKS, *ADVERSARIAL_BENCHMARKS) if b in names]
    return known + sorted(names - set(known))


def average_columns(benchmarks: list[str]) -> dict[str, list[str]]:
    """Average columns worth showing: a group average needs two members and must differ from `avg`."""
    shown = {}
    for key, (_, members) in AVERAGES.items():
        cols = [b for b in benchmarks if members is None or b in members]
        if len(cols) >= 2 and (members is None or len(cols) < len(benchmarks)):
            shown[key] = cols
    return shown


def build_sweeps(runs: list[tuple[str, dict]], metric: str = "accuracy",
                 benchmarks: Optional[list[str]] = None) -> list[Sweep]:
    """Group runs by sweep and variant and merge the seeds of each variant (complete runs only)."""
    by_sweep: dict[str, list[tuple[str, dict]]] = {}
    for path, doc in runs:
        by_sweep.setdefault(doc["sweep"], []).append((path, doc))
    return [_build_sweep(name, by_sweep[name], metric, benchmarks) for name in sorted(by_sweep)]


def _build_sweep(name: str, runs: list[tuple[str, dict]], metric: str, benchmarks: Optional[list[str]]) -> Sweep:
    cells = [(path, doc, cell_axes(doc)) for path, doc in runs]
    extra = sorted({a for _, _, axes in cells for a in axes} - set(CORE_AXES) - {"seed"})
    axis_names = [*CORE_AXES, *extra]
    present = {b for _, doc, _ in cells for b in doc["eval"]}
    shown = order_benchmarks(benchmarks if benchmarks is not None else present)
    averages = average_columns(shown)

    variants: dict[tuple, Variant] = {}
    numbers: dict[tuple, int] = {}       # variant key -> row label in the pandas frame
    seeds_by_stage: dict[str, set] = {}
    records = []
    for path, doc, axes in cells:
        seed = axes.get("seed")
        key = tuple(axes.get(a) for a in axis_names)
        if key not in variants:
            variants[key] = Variant({a: axes.get(a) for a in axis_names})
            numbers[key] = len(numbers)
        variant = variants[key]
        variant.statuses[seed] = doc["status"]
        variant.result_dirs.append(os.path.dirname(path))
        seeds_by_stage.setdefault(axes["stage"], set()).add(seed)
        if doc["status"] == "complete":
            evals = doc["eval"]
            records.append([numbers[key]] + [(evals.get(b) or {}).get(metric) for b in shown])
            variant.unparsed.update(b for b in shown if b in evals and evals[b].get(metric) is None)

    # None (a benchmark a run did not evaluate) becomes NaN, which pandas leaves out of mean/std/count.
    frame = pd.DataFrame(np.array(records, dtype=float).reshape(-1, len(shown) + 1), columns=["variant", *shown])
    for key, cols in averages.items():
        frame[key] = frame[cols].mean(axis=1, skipna=False)   # a seed missing a member has no average
    columns = [*shown, *averages]
    seeds = frame.groupby("variant")[columns]
    means, stds, counts = seeds.mean(), seeds.std(), seeds.count()      # std: sample std (ddof=1)
    merged = dict(zip(means.index.astype(int).tolist(),
                      zip(means.to_numpy().tolist(), stds.to_numpy().tolist(), counts.to_numpy().tolist())))

    for key, variant in variants.items():
        means, stds, counts = merged.get(numbers[key], ([], [], [0] * len(columns)))
        no_number = Stat(state=_pending_state(variant))
        variant.stats = {
            c: Stat(mean=means[i], std=_number(stds[i]), n=counts[i]) if counts[i]
            else Stat(state=NO_PARSE) if c in variant.unparsed else no_number
            for i, c in enumerate(columns)
        }
    expected_seeds = {stage: sorted(seeds, key=partial(_sort_key, "seed")) for stage, seeds in seeds_by_stage.items()}
    return Sweep(name=name, metric=metric, axes=axis_names, columns=columns, variants=list(variants.values()),
                 expected_seeds=expected_seeds)


def _number(value: Any) -> Optional[float]:
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)


def _pending_state(variant: Variant) -> str:
    statuses = set(variant.statuses.values())
    if "complete" in statuses:
        return MISSING          # complete seeds exist but did not evaluate this column
    return next(s for s in PENDING_STATES if s in statuses)


def runs_note(variant: Optional[Variant], expected: list) -> str:
    """`complete/expected seeds`, plus what the other seeds are doing, e.g. `2/3 (1 running)`."""
    statuses = variant.statuses if variant else {}
    counts = Counter(s for s in statuses.values() if s != "complete")
    missing = len(set(expected) - set(statuses))
    parts = [f"{n} {status}" for status, n in sorted(counts.items())] + ([f"{missing} missing"] if missing else [])
    done = sum(s == "complete" for s in statuses.values())
    return f"{done}/{len(expected)}" + (f" ({', '.join(parts)})" if parts else "")


# ---------------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------------

@dataclass
class Row:
    labels: dict[str, str]
    cells: dict[str, Stat]
    runs: str = ""          # seeds complete / expected (result rows), both sides (delta rows)
    source: str = ""        # reference rows: where the numbers were published


@dataclass
class Table:
    name: str               # file stem
    title: str
    label_columns: list[str]
    columns: list[str]
    rows: list[Row]
    fixed: dict[str, str] = field(default_factory=dict)   # axes with one value in the whole table
    best_kind: str = "result"                             # which rows compete for "best in column"


def format_axis(axis: str, value: Any) -> str:
    if axis == "stage":
        return {"zero_shot": "zero-shot", "grpo": "GRPO"}.get(value, str(value))
    return "" if value is None else str(value)


def _variant_row(sweep: Sweep, axes: dict, labels: dict[str, str]) -> Row:
    variant = sweep.find(**axes)
    cells = variant.stats if variant else {c: Stat(state=MISSING) for c in sweep.columns}
    return Row(labels, dict(cells), runs_note(variant, sweep.expected_seeds.get(axes["stage"], [])))


def delta(minuend: Stat, subtrahend: Stat) -> Stat:
    """Difference of two merged means (a number only when both sides have one)."""
    if minuend.state != "ok" or subtrahend.state != "ok":
        return Stat(state=MISSING, kind="delta")
    return Stat(mean=minuend.mean - subtrahend.mean, kind="delta")


def _fixed(sweep: Sweep, axes: list[str], having: Optional[str] = None) -> dict[str, str]:
    return {a: format_axis(a, vals[0]) for a in axes
            if len(vals := sweep.values(a, having)) == 1 and vals[0] is not None}


def _baseline(sweep: Sweep, group: dict) -> dict:
    """Axes of the zero-shot baseline for a model/quantization/... group: the same values, except that
    a zero-shot cell without an extra GRPO-only axis (a KL beta, say) is the baseline for all its values."""
    exact = {**group, "stage": "zero_shot", "lora_rank": None}
    if sweep.find(**exact):
        return exact
    return {**exact, **{a: None for a in group if a not in CORE_AXES}}


def main_table(sweep: Sweep, references: Optional[pd.DataFrame] = None) -> Optional[Table]:
    """The paper's main layout: per model (and quantization, ...) the zero-shot row, one GRPO row
    per LoRA rank, the GRPO - zero-shot deltas, and the published reference rows that apply."""
    group_axes = [a for a in sweep.axes if a not in ("stage", "lora_rank")]
    ranks = sweep.values("lora_rank", having="lora_rank")
    has_zero_shot = "zero_shot" in sweep.values("stage")
    groups = sweep.groups(group_axes)
    # A baseline shared through a missing extra axis shows in the groups it serves, not on its own.
    borrowed = [b for g in groups if (b := _baseline(sweep, g)) != {**g, "stage": "zero_shot", "lora_rank": None}]
    groups = [g for g in groups if {**g, "stage": "zero_shot", "lora_rank": None} not in borrowed]
    shown_axes = [a for a in group_axes if len({g[a] for g in groups}) > 1]
    rows = []
    for group in groups:
        labels = {a: format_axis(a, group[a]) for a in shown_axes}
        zero_shot = _variant_row(sweep, _baseline(sweep, group), {**labels, "system": "zero-shot", "lora_rank": ""})
        grpo = [_variant_row(sweep, {**group, "stage": "grpo", "lora_rank": r},
                             {**labels, "system": "GRPO", "lora_rank": format_axis("lora_rank", r)}) for r in ranks]
        if has_zero_shot:
            rows.append(zero_shot)
        rows += grpo
        if has_zero_shot:
            rows += [Row({**g.labels, "system": "Δ GRPO − zero-shot"},
                         {c: delta(g.cells[c], zero_shot.cells[c]) for c in sweep.columns},
                         runs=f"{g.runs} vs {zero_shot.runs}") for g in grpo]
    models = {v.axes["model"] for v in sweep.variants}
    rows += reference_rows(references, sweep.columns, models, shown_axes)
    title = "Zero-shot vs GRPO" if has_zero_shot and ranks else ("GRPO" if ranks else "Zero-shot")
    return Table("main", title, [*shown_axes, "system", "lora_rank"], sweep.columns, rows,
                 fixed=_fixed(sweep, group_axes))


def ablation_table(sweep: Sweep, axis: str, references: Optional[pd.DataFrame] = None) -> Optional[Table]:
    """One axis varied, everything else held: rows nest the other axes outside, `axis` innermost.
    Only cells that have the axis take part (the LoRA-rank ablation leaves out zero-shot cells)."""
    if axis not in sweep.axes:
        return None
    values = sweep.values(axis, having=axis)
    if len(values) < 2:
        return None
    outer_axes = [a for a in sweep.axes if a != axis]
    shown_axes = [a for a in outer_axes if sweep.varies(a, having=axis)]
    rows = [
        _variant_row(sweep, {**group, axis: value},
                     {**{a: format_axis(a, group[a]) for a in shown_axes}, axis: format_axis(axis, value)})
        for group in sweep.groups(outer_axes, having=axis) for value in values
    ]
    title = {"lora_rank": "LoRA rank ablation", "model": "Model size"}.get(axis, f"{axis} ablation")
    return Table(f"ablation_{axis}", title, [*shown_axes, axis], sweep.columns, rows,
                 fixed=_fixed(sweep, outer_axes, having=axis))


def quantization_table(sweep: Sweep, references: Optional[pd.DataFrame] = None) -> Optional[Table]:
    """What quantization costs: each non-bf16 quantization minus bf16, everything else held."""
    quants = sweep.values("quantization")
    if "bf16" not in quants or len(quants) < 2:
        return None
    other_axes = [a for a in sweep.axes if a != "quantization"]
    shown_axes = [a for a in other_axes if sweep.varies(a)]
    rows = []
    for group in sweep.groups(other_axes):
        labels = {a: format_axis(a, group[a]) for a in shown_axes}
        base = _variant_row(sweep, {**group, "quantization": "bf16"}, labels)
        for quant in (q for q in quants if q != "bf16"):
            other = _variant_row(sweep, {**group, "quantization": quant}, labels)
            rows.append(Row({**labels, "delta": f"{quant} − bf16"},
                            {c: delta(other.cells[c], base.cells[c]) for c in sweep.columns},
                            runs=f"{other.runs} vs {base.runs}"))
    return Table("quantization_delta", "Quantization cost: quantized − bf16, points", [*shown_axes, "delta"],
                 sweep.columns, rows, fixed=_fixed(sweep, other_axes), best_kind="delta")


#: Table layouts, each `(sweep, references) -> Table | None`; a layout returns None where the sweep's
#: axes do not support it. Cell axes beyond model/quantization/stage/rank get an ablation each.
TABLE_LAYOUTS = (main_table, partial(ablation_table, axis="lora_rank"), partial(ablation_table, axis="model"),
                 quantization_table)


def tables_for(sweep: Sweep, references: Optional[pd.DataFrame] = None) -> list[Table]:
    """Every table the sweep's axes support, with the best value of each column marked."""
    extra_axes = [partial(ablation_table, axis=a) for a in sweep.axes if a not in CORE_AXES]
    tables = [layout(sweep, references=references) for layout in (*TABLE_LAYOUTS, *extra_axes)]
    return [mark_best(t) for t in tables if t is not None]


def mark_best(table: Table) -> Table:
    """Flag the highest value per column among rows of `table.best_kind` (ties, at the displayed
    precision, are all flagged)."""
    for column in table.columns:
        candidates = [r for r in table.rows
                      if r.cells[column].kind == table.best_kind and r.cells[column].state == "ok"]
        if not candidates:
            continue
        top = max(round(100 * r.cells[column].mean, 2) for r in candidates)
        for row in candidates:
            if round(100 * row.cells[column].mean, 2) == top:
                row.cells[column] = replace(row.cells[column], best=True)
    return table


# ---------------------------------------------------------------------------------------------
# Published reference numbers
# ---------------------------------------------------------------------------------------------

def load_references(path: Optional[str | os.PathLike]) -> Optional[pd.DataFrame]:
    """The reference CSV (label, model, quantization, stage, benchmark, accuracy_percent, source);
    None when no path is given or the file is absent (e.g. an installed package without the repo)."""
    if not path or not Path(path).is_file():
        return None
    refs = pd.read_csv(path, dtype=str, keep_default_na=False)
    refs["accuracy_percent"] = refs["accuracy_percent"].astype(float)
    return refs


def reference_rows(refs: Optional[pd.DataFrame], columns: list[str], models: set, label_axes: list[str]) -> list[Row]:
    """Reference rows that apply: they share a column with the table and are either external systems
    (no model) or about a model the sweep has."""
    if refs is None:
        return []
    rows = []
    for label, group in refs.groupby("label", sort=False):
        model = group["model"].iloc[0]
        if model and model not in models:
            continue
        values = {b: v / 100 for b, v in zip(group["benchmark"], group["accuracy_percent"]) if b in columns}
        if not values:
            continue
        cells = {c: Stat(mean=values[c], kind="reference") if c in values else Stat(state=MISSING, kind="reference")
                 for c in columns}
        labels = {a: group[a].iloc[0] for a in label_axes if a in group}
        rows.append(Row({**labels, "system": label}, cells, runs="reference",
                        source="; ".join(dict.fromkeys(group["source"]))))
    return rows


# ---------------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------------

def column_label(column: str) -> str:
    return BENCHMARK_LABELS.get(column) or AVERAGES.get(column, (column,))[0]


def format_stat(stat: Stat) -> str:
    """Percent with 2 decimals like the paper; `± std` when several seeds; signed for deltas."""
    if stat.state != "ok":
        return "—" if stat.state == MISSING else stat.state
    if stat.kind == "delta":
        return f"{100 * stat.mean:+.2f}"
    text = f"{100 * stat.mean:.2f}"
    return text + (f" ± {100 * stat.std:.2f}" if stat.std is not None else "")


_LATEX_SPECIALS = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                   "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
                   "±": r"$\pm$", "−": r"$-$", "—": "---", "Δ": r"$\Delta$"}


_LATEX_TRANSLATION = str.maketrans(_LATEX_SPECIALS)


def latex_escape(text: str) -> str:
    return text.translate(_LATEX_TRANSLATION)


def display_cells(table: Table, style: str = "md") -> tuple[list[str], list[list[str]]]:
    """Header and rows as text, best values in bold (`**` for Markdown, `\\textbf` for LaTeX)."""
    escape = latex_escape if style == "tex" else str

    def cell(stat: Stat) -> str:
        text = escape(format_stat(stat))
        if not stat.best:
            return text
        return f"\\textbf{{{text}}}" if style == "tex" else f"**{text}**"

    headers = [AXIS_LABELS.get(a, a) for a in table.label_columns] + [column_label(c) for c in table.columns] + ["runs"]
    rows = [[escape(row.labels.get(a, "")) for a in table.label_columns]
            + [cell(row.cells[c]) for c in table.columns] + [escape(row.runs)]
            for row in table.rows]
    return [escape(h) for h in headers], rows


CSV_FIELDS = ("column", "mean", "std", "n", "state", "kind", "best", "display", "runs", "source")


def long_records(table: Table) -> list[dict]:
    """One CSV line per table cell: labels, column, mean/std as fractions, n, state, best flag."""
    return [
        {**{a: row.labels.get(a, "") for a in table.label_columns}, "column": column, "mean": stat.mean,
         "std": stat.std, "n": stat.n, "state": stat.state, "kind": stat.kind, "best": stat.best,
         "display": format_stat(stat), "runs": row.runs, "source": row.source}
        for row in table.rows for column, stat in ((c, row.cells[c]) for c in table.columns)
    ]


def table_csv(table: Table) -> str:
    fields = [*table.label_columns, *CSV_FIELDS]
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")  # plain rows: DictWriter costs 2x on big sweeps
    writer.writerow(fields)
    writer.writerows([record[f] for f in fields] for record in long_records(table))
    return out.getvalue()


def _caption(table: Table) -> str:
    fixed = ", ".join(f"{AXIS_LABELS.get(a, a)} = {v}" for a, v in table.fixed.items())
    return table.title + (f" ({fixed})" if fixed else "")


def table_markdown(table: Table) -> str:
    """A pipe table (labels left-aligned, numbers right-aligned, padded for reading in a terminal),
    preceded by its caption and followed by the sources of its reference rows."""
    headers, rows = display_cells(table, "md")
    right = [False] * len(table.label_columns) + [True] * len(table.columns) + [False]
    widths = [max(len(text) for text in column) for column in zip(headers, *rows)]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.rjust(w) if r else c.ljust(w) for c, w, r in zip(cells, widths, right)) + " |"

    rule = "|" + "|".join("-" * (w + 1) + ":" if r else ":" + "-" * (w + 1) for w, r in zip(widths, right)) + "|"
    notes = "".join(f"\n- {r.labels['system']}: {r.source}" for r in table.rows if r.source)
    return "\n".join([f"### {_caption(table)}", "", line(headers), rule, *map(line, rows), ""]) + (
        f"\nReference rows:{notes}\n" if notes else "")


def table_latex(table: Table, sweep: str) -> str:
    """A booktabs table float (needs \\usepackage{booktabs}); reference sources as comments."""
    headers, rows = display_cells(table, "tex")
    columns = "l" * len(table.label_columns) + "r" * len(table.columns) + "l"
    return "\n".join([
        f"% {sweep}: {table.title}; best per column in bold. Needs \\usepackage{{booktabs}}.",
        *(f"% {r.labels['system']}: {r.source}" for r in table.rows if r.source),
        "\\begin{table}", "\\centering", f"\\caption{{{latex_escape(_caption(table))}}}",
        f"\\label{{tab:{sweep}-{table.name}}}", f"\\begin{{tabular}}{{{columns}}}", "\\toprule",
        " & ".join(headers) + " \\\\", "\\midrule", *(" & ".join(r) + " \\\\" for r in rows),
        "\\bottomrule", "\\end{tabular}", "\\end{table}", ""])


def render_report(sweep_tables: list[tuple[Sweep, list[Table]]], n_read: int, skipped: list[SkippedFile],
                  metric: str) -> str:
    """The whole Markdown report (what goes to stdout and tables/report.md)."""
    lines = [f"# nli_grpo results: `{metric}`", "",
             "Values in % (mean ± sample std over complete seeds; `runs` = complete/expected seeds). "
             "Best per column in **bold**; — = no result; running/preempted/failed = no complete seed yet; "
             "no parse = evaluated, but no completion had a parseable answer.",
             "", f"{n_read} result files read" + (f", {len(skipped)} skipped (listed on stderr)." if skipped else "."),
             ""]
    for sweep, tables in sweep_tables:
        lines += [f"## Sweep `{sweep.name}`", ""]
        lines += [table_markdown(t) for t in tables]
    return "\n".join(lines).rstrip() + "\n"


def write_tables(sweep_tables: list[tuple[Sweep, list[Table]]], out_dir: Path, formats: Iterable[str],
                 report: str) -> list[Path]:
    """`<out_dir>/<sweep>/<table>.{md,csv,tex}` for each requested format, plus report.md."""
    written = []
    for sweep, tables in sweep_tables:
        folder = out_dir / _slug(sweep.name)
        folder.mkdir(parents=True, exist_ok=True)
        renderers = {"md": table_markdown, "csv": table_csv, "tex": partial(table_latex, sweep=sweep.name)}
        for table in tables:
            for fmt in formats:
                path = folder / f"{table.name}.{fmt}"
                path.write_text(renderers[fmt](table))
                written.append(path)
    if "md" in formats:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "report.md").write_text(report)
        written.append(out_dir / "report.md")
    return written


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "_"


# ---------------------------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------------------------

def _label(axes: dict, shown: list[str]) -> str:
    return ", ".join(format_axis(a, axes[a]) for a in shown) or "all"


def _new_figure(width: float, height: float, *, left=0.7, right=0.2, top=0.6, bottom=0.6, hspace=0.6, wspace=0.3):
    """A figure with fixed margins in inches (a layout engine would cost more than the drawing)."""
    # The object API with the Agg canvas: no global pyplot state, no display needed on a cluster.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    fig.subplots_adjust(left=left / width, right=1 - right / width, top=1 - top / height, bottom=bottom / height,
                        hspace=hspace, wspace=wspace)
    return fig


def _colors(n: int) -> list:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n <= 10 else "viridis"]
    return [cmap(i if n <= 10 else i / max(n - 1, 1)) for i in range(n)]


def plot_accuracy_vs_rank(sweep: Sweep, path: Path) -> Optional[Path]:
    """One panel per column: metric vs LoRA rank, a line per other-axes group, dashed zero-shot."""
    ranks = sweep.values("lora_rank", having="lora_rank")
    if len(ranks) < 2:
        return None
    group_axes = [a for a in sweep.axes if a not in ("stage", "lora_rank")]
    groups = sweep.groups(group_axes, having="lora_rank")
    shown = [a for a in group_axes if sweep.varies(a, having="lora_rank")]
    ncols = min(4, len(sweep.columns))
    nrows = math.ceil(len(sweep.columns) / ncols)
    fig = _new_figure(3.2 * ncols, 2.6 * nrows + 1.0, bottom=1.0, left=0.5)
    panels = list(fig.subplots(nrows, ncols, squeeze=False).flat)
    for color, group in zip(_colors(len(groups)), groups):
        zero_shot = sweep.find(**group, stage="zero_shot", lora_rank=None)
        for ax, column in zip(panels, sweep.columns):
            stats = [(r, s) for r in ranks if (v := sweep.find(**group, stage="grpo", lora_rank=r))
                     and (s := v.stats[column]).state == "ok"]
            if stats:
                ax.errorbar([r for r, _ in stats], [100 * s.mean for _, s in stats],
                            yerr=[100 * (s.std or 0) for _, s in stats], color=color, marker="o", ms=3,
                            capsize=2, label=_label(group, shown))
            if zero_shot and zero_shot.stats[column].state == "ok":
                ax.axhline(100 * zero_shot.stats[column].mean, color=color, ls="--", lw=1)
    for ax, column in zip(panels, sweep.columns):
        ax.set_xscale("log", base=2)
        ax.set_xticks(ranks, labels=[str(r) for r in ranks])
        ax.minorticks_off()
        ax.set_title(column_label(column), fontsize=9)
        ax.set_ylabel("%", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in panels[len(sweep.columns):]:
        ax.set_visible(False)
    handles, labels = panels[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="lower center", ncols=min(len(labels), 6), fontsize=8)
    fig.suptitle(f"{sweep.name}: {sweep.metric} vs LoRA rank (mean ± std over seeds; dashed: zero-shot)", fontsize=10)
    fig.savefig(path, dpi=110)
    return path


def plot_stage_bars(sweep: Sweep, path: Path) -> Optional[Path]:
    """Per-set bars, zero-shot vs GRPO (one bar per rank), one panel per model/quantization group."""
    stages = sweep.values("stage")
    if stages != ["zero_shot", "grpo"]:
        return None
    group_axes = [a for a in sweep.axes if a not in ("stage", "lora_rank")]
    groups = sweep.groups(group_axes)
    shown = [a for a in group_axes if sweep.varies(a)]
    series = [("zero_shot", None)] + [("grpo", r) for r in sweep.values("lora_rank", having="lora_rank")]
    colors = ["0.6"] + _colors(len(series) - 1)
    fig = _new_figure(min(18.0, max(7.0, 0.22 * len(sweep.columns) * len(series))) + 1.6, 2.8 * len(groups) + 1.0,
                      right=1.6, top=0.8, bottom=1.0, hspace=0.9)
    x = np.arange(len(sweep.columns))
    width = 0.8 / len(series)
    for ax, group in zip(fig.subplots(len(groups), 1, squeeze=False).flat, groups):
        for i, ((stage, rank), color) in enumerate(zip(series, colors)):
            variant = sweep.find(**group, stage=stage, lora_rank=rank)
            stats = [variant.stats[c] if variant else Stat(state=MISSING) for c in sweep.columns]
            ok = np.array([s.state == "ok" for s in stats], dtype=bool)
            if not ok.any():
                continue            # the gap in the group of bars shows it; no legend entry without data
            ax.bar(x[ok] + (i - (len(series) - 1) / 2) * width, [100 * s.mean for s in stats if s.state == "ok"],
                   width, yerr=[100 * (s.std or 0) for s in stats if s.state == "ok"], color=color, capsize=1.5,
                   label="zero-shot" if stage == "zero_shot" else f"GRPO r{rank}")
        ax.set_xticks(x, labels=[column_label(c) for c in sweep.columns], rotation=30, ha="right", fontsize=8)
        ax.set_ylabel(f"{sweep.metric} (%)", fontsize=8)
        ax.set_title(_label(group, shown), fontsize=9)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.suptitle(f"{sweep.name}: zero-shot vs GRPO per set", fontsize=10)
    fig.savefig(path, dpi=110)
    return path


def mean_train_curve(result_dirs: list[str]) -> Optional[pd.DataFrame]:
    """Reward and KL per step (the index), averaged over the runs (seeds) in `result_dirs`: one
    record per step and run (of a step a restart replayed, the last attempt's). None when no run
    has a training log."""
    records = [r for d in result_dirs for r in read_train_log(os.path.join(d, TRAIN_LOG_FILENAME))]
    if not records:
        return None
    log = pd.DataFrame.from_records(records, columns=["step", "reward", "kl"]).apply(pd.to_numeric, errors="coerce")
    return log.groupby("step").mean().sort_index()


def plot_train_curves(sweep: Sweep, path: Path) -> Optional[Path]:
    """Reward and KL vs step from the train logs, averaged over seeds, one line per GRPO variant."""
    variants = [v for v in sweep.variants if v.axes["stage"] == "grpo"]
    shown = [a for a in sweep.axes if a != "stage" and sweep.varies(a, having="lora_rank")]
    curves = []
    for variant in sorted(variants, key=lambda v: tuple(_sort_key(a, v.axes[a]) for a in sweep.axes)):
        curve = mean_train_curve(variant.result_dirs)
        if curve is not None:
            curves.append((_label(variant.axes, shown), curve))
    if not curves:
        return None
    fig = _new_figure(10, 3.8, right=2.2, wspace=0.35)
    reward_ax, kl_ax = fig.subplots(1, 2)
    for (label, curve), color in zip(curves, _colors(len(curves))):
        reward_ax.plot(curve.index, curve["reward"], color=color, lw=1, label=label)
        kl_ax.plot(curve.index, curve["kl"], color=color, lw=1, label=label)
    for ax, name in ((reward_ax, "reward"), (kl_ax, "KL")):
        ax.set_xlabel("step")
        ax.set_ylabel(name)
        ax.set_title(f"{name} (mean over seeds)", fontsize=9)
    kl_ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    fig.suptitle(f"{sweep.name}: training curves", fontsize=10)
    fig.savefig(path, dpi=110)
    return path


PLOTS = {"accuracy_vs_rank": plot_accuracy_vs_rank, "zero_shot_vs_grpo": plot_stage_bars,
         "train_curves": plot_train_curves}


def write_plots(sweeps: list[Sweep], out_dir: Path) -> list[Path]:
    """Every plot that applies to each sweep, as `<out_dir>/<sweep>/<plot>.png`."""
    written = []
    for sweep in sweeps:
        folder = out_dir / _slug(sweep.name)
        folder.mkdir(parents=True, exist_ok=True)
        for name, plot in PLOTS.items():
            path = plot(sweep, folder / f"{name}.png")
            if path:
                written.append(path)
    return written


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------

def _comma_list(text: str, allowed: Iterable[str], what: str) -> list[str]:
    items = [x.strip() for x in text.split(",") if x.strip()]
    unknown = [x for x in items if x not in allowed]
    if unknown or not items:
        raise ValueError(f"unknown {what} {', '.join(unknown) or '(none given)'}; choose from: {', '.join(allowed)}")
    return items


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m nli_grpo.aggregate",
        description="Merge result.json files into ablation tables (Markdown to stdout; md/csv/tex files) and plots.")
    parser.add_argument("results", nargs="+", help="results folders (searched recursively) or result.json files")
    parser.add_argument("--metric", choices=METRICS, default="accuracy",
                        help="accuracy: paper-comparable (unparseable answers dropped); "
                             "accuracy_strict: unparseable = wrong")
    parser.add_argument("--benchmarks", help="comma list of benchmarks to show (default: every one present)")
    parser.add_argument("--format", default="md,csv,tex", help="table files to write: comma list of md,csv,tex")
    parser.add_argument("--out", help="folder for tables/ and plots/ (default: the first results folder)")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    parser.add_argument("--filter", action="append", default=[], metavar="AXIS=V1,V2",
                        help="keep cells whose axis has one of the values (repeatable; 'none' matches null, "
                             "e.g. lora_rank=64,none keeps the zero-shot baselines)")
    parser.add_argument("--reference", default=str(DEFAULT_REFERENCE),
                        help="CSV of published numbers shown as reference rows ('' for none)")
    parser.add_argument("--strict", action="store_true", help="exit non-zero if any result file is unusable")
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        formats = _comma_list(args.format, FORMATS, "format")
        benchmarks = _comma_list(args.benchmarks, BENCHMARK_NAMES, "benchmark") if args.benchmarks else None
        filters = parse_filters(args.filter)
    except ValueError as err:
        parser.error(str(err))
    for root in args.results:
        if not os.path.exists(root):
            parser.error(f"{root} does not exist; pass the folder the jobs write to (e.g. results/)")
    if args.reference and args.reference != str(DEFAULT_REFERENCE) and not os.path.isfile(args.reference):
        parser.error(f"--reference {args.reference}: no such file (use --reference '' for no reference rows)")

    collection = collect(args.results)
    for bad in collection.skipped:
        print(f"skipped {bad.path}: {bad.reason}", file=sys.stderr)
    if args.strict and collection.skipped:
        print(f"--strict: {len(collection.skipped)} unusable result file(s) (above); fix or move them, "
              f"or run without --strict to skip them", file=sys.stderr)
        return 1
    try:
        runs = apply_filters(collection.runs, filters)
    except ValueError as err:
        parser.error(str(err))
    if not runs:
        what = "matching the filters" if collection.runs else "usable"
        print(f"no {what} result.json under {', '.join(args.results)}; "
              f"`python -m nli_grpo.status` shows what the jobs are doing", file=sys.stderr)
        return 1

    references = load_references(args.reference)
    sweeps = build_sweeps(runs, args.metric, benchmarks)
    sweep_tables = [(sweep, tables_for(sweep, references)) for sweep in sweeps]
    report = render_report(sweep_tables, len(collection.runs), collection.skipped, args.metric)
    sys.stdout.write(report)

    out = Path(args.out or args.results[0])
    if out.is_file():
        out = out.parent
    written = write_tables(sweep_tables, out / "tables", formats, report)
    if not args.no_plots:
        written += write_plots(sweeps, out / "plots")
    print(f"wrote {len(written)} files under {out}/tables" + ("" if args.no_plots else f" and {out}/plots"),
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
