"""The hard-example pool: selection rule, and the real command on the tiny model."""

from __future__ import annotations

import pytest

from nli_grpo.bootstrap import hard_items, main, sampled
from nli_grpo.data import load_train_source

ROWS = [{"uid": "a", "label": 0}, {"uid": "b", "label": 2}, {"uid": "c", "label": 1}]
ENT, NEU, CON = ("<think>x</think><answer>entailment</answer>", "<answer>neutral</answer>", "<answer>contradiction</answer>")


def test_keeps_items_the_model_mostly_gets_wrong():
    completions = [[ENT, ENT, ENT, NEU], [ENT, NEU, CON, "no answer"], [NEU, NEU, CON, CON]]
    records = sampled(ROWS, completions)
    assert [(r["uid"], r["bootstrap_accuracy"], r["bootstrap_samples"]) for r in records] == [
        ("a", 0.75, 4), ("b", 0.25, 4), ("c", 0.5, 4)]
    assert [r["uid"] for r in hard_items(records, below=0.5)] == ["b"]
    assert [r["uid"] for r in hard_items(records, below=0.6)] == ["b", "c"]


@pytest.mark.slow
def test_command_writes_a_pool_that_training_can_read(tmp_path):
    out = tmp_path / "anli_hard.jsonl"
    rc = main(["--base", "tiny", "--out", str(out), "--rounds", "anli_train_r1,anli_train_r2", "--limit", "3",
               "--samples", "2", "--below", "1.0", "--config", "smoke", "--backend", "hf", "grpo.max_completion_length=8"])
    assert rc == 0
    pool = load_train_source("anli_hard", local_dir=tmp_path, hub=False).dataset
    # A random tiny model answers nothing correctly: every item is hard.
    assert len(pool) == 6 and set(pool["label"]) <= {0, 1, 2}
    assert len(set(pool["id"])) == 6
    # A rerun (say after a preemption) samples nothing again and writes the same pool.
    progress = tmp_path / "anli_hard.jsonl.progress.jsonl"
    assert len(progress.read_text().splitlines()) == 6
    before = out.read_text()
    assert main(["--base", "tiny", "--out", str(out), "--rounds", "anli_train_r1,anli_train_r2", "--limit", "3",
                 "--samples", "2", "--below", "1.0", "--config", "smoke", "--backend", "hf"]) == 0
    assert out.read_text() == before and len(progress.read_text().splitlines()) == 6
