"""The sweep command line without a Slurm cluster: the shipped sweep files expand to the cells the
paper needs, axis flags and --smoke shrink them, invalid cells are refused before anything is
queued, and a rerun decides per cell (with a fake queue; the real squeue path is covered by
test_sweeps_slurm.py)."""
import pytest

from nli_grpo import launch, manifest
from nli_grpo.job import RunRecord
from nli_grpo.layout import RESULT_FILENAME
from nli_grpo.sweep import _move_aside, decide, parse_args, plan, results_dir_problem


class Job:
    def __init__(self, job_id):
        self.job_id = job_id


@pytest.fixture
def cells_of(load_sweep):
    """`cells_of("lora_rank", *argv, tmp_path=...)`: the planned cells of a sweep file."""
    def plan_cells(name: str, *argv: str, tmp_path=None):
        sweep = load_sweep(name)
        results = ["--results", str(tmp_path)] if tmp_path else []
        return plan(sweep, parse_args(sweep, [*argv, *results]))
    return plan_cells


@pytest.fixture
def smoke_cells(cells_of):
    """The smoke lora_rank sweep's five cells (ranks 8..128) under `tmp_path`."""
    def plan_cells(tmp_path, *argv):
        return cells_of("lora_rank", "--smoke", "--ranks", "8,16,32,64,128", *argv, tmp_path=tmp_path)
    return plan_cells


def test_lora_rank_sweep_is_ranks_times_linked_model_variants(tmp_path, cells_of):
    cells = cells_of("lora_rank", tmp_path=tmp_path)
    assert len(cells) == 10 and not any(c.problems for c in cells)
    pairs = {(c.cfg.lora.rank, c.cfg.model.quantization, c.cfg.model.name_or_path) for c in cells}
    assert pairs == {(r, q, "Qwen/Qwen2.5-7B-Instruct" + ("-AWQ" if q == "awq" else "")) for r in (8, 16, 32, 64, 128) for q in ("bf16", "awq")}
    ids = [c.cell_id for c in cells]
    assert len(set(ids)) == 10 and "qwen2.5-7b__awq__r64__s0__vllm" in ids
    assert all(c.cfg.output.dir == str(tmp_path.absolute() / "lora_rank" / c.cell_id) for c in cells)
    assert all(c.cfg.output.sweep == "lora_rank" and c.cfg.grpo.completions_per_step == 32 for c in cells)


def test_cell_ids_are_stable_and_only_depend_on_the_axes(tmp_path, cells_of):
    first = [c.cell_id for c in cells_of("lora_rank", tmp_path=tmp_path)]
    again = [c.cell_id for c in cells_of("lora_rank", "grpo.learning_rate=1e-5", tmp_path=tmp_path / "other")]
    assert first == again


def test_axis_flags_and_seeds_restrict_and_extend_the_grid(tmp_path, cells_of):
    cells = cells_of("lora_rank", "--ranks", "8,32", "--quantizations", "bf16", "--seeds", "0,22,42", tmp_path=tmp_path)
    assert sorted((c.cfg.lora.rank, c.cfg.seed) for c in cells) == [(r, s) for r in (8, 32) for s in (0, 22, 42)]
    assert {c.cfg.model.name_or_path for c in cells} == {"Qwen/Qwen2.5-7B-Instruct"}
    sizes = cells_of("model_size", "--models", "14b,qwen2.5-32b", tmp_path=tmp_path)
    assert sorted(c.cfg.model.name_or_path for c in sizes) == ["Qwen/Qwen2.5-14B-Instruct-AWQ", "Qwen/Qwen2.5-32B-Instruct-AWQ"]


def test_per_size_resources_come_with_the_model_variant_and_the_cli_overrides_them(tmp_path, cells_of):
    cells = {c.cfg.model.name_or_path: c.cfg.resources for c in cells_of("model_size", tmp_path=tmp_path)}
    assert cells["Qwen/Qwen2.5-7B-Instruct-AWQ"].mem_gb == 64
    assert cells["Qwen/Qwen2.5-32B-Instruct-AWQ"].timeout_min == 48 * 60
    overridden = cells_of("model_size", "--time", "1-12:00:00", "--gpus-per-node", "2", "--mem-gb", "200",
                          "rollout.backend=hf", tmp_path=tmp_path)
    assert {(c.cfg.resources.timeout_min, c.cfg.resources.gpus_per_node, c.cfg.resources.mem_gb) for c in overridden} == {(36 * 60, 2, 200)}


