"""nli_grpo.bench's pure parts (paired measurements, summaries, tables, the GPU-hours projection)
and the sizing / reuse rules it measures; a small real benchmark run (slow)."""

import json

import pytest

from nli_grpo import bench


def test_summary_gives_median_and_spread():
    assert bench.summary([3.0, 1.0, 2.0]) == {"median": 2.0, "min": 1.0, "max": 3.0, "n": 3}
    assert bench.summary([1.0, 2.0, 4.0, 10.0])["median"] == 3.0


def test_interleaved_alternates_the_order_of_each_pair():
    calls = []
    values = bench.interleaved({"a": lambda: calls.append("a") or 1.0, "b": lambda: calls.append("b") or 2.0}, 3)
    assert calls == ["a", "b", "b", "a", "a", "b"]
    assert values == {"a": [1.0, 1.0, 1.0], "b": [2.0, 2.0, 2.0]}
    assert bench.paired_ratio([2.0, 6.0], [1.0, 3.0]) == [2.0, 2.0]


def test_markdown_table_renders_medians_with_their_spread():
    table = bench.markdown_table({"rollout": {"model": "tiny", "tps": {"median": 2.0, "min": 1.0, "max": 3.0, "n": 3}}})
    assert "### rollout" in table and "| model | tiny |" in table and "| tps | 2 (1 to 3, n=3) |" in table


PHASES_HF = {"generation": 6.0, "adapter_sync": 0.0, "ref_old_logprobs": 1.0, "forward": 1.0, "backward": 1.5,
             "optimizer": 0.25, "other": 0.25}
PHASES_VLLM = {**PHASES_HF, "generation": 1.0, "adapter_sync": 0.5}


def test_generation_cycle_counts_one_generation_and_num_iterations_updates():
    # 6 + 0 + 2 x 1 (reference and old log-probs) + 4 x (1 + 1.5 + 0.25 + 0.25)
    assert bench.generation_cycle_seconds(PHASES_HF, 4) == 6 + 2 + 4 * 3
    assert bench.generation_cycle_seconds(PHASES_HF, 1) == 6 + 1 + 3  # no old log-probs


def test_projection_scales_the_hf_hours_by_the_cycle_ratio():
    from nli_grpo.grid import SIZE_RESOURCES

    projection = bench.project_grid_hours(PHASES_HF, PHASES_VLLM, num_iterations=4)
    ratio = (1 + 0.5 + 2 + 12) / 20
    assert projection["cycle_ratio_vllm_over_hf"] == round(ratio, 3)
    hours_7b = 33 * SIZE_RESOURCES["7b"]["timeout_min"] / 60
    assert projection["sizes"]["7b"] == {"cells": 33, "hf_gpu_hours": round(hours_7b), "vllm_gpu_hours": round(hours_7b * ratio)}
    table = bench.projection_table(projection)
    assert table.startswith("**Projection** (not measured)") and "| total | 39 |" in table


def test_projection_charges_both_backends_the_same_update():
    # The update is the same computation with either backend: an update phase measured slower on
    # the vLLM side (its engine beside the trainer on a small machine) must not enter the ratio.
    slow_update = {**PHASES_VLLM, "ref_old_logprobs": 3.0, "forward": 2.0, "backward": 4.0}
    assert bench.project_grid_hours(PHASES_HF, slow_update) == bench.project_grid_hours(PHASES_HF, PHASES_VLLM)


SETTINGS_VARIABLES = [f"NLI_GRPO_BENCH_{name}" for name in ("MODEL", "REPEATS", "THREADS", "PROMPTS", "NEW_TOKENS", "RANK")]


def _isolated_environment(monkeypatch, *names: str) -> None:
    """Variables the benchmarks set, restored (or removed) after the test."""
    for name in names:
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)


def test_settings_round_trip_through_the_environment(monkeypatch):
    _isolated_environment(monkeypatch, *SETTINGS_VARIABLES)
    assert bench.BenchSettings.from_env() == bench.BenchSettings()
    bench.BenchSettings(model="random:qwen2.5-0.5b", repeats=5, prompts=1).export()
    assert bench.BenchSettings.from_env() == bench.BenchSettings(model="random:qwen2.5-0.5b", repeats=5, prompts=1)


# --------------------------------------------------------------------------- what the benchmarks measure
def test_cpu_kv_cache_is_sized_from_the_need():
    from nli_grpo.config import load_config
    from nli_grpo.grid import vllm_cpu_kv_cache_bytes

    cfg = load_config("smoke", ["model.name_or_path=random:qwen2.5-0.5b", "grpo.completions_per_step=32"])
    per_token = 2 * 24 * 2 * 64 * 4
    host = 24 * 2**30
    assert vllm_cpu_kv_cache_bytes(cfg, "rollout", 1024, 4, host) == int(per_token * 1024 * 32 * 1.25)
    cfg.grpo.completions_per_step = 8  # at least 16 sequences
    assert vllm_cpu_kv_cache_bytes(cfg, "rollout", 1024, 4, host) == int(per_token * 1024 * 16 * 1.25)
    assert vllm_cpu_kv_cache_bytes(cfg, "eval", 1024, 4, host) == int(per_token * 1024 * cfg.eval.batch_size * 1.25)
    # capped at a quarter of host memory, never below one full sequence
    assert vllm_cpu_kv_cache_bytes(cfg, "eval", 32768, 4, host) == host // 4
    assert vllm_cpu_kv_cache_bytes(cfg, "eval", 32768, 4, 2**20) == per_token * 32768


