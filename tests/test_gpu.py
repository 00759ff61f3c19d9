"""GPU tier: the real Qwen2.5-7B shape (random weights from the public config, no download).
Skipped without CUDA; CI has no GPU. Run on a GPU node with `pytest -m gpu`.

Each run trains in a process of its own, so that one run's memory (and the allocator's peak)
cannot leak into the next one's figures."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from nli_grpo import results
from nli_grpo.layout import RESULT_FILENAME

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

SEVEN_B = ["model.name_or_path=random:qwen2.5-7b", "lora.rank=64", "grpo.max_steps=2", "grpo.num_iterations=1",
           "grpo.max_completion_length=64", "data.train_source=anli_train_r1", "data.local_dir=samples",
           "data.hub=false", "eval.after_training=false"]

RUN = """
from nli_grpo.job import config_for_run, run

def alternating_reward(completions, **_):
    # non-zero advantages in every group: each step really runs backward and the optimizer
    return [float(i % 2) for i in range(len(completions))]

cfg = config_for_run("paper", {overrides!r}, {out!r})
raise SystemExit(run(cfg, reward_funcs=[alternating_reward]))
"""


def train_7b(tmp_path, quantization: str, rollout: str, *more: str) -> dict:
    """Two GRPO steps of the 7B shape with LoRA r64 in a fresh process; the result document."""
    out = tmp_path / f"{quantization}-{rollout}"
    overrides = [*SEVEN_B, f"model.quantization={quantization}", f"rollout.backend={rollout}", *more]
    proc = subprocess.run([sys.executable, "-c", RUN.format(overrides=overrides, out=str(out))],
                          capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-4000:]
    doc = results.read_result(out / RESULT_FILENAME)
    train = doc["train"]
    assert train["steps_done"] == 2 and train["skipped_zero_advantage_steps"] == 0
    # a colocated vLLM engine runs in a process of its own: its share is added to the trainer's peak
    assert train["peak_memory_kind"] == ("cuda_max_allocated+vllm_share" if rollout == "vllm" else "cuda_max_allocated")
    print(f"7B {quantization} r64 ({rollout} rollouts): peak {train['peak_memory_gb']} GB, "
          f"{train['wall_time_s']} s for 2 steps, {train['tokens_per_s']} tokens/s")
    return doc


@pytest.mark.parametrize("rollout", ["hf", "vllm"])
def test_grpo_steps_on_the_7b_shape_train_like_the_authors(tmp_path, rollout):
    """float16 weights under bf16 autocast (the paper recipe), within one GPU."""
    doc = train_7b(tmp_path, "bf16", rollout)
    assert {k: doc["model"][k] for k in ("dtype", "bf16", "fp16")} == {"dtype": "float16", "bf16": True, "fp16": False}
    assert 0 < doc["train"]["peak_memory_gb"] < torch.cuda.get_device_properties(0).total_memory / 2**30


def test_a_4bit_base_needs_clearly_less_gpu_memory_than_an_unquantised_one(tmp_path):
    """7B: the 16-bit base weights take 15.2 GB, NF4 about 4.5 GB; LoRA, its optimizer state and
    the activations are the same in both runs, so the peaks differ by most of the ~10 GB."""
    unquantised = train_7b(tmp_path, "bf16", "hf")["train"]["peak_memory_gb"]
    four_bit = train_7b(tmp_path, "bnb4", "hf")["train"]["peak_memory_gb"]
    assert four_bit < unquantised - 8, (four_bit, unquantised)


def test_an_awq_base_trains(tmp_path):
    """The paper's recipe: LoRA on an AWQ base. gptqmodel's default kernels on CUDA are
    inference-only (train() raises NotImplementedError at the first step); the training load asks
    for its trainable ones. No hub here: a random-weight checkpoint of the 7B shape in the AWQ
    format of Qwen2.5-7B-Instruct-AWQ, written locally."""
    from nli_grpo.models import write_random_awq_model

    checkpoint = tmp_path / "qwen2.5-7b-random-AWQ"
    write_random_awq_model(checkpoint, "qwen2.5-7b")
    doc = train_7b(tmp_path, "awq", "hf", f"model.name_or_path={checkpoint}")
    assert doc["model"]["dtype"] == "float16"
    lora_b = results_adapter_b(tmp_path / "awq-hf")
    assert lora_b and max(lora_b) > 0  # the optimizer stepped through the AWQ layers


def results_adapter_b(run_dir) -> list[float]:
    from safetensors.torch import load_file

    weights = load_file(run_dir / "adapter" / "adapter_model.safetensors")
    return [w.abs().max().item() for name, w in weights.items() if "lora_B" in name]


def test_the_evaluation_engine_starts_after_training_in_the_memory_training_gave_back(tmp_path):
    """After training, vLLM's evaluation engine asks for 90% of the GPU and checks that much is
    free at start: it is only if the trainer's model, optimizer and allocator cache are gone
    (training._release). HF rollouts, so that the evaluation starts an engine of its own."""
    doc = train_7b(tmp_path, "bf16", "hf", "eval.after_training=true", "eval.backend=vllm", "eval.gpu_memory_utilization=0.9",
                   "eval.benchmarks=[snli]", "eval.limit=8")
    assert doc["status"] == "complete" and doc["eval"]["snli"]["n"] == 8
