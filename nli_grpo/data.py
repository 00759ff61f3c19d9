"""Dataset registry: every NLI set of the paper, loadable from the hub or from local files.

Each evaluation set is a `BenchmarkSpec` in `BENCHMARKS`; the ANLI training rounds used to
bootstrap the hard-example pool are in `TRAIN_SOURCES`. `load_benchmark` / `load_train_source`
turn one of them into a `BenchmarkData`: a `datasets.Dataset` with the columns `id`, `premise`,
`hypothesis`, `label` (plus `heuristic`, `subcase` for HANS and `categories` for the diagnostic
sets), whatever the source's own schema.

Where the rows come from, first match wins:
1. `files[name]` (or `files[<shared stem>]`, see below): an explicit path;
2. a file in `local_dir` whose stem is the set's name or the stem of the file it shares with
   other sets, with extension .jsonl, .json, .parquet, .tsv or .csv (tried in that order);
3. the hub, `datasets.load_dataset(hub_id, hub_config, split=split)`, when `hub=True`.

Local file names (stems; a file holding only one set may always be named after that set):

    anli_r1, anli_r2, anli_r3           facebook/anli plain_text test_r1 / test_r2 / test_r3
    anli_train_r1, anli_train_r2, anli_train_r3
                                        facebook/anli plain_text train_r1 / train_r2 / train_r3
    snli                                stanfordnlp/snli plain_text test
    mnli_mm                             nyu-mll/glue mnli validation_mismatched
    hans                                jhu-cogsci/hans plain_text validation: all 30k rows; serves
                                        hans_lexical_overlap, hans_subsequence, hans_constituent
    counter_nli                         tasksource/counterfactually-augmented-snli test
    glue_diagnostics                    pietrolesci/glue_diagnostics test: all 1104 rows; serves
                                        diag_knowledge, diag_logic, diag_lexical_semantics,
                                        diag_predicate_argument

Local files are in the hub's schema (the columns `load_dataset` gives for that hub set), labels as
ids or as names ("entailment", "neutral", "contradiction"; HANS "entailment", "non-entailment").
Column names are matched exactly first, then ignoring case and punctuation, so the original
GLUE diagnostic TSV ("Premise", "Lexical Semantics", ...) loads too. `local_dir="samples"` means
the small hand-written set shipped in `nli_grpo/samples/` (see its README), which covers every
set and is what smoke runs and tests use.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from nli_grpo.prompts import LABELS

if TYPE_CHECKING:  # imported where used: `datasets` costs 0.3 s, and the aggregator only needs names
    import datasets

#: The 13 evaluation sets, in the order tables show them (DESIGN.md contract).
BENCHMARK_NAMES = (
    "anli_r1", "anli_r2", "anli_r3", "snli", "mnli_mm",
    "hans_lexical_overlap", "hans_subsequence", "hans_constituent", "counter_nli",
    "diag_knowledge", "diag_logic", "diag_lexical_semantics", "diag_predicate_argument",
)
#: The paper's 11 adversarial sets (ANLI x3, Diagnostic x4, HANS x3, Counter-NLI).
ADVERSARIAL_BENCHMARKS = tuple(b for b in BENCHMARK_NAMES if b not in ("snli", "mnli_mm"))
STANDARD_BENCHMARKS = ("snli", "mnli_mm")

logger = logging.getLogger(__name__)

THREE_WAY = "three_way"
HANS = "hans"
#: HANS label names in id order (the hub's ClassLabel): 0 entailment, 1 non-entailment.
HANS_LABELS = ("entailment", "non-entailment")
#: Label values that mean "no gold label" (SNLI's -1 on the hub, "-" in the original files).
NO_GOLD = (-1, "-", "")

#: GLUE diagnostic coarse categories -> the hub column listing a row's fine-grained phenomena in
#: that category (empty when the row is not in it). A row may carry several categories.
#: The exact spelling of these columns in pietrolesci/glue_diagnostics could not be checked from
#: here (code using that set reads `logic`); columns are matched ignoring case and punctuation,
#: so "lexical_semantics", "lexical semantics" and the original TSV's "Lexical Semantics" all work.
DIAGNOSTIC_CATEGORY_COLUMNS = {
    "lexical_semantics": "lexical_semantics",
    "predicate_argument": "predicate_argument_structure",
    "logic": "logic",
    "knowledge": "knowledge",
}

LOCAL_EXTENSIONS = (".jsonl", ".json", ".parquet", ".tsv", ".csv")
SAMPLES = "samples"


@dataclass(frozen=True)
class BenchmarkSpec:
    """Where one NLI set lives and how its rows become (id, premise, hypothesis, label)."""

    name: str
    """Registry key, and the stem of a local file that holds only this set."""
    hub_id: str | None
    """Hugging Face hub dataset id; None for a set that only exists locally (the hard pool)."""
    hub_config: str | None
    """Hub config (subset) name; None for the dataset's default config."""
    split: str
    """Hub split."""
    expected_n: int
    """Rows left in the full set after filtering and dropping rows without gold (the paper's n)."""
    scoring: str = THREE_WAY
    """THREE_WAY (labels 0/1/2 in `prompts.LABELS` order) or HANS (0 entailment, 1 non-entailment;
    a prediction counts as entailment only when it parses to entailment)."""
    shared_file: str | None = None
    """Stem of a local file that holds this set together with others (e.g. "hans"), or None."""
    premise_column: str = "premise"
    """Source column with the premise."""
    hypothesis_column: str = "hypothesis"
    """Source column with the hypothesis."""
    label_column: str = "label"
    """Source column with the gold label (ids, ClassLabel ids or label names)."""
    id_column: str | None = None
    """Source column with a stable row id (ANLI's uid); None: the id is f"{name}-{i}", i the
    row's position in the source file or hub split."""
    heuristic: str | None = None
    """HANS only: keep the rows whose `heuristic` column equals this."""
    category: str | None = None
    """Diagnostic only: keep the rows that carry this coarse category (a key of
    DIAGNOSTIC_CATEGORY_COLUMNS)."""

    @property
    def label_names(self) -> tuple[str, ...]:
        """Label names in id order."""
        return HANS_LABELS if self.scoring == HANS else LABELS

    @property
    def local_stems(self) -> tuple[str, ...]:
        """File stems a local copy of this set may have, most specific first."""
        return (self.name,) + ((self.shared_file,) if self.shared_file else ())

    @property
    def hub_location(self) -> str:
        """The hub id, config and split, as one readable string."""
        return f"{self.hub_id} (config {self.hub_config or 'default'}, split {self.split})"


