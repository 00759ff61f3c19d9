"""The GPU paths read against the installed libraries (issue 26), checked here where the mechanism
runs on the CPU (memory release after training, the ZeRO-3 adapter save), and otherwise by what
the code passes to the library: the AWQ kernel choice handed to transformers / gptqmodel, the
vLLM engine's limits, the refusals of combinations the pinned vLLM cannot run."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

from nli_grpo import models
from nli_grpo.config import ConfigError, ModelConfig
from nli_grpo.job import config_for_run

#: What Qwen/Qwen2.5-7B-Instruct-AWQ's config.json says (its quantization_config).
QWEN_AWQ_QUANTIZATION = {"bits": 4, "group_size": 128, "modules_to_not_convert": None, "quant_method": "awq",
                         "version": "gemm", "zero_point": True}


# --------------------------------------------------------------------------- 1. AWQ kernels
@pytest.fixture
def from_pretrained_calls(monkeypatch):
    """from_pretrained's keyword arguments, recorded instead of loading (no GPU, no gptqmodel here)."""
    from transformers import AutoModelForCausalLM

    calls = []

    class Recorded(Exception):
        pass

    def record(path, **kwargs):
        calls.append(kwargs)
        raise Recorded

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", record)
    monkeypatch.setattr(models, "_require_awq_backend", lambda: None)

    def load(training: bool) -> dict:
        with pytest.raises(Recorded):
            models.load_base_model(ModelConfig(name_or_path="Qwen/Qwen2.5-7B-Instruct-AWQ", quantization="awq"), torch.float16,
                                   training=training)
        return calls[-1]

    return load


def test_an_awq_base_trains_on_gptqmodels_trainable_kernels_and_evaluates_on_the_fast_ones(from_pretrained_calls):
    """gptqmodel's `auto` picks inference-only kernels on CUDA (train() raises): a training load
    asks for `auto_trainable`, which transformers lays over the checkpoint's quantization_config
    (a loading attribute); an evaluation load leaves the checkpoint's (`auto`)."""
    from transformers.quantizers.auto import AutoHfQuantizer

    passed = from_pretrained_calls(training=True)["quantization_config"]
    merged = AutoHfQuantizer.merge_quantization_configs(dict(QWEN_AWQ_QUANTIZATION), passed)
    assert merged.backend == "auto_trainable"
    assert (merged.bits, merged.group_size, merged.zero_point, merged.format) == (4, 128, True, "gemm")
    assert "quantization_config" not in from_pretrained_calls(training=False)


def test_gptqmodel_older_than_5_6_is_refused_with_what_to_install():
    assert "too old" in models.awq_backend_problem(cuda=True, gptqmodel_version="5.4.2")
    assert "pip install 'nli_grpo[gpu]'" in models.awq_backend_problem(cuda=True, gptqmodel_version=None)
    assert models.awq_backend_problem(cuda=True, gptqmodel_version="7.6.0") is None
    assert "CUDA GPU" in models.awq_backend_problem(cuda=False, gptqmodel_version="7.6.0")


# --------------------------------------------------------------------------- 2. bnb-4bit and vLLM
@pytest.mark.parametrize("backends", [["rollout.backend=vllm"], ["rollout.backend=hf", "eval.backend=vllm"],
                                      ["rollout.backend=vllm_server", "resources.gpus_per_node=2"]])
def test_bnb4_with_vllm_is_refused_since_the_pinned_vllm_has_no_bitsandbytes(backends):
    """vLLM 0.31 (the GPU install) and 0.32 (the CPU build) dropped `quantization=bitsandbytes`."""
    base = ["model.name_or_path=Qwen/Qwen2.5-7B-Instruct", "model.quantization=bnb4", "eval.backend=hf"]
    with pytest.raises(ConfigError, match="bnb4 with .*=vllm.*rollout.backend=hf and eval.backend=hf"):
        config_for_run("paper", [*base, *backends])
    config_for_run("paper", [*base, "rollout.backend=hf"])


def test_the_quantization_sweeps_bnb4_cell_runs_through_hf(load_sweep, tmp_path):
    from nli_grpo.sweep import parse_args, plan

    sweep = load_sweep("quantization")
    cells = {c.cfg.model.quantization: c for c in plan(sweep, parse_args(sweep, ["--results", str(tmp_path)]))}
    bnb4 = cells["bnb4"].cfg
    assert (bnb4.rollout.backend, bnb4.eval.backend) == ("hf", "hf")
    assert cells["awq"].cfg.rollout.backend == "vllm" and not any(c.problems for c in cells.values())


