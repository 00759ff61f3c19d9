"""Everything the paper ran, with its three seeds: the main runs (7B/14B/32B AWQ, r 64), the LoRA-rank
ablation (r 8..128 on 7B, bf16 and AWQ; tagged `ablation=lora_rank`, since its recipe differs from
the main runs': 32 completions per step, 1000 steps) and a zero-shot baseline per model variant.

    python sweeps/paper.py --partition gpu
"""
from nli_grpo.grid import Grid, qwen
from nli_grpo.sweep import Sweep

MAIN_MODELS = [qwen("7b", "awq"), qwen("14b", "awq"), qwen("32b", "awq")]

SWEEP = Sweep(
    name="paper",
    description="all runs of the paper",
    grids=[
        Grid("paper", axes={"model": MAIN_MODELS}),
        Grid("lora_rank", axes={"lora.rank": [8, 16, 32, 64, 128], "model": [qwen("7b", "bf16"), qwen("7b", "awq")]},
             tags={"ablation": "lora_rank"}),
        Grid("paper", axes={"model": [*MAIN_MODELS, qwen("7b", "bf16")]}, overrides=["stage=zero_shot"]),
    ],
    seeds=[0, 22, 42],
)

if __name__ == "__main__":
    raise SystemExit(SWEEP.main())