def _anli(name: str, split: str, expected_n: int) -> BenchmarkSpec:
    return BenchmarkSpec(name, "facebook/anli", "plain_text", split, expected_n, id_column="uid")


def _hans(heuristic: str) -> BenchmarkSpec:
    return BenchmarkSpec(
        f"hans_{heuristic}", "jhu-cogsci/hans", "plain_text", "validation", 10000,
        scoring=HANS, shared_file="hans", heuristic=heuristic,
    )


def _diagnostic(category: str, expected_n: int) -> BenchmarkSpec:
    return BenchmarkSpec(
        f"diag_{category}", "pietrolesci/glue_diagnostics", None, "test", expected_n,
        shared_file="glue_diagnostics", category=category,
    )


_BENCHMARK_SPECS = (
    _anli("anli_r1", "test_r1", 1000),
    _anli("anli_r2", "test_r2", 1000),
    _anli("anli_r3", "test_r3", 1200),
    BenchmarkSpec("snli", "stanfordnlp/snli", "plain_text", "test", 9824),
    BenchmarkSpec("mnli_mm", "nyu-mll/glue", "mnli", "validation_mismatched", 9832),
    _hans("lexical_overlap"),
    _hans("subsequence"),
    _hans("constituent"),
    # The test split is exactly the revised-premise (800) plus revised-hypothesis (800) pairs of
    # Kaushik et al. (their NLI/revised_combined/test.tsv: 400 original test pairs x 4 edits); it
    # holds no original SNLI pairs and no column telling the two revision types apart, so the
    # whole split is the benchmark, as in the authors' code (which used all 1600 rows).
    BenchmarkSpec(
        "counter_nli", "tasksource/counterfactually-augmented-snli", None, "test", 1600,
        premise_column="sentence1", hypothesis_column="sentence2", label_column="gold_label",
    ),
    # The authors' code built "lexical semantics" from the Predicate-Argument Structure column
    # and "predicate-argument" from the Lexical Semantics column (their notebook's test_ls has
    # 424 rows, test_pas 368). Here each set is built from its own column: lexical semantics
    # 368 rows, predicate-argument structure 424.
    _diagnostic("knowledge", 284),
    _diagnostic("logic", 364),
    _diagnostic("lexical_semantics", 368),
    _diagnostic("predicate_argument", 424),
)
#: The 13 evaluation sets, keyed by benchmark name, in BENCHMARK_NAMES order.
BENCHMARKS: dict[str, BenchmarkSpec] = {spec.name: spec for spec in _BENCHMARK_SPECS}
assert tuple(BENCHMARKS) == BENCHMARK_NAMES