# --------------------------------------------------------------------------- 3. memory before evaluation
def test_after_training_nothing_holds_the_model_any_more(monkeypatch, tmp_path, rewards):
    """vLLM's evaluation engine checks free memory at start: the trained model must be gone (and
    the allocator's cache given back) by then, even while the trainer object itself lives on."""
    from nli_grpo import training

    kept = {}
    real = training.build_trainer

    def build_and_watch(*args, **kwargs):
        trainer, info = real(*args, **kwargs)
        kept["trainer"] = trainer  # alive to the end of the test: the release must not rely on its death
        kept["policy"] = weakref.ref(trainer.model)
        kept["base"] = weakref.ref(trainer.model.get_base_model())
        return trainer, info

    monkeypatch.setattr(training, "build_trainer", build_and_watch)
    loads = []  # and the trainer asks for a base to train (AWQ: trainable kernels)
    real_load = models.load_base_model
    monkeypatch.setattr(models, "load_base_model", lambda *a, **k: loads.append(k.get("training")) or real_load(*a, **k))
    emptied = []
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: emptied.append(kept["base"]() is None))
    cfg = config_for_run("smoke", ["model.name_or_path=tiny", "grpo.max_steps=1", "grpo.num_iterations=1", "grpo.completions_per_step=8",
                                   "grpo.max_completion_length=8", "eval.after_training=false"], str(tmp_path))
    assert training.train(cfg, training.StopRequest(), reward_funcs=[rewards.alternating]).finished
    gc.collect()
    assert kept["policy"]() is None and kept["base"]() is None
    assert emptied == [True]  # the cache is emptied once the model is unreachable
    assert loads == [True]


# --------------------------------------------------------------------------- 4. ZeRO-3 adapter
ZERO3_SCRIPT = """
from nli_grpo.job import config_for_run, run

def alternating(completions, **_):
    return [float(i % 2) for i in range(len(completions))]

cfg = config_for_run("smoke", {overrides!r}, {out!r})
raise SystemExit(run(cfg, reward_funcs=[alternating]))
"""


@pytest.mark.slow
def test_under_zero3_the_final_adapter_holds_the_gathered_lora_weights(tmp_path):
    """DeepSpeed ZeRO-3 on the CPU (one process, gloo) partitions the LoRA weights too (those above
    its persistence threshold); the saved adapter must hold them whole, as trained."""
    import os
    import subprocess
    import sys

    from safetensors.torch import load_file

    overrides = ["model.name_or_path=tiny", "grpo.deepspeed=zero3", "grpo.max_steps=2", "grpo.num_iterations=1",
                 "grpo.completions_per_step=8", "grpo.max_completion_length=8", "grpo.learning_rate=0.01",
                 "grpo.warmup_steps=0", "eval.after_training=false"]
    script = tmp_path / "zero3_run.py"
    script.write_text(ZERO3_SCRIPT.format(overrides=overrides, out=str(tmp_path / "run")))
    env = {**os.environ, "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(29700 + os.getpid() % 200)}
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    weights = load_file(tmp_path / "run" / "adapter" / "adapter_model.safetensors")
    rank = 8  # the smoke recipe's
    shapes = {name: tuple(w.shape) for name, w in weights.items()}
    assert len(shapes) == 2 * 7 * 2 and all(len(s) == 2 and rank in s and min(s) > 0 for s in shapes.values()), shapes
    assert any(w.abs().max() > 0 for name, w in weights.items() if "lora_B" in name)  # trained, not PEFT's zero init


# --------------------------------------------------------------------------- 5. the colocated engine's KV cache
@pytest.fixture
def on_an_80gb_gpu(monkeypatch):
    """What the code asks of torch on an 80 GB GPU, with vLLM's engine recorded instead of started."""
    import sys
    from types import SimpleNamespace

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(total_memory=80 * 2**30))
    monkeypatch.setitem(sys.modules, "vllm", SimpleNamespace(LLM=lambda **kwargs: kwargs))  # and 15 s of import saved


def test_the_colocated_engine_is_sized_to_a_generation_batch_and_the_fit_says_what_kv_cache_is_left(on_an_80gb_gpu):
    """vLLM's defaults (1,024 sequences, 16,384 tokens a step on an H100) would take activation
    and sampler memory out of the rollout share; the engine gets what a batch needs instead."""
    from nli_grpo import grid, rollout

    cfg = config_for_run("paper", [])  # 7B AWQ: 2 prompts of <= 512 tokens x 4 completions of <= 512
    engine = rollout.build_llm(cfg, "rollout", lora_rank=64)
    assert (engine["max_num_seqs"], engine["max_num_batched_tokens"]) == (8, 1024)
    estimate = grid.estimate_gpu_memory(cfg)
    share_gb = engine["gpu_memory_utilization"] * 80
    assert estimate["vllm_share"] == pytest.approx(share_gb, abs=0.1)
    assert grid.vllm_kv_need_gb(cfg) < estimate["vllm_kv_cache"] < share_gb - grid.base_weights_gb(cfg)
    # a share too small for the batch's KV cache is refused with the numbers
    small = config_for_run("paper", ["rollout.gpu_memory_utilization=0.08", "grpo.completions_per_step=32"])
    assert any("leaves ~" in p and "KV cache" in p for p in grid.memory_problems(small))


