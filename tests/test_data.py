"""The dataset registry: local files in each hub schema, filtering, labels, ids, errors, samples.

Every test reads files it writes itself (or the shipped samples); nothing touches the network."""

from __future__ import annotations

import json
import logging

import datasets
import pandas as pd
import pytest

from nli_grpo import data
from nli_grpo.data import (
    BENCHMARK_NAMES,
    BENCHMARKS,
    TRAIN_SOURCES,
    DataSchemaError,
    DataUnavailableError,
    UnknownDatasetError,
    load_benchmark,
    load_train_source,
    samples_dir,
)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def write_tsv(path, rows):
    pd.DataFrame(rows).to_csv(path, sep="\t", index=False)
    return path


def write_parquet(path, rows, features=None):
    """Through `datasets`, so ClassLabel features travel in the file as they do on the hub."""
    datasets.Dataset.from_list(rows, features=features).to_parquet(str(path))
    return path


def hans_row(heuristic, subcase, label, premise="The doctor saw the lawyer ."):
    return {
        "premise": premise, "hypothesis": "The lawyer saw the doctor .", "label": label,
        "parse_premise": "(ROOT)", "parse_hypothesis": "(ROOT)",
        "binary_parse_premise": "( )", "binary_parse_hypothesis": "( )",
        "heuristic": heuristic, "subcase": subcase, "template": "temp1",
    }


# ---------------------------------------------------------------- registry

def test_registry_has_the_13_sets_with_the_papers_sizes():
    assert tuple(BENCHMARKS) == BENCHMARK_NAMES
    sizes = {name: spec.expected_n for name, spec in BENCHMARKS.items()}
    assert sizes == {
        "anli_r1": 1000, "anli_r2": 1000, "anli_r3": 1200, "snli": 9824, "mnli_mm": 9832,
        "hans_lexical_overlap": 10000, "hans_subsequence": 10000, "hans_constituent": 10000,
        "counter_nli": 1600, "diag_knowledge": 284, "diag_logic": 364,
        "diag_lexical_semantics": 368, "diag_predicate_argument": 424,
    }
    assert {name for name, spec in BENCHMARKS.items() if spec.scoring == data.HANS} == {
        "hans_lexical_overlap", "hans_subsequence", "hans_constituent"
    }
    assert BENCHMARKS["mnli_mm"].hub_location == (
        "nyu-mll/glue (config mnli, split validation_mismatched)"
    )


def test_train_sources_are_the_anli_train_rounds_and_the_local_hard_pool():
    locations = {name: (spec.hub_id, spec.hub_config, spec.split)
                 for name, spec in TRAIN_SOURCES.items()}
    assert locations == {
        "anli_train_r1": ("facebook/anli", "plain_text", "train_r1"),
        "anli_train_r2": ("facebook/anli", "plain_text", "train_r2"),
        "anli_train_r3": ("facebook/anli", "plain_text", "train_r3"),
        "anli_hard": (None, None, "train"),
    }


def test_the_hard_pool_is_never_fetched_and_its_error_says_how_to_build_it(tmp_path):
    with pytest.raises(DataUnavailableError, match="python -m nli_grpo.bootstrap"):
        load_train_source("anli_hard", local_dir=tmp_path, hub=True)


def test_specs_are_frozen():
    with pytest.raises(AttributeError):
        BENCHMARKS["snli"].split = "train"


# ---------------------------------------------------------------- three-way sets

def test_anli_keeps_uid_as_id_and_label_ids(tmp_path):
    write_jsonl(tmp_path / "anli_r2.jsonl", [
        {"uid": "a1", "premise": "P1", "hypothesis": "H1", "label": 2, "reason": "r"},
        {"uid": "b2", "premise": "P2", "hypothesis": "H2", "label": 0, "reason": ""},
    ])
    loaded = load_benchmark("anli_r2", local_dir=tmp_path, hub=False)
    assert loaded.dataset.column_names == ["id", "premise", "hypothesis", "label"]
    assert loaded.dataset.to_list() == [
        {"id": "a1", "premise": "P1", "hypothesis": "H1", "label": 2},
        {"id": "b2", "premise": "P2", "hypothesis": "H2", "label": 0},
    ]
    assert loaded.source == str(tmp_path / "anli_r2.jsonl")
    assert loaded.n_dropped == 0 and len(loaded) == 2