#: ANLI training rounds, the raw material of the hard-example pool (nli_grpo.bootstrap).
TRAIN_SOURCES: dict[str, BenchmarkSpec] = {
    spec.name: spec for spec in (
        _anli("anli_train_r1", "train_r1", 16946),
        _anli("anli_train_r2", "train_r2", 45460),
        _anli("anli_train_r3", "train_r3", 100459),
        # The paper's private pool of ANLI train items hard for Qwen2.5-7B, rebuilt by
        # `python -m nli_grpo.bootstrap` in the ANLI schema (plus its sampling statistics).
        BenchmarkSpec("anli_hard", None, None, "train", 0, id_column="uid"),
    )
}


class DataError(ValueError):
    """A dataset could not be found or does not have the expected schema."""


class UnknownDatasetError(DataError):
    """The requested name is not in the registry."""


class DataUnavailableError(DataError):
    """No local file was found and the hub was not allowed, or failed."""


class DataSchemaError(DataError):
    """The source lacks a column this set needs, or holds a label that cannot be read."""


@dataclass
class BenchmarkData:
    """One loaded set, in the common schema."""

    name: str
    """Registry name."""
    spec: BenchmarkSpec
    """Where it came from and how it is scored."""
    dataset: datasets.Dataset
    """Columns id (str), premise, hypothesis, label (int); HANS also heuristic and subcase;
    diagnostic sets also categories (list of the coarse categories the row carries)."""
    n_dropped: int
    """Rows of the selected subset dropped because they have no gold label."""
    source: str
    """The local file path, or the hub id, config and split, actually read."""

    def __len__(self) -> int:
        return len(self.dataset)


def samples_dir() -> Path:
    """The folder of hand-written sample files shipped with the package."""
    return Path(__file__).parent / SAMPLES


def load_benchmark(
    name: str,
    *,
    local_dir: str | Path | None = None,
    files: Mapping[str, str | Path] | None = None,
    hub: bool = True,
    limit: int | None = None,
) -> BenchmarkData:
    """Load evaluation set `name` (one of BENCHMARK_NAMES) in the common schema.

    `files` maps a set name (or a shared stem such as "hans") to a file; `local_dir` is a folder
    of files named as in the module docstring ("samples" means `samples_dir()`); the hub is used
    last, and only when `hub` is true. `limit` keeps the first rows after filtering."""
    return _load(_lookup(name, BENCHMARKS, "benchmark"), local_dir, files, hub, limit)


def load_train_source(
    name: str,
    *,
    local_dir: str | Path | None = None,
    files: Mapping[str, str | Path] | None = None,
    hub: bool = True,
    limit: int | None = None,
) -> BenchmarkData:
    """Load training source `name` (one of TRAIN_SOURCES) in the common schema; the keywords
    work as in `load_benchmark`."""
    return _load(_lookup(name, TRAIN_SOURCES, "training source"), local_dir, files, hub, limit)


def _lookup(name: str, registry: Mapping[str, BenchmarkSpec], kind: str) -> BenchmarkSpec:
    if name not in registry:
        raise UnknownDatasetError(
            f"Unknown {kind} {name!r}; valid names: {', '.join(registry)}."
        )
    return registry[name]


