"""The preflight (`python -m nli_grpo.preflight`), for real on the tiny model: real GRPO steps,
vLLM's CPU build colocated with adapter hot-swap, and the verdict file it writes. A healthy run
passes; runs broken on purpose (the adapter never reaches vLLM; vLLM in another dtype than the
trainer, in a cell asking for too little memory and time) fail with the reason; a run whose
measuring process is killed for memory still leaves a verdict saying so. Nothing here writes a
verdict by hand: each failure comes from a run that is really broken."""

from __future__ import annotations

import pytest

from nli_grpo.config import load_config
from nli_grpo.job import config_for_run
from nli_grpo.layout import preflight_file
from nli_grpo.preflight import main, run_preflight
from nli_grpo.verdict import combination, read_verdict

pytestmark = [pytest.mark.slow]

#: The smoke recipe shrunk to what the checks need: 2 prompts x 4 completions of 8 tokens a step.
SMALL = ["model.name_or_path=tiny", "grpo.completions_per_step=8", "grpo.max_completion_length=8", "grpo.num_iterations=1",
         "eval.limit=2", "preflight.prompts=2", "preflight.greedy_tokens=8"]


def preflight(tmp_path, *args: str) -> tuple[int, dict]:
    """The command, as a job runs it: the measurement in a child process its parent watches."""
    out = tmp_path / "verdict.json"
    code = main(["--config", "smoke", "--out", str(out), *SMALL, *args])
    return code, read_verdict(out)


def measure(tmp_path, *overrides: str) -> dict:
    """The measurement in this process (run_preflight, what the command's child runs), for the runs
    broken by a monkeypatch: a patch does not reach a spawned child."""
    out = tmp_path / "verdict.json"
    run_preflight(config_for_run("smoke", [*SMALL, *overrides]), out)
    return read_verdict(out)


def reasons(doc: dict, check: str) -> str:
    return " | ".join(r["reason"] for r in doc["reasons"] if r["check"] == check)


def test_combination_names_the_verdict_file():
    cfg = load_config("smoke", ["rollout.backend=vllm"])
    assert combination(cfg) == "tiny-sft__bf16__vllm__g0"
    # LoRA rank and seed do not make another combination
    assert combination(load_config("smoke", ["rollout.backend=vllm", "lora.rank=64", "seed=3"])) == combination(cfg)
    assert preflight_file("results/smoke", combination(cfg)).as_posix() == "results/smoke/preflight/tiny-sft__bf16__vllm__g0.json"


def test_a_missing_or_broken_verdict_file_is_refused_with_what_to_do(tmp_path):
    from nli_grpo.results import ResultError

    with pytest.raises(ResultError, match="no preflight verdict .* run `python -m nli_grpo.preflight`"):
        read_verdict(tmp_path / "absent.json")
    (tmp_path / "bad.json").write_text('{"schema_version": 1, "verdict": "maybe", "combination": "x", "reasons": []}')
    with pytest.raises(ResultError, match="verdict 'maybe'"):
        read_verdict(tmp_path / "bad.json")


@pytest.mark.vllm
def test_a_healthy_vllm_combination_passes(tmp_path):
    code, doc = preflight(tmp_path, "rollout.backend=vllm")
    assert (code, doc["verdict"], doc["reasons"]) == (0, "pass", [])
    assert doc["combination"] == "tiny__bf16__vllm__g0"
    agreement = doc["agreement"]
    assert agreement["sampler_dtype"] == agreement["trainer_dtype"] == "float32"
    for state in ("base", "adapter"):  # float32 on both sides: the same numbers up to summation order
        assert agreement["logprob_delta"][state]["tokens"] > 0 and agreement["logprob_delta"][state]["max"] < 1e-3
    assert agreement["greedy"] == {**agreement["greedy"], "adapter_applied": True, "stale": False, "matching_prompts": 2}
    steps = doc["steps"]
    assert steps["steps"] == 2 and steps["seconds_per_step"] > 0 and steps["generation_tokens_per_s"] > 0
    assert doc["memory"]["vllm_engine_rss_gb"] > 0 and doc["memory"]["peak_gb"] < 8
    assert doc["fit"]["projected_s"] > 40 * steps["seconds_per_step"]  # the cell's max_steps, not the preflight's


@pytest.mark.vllm
def test_a_healthy_vllm_server_combination_passes(tmp_path):
    """rollout.backend=vllm_server: the preflight starts the server as the cell's job does; the
    agreement checks go through it (adapters loaded by name, a new name per version)."""
    import psutil

    before = {p.pid for p in psutil.Process().children(recursive=True)}
    code, doc = preflight(tmp_path, "rollout.backend=vllm_server")
    assert (code, doc["verdict"], doc["reasons"]) == (0, "pass", [])
    assert doc["combination"] == "tiny__bf16__vllm_server1__g0"
    agreement = doc["agreement"]
    assert agreement["sampler_dtype"] == agreement["trainer_dtype"] == "float32"
    for state in ("base", "adapter"):
        assert agreement["logprob_delta"][state]["tokens"] > 0 and agreement["logprob_delta"][state]["max"] < 1e-3
    assert agreement["greedy"] == {**agreement["greedy"], "sampler": "vllm_server", "adapter_applied": True, "stale": False,
                                   "matching_prompts": 2}
    assert doc["steps"]["steps"] == 2 and doc["memory"]["vllm_engine_rss_gb"] > 0  # the server's processes
    left = [p.cmdline() for p in psutil.Process().children(recursive=True) if p.pid not in before]
    assert not [c for c in left if "resource_tracker" not in " ".join(c)], left  # the server is stopped


