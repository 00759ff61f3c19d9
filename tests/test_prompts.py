"""The prompt, the label parser, the format check and the reward are part of the experimental
protocol (paper-facts.md, "Prompt" and "Parsing and reward"): these tests pin them character for
character, with the expected text written out here rather than derived from the module."""

import pytest

from nli_grpo.models import build_tiny_tokenizer
from nli_grpo.prompts import (
    SYSTEM_PROMPT,
    UNPARSEABLE,
    USER_TEMPLATE,
    build_messages,
    extract_label,
    format_ok,
    render_prompt,
)
from nli_grpo.rewards import nli_reward, nli_reward_one

ENTAILMENT, NEUTRAL, CONTRADICTION = 0, 1, 2

PAPER_SYSTEM = """Respond in the following format:
<think>...</think>
<answer>contradiction/entailment/neutral</answer>
"""

PAPER_USER = """You are given a Natural Language Inference (NLI) task. You are given a premise and a hypothesis, and you need to determine whether the hypothesis is a contradiction, entailment, or neutral given the premise.
Premise: {premise}
Hypothesis: {hypothesis}
Given the premise, is the hypothesis a contradiction, entailment, or neutral? Think step-by-step.
Use the following format for your response:
<think>...</think>
<answer>contradiction/entailment/neutral</answer>"""

PREMISE = "A man is playing a guitar on stage."
HYPOTHESIS = "Nobody is outside."
QWEN_DEFAULT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


# --------------------------------------------------------------------------- prompt text
def test_prompt_strings_are_the_papers():
    assert SYSTEM_PROMPT == PAPER_SYSTEM
    assert USER_TEMPLATE == PAPER_USER


def test_build_messages_keeps_system_newline_and_strips_user():
    messages = build_messages("  " + PREMISE, HYPOTHESIS + "\n\n")
    assert [m["role"] for m in messages] == ["system", "user"]
    assert messages[0]["content"] == PAPER_SYSTEM
    assert messages[0]["content"].endswith("</answer>\n")
    # Only the message as a whole is stripped; whitespace inside the premise line stays.
    assert messages[1]["content"] == PAPER_USER.format(premise="  " + PREMISE, hypothesis=HYPOTHESIS + "\n\n").strip()
    assert messages[1]["content"].startswith("You are given")
    assert messages[1]["content"].endswith("<answer>contradiction/entailment/neutral</answer>")


def test_rendered_prompt_is_qwen25_chat_text(tokenizer):
    expected = (
        "<|im_start|>system\n" + PAPER_SYSTEM + "<|im_end|>\n"
        "<|im_start|>user\n" + PAPER_USER.format(premise=PREMISE, hypothesis=HYPOTHESIS) + "<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert render_prompt(tokenizer, PREMISE, HYPOTHESIS) == expected
    assert QWEN_DEFAULT_SYSTEM not in expected


def test_template_falls_back_to_qwen_default_system_message(tokenizer):
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hello"}], tokenize=False, add_generation_prompt=True
    )
    assert text == (
        f"<|im_start|>system\n{QWEN_DEFAULT_SYSTEM}<|im_end|>\n"
        "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n"
    )


# --------------------------------------------------------------------------- parsing
WELL_FORMED = "<think>The premise says he plays.</think>\n<answer>entailment</answer>"

# completion, extracted label, format_ok, reward against gold=entailment
CASES = {
    "well formed": (WELL_FORMED, ENTAILMENT, True, 1.0),
    "well formed, wrong label": ("<think>x</think><answer>neutral</answer>", NEUTRAL, True, 0.1),
    "contradiction": ("<think>x</think> <answer>contradiction</answer>", CONTRADICTION, True, 0.1),
    "newlines inside think": ("<think>step 1\n\nstep 2\n</think>\n\n<answer>entailment</answer>", ENTAILMENT, True, 1.0),
    "surrounding whitespace is stripped": ("\n  " + WELL_FORMED + "\n\n", ENTAILMENT, True, 1.0),
    "upper case tags and label": ("<THINK>x</THINK><ANSWER>Entailment</ANSWER>", ENTAILMENT, False, 0.0),
    "upper case label, lower tags": ("<think>x</think><answer>ENTAILMENT</answer>", ENTAILMENT, True, 1.0),
    "spaces inside answer tag": ("<think>x</think><answer> neutral </answer>", UNPARSEABLE, True, 0.1),
    "text before think": ("Sure! " + WELL_FORMED, ENTAILMENT, False, 0.0),
    "text after answer": (WELL_FORMED + " Hope this helps.", ENTAILMENT, False, 0.0),
    "missing think": ("<answer>entailment</answer>", ENTAILMENT, False, 0.0),
    "unclosed think": ("<think>x <answer>entailment</answer>", ENTAILMENT, False, 0.0),
    "text between think and answer": ("<think>x</think> so <answer>entailment</answer>", ENTAILMENT, False, 0.0),
    "empty": ("", UNPARSEABLE, False, 0.0),
    "no tags": ("entailment", UNPARSEABLE, False, 0.0),
    "unknown label": ("<think>x</think><answer>yes</answer>", UNPARSEABLE, True, 0.1),
    # Several answers: the fixed search order decides, not the position in the text. The
    # non-greedy format regex still fully matches, so the format reward is paid.
    "two answers, contradiction first": (
        "<think>x</think><answer>contradiction</answer><answer>entailment</answer>", ENTAILMENT, True, 1.0),
    "two answers, neutral then contradiction": (
        "<think>x</think><answer>contradiction</answer> <answer>neutral</answer>", NEUTRAL, True, 0.1),
    "answer tags inside think": (
        "<think><answer>contradiction</answer></think><answer>neutral</answer>", NEUTRAL, True, 0.1),
}


@pytest.mark.parametrize("completion, label", [(c[0], c[1]) for c in CASES.values()], ids=list(CASES))
def test_extract_label(completion, label):
    assert extract_label(completion) == label


@pytest.mark.parametrize("completion, ok", [(c[0], c[2]) for c in CASES.values()], ids=list(CASES))
def test_format_ok(completion, ok):
    assert format_ok(completion) is ok


@pytest.mark.parametrize("completion, reward", [(c[0], c[3]) for c in CASES.values()], ids=list(CASES))
def test_reward_one(completion, reward):
    assert nli_reward_one(completion, ENTAILMENT) == reward


@pytest.mark.parametrize("gold, reward", [(ENTAILMENT, 1.0), (NEUTRAL, 0.1), (CONTRADICTION, 0.1)])
def test_reward_depends_on_gold(gold, reward):
    assert nli_reward_one(WELL_FORMED, gold) == reward


def test_reward_takes_only_the_papers_values():
    rewards = {nli_reward_one(c[0], gold) for c in CASES.values() for gold in (0, 1, 2)}
    assert rewards == {0.0, 0.1, 1.0}


def test_trl_reward_function_text_and_conversational_forms():
    texts = [WELL_FORMED, "<think>x</think><answer>neutral</answer>", "no format", WELL_FORMED]
    labels = [ENTAILMENT, ENTAILMENT, ENTAILMENT, CONTRADICTION]
    expected = [1.0, 0.1, 0.0, 0.1]
    assert nli_reward(texts, labels) == expected
    conversational = [[{"role": "assistant", "content": t}] for t in texts]
    # TRL also passes the prompts and other dataset columns as keywords.
    assert nli_reward(conversational, label=labels, prompts=["p"] * 4, premise=["x"] * 4) == expected
