"""The paper's scoring protocol (reference/paper-facts.md, "Parsing and reward" and "Evaluation"),
shared by the evaluation job and by re-scoring of completions produced elsewhere.

- 3-way sets: the answer is `prompts.extract_label`. `accuracy` is the authors' number:
  unparseable completions are dropped from numerator and denominator. `accuracy_strict` counts
  them as wrong.
- HANS sets (gold 0 entailment, 1 non-entailment): a completion predicts entailment only when it
  parses to entailment; neutral, contradiction and unparseable all predict non-entailment. Nothing
  is dropped: `accuracy` is the authors' number (an unparseable completion is right on a
  non-entailment example), and `accuracy_strict` counts unparseable completions wrong, as on the
  3-way sets (a model that never answers scores 0 strictly, not the share of non-entailment).

One eval entry of result.json (`score_benchmark`)::

    {"scoring": "three_way" | "hans",
     "accuracy": 0.75 | None, "accuracy_strict": 0.6, "unparseable_rate": 0.2, "format_rate": 0.5,
     "n": 10, "n_parsed": 8, "n_correct": 6,
     "per_class": {"entailment": {"precision", "recall", "f1", "support"}, ...},
     "confusion": {gold name: {"entailment": k, "neutral": k, "contradiction": k, "unparseable": k}},
     "per_subcase": {"ln_preposition": {"accuracy", "accuracy_strict", "n", "n_parsed", "n_correct"}},
     ...one "per_<group>" for every group given}

Per-example predictions go to `predictions/<benchmark>.jsonl.gz`, one JSON object per example:
"id", "label" (gold id), "prediction" (the parsed answer as a `prompts.LABELS` id, -1 unparseable,
for HANS too), "correct" (under the set's rule), "completion", plus the group fields. Such a file
can be re-scored with `score_file`, as can any JSON-lines file with "id", "label", "completion".

Command line: `python -m nli_grpo.evaluate --score FILE.jsonl --benchmark NAME [--out RESULT.json]`.
"""

from __future__ import annotations

import gzip
import json
import os
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from nli_grpo.data import BENCHMARKS, HANS, BenchmarkSpec, json_lines
from nli_grpo.prompts import LABEL_IDS, LABELS, UNPARSEABLE, extract_label, format_ok
from nli_grpo.results import atomic_open, atomic_write_json

#: Per-example fields that `score_file` uses as score groups when a file carries them.
GROUP_FIELDS = ("heuristic", "subcase", "categories")
#: Column names of the confusion matrix: the model's parsed answer, before HANS folds neutral,
#: contradiction and unparseable into non-entailment.
ANSWER_NAMES = LABELS + ("unparseable",)
#: Digits kept in every reported ratio.
DIGITS = 6


def score_benchmark(
    benchmark: str,
    golds: Sequence[int],
    completions: Sequence[str],
    groups: Mapping[str, Sequence] | None = None,
) -> dict:
    """The eval entry of result.json for one set (see the module docstring for its keys).

    `golds` are label ids of the set (HANS: 0 entailment, 1 non-entailment), `completions` the raw
    generated texts, in the same order. `groups` maps a group name (e.g. "subcase", "categories")
    to one value per example: a str, a list of str (the example counts in each of them), or None
    (in none); the entry gets `per_<name>` with the accuracies of every value, under the set's rule."""
    spec = benchmark_spec(benchmark)
    golds = _checked_golds(spec, golds)
    if len(completions) != len(golds):
        raise ValueError(f"{benchmark}: {len(golds)} gold labels but {len(completions)} completions; "
                         "pass one completion per example, in the same order.")
    if not golds:
        raise ValueError(f"{benchmark}: no examples to score.")
    for i, completion in enumerate(completions):
        if not isinstance(completion, str):
            raise ValueError(f"{benchmark}: completion {i} is {type(completion).__name__}, expected the "
                             "generated text as str (an empty string for an empty generation).")
    answers = [extract_label(c) for c in completions]
    predicted = [_scored_prediction(spec, a) for a in answers]
    examples = range(len(golds))

    entry = {
        "scoring": spec.scoring,
        **_accuracies(golds, answers, predicted, examples),
        "unparseable_rate": _ratio(answers.count(UNPARSEABLE), len(golds)),
        "format_rate": _ratio(sum(map(format_ok, completions)), len(golds)),
        "per_class": _per_class(spec, golds, predicted),
        "confusion": _confusion(spec, golds, answers),
    }
    for name, values in (groups or {}).items():
        members = _group_members(benchmark, name, values, len(golds))
        entry[f"per_{name}"] = {
            value: _accuracies(golds, answers, predicted, members[value]) for value in sorted(members)
        }
    return entry


