"""The evaluation stage (nli_grpo.evaluation): all 13 shipped sample sets through the real loaders
and scorer with a scripted "model" (exact, hand-checkable numbers), and an evaluation stopped
between sets that keeps what it finished."""

from __future__ import annotations

from nli_grpo.data import BENCHMARK_NAMES, BENCHMARKS, HANS, load_benchmark
from nli_grpo.evaluation import evaluate
from nli_grpo.job import config_for_run
from nli_grpo.layout import CellFolder
from nli_grpo.prompts import LABELS


def answer(label: str) -> str:
    return f"<think>because</think>\n<answer>{label}</answer>"


def scripted_completion(i: int, gold: int, hans: bool) -> str:
    """Example i: i % 4 == 0 unparseable, 1 wrong, 2 and 3 right. HANS golds are 0 entailment /
    1 non-entailment; "right" for non-entailment answers neutral (HANS counts it as non-entailment)."""
    if i % 4 == 0:
        return "I cannot decide."
    if hans:
        right, wrong = ("entailment", "contradiction") if gold == 0 else ("neutral", "entailment")
    else:
        right, wrong = LABELS[gold], LABELS[(gold + 1) % 3]
    return answer(right if i % 4 >= 2 else wrong)


class ScriptedGenerator:
    """Stands in for the model only: prompts are rendered, loaded, scored by the real code."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.by_prompt: dict[tuple[str, str], str] = {}  # (set, prompt): a pair can be in several sets

    def generate(self, prompts, desc):
        return [self.by_prompt[desc, p] for p in prompts]


def test_every_set_scores_exactly_as_the_protocol_says(tmp_path):
    from nli_grpo.models import load_tokenizer
    from nli_grpo.prompts import render_prompt

    cfg = config_for_run("smoke", ["eval.limit=null"], str(tmp_path))
    generator = ScriptedGenerator(load_tokenizer(cfg.model))
    expected = {}
    for name in BENCHMARK_NAMES:
        ds = load_benchmark(name, local_dir="samples", hub=False).dataset
        hans = BENCHMARKS[name].scoring == HANS
        for i, (p, h, gold) in enumerate(zip(ds["premise"], ds["hypothesis"], ds["label"])):
            generator.by_prompt[name, render_prompt(generator.tokenizer, p, h)] = scripted_completion(i, gold, hans)
        n = len(ds)
        unparseable = len(range(0, n, 4))
        right = sum(1 for i in range(n) if i % 4 >= 2)
        if hans:  # an unparseable answer counts as non-entailment (right when the gold is 1), but not strictly
            lenient = right + sum(1 for i in range(0, n, 4) if ds["label"][i] == 1)
            expected[name] = (round(lenient / n, 6), round(right / n, 6))
        else:     # unparseable answers leave numerator and denominator
            expected[name] = (round(right / (n - unparseable), 6), round(right / n, 6))
    block = evaluate(cfg, adapter=None, generator=generator)
    assert list(block) == list(BENCHMARK_NAMES)
    assert {name: (e["accuracy"], e["accuracy_strict"]) for name, e in block.items()} == expected
    assert block["snli"]["n_dropped"] == 1
    assert set(block["hans_subsequence"]["per_subcase"]) and all(
        e["format_rate"] == round(1 - e["unparseable_rate"], 6) for e in block.values())
    from nli_grpo.scoring import read_predictions, score_file

    predictions = CellFolder(tmp_path).predictions("anli_r1")
    records = read_predictions(predictions)
    assert len(records) == block["anli_r1"]["n"] and {"id", "label", "prediction", "completion"} <= set(records[0])
    # Re-scoring the saved predictions gives the same numbers.
    assert score_file(predictions, "anli_r1")["accuracy"] == block["anli_r1"]["accuracy"]


def test_a_stopped_evaluation_keeps_its_finished_sets_and_the_restart_does_only_the_rest(tmp_path):
    from nli_grpo.models import load_tokenizer
    from nli_grpo.process import StopRequest

    cfg = config_for_run("smoke", ["eval.benchmarks=[anli_r1,snli,hans_subsequence]"], str(tmp_path))

    class Unparseable(ScriptedGenerator):
        def generate(self, prompts, desc):
            self.asked.append(desc)
            return ["no answer"] * len(prompts)

    generator = Unparseable(load_tokenizer(cfg.model))
    generator.asked = []
    stop, saved = StopRequest(), []

    def after_each_set(block):
        saved.append(block)
        stop.event.set()  # e.g. USR2 arrived while the first set ran
    assert evaluate(cfg, None, stop=stop, generator=generator, on_set_done=after_each_set) is None
    assert generator.asked == ["anli_r1"] and list(saved[-1]) == ["anli_r1"]

    block = evaluate(cfg, None, generator=generator, done=saved[-1])
    assert generator.asked == ["anli_r1", "snli", "hans_subsequence"]
    assert list(block) == ["anli_r1", "snli", "hans_subsequence"] and block["anli_r1"] == saved[-1]["anli_r1"]
