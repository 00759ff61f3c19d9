"""Time each optimizer step of a GRPO trainer by phase (generation, adapter sync, reference / old
log-probs, forward, backward, optimizer, the rest): the one clock the benchmarks
(`python -m nli_grpo.bench grpo_phases`) and the preflight (`python -m nli_grpo.preflight`) read.

    steps = attach_phase_timer(trainer); trainer.train()   # steps: [{phase: seconds, "step": total}, ...]
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable

PHASES = ("generation", "adapter_sync", "ref_old_logprobs", "forward", "backward", "optimizer", "other")


def time_calls(owner, attr: str, record: Callable[[float], None], when: Callable[[], bool] = lambda: True):
    """Replace `owner.attr` by a wrapper that hands each call's wall seconds to `record` (calls
    made while `when()` is false pass untimed). Returns the original, to put back."""
    inner = getattr(owner, attr)

    def timed(*args, **kwargs):
        if not when():
            return inner(*args, **kwargs)
        started = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            record(time.perf_counter() - started)
    setattr(owner, attr, timed)
    return inner


def attach_phase_timer(trainer) -> list[dict]:
    """Time each optimizer step of `trainer` by phase; returns the list it appends one
    {phase: seconds, "step": total} per step to. Generation is TRL's `_generate_single_turn`
    (less the adapter sync inside it), the reference / old log-probs its no-grad
    `_get_per_token_logps_and_entropies`, forward `compute_loss`, backward the accelerator's,
    the optimizer the time between transformers' pre- and post-optimizer-step callbacks; `other`
    is the rest of the step (rewards, advantages, data, logging inside the step)."""
    import torch
    from transformers import TrainerCallback

    steps: list[dict] = []
    current: dict[str, float] = collections.defaultdict(float)

    def add_to(phase: str) -> Callable[[float], None]:
        def add(seconds: float) -> None:
            current[phase] += seconds
        return add

    time_calls(trainer, "_generate_single_turn", add_to("generation"))
    time_calls(trainer, "_get_per_token_logps_and_entropies", add_to("ref_old_logprobs"), when=lambda: not torch.is_grad_enabled())
    time_calls(trainer, "compute_loss", add_to("forward"))
    time_calls(trainer.accelerator, "backward", add_to("backward"))
    if getattr(trainer, "hot_swap", None) is not None:
        time_calls(trainer.hot_swap, "sync", add_to("adapter_sync"))

    class Clock(TrainerCallback):
        began = optimizer_began = 0.0

        def on_step_begin(self, args, state, control, **kwargs):
            current.clear()
            self.began = time.perf_counter()

        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            self.optimizer_began = time.perf_counter()

        def on_optimizer_step(self, args, state, control, **kwargs):
            current["optimizer"] += time.perf_counter() - self.optimizer_began

        def on_step_end(self, args, state, control, **kwargs):
            total = time.perf_counter() - self.began
            phases = {p: current.get(p, 0.0) for p in PHASES if p != "other"}
            phases["generation"] -= phases["adapter_sync"]  # the sync runs inside generation
            phases["other"] = total - sum(phases.values())
            steps.append({**phases, "step": total})

    trainer.add_callback(Clock())
    return steps