def test_snli_drops_rows_without_gold_and_ids_keep_the_source_row(tmp_path, caplog):
    rows = [{"premise": f"P{i}", "hypothesis": f"H{i}", "label": label}
            for i, label in enumerate([0, -1, 2, 1, -1])]
    write_parquet(tmp_path / "snli.parquet", rows)
    with caplog.at_level(logging.INFO, logger="nli_grpo.data"):
        loaded = load_benchmark("snli", local_dir=tmp_path, hub=False)
    assert loaded.n_dropped == 2
    assert loaded.dataset["id"] == ["snli-0", "snli-2", "snli-3"]
    assert loaded.dataset["label"] == [0, 2, 1]
    assert "dropped 2" in caplog.text


def test_csv_reads_text_like_na_as_text(tmp_path):
    # pandas would turn "NA" / "null" into missing values by default.
    pd.DataFrame([
        {"premise": "NA", "hypothesis": "null", "label": 1, "idx": 0},
        {"premise": "A man sleeps.", "hypothesis": "A man is awake.", "label": 2, "idx": 1},
    ]).to_csv(tmp_path / "mnli_mm.csv", index=False)
    loaded = load_benchmark("mnli_mm", local_dir=tmp_path, hub=False)
    assert loaded.dataset["premise"] == ["NA", "A man sleeps."]
    assert loaded.dataset["hypothesis"] == ["null", "A man is awake."]


def test_counter_nli_maps_string_gold_labels_and_keeps_every_revised_row(tmp_path):
    labels = ["contradiction", "neutral", "Entailment", "neutral"]
    write_tsv(tmp_path / "counter_nli.tsv", [
        {"sentence1": f"P{i}", "sentence2": f"H{i}", "gold_label": label}
        for i, label in enumerate(labels)
    ])
    loaded = load_benchmark("counter_nli", local_dir=tmp_path, hub=False)
    assert loaded.dataset["premise"] == ["P0", "P1", "P2", "P3"]
    assert loaded.dataset["hypothesis"] == ["H0", "H1", "H2", "H3"]
    assert loaded.dataset["label"] == [2, 1, 0, 1]
    assert loaded.dataset["id"] == [f"counter_nli-{i}" for i in range(4)]


def test_unknown_label_is_a_schema_error_naming_the_value(tmp_path):
    write_jsonl(tmp_path / "counter_nli.jsonl", [
        {"sentence1": "P", "sentence2": "H", "gold_label": "maybe"},
    ])
    with pytest.raises(DataSchemaError, match="'maybe'.*entailment"):
        load_benchmark("counter_nli", local_dir=tmp_path, hub=False)


def test_missing_column_is_a_schema_error_naming_it(tmp_path):
    write_jsonl(tmp_path / "snli.jsonl", [{"sentence1": "P", "text": "H", "label": 0}])
    with pytest.raises(DataSchemaError, match="no column 'hypothesis' or 'sentence2'.*stanfordnlp/snli.*snli_1.0_test.jsonl"):
        load_benchmark("snli", local_dir=tmp_path, hub=False)


def test_limit_samples_after_filtering_and_a_training_source_limit_takes_the_first_rows(tmp_path):
    rows = [{"premise": f"P{i}", "hypothesis": "H", "label": label}
            for i, label in enumerate([-1, 0, 1, 2, 0])]
    write_jsonl(tmp_path / "snli.jsonl", rows)
    loaded = load_benchmark("snli", local_dir=tmp_path, hub=False, limit=2)
    assert len(loaded) == 2 and loaded.n_dropped == 1 and 0 in loaded.dataset["label"]  # the largest label share
    write_jsonl(tmp_path / "anli_train_r1.jsonl", rows[1:])
    assert load_train_source("anli_train_r1", local_dir=tmp_path, hub=False, limit=2).dataset["premise"] == ["P1", "P2"]
    with pytest.raises(ValueError, match="limit"):
        load_benchmark("snli", local_dir=tmp_path, hub=False, limit=0)


