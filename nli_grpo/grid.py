"""Grid cells: what identifies one run of a sweep, and its stable id."""

from __future__ import annotations

import re

from .config import ExperimentConfig
from .models import model_key


def cell_from_config(cfg: ExperimentConfig) -> dict:
    """The axes that identify a run: model, quantization, LoRA rank (None for zero-shot), seed,
    stage and rollout backend."""
    zero_shot = cfg.stage == "zero_shot"
    return {
        "model": cfg.model.key or model_key(cfg.model.name_or_path),
        "quantization": cfg.model.quantization,
        "lora_rank": None if zero_shot else cfg.lora.rank,
        "seed": cfg.seed,
        "stage": cfg.stage,
        "rollout": None if zero_shot else cfg.rollout.backend,
    }


def cell_id(cell: dict) -> str:
    """Stable, path-safe id derived from the cell's axes only: the same cell always maps to the
    same folder, e.g. `qwen2.5-7b__awq__r64__s0` or `qwen2.5-7b__awq__zero-shot`."""
    parts = [cell["model"], cell["quantization"]]
    if cell.get("stage") == "zero_shot":
        parts.append("zero-shot")
    else:
        parts += [f"r{cell['lora_rank']}", f"s{cell['seed']}"]
        if cell.get("rollout") not in (None, "hf"):
            parts.append(cell["rollout"])
    extra = sorted(k for k in cell if k not in {"model", "quantization", "lora_rank", "seed", "stage", "rollout"})
    parts += [f"{k}-{cell[k]}" for k in extra]
    return re.sub(r"[^A-Za-z0-9._-]+", "-", "__".join(str(p) for p in parts))
