"""Dataset registry: every NLI set of the paper, loadable from the files its authors distributed,
from the hub, or from local files in the hub's schema.

Each evaluation set is a `BenchmarkSpec` in `BENCHMARKS`; the ANLI training rounds used to
bootstrap the hard-example pool are in `TRAIN_SOURCES`. `load_benchmark` / `load_train_source`
turn one of them into a `BenchmarkData`: a `datasets.Dataset` with the columns `id`, `premise`,
`hypothesis`, `label` (plus `heuristic`, `subcase` for HANS and `categories` for the diagnostic
sets), whatever the source's own schema.

Where the rows come from, first match wins:
1. `files[name]` (or `files[<shared stem>]`, see below): an explicit path;
2. a file in `local_dir`: named after the set or the stem of the file it shares with other sets,
   with extension .jsonl, .json, .parquet, .tsv or .csv (tried in that order), or the file as its
   authors distributed it (ORIGINAL_FILES, e.g. HANS's `heuristics_evaluation_set.txt`; found at
   any depth, so an unpacked release folder works as it is);
3. the prepared cache (`python -m nli_grpo.prepare`, nli_grpo.cache): `<cache>/data/<stem>.jsonl`;
4. the hub, `datasets.load_dataset(hub_id, hub_config, split=split)`, when `hub=True`.

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

Columns are found by role, exact name first, then ignoring case and punctuation: the premise in
`premise` or `sentence1`, the hypothesis in `hypothesis` or `sentence2`, the gold label in `label`
or `gold_label` (ids, or names: "entailment", "neutral", "contradiction", ANLI's "e"/"n"/"c",
HANS's "entailment"/"non-entailment"; "-" or -1 = no gold), a row id in `uid` or `pairID` (else
the row's position in the source), HANS's `heuristic`/`subcase`, the diagnostic categories
("Lexical Semantics", ...). So the hub schema and the original distributions both load. Text
files are read line by line: a bad line is reported with the file, the line and what was expected.
`local_dir="samples"` means the small hand-written set shipped in `nli_grpo/samples/` (see its
README), which covers every set and is what smoke runs and tests use.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import json
import logging
import math
import re
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from nli_grpo import cache
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
#: Files as their authors distributed them, per source stem: paths inside a local folder (the
#: release's own folder names tried too). `prepare --from` also recognises them by their columns.
ORIGINAL_FILES = {
    **{f"anli_r{k}": (f"R{k}/test.jsonl", f"anli_v1.0/R{k}/test.jsonl") for k in (1, 2, 3)},
    **{f"anli_train_r{k}": (f"R{k}/train.jsonl", f"anli_v1.0/R{k}/train.jsonl") for k in (1, 2, 3)},
    "snli": ("snli_1.0_test.jsonl", "snli_1.0/snli_1.0_test.jsonl"),
    "mnli_mm": ("multinli_1.0_dev_mismatched.jsonl", "multinli_1.0/multinli_1.0_dev_mismatched.jsonl"),
    "hans": ("heuristics_evaluation_set.txt",),
    "glue_diagnostics": ("diagnostic-full.tsv", "diagnostic/diagnostic-full.tsv"),
    "counter_nli": ("revised_combined/test.tsv", "NLI/revised_combined/test.tsv"),
}
#: Source columns per role, first present wins (exact name, then ignoring case and punctuation):
#: the hub schemas' names, then the original distributions' (SNLI/MNLI/HANS/Counter-NLI files).
PREMISE_COLUMNS = ("premise", "sentence1")
HYPOTHESIS_COLUMNS = ("hypothesis", "sentence2")
LABEL_COLUMNS = ("label", "gold_label")
#: A stable row id: ANLI's `uid`, the SNLI/MNLI/HANS files' `pairID`; else the row's position.
ID_COLUMNS = ("uid", "pairID")
#: ANLI's original files spell the labels with their first letter.
LABEL_LETTERS = {"e": "entailment", "n": "neutral", "c": "contradiction"}


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
    hub_revision: str | None = None
    """Hub revision to load (None: the default branch)."""
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
    def stem(self) -> str:
        """The stem of the source file the set comes from (shared by several sets, or its own)."""
        return self.shared_file or self.name

    @property
    def local_stems(self) -> tuple[str, ...]:
        """File stems a local copy of this set may have, most specific first."""
        return (self.name,) + ((self.shared_file,) if self.shared_file else ())

    @property
    def hub_location(self) -> str:
        """The hub id, config and split (and revision, when pinned), as one readable string."""
        revision = f", revision {self.hub_revision}" if self.hub_revision else ""
        return f"{self.hub_id} (config {self.hub_config or 'default'}, split {self.split}{revision})"


def _anli(name: str, split: str, expected_n: int) -> BenchmarkSpec:
    return BenchmarkSpec(name, "facebook/anli", "plain_text", split, expected_n)


def _hans(heuristic: str) -> BenchmarkSpec:
    # jhu-cogsci/hans is a loading script, which `datasets` 4+ no longer runs; the hub's parquet
    # conversion of it (branch refs/convert/parquet) loads without one. The hub cannot be reached
    # from where this was written: the original file (heuristics_evaluation_set.txt of
    # github.com/tommccoy1/hans) is the tested path.
    return BenchmarkSpec(
        f"hans_{heuristic}", "jhu-cogsci/hans", "plain_text", "validation", 10000,
        scoring=HANS, shared_file="hans", hub_revision="refs/convert/parquet", heuristic=heuristic,
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
    BenchmarkSpec("counter_nli", "tasksource/counterfactually-augmented-snli", None, "test", 1600),
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
        BenchmarkSpec("anli_hard", None, None, "train", 0),
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
    last, and only when `hub` is true. `limit` keeps a seeded sample of that many rows with the
    set's label proportions (and HANS subcases): `representative_sample`."""
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
    work as in `load_benchmark`, except that `limit` keeps the first rows (a quick look)."""
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
    raw = read_source(spec, local_dir, files, hub)
    table, n_dropped = standardise(raw, spec)
    logger.info("%s: %d rows from %s; dropped %d without a gold label.",
                spec.name, len(table), raw.source, n_dropped)
    # A full local copy may legitimately differ (a newer release, a subset the user made); the
    # hub's copy should match the paper, and a mismatch there means the hub set changed.
    if raw.source == spec.hub_location and len(table) != spec.expected_n:
        logger.warning("%s: the hub gave %d rows, the paper used %d.",
                       spec.name, len(table), spec.expected_n)
    if limit is not None:
        table = representative_sample(table, limit, spec) if spec.name in BENCHMARKS else table.head(limit)
    dataset = datasets.Dataset.from_pandas(table, features=_features(spec), preserve_index=False)
    return BenchmarkData(spec.name, spec, dataset, n_dropped, raw.source)


#: The seed of every evaluation sample (eval.limit, evaluate --limit): all cells see the same rows.
SAMPLE_SEED = 0


def representative_sample(table: pd.DataFrame, limit: int, spec: BenchmarkSpec, seed: int = SAMPLE_SEED) -> pd.DataFrame:
    """`limit` rows of a set in the common schema, in source order, drawn at random (seeded):
    each label gets its share of the rows, and on HANS each label's share is split among its
    subcases the same way (`_apportion`). Source files are often ordered (HANS by subcase), so
    their first rows would be one label. The whole table when it is not larger."""
    import numpy as np

    if limit >= len(table):
        return table
    rng = np.random.default_rng(seed)
    chosen = []
    by_label = table.groupby("label", sort=True).indices
    for label, label_rows in _apportion({k: len(v) for k, v in by_label.items()}, limit).items():
        part = table.iloc[by_label[label]]
        strata = part.groupby("subcase", sort=True).indices if spec.scoring == HANS else {label: np.arange(len(part))}
        for key, quota in _apportion({k: len(v) for k, v in strata.items()}, label_rows).items():
            chosen += [int(by_label[label][p]) for p in rng.choice(strata[key], quota, replace=False)]
    return table.iloc[sorted(chosen)]


def _apportion(sizes: dict, total: int) -> dict:
    """`total` split in proportion to `sizes` (largest remainders; ties to the larger group,
    then the first key)."""
    whole = sum(sizes.values())
    exact = {key: total * size / whole for key, size in sizes.items()}
    quota = {key: int(share) for key, share in exact.items()}
    for key in sorted(exact, key=lambda k: (quota[k] - exact[k], -sizes[k]))[: total - sum(quota.values())]:
        quota[key] += 1
    return quota


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


def fingerprint(dataset: datasets.Dataset) -> dict:
    """What a number was computed on: the sha256 of the rows' content (premise, hypothesis, label,
    and HANS subcase / diagnostic categories where present; not the ids, which depend on the
    source's format) in row order, and the row count. Two sources holding the same examples in
    the same order give the same fingerprint; a changed, added or dropped row changes it."""
    digest = hashlib.sha256()
    columns = [c for c in ("premise", "hypothesis", "label", "heuristic", "subcase", "categories") if c in dataset.column_names]
    for row in dataset.select_columns(columns):
        digest.update(json.dumps([row[c] for c in columns], ensure_ascii=False).encode())
        digest.update(b"\n")
    return {"sha256": digest.hexdigest(), "rows": len(dataset)}


# --------------------------------------------------------------------------- where the rows come from
@dataclass
class RawRows:
    """A source's rows as read, before the common schema."""

    frame: pd.DataFrame
    """Every column of the source, one row per example (index = position in the source)."""
    source: str
    """The file path, or the hub id, config and split, actually read."""
    lines: list[int] | None = None
    """The file line of each row (text files), for error messages."""
    class_names: dict[str, list[str]] = field(default_factory=dict)
    """ClassLabel names of the columns that have them (hub and `datasets` parquet files)."""

    def where(self, position: int) -> str:
        """`file, line N` (or `source, row N`) of the row at `position`."""
        if self.lines is not None:
            return f"{self.source}, line {self.lines[position]}"
        return f"{self.source}, row {position + 1}"


