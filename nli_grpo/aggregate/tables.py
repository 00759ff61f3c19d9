"""Seeds to tables: results grouped per sweep into variants (one configuration, its seeds merged
into mean, sample std and n per column; averages per seed first), and the table layouts built from
a sweep's axes (main, ablations, quantization deltas), with the best value per column marked and
the published reference rows that apply. Tables here are data (`Table`, `Row`, `Stat`); `render`
turns them into text."""

from __future__ import annotations

import math
import os
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..data import ADVERSARIAL_BENCHMARKS, STANDARD_BENCHMARKS
from ..results import QUANTIZATIONS
from .collect import cell_axes

METRICS = ("accuracy", "accuracy_strict")
#: Published numbers shown as reference rows (committed with the repository, see its `source` column).
DEFAULT_REFERENCE = Path(__file__).resolve().parents[2] / "results" / "reference" / "paper.csv"

#: Column headers of the benchmarks, in tables and plots.
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
STAGE_ORDER = ("zero_shot", "grpo")
# When no seed of a variant is complete, the cell shows the most hopeful state among its seeds.
PENDING_STATES = ("running", "preempted", "failed")
MISSING = "missing"
#: Evaluated, but no completion parsed, so the paper-comparable accuracy (parsed only) has no value.
NO_PARSE = "no parse"


# ---------------------------------------------------------------------------------------------
# Seeds -> variants
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Stat:
    """One table cell: seeds of one variant merged for one column (fractions), or why there is no number.
    kind: result | delta | reference; state: ok | missing | running | preempted | failed."""
    mean: float | None = None
    std: float | None = None
    n: int | None = None
    state: str = "ok"
    kind: str = "result"
    best: bool = False
    data: frozenset = frozenset()
    """What the number was computed on: fingerprints ("<sha256 prefix>/<rows>") of the evaluated data."""
    mixed: bool = False
    """Set when the cells of its column were computed on different data (mark_mixed_data)."""


@dataclass
class Variant:
    """All seeds of one configuration of a sweep."""
    axes: dict[str, Any]                 # every axis of the sweep but the seed (None where a cell lacks it)
    statuses: dict[Any, str] = field(default_factory=dict)     # seed -> status
    result_dirs: list[str] = field(default_factory=list)
    stats: dict[str, Stat] = field(default_factory=dict)       # column -> merged seeds
    unparsed: set[str] = field(default_factory=set)             # benchmarks evaluated with no value
    data: dict[str, set] = field(default_factory=dict)          # benchmark -> fingerprints of its complete seeds


@dataclass
class SweepResults:
    """One sweep's variants (seeds merged) and its axes: what the tables and plots are built from."""
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

    def find(self, **axes) -> Variant | None:
        return self._index.get(self._key(axes))

    # `having`: only the variants that have a value on that axis (e.g. `lora_rank` leaves out zero-shot).
    def _members(self, having: str | None) -> list[Variant]:
        return [v for v in self.variants if having is None or v.axes[having] is not None]

    def values(self, axis: str, having: str | None = None) -> list:
        """Distinct values of an axis, in table order."""
        return sorted({v.axes[axis] for v in self._members(having)}, key=partial(sort_key, axis))

    def varies(self, axis: str, having: str | None = None) -> bool:
        """Whether cells of one stage differ in the axis. An axis only GRPO cells have (the LoRA
        rank aside: a core axis), such as the rollout backend, does not vary merely because the
        zero-shot cells lack it."""
        if axis in CORE_AXES:
            return len(self.values(axis, having)) > 1
        by_stage: dict = {}
        for variant in self._members(having):
            by_stage.setdefault(variant.axes.get("stage"), set()).add(variant.axes[axis])
        return any(len(values) > 1 for values in by_stage.values())

    def groups(self, axes: list[str], having: str | None = None) -> list[dict]:
        """Distinct combinations of the given axes, in table order."""
        combos = {tuple(v.axes[a] for a in axes) for v in self._members(having)}
        ordered = sorted(combos, key=lambda c: tuple(sort_key(a, x) for a, x in zip(axes, c)))
        return [dict(zip(axes, c)) for c in ordered]