def benchmark_spec(benchmark: str) -> BenchmarkSpec:
    """The registry entry of `benchmark`; a ValueError listing the valid names when unknown."""
    if benchmark not in BENCHMARKS:
        raise ValueError(f"Unknown benchmark {benchmark!r}; valid names: {', '.join(BENCHMARKS)}.")
    return BENCHMARKS[benchmark]


def is_correct(spec: BenchmarkSpec, gold: int, completion: str) -> bool:
    """Whether one completion is right under the set's rule (unparseable is wrong on 3-way sets,
    non-entailment on HANS)."""
    return _scored_prediction(spec, extract_label(completion)) == gold


def _scored_prediction(spec: BenchmarkSpec, answer: int) -> int:
    """The parsed answer as a label id of the set: unchanged (-1 included) on 3-way sets; on HANS
    entailment or non-entailment, never unparseable."""
    if spec.scoring == HANS:
        return spec.label_names.index("entailment" if answer == LABEL_IDS["entailment"] else "non-entailment")
    return answer


def _accuracies(golds, answers, predicted, examples: Iterable[int]) -> dict:
    """Accuracy over `examples` (indices) under the set's rule: correct / parsed (on HANS, where
    no prediction is UNPARSEABLE, correct / all); and strict: correct and parsed / all."""
    examples = list(examples)
    n_correct = sum(predicted[i] == golds[i] for i in examples)
    n_counted = sum(predicted[i] != UNPARSEABLE for i in examples)
    n_correct_parsed = sum(predicted[i] == golds[i] and answers[i] != UNPARSEABLE for i in examples)
    return {
        "accuracy": _ratio(n_correct, n_counted),
        "accuracy_strict": _ratio(n_correct_parsed, len(examples)),
        "n": len(examples),
        "n_parsed": sum(answers[i] != UNPARSEABLE for i in examples),
        "n_correct": n_correct,
    }


def _per_class(spec: BenchmarkSpec, golds, predicted) -> dict:
    """Precision, recall and F1 of every class over all examples; an unparseable completion
    predicts no class, so it lowers recall only. None where a ratio has nothing to divide."""
    per_class = {}
    for label, name in enumerate(spec.label_names):
        true_pos = sum(g == label and p == label for g, p in zip(golds, predicted))
        support = golds.count(label)
        n_predicted = predicted.count(label)
        per_class[name] = {
            "precision": _ratio(true_pos, n_predicted),
            "recall": _ratio(true_pos, support),
            # 2PR / (P + R), written so it is defined whenever the class occurs at all.
            "f1": _ratio(2 * true_pos, support + n_predicted),
            "support": support,
        }
    return per_class


def _confusion(spec: BenchmarkSpec, golds, answers) -> dict:
    """Counts of gold label x the model's parsed answer (ANSWER_NAMES)."""
    matrix = {name: dict.fromkeys(ANSWER_NAMES, 0) for name in spec.label_names}
    for gold, answer in zip(golds, answers):
        matrix[spec.label_names[gold]][ANSWER_NAMES[answer]] += 1  # UNPARSEABLE = -1: the last name
    return matrix


