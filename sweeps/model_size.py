"""The paper's main runs: Qwen2.5-Instruct 7B / 14B / 32B AWQ, LoRA r 64.

    python sweeps/model_size.py --partition gpu --models 32b
"""
from nli_grpo.grid import qwen
from nli_grpo.sweep import Sweep

SWEEP = Sweep(
    name="model_size",
    description="model size (AWQ, r 64)",
    recipe="paper",
    axes={"model": [qwen("7b", "awq"), qwen("14b", "awq"), qwen("32b", "awq")], "lora.rank": [64]},
)

if __name__ == "__main__":
    raise SystemExit(SWEEP.main())