def _model_size(name: str) -> float:
    if name == "tiny":
        return 0.0
    match = re.search(r"(\d+(?:\.\d+)?)b\b", name.lower())
    return float(match.group(1)) if match else math.inf


def sort_key(axis: str, value: Any) -> tuple:
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


def build_sweep_results(runs: list[tuple[str, dict]], metric: str = "accuracy",
                        benchmarks: list[str] | None = None) -> list[SweepResults]:
    """Group runs by sweep and variant and merge the seeds of each variant (complete runs only)."""
    by_sweep: dict[str, list[tuple[str, dict]]] = {}
    for path, doc in runs:
        by_sweep.setdefault(doc["sweep"], []).append((path, doc))
    return [_build_sweep_results(name, by_sweep[name], metric, benchmarks) for name in sorted(by_sweep)]


def _build_sweep_results(name: str, runs: list[tuple[str, dict]], metric: str,
                         benchmarks: list[str] | None) -> SweepResults:
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
            pool = data_mark(((doc.get("train") or {}).get("data") or {}).get("fingerprint"))
            for b in shown:
                if (mark := data_mark((evals.get(b) or {}).get("fingerprint"))) is not None:
                    variant.data.setdefault(b, set()).add(mark)
                if pool is not None and b in evals:  # every number of a trained cell depends on its pool
                    variant.data.setdefault(b, set()).add(POOL_MARK + pool)

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
        data = {c: frozenset(variant.data.get(c, ())) for c in shown}
        data |= {key: frozenset().union(*(data[m] for m in members)) for key, members in averages.items()}
        variant.stats = {
            c: Stat(mean=means[i], std=_number(stds[i]), n=counts[i], data=data[c]) if counts[i]
            else Stat(state=NO_PARSE) if c in variant.unparsed else no_number
            for i, c in enumerate(columns)
        }
    expected_seeds = {stage: sorted(seeds, key=partial(sort_key, "seed")) for stage, seeds in seeds_by_stage.items()}
    return SweepResults(name=name, metric=metric, axes=axis_names, columns=columns, variants=list(variants.values()),
                 expected_seeds=expected_seeds)


def _number(value: Any) -> float | None:
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)


def _pending_state(variant: Variant) -> str:
    statuses = set(variant.statuses.values())
    if "complete" in statuses:
        return MISSING          # complete seeds exist but did not evaluate this column
    return next(s for s in PENDING_STATES if s in statuses)


def runs_note(variant: Variant | None, expected: list) -> str:
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
    notes: list[str] = field(default_factory=list)        # what a reader must know (mixed data)


# Labels and folder names, shared by the rendered tables and the plots.

def column_label(column: str) -> str:
    """A column's header: the benchmark's short name or the average's."""
    return BENCHMARK_LABELS.get(column) or AVERAGES.get(column, (column,))[0]


def format_axis(axis: str, value: Any) -> str:
    """An axis value as row labels, captions and legends show it ("" for none)."""
    if axis == "stage":
        return {"zero_shot": "zero-shot", "grpo": "GRPO"}.get(value, str(value))
    return "" if value is None else str(value)


