"""The paper's scoring protocol on scripted completions whose expected numbers are worked out by
hand in the comments."""

import gzip
import json

import pytest

from nli_grpo.evaluate import main  # `python -m nli_grpo.evaluate --score`: the command line of scoring
from nli_grpo.scoring import (
    score_benchmark,
    score_file,
)


def answer(label, think="Let me compare the two sentences."):
    return f"<think>{think}</think>\n<answer>{label}</answer>"


# A 3-way set of 10 examples. E/N/C = the answer extract_label finds, "-" = unparseable,
# "fmt" = passes format_ok.
#   #  gold  completion                                  parsed  correct  fmt
#   0  E     well-formed entailment                      E       yes      yes
#   1  E     "Sure! " + well-formed ENTAILMENT           E       yes      no (text before <think>)
#   2  E     well-formed neutral                         N       no       yes
#   3  E     well-formed, answer "maybe"                 -       -        yes
#   4  N     text between </think> and <answer>          N       yes      no
#   5  N     bare <answer>neutral</answer>               N       yes      no (no <think>)
#   6  N     contradiction tag, then entailment tag      E       no       yes (priority: E wins)
#   7  C     well-formed contradiction                   C       yes      yes
#   8  C     well-formed contradiction + trailing text   C       yes      no
#   9  C     prose, no tag                               -       -        no
THREE_WAY_GOLDS = [0, 0, 0, 0, 1, 1, 1, 2, 2, 2]
THREE_WAY_COMPLETIONS = [
    answer("entailment"),
    "Sure! " + answer("ENTAILMENT"),
    answer("neutral"),
    answer("maybe"),
    "<think>a</think> so the answer is <answer>neutral</answer>",
    "<answer>neutral</answer>",
    "<think>t</think>\n<answer>contradiction</answer><answer>entailment</answer>",
    answer("contradiction"),
    answer("contradiction") + " Hope this helps.",
    "I think it is a contradiction.",
]


def test_three_way_drops_unparseable_from_paper_accuracy_only():
    entry = score_benchmark("anli_r1", THREE_WAY_GOLDS, THREE_WAY_COMPLETIONS)
    assert entry["scoring"] == "three_way"
    assert entry["n"] == 10
    assert entry["n_parsed"] == 8
    assert entry["n_correct"] == 6
    assert entry["accuracy"] == 0.75          # 6 / 8 parsed
    assert entry["accuracy_strict"] == 0.6    # 6 / 10
    assert entry["unparseable_rate"] == 0.2   # 2 / 10
    assert entry["format_rate"] == 0.5        # #0, 2, 3, 6, 7


def test_three_way_per_class_and_confusion_by_hand():
    entry = score_benchmark("anli_r1", THREE_WAY_GOLDS, THREE_WAY_COMPLETIONS)
    # entailment: predicted by #0, 1, 6 (tp 2, fp 1), gold #0-3 (support 4)
    #   P 2/3, R 2/4, F1 = 2*2 / (4 + 3) = 4/7
    # neutral: predicted by #2, 4, 5 (tp 2, fp 1), gold #4-6 (support 3): P 2/3, R 2/3, F1 2/3
    # contradiction: predicted by #7, 8 (tp 2), gold #7-9 (support 3): P 1, R 2/3, F1 = 4/5
    assert entry["per_class"] == {
        "entailment": {"precision": 0.666667, "recall": 0.5, "f1": 0.571429, "support": 4},
        "neutral": {"precision": 0.666667, "recall": 0.666667, "f1": 0.666667, "support": 3},
        "contradiction": {"precision": 1.0, "recall": 0.666667, "f1": 0.8, "support": 3},
    }
    assert entry["confusion"] == {
        "entailment": {"entailment": 2, "neutral": 1, "contradiction": 0, "unparseable": 1},
        "neutral": {"entailment": 1, "neutral": 2, "contradiction": 0, "unparseable": 0},
        "contradiction": {"entailment": 0, "neutral": 0, "contradiction": 2, "unparseable": 1},
    }


def test_answer_tag_priority_is_entailment_neutral_contradiction_not_text_order():
    completions = [
        "<answer>contradiction</answer> no wait <answer>neutral</answer>",   # neutral wins
        "<answer>neutral</answer> <answer>Entailment</answer>",              # entailment wins
        "<answer>contradiction</answer><answer>neutral</answer><answer>entailment</answer>",
    ]
    entry = score_benchmark("snli", [1, 0, 0], completions)
    assert entry["accuracy"] == 1.0
    assert entry["format_rate"] == 0.0  # none has <think>
    entry = score_benchmark("snli", [2, 1, 2], completions)
    assert entry["accuracy"] == 0.0