def local_candidates(spec: BenchmarkSpec) -> list[str]:
    """File names (relative to a local folder) that may hold the set, in the order they are tried."""
    names = [f"{stem}{ext}" for stem in spec.local_stems for ext in LOCAL_EXTENSIONS]
    return names + [name for stem in spec.local_stems for name in ORIGINAL_FILES.get(stem, ())]


def local_file(spec: BenchmarkSpec, local_dir: str | Path | None, files: Mapping[str, str | Path] | None) -> Path | None:
    """The local file that would serve the set: the explicit file, else one in the local folder,
    else the prepared cache's; None when only the hub can."""
    explicit = next((files[stem] for stem in spec.local_stems if files and stem in files), None)
    if explicit is not None:
        return Path(explicit)
    if local_dir is not None:
        folder = samples_dir() if str(local_dir) == SAMPLES else Path(local_dir)
        found = next((folder / name for name in local_candidates(spec) if (folder / name).is_file()), None)
        if found is None:  # an original release unpacked deeper (hans/..., glue_data/diagnostic/...)
            found = next((path for stem in spec.local_stems for name in ORIGINAL_FILES.get(stem, ())
                          for path in sorted(folder.rglob(Path(name).name)) if path.as_posix().endswith("/" + name)), None)
        if found is not None:
            return found
    return cache.prepared_data(spec.stem)


