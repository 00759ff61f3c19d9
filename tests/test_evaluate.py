"""The evaluation job: all 13 shipped sample sets through the real loaders and scorer with a
scripted "model" (exact, hand-checkable numbers), and the command line on the tiny model."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from nli_grpo import results
from nli_grpo.data import BENCHMARK_NAMES, BENCHMARKS, HANS, load_benchmark
from nli_grpo.evaluate import evaluate_run, main
from nli_grpo.prompts import LABELS
from nli_grpo.train import config_for_run


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
        if hans:  # an unparseable answer counts as non-entailment: right when the gold is 1
            right += sum(1 for i in range(0, n, 4) if ds["label"][i] == 1)
            expected[name] = (round(right / n, 6), round(right / n, 6))
        else:     # unparseable answers leave numerator and denominator
            expected[name] = (round(right / (n - unparseable), 6), round(right / n, 6))
    block = evaluate_run(cfg, adapter=None, generator=generator)
    assert list(block) == list(BENCHMARK_NAMES)
    assert {name: (e["accuracy"], e["accuracy_strict"]) for name, e in block.items()} == expected
    assert block["snli"]["n_dropped"] == 1
    assert set(block["hans_subsequence"]["per_subcase"]) and all(
        e["format_rate"] == round(1 - e["unparseable_rate"], 6) for e in block.values())
    from nli_grpo.scoring import predictions_path, read_predictions, score_file

    records = read_predictions(predictions_path(tmp_path, "anli_r1"))
    assert len(records) == block["anli_r1"]["n"] and {"id", "label", "prediction", "completion"} <= set(records[0])
    # Re-scoring the saved predictions gives the same numbers.
    assert score_file(predictions_path(tmp_path, "anli_r1"), "anli_r1")["accuracy"] == block["anli_r1"]["accuracy"]


@pytest.mark.slow
def test_command_line_zero_shot_and_adapter(tmp_path):
    from peft import get_peft_model

    from nli_grpo.config import LoraConfig, ModelConfig
    from nli_grpo.models import load_base_model, peft_lora_config

    common = ["--base", "tiny", "--config", "smoke", "--backend", "hf", "--limit", "2", "--benchmarks", "anli_r1,hans_subsequence"]
    assert main([*common, "--out", str(tmp_path / "zs")]) == 0
    doc = results.read_result(tmp_path / "zs" / results.RESULT_FILENAME)
    assert doc["status"] == "complete" and doc["cell"]["stage"] == "zero_shot" and doc["cell"]["lora_rank"] is None
    assert sorted(doc["eval"]) == ["anli_r1", "hans_subsequence"] and doc["train"] is None

    adapter = tmp_path / "adapter"
    get_peft_model(load_base_model(ModelConfig(name_or_path="tiny"), torch.float32),
                   peft_lora_config(LoraConfig(rank=4))).save_pretrained(adapter)
    assert main([*common, "--adapter", str(adapter), "--out", str(tmp_path / "ad")]) == 0
    doc = results.read_result(tmp_path / "ad" / results.RESULT_FILENAME)
    assert doc["status"] == "complete" and doc["cell"]["lora_rank"] == 4 and doc["adapter"] == str(adapter.resolve())
    assert json.loads((tmp_path / "ad" / results.RESULT_FILENAME).read_text())["eval"]["anli_r1"]["n"] == 2
    assert main([*common, "--adapter", str(tmp_path)]) == 2  # not an adapter folder: refused


def test_a_stopped_evaluation_keeps_its_finished_sets_and_the_restart_does_only_the_rest(tmp_path):
    from nli_grpo.models import load_tokenizer
    from nli_grpo.train import StopRequest

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
    assert evaluate_run(cfg, None, stop=stop, generator=generator, on_set_done=after_each_set) is None
    assert generator.asked == ["anli_r1"] and list(saved[-1]) == ["anli_r1"]

    block = evaluate_run(cfg, None, generator=generator, done=saved[-1])
    assert generator.asked == ["anli_r1", "snli", "hans_subsequence"]
    assert list(block) == ["anli_r1", "snli", "hans_subsequence"] and block["anli_r1"] == saved[-1]["anli_r1"]


@pytest.mark.parametrize("limit", ["0", "-1"])
def test_a_limit_below_one_is_refused_before_any_model_is_loaded(tmp_path, capsys, limit):
    assert main(["--base", "tiny", "--config", "smoke", "--limit", limit, "--out", str(tmp_path / "x")]) == 2
    assert f"eval.limit={limit} must be a positive number" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_help_lists_both_modes():
    text = subprocess.run([sys.executable, "-m", "nli_grpo.evaluate", "--help"], capture_output=True, text=True).stdout
    for option in ("--base", "--adapter", "--limit", "--score", "--benchmark", "--force", "--out"):
        assert option in text, option


def test_score_mode_takes_no_model_options(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--score", str(tmp_path / "x.jsonl"), "--benchmark", "snli", "--base", "tiny"])
    assert exit_.value.code == 2 and "takes no --base" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--score", str(tmp_path / "x.jsonl")])
    assert "--score needs --benchmark" in capsys.readouterr().err


@pytest.mark.slow
def test_an_adapter_is_evaluated_on_its_own_base_and_overrides_go_anywhere(tmp_path):
    """No --base: the base is the one the adapter names (here the tiny stand-in), not the
    recipe's (paper: a 7B AWQ checkpoint); key=value overrides on both sides of the options."""
    from peft import get_peft_model

    from nli_grpo.config import LoraConfig, ModelConfig
    from nli_grpo.models import adapter_base_model, load_base_model, peft_lora_config

    adapter = tmp_path / "adapter"
    get_peft_model(load_base_model(ModelConfig(name_or_path="tiny"), torch.float32),
                   peft_lora_config(LoraConfig(rank=4))).save_pretrained(adapter)
    assert adapter_base_model(adapter) == "tiny"
    out = tmp_path / "ad"
    assert main(["--config", "paper", "data.local_dir=samples", "--adapter", str(adapter), "--backend", "hf",
                 "--limit", "1", "--benchmarks", "anli_r1", "data.hub=false", "--out", str(out), "eval.max_new_tokens=4"]) == 0
    doc = results.read_result(out / results.RESULT_FILENAME)
    assert doc["cell"]["model"] == "tiny" and doc["cell"]["quantization"] == "bf16" and doc["cell"]["lora_rank"] == 4
    assert doc["config"]["eval"]["max_new_tokens"] == 4 and doc["eval"]["anli_r1"]["n"] == 1
    # another adapter into the same folder would mix two models' predictions: refused, then --force
    other = tmp_path / "other"
    get_peft_model(load_base_model(ModelConfig(name_or_path="tiny"), torch.float32),
                   peft_lora_config(LoraConfig(rank=4))).save_pretrained(other)
    common = ["--config", "paper", "data.local_dir=samples", "data.hub=false", "--backend", "hf", "--limit", "1",
              "--benchmarks", "anli_r1", "--out", str(out), "eval.max_new_tokens=4"]
    assert main([*common, "--adapter", str(other)]) == 2
    assert main([*common, "--adapter", str(other), "--force"]) == 0
    assert results.read_result(out / results.RESULT_FILENAME)["adapter"] == str(other.resolve())
    assert len(list((tmp_path / ".replaced").iterdir())) == 1