def test_nothing_parsed_gives_no_paper_accuracy():
    entry = score_benchmark("mnli_mm", [0, 1], ["no idea", answer("yes")])
    assert entry["accuracy"] is None
    assert entry["accuracy_strict"] == 0.0
    assert entry["unparseable_rate"] == 1.0
    assert entry["format_rate"] == 0.5
    assert entry["per_class"]["entailment"] == {"precision": None, "recall": 0.0, "f1": 0.0, "support": 1}
    assert entry["per_class"]["contradiction"] == {"precision": None, "recall": None, "f1": None, "support": 0}


# HANS: gold 0 entailment, 1 non-entailment.
#   #  gold  answer  HANS prediction   correct  subcase
#   0  E     E       entailment        yes      s_ent
#   1  E     N       non-entailment    no       s_ent
#   2  E     -       non-entailment    no       s_ent
#   3  NE    N       non-entailment    yes      s_non1
#   4  NE    C       non-entailment    yes      s_non1
#   5  NE    -       non-entailment    yes      s_non1
#   6  NE    E       entailment        no       s_non2
#   7  NE    C       non-entailment    yes      s_non2
HANS_GOLDS = [0, 0, 0, 1, 1, 1, 1, 1]
HANS_COMPLETIONS = [
    answer("entailment"), answer("neutral"), "unsure", answer("neutral"),
    answer("contradiction"), answer("not entailment"), answer("entailment"), "<answer>contradiction</answer>",
]
HANS_SUBCASES = ["s_ent", "s_ent", "s_ent", "s_non1", "s_non1", "s_non1", "s_non2", "s_non2"]


def test_hans_counts_neutral_contradiction_unparseable_as_non_entailment():
    entry = score_benchmark("hans_lexical_overlap", HANS_GOLDS, HANS_COMPLETIONS)
    assert entry["scoring"] == "hans"
    # 5 of 8 correct, nothing dropped (dropping the 2 unparseable would give 4/6 = 0.666667);
    # strictly the unparseable #5 is wrong: 4 of 8
    assert (entry["accuracy"], entry["accuracy_strict"]) == (0.625, 0.5)
    assert entry["n"] == 8
    assert entry["n_parsed"] == 6
    assert entry["unparseable_rate"] == 0.25
    assert entry["format_rate"] == 0.75  # all but #2 and #7
    # entailment: predicted by #0, 6 (tp 1), support 3: P 1/2, R 1/3, F1 2/(2+3) = 0.4
    # non-entailment: predicted by #1-5, 7 (tp 4), support 5: P 4/6, R 4/5, F1 8/(6+5) = 8/11
    assert entry["per_class"] == {
        "entailment": {"precision": 0.5, "recall": 0.333333, "f1": 0.4, "support": 3},
        "non-entailment": {"precision": 0.666667, "recall": 0.8, "f1": 0.727273, "support": 5},
    }
    assert entry["confusion"] == {
        "entailment": {"entailment": 1, "neutral": 1, "contradiction": 0, "unparseable": 1},
        "non-entailment": {"entailment": 1, "neutral": 1, "contradiction": 2, "unparseable": 1},
    }


def test_hans_strict_accuracy_counts_unparseable_completions_wrong():
    """A model that never answers scores the share of non-entailment under the authors' rule,
    and nothing strictly (120 unparseable HANS completions once scored 1.0 strict)."""
    entry = score_benchmark("hans_subsequence", [1, 1, 1, 0], ["no answer"] * 4)
    assert (entry["accuracy"], entry["accuracy_strict"], entry["n_parsed"]) == (0.75, 0.0, 0)


def test_hans_per_subcase_uses_the_hans_rule():
    entry = score_benchmark("hans_constituent", HANS_GOLDS, HANS_COMPLETIONS, {"subcase": HANS_SUBCASES})
    assert entry["per_subcase"] == {
        "s_ent": {"accuracy": 0.333333, "accuracy_strict": 0.333333, "n": 3, "n_parsed": 2, "n_correct": 1},
        # the unparseable #5 is right here (non-entailment), not dropped: 3/3
        "s_non1": {"accuracy": 1.0, "accuracy_strict": 0.666667, "n": 3, "n_parsed": 2, "n_correct": 3},
        "s_non2": {"accuracy": 0.5, "accuracy_strict": 0.5, "n": 2, "n_parsed": 2, "n_correct": 1},
    }


