"""Grid cells: linked axes, restricting an axis, cell ids, and the checks that refuse a cell before
submission (capability matrix, GPU memory fit). No Slurm needed."""
import pytest

from nli_grpo import grid
from nli_grpo.config import ConfigError, load_config
from nli_grpo.grid import (
    Grid,
    capability_problems,
    cell_from_config,
    cell_id,
    estimate_gpu_memory,
    memory_problems,
    qwen,
    restrict_axis,
)
from nli_grpo.job import config_for_run


def test_an_axis_flag_that_selects_no_variant_says_what_the_sweep_has(load_sweep):
    block = load_sweep("lora_rank").blocks()[0]
    with pytest.raises(ValueError, match=r"no model variant with model.quantization in \['bnb4'\]; this sweep has: bf16, awq"):
        restrict_axis(block, "model.quantization", ["bnb4"])


def test_linked_axis_values_become_overrides_that_change_together():
    block = Grid("paper", axes={"model": [qwen("7b", "awq")], "lora.rank": [8, 16]}, overrides=["stage=grpo"], tags={"ablation": "x"})
    cells = block.cells([0])
    assert len(cells) == 2
    assert cells[0][:2] == ["stage=grpo", "output.extra_axes.ablation=x"]
    assert "model.name_or_path=Qwen/Qwen2.5-7B-Instruct-AWQ" in cells[0] and "model.quantization=awq" in cells[0]
    assert "resources.mem_gb=64" in cells[0] and cells[1][-2:] == ["lora.rank=16", "seed=0"]


# --------------------------------------------------------------------------- refusals
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
    bnb4 = config_for_run("paper", ["model.name_or_path=Qwen/Qwen2.5-7B-Instruct", "model.quantization=bnb4",
                                    "rollout.backend=hf", "eval.backend=hf"])
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


# --------------------------------------------------------------------------- cells
def _cell(recipe="paper", *overrides):
    return cell_from_config(load_config(recipe, list(overrides)))


def test_cell_of_paper_recipe():
    cell = _cell()
    assert cell == {"model": "qwen2.5-7b", "quantization": "awq", "lora_rank": 64, "seed": 0,
                    "stage": "grpo", "rollout": "vllm"}
    assert cell_id(cell) == "qwen2.5-7b__awq__r64__s0__vllm"


def test_cell_id_is_stable_and_ignores_non_axis_fields():
    a = cell_id(_cell("paper", "rollout.backend=hf"))
    b = cell_id(_cell("paper", "rollout.backend=hf", "grpo.max_steps=10", "eval.limit=5"))
    assert a == b == "qwen2.5-7b__awq__r64__s0"
    assert cell_id(dict(reversed(list(_cell().items())))) == cell_id(_cell())  # key order


@pytest.mark.parametrize("axis", ["lora.rank=32", "seed=22", "model.quantization=bf16"])
def test_cell_id_changes_with_each_axis(axis):
    overrides = ["model.name_or_path=Qwen/Qwen2.5-7B-Instruct"] if "quantization" in axis else []
    assert cell_id(_cell("paper", axis, *overrides)) != cell_id(_cell())


def test_zero_shot_cell_has_no_rank_or_seed():
    cells = [_cell("paper", "stage=zero_shot", f"lora.rank={r}", f"seed={s}") for r, s in [(8, 0), (64, 42)]]
    assert cells[0]["lora_rank"] is None and cells[0]["rollout"] is None
    assert cell_id(cells[0]) == cell_id(cells[1]) == "qwen2.5-7b__awq__zero-shot"


def test_cell_id_is_path_safe():
    cell = {"model": "my org/model:v2", "quantization": "bf16", "lora_rank": 8, "seed": 0,
            "stage": "grpo", "rollout": "hf", "dataset": "a/b c"}
    ident = cell_id(cell)
    assert "/" not in ident and " " not in ident and ":" not in ident
    assert ident == "my-org-model-v2__bf16__r8__s0__dataset-a-b-c"


def test_extra_axes_are_part_of_the_id_in_sorted_order():
    base = _cell("paper", "rollout.backend=hf")
    assert cell_id({**base, "lr": 1e-5, "data": "x"}) == "qwen2.5-7b__awq__r64__s0__data-x__lr-1e-05"
