"""Preflight one combination before a grid: `python -m nli_grpo.preflight --config <recipe> [key=value ...]
[--time MIN] [--out FILE]`.

A short job that does what a cell does, a few steps of it, and says whether the cells of this
combination (base model x quantization x rollout backend x GPUs, nli_grpo.verdict.combination)
will run, and run right:

a. load the base and the rollout engine as a cell does (training.build_trainer; with
   rollout.backend=vllm_server, first start the server as the cell's job does: job.rollout_server); record
   the device, driver / CUDA and library versions;
b. preflight.cycles generation cycles of real GRPO steps at the recipe's lengths on its training
   source (every step a full update: zero-advantage skips are off, so the rate is an upper bound),
   timed by phase (nli_grpo.phases), with one real checkpoint save; peak memory against what the
   cell asks for and the sweep validator's estimate; tokens/s;
c. sampler vs trainer (vLLM backends, colocated or the server): the same completions scored by both at the same adapter
   version, for the base and after a non-zero adapter is published (mean / max |delta log p|);
   the adapter changes the sampler's greedy output and matches HF greedy with it; a republished
   version is not served stale. With rollout.backend=hf the sampler is the trainer: only the
   adapter check applies;
d. the measured rate projected to the cell (load + grpo.max_steps + evaluation) against --time
   (resources.timeout_min) less the USR2 signal delay, the checkpoint cadence, GPU-hours;
e. a verdict, pass / warn / fail with reasons (nli_grpo.verdict; thresholds: config `preflight.*`).

a to d run in a child process that the command's own process (which loads nothing) watches: a
combination that does not fit in memory gets its process killed (the OOM killer, Slurm's memory
limit, or this parent enforcing resources.mem_gb), and the parent still writes a `fail` verdict
saying so, and while doing what (guarded_preflight).

The verdict goes to `results/<output.sweep>/preflight/<combination>.json` (layout.preflight_file)
unless --out says otherwise. Exit status 0 for pass / warn, 1 for fail (a killed or failed
measurement too), 2 for a refused config.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import logging
import multiprocessing
import os
import platform
import shutil
import signal
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

from . import results, verdict
from .config import ConfigError, ExperimentConfig
from .job import EXIT_FAILED, EXIT_REFUSED, config_for_run, rollout_server
from .launch import SIGNAL_DELAY_S, process_tree, send_signal
from .layout import preflight_file

log = logging.getLogger("nli_grpo.preflight")

#: Seed of the adapter perturbations (fixed: a rerun publishes the same adapters).
PERTURBATION_SEED = 1234
#: Rollout backends whose sampler is vLLM: colocated, or the job's own server.
VLLM_BACKENDS = ("vllm", "vllm_server")
#: Seconds between two samples of the measuring child's resident memory (guarded_preflight).
MEMORY_SAMPLE_S = 0.5
#: Lines of a failed child's traceback kept in the verdict.
ERROR_LINES = 20


def preflight_config(cfg: ExperimentConfig, work_dir: Path) -> ExperimentConfig:
    """The recipe as the preflight trains it: preflight.cycles generation cycles, one checkpoint
    saved at the end (timed), no zero-advantage skips (every step a full update), no trackers,
    in `work_dir`."""
    short = copy.deepcopy(cfg)
    short.grpo.max_steps = cfg.preflight.cycles * cfg.grpo.num_iterations
    short.grpo.save_steps = short.grpo.max_steps
    short.grpo.skip_zero_advantage_steps = False
    short.output.dir = str(work_dir)
    short.output.report_to = ["none"]
    return short


def device_info() -> dict:
    """Where the preflight ran: the accelerator, its driver and CUDA, the host."""
    import torch

    info = {"host": platform.node(), "cpus": os.cpu_count(), "cuda_available": torch.cuda.is_available(),
            "torch_cuda": torch.version.cuda, "device": "cpu", "driver": None}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(device=props.name, gpu_memory_gb=round(props.total_memory / 2**30, 1), gpus=torch.cuda.device_count())
        try:
            import subprocess

            info["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                            capture_output=True, text=True, timeout=30).stdout.split("\n")[0].strip() or None
        except (OSError, subprocess.TimeoutExpired):
            pass
    return info


def _agreement_prompts(trainer, cfg: ExperimentConfig) -> list[list[int]]:
    """The first preflight.prompts training prompts as the trainer tokenizes them."""
    rows = trainer.train_dataset.select(range(min(cfg.preflight.prompts, len(trainer.train_dataset))))
    rendered = trainer.processing_class.apply_chat_template(list(rows["prompt"]), add_generation_prompt=True,
                                                            tokenize=True, return_dict=True)
    return [list(ids) for ids in rendered["input_ids"]]


def _delta_figures(deltas: list[float]) -> dict:
    return {"tokens": len(deltas), "mean": round(sum(deltas) / max(1, len(deltas)), 6), "max": round(max(deltas, default=0.0), 6)}


def _perturb_adapter(model, std: float, seed: int) -> None:
    """Set every LoRA B weight to seeded noise: a non-zero adapter, the same one on every rerun."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_((torch.randn(param.shape, generator=generator) * std).to(param.dtype))


