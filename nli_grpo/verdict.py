"""Preflight verdicts, the light half (no torch): which combination of a sweep a preflight stands
for, the rules that turn its measurements into pass / warn / fail with reasons a user can act on,
and reading a verdict file back on the login side.

    name = combination(cfg)                       # e.g. qwen2.5-7b__awq__vllm__g1
    doc = read_verdict(layout.preflight_file(sweep_dir, name))
    doc["verdict"], doc["reasons"]

The measuring half (GRPO steps, the sampler-vs-trainer agreement) is nli_grpo.preflight; the file
lives at `results/<sweep>/preflight/<combination>.json` (nli_grpo.layout.preflight_file).
"""

from __future__ import annotations

import math
import os
import re

from .catalog import model_key
from .config import ExperimentConfig, PreflightConfig
from .results import ResultError, load_json

VERDICT_SCHEMA_VERSION = 1
VERDICTS = ("pass", "warn", "fail")


def combination(cfg: ExperimentConfig) -> str:
    """The preflight a cell needs: its base model, quantization, rollout backend (with the server's
    GPUs) and GPUs per job. Cells that differ only in LoRA rank, seed or loss settings share one
    (they load, generate and fit alike), e.g. `qwen2.5-7b__awq__vllm__g1`, `tiny-sft__bf16__hf__g0`."""
    rollout = cfg.rollout.backend
    if rollout == "vllm_server":
        rollout += f"{cfg.rollout.server_gpus}"
    parts = [cfg.model.key or model_key(cfg.model.name_or_path), cfg.model.quantization, rollout,
             f"g{cfg.resources.gpus_per_node}"]
    return re.sub(r"[^A-Za-z0-9._-]+", "-", "__".join(parts))


def refusal(cfg: ExperimentConfig) -> str | None:
    """Why this config cannot be preflighted here (checked before anything is loaded)."""
    if cfg.stage != "grpo":
        return f"stage={cfg.stage}: a preflight measures training; zero-shot cells only evaluate"
    return None  # rollout.backend=vllm_server too: the preflight starts the server as the cell's job does


def finding(level: str, check: str, reason: str) -> dict:
    """One finding of a preflight: `level` warn or fail, the `check` it comes from, the `reason`."""
    return {"level": level, "check": check, "reason": reason}


def overall(findings: list[dict]) -> str:
    """The verdict: the worst level among the findings, `pass` when there are none."""
    levels = {f["level"] for f in findings}
    return "fail" if "fail" in levels else "warn" if "warn" in levels else "pass"


def agreement_findings(agreement: dict, t: PreflightConfig) -> list[dict]:
    """Sampler vs trainer: per state (`base`, `adapter`) the mean / max |delta log p| per token
    against the thresholds; the adapter changes the sampler's greedy output (it is applied), the
    sampler's greedy output matches HF's with the adapter, a republished version is served fresh;
    and the sampler runs in the trainer's dtype."""
    out = []
    if agreement.get("applies", True) and agreement.get("sampler_dtype") != agreement.get("trainer_dtype"):
        out.append(finding("fail", "agreement", f"the sampler runs in {agreement.get('sampler_dtype')} but the trainer computes in "
                           f"{agreement.get('trainer_dtype')}: rollouts come from another model than the one trained; "
                           "check model.dtype / grpo.mixed_precision and the rollout engine's dtype"))
    for state, figures in agreement.get("logprob_delta", {}).items():
        if figures["mean"] > t.max_mean_logprob_delta:
            out.append(finding("fail", "agreement", f"{state}: the sampler's and the trainer's log-probs of the same tokens differ by "
                               f"{figures['mean']:.4g} per token on average (> preflight.max_mean_logprob_delta="
                               f"{t.max_mean_logprob_delta}, max {figures['max']:.4g}): rollouts are off-policy; check that the "
                               "adapter reaches the sampler and both run in the same dtype"))
        elif figures["max"] > t.max_token_logprob_delta:
            out.append(finding("warn", "agreement", f"{state}: one token's log-prob differs by {figures['max']:.4g} between sampler and "
                               f"trainer (> preflight.max_token_logprob_delta={t.max_token_logprob_delta}; mean "
                               f"{figures['mean']:.4g} is fine)"))
    greedy = agreement.get("greedy", {})
    if greedy and not greedy["adapter_applied"]:
        out.append(finding("fail", "agreement", f"a published non-zero adapter did not change the {greedy['sampler']} sampler's greedy "
                           "output: it generates from the base, not from the policy being trained (the adapter is not applied); "
                           "if the sampler is right, raise preflight.perturbation_std"))
    elif greedy and greedy["matching_prompts"] < greedy["prompts"]:
        out.append(finding("warn", "agreement", f"the sampler's greedy output with the adapter matches HF generate's on "
                           f"{greedy['matching_prompts']} of {greedy['prompts']} prompts ({greedy['tokens']} tokens each)"))
    if greedy and greedy.get("stale"):
        out.append(finding("fail", "agreement", "after the adapter was republished the sampler still generated what the previous "
                           "version generates: it serves a stale adapter (a reused LoRA id or name?)"))
    return out


