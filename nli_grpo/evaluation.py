"""The evaluation stage: the 13-set evaluation of a base model (the zero-shot baseline) or of base
+ LoRA adapter, under the paper's protocol (paper-facts.md): the paper's prompt through the
model's chat template, greedy decoding, one sample, at most 768 new tokens in a 1024-token
context, scored by `scoring.score_benchmark`. One engine serves every set; prompts go to it
sorted by length for throughput. `evaluate` returns the `eval` block; the job records it.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from .config import ExperimentConfig
from .data import fingerprint, load_benchmark
from .layout import CellFolder
from .prompts import render_prompt

log = logging.getLogger("nli_grpo.evaluation")


def adapter_rank(adapter: Path) -> int:
    """The LoRA rank of a PEFT adapter folder."""
    return json.loads((adapter / "adapter_config.json").read_text())["r"]


def _token_budget(prompt_len: int, max_new_tokens: int, max_model_len: int) -> int:
    """New tokens a prompt may get: the configured maximum, capped so prompt + completion fits
    the context (vLLM and HF then stop at the same place)."""
    return max(1, min(max_new_tokens, max_model_len - prompt_len))


class HFGenerator:
    """Generation with transformers, for machines without vLLM. Batches prompts of similar length
    together (sorted) so little compute goes to padding."""

    def __init__(self, cfg: ExperimentConfig, adapter: Path | None):
        import torch

        from .models import eval_dtype, load_base_model, load_tokenizer

        self.cfg = cfg
        self.tokenizer = load_tokenizer(cfg.model)
        self.tokenizer.padding_side = "left"
        model = load_base_model(cfg.model, eval_dtype(cfg, torch.cuda.is_available()))
        if adapter is not None:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, str(adapter))
        self.model = model.eval()

    def generate(self, prompts: list[str], desc: str) -> list[str]:
        """Greedy completions, one per prompt (the evaluation protocol)."""
        return [texts[0] for texts in self._run(prompts, desc, n=1, sample=False)]

    def sample(self, prompts: list[str], n: int, desc: str, seed: int | None = None) -> list[list[str]]:
        """`n` completions per prompt with the recipe's GRPO sampling settings; with `seed`, the
        same prompts give the same completions again (torch's generator is seeded first)."""
        if seed is not None:
            import torch

            torch.manual_seed(seed)
        return self._run(prompts, desc, n=n, sample=True)

    def _run(self, prompts: list[str], desc: str, n: int, sample: bool) -> list[list[str]]:
        import torch
        from tqdm.auto import tqdm

        g = self.cfg.grpo
        ids = [self.tokenizer(p, add_special_tokens=False).input_ids for p in prompts]
        budgets = [self._budget(len(x), sample) for x in ids]
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        out: list[list[str]] = [[] for _ in ids]
        size = max(1, self.cfg.eval.batch_size // n)
        for start in tqdm(range(0, len(order), size), desc=desc, unit="batch"):
            batch = order[start:start + size]
            enc = self.tokenizer.pad({"input_ids": [ids[i] for i in batch]}, return_tensors="pt").to(self.model.device)
            # Every decoding field explicit: transformers fills unset ones from the checkpoint's
            # generation_config (Qwen2.5-Instruct: repetition_penalty 1.05, top_k 20, top_p 0.8).
            sampling = (dict(do_sample=True, temperature=g.temperature, top_k=g.top_k, top_p=g.top_p) if sample
                        else dict(do_sample=False, temperature=None, top_k=None, top_p=None))
            with torch.no_grad():
                gen = self.model.generate(**enc, **sampling, repetition_penalty=1.0, num_return_sequences=n,
                                          max_new_tokens=max(budgets[i] for i in batch),
                                          pad_token_id=self.tokenizer.pad_token_id, eos_token_id=self.tokenizer.eos_token_id)
            new = gen[:, enc["input_ids"].shape[1]:]
            for row, i in enumerate(b for b in batch for _ in range(n)):
                # Each prompt keeps only its own budget: the same tokens it would get alone
                # (greedy decoding is causal), so a long neighbour changes nothing.
                out[i].append(self.tokenizer.decode(new[row, :budgets[i]], skip_special_tokens=True))
        return out

    def close(self) -> None:
        """Release the model (its memory goes back before anything else loads)."""
        self.model = None

    def _budget(self, prompt_len: int, sample: bool) -> int:
        if sample:
            return self.cfg.grpo.max_completion_length
        return _token_budget(prompt_len, self.cfg.eval.max_new_tokens, self.cfg.eval.max_model_len)


class VLLMGenerator:
    """Generation with vLLM; the adapter is served as a LoRA request on the base model."""

    def __init__(self, cfg: ExperimentConfig, adapter: Path | None):
        from .rollout import build_llm, take_parked_engine

        self.cfg = cfg
        rank = adapter_rank(adapter) if adapter is not None else None
        # The colocated rollout engine the training just used, when it was kept for this
        # evaluation (rollout.eval_reuses_rollout_engine); else an engine of its own.
        self.llm = take_parked_engine() or build_llm(cfg, purpose="eval", lora_rank=rank)
        self.tokenizer = self.llm.get_tokenizer()
        self.lora = None
        if adapter is not None:
            from vllm.lora.request import LoRARequest

            self.lora = LoRARequest("eval_adapter", 1, str(adapter))

    def generate(self, prompts: list[str], desc: str) -> list[str]:
        """Greedy completions, one per prompt (the evaluation protocol)."""
        return [texts[0] for texts in self._run(prompts, desc, n=1, sample=False)]

    def sample(self, prompts: list[str], n: int, desc: str, seed: int | None = None) -> list[list[str]]:
        """`n` completions per prompt with the recipe's GRPO sampling settings; each request is
        seeded (`seed`, else the run's), so a prompt gives the same completions in any batch."""
        return self._run(prompts, desc, n=n, sample=True, seed=self.cfg.seed if seed is None else seed)

    def _run(self, prompts: list[str], desc: str, n: int, sample: bool, seed: int | None = None) -> list[list[str]]:
        from vllm import SamplingParams

        g, e = self.cfg.grpo, self.cfg.eval
        ids = [self.tokenizer(p, add_special_tokens=False).input_ids for p in prompts]
        if sample:
            params = SamplingParams(n=n, temperature=g.temperature, top_k=g.top_k or -1, top_p=g.top_p,
                                    max_tokens=g.max_completion_length, skip_special_tokens=True, seed=seed)
        else:
            params = [SamplingParams(temperature=0.0, max_tokens=_token_budget(len(x), e.max_new_tokens, e.max_model_len),
                                     skip_special_tokens=True) for x in ids]
        log.info("%s: generating %d x %d completions", desc, len(ids), n)
        outputs = self.llm.generate([{"prompt_token_ids": x} for x in ids], params, lora_request=self.lora, use_tqdm=True)
        return [[c.text for c in o.outputs] for o in outputs]


    def close(self) -> None:
        """Shut the engine down: its worker processes hold the memory until then."""
        if self.llm is not None:
            self.llm.llm_engine.engine_core.shutdown()
            self.llm = None


def make_generator(cfg: ExperimentConfig, adapter: Path | None):
    return (VLLMGenerator if cfg.eval.backend == "vllm" else HFGenerator)(cfg, adapter)


def evaluate(cfg: ExperimentConfig, adapter: Path | None, stop=None, generator=None,
             done: dict | None = None, on_set_done=None) -> dict | None:
    """Evaluate the base model (adapter None: the zero-shot baseline) or base + adapter on
    cfg.eval.benchmarks. Writes per-example predictions under `<output.dir>/predictions/` and
    returns the `eval` block of result.json, or None when a stop was requested between sets.

    `done`: entries of sets already evaluated (a resumed job), kept and not redone;
    `on_set_done(block)` is called after each set, so a stopped job loses no finished set."""
    from .scoring import GROUP_FIELDS, prediction_records, score_benchmark, write_predictions

    block = {name: entry for name, entry in (done or {}).items() if name in cfg.eval.benchmarks}
    todo = [name for name in cfg.eval.benchmarks if name not in block]
    if todo and stop is not None and stop.is_set():
        return None
    owned = generator is None and bool(todo)  # an engine started here is shut down here
    if owned:
        generator = make_generator(cfg, adapter)
    try:
        for name in todo:
            if stop is not None and stop.is_set():
                return None
            bench = load_benchmark(name, local_dir=cfg.data.local_dir, files=cfg.data.files, hub=cfg.data.hub, limit=cfg.eval.limit)
            ds = bench.dataset
            prompts = [render_prompt(generator.tokenizer, p, h) for p, h in zip(ds["premise"], ds["hypothesis"])]
            started = time.time()
            completions = generator.generate(prompts, desc=name)
            groups = {c: list(ds[c]) for c in GROUP_FIELDS if c in ds.column_names}
            entry = score_benchmark(name, ds["label"], completions, groups or None)
            entry.update(source=bench.source, n_dropped=bench.n_dropped, fingerprint=fingerprint(ds),
                         seconds=round(time.time() - started, 2))
            records = prediction_records(name, ds["id"], ds["label"], completions, groups or None)
            write_predictions(CellFolder(cfg.output.dir).predictions(name), records)
            block[name] = entry
            if on_set_done is not None:
                on_set_done(dict(block))
            log.info("%s: accuracy %s (strict %s, unparseable %.3f, n %d)", name, entry["accuracy"],
                     entry["accuracy_strict"], entry["unparseable_rate"], entry["n"])
    finally:
        if owned:
            generator.close()
    return {name: block[name] for name in cfg.eval.benchmarks}