def read_source(
    spec: BenchmarkSpec,
    local_dir: str | Path | None,
    files: Mapping[str, str | Path] | None,
    hub: bool,
) -> RawRows:
    """The raw rows and where they came from: an explicit file, a local folder, the prepared
    cache, or the hub."""
    import datasets

    explicit = next((files[stem] for stem in spec.local_stems if files and stem in files), None)
    if explicit is not None and not Path(explicit).is_file():
        raise DataUnavailableError(
            f"{spec.name}: the file given for it, {explicit}, does not exist. Fix the path, or "
            f"remove the entry to fall back to the local folder and the hub."
        )
    path = local_file(spec, local_dir, files)
    if path is not None:
        return read_file(path)

    names = local_candidates(spec)
    if local_dir is not None:
        folder = samples_dir() if str(local_dir) == SAMPLES else Path(local_dir)
        looked_for = f"none of {', '.join(names)} is in {folder} or the prepared cache {cache.data_dir()}"
    else:
        looked_for = (f"no local folder was given (it would need one of {', '.join(names)}) and the prepared cache "
                      f"{cache.data_dir()} has no {spec.stem}.jsonl")
    prepare = "run `python -m nli_grpo.prepare` on a machine that reaches the hub (or `--from DIR` with the original files)"
    if spec.hub_id is None:
        raise DataUnavailableError(
            f"No data for {spec.name}: {looked_for}. It is not on the hub: build it with "
            f"`python -m nli_grpo.bootstrap --out DIR/{spec.name}.jsonl`, then set data.local_dir=DIR "
            f"(or data.files.{spec.name}=PATH)."
        )
    if not hub:
        raise DataUnavailableError(
            f"No data for {spec.name}: {looked_for}, and the hub is not allowed. Point data.local_dir at a folder "
            f"holding one of these files (the original distribution, or the schema of {spec.hub_location}), {prepare}, "
            "or allow the hub."
        )
    try:
        raw = datasets.load_dataset(spec.hub_id, spec.hub_config, split=spec.split, revision=spec.hub_revision)
    except Exception as error:  # network, auth or hub layout: all end the same way for the user
        raise DataUnavailableError(
            f"No data for {spec.name}: {looked_for}, and loading it from the hub failed "
            f"({type(error).__name__}: {error}). Point data.local_dir at the original files, {prepare}, "
            "or fix access to the hub."
        ) from error
    class_names = {name: list(feature.names) for name, feature in raw.features.items()
                   if isinstance(feature, datasets.ClassLabel)}
    return RawRows(raw.to_pandas(), spec.hub_location, None, class_names)