@pytest.mark.vllm
def test_an_adapter_that_never_reaches_vllm_fails(tmp_path, monkeypatch):
    from nli_grpo.rollout import AdapterHotSwap

    publish = AdapterHotSwap.sync

    def first_version_only(self, peft_model, step):  # the bug: later versions are never handed to vLLM
        return self.request if self.request is not None else publish(self, peft_model, step)

    monkeypatch.setattr(AdapterHotSwap, "sync", first_version_only)
    doc = measure(tmp_path, "rollout.backend=vllm")
    assert doc["verdict"] == "fail"
    why = reasons(doc, "agreement")
    assert "the adapter is not applied" in why and "adapter: the sampler's and the trainer's log-probs" in why, why
    assert doc["agreement"]["logprob_delta"]["base"]["max"] < 1e-3  # the zero adapter (the base) still agrees


@pytest.mark.vllm
def test_a_server_asked_for_the_base_instead_of_the_adapter_fails(tmp_path, monkeypatch):
    """rollout.backend=vllm_server, and the client asks the server for its base whatever version is
    published: the agreement checks through the server catch it."""
    import os

    from nli_grpo.rollout import ServerClient
    from nli_grpo.server import URL_ENV

    generate = ServerClient.generate
    monkeypatch.setattr(ServerClient, "generate", lambda self, model, *args, **kw: generate(self, "base", *args, **kw))  # the bug
    doc = measure(tmp_path, "rollout.backend=vllm_server")
    assert doc["verdict"] == "fail"
    why = reasons(doc, "agreement")
    assert "vllm_server sampler's greedy output" in why and "adapter: the sampler's and the trainer's log-probs" in why, why
    assert doc["agreement"]["logprob_delta"]["base"]["max"] < 1e-3  # the zero adapter (the base) still agrees
    assert URL_ENV not in os.environ  # the server's URL was this process's only while it ran


@pytest.mark.vllm
def test_vllm_in_another_dtype_and_too_little_memory_and_time_fail(tmp_path, monkeypatch):
    """One run broken three ways (one engine start less in CI's budget): each reason is its own finding."""
    from nli_grpo import rollout

    monkeypatch.setattr(rollout, "_engine_dtype", lambda cfg, purpose: "bfloat16")  # the bug: the engine ignores the recipe
    # the trainer and vLLM's engine processes hold ~2.5 GB resident here; --time 6 leaves 60 s before
    # USR2, and 100,000 steps cannot fit in it on any machine (40 did on CI's faster one)
    doc = measure(tmp_path, "rollout.backend=vllm", "resources.mem_gb=2", "grpo.max_steps=100000", "resources.timeout_min=6")
    assert doc["verdict"] == "fail"
    assert "the sampler runs in bfloat16 but the trainer computes in float32" in reasons(doc, "agreement")
    assert doc["memory"]["peak_gb"] > 2 and "raise resources.mem_gb" in reasons(doc, "memory")
    assert doc["fit"]["budget_s"] == 6 * 60 - 300 and "ask for --time" in reasons(doc, "time")


@pytest.mark.vllm
def test_a_preflight_killed_for_memory_still_writes_a_fail_verdict(tmp_path):
    """resources.mem_gb=2, and the tiny model's trainer with vLLM's engine process holds ~2.5 GB
    resident here: the parent kills the measuring child and its engine process with SIGKILL once
    they go over it (as Slurm's cgroup would the cell's job), and, having loaded nothing itself,
    writes the verdict. Exit 1: jobs chained after the preflight (afterok) stay blocked."""
    import psutil

    before = {p.pid for p in psutil.Process().children(recursive=True)}
    code, doc = preflight(tmp_path, "rollout.backend=vllm", "resources.mem_gb=2")
    assert (code, doc["verdict"], doc["combination"]) == (1, "fail", "tiny__bf16__vllm__g0")
    death = doc["death"]
    assert (death["signal"], death["exitcode"], death["killed_by"]) == ("SIGKILL", -9, "preflight")
    assert death["peak_rss_gb"] > 2 and doc["memory"]["peak_gb"] == death["peak_rss_gb"] and doc["memory"]["limit_gb"] == 2
    assert death["processes_killed"] >= 2  # the child and vLLM's engine
    why = reasons(doc, "memory")
    assert f"while {death['phase']}, over the 2 GB a cell asks for (resources.mem_gb)" in why, why
    assert "killed them (SIGKILL)" in why and "raise resources.mem_gb" in why, why
    assert "steps" not in doc  # nothing measured is made up
    # none of the child's processes (vLLM's engine) is left behind
    left = [p.cmdline() for p in psutil.Process().children(recursive=True) if p.pid not in before]
    assert not [c for c in left if "resource_tracker" not in " ".join(c)], left  # multiprocessing's own stays


def test_a_preflight_whose_model_cannot_be_loaded_writes_a_fail_verdict_with_the_error(tmp_path):
    """The child's exception (here: no such model) ends it without a verdict of its own: the parent
    writes one with the phase and the error, instead of only a traceback in the job's log."""
    code, doc = preflight(tmp_path, f"model.name_or_path={tmp_path / 'no-such-model'}")
    assert (code, doc["verdict"]) == (1, "fail")
    assert (doc["death"]["exitcode"], doc["death"]["signal"], doc["death"]["killed_by"]) == (1, None, None)
    why = reasons(doc, "run")
    assert "the preflight failed while loading" in why and "(exit status 1): OSError: " in why and "no-such-model" in why, why