def test_multi_label_categories_under_the_three_way_rule():
    golds = [0, 1, 2, 0, 1]
    completions = [answer("entailment"), "??", answer("contradiction"), answer("neutral"), answer("neutral")]
    # correct: #0, 2, 4; #1 unparseable; #3 wrong
    categories = [["Logic", "Knowledge"], ["Logic", "Quantifiers"], [], "Knowledge", ["Lexical", "Logic", "Logic"]]
    entry = score_benchmark("diag_logic", golds, completions, {"categories": categories})
    assert entry["per_categories"] == {
        "Knowledge": {"accuracy": 0.5, "accuracy_strict": 0.5, "n": 2, "n_parsed": 2, "n_correct": 1},
        "Lexical": {"accuracy": 1.0, "accuracy_strict": 1.0, "n": 1, "n_parsed": 1, "n_correct": 1},
        # #0 right, #1 unparseable (dropped from the paper number), #4 right once despite the repeat
        "Logic": {"accuracy": 1.0, "accuracy_strict": 0.666667, "n": 3, "n_parsed": 2, "n_correct": 2},
        "Quantifiers": {"accuracy": None, "accuracy_strict": 0.0, "n": 1, "n_parsed": 0, "n_correct": 0},
    }
    assert entry["accuracy"] == 0.75 and entry["accuracy_strict"] == 0.6


def test_entry_is_plain_json_with_required_keys():
    entry = score_benchmark("hans_subsequence", HANS_GOLDS, HANS_COMPLETIONS,
                            {"subcase": HANS_SUBCASES, "heuristic": ["subsequence"] * 8})

    def check(value):
        if isinstance(value, dict):
            assert all(isinstance(k, str) for k in value)
            for v in value.values():
                check(v)
        else:
            assert value is None or type(value) in (int, float, str), value

    check(entry)
    assert json.loads(json.dumps(entry)) == entry
    from nli_grpo.results import EVAL_REQUIRED_KEYS
    assert all(key in entry for key in EVAL_REQUIRED_KEYS)
    assert entry["per_heuristic"]["subsequence"]["n"] == 8


def test_rejects_mismatched_or_out_of_range_input():
    with pytest.raises(ValueError, match="Unknown benchmark 'anli'.*anli_r1"):
        score_benchmark("anli", [0], ["x"])
    with pytest.raises(ValueError, match="2 gold labels but 1 completions"):
        score_benchmark("snli", [0, 1], ["x"])
    with pytest.raises(ValueError, match=r"gold label 2 of example 0.*1 \(non-entailment\)"):
        score_benchmark("hans_subsequence", [2], ["x"])
    with pytest.raises(ValueError, match="gold label -1"):
        score_benchmark("snli", [-1], ["x"])
    with pytest.raises(ValueError, match="group 'subcase' has 1 values for 2"):
        score_benchmark("snli", [0, 1], ["x", "y"], {"subcase": ["a"]})
    with pytest.raises(ValueError, match="no examples"):
        score_benchmark("snli", [], [])


# --- files ---------------------------------------------------------------------------------------

def write_lines(path, records, opener=open):
    with opener(path, "wt") as f:
        for record in records:
            f.write((record if isinstance(record, str) else json.dumps(record)) + "\n")


NAMES = ("entailment", "neutral", "contradiction")


def three_way_records():
    return [{"id": f"ex{i}", "label": NAMES[g], "completion": c}
            for i, (g, c) in enumerate(zip(THREE_WAY_GOLDS, THREE_WAY_COMPLETIONS))]


def test_score_file_plain_and_gzip_with_label_names(tmp_path):
    expected = score_benchmark("anli_r2", THREE_WAY_GOLDS, THREE_WAY_COMPLETIONS)
    plain, packed = tmp_path / "c.jsonl", tmp_path / "c.jsonl.gz"
    write_lines(plain, three_way_records() + [""])  # a trailing blank line is fine
    write_lines(packed, three_way_records(), gzip.open)
    assert score_file(plain, "anli_r2") == expected
    assert score_file(packed, "anli_r2") == expected
    assert expected["accuracy"] == 0.75


def test_score_file_hans_with_groups_and_mixed_label_forms(tmp_path):
    labels = ["entailment", 0, "Entailment", "non-entailment", "non_entailment", 1, 1, "NON-ENTAILMENT"]
    path = tmp_path / "hans.jsonl"
    write_lines(path, [
        {"id": i, "label": y, "completion": c, "heuristic": "lexical_overlap", "subcase": s}
        for i, (y, c, s) in enumerate(zip(labels, HANS_COMPLETIONS, HANS_SUBCASES))
    ])
    entry = score_file(path, "hans_lexical_overlap")
    assert entry == score_benchmark("hans_lexical_overlap", HANS_GOLDS, HANS_COMPLETIONS,
                                    {"heuristic": ["lexical_overlap"] * 8, "subcase": HANS_SUBCASES})
    assert entry["accuracy"] == 0.625
    assert entry["per_subcase"]["s_non1"]["accuracy"] == 1.0


