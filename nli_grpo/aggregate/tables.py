"""Seeds to tables: results grouped per sweep into variants (one configuration, its seeds merged
into mean, sample std and n per column; averages per seed first), and the table layouts built from
a sweep's axes (main, ablations, quantization deltas), with the best value per column marked and
the published reference rows that apply. Tables here are data (`Table`, `Row`, `Stat`); `render`
turns them into text."""

from __future__ import annotations

import math
import os
import re
import statistics
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..data import ADVERSARIAL_BENCHMARKS, BENCHMARK_NAMES, STANDARD_BENCHMARKS
from ..results import QUANTIZATIONS
from .collect import cell_axes
from .items import ItemCache, interval, p_value, seed_replicates

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
    kind: result | delta | reference | rate; state: ok | missing | no parse | running | preempted | failed."""
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
    low: float | None = None
    high: float | None = None
    """The 95% bootstrap interval over evaluation items (items.py); None without predictions files."""
    p: float | None = None
    """Deltas: two-sided bootstrap p-value of "no difference"."""
    replicates: np.ndarray | None = field(default=None, compare=False, repr=False)

    @property
    def significant(self) -> bool:
        """A delta whose interval excludes zero."""
        return self.kind == "delta" and self.low is not None and (self.low > 0 or self.high < 0)


@dataclass
class Variant:
    """All seeds of one configuration of a sweep. Per-seed numbers are kept, so that a row, an
    average and a delta can all be computed over one chosen set of seeds."""
    axes: dict[str, Any]                 # every axis of the sweep but the seed (None where a cell lacks it)
    statuses: dict[Any, str] = field(default_factory=dict)     # seed -> status
    result_dirs: list[str] = field(default_factory=list)
    stats: dict[str, Stat] = field(default_factory=dict)       # column -> merged over `seeds`
    unparsed: set[str] = field(default_factory=set)             # benchmarks evaluated with no value
    data: dict[str, set] = field(default_factory=dict)          # benchmark -> fingerprints of its complete seeds
    values: dict[str, dict] = field(default_factory=dict)       # column -> seed -> metric (complete seeds)
    replicates: dict[str, dict] = field(default_factory=dict)   # column -> seed -> bootstrap replicates
    unparseable: dict[str, dict] = field(default_factory=dict)  # benchmark -> seed -> unparseable rate
    seeds: list = field(default_factory=list)
    """The row's seeds: complete seeds with a number in every column any complete seed has."""

    def merged(self, column: str, seeds: list | None = None) -> Stat:
        """The column over `seeds` (default: the row's): mean, sample std, n, bootstrap interval."""
        seeds = self.seeds if seeds is None else seeds
        values = self.values.get(column, {})
        used = [s for s in seeds if s in values]
        if not used:
            return Stat(state=NO_PARSE if column in self.unparsed else _pending_state(self))
        numbers = [values[s] for s in used]
        reps = _mean_replicates(self.replicates.get(column, {}), used)
        return Stat(mean=statistics.fmean(numbers), std=statistics.stdev(numbers) if len(used) > 1 else None,
                    n=len(used), replicates=reps, **_interval(reps))


def _mean_replicates(by_seed: dict, seeds: list) -> np.ndarray | None:
    """The mean over seeds of their replicates (the same item draws for every seed); None unless
    every seed has them."""
    if not by_seed or not seeds or any(s not in by_seed for s in seeds):
        return None
    return np.mean([by_seed[s] for s in seeds], axis=0)


def _interval(replicates: np.ndarray | None) -> dict:
    bounds = interval(replicates) if replicates is not None else None
    return {"low": bounds[0], "high": bounds[1]} if bounds else {}


