"""vLLM rollouts by adapter hot-swap, for real on vLLM's CPU build: the policy learns through them,
each generation batch is sampled from the current adapter (not a stale copy), also when one batch
serves four optimizer steps (num_iterations=4), and vLLM evaluation agrees with HF.

One training run (one vLLM engine, ~20 s to start here) serves the tests of this module; no test
changes what another one reads, so they pass in any order and alone."""

from __future__ import annotations

import pytest
import torch

from nli_grpo import results
from nli_grpo.evaluation import HFGenerator, VLLMGenerator, evaluate
from nli_grpo.job import config_for_run
from nli_grpo.layout import CellFolder
from nli_grpo.process import StopRequest
from nli_grpo.prompts import render_prompt
from nli_grpo.training import build_trainer

pytestmark = [pytest.mark.slow, pytest.mark.vllm]

#: Four optimizer steps per generation batch (the paper's num_iterations).
ITERATIONS = 4

PAIRS = [
    ("A man is playing a guitar on stage.", "A man is performing music."),
    ("Two dogs run across the field.", "The animals are asleep."),
    ("The woman is reading a book in the park.", "Someone is outdoors."),
]


@pytest.fixture(scope="module")
def vllm_run(tmp_path_factory, learning_task):
    """A GRPO run with vLLM rollouts on the learning-signal task, 4 optimizer steps per batch.
    Yields the config, the live trainer and the policy versions published during training.

    80 steps are 20 generation batches: the reward takes off after about 9 batches on this
    machine and later on others (CI's CPU once took 11 of 12), so the last fifth lies well past it."""
    out = tmp_path_factory.mktemp("vllm_run")
    cfg = config_for_run("smoke", [*learning_task.overrides, "rollout.backend=vllm", f"grpo.num_iterations={ITERATIONS}",
                                   "grpo.max_steps=80"], str(out))
    trainer, _ = build_trainer(cfg, StopRequest(), reward_funcs=[learning_task.reward])
    trainer.train()
    yield cfg, trainer, list(trainer.hot_swap.published_steps)
    trainer.close_rollout()


def test_learning_signal_with_vllm_rollouts(vllm_run):
    cfg, trainer, published = vllm_run
    rewards = [r["reward"] for r in results.read_train_log(CellFolder(cfg.output.dir).train_log) if "reward" in r]
    fifth = len(rewards) // 5
    first, last = sum(rewards[:fifth]) / fifth, sum(rewards[-fifth:]) / fifth
    assert trainer.state.global_step == cfg.grpo.max_steps
    assert last >= 3 * first, (first, last)
    # Every generation batch (one per 4 updates) was sampled from a new, small adapter version:
    # the policy after exactly the updates made so far.
    assert published == list(range(0, cfg.grpo.max_steps, ITERATIONS))
    assert 0 < trainer.hot_swap.bytes_last_sync < 5_000_000


def test_hot_swapped_adapter_generates_exactly_what_hf_generates(vllm_run, hf_greedy_tokens):
    from vllm import SamplingParams

    cfg, trainer, _ = vllm_run
    tokenizer = trainer.processing_class
    prompt_ids = [tokenizer(render_prompt(tokenizer, p, h), add_special_tokens=False).input_ids for p, h in PAIRS]
    # The policy after the last update, published as the next generation would (idempotent).
    outputs = trainer.rollout_generate(prompt_ids, SamplingParams(temperature=0.0, max_tokens=12))
    assert trainer.hot_swap.version_step == cfg.grpo.max_steps
    vllm_tokens = [list(o.outputs[0].token_ids) for o in outputs]

    model = trainer.accelerator.unwrap_model(trainer.model).eval()
    hf_tokens = hf_greedy_tokens(model, tokenizer, prompt_ids, max_new_tokens=12)
    assert vllm_tokens == hf_tokens
    # The trained adapter changed what the model says: a stale (initial) adapter would differ.
    with torch.no_grad(), model.disable_adapter():
        base = model.generate(input_ids=torch.tensor([prompt_ids[0]]), do_sample=False, max_new_tokens=12,
                              pad_token_id=tokenizer.pad_token_id)[0, len(prompt_ids[0]):].tolist()
    assert base != hf_tokens[0]


def test_vllm_and_hf_evaluation_agree(vllm_run, tmp_path):
    """The trained adapter, saved, evaluated by a vLLM engine of its own and by HF generate."""
    _, trainer, _ = vllm_run
    adapter = tmp_path / "adapter"
    trainer.accelerator.unwrap_model(trainer.model).save_pretrained(adapter)
    eval_cfg = config_for_run("smoke", ["eval.max_new_tokens=12", "eval.limit=4"], str(tmp_path / "eval"))
    by_backend = {}
    for generator_cls in (VLLMGenerator, HFGenerator):
        generator = generator_cls(eval_cfg, adapter)
        by_backend[generator_cls.__name__] = evaluate(eval_cfg, adapter, generator=generator)
        if hasattr(generator, "close"):
            generator.close()
    vllm_block, hf_block = by_backend["VLLMGenerator"], by_backend["HFGenerator"]
    assert vllm_block.keys() == hf_block.keys() and len(vllm_block) == 13
    for name in vllm_block:
        for key in ("accuracy", "accuracy_strict", "unparseable_rate", "n", "confusion"):
            assert vllm_block[name][key] == hf_block[name][key], (name, key)