def read_file(path: Path) -> RawRows:
    """A local file's rows: JSON lines (.jsonl, or .json holding lines or one array), tab- or
    comma-separated text with a header (.tsv, .txt, .csv), or parquet. Text files are read line by
    line, so that what is wrong is reported with the file and the line."""
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        frame, lines = _read_json(path)
    elif suffix in (".tsv", ".txt", ".csv"):
        frame, lines = _read_delimited(path, "," if suffix == ".csv" else "\t")
    elif suffix == ".parquet":
        return _read_parquet(path)
    else:
        raise DataError(f"{path}: unsupported file type; use one of {', '.join(LOCAL_EXTENSIONS)} (or .txt, tab-separated).")
    if frame.empty:
        raise DataSchemaError(f"{path} is empty: no rows to read (an interrupted copy or download?).")
    return RawRows(frame, str(path), lines)


def _read_json(path: Path) -> tuple[pd.DataFrame, list[int] | None]:
    text = path.read_text(encoding="utf-8") if path.suffix.lower() == ".json" else ""
    if text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as err:
            raise DataSchemaError(f"{path}, line {err.lineno}: not valid JSON ({err.msg}); the file may be truncated.") from None
        return pd.DataFrame.from_records(rows), None
    rows, lines = [], []
    for number, row in json_lines(path):
        rows.append(row)
        lines.append(number)
    return pd.DataFrame.from_records(rows), lines