def _group_members(benchmark: str, name: str, values: Sequence, n: int) -> dict[str, list[int]]:
    """Group value -> indices of the examples carrying it (an example may carry several)."""
    if len(values) != n:
        raise ValueError(f"{benchmark}: group {name!r} has {len(values)} values for {n} examples; "
                         "give one value (str, list of str or None) per example.")
    members: dict[str, list[int]] = {}
    for i, value in enumerate(values):
        carried = [] if value is None else [value] if isinstance(value, str) else list(value)
        for label in dict.fromkeys(carried):  # a label listed twice still counts the example once
            members.setdefault(str(label), []).append(i)
    return members


def _checked_golds(spec: BenchmarkSpec, golds: Sequence[int]) -> list[int]:
    valid = range(len(spec.label_names))
    checked = []
    for i, gold in enumerate(golds):
        if isinstance(gold, bool) or not hasattr(gold, "__index__") or int(gold) not in valid:
            raise ValueError(
                f"{spec.name}: gold label {gold!r} of example {i} is not a label id of the set; expected "
                + ", ".join(f"{k} ({name})" for k, name in enumerate(spec.label_names)) + "."
            )
        checked.append(int(gold))
    return checked


def _ratio(numerator: int, denominator: int) -> float | None:
    return round(numerator / denominator, DIGITS) if denominator else None


# --- per-example predictions ---------------------------------------------------------------------

def prediction_records(
    benchmark: str,
    ids: Sequence,
    golds: Sequence[int],
    completions: Sequence[str],
    groups: Mapping[str, Sequence] | None = None,
) -> list[dict]:
    """One record per example for `write_predictions`: id, label, prediction (parsed answer as a
    prompts.LABELS id, -1 unparseable), correct (under the set's rule), completion, and the value
    of every group."""
    spec = benchmark_spec(benchmark)
    groups = groups or {}
    lengths = {"ids": len(ids), "golds": len(golds), "completions": len(completions),
               **{f"group {name!r}": len(values) for name, values in groups.items()}}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"{benchmark}: one value per example expected everywhere, got lengths {lengths}.")
    records = []
    for i, (example_id, gold, completion) in enumerate(zip(ids, golds, completions)):
        records.append({
            "id": example_id,
            "label": int(gold),
            "prediction": extract_label(completion),
            "correct": is_correct(spec, int(gold), completion),
            "completion": completion,
            **{name: values[i] for name, values in groups.items()},
        })
    return records