@dataclass
class SweepResults:
    """One sweep's variants (seeds merged) and its axes: what the tables and plots are built from."""
    name: str
    metric: str
    axes: list[str]                      # non-seed axes, in nesting order
    columns: list[str]                   # benchmarks then averages, in display order
    variants: list[Variant]
    expected_seeds: dict[str, list]      # stage -> every seed the sweep has in that stage
    averages: dict[str, list[str]] = field(default_factory=dict)   # average column -> its member sets
    items: dict[str, int] = field(default_factory=dict)            # benchmark -> largest eval n seen

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

    def column_label(self, column: str) -> str:
        """A column's header; an average names its coverage when it lacks members of its group,
        e.g. "Adv. avg (8/11)"."""
        members = self.averages.get(column)
        if members is None:
            return column_label(column)
        group = AVERAGES[column][1] or BENCHMARK_NAMES
        return column_label(column) + ("" if len(members) == len(group) else f" ({len(members)}/{len(group)})")


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
    """Average columns worth showing: a group average needs two members and must differ from `avg`.
    Averages are unweighted means over their member sets, computed per seed."""
    shown = {}
    for key, (_, members) in AVERAGES.items():
        cols = [b for b in benchmarks if members is None or b in members]
        if len(cols) >= 2 and (members is None or len(cols) < len(benchmarks)):
            shown[key] = cols
    return shown


def build_sweep_results(runs: list[tuple[str, dict]], metric: str = "accuracy",
                        benchmarks: list[str] | None = None, items: ItemCache | None = None) -> list[SweepResults]:
    """Group runs by sweep and variant and merge the seeds of each variant (complete runs only).
    `items`: where per-item predictions are read for the bootstrap intervals (None: no intervals)."""
    by_sweep: dict[str, list[tuple[str, dict]]] = {}
    for path, doc in runs:
        by_sweep.setdefault(doc["sweep"], []).append((path, doc))
    return [_build_sweep_results(name, by_sweep[name], metric, benchmarks, items) for name in sorted(by_sweep)]


def _trained_marks(doc: dict, axes: dict) -> set[str]:
    """What every number of a trained cell depends on beyond its evaluation data: the pool it trained
    on and its adapter's precision; "unknown" where the result does not record them (older results)."""
    if axes.get("stage") != "grpo":
        return set()
    train = doc.get("train") or {}
    pool = data_mark((train.get("data") or {}).get("fingerprint"))
    return {POOL_MARK + (pool or UNKNOWN), LORA_DTYPE_MARK + str(train.get("lora_dtype") or UNKNOWN)}


