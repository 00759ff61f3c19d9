"""Aggregation (the `nli_grpo.aggregate` package): a synthetic results tree with known numbers -> exact
tables, files and plots. One module for the package, since its tests share the results builder below;
sections: reading (`collect`), seeds and tables (`tables`), the command line and its files (`__main__`,
`render`, `plots`)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import pandas as pd
import pytest

from nli_grpo.aggregate import __main__ as cli
from nli_grpo.aggregate.collect import apply_filters, collect, parse_filters
from nli_grpo.aggregate.render import format_stat, table_markdown
from nli_grpo.aggregate.tables import DEFAULT_REFERENCE, NO_PARSE, Row, Stat, SweepResults, Table, build_sweep_results, load_references, main_table, tables_for
from nli_grpo.config import ExperimentConfig
from nli_grpo.grid import cell_from_config, cell_id
from nli_grpo.layout import RESULT_FILENAME, TRAIN_LOG_FILENAME, result_document
from nli_grpo.results import append_jsonl, atomic_write_json

# ---------------------------------------------------------------------------------------------
# Synthetic results builder (reusable: any test that needs result files on disk)
# ---------------------------------------------------------------------------------------------


def make_result(sweep: str, *, model: str = "qwen2.5-7b", quantization: str = "bf16", lora_rank: int | None = 64,
                seed: int = 0, status: str = "complete", scores: dict[str, float] | None = None,
                strict_penalty: float = 0.05, updated_at: str = "2025-01-01T00:00:00+00:00",
                data: dict[str, str] | None = None, pool: str | None = None, **extra_axes) -> dict:
    """A result document as a job writes it (nli_grpo.layout.result_document); `scores` maps
    benchmark -> accuracy (fraction), and accuracy_strict is `accuracy - strict_penalty`.
    lora_rank=None makes a zero-shot baseline; keyword axes become extra cell axes; `data` maps
    benchmark -> the sha256 of the data it was evaluated on (its fingerprint), `pool` is the sha256
    of the training pool."""
    cfg = ExperimentConfig(stage="zero_shot" if lora_rank is None else "grpo", seed=seed)
    cfg.model.name_or_path, cfg.model.quantization = f"Qwen/{model}-Instruct", quantization
    cfg.lora.rank = lora_rank or 64
    cfg.output.sweep, cfg.output.extra_axes = sweep, dict(extra_axes)
    cfg.output.cell_id = cell_id(cell_from_config(cfg))
    evals = {b: {"accuracy": a, "accuracy_strict": round(a - strict_penalty, 6), "unparseable_rate": strict_penalty,
                 "n": 1000} for b, a in (scores or {}).items()}
    for b, sha in (data or {}).items():
        evals[b]["fingerprint"] = {"sha256": sha, "rows": 1000}
    train = {"steps_done": 1, "data": {"fingerprint": {"sha256": pool, "rows": 500}}} if pool else None
    return result_document(cfg, status=status, versions={"python": "3.11"}, slurm={"job_id": "1"}, eval=evals, train=train,
                           error="CUDA out of memory" if status == "failed" else None,
                           created_at=updated_at, updated_at=updated_at)


def write_result(root: Path, doc: dict, train_log: list[dict] | None = None) -> Path:
    """Write `doc` where a job would (`<root>/<sweep>/<cell_id>/result.json`), plus its train log."""
    folder = root / doc["sweep"] / doc["cell_id"]
    atomic_write_json(folder / RESULT_FILENAME, doc)
    for record in train_log or []:
        append_jsonl(folder / TRAIN_LOG_FILENAME, record)
    return folder / RESULT_FILENAME


# The lora_rank sweep below: accuracy = BASE + GAIN[rank] - COST[quant] + 0.01 * (seed - 1), so over
# seeds 0, 1, 2 the mean is BASE + GAIN - COST and the sample std exactly 1.00 point.
BASE = {"snli": 0.70, "anli_r1": 0.50, "anli_r3": 0.40}
GAIN = {None: 0.0, 8: 0.10, 64: 0.20}
COST = {"bf16": 0.0, "awq": 0.03}
SEEDS = (0, 1, 2)


def lora_rank_scores(quant: str, rank: int | None, seed: int) -> dict[str, float]:
    return {b: round(base + GAIN[rank] - COST[quant] + 0.01 * (seed - 1), 6) for b, base in BASE.items()}


def train_log(reward_start: float) -> list[dict]:
    return [{"step": s, "reward": reward_start + 0.05 * s, "kl": 0.001 * s, "loss": 0.1} for s in range(0, 50, 5)]


@pytest.fixture
def results_root(tmp_path: Path) -> Path:
    """lora_rank sweep: 7B, bf16 + AWQ, ranks 8/16/64, seeds 0-2, zero-shot (seed 1) per quantization;
    awq r64 seed 2 failed; bf16 r16 only one seed, still running; awq r16 absent; plus three bad files."""
    root = tmp_path / "results"
    for quant in COST:
        write_result(root, make_result("lora_rank", quantization=quant, lora_rank=None, seed=1,
                                       scores=lora_rank_scores(quant, None, 1)))
        for rank in (8, 64):
            for seed in SEEDS:
                if quant == "awq" and rank == 64 and seed == 2:
                    write_result(root, make_result("lora_rank", quantization=quant, lora_rank=rank, seed=seed,
                                                   status="failed"))
                    continue
                write_result(root, make_result("lora_rank", quantization=quant, lora_rank=rank, seed=seed,
                                               scores=lora_rank_scores(quant, rank, seed)),
                             train_log(0.1 * rank / 64))
    write_result(root, make_result("lora_rank", lora_rank=16, seed=0, status="running"), train_log(0.2)[:3])

    truncated = root / "lora_rank" / "truncated" / RESULT_FILENAME
    truncated.parent.mkdir(parents=True)
    full = json.dumps(make_result("lora_rank", lora_rank=32, scores=BASE))
    truncated.write_text(full[: len(full) // 2])
    foreign = root / "other_tool" / "cell" / RESULT_FILENAME
    foreign.parent.mkdir(parents=True)
    foreign.write_text(json.dumps({"tool": "lm-eval-harness", "results": {"anli_r1": {"acc": 0.5}}}))
    future = make_result("lora_rank", lora_rank=128, scores=BASE)
    future["schema_version"] = 99
    write_result(root, future)
    return root


def sweep_and_tables(root: Path, *argv_filters: str, metric: str = "accuracy") -> tuple[SweepResults, dict]:
    collection = collect([root])
    runs = apply_filters(collection.runs, parse_filters(argv_filters))
    (sweep,) = build_sweep_results(runs, metric)
    tables = tables_for(sweep, load_references(DEFAULT_REFERENCE))
    return sweep, {t.name: t for t in tables}


def rows_by_labels(table: Table) -> dict[tuple, Row]:
    return {tuple(row.labels.get(c, "") for c in table.label_columns): row for row in table.rows}


def markdown_rows(table: Table) -> list[list[str]]:
    """Data rows of the table's Markdown, split into stripped cells."""
    lines = table_markdown(table).splitlines()
    body = [line for line in lines if line.startswith("|")][2:]
    return [[c.strip() for c in line.strip("|").split("|")] for line in body]