def _hf_greedy(model, tokenizer, prompt_ids: list[list[int]], tokens: int) -> list[list[int]]:
    """HF generate's greedy completions, cut after the first EOS (as vLLM returns them)."""
    import torch

    out = []
    with torch.no_grad():
        for ids in prompt_ids:
            x = torch.tensor([ids], device=model.device)
            generated = model.generate(input_ids=x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=tokens,
                                       pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)[0, len(ids):].tolist()
            eos = tokenizer.eos_token_id
            out.append(generated[: generated.index(eos) + 1] if eos in generated else generated)
    return out


def _sampler_greedy(trainer, prompt_ids: list[list[int]], tokens: int, adapter: bool = True) -> tuple[list, list]:
    """The rollout engine's greedy completions and their tokens' log-probs, with the trainer's
    current adapter (published as a generation batch would publish it) or, `adapter=False`,
    without any (the base as vLLM serves it)."""
    if hasattr(trainer, "client"):  # rollout.backend=vllm_server: each publish is a new version, under a new name
        model = trainer.versions.name(trainer.versions.publish(trainer)) if adapter else "base"
        return trainer.client.generate(model, prompt_ids, [0] * len(prompt_ids), temperature=0.0, max_tokens=tokens)
    from vllm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=tokens, logprobs=0)
    if adapter:
        outputs = trainer.rollout_generate(prompt_ids, params)
    else:
        outputs = trainer.llm.generate([{"prompt_token_ids": ids} for ids in prompt_ids], params, use_tqdm=False)
    samples = [o.outputs[0] for o in outputs]
    return ([list(c.token_ids) for c in samples],
            [[lp[t].logprob for lp, t in zip(c.logprobs, c.token_ids)] for c in samples])


def _output_changed(tokens: list, logps: list, base_tokens: list, base_logps: list) -> bool:
    """Whether an adapter changed the sampler's greedy output: other tokens, or the same tokens at
    other log-probs (a warm-started model's first tokens can resist a small adapter; their
    probabilities cannot)."""
    if tokens != base_tokens:
        return True
    shifts = [abs(a - b) for row, base in zip(logps, base_logps) for a, b in zip(row, base)]
    return bool(shifts) and sum(shifts) / len(shifts) > 1e-4


def _sampler_settings(trainer, cfg: ExperimentConfig) -> dict:
    """The dtype the sampler runs in and what it reports as log-probs: the colocated engine's own,
    or what the job's vLLM server was started with (nli_grpo.server.server_command)."""
    if hasattr(trainer, "client"):
        import torch

        from .server import logprobs_mode, server_dtype

        return {"sampler_dtype": server_dtype(cfg, torch.cuda.is_available()), "logprobs_mode": logprobs_mode(cfg)}
    config = trainer.llm.llm_engine.model_config
    return {"sampler_dtype": str(config.dtype).removeprefix("torch."), "logprobs_mode": str(config.logprobs_mode)}