def _build_sweep_results(name: str, runs: list[tuple[str, dict]], metric: str, benchmarks: list[str] | None,
                         items: ItemCache | None) -> SweepResults:
    cells = [(path, doc, cell_axes(doc)) for path, doc in runs]
    extra = sorted({a for _, _, axes in cells for a in axes} - set(CORE_AXES) - {"seed"})
    axis_names = [*CORE_AXES, *extra]
    present = {b for _, doc, _ in cells for b in doc["eval"]}
    shown = order_benchmarks(benchmarks if benchmarks is not None else present)
    averages = average_columns(shown)

    variants: dict[tuple, Variant] = {}
    seeds_by_stage: dict[str, set] = {}
    item_counts: dict[str, int] = {}
    scores: dict[tuple, Any] = {}        # (variant key, seed, benchmark) -> ItemScores
    for path, doc, axes in cells:
        seed = axes.get("seed")
        key = tuple(axes.get(a) for a in axis_names)
        variant = variants.setdefault(key, Variant({a: axes.get(a) for a in axis_names}))
        variant.statuses[seed] = doc["status"]
        variant.result_dirs.append(os.path.dirname(path))
        seeds_by_stage.setdefault(axes["stage"], set()).add(seed)
        if doc["status"] != "complete":
            continue
        trained = _trained_marks(doc, axes)
        result_dir = os.path.dirname(path)
        predicted = items.predicted_sets(result_dir) if items is not None else set()
        for b in shown:
            entry = doc["eval"].get(b)
            if entry is None:
                continue
            item_counts[b] = max(item_counts.get(b, 0), int(entry.get("n") or 0))
            variant.unparseable.setdefault(b, {})[seed] = entry.get("unparseable_rate")
            variant.data.setdefault(b, set()).update({data_mark(entry.get("fingerprint"), entry.get("n")), *trained})
            if entry.get(metric) is None:
                variant.unparsed.add(b)
                continue
            variant.values.setdefault(b, {})[seed] = entry[metric]
            if b in predicted and (found := items.scores(result_dir, b)) is not None:
                scores[(key, seed, b)] = found

    for (key, seed, b), reps in seed_replicates(scores, metric).items():
        variants[key].replicates.setdefault(b, {})[seed] = reps
    for variant in variants.values():
        for column, members in averages.items():   # per seed, only where the seed has every member
            per_seed = [dict(variant.values.get(m, {})) for m in members]
            complete = set.intersection(*(set(v) for v in per_seed))
            variant.values[column] = {s: float(np.mean([v[s] for v in per_seed])) for s in complete}
            reps = [variant.replicates.get(m, {}) for m in members]
            variant.replicates[column] = {s: np.mean([r[s] for r in reps], axis=0)
                                          for s in complete if all(s in r for r in reps)}
        valued = [b for b in shown if variant.values.get(b)]
        with_all = [s for s, status in variant.statuses.items() if status == "complete"
                    and all(s in variant.values[b] for b in valued)]
        # No seed has every set (seed 0 lacks one, seed 1 another): each column over its own seeds, n shown.
        variant.seeds = sorted(with_all or {s for b in valued for s in variant.values[b]}, key=partial(sort_key, "seed"))
        data = {c: frozenset(variant.data.get(c, ())) for c in shown}
        data |= {key: frozenset().union(*(data[m] for m in members)) for key, members in averages.items()}
        for column in [*shown, *averages]:
            seeds = variant.seeds if with_all else sorted(variant.values.get(column, {}), key=partial(sort_key, "seed"))
            stat = variant.merged(column, seeds)
            variant.stats[column] = replace(stat, data=data[column]) if stat.state == "ok" else stat
    expected_seeds = {stage: sorted(seeds, key=partial(sort_key, "seed")) for stage, seeds in seeds_by_stage.items()}
    return SweepResults(name=name, metric=metric, axes=axis_names, columns=[*shown, *averages],
                        variants=list(variants.values()), expected_seeds=expected_seeds, averages=averages,
                        items=item_counts)


def _pending_state(variant: Variant) -> str:
    statuses = set(variant.statuses.values())
    if "complete" in statuses:
        return MISSING          # complete seeds exist but did not evaluate this column
    return next(s for s in PENDING_STATES if s in statuses)


def runs_note(variant: Variant | None, expected: list) -> str:
    """`seeds used/expected`, plus what the other seeds are doing, e.g. `2/3 (1 running)`; a complete
    seed left out of the row because it lacks a set shows as `without every set`."""
    statuses = variant.statuses if variant else {}
    used = set(variant.seeds) if variant else set()
    counts = Counter("without every set" if s == "complete" else s for seed, s in statuses.items() if seed not in used)
    missing = len(set(expected) - set(statuses))
    parts = [f"{n} {status}" for status, n in sorted(counts.items())] + ([f"{missing} missing"] if missing else [])
    return f"{len(used)}/{len(expected)}" + (f" ({', '.join(parts)})" if parts else "")


# ---------------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------------

@dataclass
class Row:
    labels: dict[str, str]
    cells: dict[str, Stat]
    runs: str = ""          # seeds used / expected (result rows), both sides (delta rows)
    source: str = ""        # reference rows: where the numbers were published
    n: int | None = None    # the row's seeds (paired seeds of a delta); a cell over another number shows its n
    greedy: bool = False    # a zero-shot row: one greedy run is the whole result, whatever its n


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
    column_labels: dict[str, str] = field(default_factory=dict)   # headers that differ from column_label's
    averages: dict[str, list[str]] = field(default_factory=dict)  # average column -> member sets
    remarks: list[str] = field(default_factory=list)      # plain notes under the table


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
    return Row(labels, dict(cells), runs_note(variant, sweep.expected_seeds.get(axes["stage"], [])),
               n=len(variant.seeds) if variant else None, greedy=axes["stage"] == "zero_shot")