def json_lines(path: str | Path) -> Iterator[tuple[int, dict]]:
    """(line number, object) for every non-blank line of a JSON-lines file, plain or gzip (known
    by its magic bytes, so a misnamed file still reads). Raises DataSchemaError (a ValueError)
    naming the file and the line of the first bad one."""
    with open(path, "rb") as probe:
        gzipped = probe.read(2) == b"\x1f\x8b"
    with (gzip.open if gzipped else open)(path, "rt", encoding="utf-8") as lines:
        try:
            for number, line in enumerate(lines, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise DataSchemaError(f"{path}, line {number}: not valid JSON ({err.msg}); expected one JSON object per "
                                          "line (the file may be truncated).") from None
                if not isinstance(record, dict):
                    raise DataSchemaError(f"{path}, line {number}: a JSON {type(record).__name__}, expected a JSON object "
                                          "per line.")
                yield number, record
        except (EOFError, gzip.BadGzipFile, zlib.error) as err:
            raise DataSchemaError(f"{path}: the gzip stream is damaged or cut short ({err}); write it again.") from None


def _read_delimited(path: Path, delimiter: str) -> tuple[pd.DataFrame, list[int]]:
    """Every field as text (only an empty cell is missing: a hypothesis "NA" is text), and each
    row's line. The NLI releases differ in how a tab-separated file holds a quote: Kaushik et
    al.'s (Counter-NLI) were written by a CSV writer, a field holding a quote enclosed in quotes
    and the inner ones doubled (`"... saying ""Politie"" ..."`); HANS's and GLUE's were written
    raw, a quote being text. So a .tsv/.txt file is read as CSV when all of it parses so (every
    record on one line, as wide as the header), else again with quotes as text. The one case
    this cannot tell apart: a raw file whose field is a whole quotation (`"Stop!"`) loses its
    two quotes, as a CSV reader would take them."""
    if delimiter != "\t":
        return _parse_delimited(path, delimiter, csv.QUOTE_MINIMAL)
    try:
        return _parse_delimited(path, delimiter, csv.QUOTE_MINIMAL, strict=True)
    except (csv.Error, _NotCsvQuoted):
        return _parse_delimited(path, delimiter, csv.QUOTE_NONE)


class _NotCsvQuoted(Exception):
    """A tab-separated file whose quotes do not parse as CSV quoting (read them as text)."""


def _parse_delimited(path: Path, delimiter: str, quoting: int, strict: bool = False) -> tuple[pd.DataFrame, list[int]]:
    """The rows of a delimited file under one quoting rule. `strict`: raise _NotCsvQuoted (or
    csv.Error) at the first row that does not fit it, instead of naming the bad line."""
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.reader(handle, delimiter=delimiter, quoting=quoting, strict=strict)
        header = next(reader, None)
        if not header:
            raise DataSchemaError(f"{path} is empty: expected a header line naming the columns.")
        rows, lines = [], []
        last_line = reader.line_num
        for row in reader:
            spans_lines, last_line = reader.line_num - last_line > 1, reader.line_num
            if strict and (spans_lines or (len(row) != len(header) and any(cell.strip() for cell in row))):
                raise _NotCsvQuoted(f"{path}, line {reader.line_num}")
            if not any(cell.strip() for cell in row):
                continue
            if len(row) != len(header):
                raise DataSchemaError(
                    f"{path}, line {reader.line_num}: expected {len(header)} fields like the header, found {len(row)} "
                    "(a truncated line, or a stray separator inside a field?).")
            rows.append([cell if cell != "" else None for cell in row])
            lines.append(reader.line_num)
    return pd.DataFrame(rows, columns=header), lines


def _read_parquet(path: Path) -> RawRows:
    """Through `datasets`, so that ClassLabel names written with the file are kept."""
    import datasets

    raw = datasets.load_dataset("parquet", data_files=str(path), split="train")
    class_names = {name: list(feature.names) for name, feature in raw.features.items()
                   if isinstance(feature, datasets.ClassLabel)}
    if len(raw) == 0:
        raise DataSchemaError(f"{path} is empty: no rows to read.")
    return RawRows(raw.to_pandas(), str(path), None, class_names)


# --------------------------------------------------------------------------- original files and the prepared cache
#: Columns that tell an original distribution file apart when its name does not (checked in order).
_RECOGNISED_BY_COLUMNS = (
    ("hans", ("heuristic", "subcase", "template")),
    ("glue_diagnostics", ("lexical semantics", "predicate-argument structure", "logic", "knowledge")),
    ("mnli_mm", ("genre", "pairID", "gold_label")),
    ("snli", ("captionID", "pairID", "gold_label")),
    ("counter_nli", ("sentence1", "sentence2", "gold_label")),
)


def source_specs() -> dict[str, BenchmarkSpec]:
    """One spec per source stem (the first set that reads it): how to read the whole file."""
    specs: dict[str, BenchmarkSpec] = {}
    for spec in (*BENCHMARKS.values(), *TRAIN_SOURCES.values()):
        if spec.hub_id is not None:
            specs.setdefault(spec.stem, spec)
    return specs


def recognise(path: Path, folder: Path) -> str | None:
    """The source stem of a file in an original distribution (or in a hub schema), by its path
    inside `folder` (ORIGINAL_FILES, `<stem>.<ext>`), else by its columns; None when it is none
    of the paper's sets (e.g. ANLI's dev files)."""
    relative = path.relative_to(folder).as_posix()
    for stem, names in ORIGINAL_FILES.items():
        if any(relative == name or relative.endswith("/" + name) for name in names):
            return stem
    if path.stem in source_specs() and path.suffix.lower() in LOCAL_EXTENSIONS:
        return path.stem
    if path.suffix.lower() not in (*LOCAL_EXTENSIONS, ".txt"):
        return None
    try:
        columns = {_column_key(c) for c in _header(path)}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, DataError):
        return None
    for stem, needed in _RECOGNISED_BY_COLUMNS:
        if {_column_key(c) for c in needed} <= columns:
            return stem
    return None