# ---------------------------------------------------------------- HANS

def test_hans_splits_the_shared_file_by_heuristic_and_keeps_subcases(tmp_path):
    rows = [
        hans_row("lexical_overlap", "ln_subject/object_swap", 1),
        hans_row("subsequence", "sn_NP/S", 1),
        hans_row("constituent", "ce_adverb", 0),
        hans_row("lexical_overlap", "le_passive", 0),
        hans_row("constituent", "cn_after_if_clause", 1),
    ]
    write_parquet(tmp_path / "hans.parquet", rows, features=datasets.Features({
        **{key: datasets.Value("string") for key in rows[0]},
        "label": datasets.ClassLabel(names=["entailment", "non-entailment"]),
    }))
    lexical = load_benchmark("hans_lexical_overlap", local_dir=tmp_path, hub=False)
    constituent = load_benchmark("hans_constituent", local_dir=tmp_path, hub=False)
    subsequence = load_benchmark("hans_subsequence", local_dir=tmp_path, hub=False)

    assert lexical.dataset.column_names == [
        "id", "premise", "hypothesis", "label", "heuristic", "subcase"
    ]
    assert lexical.dataset["id"] == ["hans_lexical_overlap-0", "hans_lexical_overlap-3"]
    assert lexical.dataset["subcase"] == ["ln_subject/object_swap", "le_passive"]
    assert lexical.dataset["label"] == [1, 0]
    assert constituent.dataset["subcase"] == ["ce_adverb", "cn_after_if_clause"]
    assert constituent.dataset["label"] == [0, 1]
    assert subsequence.dataset["heuristic"] == ["subsequence"]
    assert lexical.source == constituent.source == str(tmp_path / "hans.parquet")


def test_hans_accepts_label_names(tmp_path):
    write_jsonl(tmp_path / "hans.jsonl", [
        hans_row("subsequence", "se_adjective", "entailment"),
        hans_row("subsequence", "sn_PP_on_subject", "non-entailment"),
    ])
    loaded = load_benchmark("hans_subsequence", local_dir=tmp_path, hub=False)
    assert loaded.dataset["label"] == [0, 1]


def test_a_file_named_after_the_benchmark_wins_over_the_shared_one(tmp_path):
    write_jsonl(tmp_path / "hans.jsonl", [hans_row("subsequence", "sn_NP/S", 1, premise="shared")])
    write_jsonl(tmp_path / "hans_subsequence.jsonl",
                [hans_row("subsequence", "sn_NP/S", 1, premise="own")])
    loaded = load_benchmark("hans_subsequence", local_dir=tmp_path, hub=False)
    assert loaded.dataset["premise"] == ["own"]


# ---------------------------------------------------------------- GLUE diagnostics

DIAG_ROWS = [  # premise, LS, PAS, logic, knowledge, label
    ("only lexical semantics", "Lexical entailment", "", "", "", "entailment"),
    ("only predicate-argument", "", "Active/Passive", "", "", "neutral"),
    ("lexical semantics and logic", "Quantifiers", "", "Universal", "", "contradiction"),
    ("in no category", "", "", "", "", "entailment"),
    ("knowledge and predicate-argument", "", "Anaphora/Coreference", "", "Common sense", "neutral"),
]


def test_diagnostic_subsets_come_from_their_own_columns(tmp_path):
    # The original GLUE diagnostic TSV header; empty cells are missing values.
    write_tsv(tmp_path / "glue_diagnostics.tsv", [
        {"Lexical Semantics": ls, "Predicate-Argument Structure": pas, "Logic": logic,
         "Knowledge": knowledge, "Domain": "Artificial", "Premise": premise,
         "Hypothesis": "H", "Label": label}
        for premise, ls, pas, logic, knowledge, label in DIAG_ROWS
    ])

    def premises(name):
        return load_benchmark(name, local_dir=tmp_path, hub=False).dataset["premise"]

    # The authors' code swapped these two; each must hold the rows of its own column.
    assert premises("diag_lexical_semantics") == [
        "only lexical semantics", "lexical semantics and logic"
    ]
    assert premises("diag_predicate_argument") == [
        "only predicate-argument", "knowledge and predicate-argument"
    ]
    assert premises("diag_logic") == ["lexical semantics and logic"]
    assert premises("diag_knowledge") == ["knowledge and predicate-argument"]