def delta_stat(minuend: Variant | None, subtrahend: Variant | None, column: str, paired: bool) -> Stat:
    """minuend − subtrahend on one column. `paired`: over the seeds both rows use (a GRPO seed
    against the same seed), else each side over its own row seeds (a greedy zero-shot baseline
    has no seeds to pair). The bootstrap replicates are paired over items (items.py)."""
    if minuend is None or subtrahend is None:
        return Stat(state=MISSING, kind="delta")
    va, vb = minuend.values.get(column, {}), subtrahend.values.get(column, {})
    sa, sb = [s for s in minuend.seeds if s in va], [s for s in subtrahend.seeds if s in vb]
    if paired:
        sa = sb = [s for s in sa if s in sb]
    if not sa or not sb:
        return Stat(state=MISSING, kind="delta")
    ra = _mean_replicates(minuend.replicates.get(column, {}), sa)
    rb = _mean_replicates(subtrahend.replicates.get(column, {}), sb)
    reps = ra - rb if ra is not None and rb is not None else None
    return Stat(mean=float(np.mean([va[s] for s in sa]) - np.mean([vb[s] for s in sb])), n=len(sa), kind="delta",
                data=minuend.stats[column].data | subtrahend.stats[column].data, replicates=reps,
                p=p_value(reps) if reps is not None else None, **_interval(reps))


def delta_row(sweep: SweepResults, minuend: dict, subtrahend: dict, labels: dict[str, str]) -> Row:
    """A row of deltas between two variants (given by their axes), paired over seeds when both are
    trained (see `delta_stat`); `runs` names both sides and the number of paired seeds."""
    a, b = sweep.find(**minuend), sweep.find(**subtrahend)
    paired = minuend["stage"] == subtrahend["stage"] != "zero_shot"
    cells = {c: delta_stat(a, b, c, paired) for c in sweep.columns}
    runs = (f"{runs_note(a, sweep.expected_seeds.get(minuend['stage'], []))} vs "
            f"{runs_note(b, sweep.expected_seeds.get(subtrahend['stage'], []))}")
    n = None
    if a is not None and b is not None:
        n = len([s for s in a.seeds if s in b.seeds]) if paired else len(a.seeds)
        runs += f" ({n} paired)" if paired else ""
    return Row(labels, cells, runs, n=n, greedy=minuend["stage"] == "zero_shot")


#: Where a result does not record what a mark needs (written before fingerprints existed).
UNKNOWN = "unknown"
#: Prefixes of the marks of what a trained cell depends on beyond its evaluation data.
POOL_MARK = "pool "
LORA_DTYPE_MARK = "adapter "
TRAINED_MARKS = {POOL_MARK: "training pools", LORA_DTYPE_MARK: "adapter precision"}


def data_mark(fingerprint: dict | None, n: int | None = None) -> str:
    """A short, readable fingerprint of evaluated data: `<sha256 prefix>/<rows>` (rows: the eval's
    `n` when given); `no fingerprint/<n>` for a result that records none, which therefore differs
    from every fingerprinted version of the set."""
    if not isinstance(fingerprint, dict) or "sha256" not in fingerprint:
        return f"no fingerprint/{n}"
    return f"{fingerprint['sha256'][:10]}/{n if n is not None else fingerprint.get('rows')}"