def _new_version(trainer) -> None:
    """Make the next generation publish a new adapter version. The hot swap keys a version by the
    optimizer step (one version per step, as in training); the preflight's perturbations happen
    between steps, so each takes the next step number."""
    trainer.state.global_step += 1


def check_agreement(trainer, cfg: ExperimentConfig, base_deltas: list[float] | None) -> dict:
    """Part c after training: a perturbed adapter published; the same completions scored by the
    sampler and the trainer; greedy output of the sampler vs HF with and without the adapter; a
    second perturbation republished and checked for staleness."""
    p = cfg.preflight
    model = trainer.accelerator.unwrap_model(trainer.model)
    tokenizer = trainer.processing_class
    prompts = _agreement_prompts(trainer, cfg)
    vllm = cfg.rollout.backend in VLLM_BACKENDS
    model.eval()
    with model.disable_adapter():
        base_greedy = _hf_greedy(model, tokenizer, prompts, p.greedy_tokens)
    _perturb_adapter(model, p.perturbation_std, PERTURBATION_SEED)
    hf_first = _hf_greedy(model, tokenizer, prompts, p.greedy_tokens)
    doc: dict = {"applies": vllm, "prompts": len(prompts)}
    if not vllm:
        # A warm-started model's first tokens can resist a small adapter: its log-probs cannot.
        shift = _adapter_logprob_shift(trainer, model, prompts, base_greedy)
        doc["why"] = ("rollout.backend=hf: the trainer's own model samples (HF generate), so sampler and trainer cannot "
                      "disagree; checked: a non-zero adapter changes the greedy output or its log-probs (LoRA is active)")
        doc["greedy"] = {"sampler": "hf", "prompts": len(prompts), "tokens": p.greedy_tokens, "matching_prompts": len(prompts),
                         "adapter_changed_tokens": hf_first != base_greedy, "adapter_logprob_shift": round(shift, 6),
                         "adapter_applied": hf_first != base_greedy or shift > 1e-4, "stale": False}
        return doc
    base_tokens, base_logps = _sampler_greedy(trainer, prompts, p.greedy_tokens, adapter=False)
    _new_version(trainer)
    repeated = [ids for ids in prompts for _ in range(cfg.grpo.num_generations)]
    from .rollout import sampler_logprob_deltas

    adapter_deltas = sampler_logprob_deltas(trainer, repeated)
    sampler_first, first_logps = _sampler_greedy(trainer, prompts, p.greedy_tokens)
    # A second, different adapter: the sampler must serve it, not the version before.
    _perturb_adapter(model, p.perturbation_std, PERTURBATION_SEED + 1)
    _new_version(trainer)
    hf_second = _hf_greedy(model, tokenizer, prompts, p.greedy_tokens)
    sampler_second, second_logps = _sampler_greedy(trainer, prompts, p.greedy_tokens)
    # Stale: the sampler's output is still the previous version's, tokens and log-probs, though
    # the second adapter is another one (other seed).
    stale = not _output_changed(sampler_second, second_logps, sampler_first, first_logps)
    sampler = _sampler_settings(trainer, cfg)
    doc.update({
        "sampler_dtype": sampler["sampler_dtype"],
        "trainer_dtype": str(model.get_base_model().dtype).removeprefix("torch."),
        "logprobs_mode": sampler["logprobs_mode"],
        "loss_temperature": cfg.grpo.loss_temperature or cfg.grpo.temperature,
        "logprob_delta": {"base": _delta_figures(base_deltas or []), "adapter": _delta_figures(adapter_deltas)},
        "greedy": {"sampler": cfg.rollout.backend, "prompts": len(prompts), "tokens": p.greedy_tokens,
                   "matching_prompts": sum(a == b for a, b in zip(sampler_first, hf_first)),
                   "adapter_changed_tokens": sampler_first != base_tokens,
                   "adapter_applied": _output_changed(sampler_first, first_logps, base_tokens, base_logps),
                   "stale": stale,
                   "republished_matching_prompts": sum(a == b for a, b in zip(sampler_second, hf_second))},
    })
    return doc


