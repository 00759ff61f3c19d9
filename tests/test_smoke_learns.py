"""The embedded default visibly learns: `python sweeps/lora_rank.py --smoke` (the warm-started tiny
model, the shipped samples, the local executor) then `python -m nli_grpo.aggregate`, as `tox -e
smoke` runs them. Every cell's answers parse on every evaluation set, its reward rises over
training, and the tables show numbers, not "no parse"."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from nli_grpo.layout import CellFolder
from nli_grpo.results import read_result, read_train_log

REPO = Path(__file__).resolve().parent.parent


def reward_by_fifth(train_log: list[dict], max_steps: int) -> tuple[float, float]:
    """Mean reward over the first and over the last fifth of the steps. Only steps that generated
    log a reward (num_iterations > 1 reuses a generation batch), so those are averaged."""
    logged = [(r["step"], r["reward"]) for r in train_log if r.get("reward") is not None]
    first = [reward for step, reward in logged if step <= max_steps / 5]
    last = [reward for step, reward in logged if step > max_steps - max_steps / 5]
    assert first and last, f"no reward logged in the first or the last fifth of {max_steps} steps"
    return sum(first) / len(first), sum(last) / len(last)


def learning_problems(sweep_dir: Path) -> list[str]:
    """What keeps the smoke sweep in `sweep_dir` from counting as learning (empty: it learned)."""
    cells = sorted(p.parent for p in sweep_dir.glob("*/result.json"))
    problems = [] if cells else [f"no result.json under {sweep_dir}"]
    for cell in cells:
        doc = read_result(CellFolder(cell).result)
        if doc["status"] != "complete":
            problems.append(f"{cell.name}: status {doc['status']}")
            continue
        # Pooled over the sets (~90 rows), not per set: a set has 4 to 8 rows, so one answer more or
        # less on another CPU moves its own rate by up to 0.25.
        entries = doc["eval"].values()
        pooled = sum(e["format_rate"] * e["n"] for e in entries) / sum(e["n"] for e in entries)
        if pooled < 0.75:
            problems.append(f"{cell.name}: format rate over all sets {pooled:.2f} < 0.75")
        problems += [f"{cell.name}: no answer parses on {bench}" for bench, e in sorted(doc["eval"].items())
                     if e["format_rate"] == 0]
        first, last = reward_by_fifth(read_train_log(CellFolder(cell).train_log), doc["config"]["grpo"]["max_steps"])
        if not last > first:
            problems.append(f"{cell.name}: mean reward of the last fifth {last:.3f} <= first fifth {first:.3f}")
    tables = list((sweep_dir / "tables").rglob("*.md"))
    if not tables:
        problems.append(f"no Markdown tables under {sweep_dir / 'tables'}")
    problems += [f"{t.relative_to(sweep_dir)} says 'no parse'" for t in tables if "| no parse" in t.read_text()]
    return problems


@pytest.mark.slow
def test_the_smoke_sweep_learns_and_its_tables_show_numbers(tmp_path):
    sweep = subprocess.run([sys.executable, "sweeps/lora_rank.py", "--smoke", "--results", str(tmp_path)],
                           cwd=REPO, capture_output=True, text=True, timeout=900)
    assert sweep.returncode == 0, sweep.stdout[-3000:] + sweep.stderr[-3000:]
    sweep_dir = tmp_path / "lora_rank-smoke"
    tables = subprocess.run([sys.executable, "-m", "nli_grpo.aggregate", str(sweep_dir)],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert tables.returncode == 0, tables.stderr[-3000:]
    assert len(list(sweep_dir.glob("*/result.json"))) == 2  # ranks 8 and 16
    assert learning_problems(sweep_dir) == []
    assert (sweep_dir / "plots" / "lora_rank-smoke" / "train_curves.png").is_file()