def mark_mixed_data(table: Table) -> Table:
    """Mark the cells of every column whose numbers were computed on different data (a changed
    dataset version, another file, a different eval.limit or n, a result without fingerprint),
    or by trained cells that differ in training pool or adapter precision (missing = unknown):
    they are not comparable, and a mean over such seeds mixes them. An average is marked when one
    of its members is. The table gets a note per cause, naming the versions."""
    def marks(column: str) -> set:
        return set().union(*(row.cells[column].data for row in table.rows if row.cells[column].state == "ok"))

    def is_trained(mark: str) -> bool:
        return mark.startswith(tuple(TRAINED_MARKS))

    trained = {prefix: {m for c in table.columns for m in marks(c) if m.startswith(prefix)} for prefix in TRAINED_MARKS}
    trained = {prefix: found for prefix, found in trained.items() if len(found) > 1}
    data = {c: {m for m in marks(c) if not is_trained(m)} for c in table.columns if c not in table.averages}
    mixed = {c: found for c, found in data.items() if len(found) > 1}
    for column in table.columns:
        members = set(table.averages.get(column, [column]))
        for row in table.rows:
            cell = row.cells[column]
            differs = any(m.startswith(prefix) for m in cell.data for prefix in trained)
            if cell.state == "ok" and (members & set(mixed) or differs):
                row.cells[column] = replace(cell, mixed=True)
        if column in mixed:
            table.notes.append(f"{column_label(column)}: computed on different data ({len(mixed[column])} versions: "
                               f"{', '.join(sorted(mixed[column]))}); the marked cells are not comparable")
    for prefix, found in trained.items():
        what = TRAINED_MARKS[prefix]
        table.notes.append(f"the trained cells used different {what} ({len(found)}: "
                           f"{', '.join(sorted(m.removeprefix(prefix) for m in found))}); the marked cells are not comparable")
    return table


def _fixed(sweep: SweepResults, axes: list[str], having: str | None = None) -> dict[str, str]:
    return {a: format_axis(a, vals[0]) for a in axes
            if len(vals := sweep.values(a, having)) == 1 and vals[0] is not None}


def baseline_axes(sweep: SweepResults, group: dict) -> dict:
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
    borrowed = [b for g in groups if (b := baseline_axes(sweep, g)) != {**g, "stage": "zero_shot", "lora_rank": None}]
    groups = [g for g in groups if {**g, "stage": "zero_shot", "lora_rank": None} not in borrowed]
    shown_axes = [a for a in group_axes if len({g[a] for g in groups}) > 1]
    rows = []
    for group in groups:
        labels = {a: format_axis(a, group[a]) for a in shown_axes}
        baseline = baseline_axes(sweep, group)
        if has_zero_shot:
            rows.append(_variant_row(sweep, baseline, {**labels, "system": "zero-shot", "lora_rank": ""}))
        trained = [{**group, "stage": "grpo", "lora_rank": r} for r in ranks]
        rows += [_variant_row(sweep, axes, {**labels, "system": "GRPO", "lora_rank": format_axis("lora_rank", axes["lora_rank"])})
                 for axes in trained]
        if has_zero_shot:
            rows += [delta_row(sweep, axes, baseline, {**labels, "system": "Δ GRPO − zero-shot",
                                                       "lora_rank": format_axis("lora_rank", axes["lora_rank"])})
                     for axes in trained]
    rows += reference_rows(references, sweep, shown_axes)
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
    """What quantization costs: each non-bf16 quantization minus bf16, everything else held,
    paired over the seeds both completed."""
    quants = sweep.values("quantization")
    if "bf16" not in quants or len(quants) < 2:
        return None
    other_axes = [a for a in sweep.axes if a != "quantization"]
    shown_axes = [a for a in other_axes if sweep.varies(a)]
    rows = []
    for group in sweep.groups(other_axes):
        labels = {a: format_axis(a, group[a]) for a in shown_axes}
        for quant in (q for q in quants if q != "bf16"):
            rows.append(delta_row(sweep, {**group, "quantization": quant}, {**group, "quantization": "bf16"},
                                  {**labels, "delta": f"{quant} − bf16"}))
    return Table("quantization_delta", "Quantization cost: quantized − bf16, points", [*shown_axes, "delta"],
                 sweep.columns, rows, fixed=_fixed(sweep, other_axes), best_kind="delta")