@pytest.mark.parametrize("bad_line, message", [
    ('{"id": "b", "label": 0, "completion": "x"', r"line 2: not valid JSON .*one JSON object per line"),
    ('["b", 0, "x"]', r"line 2: a JSON list, expected a JSON object"),
    ('{"id": "b", "label": 0}', r"line 2: no 'completion'; every line needs \"id\", \"label\" and \"completion\""),
    ('{"label": 0, "completion": "x"}', r"line 2: no 'id'"),
    ('{"id": "b", "label": "maybe", "completion": "x"}',
     r"line 2: label 'maybe' is not a label of snli; expected 0 or 'entailment', 1 or 'neutral', 2 or 'contradiction'"),
    ('{"id": "b", "label": 3, "completion": "x"}', r"line 2: label 3 is not a label of snli"),
    ('{"id": "b", "label": "non-entailment", "completion": "x"}', r"line 2: label 'non-entailment'"),
    ('{"id": "b", "label": 0, "completion": null}', r"line 2: completion is NoneType, expected the generated text"),
    ('{"id": "a", "label": 0, "completion": "x"}', r"line 2: id 'a' already on line 1; each example must appear once"),
    ('{"id": "b", "label": 0, "completion": "x", "subcase": "s"}', r"line 2: group fields \['subcase'\] differ"),
])
def test_score_file_names_file_line_and_expectation(tmp_path, bad_line, message):
    path = tmp_path / "bad.jsonl"
    write_lines(path, ['{"id": "a", "label": 0, "completion": "x"}', bad_line])
    with pytest.raises(ValueError, match=message) as caught:
        score_file(path, "snli")
    assert str(path) in str(caught.value)


def test_score_file_rejects_empty_and_cut_gzip(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(ValueError, match="no examples"):
        score_file(empty, "snli")
    cut = tmp_path / "cut.jsonl.gz"
    write_lines(cut, [{"id": i, "label": 0, "completion": answer("entailment")} for i in range(500)], gzip.open)
    cut.write_bytes(cut.read_bytes()[:-40])
    with pytest.raises(ValueError, match="gzip stream is damaged or cut short"):
        score_file(cut, "snli")


# --- command line --------------------------------------------------------------------------------

def test_main_prints_metrics_and_writes_entry(tmp_path, capsys):
    path, out = tmp_path / "c.jsonl", tmp_path / "out" / "entry.json"
    write_lines(path, three_way_records())
    assert main(["--score", str(path), "--benchmark", "anli_r3", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "anli_r3: 10 examples" in printed
    assert "accuracy          0.7500" in printed
    assert "accuracy strict   0.6000" in printed
    assert "unparseable rate  0.2000  (2 of 10)" in printed
    assert "format rate       0.5000" in printed
    assert "contradiction" in printed and "0.8000" in printed
    assert json.loads(out.read_text()) == score_file(path, "anli_r3")


def test_main_prints_per_subcase(tmp_path, capsys):
    path = tmp_path / "hans.jsonl.gz"
    write_lines(path, [{"id": i, "label": g, "completion": c, "subcase": s}
                       for i, (g, c, s) in enumerate(zip(HANS_GOLDS, HANS_COMPLETIONS, HANS_SUBCASES))], gzip.open)
    assert main(["--score", str(path), "--benchmark", "hans_subsequence"]) == 0
    printed = capsys.readouterr().out
    assert "accuracy          0.6250  (HANS" in printed
    assert "accuracy strict   0.5000  (unparseable = wrong, not non-entailment)" in printed
    assert "subcase" in printed
    assert any(line.split() == ["s_ent", "0.3333", "0.3333", "3", "2"] for line in printed.splitlines())


def test_main_unknown_benchmark_and_bad_file(tmp_path, capsys):
    path = tmp_path / "c.jsonl"
    write_lines(path, three_way_records())
    assert main(["--score", str(path), "--benchmark", "anli"]) == 2
    err = capsys.readouterr().err
    assert "unknown benchmark 'anli'" in err and "anli_r1" in err and "diag_predicate_argument" in err
    write_lines(path, ['{"id": 1}'])
    assert main(["--score", str(path), "--benchmark", "snli"]) == 1
    assert "line 1: no 'label', 'completion'" in capsys.readouterr().err
    assert main(["--score", str(tmp_path / "missing.jsonl"), "--benchmark", "snli"]) == 1
    assert "missing.jsonl" in capsys.readouterr().err