def test_tied_embeddings_count_once_in_the_weights_estimate():
    from nli_grpo.config import load_config
    from nli_grpo.grid import base_weights_gb

    small = base_weights_gb(load_config("smoke", ["model.name_or_path=Qwen/Qwen2.5-0.5B-Instruct"]))
    assert small == pytest.approx(0.494e9 * 2 / 2**30, rel=0.02)  # 494M parameters in 16 bits


def test_group_runs_are_the_runs_of_equal_prompts():
    from nli_grpo.rollout import group_runs

    assert group_runs([[1, 2], [1, 2], [3], [3], [3], [1, 2]]) == [(0, 2), (2, 3), (5, 1)]
    assert group_runs([]) == []


@pytest.mark.parametrize("overrides, reuse", [
    (["rollout.backend=vllm", "eval.backend=vllm"], True),
    (["rollout.backend=hf", "eval.backend=vllm"], False),
    (["rollout.backend=vllm", "eval.backend=hf"], False),
    (["rollout.backend=vllm", "eval.backend=vllm", "eval.after_training=false"], False),
])
def test_the_evaluation_reuses_the_rollout_engine_when_it_asks_for_the_same(overrides, reuse, monkeypatch):
    from nli_grpo import rollout
    from nli_grpo.config import load_config

    cfg = load_config("smoke", overrides)
    assert rollout.eval_reuses_rollout_engine(cfg) is reuse  # on the CPU both run in float32
    monkeypatch.setattr(rollout, "REUSE_ROLLOUT_ENGINE_FOR_EVAL", False)
    assert rollout.eval_reuses_rollout_engine(cfg) is False


def test_a_parked_engine_is_taken_once_and_shut_down_when_left():
    from nli_grpo import rollout

    class Engine:
        def __init__(self):
            self.loras, self.shut = {1, 2}, False
            self.llm_engine = self

        def list_loras(self):
            return set(self.loras)

        def remove_lora(self, lora_id):
            self.loras.discard(lora_id)

        @property
        def engine_core(self):
            return self

        def shutdown(self):
            self.shut = True

    first, second = Engine(), Engine()
    rollout.park_engine(first)
    assert first.loras == set()  # no rollout version left to collide with the evaluation's LoRA ids
    assert rollout.take_parked_engine() is first and rollout.take_parked_engine() is None
    rollout.park_engine(second)
    rollout.shutdown_parked_engine()
    assert second.shut and rollout.take_parked_engine() is None


@pytest.mark.slow
def test_the_overhead_benchmark_runs_and_writes_json_and_markdown(tmp_path, monkeypatch):
    import torch

    _isolated_environment(monkeypatch, *SETTINGS_VARIABLES, "OMP_NUM_THREADS", "VLLM_CPU_NUM_OF_RESERVED_CPU")
    threads = torch.get_num_threads()
    out, md = tmp_path / "bench.json", tmp_path / "bench.md"
    assert bench.main(["overhead", "--repeats", "1", "--new-tokens", "8", "--json", str(out), "--markdown", str(md)]) == 0
    figures = json.loads(out.read_text())["overhead"]
    assert figures["ratio"] > 0 and figures["ratio_cpu"] > 0
    for clock in ("wall", "cpu"):  # 10 steps, the first dropped
        assert figures[f"ours_step_{clock}_s"]["n"] == figures[f"bare_trl_step_{clock}_s"]["n"] == 9
    assert "### overhead" in md.read_text()
    torch.set_num_threads(threads)


# --------------------------------------------------------------------------- degrading per backend
def test_a_side_whose_needs_are_absent_is_reported_unavailable():
    assert bench.unavailable() is None and bench.unavailable("json") is None
    assert bench.unavailable("no_such_package_here").startswith("unavailable: no_such_package_here does not import")
    import torch

    assert (bench.unavailable("cuda") is None) == torch.cuda.is_available()


def test_grpo_step_rejects_an_unknown_variant_before_running(tmp_path, monkeypatch):
    monkeypatch.setenv("NLI_GRPO_BENCH_STEP_VARIANTS", "bf16,fp8")
    with pytest.raises(ValueError, match=r"unknown \['fp8'\]; choose from bf16, fp16_bf16_autocast, bnb4"):
        bench.bench_grpo_step(tmp_path)


@pytest.mark.slow
def test_without_vllm_grpo_phases_keeps_the_hf_side_and_writes_it(tmp_path):
    """A GPU node without vLLM: the HF half's figures reach the JSON, the vLLM side says why not
    (vLLM made unimportable in a fresh interpreter; tiny model, 2 HF steps)."""
    import os
    import subprocess
    import sys

    out = tmp_path / "phases.json"
    script = "import sys\nsys.modules['vllm'] = None\nfrom nli_grpo.bench import main\nsys.exit(main(sys.argv[1:]))"
    env = {k: v for k, v in os.environ.items() if not k.startswith("NLI_GRPO_BENCH_")}
    proc = subprocess.run([sys.executable, "-c", script, "grpo_phases", "--repeats", "1", "--new-tokens", "4", "--prompts", "1",
                           "--json", str(out)], capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    figures = json.loads(out.read_text())["grpo_phases"]
    assert figures["vllm"].startswith("unavailable: vllm does not import")
    assert figures["hf_step_s"]["n"] == 1 and figures["hf_generation_s"]["median"] > 0
    assert "projection" not in figures and not any(k.startswith("vllm_") for k in figures)