def unparseable_table(sweep: SweepResults, references: pd.DataFrame | None = None) -> Table | None:
    """The share of answers that did not parse, per variant and set (mean over the row's seeds):
    with `accuracy` they are dropped, so a model that often breaks the format can score higher."""
    benchmarks = [c for c in sweep.columns if c not in sweep.averages]
    shown_axes = [a for a in sweep.axes if sweep.varies(a)]
    rows = []
    for variant in sorted(sweep.variants, key=lambda v: tuple(sort_key(a, v.axes[a]) for a in sweep.axes)):
        cells = {}
        for b in benchmarks:
            rates = [r for s in variant.seeds if (r := variant.unparseable.get(b, {}).get(s)) is not None]
            cells[b] = (Stat(mean=float(np.mean(rates)), std=float(np.std(rates, ddof=1)) if len(rates) > 1 else None,
                             n=len(rates), kind="rate") if rates else Stat(state=variant.stats[b].state
                                                                          if variant.stats[b].state != NO_PARSE else MISSING, kind="rate"))
        rows.append(Row({a: format_axis(a, variant.axes[a]) for a in shown_axes}, cells,
                        runs_note(variant, sweep.expected_seeds.get(variant.axes["stage"], [])), n=len(variant.seeds)))
    return Table("unparseable", "Unparseable answers, % of items", shown_axes, benchmarks, rows,
                 fixed=_fixed(sweep, [a for a in sweep.axes if a not in shown_axes]), best_kind="none")


#: Table layouts, each `(sweep, references) -> Table | None`; a layout returns None where the sweep's
#: axes do not support it. Cell axes beyond model/quantization/stage/rank get an ablation each.
TABLE_LAYOUTS = (main_table, partial(ablation_table, axis="lora_rank"), partial(ablation_table, axis="model"),
                 quantization_table)


def tables_for(sweep: SweepResults, references: pd.DataFrame | None = None) -> list[Table]:
    """Every table the sweep's axes support, with the best value of each column marked, then the
    unparseable rates and the paper's claims checked against the sweep."""
    extra_axes = [partial(ablation_table, axis=a) for a in sweep.axes if a not in CORE_AXES]
    tables = [layout(sweep, references=references) for layout in (*TABLE_LAYOUTS, *extra_axes, unparseable_table)]
    tables = [t for t in tables if t is not None]
    for table in tables:
        table.column_labels = {c: sweep.column_label(c) for c in table.columns}
        table.averages = {c: m for c, m in sweep.averages.items() if c in table.columns}
    claims = claims_table(sweep, references)
    return [mark_best(mark_mixed_data(t)) for t in tables] + ([claims] if claims else [])


def mark_best(table: Table) -> Table:
    """Flag the highest value per column among rows of `table.best_kind` (ties, at the displayed
    precision, are all flagged). Only rows over the most seeds compete (a 1-seed row does not
    take the bold from a 3-seed row), except greedy zero-shot rows, complete with one run."""
    for column in table.columns:
        candidates = [r for r in table.rows
                      if r.cells[column].kind == table.best_kind and r.cells[column].state == "ok"]
        if not candidates:
            continue
        most = max(r.cells[column].n or 0 for r in candidates)
        candidates = [r for r in candidates if r.greedy or (r.cells[column].n or 0) == most]
        top = max(round(100 * r.cells[column].mean, 2) for r in candidates)
        for row in candidates:
            if round(100 * row.cells[column].mean, 2) == top:
                row.cells[column] = replace(row.cells[column], best=True)
    return table


# ---------------------------------------------------------------------------------------------
# Published reference numbers, and the paper's claims checked against the sweep
# ---------------------------------------------------------------------------------------------

def load_references(path: str | os.PathLike | None) -> pd.DataFrame | None:
    """The reference CSV (label, model, quantization, stage, benchmark, accuracy_percent, source, and
    optionally metric: "accuracy" when absent, the authors' parsed-only accuracy); None when no
    path is given or the file is absent (e.g. an installed package without the repo)."""
    if not path or not Path(path).is_file():
        return None
    refs = pd.read_csv(path, dtype=str, keep_default_na=False)
    refs["accuracy_percent"] = refs["accuracy_percent"].astype(float)
    if "metric" not in refs:
        refs["metric"] = "accuracy"
    refs["metric"] = refs["metric"].replace("", "accuracy")
    return refs