def slug(text: str) -> str:
    """A sweep's folder name under tables/ and plots/: the name, safe for any file system."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "_"


def _variant_row(sweep: SweepResults, axes: dict, labels: dict[str, str]) -> Row:
    variant = sweep.find(**axes)
    cells = variant.stats if variant else {c: Stat(state=MISSING) for c in sweep.columns}
    return Row(labels, dict(cells), runs_note(variant, sweep.expected_seeds.get(axes["stage"], [])))


def delta(minuend: Stat, subtrahend: Stat) -> Stat:
    """Difference of two merged means (a number only when both sides have one)."""
    if minuend.state != "ok" or subtrahend.state != "ok":
        return Stat(state=MISSING, kind="delta")
    return Stat(mean=minuend.mean - subtrahend.mean, kind="delta", data=minuend.data | subtrahend.data)


def data_mark(fingerprint: dict | None) -> str | None:
    """A short, readable fingerprint of evaluated data: `<sha256 prefix>/<rows>`; None when a
    result does not record one (written before fingerprints existed)."""
    if not isinstance(fingerprint, dict) or "sha256" not in fingerprint:
        return None
    return f"{fingerprint['sha256'][:10]}/{fingerprint.get('rows')}"


#: Prefix of the fingerprint of the pool a cell trained on, among the data marks of its numbers.
POOL_MARK = "pool "


def mark_mixed_data(table: Table) -> Table:
    """Mark the cells of every column whose numbers were computed on different data (a changed
    dataset version, another file, a different eval.limit), or by cells trained on different
    pools: they are not comparable, and a mean over such seeds mixes them. An average is marked
    when one of its members is. The table gets a note per cause, naming the fingerprints."""
    def marks(column: str, pools: bool) -> set:
        found = set().union(*(row.cells[column].data for row in table.rows if row.cells[column].state == "ok"))
        return {m for m in found if m.startswith(POOL_MARK) == pools}

    pools = set().union(*(marks(c, pools=True) for c in table.columns))
    mixed = {c: marks(c, pools=False) for c in table.columns if c not in AVERAGES and len(marks(c, pools=False)) > 1}
    for column in table.columns:
        members = set(AVERAGES[column][1] or table.columns) if column in AVERAGES else {column}
        for row in table.rows:
            cell = row.cells[column]
            trained_on_a_pool = any(m.startswith(POOL_MARK) for m in cell.data)
            if cell.state == "ok" and (members & set(mixed) or (len(pools) > 1 and trained_on_a_pool)):
                row.cells[column] = replace(cell, mixed=True)
        if column in mixed:
            table.notes.append(f"{column_label(column)}: computed on different data ({len(mixed[column])} versions: "
                               f"{', '.join(sorted(mixed[column]))}); the marked cells are not comparable")
    if len(pools) > 1:
        table.notes.append(f"the trained cells used different training pools ({len(pools)}: "
                           f"{', '.join(sorted(p.removeprefix(POOL_MARK) for p in pools))}); the marked cells are not comparable")
    return table


def _fixed(sweep: SweepResults, axes: list[str], having: str | None = None) -> dict[str, str]:
    return {a: format_axis(a, vals[0]) for a in axes
            if len(vals := sweep.values(a, having)) == 1 and vals[0] is not None}


def _baseline(sweep: SweepResults, group: dict) -> dict:
    """Axes of the zero-shot baseline for a model/quantization/... group: the same values, except that
    a zero-shot cell without an extra GRPO-only axis (a KL beta, say) is the baseline for all its values."""
    exact = {**group, "stage": "zero_shot", "lora_rank": None}
    if sweep.find(**exact):
        return exact
    return {**exact, **{a: None for a in group if a not in CORE_AXES}}


def main_table(sweep: SweepResults, references: pd.DataFrame | None = None) -> Table | None:
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


def ablation_table(sweep: SweepResults, axis: str, references: pd.DataFrame | None = None) -> Table | None:
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


def quantization_table(sweep: SweepResults, references: pd.DataFrame | None = None) -> Table | None:
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


def tables_for(sweep: SweepResults, references: pd.DataFrame | None = None) -> list[Table]:
    """Every table the sweep's axes support, with the best value of each column marked."""
    extra_axes = [partial(ablation_table, axis=a) for a in sweep.axes if a not in CORE_AXES]
    tables = [layout(sweep, references=references) for layout in (*TABLE_LAYOUTS, *extra_axes)]
    return [mark_best(mark_mixed_data(t)) for t in tables if t is not None]


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

def load_references(path: str | os.PathLike | None) -> pd.DataFrame | None:
    """The reference CSV (label, model, quantization, stage, benchmark, accuracy_percent, source);
    None when no path is given or the file is absent (e.g. an installed package without the repo)."""
    if not path or not Path(path).is_file():
        return None
    refs = pd.read_csv(path, dtype=str, keep_default_na=False)
    refs["accuracy_percent"] = refs["accuracy_percent"].astype(float)
    return refs


def reference_rows(refs: pd.DataFrame | None, columns: list[str], models: set, label_axes: list[str]) -> list[Row]:
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
