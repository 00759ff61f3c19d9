"""`tiny-sft`: the tiny random Qwen2 after a few seconds of supervised fine-tuning (TRL's
SFTTrainer) on completions in the paper's format, built from the hand-written training sample
shipped with the package (nli_grpo/samples).

Why it exists: a random model never writes a parseable answer, so under the paper's reward every
completion scores 0, every GRPO step is skipped and the smoke tables say "no parse". After this
warm start greedy answers parse, while sampled ones still often break the format and the labels
are guesses: GRPO has a reward to climb, and the smoke run shows it climbing. The SFT is kept
short on purpose: it teaches the format, not the task.
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

from .data import load_train_source
from .prompts import LABELS, build_messages

#: Bumped whenever the targets or the SFT settings change, so cached warm starts rebuild.
WARM_START_VERSION = 1
#: The training sample it learns from: the smoke recipe's training pool.
SOURCE = "anli_train_r1"
#: The reasoning part of every target: one fixed sentence whatever the label, so that the label
#: is decided in the answer tag alone, where GRPO's reward can move it.
THINK = "Compare the premise with the hypothesis."
#: A few seconds on one CPU core: enough for greedy answers to parse on every evaluation set,
#: not for sampled ones (temperature 0.9) to always do, which leaves GRPO something to learn.
SFT_SETTINGS = dict(max_steps=14, per_device_train_batch_size=8, learning_rate=1e-3, lr_scheduler_type="constant")


def sft_target(label: int) -> str:
    """The completion the warm start teaches for a gold label id: THINK in the think tags, then
    the label in the answer tags (what `prompts.format_ok` accepts and `rewards` pays 1.0 for)."""
    return f"<think>{THINK}</think>\n<answer>{LABELS[label]}</answer>"


def sft_records() -> list[dict]:
    """The SFT data, as TRL conversational prompt-completion records: the paper's prompt messages
    for every row of the shipped training sample, and the target of its gold label; each row
    twice, the second time with the premise cut to its first sentence. ANLI premises are
    paragraphs; the evaluation sets' are often one sentence (SNLI, HANS, the diagnostics), and a
    model that only ever answered after a paragraph loses the format after a sentence. (The cut
    may change the gold label; the warm start teaches the format, not the task.)"""
    rows = load_train_source(SOURCE, local_dir="samples", hub=False).dataset
    pairs = list(zip(rows["premise"], rows["hypothesis"], rows["label"]))
    pairs += [(first_sentence(premise), hypothesis, label) for premise, hypothesis, label in pairs]
    return [
        {"prompt": build_messages(premise, hypothesis), "completion": [{"role": "assistant", "content": sft_target(label)}]}
        for premise, hypothesis, label in pairs
    ]


def first_sentence(text: str) -> str:
    """Text up to its first sentence end (`.`, `!` or `?` followed by a space); all of it if none."""
    return re.split(r"(?<=[.!?])\s", text.strip(), maxsplit=1)[0]


def describe() -> dict:
    """What a warm-started model records about how it was made (its stand-in file)."""
    return {"version": WARM_START_VERSION, "source": SOURCE, "think": THINK, **SFT_SETTINGS}


def warm_start(base: str | Path, out: str | Path, seed: int = 0, **settings) -> None:
    """Fine-tune the model in folder `base` (weights and tokenizer) on `sft_records()`, all
    weights, in float32 on the CPU, and save it with its tokenizer into folder `out`. The loss is
    on the completion only (TRL's default for prompt-completion data), and the chat template ends
    each target with the end-of-turn token, so the model also learns to stop. `settings` replace
    some of SFT_SETTINGS (a real pretrained model needs fewer steps at a smaller rate)."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    settings = {**SFT_SETTINGS, **settings}
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    with tempfile.TemporaryDirectory(prefix="nli_grpo_sft.") as scratch:
        args = SFTConfig(
            output_dir=scratch, **settings, warmup_steps=0, weight_decay=0.0, seed=seed, data_seed=seed,
            use_cpu=True, bf16=False, fp16=False, max_length=None, save_strategy="no", report_to="none",
            logging_steps=settings["max_steps"], disable_tqdm=True, dataloader_num_workers=0,
        )
        SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(sft_records()), processing_class=tokenizer).train()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