# ---------------------------------------------------------------------------------------------
# Reading (`collect`)
# ---------------------------------------------------------------------------------------------


def test_bad_files_are_reported_with_reasons_and_skipped(results_root):
    collection = collect([results_root])
    reasons = {Path(s.path).parent.name: s.reason for s in collection.skipped}
    assert set(reasons) == {"truncated", "cell", "qwen2.5-7b__bf16__r128__s0"}
    assert "not valid JSON" in reasons["truncated"]
    assert "not an nli_grpo result" in reasons["cell"]
    assert "unknown schema_version 99" in reasons["qwen2.5-7b__bf16__r128__s0"]
    assert len(collection.runs) == 2 + 2 * 2 * 3 + 1   # zero-shot, rank x quant x seed, running cell


def test_overlapping_roots_and_copied_cells_are_not_counted_twice(results_root, tmp_path):
    nested = collect([results_root, results_root / "lora_rank"])
    assert len(nested.runs) == 15
    copy = tmp_path / "backup" / "old_copy"
    shutil.copytree(results_root / "lora_rank" / "qwen2.5-7b__bf16__r8__s0", copy)
    older = json.loads((copy / RESULT_FILENAME).read_text())
    older["updated_at"] = "2024-01-01T00:00:00+00:00"
    (copy / RESULT_FILENAME).write_text(json.dumps(older))
    collection = collect([results_root, tmp_path / "backup"])
    assert len(collection.runs) == 15
    (dup,) = [s for s in collection.skipped if "same cell" in s.reason]
    assert dup.path == str(copy / RESULT_FILENAME)


