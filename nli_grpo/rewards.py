"""The paper's single reward function: 0.0 for a badly formatted completion, 0.1 for a well-formed
one, 1.0 for a well-formed one with the gold label."""

from __future__ import annotations

from .prompts import extract_label, format_ok

FORMAT_REWARD = 0.1
CORRECT_REWARD = 0.9


def nli_reward_one(completion: str, label: int) -> float:
    """Reward of one completion against its gold label id."""
    if not format_ok(completion):
        return 0.0
    return FORMAT_REWARD + (CORRECT_REWARD if extract_label(completion) == label else 0.0)


def _text(completion) -> str:
    # TRL passes plain strings for text prompts and [{"role": "assistant", "content": ...}] for
    # conversational ones.
    if isinstance(completion, list):
        return completion[-1]["content"]
    return completion


def nli_reward(completions: list, label: list[int], **_unused) -> list[float]:
    """TRL reward function: one float per completion. `label` is the dataset column of the same
    name, repeated by TRL once per generation."""
    return [nli_reward_one(_text(c), int(y)) for c, y in zip(completions, label)]