def _header(path: Path) -> list[str]:
    """The column names of a text file, from its first line (no full read)."""
    with open(path, encoding="utf-8") as handle:
        first = handle.readline()
    if path.suffix.lower() in (".jsonl", ".json"):
        row = json.loads(first)
        return list(row) if isinstance(row, dict) else []
    return first.rstrip("\r\n").split("\t" if path.suffix.lower() in (".tsv", ".txt") else ",")


def canonical_rows(raw: RawRows, stem: str) -> tuple[list[dict], int]:
    """The rows of a whole source file as the prepared cache keeps them (`<stem>.jsonl`, read
    back like a file in the hub schema): every row in source order, so that positions (and the ids
    made from them) stay; the roles under their hub names; labels as ids, -1 without gold. Every
    row is checked, so a bad label or a missing column fails here, with its line. Returns the
    rows and how many have no gold label."""
    spec = source_specs()[stem]
    column = _column_finder(list(raw.frame.columns), spec, raw.source)
    id_column = column(ID_COLUMNS, required=False)
    roles = {"premise": column(PREMISE_COLUMNS), "hypothesis": column(HYPOTHESIS_COLUMNS)}
    extra = {"heuristic": "heuristic", "subcase": "subcase", "template": "template"} if spec.scoring == HANS else {}
    if stem == "glue_diagnostics":
        extra = {name: name for name in (*DIAGNOSTIC_CATEGORY_COLUMNS.values(), "domain")}
    extra = {name: column([source], required=name in ("heuristic", "subcase") or name in DIAGNOSTIC_CATEGORY_COLUMNS.values())
             for name, source in extra.items()}
    label_column = column(LABEL_COLUMNS)
    class_names = raw.class_names.get(label_column)
    rows, no_gold = [], 0
    for position, record in enumerate(raw.frame.to_dict("records")):
        label = _label_id(record[label_column], spec, class_names, raw.where(position))
        no_gold += label < 0
        row = {id_column: str(record[id_column])} if id_column else {}
        row |= {role: record[name] for role, name in roles.items()}
        row["label"] = label
        row |= {name: (record[source] if source and _non_empty(record[source]) else "") for name, source in extra.items()}
        for role in ("premise", "hypothesis"):
            if label >= 0 and not _non_empty(row[role]):
                raise DataSchemaError(f"{raw.where(position)}: the {role} of this {stem} row is empty.")
        rows.append(row)
    return rows, no_gold


