"""Quantization of the frozen base: bf16 vs AWQ (pre-quantised checkpoint) vs bitsandbytes 4-bit,
Qwen2.5-7B-Instruct, LoRA r 64.

    python sweeps/quantization.py --partition gpu --seeds 0,22,42
"""
from nli_grpo.grid import qwen
from nli_grpo.sweep import Sweep

SWEEP = Sweep(
    name="quantization",
    description="base quantization on Qwen2.5-7B (r 64)",
    recipe="paper",
    axes={"model": [qwen("7b", "bf16"), qwen("7b", "awq"), qwen("7b", "bnb4")], "lora.rank": [64]},
)

if __name__ == "__main__":
    raise SystemExit(SWEEP.main())