def test_paper_sweep_has_main_runs_rank_ablation_and_one_zero_shot_per_model_variant(tmp_path, cells_of):
    cells = cells_of("paper", tmp_path=tmp_path)
    assert not [c.problems for c in cells if c.problems]
    zero_shot = [c for c in cells if c.cfg.stage == "zero_shot"]
    ablation = [c for c in cells if c.cfg.output.extra_axes]
    main = [c for c in cells if c not in zero_shot and c not in ablation]
    assert len(main) == 9 and len(ablation) == 30 and len(zero_shot) == 4
    assert sorted(c.cell_id for c in zero_shot) == ["qwen2.5-14b__awq__zero-shot", "qwen2.5-32b__awq__zero-shot",
                                                     "qwen2.5-7b__awq__zero-shot", "qwen2.5-7b__bf16__zero-shot"]
    # the same model/rank/seed in the main runs and the ablation are different runs (other recipe)
    assert "qwen2.5-7b__awq__r64__s22__vllm" in {c.cell_id for c in main}
    assert "qwen2.5-7b__awq__r64__s22__vllm__ablation-lora_rank" in {c.cell_id for c in ablation}
    assert {c.cfg.grpo.max_steps for c in ablation} == {1000} and {c.cfg.grpo.max_steps for c in main} == {4000}


def test_smoke_keeps_the_shape_shrunk_onto_the_tiny_model(tmp_path, cells_of):
    cells = cells_of("lora_rank", "--smoke", tmp_path=tmp_path)
    assert [c.cell_id for c in cells] == ["tiny-sft__bf16__r8__s0", "tiny-sft__bf16__r16__s0"]
    cfg = cells[0].cfg
    assert (cfg.model.name_or_path, cfg.resources.gpus_per_node, cfg.data.local_dir) == ("tiny-sft", 0, "samples")
    assert cfg.output.dir == str(tmp_path.absolute() / "lora_rank-smoke" / "tiny-sft__bf16__r8__s0")
    paper = sorted(c.cell_id for c in cells_of("paper", "--smoke", tmp_path=tmp_path))
    assert paper == ["tiny-sft__bf16__r16__s0__ablation-lora_rank", "tiny-sft__bf16__r8__s0",  # main runs: the smoke recipe's rank
                     "tiny-sft__bf16__r8__s0__ablation-lora_rank", "tiny-sft__bf16__zero-shot"]


def test_rank_zero_is_refused_with_the_field_and_the_fix(tmp_path, cells_of):
    [cell, *_] = cells_of("lora_rank", "--ranks", "0", tmp_path=tmp_path)
    assert cell.cfg is None
    assert cell.problems == ["lora.rank=0 must be a positive integer (the paper uses 8..128)"]


def test_rerun_skips_complete_and_queued_cells_and_resubmits_the_rest(tmp_path, smoke_cells, write_result):
    cells = smoke_cells(tmp_path)
    assert len(cells) == 5
    sweep_dir = tmp_path / "lora_rank-smoke"
    complete, failed, pending, preempted, missing = cells
    write_result(complete.run_dir, "complete")
    write_result(failed.run_dir, "failed", steps=3, error="RuntimeError: boom")
    write_result(preempted.run_dir, "preempted", steps=4, attempts=2)
    jobs = {c.cell_id: Job(f"5_{i}") for i, c in enumerate(cells[:4])}
    manifest.record_submission(sweep_dir, {}, manifest.submission_record("slurm", sweep_dir, jobs, retries=2))
    queue = lambda ids: {"5_2": "PENDING", "12": "RUNNING"}  # noqa: E731 - squeue as seen now (for the manifest's jobs)

    decide(cells, sweep_dir, force=False, queue=queue)
    assert [(c.action, c.reason) for c in cells] == [
        ("skip", "complete"), ("submit", "failed"), ("skip", "pending (job 5_2)"), ("submit", "preempted"), ("submit", "missing")]
    decide(cells, sweep_dir, force=True, queue=queue)
    assert [c.action for c in cells] == ["submit", "submit", "skip", "submit", "submit"]