def test_diagnostic_rows_list_all_their_categories(tmp_path):
    write_jsonl(tmp_path / "glue_diagnostics.jsonl", [
        {"premise": premise, "hypothesis": "H", "label": label, "lexical_semantics": ls or None,
         "predicate_argument_structure": pas, "logic": logic, "knowledge": knowledge,
         "domain": "News"}
        for premise, ls, pas, logic, knowledge, label in DIAG_ROWS
    ])
    logic = load_benchmark("diag_logic", local_dir=tmp_path, hub=False)
    assert logic.dataset["categories"] == [["lexical_semantics", "logic"]]
    assert logic.dataset["id"] == ["diag_logic-2"]
    assert logic.dataset["label"] == [2]
    knowledge = load_benchmark("diag_knowledge", local_dir=tmp_path, hub=False)
    assert knowledge.dataset["categories"] == [["predicate_argument", "knowledge"]]


def test_diagnostic_classlabel_ids_are_read_through_their_names(tmp_path):
    # A ClassLabel whose class order differs from ours must not shift the labels.
    names = ["contradiction", "entailment", "neutral"]
    rows = [
        {"premise": premise, "hypothesis": "H", "label": names.index(label),
         "lexical_semantics": ls, "predicate_argument_structure": pas, "logic": logic,
         "knowledge": knowledge, "domain": ""}
        for premise, ls, pas, logic, knowledge, label in DIAG_ROWS
    ]
    features = datasets.Features({
        **{key: datasets.Value("string") for key in rows[0]},
        "label": datasets.ClassLabel(names=names),
    })
    write_parquet(tmp_path / "glue_diagnostics.parquet", rows, features)
    loaded = load_benchmark("diag_lexical_semantics", local_dir=tmp_path, hub=False)
    assert loaded.dataset["label"] == [0, 2]  # entailment, contradiction


# ---------------------------------------------------------------- resolution and errors

def test_files_mapping_names_a_file_for_a_set_or_for_its_shared_stem(tmp_path):
    shared = write_jsonl(tmp_path / "anything.jsonl", [hans_row("constituent", "ce_adverb", 0)])
    loaded = load_benchmark("hans_constituent", files={"hans": shared}, hub=False)
    assert loaded.source == str(shared) and len(loaded) == 1

    own = write_jsonl(tmp_path / "my_snli.jsonl", [{"premise": "P", "hypothesis": "H", "label": 1}])
    # An explicit file wins over local_dir.
    assert load_benchmark("snli", files={"snli": own}, local_dir="samples").source == str(own)


def test_a_missing_explicit_file_is_an_error_not_a_fallback(tmp_path):
    with pytest.raises(DataUnavailableError, match="does not exist"):
        load_benchmark("snli", files={"snli": tmp_path / "nope.jsonl"}, local_dir="samples")


def test_unknown_names_list_the_valid_ones():
    with pytest.raises(UnknownDatasetError, match="anli_r1, anli_r2.*diag_predicate_argument"):
        load_benchmark("anli_r4")
    with pytest.raises(ValueError, match="anli_train_r1, anli_train_r2, anli_train_r3"):
        load_train_source("anli_r1")


def test_no_local_file_and_no_hub_says_what_was_looked_for_and_how_to_fix(tmp_path):
    with pytest.raises(DataUnavailableError) as error:
        load_benchmark("diag_logic", local_dir=tmp_path, hub=False)
    message = str(error.value)
    assert str(tmp_path) in message
    for name in ("diag_logic.jsonl", "glue_diagnostics.parquet", "glue_diagnostics.tsv"):
        assert name in message
    assert "data.local_dir" in message and "allow the hub" in message
    assert "pietrolesci/glue_diagnostics" in message

    with pytest.raises(DataUnavailableError, match="no local folder was given.*snli.jsonl"):
        load_benchmark("snli", hub=False)