def test_binary_result_file_is_skipped(tmp_path):
    root = tmp_path / "results"
    write_result(root, make_result("s", scores={"anli_r1": 0.5}))
    (root / "s" / "garbage").mkdir()
    (root / "s" / "garbage" / RESULT_FILENAME).write_bytes(b"\xff\xfe\x00\x81")
    collection = collect([root])
    assert [s.reason.split(" (")[0] for s in collection.skipped] == ["not valid JSON"]
    assert len(collection.runs) == 1


# ---------------------------------------------------------------------------------------------
# Seeds and tables (`tables`; rows checked as `render` prints them)
# ---------------------------------------------------------------------------------------------


def test_columns_are_standard_then_adversarial_then_averages(results_root):
    sweep, _ = sweep_and_tables(results_root)
    assert sweep.columns == ["snli", "anli_r1", "anli_r3", "avg_adversarial", "avg"]
    assert sweep.expected_seeds == {"zero_shot": [1], "grpo": [0, 1, 2]}


def test_seeds_merge_into_mean_sample_std_and_n(results_root):
    sweep, _ = sweep_and_tables(results_root)
    bf16_r64 = sweep.find(model="qwen2.5-7b", quantization="bf16", stage="grpo", lora_rank=64, rollout="hf")
    assert bf16_r64.stats["anli_r1"].mean == pytest.approx(0.70)
    assert bf16_r64.stats["anli_r1"].std == pytest.approx(0.01)
    assert bf16_r64.stats["anli_r1"].n == 3
    assert bf16_r64.stats["avg"].mean == pytest.approx((0.90 + 0.70 + 0.60) / 3)
    awq_r64 = sweep.find(model="qwen2.5-7b", quantization="awq", stage="grpo", lora_rank=64, rollout="hf")
    assert awq_r64.stats["anli_r3"].mean == pytest.approx(0.565)       # seeds 0, 1 (seed 2 failed)
    assert awq_r64.stats["anli_r3"].std == pytest.approx(0.005 * 2 ** 0.5)
    assert awq_r64.stats["anli_r3"].n == 2
    zero_shot = sweep.find(model="qwen2.5-7b", quantization="awq", stage="zero_shot", lora_rank=None)
    assert zero_shot.stats["snli"] == Stat(mean=0.67, std=None, n=1)


def test_main_table_rows_deltas_states_and_best(results_root):
    _, tables = sweep_and_tables(results_root)
    main = tables["main"]
    assert main.label_columns == ["quantization", "system", "lora_rank"]
    assert main.fixed == {"model": "qwen2.5-7b"}
    assert markdown_rows(main) == [
        ["bf16", "zero-shot", "", "70.00", "50.00", "40.00", "45.00", "53.33", "1/1"],
        ["bf16", "GRPO", "8", "80.00 ± 1.00", "60.00 ± 1.00", "50.00 ± 1.00", "55.00 ± 1.00", "63.33 ± 1.00", "3/3"],
        ["bf16", "GRPO", "16", "running", "running", "running", "running", "running", "0/3 (1 running, 2 missing)"],
        ["bf16", "GRPO", "64", "**90.00 ± 1.00**", "**70.00 ± 1.00**", "**60.00 ± 1.00**", "**65.00 ± 1.00**",
         "**73.33 ± 1.00**", "3/3"],
        ["bf16", "Δ GRPO − zero-shot", "8", "+10.00", "+10.00", "+10.00", "+10.00", "+10.00", "3/3 vs 1/1"],
        ["bf16", "Δ GRPO − zero-shot", "16", "—", "—", "—", "—", "—", "0/3 (1 running, 2 missing) vs 1/1"],
        ["bf16", "Δ GRPO − zero-shot", "64", "+20.00", "+20.00", "+20.00", "+20.00", "+20.00", "3/3 vs 1/1"],
        ["awq", "zero-shot", "", "67.00", "47.00", "37.00", "42.00", "50.33", "1/1"],
        ["awq", "GRPO", "8", "77.00 ± 1.00", "57.00 ± 1.00", "47.00 ± 1.00", "52.00 ± 1.00", "60.33 ± 1.00", "3/3"],
        ["awq", "GRPO", "16", "—", "—", "—", "—", "—", "0/3 (3 missing)"],
        ["awq", "GRPO", "64", "86.50 ± 0.71", "66.50 ± 0.71", "56.50 ± 0.71", "61.50 ± 0.71", "69.83 ± 0.71",
         "2/3 (1 failed)"],
        ["awq", "Δ GRPO − zero-shot", "8", "+10.00", "+10.00", "+10.00", "+10.00", "+10.00", "3/3 vs 1/1"],
        ["awq", "Δ GRPO − zero-shot", "16", "—", "—", "—", "—", "—", "0/3 (3 missing) vs 1/1"],
        ["awq", "Δ GRPO − zero-shot", "64", "+19.50", "+19.50", "+19.50", "+19.50", "+19.50", "2/3 (1 failed) vs 1/1"],
        ["", "Kavumba et al. 2023 (T5-3B)", "", "—", "81.80", "74.80", "—", "—", "reference"],
    ]


