"""Grid expansion (axes, linked axes, CLI axis flags, seeds, smoke) and the checks that refuse a
cell before submission (config, capability matrix, GPU memory fit). No Slurm needed."""
import importlib.util
from pathlib import Path

import pytest

from nli_grpo import grid
from nli_grpo.config import ConfigError
from nli_grpo.grid import Grid, capability_problems, estimate_gpu_memory, memory_problems, qwen, restrict_axis
from nli_grpo.sweep import Sweep, parse_args, plan
from nli_grpo.train import config_for_run

REPO = Path(__file__).resolve().parent.parent


def load_sweep(name: str) -> Sweep:
    spec = importlib.util.spec_from_file_location(f"sweep_{name}", REPO / "sweeps" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.SWEEP


def cells_of(name: str, *argv: str, tmp_path=None):
    sweep = load_sweep(name)
    results = ["--results", str(tmp_path)] if tmp_path else []
    return plan(sweep, parse_args(sweep, [*argv, *results]))


def test_lora_rank_sweep_is_ranks_times_linked_model_variants(tmp_path):
    cells = cells_of("lora_rank", tmp_path=tmp_path)
    assert len(cells) == 10 and not any(c.problems for c in cells)
    pairs = {(c.cfg.lora.rank, c.cfg.model.quantization, c.cfg.model.name_or_path) for c in cells}
    assert pairs == {(r, q, "Qwen/Qwen2.5-7B-Instruct" + ("-AWQ" if q == "awq" else "")) for r in (8, 16, 32, 64, 128) for q in ("bf16", "awq")}
    ids = [c.cell_id for c in cells]
    assert len(set(ids)) == 10 and "qwen2.5-7b__awq__r64__s0__vllm" in ids
    assert all(c.cfg.output.dir == str(tmp_path.absolute() / "lora_rank" / c.cell_id) for c in cells)
    assert all(c.cfg.output.sweep == "lora_rank" and c.cfg.grpo.completions_per_step == 32 for c in cells)


def test_cell_ids_are_stable_and_only_depend_on_the_axes(tmp_path):
    first = [c.cell_id for c in cells_of("lora_rank", tmp_path=tmp_path)]
    again = [c.cell_id for c in cells_of("lora_rank", "grpo.learning_rate=1e-5", tmp_path=tmp_path / "other")]
    assert first == again


def test_axis_flags_and_seeds_restrict_and_extend_the_grid(tmp_path):
    cells = cells_of("lora_rank", "--ranks", "8,32", "--quantizations", "bf16", "--seeds", "0,22,42", tmp_path=tmp_path)
    assert sorted((c.cfg.lora.rank, c.cfg.seed) for c in cells) == [(r, s) for r in (8, 32) for s in (0, 22, 42)]
    assert {c.cfg.model.name_or_path for c in cells} == {"Qwen/Qwen2.5-7B-Instruct"}
    sizes = cells_of("model_size", "--models", "14b,qwen2.5-32b", tmp_path=tmp_path)
    assert sorted(c.cfg.model.name_or_path for c in sizes) == ["Qwen/Qwen2.5-14B-Instruct-AWQ", "Qwen/Qwen2.5-32B-Instruct-AWQ"]


def test_an_axis_flag_that_selects_no_variant_says_what_the_sweep_has():
    block = load_sweep("lora_rank").blocks()[0]
    with pytest.raises(ValueError, match=r"no model variant with model.quantization in \['bnb4'\]; this sweep has: bf16, awq"):
        restrict_axis(block, "model.quantization", ["bnb4"])


def test_per_size_resources_come_with_the_model_variant_and_the_cli_overrides_them(tmp_path):
    cells = {c.cfg.model.name_or_path: c.cfg.resources for c in cells_of("model_size", tmp_path=tmp_path)}
    assert cells["Qwen/Qwen2.5-7B-Instruct-AWQ"].mem_gb == 64
    assert cells["Qwen/Qwen2.5-32B-Instruct-AWQ"].timeout_min == 48 * 60
    overridden = cells_of("model_size", "--time", "1-12:00:00", "--gpus-per-node", "2", "--mem-gb", "200",
                          "rollout.backend=hf", tmp_path=tmp_path)
    assert {(c.cfg.resources.timeout_min, c.cfg.resources.gpus_per_node, c.cfg.resources.mem_gb) for c in overridden} == {(36 * 60, 2, 200)}


def test_paper_sweep_has_main_runs_rank_ablation_and_one_zero_shot_per_model_variant(tmp_path):
    cells = cells_of("paper", tmp_path=tmp_path)
    assert not [c.problems for c in cells if c.problems]
    zero_shot = [c for c in cells if c.cfg.stage == "zero_shot"]
    ablation = [c for c in cells if c.cfg.output.extra_axes]
    main = [c for c in cells if c not in zero_shot and c not in ablation]
    assert len(main) == 9 and len(ablation) == 30 and len(zero_shot) == 4
    assert sorted(c.cell_id for c in zero_shot) == ["qwen2.5-14b__awq__zero-shot", "qwen2.5-32b__awq__zero-shot",
                                                     "qwen2.5-7b__awq__zero-shot", "qwen2.5-7b__bf16__zero-shot"]
    # the same model/rank/seed in the main runs and the ablation are different runs (other recipe)
    assert "qwen2.5-7b__awq__r64__s22__vllm" in {c.cell_id for c in main}
    assert "qwen2.5-7b__awq__r64__s22__vllm__ablation-lora_rank" in {c.cell_id for c in ablation}
    assert {c.cfg.grpo.max_steps for c in ablation} == {1000} and {c.cfg.grpo.max_steps for c in main} == {4000}


def test_smoke_keeps_the_shape_shrunk_onto_the_tiny_model(tmp_path):
    cells = cells_of("lora_rank", "--smoke", tmp_path=tmp_path)
    assert [c.cell_id for c in cells] == ["tiny__bf16__r8__s0", "tiny__bf16__r16__s0"]
    cfg = cells[0].cfg
    assert (cfg.model.name_or_path, cfg.resources.gpus_per_node, cfg.data.local_dir) == ("tiny", 0, "samples")
    assert cfg.output.dir == str(tmp_path.absolute() / "lora_rank-smoke" / "tiny__bf16__r8__s0")
    paper = sorted(c.cell_id for c in cells_of("paper", "--smoke", tmp_path=tmp_path))
    assert paper == ["tiny__bf16__r16__s0__ablation-lora_rank", "tiny__bf16__r8__s0",  # main runs: the smoke recipe's rank
                     "tiny__bf16__r8__s0__ablation-lora_rank", "tiny__bf16__zero-shot"]


def test_linked_axis_values_become_overrides_that_change_together():
    block = Grid("paper", axes={"model": [qwen("7b", "awq")], "lora.rank": [8, 16]}, overrides=["stage=grpo"], tags={"ablation": "x"})
    cells = block.cells([0])
    assert len(cells) == 2
    assert cells[0][:2] == ["stage=grpo", "output.extra_axes.ablation=x"]
    assert "model.name_or_path=Qwen/Qwen2.5-7B-Instruct-AWQ" in cells[0] and "model.quantization=awq" in cells[0]
    assert "resources.mem_gb=64" in cells[0] and cells[1][-2:] == ["lora.rank=16", "seed=0"]


# --------------------------------------------------------------------------- refusals
def test_rank_zero_is_refused_with_the_field_and_the_fix(tmp_path):
    [cell, *_] = cells_of("lora_rank", "--ranks", "0", tmp_path=tmp_path)
    assert cell.cfg is None
    assert cell.problems == ["lora.rank=0 must be a positive integer (the paper uses 8..128)"]


def test_unknown_model_is_refused():
    cfg = config_for_run("paper", ["model.name_or_path=acme/SuperNLI-9B", "model.quantization=bf16"])
    [problem] = capability_problems(cfg)
    assert problem.startswith("unknown model 'acme/SuperNLI-9B'") and "Qwen2.5" in problem


def test_awq_needs_an_awq_checkpoint():
    with pytest.raises(ConfigError, match="needs a pre-quantised AWQ checkpoint .*not 'Qwen/Qwen2.5-7B-Instruct'"):
        config_for_run("paper", ["model.name_or_path=Qwen/Qwen2.5-7B-Instruct", "model.quantization=awq"])


def test_capability_matrix_refuses_awq_on_a_cpu_node_and_bnb4_without_bitsandbytes(monkeypatch):
    awq_cpu = config_for_run("paper", ["resources.gpus_per_node=0", "grpo.optim=adamw_torch"])
    assert capability_problems(awq_cpu) == [
        f"model.quantization=awq needs {grid.CAPABILITIES['awq']}; this cell asks for resources.gpus_per_node=0"]
    monkeypatch.setattr(grid, "_installed", lambda module: module != "bitsandbytes")
    bnb4 = config_for_run("paper", ["model.name_or_path=Qwen/Qwen2.5-7B-Instruct", "model.quantization=bnb4"])
    assert capability_problems(bnb4) == ["model.quantization=bnb4 needs bitsandbytes installed in the job's environment: pip install bitsandbytes"]


def test_32b_bf16_does_not_fit_one_80gb_gpu_and_the_refusal_gives_the_numbers():
    cfg = config_for_run("paper", ["model.name_or_path=Qwen/Qwen2.5-32B-Instruct", "model.quantization=bf16"])
    [problem] = memory_problems(cfg)
    estimate = estimate_gpu_memory(cfg)
    assert estimate["weights"] == pytest.approx(61.0, abs=0.5) and estimate["total"] > 80
    assert problem.startswith(f"does not fit: ~{estimate['total']} GB per GPU (weights 61.0 + ")
    assert "> 80 GB (resources.gpu_memory_gb)" in problem and "model.quantization=awq" in problem
    # the same model as the paper ran it (AWQ) fits, and so does bf16 with HF rollouts on a 141 GB GPU
    # (with colocated vLLM it holds the 61 GB of weights twice: no)
    assert memory_problems(config_for_run("paper", ["model.name_or_path=Qwen/Qwen2.5-32B-Instruct-AWQ"])) == []
    bf16_h200 = ["model.name_or_path=Qwen/Qwen2.5-32B-Instruct", "model.quantization=bf16", "resources.gpu_memory_gb=141"]
    assert memory_problems(config_for_run("paper", [*bf16_h200, "rollout.backend=hf"])) == []
    assert memory_problems(config_for_run("paper", bf16_h200))


def test_memory_estimate_grows_with_rank_and_batch_and_skips_cpu_cells():
    base = ["model.name_or_path=Qwen/Qwen2.5-7B-Instruct", "model.quantization=bf16"]
    r8, r128 = (estimate_gpu_memory(config_for_run("lora_rank", [*base, f"lora.rank={r}"])) for r in (8, 128))
    assert r128["lora_optimizer"] > 10 * r8["lora_optimizer"] and r128["weights"] == r8["weights"]
    small = estimate_gpu_memory(config_for_run("lora_rank", [*base, "grpo.completions_per_step=8"]))
    assert small["activations"] < r8["activations"]
    assert estimate_gpu_memory(config_for_run("smoke", [])) is None