def write_predictions(path: str | os.PathLike, records: Iterable[dict]) -> None:
    """Write records as gzip-compressed JSON lines, atomically: readers see the old file or the
    whole new one. The gzip header carries no time or name, so equal records give equal bytes."""
    with atomic_open(path, "wb") as raw:
        with gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as compressed:
            for record in records:
                compressed.write((json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8"))


def read_predictions(path: str | os.PathLike) -> list[dict]:
    """The records of a predictions file (gzip or plain JSON lines)."""
    return [record for _, record in json_lines(path)]


# --- re-scoring --------------------------------------------------------------------------------------

def score_file(path: str | os.PathLike, benchmark: str) -> dict:
    """Score a JSON-lines file (plain or gzip) of completions under `benchmark`'s rule.

    Each line is an object with the example's "id", its gold "label" (an id of the set, or a name:
    entailment / neutral / contradiction, for HANS entailment / non-entailment) and its
    "completion"; the fields "heuristic", "subcase" and "categories", when the lines carry them,
    are score groups. A predictions file of this package is such a file. Raises ValueError naming
    the file and line of the first bad one."""
    spec = benchmark_spec(benchmark)
    golds, completions = [], []
    groups: dict[str, list] = {}
    first_line_of: dict = {}
    for number, record in json_lines(path):
        where = f"{path}, line {number}"
        missing = [field for field in ("id", "label", "completion") if field not in record]
        if missing:
            raise ValueError(f"{where}: no {', '.join(map(repr, missing))}; every line needs \"id\", "
                             "\"label\" and \"completion\".")
        example_id = record["id"]
        if not isinstance(example_id, (str, int)) or isinstance(example_id, bool):
            raise ValueError(f"{where}: id {example_id!r} is not a string or integer.")
        if example_id in first_line_of:
            raise ValueError(f"{where}: id {example_id!r} already on line {first_line_of[example_id]}; "
                             "each example must appear once.")
        first_line_of[example_id] = number
        if not isinstance(record["completion"], str):
            raise ValueError(f"{where}: completion is {type(record['completion']).__name__}, expected the "
                             "generated text as a string.")
        carried = [field for field in GROUP_FIELDS if field in record]
        if not golds:
            groups = {field: [] for field in carried}
        elif carried != list(groups):
            raise ValueError(f"{where}: group fields {carried} differ from the first line's {list(groups)}; "
                             "every line must carry the same ones.")
        golds.append(_gold_id(spec, record["label"], where))
        completions.append(record["completion"])
        for field in carried:
            groups[field].append(record[field])
    if not golds:
        raise ValueError(f"{path}: no examples; expected one JSON object per line.")
    return score_benchmark(benchmark, golds, completions, groups or None)


def _gold_id(spec: BenchmarkSpec, label, where: str) -> int:
    """A gold label given as an id or a name, as an id of the set."""
    if isinstance(label, str):
        name = label.strip().lower().replace("_", "-")
        if name in spec.label_names:
            return spec.label_names.index(name)
    elif isinstance(label, int) and not isinstance(label, bool) and 0 <= label < len(spec.label_names):
        return label
    expected = ", ".join(f"{k} or {name!r}" for k, name in enumerate(spec.label_names))
    raise ValueError(f"{where}: label {label!r} is not a label of {spec.name}; expected {expected}.")


# --- command line ----------------------------------------------------------------------------------

def format_entry(benchmark: str, entry: dict) -> str:
    """A few readable lines of an eval entry: accuracies, rates, per class and per group."""
    def num(value):
        return "n/a" if value is None else f"{value:.4f}"

    if entry["scoring"] == HANS:
        rule = "HANS: only an entailment answer predicts entailment, nothing dropped"
        strict_rule = "unparseable = wrong, not non-entailment"
    else:
        rule, strict_rule = "paper: unparseable dropped", "unparseable = wrong"
    lines = [
        f"{benchmark}: {entry['n']} examples",
        f"  accuracy          {num(entry['accuracy'])}  ({rule})",
        f"  accuracy strict   {num(entry['accuracy_strict'])}  ({strict_rule})",
        f"  unparseable rate  {num(entry['unparseable_rate'])}  ({entry['n'] - entry['n_parsed']} of {entry['n']})",
        f"  format rate       {num(entry['format_rate'])}",
        f"  {'class':<24}{'precision':>10}{'recall':>10}{'f1':>10}{'support':>9}",
    ]
    for name, stats in entry["per_class"].items():
        lines.append(f"    {name:<22}{num(stats['precision']):>10}{num(stats['recall']):>10}"
                     f"{num(stats['f1']):>10}{stats['support']:>9}")
    for key, table in entry.items():
        if key.startswith("per_") and key != "per_class":
            lines.append(f"  {key[4:]:<24}{'accuracy':>10}{'strict':>10}{'n':>10}{'parsed':>9}")
            for value, stats in table.items():
                lines.append(f"    {value:<22}{num(stats['accuracy']):>10}{num(stats['accuracy_strict']):>10}"
                             f"{stats['n']:>10}{stats['n_parsed']:>9}")
    return "\n".join(lines)


def score_command(path: Path, benchmark: str, out: Path | None = None) -> int:
    """`python -m nli_grpo.evaluate --score FILE.jsonl --benchmark NAME [--out RESULT.json]`:
    score a file of completions, print the metrics, write the eval entry as JSON to `out`.
    Returns 0, 1 when the file cannot be scored, 2 for an unknown benchmark."""
    if benchmark not in BENCHMARKS:
        print(f"error: unknown benchmark {benchmark!r}; valid names: {', '.join(BENCHMARKS)}", file=sys.stderr)
        return 2
    try:
        entry = score_file(path, benchmark)
    except (OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(format_entry(benchmark, entry))
    if out:
        atomic_write_json(out, entry)
        print(f"wrote {out}")
    return 0