def _adapter_logprob_shift(trainer, model, prompt_ids: list[list[int]], completions: list[list[int]]) -> float:
    """Mean |log p with the adapter - log p without| per token of `completions`, by the trainer."""
    import torch

    shifts: list[float] = []
    with torch.no_grad():
        for prompt, completion in zip(prompt_ids, completions):
            ids = torch.tensor([list(prompt) + list(completion)], device=trainer.accelerator.device)
            mask = torch.ones_like(ids)
            with_adapter = trainer._get_per_token_logps_and_entropies(model, ids, mask, len(completion))[0]
            with model.disable_adapter():
                without = trainer._get_per_token_logps_and_entropies(model, ids, mask, len(completion))[0]
            shifts += (with_adapter - without).abs().flatten().tolist()
    return sum(shifts) / max(1, len(shifts))


def _memory(cfg: ExperimentConfig, trainer) -> dict:
    """Peak memory of the training (training.peak_memory) against what a cell asks for: per GPU on
    a GPU (plus the colocated engine's share), the job's host memory on a CPU (plus the resident
    memory of vLLM's engine processes, which are children of this one)."""
    import torch

    from .grid import estimate_gpu_memory
    from .training import peak_memory

    measured = peak_memory(getattr(trainer, "colocated_vllm_gb", 0.0))
    if torch.cuda.is_available():
        estimate = estimate_gpu_memory(cfg)
        return {**measured, "peak_gb": measured["peak_memory_gb"], "limit_gb": cfg.resources.gpu_memory_gb,
                "limit_field": "resources.gpu_memory_gb", "estimate_gb": estimate["total"] if estimate else None}
    import psutil

    engine = sum(child.memory_info().rss for child in psutil.Process().children(recursive=True)) / 2**30
    return {**measured, "vllm_engine_rss_gb": round(engine, 3), "peak_gb": round(measured["peak_memory_gb"] + engine, 3),
            "limit_gb": cfg.resources.mem_gb, "limit_field": "resources.mem_gb", "estimate_gb": None}


def eval_items(cfg: ExperimentConfig) -> int:
    """Examples the cell's evaluation generates for: eval.limit per set, else the set's size."""
    from .data import BENCHMARKS

    if not cfg.eval.after_training:
        return 0
    return sum(min(cfg.eval.limit or BENCHMARKS[name].expected_n, BENCHMARKS[name].expected_n) for name in cfg.eval.benchmarks)


def _close(trainer) -> None:
    """Stop the trainer's rollout side (engine, server client) and free its memory."""
    from .training import _release

    if hasattr(trainer, "close_rollout"):
        trainer.close_rollout()
    _release(trainer)