def _reference_mismatch(group: pd.DataFrame, sweep: SweepResults) -> list[str]:
    """What makes a reference row unlike the sweep's cells: metric, and for a row about a model,
    its quantization or stage where the sweep has no such cell of that model."""
    first = group.iloc[0]
    parts = []
    if first["model"]:
        cells = [v.axes for v in sweep.variants if v.axes["model"] == first["model"]]
        if first["quantization"] and first["quantization"] not in {a["quantization"] for a in cells}:
            parts.append(f"quant. {first['quantization']}")
        if first["stage"] and first["stage"] not in {a["stage"] for a in cells}:
            parts.append(f"stage {format_axis('stage', first['stage'])}")
    if first["metric"] != sweep.metric:
        parts.append(f"metric {first['metric']}")
    return parts


def reference_rows(refs: pd.DataFrame | None, sweep: SweepResults, label_axes: list[str]) -> list[Row]:
    """Reference rows that apply: they share a column with the table and are either external systems
    (no model) or about a model the sweep has. A row whose metric, quantization or stage the
    sweep's cells do not share says so in its label."""
    if refs is None:
        return []
    models = {v.axes["model"] for v in sweep.variants}
    rows = []
    for label, group in refs.groupby("label", sort=False):
        model = group["model"].iloc[0]
        if model and model not in models:
            continue
        values = {b: v / 100 for b, v in zip(group["benchmark"], group["accuracy_percent"]) if b in sweep.columns}
        if not values:
            continue
        cells = {c: Stat(mean=values[c], kind="reference") if c in values else Stat(state=MISSING, kind="reference")
                 for c in sweep.columns}
        labels = {a: group[a].iloc[0] for a in label_axes if a in group}
        mismatch = _reference_mismatch(group, sweep)
        system = label + (f" ({', '.join(mismatch)}, unlike this table)" if mismatch else "")
        rows.append(Row({**labels, "system": system}, cells, runs="reference",
                        source="; ".join(dict.fromkeys(group["source"]))))
    return rows


def verdict(stat: Stat, claimed: float) -> str:
    """Whether our delta `stat` supports a published difference `claimed` (its sign), contradicts
    it, or cannot tell: its 95% interval must exclude zero to say either."""
    if stat.state != "ok":
        return "no result"
    if stat.low is None:
        return "cannot tell (no per-item predictions)"
    if stat.low <= 0 <= stat.high:
        return "cannot tell at this sample size"
    return "supports" if (stat.low > 0) == (claimed > 0) else "contradicts"


def _shifted(stat: Stat, by: float) -> Stat:
    """A result as a delta against a fixed published number (its interval shifted alike)."""
    if stat.state != "ok":
        return replace(stat, kind="delta", best=False)
    return replace(stat, mean=stat.mean - by, kind="delta", best=False,
                   low=None if stat.low is None else stat.low - by, high=None if stat.high is None else stat.high - by)


#: The paper's headline count (reference/paper-facts.md); no per-set numbers of it are published.
PAPER_STATE_OF_THE_ART = "7 of 11, 32B AWQ"


def _comparison(minuend: dict, subtrahend: dict) -> str | None:
    """The comparison two of the paper's rows (same model and set) make, if any: GRPO − zero-shot
    at one quantization, or quantized − bf16 at one stage."""
    if minuend["quantization"] == subtrahend["quantization"] and (minuend["stage"], subtrahend["stage"]) == ("grpo", "zero_shot"):
        return "GRPO − zero-shot"
    if minuend["stage"] == subtrahend["stage"] and subtrahend["quantization"] == "bf16" \
            and minuend["quantization"] not in ("", "bf16"):
        return f"{minuend['quantization']} − bf16"
    return None


