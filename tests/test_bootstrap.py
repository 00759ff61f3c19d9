"""The hard-example pool: selection rule, and the real command on the tiny model."""

from __future__ import annotations

import pytest

from nli_grpo.bootstrap import hard_items, main
from nli_grpo.data import load_train_source

ROWS = [{"id": "a", "label": 0}, {"id": "b", "label": 2}, {"id": "c", "label": 1}]
ENT, NEU, CON = ("<think>x</think><answer>entailment</answer>", "<answer>neutral</answer>", "<answer>contradiction</answer>")


def test_keeps_items_the_model_mostly_gets_wrong():
    completions = [[ENT, ENT, ENT, NEU], [ENT, NEU, CON, "no answer"], [NEU, NEU, CON, CON]]
    kept = hard_items(ROWS, completions, below=0.5)
    assert [(r["id"], r["bootstrap_accuracy"]) for r in kept] == [("b", 0.25)]
    assert kept[0]["bootstrap_samples"] == 4
    assert [r["id"] for r in hard_items(ROWS, completions, below=0.6)] == ["b", "c"]


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