def test_reference_rows_follow_the_models_in_the_sweep(tmp_path):
    root = tmp_path / "results"
    for rank in (None, 64):
        write_result(root, make_result("main", model="qwen2.5-32b", quantization="awq", lora_rank=rank,
                                       scores={"anli_r3": 0.5 if rank is None else 0.7, "snli": 0.8}))
    _, tables = sweep_and_tables(root)
    references = {r.labels["system"]: r for r in tables["main"].rows if r.runs == "reference"}
    assert set(references) == {"paper: zero-shot", "paper: GRPO", "Kavumba et al. 2023 (T5-3B)"}
    assert references["paper: zero-shot"].cells["anli_r3"].mean == pytest.approx(0.5358)
    assert references["paper: GRPO"].cells["anli_r3"].mean == pytest.approx(0.7175)
    assert "53.58" in references["paper: GRPO"].source and "[inferred]" in references["paper: GRPO"].source
    # Reference rows never take the "best" mark from the sweep's own results.
    assert not references["Kavumba et al. 2023 (T5-3B)"].cells["anli_r3"].best
    assert "Reference rows:" in table_markdown(tables["main"])


def test_rank_ablation_nests_rank_inside_quantization(results_root):
    _, tables = sweep_and_tables(results_root)
    table = tables["ablation_lora_rank"]
    assert table.label_columns == ["quantization", "lora_rank"]
    assert table.fixed == {"model": "qwen2.5-7b", "stage": "GRPO", "rollout": "hf"}
    rows = rows_by_labels(table)
    assert list(rows) == [("bf16", "8"), ("bf16", "16"), ("bf16", "64"), ("awq", "8"), ("awq", "16"), ("awq", "64")]
    assert format_stat(rows[("awq", "64")].cells["avg"]) == "69.83 ± 0.71"
    assert rows[("bf16", "16")].cells["snli"].state == "running"
    assert rows[("awq", "16")].cells["snli"].state == "missing"
    assert [k for k, r in rows.items() if r.cells["anli_r1"].best] == [("bf16", "64")]
    assert "ablation_model" not in tables            # one model: no model-size table


def test_quantization_deltas_and_best_marks_ties(results_root):
    _, tables = sweep_and_tables(results_root)
    table = tables["quantization_delta"]
    assert table.label_columns == ["stage", "lora_rank", "delta"]
    assert markdown_rows(table) == [
        ["zero-shot", "", "awq − bf16", "**-3.00**", "**-3.00**", "**-3.00**", "**-3.00**", "**-3.00**", "1/1 vs 1/1"],
        ["GRPO", "8", "awq − bf16", "**-3.00**", "**-3.00**", "**-3.00**", "**-3.00**", "**-3.00**", "3/3 vs 3/3"],
        ["GRPO", "16", "awq − bf16", "—", "—", "—", "—", "—", "0/3 (3 missing) vs 0/3 (1 running, 2 missing)"],
        ["GRPO", "64", "awq − bf16", "-3.50", "-3.50", "-3.50", "-3.50", "-3.50", "2/3 (1 failed) vs 3/3"],
    ]


