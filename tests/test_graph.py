"""The sweep's job graph (nli_grpo.graph) without a cluster: which preflights a --preflight run
needs (a verdict of the same settings, or a preflight job queued for them, is used as it is), the
cells after their combination's, and on this machine a node after a failed job is not run. The
same graph submitted to the local Slurm cluster: tests/test_sweeps_slurm.py."""

import json

import pytest

from nli_grpo import graph, launch, manifest
from nli_grpo.layout import preflight_file
from nli_grpo.sweep import parse_args, plan

COMBINATION = "tiny-sft__bf16__hf__g0"


@pytest.fixture
def cells(tmp_path, load_sweep):
    """The smoke lora_rank sweep's two cells under tmp_path, to submit."""
    sweep = load_sweep("lora_rank")
    planned = plan(sweep, parse_args(sweep, ["--smoke", "--results", str(tmp_path)]))
    for c in planned:
        c.action = "submit"
    return planned


def target(tmp_path) -> graph.Target:
    return graph.Target(tmp_path / "lora_rank-smoke", "lora_rank-smoke", launch.LaunchOptions(partition="gpu"))


def write_verdict(tmp_path, cfg, verdict="pass", **config_changes) -> None:
    config = cfg.to_dict()
    for key, value in config_changes.items():
        section, name = key.split("__")
        config[section][name] = value
    path = preflight_file(tmp_path / "lora_rank-smoke", COMBINATION)
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"schema_version": 1, "combination": COMBINATION, "verdict": verdict, "config": config,
                                "created": "2026-12-04T00:00:00Z",
                                "reasons": [{"level": "fail", "check": "time", "reason": "too slow"}] if verdict == "fail" else []}))


def test_preflight_puts_one_job_per_combination_before_its_cells(tmp_path, cells):
    jobs = graph.plan_graph(cells, target(tmp_path), {}, preflight=True)
    assert [(n.kind, list(n.jobs)) for n in jobs.nodes] == [("preflight", [COMBINATION]), ("cells", [c.cell_id for c in cells])]
    assert jobs.nodes[1].after == (("preflight", COMBINATION),)
    assert graph.describe(jobs) == ("job graph:\n  preflight: 1 job(s) (tiny-sft__bf16__hf__g0)\n"
                                    "  cells: 2 job(s), after its combination's preflight")


def test_a_verdict_of_the_same_settings_is_used_and_one_of_other_settings_is_not(tmp_path, cells):
    write_verdict(tmp_path, cells[0].cfg, "pass", lora__rank=128, grpo__learning_rate=1.0)  # not what a preflight measures
    checks = graph.read_checks(tmp_path / "lora_rank-smoke", cells)
    assert checks[COMBINATION].state == "pass"
    jobs = graph.plan_graph(cells, target(tmp_path), checks, preflight=True)
    assert [n.kind for n in jobs.nodes] == ["cells"] and jobs.nodes[0].after == ()
    assert "uses: preflight tiny-sft__bf16__hf__g0: pass, measured 2026-12-04T00:00:00Z with these settings" in graph.describe(jobs)

    (tmp_path / "lora_rank-smoke" / "preflight" / f"{COMBINATION}.json").unlink()
    (tmp_path / "lora_rank-smoke" / "preflight").rmdir()
    write_verdict(tmp_path, cells[0].cfg, "fail", grpo__max_completion_length=4096)
    check = graph.read_checks(tmp_path / "lora_rank-smoke", cells)[COMBINATION]
    assert (check.state, check.changed) == ("none", ["grpo.max_completion_length"])
    graph.refuse_failed(cells, {COMBINATION: check})
    assert not any(c.problems for c in cells)  # a fail for other settings refuses nothing...
    assert "none for these settings (its verdict measured other grpo.max_completion_length" in check.shown()
    assert [n.kind for n in graph.plan_graph(cells, target(tmp_path), {COMBINATION: check}, preflight=True).nodes] == ["preflight", "cells"]


def test_a_failed_verdict_of_these_settings_refuses_the_cells(tmp_path, cells):
    write_verdict(tmp_path, cells[0].cfg, "fail")
    checks = graph.read_checks(tmp_path / "lora_rank-smoke", cells)
    graph.refuse_failed(cells, checks)
    assert all(c.problems == [f"its combination {COMBINATION} failed preflight: too slow. Fix that and run --preflight again, "
                              "leave these cells out (--models, --quantizations), or submit them all the same with --no-preflight"]
               for c in cells)


def test_a_preflight_queued_for_the_same_settings_is_waited_on_not_submitted_again(tmp_path, cells, load_sweep):
    sweep_dir = tmp_path / "lora_rank-smoke"
    launch.write_config_snapshot(cells[0].cfg, sweep_dir, preflight_file(sweep_dir, COMBINATION).with_suffix(".yaml"))
    manifest.record_submission(sweep_dir, {}, {"cluster": "slurm", "jobs": {f"preflight/{COMBINATION}": "41"}})
    assert graph.queued_preflights(sweep_dir, cells, lambda ids: {"41": "PENDING"}) == {COMBINATION: "41"}
    assert graph.queued_preflights(sweep_dir, cells, lambda ids: {"41": "BLOCKED"}) == {}
    assert graph.queued_preflights(sweep_dir, cells, lambda ids: {}) == {}  # it left the queue

    jobs = graph.plan_graph(cells, target(tmp_path), {}, preflight=True, queued_preflights={COMBINATION: "41"})
    assert [n.kind for n in jobs.nodes] == ["cells"]
    assert jobs.nodes[0].parameters["slurm_additional_parameters"]["dependency"] == "afterok:41"
    assert graph.describe(jobs).endswith("cells: 2 job(s), after jobs queued already\n"
                                         "  uses: preflight tiny-sft__bf16__hf__g0: job 41, queued already; its cells wait on it")

    sweep = load_sweep("lora_rank")
    other = plan(sweep, parse_args(sweep, ["--smoke", "--results", str(tmp_path), "grpo.max_completion_length=64"]))
    assert graph.queued_preflights(sweep_dir, other, lambda ids: {"41": "RUNNING"}) == {}  # queued for other settings


def test_on_this_machine_a_node_after_a_failed_job_is_not_run(tmp_path):
    ran = []

    def fails():
        raise RuntimeError("the preflight failed")

    nodes = [launch.ArrayNode("preflight", {"timeout_min": 5}, {"a": fails, "b": lambda: ran.append("b")}, tmp_path, lambda q: None),
             launch.ArrayNode("cells a", {"timeout_min": 5}, {"cell-a": lambda: ran.append("cell-a")}, tmp_path, lambda q: None,
                              after=(("preflight", "a"),)),
             launch.ArrayNode("cells b", {"timeout_min": 5}, {"cell-b": lambda: ran.append("cell-b")}, tmp_path, lambda q: None,
                              after=(("preflight", "b"),))]
    queued = launch.submit_graph(nodes, "debug")
    for job in queued["cells b"].values():
        job.result()
    assert list(queued) == ["preflight", "cells b"] and ran == ["b", "cell-b"]
