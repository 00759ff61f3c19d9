"""Result files and training logs: atomic writes, validation, and the one reader of a training log
that every consumer uses (the job's summary, aggregate's curves)."""

import json

import pytest

from nli_grpo import results
from nli_grpo.job import config_for_run
from nli_grpo.layout import CellFolder, result_document


def test_readers_keep_the_last_attempt_of_a_replayed_step(tmp_path):
    """A restart replays the steps after its checkpoint: the summary and aggregate's curves see
    one record per step, the last attempt's."""
    from nli_grpo.aggregate import plots

    run_dir = tmp_path / "sweep" / "cell"
    run_dir.mkdir(parents=True)
    log = CellFolder(run_dir).train_log
    for attempt, steps, reward in ((1, range(1, 8), 0.0), (2, range(5, 11), 1.0)):
        for step in steps:
            results.append_jsonl(log, {"step": step, "attempt": attempt, "loss": 0.0, "reward": reward, "kl": reward})
    rows = results.read_train_log(log)
    assert [(r["step"], r["attempt"]) for r in rows] == [(s, 1 if s < 5 else 2) for s in range(1, 11)]
    from nli_grpo.training import train_summary

    summary = train_summary(CellFolder(run_dir), 10, 0.0, 4, 10, {})
    assert summary["reward_last"] == 1.0 and summary["reward_mean"] == 0.6

    curve = plots.mean_train_curve([str(run_dir)])
    assert list(curve.index) == list(range(1, 11)) and list(curve["reward"]) == [0.0] * 4 + [1.0] * 6


def test_a_result_document_built_for_a_cell_is_valid_and_agrees_with_its_folder(tmp_path):
    cfg = config_for_run("paper", ["stage=zero_shot"], str(tmp_path / "paper" / "qwen2.5-7b__awq__zero-shot"))
    doc = result_document(cfg)
    assert results.validate_result(doc) == []
    assert doc["cell_id"] == "qwen2.5-7b__awq__zero-shot" == CellFolder(cfg.output.dir).path.name
    assert doc["cell"]["lora_rank"] is None and doc["versions"]["trl"] and doc["status"] == "running"
    assert result_document(cfg, status="complete", eval={})["status"] == "complete"


def test_an_atomic_write_leaves_the_old_file_when_it_fails(tmp_path):
    path = tmp_path / "result.json"
    results.atomic_write_json(path, {"a": 1})
    circular = {"a": 2}
    circular["self"] = circular
    with pytest.raises(ValueError, match="Circular reference"):
        results.atomic_write_json(path, circular)  # fails half-way through writing
    assert json.loads(path.read_text()) == {"a": 1} and [p.name for p in tmp_path.iterdir()] == ["result.json"]


@pytest.mark.parametrize("text, reason", [("{", "not valid JSON"), ('{"tool": "other"}', "not an nli_grpo result"),
                                          ('{"tool": "nli_grpo", "schema_version": 99}', "unknown schema_version 99")])
def test_unusable_result_files_are_named_with_the_reason(tmp_path, text, reason):
    path = tmp_path / "result.json"
    path.write_text(text)
    with pytest.raises(results.ResultError, match=reason):
        results.read_result(path)
    assert results.load_existing(path) is None