def test_model_size_table_orders_models_by_size(tmp_path):
    root = tmp_path / "results"
    for model, bonus in (("qwen2.5-14b", 0.1), ("qwen2.5-7b", 0.0), ("tiny", -0.3)):
        for rank in (None, 64):
            write_result(root, make_result("sizes", model=model, quantization="awq", lora_rank=rank,
                                           scores={"anli_r1": 0.5 + bonus + (0.1 if rank else 0.0)}))
    _, tables = sweep_and_tables(root)
    table = tables["ablation_model"]
    assert table.label_columns == ["stage", "lora_rank", "model"]
    assert [r.labels["model"] for r in table.rows] == ["tiny", "qwen2.5-7b", "qwen2.5-14b"] * 2
    assert [row[-2] for row in markdown_rows(table)] == ["20.00", "50.00", "60.00", "30.00", "60.00", "**70.00**"]
    assert "quantization_delta" not in tables and "ablation_lora_rank" not in tables


def test_extra_axes_get_their_own_ablation(tmp_path):
    root = tmp_path / "results"
    for beta, acc in ((0.0, 0.6), (0.01, 0.65)):
        write_result(root, make_result("kl", beta=beta, scores={"anli_r1": acc}))
    _, tables = sweep_and_tables(root)
    assert markdown_rows(tables["ablation_beta"]) == [["0.0", "60.00", "1/1"], ["0.01", "**65.00**", "1/1"]]


def test_zero_shot_without_a_grpo_only_axis_is_the_baseline_for_every_value(tmp_path):
    root = tmp_path / "results"
    write_result(root, make_result("kl", lora_rank=None, scores={"anli_r1": 0.5}))      # no `beta` axis
    for beta, acc in ((0.0, 0.6), (0.01, 0.65)):
        write_result(root, make_result("kl", beta=beta, scores={"anli_r1": acc}))
    _, tables = sweep_and_tables(root)
    assert markdown_rows(tables["main"])[:6] == [
        ["0.0", "zero-shot", "", "50.00", "1/1"],
        ["0.0", "GRPO", "64", "60.00", "1/1"],
        ["0.0", "Δ GRPO − zero-shot", "64", "+10.00", "1/1 vs 1/1"],
        ["0.01", "zero-shot", "", "50.00", "1/1"],
        ["0.01", "GRPO", "64", "**65.00**", "1/1"],
        ["0.01", "Δ GRPO − zero-shot", "64", "+15.00", "1/1 vs 1/1"],
    ]
    assert markdown_rows(tables["ablation_beta"]) == [["0.0", "60.00", "1/1"], ["0.01", "**65.00**", "1/1"]]


def test_a_set_evaluated_with_nothing_parsed_reads_no_parse_not_missing(tmp_path):
    doc = make_result("smoke", scores={"snli": 0.5, "anli_r1": 0.5})
    doc["eval"]["anli_r1"]["accuracy"] = None   # every completion unparseable: nothing to average
    write_result(tmp_path, doc)
    [sweep] = build_sweep_results(collect([tmp_path]).runs)
    stats = sweep.variants[0].stats
    assert stats["anli_r1"].state == NO_PARSE and stats["snli"].state == "ok"
    assert "no parse" in table_markdown(main_table(sweep))


def test_default_reference_is_the_committed_paper_csv():
    assert DEFAULT_REFERENCE == Path(__file__).resolve().parents[1] / "results" / "reference" / "paper.csv"
    assert DEFAULT_REFERENCE.is_file()


def test_benchmark_synthetic_results_are_valid_and_aggregate(tmp_path):
    from nli_grpo import bench

    assert "aggregate" in bench.BENCHMARKS
    root = tmp_path / "results"
    assert bench.write_synthetic_results(root, 150, cells_per_sweep=100) == 2
    collection = collect([root])
    assert (len(collection.runs), collection.skipped) == (150, [])
    sweeps = build_sweep_results(collection.runs)
    assert [s.name for s in sweeps] == ["synthetic_00", "synthetic_01"]
    names = {t.name for t in tables_for(sweeps[0])}
    assert names == {"main", "ablation_lora_rank", "ablation_model", "quantization_delta"}


# ---------------------------------------------------------------------------------------------
# Command line and files (`__main__`, `render`: Markdown, CSV, LaTeX; `plots`: PNG)
# ---------------------------------------------------------------------------------------------