# --------------------------------------------------------------------------- the common schema
def standardise(raw: RawRows, spec: BenchmarkSpec) -> tuple[pd.DataFrame, int]:
    """The selected rows in the common schema, and how many were dropped for lack of gold."""
    column = _column_finder(list(raw.frame.columns), spec, raw.source)
    frame = raw.frame  # the index is the row's position in the source: it makes the ids

    if spec.heuristic is not None:
        frame = frame[frame[column(["heuristic"])] == spec.heuristic]
    if spec.category is not None:
        carries = pd.DataFrame({
            category: frame[column([name])].map(_non_empty)
            for category, name in DIAGNOSTIC_CATEGORY_COLUMNS.items()
        })
        frame, carries = frame[carries[spec.category]], carries[carries[spec.category]]

    label_column = column(LABEL_COLUMNS)
    class_names = raw.class_names.get(label_column)
    labels = pd.Series([_label_id(value, spec, class_names, raw.where(position))
                        for position, value in zip(frame.index, frame[label_column])], index=frame.index, dtype="int64")
    has_gold = labels >= 0
    frame, labels = frame[has_gold], labels[has_gold]

    id_column = column(ID_COLUMNS, required=False)
    ids = (
        frame[id_column].astype(str) if id_column
        else pd.Series([f"{spec.name}-{i}" for i in frame.index], index=frame.index)
    )
    table = pd.DataFrame({
        "id": ids,
        "premise": frame[column(PREMISE_COLUMNS)],
        "hypothesis": frame[column(HYPOTHESIS_COLUMNS)],
        "label": labels.astype("int64"),
    })
    for role in ("premise", "hypothesis"):
        empty = table[role].map(lambda text: not _non_empty(text))
        if empty.any():
            raise DataSchemaError(f"{raw.where(int(empty.idxmax()))}: the {role} of this {spec.name} row is empty.")
    if spec.scoring == HANS:
        table["heuristic"] = frame[column(["heuristic"])]
        table["subcase"] = frame[column(["subcase"])]
    if spec.category is not None:
        table["categories"] = [
            [category for category, carried in row.items() if carried]
            for _, row in carries[has_gold].iterrows()
        ]
    return table, int((~has_gold).sum())


def _column_finder(columns: list[str], spec: BenchmarkSpec, source: str):
    """A function from the candidate names of a role to the source's column for it: exact match
    first, then ignoring case and punctuation ("Lexical Semantics" = "lexical_semantics")."""
    by_key = {}
    for name in columns:
        by_key.setdefault(_column_key(name), name)

    def find(candidates, required: bool = True) -> str | None:
        for wanted in candidates:
            if wanted in columns:
                return wanted
        for wanted in candidates:
            if _column_key(wanted) in by_key:
                return by_key[_column_key(wanted)]
        if not required:
            return None
        raise DataSchemaError(
            f"{source} has no column {' or '.join(repr(c) for c in candidates)}, which {spec.name} needs (its columns: "
            f"{', '.join(map(str, columns))}). Expected the schema of {spec.hub_location}"
            + (f" or its original distribution ({', '.join(ORIGINAL_FILES[spec.stem])})" if spec.stem in ORIGINAL_FILES else "")
            + "."
        )

    return find


def _column_key(name) -> str:
    return re.sub(r"[^a-z0-9]", "", str(name).lower())


def _non_empty(value) -> bool:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return False
    return str(value).strip() != ""


def _label_id(value, spec: BenchmarkSpec, class_names: list[str] | None, where: str) -> int:
    """The label as an id of `spec.label_names`, or -1 when the row has no gold label.

    Accepts ids, ClassLabel ids (read through the feature's own names, so a different class
    order on the hub cannot shift them), label names in any case and ANLI's letters."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return -1
    if isinstance(value, str):
        name = value.strip().lower().replace("_", "-")
        if spec.scoring != HANS:
            name = LABEL_LETTERS.get(name, name)
        if name in NO_GOLD:
            return -1
        if name in spec.label_names:
            return spec.label_names.index(name)
        if re.fullmatch(r"-?\d+", name):
            return _label_id(int(name), spec, class_names, where)
    elif float(value).is_integer():
        index = int(value)
        if index in NO_GOLD:
            return -1
        if class_names is not None and 0 <= index < len(class_names):
            return _label_id(class_names[index], spec, None, where)
        if class_names is None and 0 <= index < len(spec.label_names):
            return index
    raise DataSchemaError(
        f"{where}: label {value!r} of {spec.name} is not one of {list(spec.label_names)}, their "
        f"ids 0..{len(spec.label_names) - 1}, or a no-gold marker (-1, '-')."
    )