def run_preflight(cfg: ExperimentConfig, out: Path, signal_delay_s: float = SIGNAL_DELAY_S,
                  progress: Callable[[str], None] | None = None) -> dict:
    """Run the preflight of `cfg`'s combination in this process; write the verdict document to
    `out` (atomically) and return it. `progress` is told each phase as it starts ("loading the
    model ...", "generation cycle 2 of 3", ...); by default they are logged. `main` runs this in a
    watched child process (guarded_preflight)."""
    import torch

    from .phases import PHASES, attach_phase_timer, time_calls
    from .process import StopRequest
    from .training import build_trainer

    progress = progress or (lambda phase: log.info("preflight: %s", phase))
    started = time.perf_counter()
    work = out.with_suffix(".work")
    shutil.rmtree(work, ignore_errors=True)
    short = preflight_config(cfg, work)
    # a. load as a cell does: the base with LoRA, the prompts, the rollout engine
    progress(f"loading {cfg.model.name_or_path} and the rollout engine ({cfg.rollout.backend})")
    # undone last in, first out: the trainer and its engine, the job's server, the work folder
    with contextlib.ExitStack() as cleanup:
        cleanup.callback(shutil.rmtree, work, ignore_errors=True)
        if cfg.rollout.backend == "vllm_server":
            cleanup.enter_context(rollout_server(short, work))
        trainer, data_info = build_trainer(short, StopRequest())
        cleanup.callback(_close, trainer)
        load_s = time.perf_counter() - started
        base_deltas = None
        if cfg.rollout.backend in VLLM_BACKENDS:  # c. at step 0 the adapter is zero (LoRA B = 0): the base
            from .rollout import sampler_logprob_deltas

            progress("scoring the base's completions by the sampler and the trainer (agreement at step 0)")
            prompts = _agreement_prompts(trainer, cfg)
            base_deltas = sampler_logprob_deltas(trainer, [ids for ids in prompts for _ in range(cfg.grpo.num_generations)])
        # b. real GRPO steps, timed by phase, with one checkpoint save
        steps = attach_phase_timer(trainer)
        tokens: list[tuple[int, int]] = []
        saves: list[float] = []
        generate = trainer._generate_single_turn

        def counting(prompt_ids, *args, **kwargs):
            progress(f"running generation cycle {len(tokens) + 1} of {cfg.preflight.cycles} (and its steps)")
            completion_ids, logprobs = generate(prompt_ids, *args, **kwargs)
            tokens.append((sum(map(len, prompt_ids)), sum(map(len, completion_ids))))
            return completion_ids, logprobs

        trainer._generate_single_turn = counting
        time_calls(trainer, "_save_checkpoint", saves.append)
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        trainer.train()
        trainer._generate_single_turn = generate  # the agreement checks' generations are not training's
        memory = _memory(cfg, trainer)
        progress("running the agreement checks (sampler vs trainer, adapter published)")
        agreement = check_agreement(trainer, cfg, base_deltas)
    cycle = cfg.grpo.num_iterations
    timed = steps[cycle:]  # the first generation cycle warms up
    seconds_per_step = sum(s["step"] for s in timed) / len(timed)
    generation_s = sum(s["generation"] for s in timed)
    timed_tokens = tokens[1:]  # one generation per cycle
    completion_tokens = sum(c for _, c in timed_tokens)
    gen_rate = completion_tokens / generation_s if generation_s else None
    step_figures = {
        "steps": len(steps), "timed_steps": len(timed), "seconds_per_step": round(seconds_per_step, 4),
        "by_phase_s": {phase: round(sum(s[phase] for s in timed) / len(timed), 4) for phase in PHASES},
        "completions_per_step": cfg.grpo.completions_per_step, "max_completion_length": cfg.grpo.max_completion_length,
        "mean_completion_tokens": round(completion_tokens / max(1, cfg.grpo.completions_per_step * len(timed_tokens)), 1),
        "tokens_per_s": round(sum(p + c for p, c in timed_tokens) / sum(s["step"] for s in timed), 1),
        "generation_tokens_per_s": round(gen_rate, 1) if gen_rate else None,
        "data": data_info,
    }
    items = eval_items(cfg)
    # The evaluation generates up to eval.max_new_tokens per item at the rollouts' measured rate
    # (an upper side: completions often stop earlier; the evaluation engine batches more).
    eval_s = items * cfg.eval.max_new_tokens / gen_rate if gen_rate and items else 0.0
    fit = verdict.project_fit(seconds_per_step, load_s, eval_s, cfg.grpo.max_steps, cfg.resources.timeout_min,
                              cfg.resources.gpus_per_node, signal_delay_s,
                              max(saves, default=0.0), cfg.grpo.save_steps)
    fit["eval_items"] = items
    findings = (verdict.agreement_findings(agreement, cfg.preflight) + verdict.memory_findings(memory, cfg.preflight)
                + verdict.fit_findings(fit, cfg.preflight))
    doc = {
        "schema_version": verdict.VERDICT_SCHEMA_VERSION,
        "combination": verdict.combination(cfg),
        "verdict": verdict.overall(findings),
        "reasons": findings,
        "created": results.now_iso(),
        "elapsed_s": round(time.perf_counter() - started, 1),
        "device": device_info(),
        "versions": results.package_versions(),
        "load": {"seconds": round(load_s, 2), "model": cfg.model.name_or_path, "quantization": cfg.model.quantization,
                 "rollout": cfg.rollout.backend},
        "steps": step_figures,
        "memory": memory,
        "agreement": agreement,
        "fit": fit,
        "config": cfg.to_dict(),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    results.atomic_write_json(out, doc)
    return doc


def _measure(cfg: ExperimentConfig, out: Path, signal_delay_s: float, parent) -> None:
    """The child's side of guarded_preflight: run_preflight, telling the parent (a Pipe's end) each
    phase, then its verdict document, or the traceback that ended it."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    def progress(phase: str) -> None:
        log.info("preflight: %s", phase)
        parent.send(("phase", phase))

    try:
        parent.send(("done", run_preflight(cfg, out, signal_delay_s, progress)))
    except BaseException:
        parent.send(("error", "".join(traceback.format_exc().splitlines(keepends=True)[-ERROR_LINES:])))
        raise


def _resident_gb(processes: list) -> float:
    """Resident memory of `processes`, summed (as _memory sums the trainer's and vLLM's engine's)."""
    import psutil

    total = 0
    for p in processes:
        try:
            total += p.memory_info().rss
        except psutil.Error:  # exited between listing and reading
            pass
    return total / 2**30


def guarded_preflight(cfg: ExperimentConfig, out: Path, signal_delay_s: float = SIGNAL_DELAY_S) -> dict:
    """run_preflight in a child process, watched by this one; the verdict document, written to `out`.

    Why a child: a combination that does not fit in host memory gets the process that loads it
    killed by SIGKILL (the kernel's OOM killer, Slurm's cgroup), and a killed process writes
    nothing: no verdict, and the cells chained after the preflight would wait with no reason. This
    parent loads nothing, so it survives to write a `fail` verdict saying what happened and while
    doing what. "spawn", not fork: a fresh interpreter, nothing of this one's state (torch's
    threads, CUDA) carried into the child.

    The parent also enforces resources.mem_gb, as Slurm's cgroup would on the cells' nodes: every
    MEMORY_SAMPLE_S it sums the resident memory of the child and its descendants (vLLM's engine
    processes) and, once that is over the limit, kills them all with SIGKILL. So the verdict is the
    same whether or not the machine the preflight runs on limits memory itself (this CPU machine
    does not), and a preflight of a combination too big for its cells stops before it takes the
    node down. A spike between two samples can still reach the kernel's OOM killer first: that
    SIGKILL is reported the same way (check `memory`)."""
    import psutil

    started = time.perf_counter()
    context = multiprocessing.get_context("spawn")
    receive, send = context.Pipe(duplex=False)
    # not a daemon: vLLM starts its engine in a process of its own, which a daemon cannot have
    child = context.Process(target=_measure, args=(cfg, out, signal_delay_s, send), name="preflight-measure")
    child.start()
    send.close()
    watched = psutil.Process(child.pid)
    death: dict = {"phase": None, "peak_rss_gb": 0.0, "killed_by": None}
    tree = [watched]
    try:
        doc = _watch(child, receive, cfg.resources.mem_gb, death, tree)
    except BaseException:  # this parent was interrupted (Ctrl-C): the child goes with it
        send_signal(process_tree(child.pid) or tree, signal.SIGKILL)
        raise
    finally:
        child.join()
        send_signal([p for p in tree if p.pid != child.pid], signal.SIGKILL)  # vLLM engine processes a killed child leaves behind
        receive.close()
    if doc is not None and child.exitcode == 0:
        return doc
    code = child.exitcode
    death.update(exitcode=code, signal=signal.Signals(-code).name if code is not None and code < 0 else None)
    if death["killed_by"] is None and death["phase"] is None:
        death["phase"] = "starting (importing torch and the trainer)"
    return _death_verdict(cfg, out, death, time.perf_counter() - started)


def _watch(child, receive, limit_gb: float, death: dict, tree: list) -> dict | None:
    """guarded_preflight's loop until the child ends: its messages (phases into `death`), and every
    MEMORY_SAMPLE_S its processes (into `tree`) and their resident memory, killed when over
    `limit_gb`. Returns the child's verdict document, or None when it sent none."""
    doc, reading = None, True
    while True:
        alive = child.is_alive()
        try:
            # poll with a timeout, not a blocking recv: the loop also samples the memory
            while reading and receive.poll(MEMORY_SAMPLE_S if alive else 0):
                kind, value = receive.recv()
                if kind == "phase":
                    death["phase"] = value
                elif kind == "done":
                    doc = value
                else:
                    death["error"] = value
        except EOFError:  # the child closed its end: it is exiting
            reading = False
        if not alive:
            return doc
        if not reading:
            time.sleep(MEMORY_SAMPLE_S)
        tree[:] = process_tree(child.pid) or tree  # a child that just exited has no children left to list
        resident = _resident_gb(tree)
        death["peak_rss_gb"] = round(max(death["peak_rss_gb"], resident), 3)
        if resident > limit_gb and child.is_alive():
            log.error("preflight: its processes hold %.2f GB resident, over resources.mem_gb=%s: killing them", resident, limit_gb)
            death.update(killed_by="preflight", processes_killed=len(tree))
            send_signal(tree, signal.SIGKILL)


def _death_verdict(cfg: ExperimentConfig, out: Path, death: dict, elapsed_s: float) -> dict:
    """The `fail` verdict of a preflight whose measuring child ended without one (guarded_preflight),
    written to `out`: how it died, while doing what, the memory seen."""
    doc = {
        "schema_version": verdict.VERDICT_SCHEMA_VERSION,
        "combination": verdict.combination(cfg),
        "verdict": "fail",
        "reasons": verdict.death_findings(death, cfg.resources.mem_gb),
        "created": results.now_iso(),
        "elapsed_s": round(elapsed_s, 1),
        "death": death,
        "memory": {"peak_gb": death["peak_rss_gb"], "limit_gb": cfg.resources.mem_gb, "limit_field": "resources.mem_gb",
                   "measured": f"resident memory of the preflight's processes, sampled every {MEMORY_SAMPLE_S} s until it ended"},
        "config": cfg.to_dict(),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    results.atomic_write_json(out, doc)
    return doc


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m nli_grpo.preflight",
                                     description="Preflight one combination (model x quantization x rollout x GPUs) of a recipe.")
    parser.add_argument("--config", default="paper", help="recipe name (paper, lora_rank, smoke) or a YAML path")
    parser.add_argument("--time", type=int, metavar="MIN", help="the Slurm --time of the cells, minutes (resources.timeout_min)")
    parser.add_argument("--signal-delay-s", type=float, default=SIGNAL_DELAY_S,
                        help=f"seconds before the time limit that USR2 comes (default {SIGNAL_DELAY_S}, the sweeps')")
    parser.add_argument("--out", help="verdict file (default results/<output.sweep>/preflight/<combination>.json)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. model.quantization=awq rollout.backend=vllm")
    return parser.parse_intermixed_args(argv)


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    overrides = list(args.overrides) + ([f"resources.timeout_min={args.time}"] if args.time is not None else [])
    try:
        cfg = config_for_run(args.config, overrides)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_REFUSED
    if reason := verdict.refusal(cfg):
        print(f"error: {reason}", file=sys.stderr)
        return EXIT_REFUSED
    out = Path(args.out) if args.out else preflight_file(Path("results") / cfg.output.sweep, verdict.combination(cfg))
    doc = guarded_preflight(cfg, out, args.signal_delay_s)
    print(f"preflight {doc['combination']}: {doc['verdict'].upper()} ({doc['elapsed_s']} s) -> {out}")
    for item in doc["reasons"]:
        print(f"  {item['level']} [{item['check']}] {item['reason']}")
    return EXIT_FAILED if doc["verdict"] == "fail" else 0


if __name__ == "__main__":
    raise SystemExit(main())