def memory_findings(memory: dict, t: PreflightConfig) -> list[dict]:
    """Measured peak against the memory asked for (per GPU on a GPU, the job's host memory on a
    CPU) and, on a GPU, against the sweep validator's estimate."""
    out = []
    peak, limit, what = memory["peak_gb"], memory["limit_gb"], memory["limit_field"]
    if peak > limit:
        out.append(finding("fail", "memory", f"peak memory {peak:.2f} GB > {limit} GB asked for ({what}): the cells would be killed "
                           f"(out of memory); raise {what}, use a quantized base, fewer grpo.completions_per_step or more "
                           "grpo.gradient_accumulation_steps"))
    elif peak > t.memory_headroom * limit:
        out.append(finding("warn", "memory", f"peak memory {peak:.2f} GB is over {t.memory_headroom:.0%} of the {limit} GB asked for "
                           f"({what}; preflight.memory_headroom): little room for longer completions"))
    estimate = memory.get("estimate_gb")
    if estimate is not None and peak > estimate:
        out.append(finding("warn", "memory", f"peak memory {peak:.2f} GB exceeds the sweep validator's estimate {estimate} GB "
                           "(grid.estimate_gpu_memory): its memory fit lets through cells that may not fit"))
    return out


def project_fit(seconds_per_step: float, load_s: float, eval_s: float, max_steps: int, timeout_min: int, gpus: int,
                signal_delay_s: float, save_s: float, save_steps: int) -> dict:
    """The measured rate projected to one cell: load + max_steps steps + evaluation, against the
    time before USR2 (`--time` minus the signal delay); GPU-hours; the checkpoint cadence."""
    total = load_s + max_steps * seconds_per_step + eval_s
    budget = timeout_min * 60 - signal_delay_s
    return {
        "projected_s": round(total, 1), "train_s": round(max_steps * seconds_per_step, 1), "eval_s": round(eval_s, 1),
        "load_s": round(load_s, 1), "time_limit_min": timeout_min, "signal_delay_s": signal_delay_s,
        "budget_s": budget, "starts_needed": max(1, math.ceil(total / budget)) if budget > 0 else None,
        "gpu_hours": round(total / 3600 * gpus, 3), "hours": round(total / 3600, 3),
        "save_s": round(save_s, 2), "save_steps": save_steps, "checkpoint_interval_s": round(save_steps * seconds_per_step, 1),
        "stop_s": round(seconds_per_step + save_s, 2),
    }


def fit_findings(fit: dict, t: PreflightConfig) -> list[dict]:
    """Time and checkpoint findings from project_fit's figures."""
    out = []
    total, budget = fit["projected_s"], fit["budget_s"]
    ask = math.ceil((total + fit["signal_delay_s"]) / 60)
    if total > budget:
        out.append(finding("fail", "time", f"a cell needs ~{total / 60:.1f} min (load {fit['load_s']} s + training {fit['train_s']} s + "
                           f"evaluation {fit['eval_s']} s) but gets {budget / 60:.1f} min before USR2 (--time {fit['time_limit_min']} min "
                           f"- {fit['signal_delay_s']} s): it would stop and requeue {fit['starts_needed'] or 'many'} times over; ask for --time {ask} "
                           "(resources.timeout_min) or fewer grpo.max_steps"))
    elif total > t.time_headroom * budget:
        out.append(finding("warn", "time", f"a cell needs ~{total / 60:.1f} min, over {t.time_headroom:.0%} of the {budget / 60:.1f} min "
                           f"before USR2 (preflight.time_headroom): a slower node would not finish; consider --time {ask}"))
    if fit["stop_s"] > fit["signal_delay_s"]:
        out.append(finding("fail", "checkpoint", f"on USR2 the job finishes its step and saves: ~{fit['stop_s']} s, more than the "
                           f"{fit['signal_delay_s']} s the signal leaves: preemption would lose the work since the last checkpoint"))
    if fit["checkpoint_interval_s"] > t.max_checkpoint_interval_min * 60:
        out.append(finding("warn", "checkpoint", f"grpo.save_steps={fit['save_steps']} is ~{fit['checkpoint_interval_s'] / 60:.0f} min "
                           f"of training (> preflight.max_checkpoint_interval_min={t.max_checkpoint_interval_min}): a node failure "
                           "without USR2 loses that much; lower grpo.save_steps"))
    return out