def test_hub_failure_is_reported_with_its_cause(monkeypatch, tmp_path):
    # The hub is out of reach here; stand in for its failure.
    def unreachable(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", unreachable)
    with pytest.raises(DataUnavailableError, match="ConnectionError: no network") as error:
        load_benchmark("anli_r3", local_dir=tmp_path)
    assert isinstance(error.value.__cause__, ConnectionError)


def test_hub_is_asked_for_the_specs_id_config_and_split(monkeypatch, caplog):
    # Stand in for the hub with a two-row split in the hub's own types (ClassLabel, -1).
    calls = []

    def fake_hub(path, name=None, *, split, revision=None):
        calls.append((path, name, split, revision))
        return datasets.Dataset.from_list(
            [{"premise": "P", "hypothesis": "H", "label": 0, "idx": 0},
             {"premise": "P", "hypothesis": "H", "label": -1, "idx": 1}],
            features=datasets.Features({
                "premise": datasets.Value("string"), "hypothesis": datasets.Value("string"),
                "label": datasets.ClassLabel(names=["entailment", "neutral", "contradiction"]),
                "idx": datasets.Value("int32"),
            }),
        )

    monkeypatch.setattr(datasets, "load_dataset", fake_hub)
    with caplog.at_level(logging.WARNING, logger="nli_grpo.data"):
        loaded = load_benchmark("mnli_mm")
    assert calls == [("nyu-mll/glue", "mnli", "validation_mismatched", None)]
    assert loaded.source == "nyu-mll/glue (config mnli, split validation_mismatched)"
    assert loaded.dataset["label"] == [0] and loaded.n_dropped == 1
    assert "the paper used 9832" in caplog.text


# ---------------------------------------------------------------- shipped samples

@pytest.mark.parametrize("name", BENCHMARK_NAMES)
def test_every_benchmark_loads_from_the_shipped_samples(name):
    loaded = load_benchmark(name, local_dir="samples", hub=False)
    table = loaded.dataset.to_pandas()
    assert len(table) >= 4
    assert table["id"].is_unique
    assert (table["premise"].str.len() > 0).all() and (table["hypothesis"].str.len() > 0).all()
    assert set(table["label"]) <= set(range(len(loaded.spec.label_names)))
    assert loaded.source.startswith(str(samples_dir()))


@pytest.mark.parametrize("name", [n for n in TRAIN_SOURCES if n != "anli_hard"])
def test_every_train_source_loads_from_the_shipped_samples(name):
    loaded = load_train_source(name, local_dir="samples", hub=False)
    assert set(loaded.dataset["label"]) == {0, 1, 2}
    assert len(set(loaded.dataset["id"])) == len(loaded)


def test_samples_exercise_what_the_real_sets_have():
    assert len(load_train_source("anli_train_r1", local_dir="samples", hub=False)) == 48
    assert load_benchmark("snli", local_dir="samples", hub=False).n_dropped == 1
    for heuristic in ("lexical_overlap", "subsequence", "constituent"):
        hans = load_benchmark(f"hans_{heuristic}", local_dir="samples", hub=False).dataset
        assert len(set(hans["subcase"])) >= 4 and set(hans["label"]) == {0, 1}
    diag = [row for name in BENCHMARK_NAMES if name.startswith("diag_")
            for row in load_benchmark(name, local_dir="samples", hub=False).dataset]
    assert any(len(row["categories"]) > 1 for row in diag)


# ---------------------------------------------------------------- the datasets' original files

def test_every_set_loads_from_its_original_distribution_files(original_files):
    def load(name):
        return load_benchmark(name, local_dir=original_files, hub=False)

    anli = load("anli_r2").dataset
    assert anli["id"] == ["test-r2-0", "test-r2-1", "test-r2-2"] and anli["label"] == [0, 1, 2]  # e, n, c
    assert load_train_source("anli_train_r3", local_dir=original_files, hub=False).dataset["id"][0] == "train-r3-0"
    snli = load("snli")
    assert snli.n_dropped == 1 and snli.dataset["label"] == [1, 0, 2]
    assert snli.dataset["id"] == ["1.jpg#0r1n", "1.jpg#0r1e", "1.jpg#0r1c"]  # pairID
    assert snli.source.endswith("snli_1.0/snli_1.0_test.jsonl")
    assert load("mnli_mm").dataset["label"] == [2, 1, 0]
    overlap = load("hans_lexical_overlap").dataset
    assert overlap["label"] == [1, 0] and overlap["id"] == ["ex0", "ex1"]
    assert overlap["subcase"] == ["ln_subject/object_swap", "le_around_prepositional_phrase"]
    assert set(overlap["heuristic"]) == {"lexical_overlap"}
    constituent = load("hans_constituent").dataset
    assert constituent["premise"][1] == 'If the "artist" slept , the actor ran .'  # a quote is text
    assert (len(load("hans_subsequence")), len(constituent)) == (1, 2)
    logic = load("diag_logic").dataset
    assert logic["label"] == [2] and logic["categories"] == [["lexical_semantics", "logic"]]
    knowledge = load("diag_knowledge").dataset
    assert knowledge["categories"] == [["knowledge"], ["lexical_semantics", "knowledge"]] and knowledge["label"] == [0, 1]
    assert load("diag_predicate_argument").dataset["id"] == ["diag_predicate_argument-1"]  # no id column: the row
    counter = load("counter_nli").dataset
    assert counter["label"] == [2, 0] and counter["premise"][1] == "A woman is walking her dog in a mall."


@pytest.mark.parametrize("name, content, message", [
    ("snli.jsonl", '{"premise": "P", "hypothesis": "H", "label": 0}\n{"premise": "P", "hypo',
     r"snli.jsonl, line 2: not valid JSON .*truncated"),
    ("snli.jsonl", '{"premise": "P", "hypothesis": "H", "label": 0}\n{"premise": "P", "hypothesis": "H", "label": "maybe"}\n',
     r"snli.jsonl, line 2: label 'maybe' of snli is not one of \['entailment', 'neutral', 'contradiction'\]"),
    ("snli.tsv", "premise\thypothesis\tlabel\nP\tH\t0\nP\tH\n", r"snli.tsv, line 3: expected 3 fields like the header, found 2"),
    ("snli.jsonl", "", r"snli.jsonl is empty"),
    ("snli.tsv", "", r"snli.tsv is empty: expected a header"),
    ("hans.jsonl", '{"premise": "P", "hypothesis": "H", "label": 0, "subcase": "x"}\n', r"hans.jsonl has no column 'heuristic'"),
    ("snli.jsonl", '{"premise": "", "hypothesis": "H", "label": 0}\n', r"snli.jsonl, line 1: the premise of this snli row is empty"),
])
def test_bad_files_are_named_with_the_line_and_what_was_expected(tmp_path, name, content, message):
    (tmp_path / name).write_text(content)
    benchmark = "hans_subsequence" if name.startswith("hans") else "snli"
    with pytest.raises(DataSchemaError, match=message):
        load_benchmark(benchmark, local_dir=tmp_path, hub=False)


def test_a_label_outside_hans_labels_is_refused_with_its_line(original_files):
    path = original_files / "hans" / "heuristics_evaluation_set.txt"
    lines = path.read_text().splitlines()
    lines[3] = lines[3].replace("non-entailment", "contradiction", 1)  # a 3-way label in a 2-way set
    path.write_text("\n".join(lines) + "\n")
    expected = r"heuristics_evaluation_set.txt, line 4: label 'contradiction' of hans_\w+ is not one of \['entailment', 'non-entailment'\]"
    with pytest.raises(DataSchemaError, match=expected):
        load_benchmark("hans_subsequence", local_dir=original_files, hub=False)


def test_the_same_examples_from_any_source_have_the_same_fingerprint(tmp_path, original_files):
    """What a number was computed on, whatever the file format or ids: content and order."""
    from_original = data.fingerprint(load_benchmark("snli", local_dir=original_files, hub=False).dataset)
    rows = [{"premise": "Two women are embracing.", "hypothesis": f"Hypothesis {g}.", "label": label}
            for g, label in (("n", 1), ("e", 0), ("x", -1), ("c", 2))]
    write_jsonl(tmp_path / "snli.jsonl", rows)  # the hub's schema, no pairID
    assert data.fingerprint(load_benchmark("snli", local_dir=tmp_path, hub=False).dataset) == from_original
    assert from_original["rows"] == 3
    write_jsonl(tmp_path / "snli.jsonl", rows[:-1])
    changed = data.fingerprint(load_benchmark("snli", local_dir=tmp_path, hub=False).dataset)
    assert changed["sha256"] != from_original["sha256"] and changed["rows"] == 2


def test_original_files_are_recognised_by_name_and_by_columns(tmp_path, original_files):
    found = {path.relative_to(original_files).as_posix(): data.recognise(path, original_files)
             for path in original_files.rglob("*") if path.is_file()}
    assert found["hans/heuristics_evaluation_set.txt"] == "hans"
    assert found["anli_v1.0/R3/train.jsonl"] == "anli_train_r3" and found["anli_v1.0/R1/test.jsonl"] == "anli_r1"
    assert found["anli_v1.0/R1/dev.jsonl"] is None  # not one of the paper's sets
    assert found["glue/diagnostic-full.tsv"] == "glue_diagnostics"
    assert found["counterfactually-augmented-data/NLI/revised_combined/test.tsv"] == "counter_nli"
    renamed = tmp_path / "mine" / "hans_eval.tsv"  # a renamed copy: its columns say what it is
    renamed.parent.mkdir()
    renamed.write_text((original_files / "hans" / "heuristics_evaluation_set.txt").read_text())
    assert data.recognise(renamed, renamed.parent) == "hans"


# The authors' TSV readers, each with the columns of its original file; a row's premise is
# the only field that varies. Counter-NLI's row is the authors' own (revised_combined/test.tsv).
POLITIE = 'Two uniformed women, wearing jackets saying "Politie" on the back, are looking at each other in front of a crowd.'
TSV_READERS = {
    "counter_nli": ("counterfactually-augmented-data/NLI/revised_combined/test.tsv",
                    ["sentence1", "sentence2", "gold_label"], lambda premise: [premise, "The women are wearing bikinis", "contradiction"]),
    "hans_lexical_overlap": ("hans/heuristics_evaluation_set.txt",
                             ["gold_label", "sentence1_binary_parse", "sentence2_binary_parse", "sentence1_parse",
                              "sentence2_parse", "sentence1", "sentence2", "pairID", "heuristic", "subcase", "template"],
                             lambda premise: ["non-entailment", "( x )", "( x )", "(ROOT x)", "(ROOT x)", premise,
                                              "The women looked .", "ex0", "lexical_overlap", "ln_passive", "temp1"]),
    "diag_knowledge": ("glue/diagnostic-full.tsv",
                       ["Lexical Semantics", "Predicate-Argument Structure", "Logic", "Knowledge", "Domain", "Premise",
                        "Hypothesis", "Label"],
                       lambda premise: ["", "", "", "World knowledge", "News", premise, "Police are there.", "entailment"]),
}


@pytest.mark.parametrize("name", list(TSV_READERS))
def test_tsv_readers_take_csv_quoting_and_keep_raw_quotes_as_text(tmp_path, name):
    """Kaushik et al. wrote their TSVs with a CSV writer (a field holding a quote is enclosed in
    quotes, inner quotes doubled: 12 premises of Counter-NLI's test.tsv); HANS and GLUE wrote
    theirs raw. Either way every reader gives the text as its authors meant it."""
    path, header, row = TSV_READERS[name]
    quoted = tmp_path / "quoted" / path
    quoted.parent.mkdir(parents=True)
    csv_field = '"' + POLITIE.replace('"', '""') + '"'
    quoted.write_text("\n".join("\t".join(line) for line in [header, row(csv_field), row("A plain premise .")]) + "\n")
    loaded = load_benchmark(name, local_dir=tmp_path / "quoted", hub=False).dataset
    assert loaded["premise"] == [POLITIE, "A plain premise ."]

    raw = tmp_path / "raw" / path  # quotes as text, one opening a field
    raw.parent.mkdir(parents=True)
    texts = ['"Politie" is written on their jackets .', 'They wear "Politie" jackets .']
    raw.write_text("\n".join("\t".join(line) for line in [header, *map(row, texts)]) + "\n")
    assert load_benchmark(name, local_dir=tmp_path / "raw", hub=False).dataset["premise"] == texts


def test_counter_nli_quoted_rows_have_the_fingerprint_of_a_correct_copy(tmp_path, original_files):
    """The Politie row as Counter-NLI's file holds it reads as the hub's copy does."""
    path = original_files / "counterfactually-augmented-data" / "NLI" / "revised_combined" / "test.tsv"
    with path.open("a") as f:
        f.write('"' + POLITIE.replace('"', '""') + '"\tThe women are wearing bikinis\tcontradiction\n')
    from_original = load_benchmark("counter_nli", local_dir=original_files, hub=False).dataset
    assert from_original["premise"][-1] == POLITIE
    rows = [{"premise": "A woman is walking her dog in the snow.", "hypothesis": "A woman is inside with her pet.", "label": 2},
            {"premise": "A woman is walking her dog in a mall.", "hypothesis": "A woman is inside with her pet.", "label": 0},
            {"premise": POLITIE, "hypothesis": "The women are wearing bikinis", "label": 2}]  # the hub's schema
    write_jsonl(tmp_path / "counter_nli.jsonl", rows)
    assert data.fingerprint(load_benchmark("counter_nli", local_dir=tmp_path, hub=False).dataset) == data.fingerprint(from_original)


def test_a_limit_is_a_seeded_sample_that_keeps_label_and_subcase_proportions(tmp_path):
    """HANS files are ordered by subcase (the first rows all one label): `limit` must not take
    the first N rows, but the same N rows every time, each subcase (and label) in its share."""
    subcases = [("le_a", 0), ("le_b", 0), ("ln_a", 1), ("ln_b", 1)]
    write_jsonl(tmp_path / "hans.jsonl", [
        {"premise": f"{sub} premise {i} .", "hypothesis": "H .", "label": label, "heuristic": "lexical_overlap", "subcase": sub}
        for sub, label in subcases for i in range(10)])
    sample = load_benchmark("hans_lexical_overlap", local_dir=tmp_path, hub=False, limit=8).dataset
    assert sorted(sample["subcase"]) == ["le_a", "le_a", "le_b", "le_b", "ln_a", "ln_a", "ln_b", "ln_b"]
    assert sample["id"] == load_benchmark("hans_lexical_overlap", local_dir=tmp_path, hub=False, limit=8).dataset["id"]
    assert sample["premise"] != [f"le_a premise {i} ." for i in range(8)]  # not the first rows
    ids = sample["id"]
    assert ids == sorted(ids, key=lambda x: int(x.rsplit("-", 1)[1]))  # in the file's order
    few = load_benchmark("hans_lexical_overlap", local_dir=tmp_path, hub=False, limit=2).dataset  # fewer than subcases
    assert sorted(few["label"]) == [0, 1]

    write_jsonl(tmp_path / "snli.jsonl", [{"premise": f"P{label}{i}.", "hypothesis": "H.", "label": label}
                                          for label, count in ((0, 12), (1, 6), (2, 3)) for i in range(count)])
    labels = load_benchmark("snli", local_dir=tmp_path, hub=False, limit=7).dataset["label"]
    assert sorted(labels) == [0, 0, 0, 0, 1, 1, 2]  # 12:6:3 of 21 -> 4:2:1 of 7
    assert len(load_benchmark("snli", local_dir=tmp_path, hub=False, limit=50)) == 21