def test_strict_exits_non_zero_and_lenient_run_reports_bad_files(results_root, capsys):
    assert cli.main([str(results_root), "--strict", "--no-plots"]) == 1
    err = capsys.readouterr().err
    assert "--strict: 3 unusable" in err
    assert not (results_root / "tables").exists()

    assert cli.main([str(results_root), "--no-plots"]) == 0
    captured = capsys.readouterr()
    assert f"skipped {results_root / 'lora_rank' / 'truncated' / RESULT_FILENAME}: not valid JSON" in captured.err
    assert "unknown schema_version 99" in captured.err
    assert "15 result files read, 3 skipped" in captured.out


def test_filters_metric_and_benchmarks(results_root, capsys):
    sweep, tables = sweep_and_tables(results_root, "quantization=awq", "lora_rank=64,none")
    assert [(r.labels["system"], r.labels.get("lora_rank")) for r in tables["main"].rows] == [
        ("zero-shot", ""), ("GRPO", "64"), ("Δ GRPO − zero-shot", "64"), ("Kavumba et al. 2023 (T5-3B)", None)]
    assert "quantization_delta" not in tables

    sweep, _ = sweep_and_tables(results_root, metric="accuracy_strict")
    zero_shot = sweep.find(model="qwen2.5-7b", quantization="bf16", stage="zero_shot", lora_rank=None)
    assert zero_shot.stats["anli_r1"].mean == pytest.approx(0.45)

    assert cli.main([str(results_root), "--no-plots", "--benchmarks", "anli_r3", "--format", "csv"]) == 0
    frame = pd.read_csv(results_root / "tables" / "lora_rank" / "main.csv", keep_default_na=False)
    assert set(frame["column"]) == {"anli_r3"}
    assert not (results_root / "tables" / "lora_rank" / "main.md").exists()

    with pytest.raises(SystemExit) as exc:
        cli.main([str(results_root), "--filter", "quantisation=awq"])
    assert exc.value.code == 2
    assert "no result has an axis 'quantisation'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main([str(results_root), "--benchmarks", "anli_r4"])
    assert cli.main([str(results_root), "--filter", "model=qwen2.5-72b"]) == 1


def test_cli_writes_markdown_csv_latex_and_plots(results_root, tmp_path, capsys):
    out = tmp_path / "paper"
    assert cli.main([str(results_root), "--out", str(out)]) == 0
    stdout = capsys.readouterr().out
    assert stdout.startswith("# nli_grpo results: `accuracy`")
    assert "## Sweep `lora_rank`" in stdout and "### LoRA rank ablation (model = qwen2.5-7b, stage = GRPO, rollout = hf)" in stdout
    assert (out / "tables" / "report.md").read_text() == stdout

    tables = out / "tables" / "lora_rank"
    assert sorted(p.name for p in tables.iterdir()) == sorted(
        f"{name}.{fmt}" for name in ("main", "ablation_lora_rank", "quantization_delta")
        for fmt in ("md", "csv", "tex"))

    csv = pd.read_csv(tables / "ablation_lora_rank.csv")
    assert list(csv.columns) == ["quantization", "lora_rank", "column", "mean", "std", "n", "state", "kind", "best",
                                 "display", "runs", "source", "mixed_data", "data"]
    best = csv[(csv["quantization"] == "bf16") & (csv["lora_rank"] == 64) & (csv["column"] == "anli_r1")].iloc[0]
    assert (best["mean"], best["std"], best["n"], best["state"], best["best"], best["display"]) == (
        pytest.approx(0.70), pytest.approx(0.01), 3, "ok", True, "70.00 ± 1.00")
    running = csv[(csv["quantization"] == "bf16") & (csv["lora_rank"] == 16)]
    assert set(running["state"]) == {"running"} and set(running["best"]) == {False}
    assert set(running["runs"]) == {"0/3 (1 running, 2 missing)"}

    tex = (tables / "main.tex").read_text()
    assert "\\toprule" in tex and "\\midrule" in tex and "\\bottomrule" in tex
    assert "\\textbf{90.00 $\\pm$ 1.00}" in tex
    assert "$\\Delta$ GRPO $-$ zero-shot & 64 & +20.00" in tex
    assert "Kavumba et al. 2023 (T5-3B) &  & --- & 81.80 & 74.80" in tex
    assert "\\label{tab:lora_rank-main}" in tex

    plots = out / "plots" / "lora_rank"
    for name in ("accuracy_vs_rank", "zero_shot_vs_grpo", "train_curves"):
        png = plots / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert png.stat().st_size > 20_000
        height, width, channels = matplotlib.image.imread(png).shape
        assert height > 300 and width > 600 and channels in (3, 4)