def death_findings(death: dict, limit_gb: float) -> list[dict]:
    """Why a preflight's measuring process ended without a verdict (nli_grpo.preflight watches it
    from a parent process): `death` says how (`signal`, `exitcode`, `killed_by`), while doing what
    (`phase`), its `peak_rss_gb` as sampled and, for an exception, its `error` (the traceback's last
    lines). A SIGKILL is the memory's doing (the OOM killer, Slurm's limit, or the preflight
    enforcing `limit_gb`, resources.mem_gb); any other death is the run's."""
    phase, peak = death.get("phase") or "starting", death.get("peak_rss_gb")
    seen = f"; its processes held {peak:.2f} GB resident at most (sampled)" if peak is not None else ""
    todo = ("raise resources.mem_gb, use a quantized base (model.quantization) or fewer grpo.completions_per_step "
            "(more grpo.gradient_accumulation_steps)")
    error = (death.get("error") or "").strip()
    if death.get("killed_by") == "preflight":
        return [finding("fail", "memory", f"the preflight's processes held {peak:.2f} GB resident while {phase}, over the "
                        f"{limit_gb} GB a cell asks for (resources.mem_gb): the preflight killed them (SIGKILL) as Slurm's "
                        f"memory limit would kill the cell's job; {todo}")]
    if death.get("signal") == "SIGKILL":
        return [finding("fail", "memory", f"the preflight process was killed (SIGKILL, most likely the out-of-memory killer) "
                        f"while {phase}{seen}, with {limit_gb} GB asked for (resources.mem_gb); {todo}; see dmesg or "
                        "`sacct -j <job> -o JobID,State,MaxRSS`")]
    if death.get("signal"):
        return [finding("fail", "run", f"the preflight process died of {death['signal']} while {phase}{seen} (a crash in "
                        "native code or a node fault?); see the job's log, then run the preflight again")]
    last = error.splitlines()[-1].rstrip(".") if error else "no error was reported; see the job's log"
    if "OutOfMemoryError" in error:  # torch's CUDA out of memory: the GPU's, not the host's
        return [finding("fail", "memory", f"out of GPU memory while {phase}: {last}; use a quantized base "
                        "(model.quantization), fewer grpo.completions_per_step or a smaller rollout.gpu_memory_utilization")]
    return [finding("fail", "run", f"the preflight failed while {phase} (exit status {death.get('exitcode')}): {last}; "
                    "fix that and run the preflight again")]


def fail_reasons(doc: dict) -> str:
    """The reasons of a verdict's `fail` findings, as one line."""
    return "; ".join(r["reason"] for r in doc["reasons"] if r["level"] == "fail")


def read_verdict(path: str | os.PathLike) -> dict:
    """A preflight verdict file, checked: its `verdict` is one of VERDICTS and it has its
    `combination` and `reasons`. Raises ResultError saying what is wrong."""
    doc = load_json(path)
    problems = []
    if not isinstance(doc, dict):
        raise ResultError(f"{path}: no preflight verdict (missing, unreadable or not a JSON object); "
                          "run `python -m nli_grpo.preflight` for this combination")
    if doc.get("schema_version") != VERDICT_SCHEMA_VERSION:
        problems.append(f"schema_version {doc.get('schema_version')!r} (expected {VERDICT_SCHEMA_VERSION})")
    if doc.get("verdict") not in VERDICTS:
        problems.append(f"verdict {doc.get('verdict')!r} (expected one of {', '.join(VERDICTS)})")
    if not isinstance(doc.get("combination"), str):
        problems.append("no combination")
    if not isinstance(doc.get("reasons"), list):
        problems.append("no reasons list")
    if problems:
        raise ResultError(f"{path}: not a valid preflight verdict: {'; '.join(problems)}; run `python -m nli_grpo.preflight` again")
    return doc