def _load(
    spec: BenchmarkSpec,
    local_dir: str | Path | None,
    files: Mapping[str, str | Path] | None,
    hub: bool,
    limit: int | None,
) -> BenchmarkData:
    import datasets

    if limit is not None and limit < 1:
        raise ValueError(f"limit must be a positive number of rows or None, got {limit!r}.")
    raw, source = _read_source(spec, local_dir, files, hub)
    table, n_dropped = _standardise(raw, spec, source)
    logger.info("%s: %d rows from %s; dropped %d without a gold label.",
                spec.name, len(table), source, n_dropped)
    # A full local copy may legitimately differ (a newer release, a subset the user made); the
    # hub's copy should match the paper, and a mismatch there means the hub set changed.
    if source == spec.hub_location and len(table) != spec.expected_n:
        logger.warning("%s: the hub gave %d rows, the paper used %d.",
                       spec.name, len(table), spec.expected_n)
    if limit is not None:
        table = table.head(limit)
    dataset = datasets.Dataset.from_pandas(table, features=_features(spec), preserve_index=False)
    return BenchmarkData(spec.name, spec, dataset, n_dropped, source)


def _features(spec: BenchmarkSpec) -> datasets.Features:
    """The common schema, fixed so that an empty selection still has the right column types."""
    import datasets

    text = datasets.Value("string")
    features = {"id": text, "premise": text, "hypothesis": text, "label": datasets.Value("int64")}
    if spec.scoring == HANS:
        features |= {"heuristic": text, "subcase": text}
    if spec.category is not None:
        features["categories"] = datasets.Sequence(text)
    return datasets.Features(features)


def _read_source(
    spec: BenchmarkSpec,
    local_dir: str | Path | None,
    files: Mapping[str, str | Path] | None,
    hub: bool,
) -> tuple[datasets.Dataset, str]:
    """The raw rows and where they came from: an explicit file, a local folder, or the hub."""
    import datasets

    explicit = next((files[stem] for stem in spec.local_stems if files and stem in files), None)
    if explicit is not None:
        path = Path(explicit)
        if not path.is_file():
            raise DataUnavailableError(
                f"{spec.name}: the file given for it, {path}, does not exist. Fix the path, or "
                f"remove the entry to fall back to the local folder and the hub."
            )
        return _read_file(path), str(path)

    names = [f"{stem}{ext}" for stem in spec.local_stems for ext in LOCAL_EXTENSIONS]
    if local_dir is not None:
        folder = samples_dir() if str(local_dir) == SAMPLES else Path(local_dir)
        for path in (folder / name for name in names):
            if path.is_file():
                return _read_file(path), str(path)
        looked_for = f"none of {', '.join(names)} is in {folder}"
    else:
        looked_for = f"no local folder was given (it would need one of {', '.join(names)})"

    fix = (
        f"Point data.local_dir at a folder holding one of these files in the schema of "
        f"{spec.hub_location}"
    )
    if spec.hub_id is None:
        raise DataUnavailableError(
            f"No data for {spec.name}: {looked_for}. It is not on the hub: build it with "
            f"`python -m nli_grpo.bootstrap --out DIR/{spec.name}.jsonl`, then set data.local_dir=DIR "
            f"(or data.files.{spec.name}=PATH)."
        )
    if not hub:
        raise DataUnavailableError(
            f"No data for {spec.name}: {looked_for}, and the hub is not allowed. "
            f"{fix}, or allow the hub."
        )
    try:
        raw = datasets.load_dataset(spec.hub_id, spec.hub_config, split=spec.split)
    except Exception as error:  # network, auth or hub layout: all end the same way for the user
        raise DataUnavailableError(
            f"No data for {spec.name}: {looked_for}, and loading it from the hub failed "
            f"({type(error).__name__}: {error}). {fix}, or fix access to the hub."
        ) from error
    return raw, spec.hub_location


