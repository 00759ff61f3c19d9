"""The paper's prompt, label extraction and format check (reference/paper-facts.md, read from the
authors' code). These strings are part of the experimental protocol: changing a character changes
the numbers, so they are pinned by tests."""

from __future__ import annotations

import re

#: Label names in id order; the ids are the hub's (SNLI / MNLI / ANLI): 0, 1, 2.
LABELS = ("entailment", "neutral", "contradiction")
LABEL_IDS = {name: i for i, name in enumerate(LABELS)}
#: What `extract_label` returns when no answer tag is found.
UNPARSEABLE = -1

# The trailing newline is part of the authors' system message.
SYSTEM_PROMPT = (
    "Respond in the following format:\n"
    "<think>...</think>\n"
    "<answer>contradiction/entailment/neutral</answer>\n"
)

USER_TEMPLATE = (
    "You are given a Natural Language Inference (NLI) task. You are given a premise and a "
    "hypothesis, and you need to determine whether the hypothesis is a contradiction, entailment, "
    "or neutral given the premise.\n"
    "Premise: {premise}\n"
    "Hypothesis: {hypothesis}\n"
    "Given the premise, is the hypothesis a contradiction, entailment, or neutral? "
    "Think step-by-step.\n"
    "Use the following format for your response:\n"
    "<think>...</think>\n"
    "<answer>contradiction/entailment/neutral</answer>"
)

# Search order of the authors' parser: when a completion holds several answer tags, entailment
# wins over neutral, neutral over contradiction (not the first tag in the text).
_ANSWER_TAGS = [(f"<answer>{name}</answer>", LABEL_IDS[name]) for name in LABELS]
_FORMAT_RE = re.compile(r"<think>(.*?)</think>\s*<answer>(.*?)</answer>", re.DOTALL)


def build_messages(premise: str, hypothesis: str) -> list[dict[str, str]]:
    """Chat messages for one NLI pair: the paper's system message (which replaces Qwen's default
    one) and its user message, stripped of surrounding whitespace as the authors did."""
    user = USER_TEMPLATE.format(premise=premise, hypothesis=hypothesis).strip()
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}]


def render_prompt(tokenizer, premise: str, hypothesis: str) -> str:
    """The prompt text as the model sees it: the messages through the model's own chat template,
    ending with the assistant generation prompt."""
    return tokenizer.apply_chat_template(
        build_messages(premise, hypothesis), tokenize=False, add_generation_prompt=True
    )


def extract_label(completion: str) -> int:
    """Label id found in a completion, or UNPARSEABLE (-1).

    Case-insensitive literal search for `<answer>entailment</answer>`, then neutral, then
    contradiction; the first one found in that order wins, wherever it stands in the text."""
    text = completion.lower()
    for tag, label in _ANSWER_TAGS:
        if tag in text:
            return label
    return UNPARSEABLE


def format_ok(completion: str) -> bool:
    """True when the stripped completion is exactly `<think>...</think>` then `<answer>...</answer>`,
    with only whitespace between them and nothing before or after (the authors' full-match rule)."""
    return _FORMAT_RE.fullmatch(completion.strip()) is not None
