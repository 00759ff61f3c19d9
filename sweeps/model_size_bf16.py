"""Beyond the paper: model size on the unquantised bases, Qwen2.5-Instruct 7B / 14B / 32B, LoRA r 64.
The 14B and 32B cells take their rollouts from a vLLM server on a GPU of their own (2 and 3 GPUs
per job; see nli_grpo.grid.SERVER_VARIANTS); `--dry-run` shows each job's split.

    python sweeps/model_size_bf16.py --partition gpu --dry-run
"""
from nli_grpo.grid import qwen
from nli_grpo.sweep import Sweep

SWEEP = Sweep(
    name="model_size_bf16",
    description="model size (unquantised, r 64)",
    recipe="paper",
    axes={"model": [qwen("7b", "bf16"), qwen("14b", "bf16"), qwen("32b", "bf16")], "lora.rank": [64]},
)

if __name__ == "__main__":
    raise SystemExit(SWEEP.main())