def test_plots_that_do_not_apply_are_not_written(tmp_path):
    root = tmp_path / "results"
    write_result(root, make_result("single", scores={"anli_r1": 0.6}))   # no train log, one rank, no zero-shot
    assert cli.main([str(root)]) == 0
    assert not (root / "plots" / "single").exists() or not any((root / "plots" / "single").iterdir())
    assert (root / "tables" / "single" / "main.md").exists()


def test_tables_without_plots_never_import_matplotlib(results_root):
    # A fresh interpreter: this one has matplotlib loaded (matplotlib.image, imported above).
    script = ("import sys; from nli_grpo.aggregate import __main__ as cli; "
              f"rc = cli.main([{str(results_root)!r}, '--no-plots']); "
              "print(rc, sorted(m for m in sys.modules if m.split('.')[0] == 'matplotlib'))")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert proc.stdout.splitlines()[-1] == "0 []"


def test_cells_computed_on_different_data_are_marked_not_averaged_silently(tmp_path):
    """Seed 2 of rank 64 was evaluated on another version of ANLI R1 (another fingerprint): its
    column is marked in every table, with a note naming both versions; SNLI, all on one version,
    is not."""
    root = tmp_path / "results"
    same, other = "a" * 64, "b" * 64
    for rank in (8, 64):
        for seed in (0, 1, 2):
            anli = other if (rank, seed) == (64, 2) else same
            write_result(root, make_result("fp", lora_rank=rank, seed=seed, scores={"snli": 0.7, "anli_r1": 0.5},
                                           data={"snli": same, "anli_r1": anli}))
    [sweep] = build_sweep_results(collect([root]).runs)
    tables = {t.name: t for t in tables_for(sweep)}
    table = tables["ablation_lora_rank"]
    rows = {row.labels["lora_rank"]: row for row in table.rows}
    assert table.columns == ["snli", "anli_r1", "avg"]
    # ANLI R1 and the average over it, in every row; not SNLI
    assert [[c for c in table.columns if row.cells[c].mixed] for row in table.rows] == [["anli_r1", "avg"]] * 2
    assert table.notes == [f"ANLI R1: computed on different data (2 versions: {'a' * 10}/1000, {'b' * 10}/1000); "
                           "the marked cells are not comparable"]
    text = table_markdown(table)
    assert "50.00 ± 0.00†" in text and "Data:\n- † ANLI R1: computed on different data" in text
    assert format_stat(rows["64"].cells["snli"]).endswith("0") and "†" not in format_stat(rows["64"].cells["snli"])


def test_cells_trained_on_different_pools_are_marked(tmp_path):
    root = tmp_path / "results"
    for seed, pool in ((0, "c" * 64), (1, "c" * 64), (2, "d" * 64)):
        write_result(root, make_result("pools", lora_rank=64, seed=seed, scores={"anli_r1": 0.5}, pool=pool))
    write_result(root, make_result("pools", lora_rank=None, scores={"anli_r1": 0.4}))  # zero-shot: trained on nothing
    [sweep] = build_sweep_results(collect([root]).runs)
    main = next(t for t in tables_for(sweep) if t.name == "main")
    grpo = [row for row in main.rows if row.labels.get("system") == "GRPO"]
    assert grpo and all(row.cells["anli_r1"].mixed for row in grpo)
    zero_shot = [row for row in main.rows if row.labels.get("system") == "zero-shot"]
    assert zero_shot and not any(row.cells["anli_r1"].mixed for row in zero_shot)  # trained on no pool
    assert main.notes == [f"the trained cells used different training pools (2: {'c' * 10}/500, {'d' * 10}/500); "
                          "the marked cells are not comparable"]
    same = tmp_path / "same"
    for seed in (0, 1):
        write_result(same, make_result("pools", lora_rank=64, seed=seed, scores={"anli_r1": 0.5}, pool="c" * 64))
    [sweep] = build_sweep_results(collect([same]).runs)
    assert all(not t.notes for t in tables_for(sweep))