def test_peak_memory_counts_the_colocated_engines_process(on_an_80gb_gpu, monkeypatch):
    from nli_grpo import rollout, training

    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda: 30 * 2**30)
    cfg = config_for_run("paper", [])
    share = rollout.colocated_vllm_gb(cfg)
    assert share == pytest.approx(rollout.derived_memory_share(cfg, "rollout") * 80)
    peak = training.peak_memory(share)
    assert peak["peak_memory_gb"] == pytest.approx(30 + share, abs=1e-3) and peak["peak_memory_kind"] == "cuda_max_allocated+vllm_share"


# --------------------------------------------------------------------------- 6. smaller ones
def test_random_weight_models_are_built_in_their_dtype_not_in_float32_then_cast(monkeypatch):
    """random:qwen2.5-32b built in float32 first would need ~131 GB on the GPU."""
    from transformers import Qwen2ForCausalLM

    made = []
    real = torch.nn.Module.register_parameter
    monkeypatch.setattr(torch.nn.Module, "register_parameter",
                        lambda self, name, param: made.append(None if param is None else param.dtype) or real(self, name, param))
    monkeypatch.setattr(models, "Qwen2ForCausalLM", Qwen2ForCausalLM, raising=False)
    config = models._qwen2_config(dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=1,
                                       num_key_value_heads=1), vocab_size=256)
    model = models._random_qwen2(Qwen2ForCausalLM, config, torch.bfloat16, "cpu")
    assert model.dtype == torch.bfloat16 and made and set(made) - {None} == {torch.bfloat16}
    assert torch.get_default_dtype() == torch.float32  # restored


def test_a_server_tensor_parallel_size_that_does_not_divide_the_heads_is_refused():
    from nli_grpo.grid import capability_problems

    def cell(server_gpus: int):
        return config_for_run("paper", ["model.name_or_path=Qwen/Qwen2.5-32B-Instruct", "model.quantization=bf16",
                                        "rollout.backend=vllm_server", f"rollout.server_gpus={server_gpus}",
                                        f"resources.gpus_per_node={server_gpus + 1}"])

    [problem] = [p for p in capability_problems(cell(3)) if "server_gpus" in p]
    assert "rollout.server_gpus=3" in problem and "40 attention heads" in problem and "use one of 1, 2, 4, 8, 40" in problem
    assert not [p for p in capability_problems(cell(2)) if "server_gpus" in p]


def test_a_gpu_cell_without_a_visible_gpu_refuses_to_start_a_cpu_server(tmp_path, monkeypatch):
    from nli_grpo import server

    monkeypatch.setenv("PATH", str(tmp_path / "no-nvidia-smi"))
    monkeypatch.delenv(server.URL_ENV, raising=False)
    monkeypatch.setattr(server.VLLMServer, "start", lambda self: pytest.fail(f"a server started on devices {self.devices}"))
    cfg = config_for_run("paper", ["rollout.backend=vllm_server", "resources.gpus_per_node=2"])
    with pytest.raises(RuntimeError, match="no GPU is visible here .*nvidia-smi"), server.serving(cfg, tmp_path):
        pass


# --------------------------------------------------------------------------- 7. the memory estimate's terms
def test_the_estimate_has_no_logits_tensor_and_a_float32_residual_under_mixed_16bit():
    """TRL 1.16's fused LM head computes log-probs in 4,096 x 32,768 tiles, never the batch's
    logits; float16 weights under bf16 autocast promote the residual stream to float32."""
    from nli_grpo.grid import estimate_gpu_memory

    base = ["model.name_or_path=Qwen/Qwen2.5-7B-Instruct", "model.quantization=bf16", "grpo.completions_per_step=32"]
    mixed, plain = (estimate_gpu_memory(config_for_run("paper", [*base, f"model.dtype={d}"])) for d in ("float16", "bfloat16"))
    assert "logits" not in mixed and mixed["lm_head_tile"] <= 1.0
    tokens, layers, h = 32 * 1024, 28, 3584
    float32_residual = tokens * (layers * 2 * h + 2 * 2 * h) / 2**30  # each layer's input and one layer's sums, 2 more bytes
    assert mixed["activations"] - plain["activations"] == pytest.approx(float32_residual, abs=0.15)
