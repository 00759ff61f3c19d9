"""The package's layers: the login side (sweeps, status, aggregate, and what they import) never loads
torch, transformers, trl, peft or vllm, checked by running the real entry points in fresh
interpreters; and the import layering contract (setup.cfg, import-linter) holds."""

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
HEAVY = ("torch", "transformers", "trl", "peft", "vllm")

# Runs an entry point as `python ...` would, then reports the heavy packages it loaded (atexit: a
# command ends with SystemExit, which still runs it).
PROBE = """
import atexit, runpy, sys
def report():
    loaded = sorted({{m.split(".")[0] for m in sys.modules}} & set({heavy!r}))
    sys.stderr.write("\\nHEAVY-LOADED=" + ",".join(loaded) + "\\n")
atexit.register(report)
sys.argv = {argv!r}
if sys.argv[0].endswith(".py"):
    runpy.run_path(sys.argv[0], run_name="__main__")
else:
    runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
"""


def heavy_modules_loaded(*argv: str, cwd: Path = REPO) -> tuple[list[str], subprocess.CompletedProcess]:
    """Run `python argv...` (a script path or a module name first) in a fresh interpreter; the
    heavy packages it imported, and the finished process."""
    code = PROBE.format(heavy=HEAVY, argv=list(argv))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=cwd, timeout=120)
    marker = [line for line in proc.stderr.splitlines() if line.startswith("HEAVY-LOADED=")]
    assert marker, proc.stderr[-3000:]
    return [m for m in marker[-1].split("=", 1)[1].split(",") if m], proc


@pytest.mark.parametrize("sweep", ["lora_rank", "model_size", "quantization", "paper"])
def test_sweep_help_loads_no_heavy_package(sweep):
    loaded, proc = heavy_modules_loaded(f"sweeps/{sweep}.py", "--help")
    assert proc.returncode == 0 and "--partition" in proc.stdout
    assert loaded == []


def test_a_sweep_plan_status_and_aggregate_load_no_heavy_package(tmp_path, write_result):
    loaded, proc = heavy_modules_loaded("sweeps/lora_rank.py", "--smoke", "--dry-run", "--results", str(tmp_path))
    assert proc.returncode == 0 and "dry run: 2 of 2 cells would be submitted" in proc.stdout, proc.stdout + proc.stderr
    assert loaded == []

    sweep_dir = tmp_path / "lora_rank-smoke"
    write_result(sweep_dir / "tiny__bf16__r8__s0", "complete")
    loaded, proc = heavy_modules_loaded("nli_grpo.status", str(sweep_dir))
    assert proc.returncode == 0 and "1 complete" in proc.stdout and loaded == []
    loaded, proc = heavy_modules_loaded("nli_grpo.aggregate", str(tmp_path), "--no-plots", "--out", str(tmp_path / "out"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert loaded == []


def test_prepare_loads_no_heavy_package(tmp_path, original_files):
    """It runs on the login node too."""
    loaded, proc = heavy_modules_loaded("nli_grpo.prepare", "--from", str(original_files), "--cache", str(tmp_path / "cache"))
    assert proc.returncode == 0 and "prepared 11 source(s)" in proc.stdout, proc.stderr[-2000:]
    assert loaded == []


@pytest.mark.slurm
@pytest.mark.usefixtures("slurm_cluster")
def test_a_dry_run_against_slurm_loads_no_heavy_package(tmp_path):
    """The whole paper sweep planned against the cluster: partitions, limits, queue, sbatch text."""
    loaded, proc = heavy_modules_loaded("sweeps/paper.py", "--dry-run", "--partition", "gpu", "--mem-gb", "8",
                                        "--cpus-per-task", "2", "--time", "60", "--results", str(tmp_path),
                                        "--online", "data.train_source=anli_train_r1")
    assert proc.returncode == 0 and "dry run: 43 of 43 cells would be submitted" in proc.stdout, proc.stdout[-3000:]
    assert "#SBATCH --array=" in proc.stdout
    assert loaded == []


def test_login_side_modules_import_no_heavy_package():
    modules = ["nli_grpo.sweep", "nli_grpo.launch", "nli_grpo.status", "nli_grpo.job", "nli_grpo.manifest",
               "nli_grpo.slurm", "nli_grpo.grid", "nli_grpo.catalog", "nli_grpo.layout", "nli_grpo.verdict",
               "nli_grpo.aggregate.__main__"]
    code = (f"import sys\nimport {', '.join(modules)}\n"
            f"print(sorted({{m.split('.')[0] for m in sys.modules}} & set({HEAVY!r})))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "[]"


def test_imports_point_down_the_layers():
    """setup.cfg's [importlinter] contracts: entry points > login side > job > stages > models,
    rollout > light core, and aggregate's own layers; lazy imports inside functions included, so
    no cycle can hide in a function."""
    proc = subprocess.run([str(Path(sys.executable).parent / "lint-imports")], capture_output=True, text=True, cwd=REPO,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:]
    assert "kept, 0 broken" in proc.stdout