def _read_file(path: Path) -> datasets.Dataset:
    """A local file through the matching `datasets` builder."""
    import datasets

    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        return datasets.load_dataset("json", data_files=str(path), split="train")
    if suffix == ".parquet":
        return datasets.load_dataset("parquet", data_files=str(path), split="train")
    if suffix in (".tsv", ".csv"):
        # Only empty cells are missing: pandas would otherwise read a hypothesis such as "NA"
        # or "null" as a missing value.
        return datasets.load_dataset(
            "csv", data_files=str(path), split="train",
            delimiter="\t" if suffix == ".tsv" else ",", keep_default_na=False, na_values=[""],
        )
    raise DataError(f"{path}: unsupported file type; use one of {', '.join(LOCAL_EXTENSIONS)}.")


def _standardise(
    raw: datasets.Dataset, spec: BenchmarkSpec, source: str
) -> tuple[pd.DataFrame, int]:
    """The selected rows in the common schema, and how many were dropped for lack of gold."""
    column = _column_finder(raw.column_names, spec, source)
    frame = raw.to_pandas()  # the index is the row's position in the source: it makes the ids

    if spec.heuristic is not None:
        frame = frame[frame[column("heuristic")] == spec.heuristic]
    if spec.category is not None:
        carries = pd.DataFrame({
            category: frame[column(name)].map(_non_empty)
            for category, name in DIAGNOSTIC_CATEGORY_COLUMNS.items()
        })
        frame, carries = frame[carries[spec.category]], carries[carries[spec.category]]

    class_names = _class_label_names(raw.features.get(column(spec.label_column)))
    labels = frame[column(spec.label_column)].map(
        lambda value: _label_id(value, spec, class_names, source)
    )
    has_gold = labels >= 0
    frame, labels = frame[has_gold], labels[has_gold]

    ids = (
        frame[column(spec.id_column)].astype(str) if spec.id_column
        else pd.Series([f"{spec.name}-{i}" for i in frame.index], index=frame.index)
    )
    table = pd.DataFrame({
        "id": ids,
        "premise": frame[column(spec.premise_column)],
        "hypothesis": frame[column(spec.hypothesis_column)],
        "label": labels.astype("int64"),
    })
    if spec.scoring == HANS:
        table["heuristic"] = frame[column("heuristic")]
        table["subcase"] = frame[column("subcase")]
    if spec.category is not None:
        table["categories"] = [
            [category for category, carried in row.items() if carried]
            for _, row in carries[has_gold].iterrows()
        ]
    return table, int((~has_gold).sum())


def _column_finder(columns: list[str], spec: BenchmarkSpec, source: str):
    """A function from the column name the spec uses to the source's name for it: exact match
    first, then ignoring case and punctuation ("Lexical Semantics" = "lexical_semantics")."""
    by_key = {}
    for name in columns:
        by_key.setdefault(_column_key(name), name)

    def find(wanted: str) -> str:
        if wanted in columns:
            return wanted
        if _column_key(wanted) in by_key:
            return by_key[_column_key(wanted)]
        raise DataSchemaError(
            f"{source} has no column {wanted!r}, which {spec.name} needs (its columns: "
            f"{', '.join(columns)}). Local files must use the schema of {spec.hub_location}."
        )

    return find


def _column_key(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


def _non_empty(value) -> bool:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return False
    return str(value).strip() != ""


def _class_label_names(feature) -> list[str] | None:
    import datasets

    return list(feature.names) if isinstance(feature, datasets.ClassLabel) else None


def _label_id(value, spec: BenchmarkSpec, class_names: list[str] | None, source: str) -> int:
    """The label as an id of `spec.label_names`, or -1 when the row has no gold label.

    Accepts ids, ClassLabel ids (read through the feature's own names, so a different class
    order on the hub cannot shift them) and label names in any case."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return -1
    if isinstance(value, str):
        name = value.strip().lower().replace("_", "-")
        if name in NO_GOLD:
            return -1
        if name in spec.label_names:
            return spec.label_names.index(name)
    elif float(value).is_integer():
        index = int(value)
        if index in NO_GOLD:
            return -1
        if class_names is not None and 0 <= index < len(class_names):
            return _label_id(class_names[index], spec, None, source)
        if class_names is None and 0 <= index < len(spec.label_names):
            return index
    raise DataSchemaError(
        f"{source}: label {value!r} of {spec.name} is not one of {list(spec.label_names)}, their "
        f"ids 0..{len(spec.label_names) - 1}, or a no-gold marker (-1, '-')."
    )