def test_a_results_folder_that_cannot_be_written_is_named(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert "is a file" in results_dir_problem(blocker / "results" / "sweep")
    assert results_dir_problem(tmp_path / "new" / "sweep") is None
    assert not (tmp_path / "new").exists()  # checking creates nothing


def test_force_moves_a_complete_cell_aside_so_that_it_starts_fresh_and_keeps_a_failed_one(tmp_path, smoke_cells, write_result):
    complete, failed = smoke_cells(tmp_path)[:2]
    sweep_dir = tmp_path / "lora_rank-smoke"
    write_result(complete.run_dir, "complete")
    write_result(failed.run_dir, "failed")
    _move_aside(complete)
    _move_aside(failed)
    [kept] = (sweep_dir / ".replaced").iterdir()
    assert kept.name.startswith(complete.cell_id + ".") and (kept / RESULT_FILENAME).exists()
    assert not complete.run_dir.exists() and (failed.run_dir / RESULT_FILENAME).exists()


def test_a_rerun_with_other_settings_is_refused_and_force_starts_the_cell_afresh(tmp_path, smoke_cells, write_result):
    [first] = smoke_cells(tmp_path, "--ranks", "8")
    sweep_dir = tmp_path / "lora_rank-smoke"
    launch.write_config_snapshot(first.cfg, first.run_dir)
    RunRecord(first.cfg).update(status="preempted")
    (first.run_dir / "checkpoints" / "checkpoint-4").mkdir(parents=True)  # the work of the earlier run
    [same] = smoke_cells(tmp_path, "--ranks", "8", "grpo.save_steps=6")
    decide([same], sweep_dir, force=False, queue=lambda ids: {})
    assert same.problems and "other settings (grpo)" in same.problems[0] and "--force" in same.problems[0]

    [unchanged] = smoke_cells(tmp_path, "--ranks", "8", "resources.mem_gb=4")  # resources may change
    decide([unchanged], sweep_dir, force=False, queue=lambda ids: {})
    assert not unchanged.problems and unchanged.action == "submit"

    [forced] = smoke_cells(tmp_path, "--ranks", "8", "grpo.save_steps=6")
    decide([forced], sweep_dir, force=True, queue=lambda ids: {})
    assert not forced.problems and forced.action == "submit"
    _move_aside(forced)
    assert not forced.run_dir.exists() and len(list((sweep_dir / ".replaced").iterdir())) == 1


def test_a_complete_cell_whose_settings_changed_is_shown_as_changed_and_refused_with_the_force_command(
        tmp_path, load_sweep, smoke_cells, capsys):
    """A rerun with another learning rate must not pass the old results off as the new
    declaration's: the cell is refused (exit 2), named as changed with the differing sections,
    and the command that reruns it afresh is printed."""
    [done] = smoke_cells(tmp_path, "--ranks", "8")
    launch.write_config_snapshot(done.cfg, done.run_dir)
    (done.run_dir / "adapter").mkdir(parents=True)  # the work of the finished run
    RunRecord(done.cfg).update(status="complete", stages_done=["train", "eval"], train={"steps_done": 12},
                               eval={"anli_r1": {"accuracy": 0.5, "accuracy_strict": 0.5, "unparseable_rate": 0.0, "n": 2}})
    sweep = load_sweep("lora_rank")
    argv = ["--smoke", "--ranks", "8", "--results", str(tmp_path), "grpo.learning_rate=0.5"]

    [changed] = plan(sweep, parse_args(sweep, argv))
    decide([changed], tmp_path / "lora_rank-smoke", force=False, queue=None, force_command="COMMAND --force")
    assert changed.action == "changed" and changed.reason == "changed (grpo)"
    assert "other settings (grpo)" in changed.problems[0] and "COMMAND --force" in changed.problems[0]

    assert sweep.main(argv) == 2
    shown = capsys.readouterr().out
    assert "changed (grpo)" in shown and "skip: complete" not in shown
    assert f"python sweeps/lora_rank.py --smoke --ranks 8 --results {tmp_path} grpo.learning_rate=0.5 --force" in shown.replace("\n", "")
    assert (done.run_dir / "adapter").is_dir()  # nothing was moved or submitted

    [forced] = plan(sweep, parse_args(sweep, [*argv, "--force"]))
    decide([forced], tmp_path / "lora_rank-smoke", force=True, queue=None)
    assert not forced.problems and (forced.action, forced.reason) == ("submit", "changed (grpo) (--force)")


def test_a_local_cell_that_says_running_is_not_started_twice(tmp_path, smoke_cells, write_result):
    [cell] = smoke_cells(tmp_path, "--ranks", "8")
    write_result(cell.run_dir, "running", steps=2)
    decide([cell], tmp_path / "lora_rank-smoke", force=False, queue=None)
    assert cell.action == "skip" and "running" in cell.reason


def test_the_dry_run_shows_exactly_the_arrays_the_submission_makes(tmp_path, cells_of):
    """One graph (graph.plan_graph, its cells grouped by launch.array_groups) for both: the dry run
    prints its nodes' sbatch scripts, the submission submits its nodes; cells asking for the same
    resources share an array, chunked to MaxArraySize."""
    from nli_grpo import graph

    cells = cells_of("model_size", "--dry-run", tmp_path=tmp_path)
    options = launch.LaunchOptions(partition="gpu")
    groups = launch.array_groups(cells, options, "nli_grpo_model_size", max_array_size=2)
    # three sizes (three resource requests) of three seeds... the smaller of which fits one array
    assert sum(len(chunk) for _, chunk in groups) == len(cells)
    assert all(len(chunk) <= 2 for _, chunk in groups)
    assert all(len({c.cfg.resources.mem_gb for c in chunk}) == 1 for _, chunk in groups)
    jobs = graph.plan_graph(cells, graph.Target(tmp_path, "model_size", options, max_array_size=2), {})
    assert [sorted(n.jobs) for n in jobs.nodes] == [sorted(c.cell_id for c in chunk) for _, chunk in groups]
    shown = "\n".join(f"{title}\n{script}" for title, script in graph.sbatch_scripts(jobs))
    assert shown.count("#SBATCH --array=") == len([g for g in groups if len(g[1]) > 1])
    assert f"cells {len(groups)}: " in shown and "#SBATCH --dependency" not in shown
    assert graph.describe(jobs) == f"job graph:\n  cells: {len(cells)} job(s)"


def test_a_cell_whose_inputs_are_not_prepared_is_refused(tmp_path, monkeypatch, original_files):
    """Jobs run offline against the cache: the model must be there (or a local folder), and every
    dataset the cell reads a local file or prepared; --online (nodes that reach the hub) needs
    only what the hub cannot give (the hard pool)."""
    from nli_grpo import prepare
    from nli_grpo.grid import input_problems
    from nli_grpo.job import config_for_run

    monkeypatch.setenv("NLI_GRPO_CACHE", str(tmp_path / "cache"))
    cfg = config_for_run("lora_rank", ["model.quantization=bf16", "model.name_or_path=Qwen/Qwen2.5-7B-Instruct"])
    model, data = input_problems(cfg)
    assert model.startswith("model Qwen/Qwen2.5-7B-Instruct is not in the cache") and "jobs run offline" in model
    assert data.startswith("data not found locally (no data.local_dir) nor in the prepared cache")
    assert "anli_r1, " in data and data.endswith("anli_hard")
    assert input_problems(cfg, online=True) == [
        f"data not found locally (no data.local_dir) nor in the prepared cache {tmp_path / 'cache' / 'data'}: anli_hard"]

    assert prepare.main(["--from", str(original_files)]) == 0
    folder = tmp_path / "Qwen2.5-7B-Instruct"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    ready = config_for_run("lora_rank", ["model.quantization=bf16", f"model.name_or_path={folder}", "data.train_source=anli_train_r1"])
    assert input_problems(ready) == []
