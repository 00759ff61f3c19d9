"""The paper's LoRA-rank ablation: r in 8..128 on Qwen2.5-7B-Instruct, unquantised and AWQ.

    python sweeps/lora_rank.py --partition gpu          # submit; rerun to fill the holes
    python sweeps/lora_rank.py --smoke                  # tiny model on this machine, minutes
"""
from nli_grpo.grid import qwen
from nli_grpo.sweep import Sweep

SWEEP = Sweep(
    name="lora_rank",
    description="LoRA rank x quantization on Qwen2.5-7B",
    recipe="lora_rank",
    axes={"lora.rank": [8, 16, 32, 64, 128], "model": [qwen("7b", "bf16"), qwen("7b", "awq")]},
)

if __name__ == "__main__":
    raise SystemExit(SWEEP.main())