def claims_table(sweep: SweepResults, references: pd.DataFrame | None) -> Table | None:
    """Each comparison the published reference rows make, checked against the sweep: the paper's own
    rows of one model and set that differ in stage or quantization (e.g. GRPO − zero-shot on ANLI
    R3), and the paper's rows against prior systems (rows without a model); plus, per GRPO variant,
    on how many adversarial sets with a published prior number it is above the best of them."""
    if references is None:
        return None
    refs = references[references["metric"] == sweep.metric]
    paper, external = refs[refs["model"] != ""], refs[refs["model"] == ""]
    rows = []

    def cells_like(model: str, quantization: str, stage: str) -> list[Variant]:
        return sorted((v for v in sweep.variants if (v.axes["model"], v.axes["quantization"], v.axes["stage"])
                       == (model, quantization, stage)), key=lambda v: tuple(sort_key(a, v.axes[a]) for a in sweep.axes))

    def name(variant: Variant) -> str:
        return ", ".join(format_axis(a, variant.axes[a]) for a in sweep.axes if variant.axes[a] is not None)

    for (model, benchmark), group in paper.groupby(["model", "benchmark"], sort=False):
        if benchmark not in sweep.columns:
            continue
        records = group.to_dict("records")
        for hi, lo, what in ((a, b, what) for a in records for b in records if (what := _comparison(a, b))):
            claimed = (hi["accuracy_percent"] - lo["accuracy_percent"]) / 100
            for variant in cells_like(model, hi["quantization"], hi["stage"]):
                base_axes = (baseline_axes(sweep, {a: variant.axes[a] for a in sweep.axes if a not in ("stage", "lora_rank")})
                             if hi["stage"] != lo["stage"] else {**variant.axes, "quantization": lo["quantization"]})
                stat = delta_stat(variant, sweep.find(**base_axes), benchmark, paired=hi["stage"] == lo["stage"] == "grpo")
                rows.append(Row({"claim": f"{what}, {column_label(benchmark)} ({model})", "cell": name(variant),
                                 "verdict": verdict(stat, claimed)},
                                {"paper": Stat(mean=claimed, kind="delta"), "ours": stat}, runs=str(stat.n or "")))
        for prior in external[external["benchmark"] == benchmark].to_dict("records"):
            for record in records:
                claimed = (record["accuracy_percent"] - prior["accuracy_percent"]) / 100
                for variant in cells_like(model, record["quantization"], record["stage"]):
                    stat = _shifted(variant.stats[benchmark], prior["accuracy_percent"] / 100)
                    rows.append(Row({"claim": f"{record['label']} − {prior['label']}, {column_label(benchmark)}",
                                     "cell": name(variant), "verdict": verdict(stat, claimed)},
                                    {"paper": Stat(mean=claimed, kind="delta"), "ours": stat},
                                    runs=str(stat.n or "")))
    prior_best = external.groupby("benchmark")["accuracy_percent"].max() / 100
    prior_sets = [b for b in ADVERSARIAL_BENCHMARKS if b in prior_best.index and b in sweep.columns]
    trained = sorted((v for v in sweep.variants if v.axes["stage"] == "grpo"),
                     key=lambda v: tuple(sort_key(a, v.axes[a]) for a in sweep.axes))
    for variant in trained if prior_sets else ():
        stats = [variant.stats[b] for b in prior_sets]
        above = sum(s.state == "ok" and s.mean > prior_best[b] for s, b in zip(stats, prior_sets))
        sure = sum(s.state == "ok" and s.low is not None and s.low > prior_best[b] for s, b in zip(stats, prior_sets))
        rows.append(Row({"claim": f"state of the art on k of {len(ADVERSARIAL_BENCHMARKS)} adversarial sets "
                                  f"(paper: {PAPER_STATE_OF_THE_ART})", "cell": name(variant),
                         "verdict": f"above the best prior number on {above} of the {len(prior_sets)} sets that have one "
                                    f"({sure} with the interval above it)"},
                        {"paper": Stat(state=MISSING, kind="reference"), "ours": Stat(state=MISSING, kind="delta")}))
    if not rows:
        return None
    return Table("claims", "Published claims checked against this sweep (points)", ["claim", "cell", "verdict"],
                 ["paper", "ours"], rows, best_kind="none",
                 remarks=["supports / contradicts: our 95% interval excludes zero on the paper's side / the other "
                          "side; `ours` is the delta (or our number minus the prior system's) with its interval"])
